"""The CPU conv's 1x1 core (csrc/cpu/conv_pointwise_gemm.cpp): tiled BLAS GEMMs with the epilogue
fused per tile. It serves float32/float64 1x1 convolutions with groups 1 and no padding, NCHW and
channels_last, any stride; bfloat16 and padded/grouped 1x1 calls are routed to the other cores."""
from __future__ import annotations

import pytest
import torch

import bigkernels
from bigkernels import reference
from test_conv import cast, check_against_stock, make_case, ours, stock
from numerics import assert_matches

# (n, c, h, w, k, kernel, stride, padding, dilation, groups): odd sizes, tiles that do not divide
# the image, strides that skip the last row/column, a batch whose tiles cross image boundaries.
GEMM_GEOMETRIES = [
    (1, 7, 9, 13, 5, (1, 1), 1, 0, 1, 1),
    (3, 17, 11, 7, 33, (1, 1), 2, 0, 1, 1),
    (2, 64, 23, 29, 129, (1, 1), 1, 0, 1, 1),  # more columns than one tile
    (2, 9, 10, 15, 6, (1, 1), (3, 2), 0, (2, 1), 1),  # stride 3x2; dilation means nothing for 1x1
    (1, 1, 5, 5, 3, (1, 1), 1, 0, 1, 1),  # one input channel
]


def _gemm_core_ran(tensors, geo, dtype, channels_last):
    """True when the call ran without any ATen/oneDNN convolution (so the GEMM core served it)."""
    t = cast(tensors, dtype, "cpu", channels_last, requires_grad=False)
    with torch.no_grad(), bigkernels.use_backend("cpu"), torch.autograd.profiler.profile() as prof:
        ours(t, geo, "relu")
    return not any("convolution" in e.name and "bigkernels" not in e.name for e in prof.function_events)


@pytest.mark.parametrize("geometry", range(len(GEMM_GEOMETRIES)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_matches_reference_outputs_and_grads(geometry, channels_last, poison_empty):
    geom = GEMM_GEOMETRIES[geometry]
    tensors, geo = make_case(*geom, seed=300 + geometry)
    assert _gemm_core_ran(tensors, geo, torch.float32, channels_last)
    activation = ["relu", "gelu", "silu", "leaky_relu", None][geometry]  # gelu/silu keep z in training
    for dtype in (torch.float32, torch.float64):
        check_against_stock("cpu", "cpu", dtype, tensors, geo, activation, channels_last, seed=geometry)


@pytest.mark.parametrize("activation", ["sigmoid", "gelu_tanh", "relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_inference_without_bias_or_residual(activation, channels_last, poison_empty):
    tensors, geo = make_case(2, 12, 9, 8, 20, (1, 1), 2, 0, 1, 1, bias=False, residual=activation == "relu", seed=310)
    t = cast(tensors, torch.float32, "cpu", channels_last, requires_grad=False)
    with torch.no_grad(), bigkernels.use_backend("cpu"):
        y = ours(t, geo, activation)
    ref = stock(cast(tensors, torch.float64, "cpu", requires_grad=False), geo, activation)
    assert_matches(f"inference/{activation}", y, stock(t, geo, activation), ref)
    expected = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected)


def test_gradcheck_float64():
    tensors, geo = make_case(2, 3, 5, 4, 4, (1, 1), 2, 0, 1, 1, seed=320)
    t = cast(tensors, torch.float64, "cpu")

    def fn(input, weight, bias, residual):
        return bigkernels.nn.functional.conv2d(input, weight, bias, geo["stride"], activation="silu", residual=residual)

    with bigkernels.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, (t["input"], t["weight"], t["bias"], t["residual"]))


def test_routed_elsewhere():
    """bfloat16, padded and grouped 1x1 calls take the other cores (and still match)."""
    for geom, dtype in (
        ((1, 8, 7, 7, 8, (1, 1), 1, 0, 1, 1), torch.bfloat16),
        ((1, 8, 7, 7, 8, (1, 1), 1, 1, 1, 1), torch.float32),
        ((1, 8, 7, 7, 8, (1, 1), 1, 0, 1, 2), torch.float32),
    ):
        tensors, geo = make_case(*geom, seed=330)
        assert not _gemm_core_ran(tensors, geo, dtype, False), (geom, dtype)
        check_against_stock("cpu", "cpu", dtype, tensors, geo, "relu")


def test_zero_batch_and_non_dense_input():
    tensors, geo = make_case(0, 4, 5, 5, 6, (1, 1), 1, 0, 1, 1, seed=340)
    t = cast(tensors, torch.float32, "cpu", requires_grad=False)
    with bigkernels.use_backend("cpu"):
        assert ours(t, geo, "relu").shape == (0, 6, 5, 5)
    # A sliced (non-dense) input goes through the generic core; same answer.
    tensors, geo = make_case(2, 4, 9, 9, 6, (1, 1), 1, 0, 1, 1, residual=False, seed=341)
    x = tensors["input"].float()[:, :, ::2, 1:]
    w, b = tensors["weight"].float(), tensors["bias"].float()
    with torch.no_grad(), bigkernels.use_backend("cpu"):
        y = bigkernels.nn.functional.conv2d(x, w, b, activation="relu")
    ref = reference.conv2d(x.double(), w.double(), b.double(), (1, 1), (0, 0), (1, 1), 1, "relu")
    assert_matches("sliced", y, reference.conv2d(x, w, b, (1, 1), (0, 0), (1, 1), 1, "relu"), ref)


@pytest.mark.parametrize("wanted", ["input", "weight", "all"])
def test_strided_nchw_backward_runs_as_gemms(wanted, poison_empty):
    """NCHW strided 1x1 layers take their input/weight gradients from plain GEMMs (csrc/cpu/conv.cpp,
    pointwise_backward_gemm), not ATen's convolution_backward; each subset of gradients is right."""
    g = torch.Generator().manual_seed(330)
    x64 = torch.randn(3, 17, 11, 8, generator=g, dtype=torch.float64)
    w64 = torch.randn(33, 17, 1, 1, generator=g, dtype=torch.float64) * 17**-0.5
    b64 = torch.randn(33, generator=g, dtype=torch.float64)
    r64 = torch.randn(3, 33, 6, 3, generator=g, dtype=torch.float64)
    dy64 = torch.randn(3, 33, 6, 3, generator=g, dtype=torch.float64)
    stride = (2, 3)

    def grads(dtype, fn):
        x, w, b, r = (t.to(dtype).requires_grad_(wanted in ("all", name))
                      for t, name in ((x64, "input"), (w64, "weight"), (b64, "all"), (r64, "all")))
        leaves = [t for t in (x, w, b, r) if t.requires_grad]
        return torch.autograd.grad(fn(x, w, b, r), leaves, dy64.to(dtype))

    def fused(x, w, b, r):
        return bigkernels.nn.functional.conv2d(x, w, b, stride, activation="relu", residual=r)

    def stock_fn(x, w, b, r):
        return torch.relu(torch.nn.functional.conv2d(x, w, b, stride) + r)

    with bigkernels.use_backend("cpu"), torch.autograd.profiler.profile() as prof:
        got = grads(torch.float32, fused)
    assert not any("convolution_backward" in e.name for e in prof.function_events)
    expected, ref = grads(torch.float32, stock_fn), grads(torch.float64, stock_fn)
    for i, (a, s, r) in enumerate(zip(got, expected, ref)):
        assert_matches(f"strided-1x1-grad-{wanted}-{i}", a, s, r)
