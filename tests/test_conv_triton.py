"""The Triton conv kernels (bigkernels/triton/conv.py), called directly: outputs and all four gradients
against bigkernels.reference.conv2d in float64 with the DESIGN.md rule (stock = torch's conv2d +
activation in the test dtype). On CPU they run under the Triton interpreter (tests/conftest.py), in
float32/float16 only (bf16 dots are wrong there); the `cuda` tests add bf16 at ResNet-50 shapes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bigkernels import reference
from conftest import HAS_CUDA
from numerics import assert_matches

triton_conv = pytest.importorskip("bigkernels.triton.conv")
conv_forward, conv_backward = triton_conv.conv_forward, triton_conv.conv_backward

pytestmark = pytest.mark.triton
DEVICE = "cuda" if HAS_CUDA else "cpu"
ACTIVATIONS = ["none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "leaky_relu"]
GRAD_NAMES = ("grad_input", "grad_weight", "grad_bias", "grad_residual")

# (id, N, C, H, W, K, R, S, stride, padding, dilation, groups): tiny, odd spatial sizes.
CASES = [
    ("1x1", 2, 8, 7, 5, 8, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    ("3x3_pad", 2, 4, 7, 5, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    ("3x3_stride2", 2, 5, 7, 5, 6, 3, 3, (2, 2), (1, 1), (1, 1), 1),
    ("1x1_stride2", 1, 6, 7, 5, 3, 1, 1, (2, 2), (0, 0), (1, 1), 1),
    ("dilation2", 1, 4, 9, 7, 4, 3, 3, (1, 1), (2, 2), (2, 2), 1),
    ("groups2", 2, 6, 7, 5, 4, 3, 3, (1, 1), (1, 1), (1, 1), 2),
    ("depthwise", 1, 4, 7, 5, 4, 3, 3, (1, 1), (1, 1), (1, 1), 4),
    ("mixed", 1, 3, 8, 7, 5, 3, 2, (2, 1), (1, 0), (1, 2), 1),  # every parameter differs per axis
    ("multi_tile", 1, 20, 9, 7, 19, 3, 3, (1, 1), (1, 1), (1, 1), 1),  # several tiles on every axis
]
CASE_IDS = [c[0] for c in CASES]


def make_case(N, C, H, W, K, R, S, stride, padding, dilation, groups, *, bias=True, residual=True, seed=0):
    """Fresh random float64 tensors (never zeros), and the upstream gradient."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale

    P, Q = triton_conv.output_size((N, C, H, W), (K, C // groups, R, S), stride, padding, dilation)
    fan_in = C // groups * R * S
    return dict(
        input=rnd(N, C, H, W, scale=2.0),
        weight=rnd(K, C // groups, R, S, scale=2 * fan_in ** -0.5),
        bias=rnd(K, scale=0.5) if bias else None,
        residual=rnd(N, K, P, Q) if residual else None,
        grad_output=rnd(N, K, P, Q),
        conv=dict(stride=stride, padding=padding, dilation=dilation, groups=groups),
    )


def reference_and_stock(case, dtype, activation, negative_slope):
    """(output, grads) of reference.conv2d in float64, and in dtype (the stock ops)."""
    results = []
    for dt in (torch.float64, dtype):
        names = [k for k in ("input", "weight", "bias", "residual") if case[k] is not None]
        leaves = {k: case[k].to(device=DEVICE, dtype=dt).requires_grad_() for k in names}
        conv = case["conv"]
        y = reference.conv2d(leaves["input"], leaves["weight"], leaves.get("bias"), conv["stride"],
                             conv["padding"], conv["dilation"], conv["groups"], activation, negative_slope,
                             leaves.get("residual"))
        grads = torch.autograd.grad(y, list(leaves.values()), case["grad_output"].to(device=DEVICE, dtype=dt))
        by_name = dict(zip(names, grads))
        results.append((y.detach(), [by_name.get(k) for k in ("input", "weight", "bias", "residual")]))
    return results


def run_ours(case, dtype, activation, negative_slope, channels_last, output_mask=(True,) * 4):
    def to(t):
        if t is None:
            return None
        t = t.to(device=DEVICE, dtype=dtype)
        return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    conv = case["conv"]
    geometry = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    x, w, b, res = to(case["input"]), to(case["weight"]), to(case["bias"]), to(case["residual"])
    y, z = conv_forward(x, w, b, res, *geometry, activation, negative_slope, True)
    mask = list(output_mask)
    mask[2] = mask[2] and b is not None
    mask[3] = mask[3] and res is not None
    grads = conv_backward(to(case["grad_output"]), x, w, y, z, *geometry, activation, negative_slope, mask)
    return x, y, z, grads, mask


def check(case, dtype, activation, channels_last, negative_slope=0.1):
    (y64, g64), (y_stock, g_stock) = reference_and_stock(case, dtype, activation, negative_slope)
    x, y, z, grads, mask = run_ours(case, dtype, activation, negative_slope, channels_last)
    assert_matches("output", y.cpu(), y_stock, y64)
    # Outputs keep the input's layout (channels_last in, channels_last out), like torch's conv.
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=layout)
    conv = case["conv"]
    torch_y = torch.nn.functional.conv2d(x, x.new_empty(case["weight"].shape), None, conv["stride"],
                                         conv["padding"], conv["dilation"], conv["groups"])
    assert y.stride() == torch_y.stride()
    needs_z = not triton_conv.grad_from_output(activation, negative_slope)
    assert z.shape == (y.shape if needs_z else (0,))
    for name, ours, stock, ref, wanted in zip(GRAD_NAMES, grads, g_stock, g64, mask):
        if wanted:
            assert_matches(name, ours.cpu(), stock, ref)
        else:
            assert ours.shape == (0,), f"{name} not asked for, must be empty"
    if mask[0]:
        assert grads[0].is_contiguous(memory_format=layout)
    if mask[1]:  # the parameter's own layout, so AccumulateGrad keeps it as it is
        assert grads[1].is_contiguous(memory_format=layout)


# Each geometry in two (layout, dtype) variants, alternating over the cases so that all four pairs
# occur; the activation and the residual rotate too (test_activations crosses those fully).
VARIANTS = [(False, torch.float32), (True, torch.float16), (True, torch.float32), (False, torch.float16)]


@pytest.mark.parametrize("variant", [0, 1], ids=["a", "b"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_conv_grid(index, variant, poison_empty):
    _, *sizes = CASES[index]
    channels_last, dtype = VARIANTS[(2 * (index % 2) + variant)]
    activation = ACTIVATIONS[(2 * index + variant) % len(ACTIVATIONS)]
    case = make_case(*sizes, residual=(index + variant) % 2 == 0, bias=index % 3 != 1, seed=index)
    check(case, dtype, activation, channels_last)


def random_geometry(seed):
    """A random small conv geometry (sizes 1 to 9, kernels 1 to 4 (even ones too), strides 1 to 3,
    padding up to 2, dilation 1 or 2, groups 1 to 3) whose output is not empty."""
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=g))

    while True:
        groups = pick(1, 3)
        C, K = groups * pick(1, 3), groups * pick(1, 3)
        H, W, R, S = pick(1, 9), pick(1, 9), pick(1, 4), pick(1, 4)
        stride, dilation = (pick(1, 3), pick(1, 3)), (pick(1, 2), pick(1, 2))
        padding = (pick(0, 2), pick(0, 2))
        P, Q = triton_conv.output_size((1, C, H, W), (K, C // groups, R, S), stride, padding, dilation)
        if P >= 1 and Q >= 1:
            return (pick(1, 2), C, H, W, K, R, S, stride, padding, dilation, groups)


@pytest.mark.parametrize("seed", range(6))
def test_random_geometries(seed, poison_empty):
    """A seeded sweep over odd combinations the grid does not name (even kernels, stride 3,
    padding wider than the kernel, 1-pixel inputs)."""
    sizes = random_geometry(seed)
    case = make_case(*sizes, residual=seed % 2 == 0, seed=seed)
    check(case, torch.float32, ACTIVATIONS[seed % len(ACTIVATIONS)], channels_last=seed % 3 == 0)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS + ["leaky_relu_negative"])
def test_activations(activation, residual, poison_empty):
    """Every activation, with and without residual (a negative leaky slope makes the backward use z)."""
    negative_slope = -0.2 if activation == "leaky_relu_negative" else 0.1
    activation = activation.replace("_negative", "")
    case = make_case(*CASES[2][1:], residual=residual, seed=len(activation))
    check(case, torch.float32, activation, channels_last=True, negative_slope=negative_slope)


@pytest.mark.parametrize("output_mask", [(False, True, False, False), (True, False, True, False),
                                         (False, False, True, True), (False, False, False, False)])
def test_output_mask(output_mask, poison_empty):
    """Gradients not asked for come back empty; the others still match (gz computed in the GEMM loads
    when grad_residual is not materialised)."""
    case = make_case(*CASES[1][1:], seed=3)
    (_, g64), (_, g_stock) = reference_and_stock(case, torch.float32, "silu", 0.1)
    _, _, _, grads, mask = run_ours(case, torch.float32, "silu", 0.1, True, output_mask)
    for name, ours, stock, ref, wanted in zip(GRAD_NAMES, grads, g_stock, g64, mask):
        if wanted:
            assert_matches(name, ours.cpu(), stock, ref)
        else:
            assert ours.shape == (0,)


def test_non_contiguous_input(poison_empty):
    """Strided views (every other column of a wider tensor) are read through their strides."""
    case = make_case(*CASES[2][1:], seed=5)
    (y64, g64), (y_stock, g_stock) = reference_and_stock(case, torch.float32, "relu", 0.1)
    wide = torch.empty(case["input"].shape[:-1] + (2 * case["input"].shape[-1],), dtype=torch.float32, device=DEVICE)
    x = wide[..., ::2]
    x.copy_(case["input"])
    w = case["weight"].float().to(DEVICE).transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous
    conv = case["conv"]
    geometry = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    b, res = case["bias"].float().to(DEVICE), case["residual"].float().to(DEVICE)
    y, z = conv_forward(x, w, b, res, *geometry, "relu", 0.1, True)
    assert_matches("output", y.cpu(), y_stock, y64)
    dy = case["grad_output"].float().to(DEVICE).transpose(2, 3).contiguous().transpose(2, 3)
    grads = conv_backward(dy, x, w, y, z, *geometry, "relu", 0.1, [True] * 4)
    for name, ours, stock, ref in zip(GRAD_NAMES, grads, g_stock, g64):
        assert_matches(name, ours.cpu(), stock, ref)


def test_broadcast_grad_output(poison_empty):
    """A grad_output with zero strides (what autograd passes for y.sum()) is read through its strides."""
    case = make_case(*CASES[3][1:], seed=6)
    case["grad_output"] = torch.full_like(case["grad_output"], 0.75)
    (_, g64), (_, g_stock) = reference_and_stock(case, torch.float32, "sigmoid", 0.1)
    x, y, z, _, _ = run_ours(case, torch.float32, "sigmoid", 0.1, False, (False,) * 4)
    w = case["weight"].float().to(DEVICE)
    dy = torch.tensor(0.75, device=DEVICE).expand(y.shape)
    conv = case["conv"]
    grads = conv_backward(dy, x, w, y, z, conv["stride"], conv["padding"], conv["dilation"], conv["groups"],
                          "sigmoid", 0.1, [True] * 4)
    for name, ours, stock, ref in zip(GRAD_NAMES, grads, g_stock, g64):
        assert_matches(name, ours.cpu(), stock, ref)


def test_backward_bad_grad_output():
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    w = torch.randn(4, 4, 3, 3, device=DEVICE)
    y, z = conv_forward(x, w, None, None, (1, 1), (1, 1), (1, 1), 1, "relu", 0.01, True)
    with pytest.raises(RuntimeError, match="grad_output must be"):
        conv_backward(y[:, :, :4], x, w, y, z, (1, 1), (1, 1), (1, 1), 1, "relu", 0.01, [True] * 4)


def test_empty_batch(poison_empty):
    x = torch.randn(0, 4, 7, 5, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    b = torch.randn(6, device=DEVICE)
    y, z = conv_forward(x, w, b, None, (1, 1), (1, 1), (1, 1), 1, "gelu", 0.01, True)
    assert y.shape == z.shape == (0, 6, 7, 5)
    grads = conv_backward(torch.randn(0, 6, 7, 5, device=DEVICE), x, w, y, z, (1, 1), (1, 1), (1, 1), 1,
                          "gelu", 0.01, [True, True, True, False])
    assert grads[0].shape == x.shape
    assert torch.equal(grads[1], torch.zeros_like(w)) and torch.equal(grads[2], torch.zeros_like(b))


def test_preactivation_only_when_needed():
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    w = torch.randn(4, 4, 3, 3, device=DEVICE)
    args = (x, w, None, None, (1, 1), (1, 1), (1, 1), 1)
    _, z = conv_forward(*args, "relu", 0.01, True)  # relu' comes from y
    assert z.shape == (0,)
    y, z = conv_forward(*args, "gelu", 0.01, False)  # inference: nothing kept
    assert z.shape == (0,)
    with pytest.raises(RuntimeError, match="preactivation"):
        conv_backward(torch.randn_like(y), x, w, y, z, (1, 1), (1, 1), (1, 1), 1, "gelu", 0.01, [True] * 4)


@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.randn(4, 3, 3, 3)), "weight must have input channels"),
    (dict(groups=3), "groups must be"),
    (dict(residual=torch.randn(1, 4, 4, 5)), "residual must be"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(bias=torch.randn(5)), "bias must be"),
    (dict(input=torch.randn(1, 4, 5, 5, dtype=torch.float64)), "float16, bfloat16 or float32"),
    (dict(weight=torch.randn(4, 4, 9, 9)), "larger than the padded input"),
    (dict(stride=(0, 1)), "stride and dilation must be"),
])
def test_bad_input(bad, match):
    args = dict(input=torch.randn(1, 4, 5, 5), weight=torch.randn(4, 4, 3, 3), bias=None, residual=None,
                stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, activation="relu",
                negative_slope=0.01, need_preactivation=False)
    args.update(bad)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=match):
        conv_forward(**args)


def test_grad_weight_grid_folds_groups_times_taps_above_cudas_limit():
    """Depthwise C = 2048 at 7 x 7 has 100 352 (group, tap) pairs, grid y's limit is 65 535: the excess
    folds into x, every pair covered exactly once. Pure arithmetic: nothing of that size is allocated."""
    from bigkernels.triton._launch import GRID_YZ_LIMIT

    for Kg, Cg, group_taps, splits in ((1, 1, 2048 * 49, 4), (64, 64, 2048 * 9, 1), (1, 1, 65_535, 2),
                                       (256, 16, 8192 * 25, 3)):
        (x, y, z), chunks, span = triton_conv.grad_weight_grid(Kg, Cg, group_taps, splits, 64, 16)
        tiles = -(-Kg // 64) * -(-Cg // 16)
        assert y <= GRID_YZ_LIMIT and z == splits and x == tiles * chunks and y == span
        assert chunks * span >= group_taps > (chunks - 1) * span
    assert triton_conv.grad_weight_grid(1, 1, 100_352, 1, 16, 16)[1:] == (2, 65_535)


def test_folded_grad_weight_indexing_matches_the_plain_grid(monkeypatch, poison_empty):
    """With the limit forced down to 8 (still >= the 5 groups of the forward and grad_input grids), a
    depthwise 3 x 3 conv's 5 * 9 = 45 (group, tap) pairs run folded (6 chunks, the last ragged):
    grad_weight must equal the plain grid's bit for bit, and the reference by the DESIGN rule."""
    from bigkernels.triton import _launch

    case = make_case(1, 5, 6, 7, 5, 3, 3, (1, 1), (1, 1), (1, 1), 5, seed=3)
    plain = run_ours(case, torch.float32, "relu", 0.1, False)
    monkeypatch.setattr(_launch, "GRID_YZ_LIMIT", 8)
    assert triton_conv.grad_weight_grid(1, 1, 45, 1, 16, 16)[1:] == (6, 8)
    folded = run_ours(case, torch.float32, "relu", 0.1, False)
    assert torch.equal(plain[3][1], folded[3][1])
    (_, ref), (_, stock) = reference_and_stock(case, torch.float32, "relu", 0.1)
    assert_matches("grad_weight", folded[3][1].cpu(), stock[1].cpu(), ref[1].cpu())


def test_launchers_refuse_mixed_devices():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3, device="meta")
    with pytest.raises(RuntimeError, match="conv_triton: all tensors must be on one device, but input is on cpu "
                                           "and weight on meta"):
        conv_forward(x, w, None, None, (1, 1), (1, 1), (1, 1), 1, "none", 0.0, False)


def test_compiles_for_sm90():
    """The GEMM kernels compile for sm_90 (no GPU needed) with their loads pipelined (cp.async, more
    than one stage of shared memory) into wgmma dots, for channels_last bf16 (tests/triton_sm90_compile.py)."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_sm90_compile.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["kernel"] for r in results] == ["forward", "grad_input", "grad_weight", "gz"]
    for r in results[:3]:
        assert r["cp_async"] and r["wgmma"] and r["shared"] >= 2 * r["one_stage"], r


# ------------------------------------------------------------------------------------ GPU only
# ResNet-50 layers: (N, C, H, W, K, R, S, stride, padding).
RESNET50_LAYERS = [
    pytest.param(32, 3, 224, 224, 64, 7, 7, 2, 3, id="stem_7x7"),
    pytest.param(32, 64, 56, 56, 64, 3, 3, 1, 1, id="layer1_3x3"),
    pytest.param(32, 256, 56, 56, 64, 1, 1, 1, 0, id="layer1_1x1_reduce"),
    pytest.param(32, 128, 56, 56, 128, 3, 3, 2, 1, id="layer2_3x3_stride2"),
    pytest.param(32, 256, 14, 14, 256, 3, 3, 1, 1, id="layer3_3x3"),
    pytest.param(32, 512, 7, 7, 2048, 1, 1, 1, 0, id="layer4_1x1_expand"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("N, C, H, W, K, R, S, stride, padding", RESNET50_LAYERS)
def test_resnet50_layers_bf16(N, C, H, W, K, R, S, stride, padding):
    """bf16 channels_last at ResNet-50 shapes, conv + bias + residual + relu, against the float64
    reference with torch's bf16 ops as the stock error."""
    case = make_case(N, C, H, W, K, R, S, (stride, stride), (padding, padding), (1, 1), 1, seed=11)
    check(case, torch.bfloat16, "relu", channels_last=True)


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_grouped_bf16_gpu(activation):
    case = make_case(8, 64, 28, 28, 128, 3, 3, (1, 1), (1, 1), (1, 1), 4, seed=12)
    check(case, torch.bfloat16, activation, channels_last=True)


@pytest.mark.cuda
@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_conv_grid_bf16_gpu(index):
    """The interpreter grid in bf16 (its dots are wrong under the interpreter, so GPU only)."""
    _, *sizes = CASES[index]
    case = make_case(*sizes, residual=index % 2 == 0, seed=index)
    check(case, torch.bfloat16, ACTIVATIONS[index % len(ACTIVATIONS)], channels_last=True)


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_float32_gpu(channels_last):
    """float32 on the GPU: TF32 dots exactly when torch's cuDNN convs use TF32, so stock and ours
    round alike (the stock error is the yardstick either way)."""
    case = make_case(8, 64, 28, 28, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1, seed=13)
    check(case, torch.float32, "silu", channels_last=channels_last)
