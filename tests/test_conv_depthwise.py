"""bigkernels::conv_depthwise: numerics of the output and of every gradient against float64 and the
stock conv2d(groups=C) + bias + residual + activation (DESIGN.md rule), gradcheck, opcheck,
torch.compile, bad input, and `cuda`-marked GPU checks."""
from __future__ import annotations

import pytest
import torch

import bigkernels
from bigkernels import reference
from bigkernels.ops.conv_depthwise import ACTIVATIONS, conv_depthwise, memory_format
from numerics import assert_matches

ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def make_case(n, c, h, w, r, s, *, bias=True, residual=True, stride=1, padding=0, dilation=1, seed=0):
    """Fresh random float64 tensors (never zeros: a kernel that ignores a term fails)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale

    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    case = dict(
        input=rnd(n, c, h, w),
        weight=rnd(c, 1, r, s, scale=2.0 / (r * s) ** 0.5),
        bias=rnd(c) if bias else None,
        residual=rnd(n, c, p, q) if residual else None,
    )
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    grad_out = rnd(n, c, p, q)
    return case, conv, grad_out


def cast(case, dtype, channels_last, device="cpu", requires_grad=True):
    out = {}
    for k, v in case.items():
        if v is None:
            out[k] = None
            continue
        t = v.to(device=device, dtype=dtype)
        if channels_last and t.dim() == 4 and k != "weight":
            t = t.contiguous(memory_format=torch.channels_last)
        out[k] = t.requires_grad_(requires_grad)
    return out


def ours(case, conv, activation, slope=0.01):
    return conv_depthwise(case["input"], case["weight"], case["bias"], case["residual"], conv["stride"],
                          conv["padding"], conv["dilation"], activation, slope)


def stock(case, conv, activation, slope=0.01):
    return reference.conv2d(case["input"], case["weight"], case["bias"], conv["stride"], conv["padding"],
                            conv["dilation"], case["input"].shape[1], activation, slope, case["residual"])


def output_and_grads(fn, case, conv, activation, grad_out, slope=0.01):
    y = fn(case, conv, activation, slope)
    names = [k for k, v in case.items() if v is not None]
    grads = torch.autograd.grad(y, [case[k] for k in names], grad_out.to(y.dtype).to(y.device), allow_unused=True)
    return y, dict(zip(names, grads))


def check_against_stock(case64, conv, grad_out, dtype, channels_last, activation, device="cpu", slope=0.01):
    # The float64 reference sees the inputs every kernel sees: rounded to dtype, then widened.
    case64 = {k: None if v is None else v.to(dtype).to(torch.float64) for k, v in case64.items()}
    grad_out = grad_out.to(dtype).to(torch.float64)
    y_ref, g_ref = output_and_grads(stock, cast(case64, torch.float64, False), conv, activation, grad_out, slope)
    # Stock in NCHW: same numerics, and CPU stock bfloat16 channels_last depthwise takes minutes at 31x31.
    y_stock, g_stock = output_and_grads(stock, cast(case64, dtype, False, device), conv, activation, grad_out, slope)
    args = cast(case64, dtype, channels_last, device)
    y, g = output_and_grads(ours, args, conv, activation, grad_out, slope)
    assert_matches("output", y, y_stock, y_ref)
    expected_format = memory_format(args["input"])  # channels_last unless also NCHW-contiguous (C == 1, N == 0...)
    assert expected_format == (torch.channels_last if channels_last and args["input"].numel() > 0 and
                               case64["input"].shape[1] > 1 else torch.contiguous_format)
    assert y.is_contiguous(memory_format=expected_format), "output must keep the input's memory format"
    for name in g_ref:
        assert g[name] is not None, f"grad of {name} missing"
        assert_matches(f"grad {name}", g[name], g_stock[name], g_ref[name])


# (N, C, H, W, R, S, stride, padding, dilation): kernel sizes 1, 3, 5, 7, 31; stride 2; dilation;
# asymmetric stride/padding; odd sizes; channel counts straddling the 16-lane vectors (18, 37, 70);
# widths straddling column tiles (40, 70); a batch of 0.
CONFIGS = [
    (2, 3, 9, 11, 3, 3, 1, 1, 1),
    (1, 5, 7, 7, 1, 1, 1, 0, 1),
    (2, 4, 13, 17, 7, 7, 1, 3, 1),
    (1, 2, 33, 35, 31, 31, 1, 15, 1),
    (2, 3, 15, 12, 3, 5, 2, (1, 2), 1),
    (1, 3, 16, 19, 3, 3, (2, 1), 2, 2),
    (1, 18, 9, 9, 3, 3, 1, 1, 1),
    (2, 37, 5, 6, 5, 5, 1, 2, 1),
    (1, 70, 4, 40, 3, 3, 1, 1, 1),
    (1, 2, 6, 70, 3, 3, 1, 0, 1),
    (0, 3, 8, 8, 3, 3, 1, 1, 1),
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_matches_stock(index, dtype, layout, poison_empty):
    n, c, h, w, r, s, stride, padding, dilation = CONFIGS[index]
    activation = ACTIVATIONS[index % len(ACTIVATIONS)]  # every activation over the grid
    case, conv, grad_out = make_case(n, c, h, w, r, s, bias=index % 3 != 1, residual=index % 2 == 0,
                                     stride=stride, padding=padding, dilation=dilation, seed=index)
    check_against_stock(case, conv, grad_out, dtype, layout == "channels_last", activation)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_with_residual(activation, dtype, layout, poison_empty):
    case, conv, grad_out = make_case(2, 17, 10, 21, 3, 3, padding=1, seed=7)
    check_against_stock(case, conv, grad_out, dtype, layout == "channels_last", activation)


@pytest.mark.parametrize("slope", [0.2, -0.5, 0.0])
def test_leaky_relu_slopes(slope):
    # slope <= 0: the derivative is not a function of the output, so z is kept for the backward.
    case, conv, grad_out = make_case(1, 4, 7, 9, 3, 3, padding=1, seed=3)
    check_against_stock(case, conv, grad_out, torch.float32, False, "leaky_relu", slope=slope)


def test_non_contiguous_input():
    case, conv, grad_out = make_case(2, 6, 9, 20, 3, 3, padding=1, seed=5)
    x = case["input"].to(torch.float32)[:, :, :, ::2]  # neither NCHW- nor NHWC-contiguous
    w = case["weight"].to(torch.float32)
    y = conv_depthwise(x, w, padding=1, activation="relu")
    assert_matches("output", y, reference.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 6, "relu"),
                   reference.conv2d(x.double(), w.double(), None, (1, 1), (1, 1), (1, 1), 6, "relu"))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("activation", ["none", "silu", "gelu_tanh", "leaky_relu"])
def test_gradcheck(activation, channels_last):
    case, conv, _ = make_case(1, 2, 5, 6, 3, 3, stride=(1, 2), padding=1, dilation=(2, 1), seed=11)
    t = cast(case, torch.float64, channels_last)
    fn = lambda x, w, b, res: conv_depthwise(x, w, b, res, conv["stride"], conv["padding"], conv["dilation"], activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (t["input"], t["weight"], t["bias"], t["residual"]))


def test_opcheck():
    case, conv, grad_out = make_case(2, 5, 8, 9, 3, 3, padding=1, seed=2)
    for channels_last in (False, True):
        t = cast(case, torch.float32, channels_last)
        for activation, need in (("gelu", True), ("relu", True), ("silu", False)):
            args = (t["input"], t["weight"], t["bias"], t["residual"], [1, 1], [1, 1], [1, 1], activation, 0.01, need)
            torch.library.opcheck(torch.ops.bigkernels.conv_depthwise.default, args)
        with torch.no_grad():
            y, z = torch.ops.bigkernels.conv_depthwise.default(*args[:-1], True)
        dy = grad_out.float()
        if channels_last:
            dy = dy.contiguous(memory_format=torch.channels_last)
        for mask in ([True, True, True, True], [True, False, False, True], [False, True, True, False]):
            bargs = (dy, t["input"].detach(), t["weight"].detach(), y, z, [1, 1], [1, 1], [1, 1], "silu", 0.01, mask)
            torch.library.opcheck(torch.ops.bigkernels.conv_depthwise_backward.default, bargs)


def test_compile_fullgraph():
    case, conv, grad_out = make_case(2, 6, 9, 9, 7, 7, padding=3, seed=4)
    t = cast(case, torch.float32, True)

    def block(x, w, b, res):
        return conv_depthwise(x, w, b, res, padding=3, activation="gelu").sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(t["input"], t["weight"], t["bias"], t["residual"])
    grads = torch.autograd.grad(loss, [t["input"], t["weight"], t["bias"], t["residual"]])
    t2 = cast(case, torch.float32, True)
    loss2 = block(t2["input"], t2["weight"], t2["bias"], t2["residual"])
    grads2 = torch.autograd.grad(loss2, [t2["input"], t2["weight"], t2["bias"], t2["residual"]])
    torch.testing.assert_close(loss, loss2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


def test_inference_output_then_backward_recomputes_preactivation():
    # A direct op call with need_preactivation=False, differentiated anyway, recomputes z.
    case, conv, grad_out = make_case(1, 3, 6, 6, 3, 3, padding=1, seed=9)
    t = cast(case, torch.float64, False)
    y, z = torch.ops.bigkernels.conv_depthwise.default(t["input"], t["weight"], t["bias"], t["residual"],
                                                       [1, 1], [1, 1], [1, 1], "gelu", 0.01, False)
    assert z.numel() == 0
    (gx,) = torch.autograd.grad(y, [t["input"]], grad_out)
    t2 = cast(case, torch.float64, False)
    (gx_ref,) = torch.autograd.grad(stock(t2, conv, "gelu"), [t2["input"]], grad_out)
    torch.testing.assert_close(gx, gx_ref)


def test_deterministic_weight_gradient():
    case, conv, grad_out = make_case(8, 3, 12, 12, 5, 5, padding=2, seed=13)
    grads = []
    for _ in range(2):
        t = cast(case, torch.float32, False)
        grads.append(torch.autograd.grad(ours(t, conv, "silu"), [t["weight"]], grad_out.float())[0])
    assert torch.equal(grads[0], grads[1])


def test_reference_backend_matches():
    case, conv, _ = make_case(1, 4, 8, 8, 3, 3, padding=1, seed=1)
    t = cast(case, torch.float64, False, requires_grad=False)
    with bigkernels.use_backend("reference"):
        y_ref = ours(t, conv, "relu")
    torch.testing.assert_close(ours(t, conv, "relu"), y_ref)


# ----------------------------------------------------------------------------------- bad input
def _good():
    x = torch.randn(2, 4, 8, 8)
    return dict(input=x, weight=torch.randn(4, 1, 3, 3), bias=torch.randn(4), residual=torch.randn(2, 4, 8, 8),
                stride=1, padding=1, dilation=1, activation="relu")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(input=torch.randn(4, 8, 8)), ValueError, "input must be 4-D"),
        (dict(input=torch.randint(0, 3, (2, 4, 8, 8))), TypeError, "input must be a floating-point"),
        (dict(weight=torch.randn(4, 2, 3, 3)), ValueError, "weight must have shape"),
        (dict(weight=torch.randn(3, 1, 3, 3)), ValueError, "weight must have shape"),
        (dict(weight=torch.randn(4, 1, 3, 3, dtype=torch.float64)), TypeError, "weight must have the dtype"),
        (dict(weight=torch.randn(4, 1, 33, 33), padding=16), ValueError, "kernel size"),
        (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
        (dict(residual=torch.randn(2, 4, 7, 8)), ValueError, "residual must have the output's shape"),
        (dict(activation="tanh"), ValueError, "activation must be"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(dilation=(1, 2, 3)), ValueError, "dilation must be an int or a pair"),
        (dict(input=torch.randn(2, 4, 2, 2), padding=0, residual=None), ValueError, "smaller than the dilated kernel"),
    ],
)
def test_bad_input(change, error, match):
    args = _good()
    args.update(change)
    with pytest.raises(error, match=match):
        conv_depthwise(**args)


# ------------------------------------------------------------------------------------ GPU checks
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel", [3, 5, 7, 13, 31])
def test_cuda_matches_stock(kernel, dtype, layout):
    for index, (n, c, h, w, stride, dilation) in enumerate([(2, 24, 29, 37, 1, 1), (3, 5, 40, 33, 2, 1), (1, 7, 45, 50, 1, 2)]):
        pad = dilation * (kernel // 2)
        activation = ACTIVATIONS[(kernel + index) % len(ACTIVATIONS)]
        case, conv, grad_out = make_case(n, c, h, w, kernel, kernel, padding=pad, stride=stride, dilation=dilation,
                                         residual=index != 1, seed=kernel * 10 + index)
        check_against_stock(case, conv, grad_out, dtype, layout == "channels_last", activation, device="cuda")


@pytest.mark.cuda
def test_cuda_opcheck_and_large():
    case, conv, grad_out = make_case(2, 64, 56, 56, 7, 7, padding=3, seed=21)
    t = cast(case, torch.float32, True, device="cuda")
    args = (t["input"], t["weight"], t["bias"], t["residual"], [1, 1], [3, 3], [1, 1], "gelu", 0.01, True)
    torch.library.opcheck(torch.ops.bigkernels.conv_depthwise.default, args, atol=1e-4, rtol=1e-4)
    check_against_stock(case, conv, grad_out, torch.bfloat16, True, "silu", device="cuda")
