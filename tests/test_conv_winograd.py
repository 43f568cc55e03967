"""The CPU conv's Winograd F(2x2, 3x3) core (csrc/cpu/conv_winograd.cpp): 3x3, stride 1, dilation 1,
groups 1, padding <= 2, NCHW float32, 128-256 channels and filters, 24-40 output rows and columns
(where it measured faster); the epilogue fused into
its output transform. Checked against the float64 reference by the DESIGN rule (its transforms
round differently from a direct convolution), outputs and gradients (the backward is ATen's, fed
the Winograd forward's output / pre-activation). channels_last, bfloat16, float64 and small layers
are routed to the other cores."""
from __future__ import annotations

import pytest
import torch

import bigkernels
from test_conv import cast, check_against_stock, make_case, ours, stock
from numerics import assert_matches

# (n, c, h, w, k, kernel, stride, padding, dilation, groups). The core serves layers of 128-256
# channels and filters with 24-40 output rows and columns (csrc/cpu/conv.cpp, prefer_winograd), so
# every case is in that range: odd image sizes (the last tile row/column half outside the image),
# odd channel/filter counts, padding 0/1/2, several blocks per image and several images.
WINOGRAD_GEOMETRIES = [
    (1, 128, 39, 25, 128, (3, 3), 1, 1, 1, 1),
    (3, 128, 37, 37, 129, (3, 3), 1, 1, 1, 1),
    (2, 130, 27, 33, 128, (3, 3), 1, 0, 1, 1),
    (1, 128, 30, 30, 255, (3, 3), 1, 2, 1, 1),
    (8, 128, 28, 28, 128, (3, 3), 1, 1, 1, 1),
]
ACTIVATIONS = ["relu", "gelu", None, "leaky_relu", "silu"]


def _winograd_ran(tensors, geo, dtype=torch.float32, channels_last=False):
    """True when an inference call ran without any ATen/oneDNN convolution."""
    t = cast(tensors, dtype, "cpu", channels_last, requires_grad=False)
    with torch.no_grad(), bigkernels.use_backend("cpu"), torch.autograd.profiler.profile() as prof:
        ours(t, geo, "relu")
    return not any("convolution" in e.name and "bigkernels" not in e.name for e in prof.function_events)


@pytest.mark.parametrize("geometry", range(len(WINOGRAD_GEOMETRIES)))
def test_matches_reference_outputs_and_grads(geometry, poison_empty):
    geom = WINOGRAD_GEOMETRIES[geometry]
    tensors, geo = make_case(*geom, bias=geometry != 2, residual=geometry % 2 == 1, seed=400 + geometry)
    assert _winograd_ran(tensors, geo)
    check_against_stock("cpu", "cpu", torch.float32, tensors, geo, ACTIVATIONS[geometry], seed=geometry)


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "silu"])
def test_inference_realistic_magnitudes(activation, poison_empty):
    """A ResNet layer2 block tail at He-initialised magnitudes (the benchmark's inputs)."""
    tensors, geo = make_case(8, 128, 28, 28, 128, (3, 3), 1, 1, 1, 1, seed=410)
    assert _winograd_ran(tensors, geo)
    t = cast(tensors, torch.float32, "cpu", requires_grad=False)
    with torch.no_grad(), bigkernels.use_backend("cpu"):
        y = ours(t, geo, activation)
    ref = stock(cast(tensors, torch.float64, "cpu", requires_grad=False), geo, activation)
    assert_matches(f"resnet-layer2/{activation}", y, stock(t, geo, activation), ref)


def test_routed_elsewhere():
    """channels_last, bfloat16, float64, fewer than 128 channels, small and large images, stride 2 and
    dilation 2 take the other cores (and still match)."""
    base = (1, 128, 28, 28, 128, (3, 3), 1, 1, 1, 1)
    cases = [
        (base, torch.float32, True),
        (base, torch.float64, False),
        ((1, 64, 28, 28, 128, (3, 3), 1, 1, 1, 1), torch.float32, False),
        ((1, 128, 14, 14, 128, (3, 3), 1, 1, 1, 1), torch.float32, False),
        ((1, 128, 56, 56, 128, (3, 3), 1, 1, 1, 1), torch.float32, False),
        ((4, 128, 56, 56, 128, (3, 3), 2, 1, 1, 1), torch.float32, False),
        ((1, 128, 30, 30, 128, (3, 3), 1, 1, 2, 1), torch.float32, False),
    ]
    for i, (geom, dtype, channels_last) in enumerate(cases):
        tensors, geo = make_case(*geom, seed=420)
        assert not _winograd_ran(tensors, geo, dtype, channels_last), (geom, dtype, channels_last)
        if i in (0, 3):  # the others are the same cores as test_conv.py's grid, at a larger size
            check_against_stock("cpu", "cpu", dtype, tensors, geo, "relu", channels_last)
    bf16 = make_case(1, 128, 28, 28, 128, (3, 3), 1, 1, 1, 1, seed=421)
    assert not _winograd_ran(*bf16, torch.bfloat16)
