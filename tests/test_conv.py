"""bigkernels::conv (fused conv + bias + residual + activation) on the cpu and triton backends:
numerics against float64 and the stock sequence (outputs and every gradient), a geometry grid,
every activation, padding forms, a hypothesis sweep, gradcheck, opcheck, torch.compile, layouts,
conv1d and bad input."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bigkernels
from bigkernels import reference
from bigkernels.nn.functional import conv1d, conv2d
from bigkernels.ops.conv import ACTIVATIONS
from conftest import HAS_CUDA
from numerics import assert_matches

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: the Triton interpreter
HAS_TRITON_CONV = importlib.util.find_spec("triton") is not None and importlib.util.find_spec("bigkernels.triton.conv") is not None
SKIP_TRITON = pytest.mark.skipif(
    not HAS_TRITON_CONV, reason="no Triton conv kernels here (bigkernels/triton/conv.py not in this tree, or Triton not installed)"
)

# (backend, device, dtypes it is checked in). bf16 Triton dots are wrong under the interpreter.
BACKENDS = [
    pytest.param("cpu", "cpu", (torch.float32, torch.float64, torch.bfloat16), id="cpu"),
    pytest.param(
        "triton",
        TRITON_DEVICE,
        (torch.float32, torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float32, torch.float16),
        id="triton",
        marks=[pytest.mark.triton, SKIP_TRITON],
    ),
]

# (N, C, H, W, K, (R, S), stride, padding, dilation, groups): 1x1 and kxk, odd sizes, strides,
# dilation, grouped and depthwise (groups == C == K), a batch of 0, non-square kernels.
GEOMETRIES = [
    (2, 3, 7, 9, 5, (3, 3), 1, 1, 1, 1),
    (1, 8, 5, 5, 16, (1, 1), 1, 0, 1, 1),
    (3, 4, 13, 11, 6, (3, 3), 2, 1, 1, 2),
    (2, 6, 9, 10, 6, (3, 3), 1, 2, 2, 6),  # depthwise, dilated
    (1, 4, 15, 15, 4, (7, 7), 1, 3, 1, 4),  # depthwise 7x7
    (2, 5, 8, 7, 7, (2, 5), (2, 1), (0, 2), 1, 1),  # even/non-square kernel, per-axis stride/padding
    (1, 1, 1, 1, 1, (1, 1), 1, 0, 1, 1),
    (0, 3, 6, 6, 4, (3, 3), 1, 1, 1, 1),  # empty batch
    (2, 16, 6, 6, 8, (1, 1), 2, 0, 1, 1),  # strided 1x1 (ResNet downsample)
]
# The interpreter runs Triton kernels one program at a time: keep its grid small.
TRITON_GEOMETRIES = [GEOMETRIES[i] for i in (0, 2, 3, 5)]


def pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def make_case(n, c, h, w, k, kernel, stride, padding, dilation, groups, *, bias=True, residual=True, seed=0):
    """Fresh random float64 arguments (never zeros: a kernel that drops a term fails)."""
    g = torch.Generator().manual_seed(seed)
    r, s = kernel
    scale = (c // groups * r * s) ** -0.5
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(k, c // groups, r, s, generator=g, dtype=torch.float64) * scale
    b = torch.randn(k, generator=g, dtype=torch.float64) * 0.5 if bias else None
    p = (h + 2 * pair(padding)[0] - pair(dilation)[0] * (r - 1) - 1) // pair(stride)[0] + 1
    q = (w + 2 * pair(padding)[1] - pair(dilation)[1] * (s - 1) - 1) // pair(stride)[1] + 1
    res = torch.randn(n, k, p, q, generator=g, dtype=torch.float64) if residual else None
    return dict(input=x, weight=weight, bias=b, residual=res), dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def cast(tensors, dtype, device, channels_last=False, requires_grad=True):
    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        t = t.to(device=device, dtype=dtype)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out[name] = t.requires_grad_(requires_grad)
    return out


def stock(t, geo, activation, negative_slope=0.01):
    """The stock sequence: torch conv2d (+ bias) + residual + activation."""
    return reference.conv2d(t["input"], t["weight"], t["bias"], pair(geo["stride"]), pair(geo["padding"]), pair(geo["dilation"]),
                            geo["groups"], activation, negative_slope, t["residual"])


def ours(t, geo, activation, negative_slope=0.01):
    return conv2d(t["input"], t["weight"], t["bias"], geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
                  activation=activation, negative_slope=negative_slope, residual=t["residual"])


def output_and_grads(fn, t, grad_out):
    y = fn(t)
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    if y.numel() == 0:
        return y, {k: torch.zeros_like(t[k]) for k in names}
    grads = torch.autograd.grad(y, [t[k] for k in names], grad_out)
    return y, dict(zip(names, grads))


def check_against_stock(backend, device, dtype, tensors64, geo, activation, channels_last=False, negative_slope=0.01, seed=0):
    ref_t = cast(tensors64, torch.float64, "cpu")
    with torch.no_grad():
        out_shape = stock(ref_t, geo, activation, negative_slope).shape
    grad64 = torch.randn(out_shape, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    ref_y, ref_g = output_and_grads(lambda t: stock(t, geo, activation, negative_slope), ref_t, grad64)
    st_y, st_g = output_and_grads(lambda t: stock(t, geo, activation, negative_slope),
                                  cast(tensors64, dtype, device, channels_last), grad64.to(device, dtype))
    with bigkernels.use_backend(backend):
        our_t = cast(tensors64, dtype, device, channels_last)
        our_y, our_g = output_and_grads(lambda t: ours(t, geo, activation, negative_slope), our_t, grad64.to(device, dtype))
    tag = f"{backend}/{dtype}/{activation}"
    assert our_y.device.type == device
    # The output takes the input's layout; an input that is both (C == 1 or H == W == 1) counts as NCHW.
    if channels_last and not our_t["input"].is_contiguous() and our_y.shape[1] > 1 and our_y.shape[2] * our_y.shape[3] > 1:
        assert our_y.is_contiguous(memory_format=torch.channels_last), f"{tag}: channels_last input gave a non-channels_last output"
    assert_matches(f"{tag}/output", our_y, st_y, ref_y)
    for name in ref_g:
        assert_matches(f"{tag}/grad_{name}", our_g[name], st_g[name], ref_g[name])


# --------------------------------------------------------------------------------- numerics grid
@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_matches_reference_and_stock(backend, device, dtypes, geometry, channels_last, poison_empty):
    geom = GEOMETRIES[geometry]
    if backend == "triton" and geom not in TRITON_GEOMETRIES:
        pytest.skip("the Triton interpreter runs a subset of the grid (time)")
    activation = ("relu", "gelu", "silu", "leaky_relu")[geometry % 4]
    for seed, dtype in enumerate(dtypes):
        tensors, geo = make_case(*geom, bias=geometry % 3 != 1, residual=geometry % 2 == 0, seed=seed)
        check_against_stock(backend, device, dtype, tensors, geo, activation, channels_last, seed=seed)


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
@pytest.mark.parametrize("activation", [None, *ACTIVATIONS[1:]])
def test_every_activation(backend, device, dtypes, activation, poison_empty):
    for seed, dtype in enumerate(dtypes[:2]):
        tensors, geo = make_case(2, 4, 6, 7, 5, (3, 3), 1, 1, 1, 1, seed=10 + seed)
        check_against_stock(backend, device, dtype, tensors, geo, activation, seed=seed)
    # leaky_relu with a non-default slope, and a non-positive one (whose gradient needs z).
    if activation == "leaky_relu":
        for slope in (0.2, -0.5, 0.0):
            tensors, geo = make_case(2, 4, 6, 7, 5, (3, 3), 1, 1, 1, 1, seed=20)
            check_against_stock(backend, device, dtypes[0], tensors, geo, activation, negative_slope=slope)


# Layers big enough (>= 2^17 output elements) for the CPU kernel's oneDNN post-op core
# (csrc/cpu/conv.cpp, prefer_onednn_fused): (geometry, channels_last, residual).
ONEDNN_CASES = [
    ((2, 16, 48, 48, 32, (3, 3), 1, 1, 1, 1), True, True),  # channels_last + residual
    ((2, 16, 96, 96, 32, (3, 3), 2, 1, 1, 1), True, False),  # channels_last, strided, no residual
    ((1, 64, 48, 48, 64, (7, 7), 1, 3, 1, 64), True, False),  # depthwise 7x7 channels_last (inference: oneDNN)
    ((2, 16, 48, 48, 32, (3, 3), 1, 1, 1, 1), False, True),  # NCHW 3x3 + residual (1x1: the GEMM core; >= 32 channels: Winograd)
]
ONEDNN_ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "sigmoid", "leaky_relu", None]


@pytest.mark.parametrize("activation", ONEDNN_ACTIVATIONS)
def test_cpu_onednn_fused_core(activation, poison_empty):
    """float32 and bfloat16, with and without gradients (training keeps z for gelu/silu, so the
    activation moves to the kernel's extra pass; inference puts it inside the primitive)."""
    k = ONEDNN_ACTIVATIONS.index(activation)
    for i in (k % 4, (k + 2) % 4):
        geom, channels_last, residual = ONEDNN_CASES[i]
        # bfloat16 on the dense layers only: stock CPU depthwise bfloat16 backward is very slow.
        dtype = torch.bfloat16 if i in (0, 3) and k % 2 == 0 else torch.float32
        tensors, geo = make_case(*geom, residual=residual, seed=200 + i)
        if i != 2:  # depthwise: forward only (ATen's CPU depthwise weight gradient takes seconds here)
            check_against_stock("cpu", "cpu", dtype, tensors, geo, activation, channels_last, seed=i)
        with torch.no_grad():
            t = cast(tensors, dtype, "cpu", channels_last, requires_grad=False)
            with bigkernels.use_backend("cpu"):
                y = ours(t, geo, activation)
            ref = stock(cast(tensors, torch.float64, "cpu", requires_grad=False), geo, activation)
            assert_matches(f"inference/{dtype}/{activation}", y, stock(t, geo, activation), ref)


def test_cpu_core_choice():
    """The big layers above do run on the fused primitive; a tiny NCHW one does not."""
    def fused_calls(geom, channels_last, residual):
        tensors, geo = make_case(*geom, residual=residual, seed=220)
        t = cast(tensors, torch.float32, "cpu", channels_last, requires_grad=False)
        with torch.no_grad(), bigkernels.use_backend("cpu"), torch.autograd.profiler.profile() as prof:
            ours(t, geo, "relu")
        return sum("_convolution_pointwise" in e.name for e in prof.function_events)

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    for case in ONEDNN_CASES:
        assert fused_calls(*case) == 1, case
    assert fused_calls((1, 3, 7, 9, 5, (3, 3), 1, 1, 1, 1), False, True) == 0
    # NCHW depthwise goes to the direct kernel (bigkernels/ops/conv.py _pick_op), not through oneDNN.
    assert fused_calls((1, 64, 48, 48, 64, (7, 7), 1, 3, 1, 64), False, False) == 0


def test_cpu_generic_core_without_onednn():
    """With oneDNN switched off the CPU kernel runs at::convolution + its own pass: same results."""
    tensors, geo = make_case(2, 32, 16, 16, 32, (3, 3), 1, 1, 1, 1, seed=210)
    with torch.backends.mkldnn.flags(enabled=False):
        for activation in ("relu", "silu"):
            check_against_stock("cpu", "cpu", torch.float32, tensors, geo, activation, channels_last=True)


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
def test_padding_forms(backend, device, dtypes):
    """'same' (odd, even and dilated kernels), 'valid', ints and tuples mean what they mean in torch."""
    dtype = dtypes[0]
    g = torch.Generator().manual_seed(30)
    x = torch.randn(2, 3, 9, 8, generator=g).to(device, dtype)
    for kernel, dilation in (((3, 3), 1), ((4, 2), 1), ((2, 3), (2, 3))):
        w = torch.randn(4, 3, *kernel, generator=g).to(device, dtype)
        b = torch.randn(4, generator=g).to(device, dtype)
        for padding in ("same", "valid", 1, (2, 0), [1, 2]):
            expected = torch.relu(F.conv2d(x, w, b, 1, padding, dilation))
            with bigkernels.use_backend(backend):
                got = conv2d(x, w, b, 1, padding, dilation, activation="relu")
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"padding={padding!r} kernel={kernel}")


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
def test_noncontiguous_unbatched_and_layout(backend, device, dtypes):
    dtype = dtypes[0]
    g = torch.Generator().manual_seed(40)
    x = torch.randn(3, 10, 9, 6, generator=g).to(device, dtype)[:, ::2, 1:, :]  # sliced: neither layout
    w = torch.randn(6, 5, 3, 3, generator=g).to(device, dtype).transpose(2, 3)
    r = torch.randn(3, 6, 4, 6, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    with bigkernels.use_backend(backend):
        got = conv2d(x, w, None, (2, 1), 1, 1, 1, activation="silu", residual=r)
        single = conv2d(x[0], w, None, (2, 1), 1, 1, 1, activation="silu", residual=r[0])
    expected = F.silu(F.conv2d(x, w, None, (2, 1), 1) + r)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(single, expected[0], atol=1e-4, rtol=1e-4)
    assert single.shape == expected[0].shape


# ---------------------------------------------------------------------------------- hypothesis
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 2), cg=st.integers(1, 3), kg=st.integers(1, 3), groups=st.integers(1, 3),
    h=st.integers(1, 9), w=st.integers(1, 9), r=st.integers(1, 4), s=st.integers(1, 4),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), activation=st.sampled_from(ACTIVATIONS),
    bias=st.booleans(), residual=st.booleans(), channels_last=st.booleans(), seed=st.integers(0, 2**16),
)
def test_hypothesis_sweep_cpu(n, cg, kg, groups, h, w, r, s, stride, padding, dilation, activation, bias, residual,
                              channels_last, seed):
    c, k = cg * groups, kg * groups
    if h + 2 * padding[0] < dilation[0] * (r - 1) + 1 or w + 2 * padding[1] < dilation[1] * (s - 1) + 1:
        return  # kernel larger than the padded input: a bad-input case, tested below
    if channels_last and min(h, w) == 1:
        channels_last = False  # stock conv2d can crash there (see test_degenerate_channels_last_input)
    tensors, geo = make_case(n, c, h, w, k, (r, s), stride, padding, dilation, groups, bias=bias, residual=residual, seed=seed)
    for dtype in (torch.float32, torch.float64):
        check_against_stock("cpu", "cpu", dtype, tensors, geo, activation, channels_last, seed=seed)


def test_degenerate_channels_last_input():
    """torch 2.13's own F.conv2d dies with SIGSEGV on this channels_last input (a spatial side of 1, so
    degenerate strides); ours runs the core on an NCHW copy and returns the caller's layout. Compared
    with stock on the NCHW input (which does not crash)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 6, 5, 1, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 2, 2, 1, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    geometry = dict(stride=(3, 2), padding=(2, 3), dilation=(2, 2), groups=3)
    with bigkernels.use_backend("cpu"):
        y = conv2d(x, w, b, **geometry, activation="silu")
    leaves = [t.detach().contiguous().requires_grad_() for t in (x, w, b)]
    expected = F.silu(F.conv2d(*leaves, **geometry))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected)
    grad = torch.randn(expected.shape, generator=g)
    for ours_grad, stock_grad in zip(torch.autograd.grad(y, (x, w, b), grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(ours_grad, stock_grad)


# ----------------------------------------------------------------------------- gradcheck, opcheck
@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid", "leaky_relu"])
def test_gradcheck_cpu_float64(activation):
    tensors, geo = make_case(1, 4, 4, 5, 4, (3, 2), (2, 1), 1, (1, 2), 2, seed=50)
    t = cast(tensors, torch.float64, "cpu")
    if activation == "relu":  # keep the pre-activation away from relu's kink for finite differences
        t["residual"] = (t["residual"].detach() + 3.0).requires_grad_()

    def fn(input, weight, bias, residual):
        with bigkernels.use_backend("cpu"):
            return conv2d(input, weight, bias, geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
                          activation=activation, residual=residual)

    # Full (slow-mode) Jacobians once; the other activations through fast mode (random projections).
    assert torch.autograd.gradcheck(fn, [t["input"], t["weight"], t["bias"], t["residual"]], fast_mode=activation != "relu")


def test_gradcheck_partial_requires_grad():
    tensors, geo = make_case(1, 3, 5, 5, 2, (3, 3), 1, 1, 1, 1, seed=51)
    base = cast(tensors, torch.float64, "cpu", requires_grad=False)
    for needed in (("input",), ("weight",), ("bias",), ("residual",), ("input", "residual")):
        args = {k: (v.clone().requires_grad_(k in needed) if v is not None else None) for k, v in base.items()}

        def fn(*tensors):
            full = dict(args, **dict(zip(needed, tensors)))
            with bigkernels.use_backend("cpu"):
                return conv2d(full["input"], full["weight"], full["bias"], padding=1, activation="silu", residual=full["residual"])

        assert torch.autograd.gradcheck(fn, [args[k] for k in needed], fast_mode=True)


def _op_samples(device, dtype):
    samples = []
    for i, (geom, activation, channels_last) in enumerate((
        ((2, 4, 5, 6, 6, (3, 3), 1, 1, 1, 2), "gelu", False),
        ((1, 3, 4, 4, 2, (1, 1), 1, 0, 1, 1), "relu", True),
        ((2, 4, 7, 5, 4, (3, 3), 2, 1, 2, 4), "none", True),
        ((0, 2, 3, 3, 2, (3, 3), 1, 1, 1, 1), "silu", False),
    )):
        tensors, geo = make_case(*geom, bias=i != 1, residual=i != 2, seed=60 + i)
        t = cast(tensors, dtype, device, channels_last)
        for need in (True, False):
            samples.append((t["input"], t["weight"], t["bias"], t["residual"], list(pair(geo["stride"])),
                            list(pair(geo["padding"])), list(pair(geo["dilation"])), geo["groups"], activation, 0.01, need))
    return samples


def _backward_samples(device, dtype, forward_op):
    samples = []
    for args in _op_samples(device, dtype)[::2]:
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        y, z = forward_op(*args)
        input, weight = args[0], args[1]
        rest = args[4:10]
        g = torch.randn_like(y)
        for mask in ([True, True, True, True], [False, True, False, True], [True, False, False, False]):
            samples.append((g, input, weight, y, z, *rest, mask))
    return samples


@pytest.mark.parametrize("sample", range(8))
def test_opcheck_cpu(sample):
    torch.library.opcheck(torch.ops.bigkernels.conv.default, _op_samples("cpu", torch.float64)[sample])


def test_opcheck_cpu_backward():
    for args in _backward_samples("cpu", torch.float64, torch.ops.bigkernels.conv.default):
        torch.library.opcheck(torch.ops.bigkernels.conv_backward.default, args)


@pytest.mark.triton
@SKIP_TRITON
def test_opcheck_triton():
    samples = _op_samples(TRITON_DEVICE, torch.float32)
    for args in samples[:2] + samples[4:6]:
        torch.library.opcheck(torch.ops.bigkernels.conv_triton.default, args, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        for args in _backward_samples(TRITON_DEVICE, torch.float32, torch.ops.bigkernels.conv_triton.default)[:3]:
            torch.library.opcheck(torch.ops.bigkernels.conv_backward_triton.default, args, atol=1e-4, rtol=1e-4)


def test_cpu_autocast_runs_in_the_autocast_dtype():
    """conv2d is on autocast's lower-precision list: like the stock conv, ours runs and returns bf16."""
    tensors, geo = make_case(2, 4, 8, 8, 6, (3, 3), 1, 1, 1, 1, residual=False, seed=75)
    t = cast(tensors, torch.float32, "cpu", requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), bigkernels.use_backend("cpu"):
        y = ours(t, geo, "relu")
        expected = torch.relu(F.conv2d(t["input"], t["weight"], t["bias"], 1, 1))
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=2e-2)


def test_preactivation_kept_only_when_needed():
    tensors, geo = make_case(2, 3, 5, 5, 4, (3, 3), 1, 1, 1, 1, seed=70)
    t = cast(tensors, torch.float32, "cpu", requires_grad=False)
    args = (t["input"], t["weight"], t["bias"], t["residual"], [1, 1], [1, 1], [1, 1], 1)
    op = torch.ops.bigkernels.conv
    assert op(*args, "gelu", 0.01, True)[1].shape == (2, 4, 5, 5)
    assert op(*args, "gelu", 0.01, False)[1].shape == (0,)
    assert op(*args, "relu", 0.01, True)[1].shape == (0,)  # relu' comes from the output
    assert op(*args, "leaky_relu", -0.1, True)[1].shape == (2, 4, 5, 5)  # a negative slope needs z
    # Differentiated without z (a direct op call with need_preactivation=False): recomputed, same grads.
    leaves = [a.detach().requires_grad_() for a in args[:4]]
    grads = []
    for need in (False, True):
        y, _ = op(*leaves, *args[4:], "gelu", 0.01, need)
        grads.append(torch.autograd.grad((y * y).sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=[pytest.mark.triton, SKIP_TRITON])])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = "cpu" if backend == "cpu" else TRITON_DEVICE
    tensors, geo = make_case(2, 4, 6, 6, 4, (3, 3), 1, 1, 1, 1, seed=80)
    t = cast(tensors, torch.float32, device)
    w1 = t["weight"][:, :, :1].detach().squeeze(2).requires_grad_()  # (K, C, kL) for conv1d

    def block(x, w, b, r, w1):
        y = conv2d(x, w, b, padding="same", activation="gelu", residual=r)
        y = conv2d(y, w, None, 1, 1, activation="relu")
        s = conv1d(y.flatten(2), w1, b, padding=1, activation="silu")
        return y.sum() + s.sum()

    args = [t["input"], t["weight"], t["bias"], t["residual"], w1]
    compile_backend = "aot_eager" if device == "cpu" and backend == "triton" else "inductor"
    with bigkernels.use_backend(backend):
        compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
        loss_c = compiled(*args)
        grads_c = torch.autograd.grad(loss_c, args)
        loss_e = block(*args)
        grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------- conv1d
@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
def test_conv1d_matches_stock(backend, device, dtypes):
    g = torch.Generator().manual_seed(90)
    for dtype in dtypes[:2]:
        x = torch.randn(3, 6, 17, generator=g, dtype=torch.float64)
        w = torch.randn(4, 3, 5, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(4, generator=g, dtype=torch.float64)
        r = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
        args64 = [a.clone().requires_grad_() for a in (x, w, b, r)]
        ref = F.gelu(F.conv1d(args64[0], args64[1], args64[2], 2, 3, 2, 2) + args64[3])
        grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        ref_g = torch.autograd.grad(ref, args64, grad)
        st_args = [a.to(device, dtype).requires_grad_() for a in (x, w, b, r)]
        st = F.gelu(F.conv1d(st_args[0], st_args[1], st_args[2], 2, 3, 2, 2) + st_args[3])
        st_g = torch.autograd.grad(st, st_args, grad.to(device, dtype))
        our_args = [a.to(device, dtype).requires_grad_() for a in (x, w, b, r)]
        with bigkernels.use_backend(backend):
            out = conv1d(our_args[0], our_args[1], our_args[2], 2, 3, 2, 2, activation="gelu", residual=our_args[3])
        our_g = torch.autograd.grad(out, our_args, grad.to(device, dtype))
        assert_matches(f"conv1d/{dtype}/output", out, st, ref)
        for name, a, s_, r_ in zip(("input", "weight", "bias", "residual"), our_g, st_g, ref_g):
            assert_matches(f"conv1d/{dtype}/grad_{name}", a, s_, r_)
    with bigkernels.use_backend(backend):
        unbatched = conv1d(x[0].to(device, dtypes[0]), w.to(device, dtypes[0]), None, padding="same", groups=2)
    torch.testing.assert_close(unbatched, F.conv1d(x[0], w, None, padding="same", groups=2).to(device, dtypes[0]), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ bad input
def _bad(**overrides):
    g = torch.Generator().manual_seed(99)
    args = dict(input=torch.randn(2, 4, 6, 6, generator=g), weight=torch.randn(6, 2, 3, 3, generator=g),
                bias=torch.randn(6, generator=g), stride=1, padding=1, dilation=1, groups=2, activation="relu",
                residual=torch.randn(2, 6, 6, 6, generator=g))
    args.update(overrides)
    return args


BAD_INPUTS = [
    ("channel mismatch", dict(weight=torch.randn(6, 3, 3, 3)), ValueError, "weight.shape\\[1\\] must be input channels / groups"),
    ("groups vs input channels", dict(groups=3, weight=torch.randn(6, 1, 3, 3)), ValueError, "groups \\(3\\) must divide the input channels"),
    ("groups vs output channels", dict(groups=4, weight=torch.randn(6, 1, 3, 3)), ValueError, "groups \\(4\\) must divide the output channels"),
    ("groups zero", dict(groups=0), ValueError, "groups must be a positive int"),
    ("residual shape", dict(residual=torch.randn(2, 6, 5, 6)), ValueError, "residual must have the output's shape"),
    ("residual dtype", dict(residual=torch.randn(2, 6, 6, 6, dtype=torch.float64)), TypeError, "residual must have the dtype of input"),
    ("unknown activation", dict(activation="tanh"), ValueError, "activation must be one of"),
    ("bad stride", dict(stride=0), ValueError, "stride must be >= 1"),
    ("bad stride length", dict(stride=(1, 1, 1)), ValueError, "stride must be an int or a pair"),
    ("negative padding", dict(padding=-1), ValueError, "padding must be >= 0"),
    ("unknown padding", dict(padding="full"), ValueError, "padding must be 'same', 'valid'"),
    ("same with stride", dict(padding="same", stride=2), ValueError, "padding='same' is not supported for strided"),
    ("bad dilation", dict(dilation=0), ValueError, "dilation must be >= 1"),
    ("bias shape", dict(bias=torch.randn(5)), ValueError, "bias must have shape \\(out_channels,\\)"),
    ("weight dtype", dict(weight=torch.randn(6, 2, 3, 3, dtype=torch.float64)), TypeError, "weight must have the dtype of input"),
    ("weight rank", dict(weight=torch.randn(6, 2, 3)), ValueError, "weight must be 4-D"),
    ("input rank", dict(input=torch.randn(4, 6)), ValueError, "input must be 4-D"),
    ("integer input", dict(input=torch.ones(2, 4, 6, 6, dtype=torch.int64)), TypeError, "input must be a floating-point tensor"),
    ("not a tensor", dict(input=[1.0]), TypeError, "input must be a torch.Tensor"),
    ("kernel larger than input", dict(padding=0, input=torch.randn(2, 4, 2, 6), residual=None), ValueError, "smaller than the kernel"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("what, overrides, error, match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(backend, what, overrides, error, match):
    args = _bad(**overrides)
    with bigkernels.use_backend(backend), pytest.raises(error, match=match):
        conv2d(args.pop("input"), args.pop("weight"), args.pop("bias"), args.pop("stride"), args.pop("padding"),
               args.pop("dilation"), args.pop("groups"), **args)


def test_bad_input_direct_op_call():
    """The C++ kernel checks its own arguments too (a direct op call skips the Python checks)."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="weight.size\\(1\\) must be input channels / groups"):
        torch.ops.bigkernels.conv(x, w, None, None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.01, False)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.bigkernels.conv(x, torch.randn(3, 4, 3, 3), None, None, [1, 1], [1, 1], [1, 1], 1, "tanh", 0.01, False)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        torch.ops.bigkernels.conv(x, torch.randn(3, 4, 3, 3), None, torch.randn(1, 3, 4, 5), [1, 1], [1, 1], [1, 1], 1,
                                  "relu", 0.01, False)
