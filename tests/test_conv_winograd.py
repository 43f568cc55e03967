"""The CPU conv's Winograd F(2x2, 3x3) core (csrc/cpu/conv_winograd.cpp): 3x3, stride 1, dilation 1,
groups 1, padding <= 2, NCHW float32, 32-512 channels and filters, 14-112 output rows and columns
(where it measured faster); the epilogue fused into its output transform; its transformed filters
cached across calls while the weight is unchanged (csrc/cpu/conv_weight_cache.h). Checked against the float64 reference by the DESIGN rule (its transforms
round differently from a direct convolution), outputs and gradients (the backward is ATen's, fed
the Winograd forward's output / pre-activation). channels_last, bfloat16, float64 and small layers
are routed to the other cores."""
from __future__ import annotations

import pytest
import torch

import bigkernels
from test_conv import cast, check_against_stock, make_case, ours, stock
from numerics import assert_matches

# (n, c, h, w, k, kernel, stride, padding, dilation, groups). The core serves layers of 32-512
# channels and filters with 14-112 output rows and columns (csrc/cpu/conv.cpp, prefer_winograd), so
# every case is in that range: odd image sizes (the last tile row/column half outside the image),
# odd channel/filter counts, padding 0/1/2, several blocks per image and several images, the
# smallest and largest routed sides.
WINOGRAD_GEOMETRIES = [
    (1, 128, 39, 25, 128, (3, 3), 1, 1, 1, 1),
    (3, 128, 37, 37, 129, (3, 3), 1, 1, 1, 1),
    (2, 130, 27, 33, 128, (3, 3), 1, 0, 1, 1),
    (1, 128, 30, 30, 255, (3, 3), 1, 2, 1, 1),
    (8, 128, 28, 28, 128, (3, 3), 1, 1, 1, 1),
    (2, 33, 57, 55, 40, (3, 3), 1, 1, 1, 1),
    (1, 257, 16, 17, 200, (3, 3), 1, 0, 1, 1),
    (1, 32, 112, 31, 32, (3, 3), 1, 1, 1, 1),
]
ACTIVATIONS = ["relu", "gelu", None, "leaky_relu", "silu", "relu", "gelu_tanh", "sigmoid"]


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
@pytest.mark.parametrize("layer", [(8, 128, 28, 28, 128), (2, 64, 56, 56, 64), (1, 256, 14, 14, 256)])
def test_inference_realistic_magnitudes(layer, activation, poison_empty):
    """ResNet layer1-3 block tails at He-initialised magnitudes (the benchmark's inputs)."""
    n, c, h, w, k = layer
    tensors, geo = make_case(n, c, h, w, k, (3, 3), 1, 1, 1, 1, seed=410)
    assert _winograd_ran(tensors, geo)
    t = cast(tensors, torch.float32, "cpu", requires_grad=False)
    with torch.no_grad(), bigkernels.use_backend("cpu"):
        y = ours(t, geo, activation)
    ref = stock(cast(tensors, torch.float64, "cpu", requires_grad=False), geo, activation)
    assert_matches(f"resnet-{c}x{h}/{activation}", y, stock(t, geo, activation), ref)


def test_routed_elsewhere():
    """channels_last, bfloat16, float64, fewer than 32 or more than 512 channels, images below 14 or
    above 112 output pixels a side, stride 2 and dilation 2 take the other cores (and still match)."""
    base = (1, 128, 28, 28, 128, (3, 3), 1, 1, 1, 1)
    cases = [
        (base, torch.float32, True),
        (base, torch.float64, False),
        ((1, 16, 28, 28, 128, (3, 3), 1, 1, 1, 1), torch.float32, False),
        ((1, 128, 12, 12, 128, (3, 3), 1, 1, 1, 1), torch.float32, False),
        ((1, 32, 120, 16, 32, (3, 3), 1, 1, 1, 1), torch.float32, False),
        ((1, 128, 20, 20, 513, (3, 3), 1, 1, 1, 1), torch.float32, False),
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


# ---------------------------------------------------------------- transformed-weight cache
# conv_winograd reuses its transformed filters while the weight tensor is the same and unchanged
# (csrc/cpu/conv_weight_cache.h): every way a weight changes must change the result.
CACHE_GEOMETRY = (1, 128, 26, 26, 128, (3, 3), 1, 1, 1, 1)


def _check_call(t32, geo, name):
    """ours(t32) by the DESIGN rule against the float64 reference of the same (current) values."""
    with torch.no_grad(), bigkernels.use_backend("cpu"):
        y = ours(t32, geo, "relu")
        ref = stock(cast(t32, torch.float64, "cpu", requires_grad=False), geo, "relu")
        assert_matches(name, y, stock(t32, geo, "relu"), ref)
    return y


def test_weight_cache_sees_in_place_changes(poison_empty):
    tensors, geo = make_case(*CACHE_GEOMETRY, seed=430)
    assert _winograd_ran(tensors, geo)
    t = cast(tensors, torch.float32, "cpu", requires_grad=False)
    y0 = _check_call(t, geo, "first call")
    y1 = _check_call(t, geo, "same weight again (cached)")
    assert torch.equal(y0, y1)
    t["weight"].add_(0.05)  # in place: the version counter moves
    y2 = _check_call(t, geo, "after add_")
    assert not torch.equal(y1, y2)
    t["weight"][3].mul_(-1)  # through a view: shares the version counter
    _check_call(t, geo, "after a write through a view")
    with torch.no_grad():
        t["weight"].copy_(torch.randn_like(t["weight"]) * 0.03)  # load_state_dict's way
    _check_call(t, geo, "after copy_")


def test_weight_cache_training_step_and_load_state_dict(poison_empty):
    """bigkernels.nn.Conv2d: an optimizer step and load_state_dict both change the next forward."""
    torch.manual_seed(431)
    conv = bigkernels.nn.Conv2d(128, 128, 3, padding=1, activation="relu")
    x = torch.randn(1, 128, 26, 26)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    geo = dict(stride=1, padding=1, dilation=1, groups=1)

    def check(name):
        t = dict(input=x, weight=conv.weight.detach(), bias=conv.bias.detach(), residual=None)
        with torch.no_grad():
            y = conv(x)
            assert_matches(name, y, stock(t, geo, "relu"), stock(cast(t, torch.float64, "cpu", requires_grad=False), geo, "relu"))
        return y

    y0 = check("before the step")
    check("cached")
    conv(x).square().mean().backward()
    opt.step()
    y1 = check("after an optimizer step")
    assert not torch.equal(y0, y1)
    other = torch.nn.Conv2d(128, 128, 3, padding=1)
    conv.load_state_dict(other.state_dict())
    check("after load_state_dict")


def test_weight_cache_freed_weight_never_matches(poison_empty):
    """A new weight tensor, possibly at the freed one's address, with other values, is transformed
    afresh; so are inference tensors (no version counter: never cached)."""
    tensors, geo = make_case(*CACHE_GEOMETRY, seed=432)
    t = cast(tensors, torch.float32, "cpu", requires_grad=False)
    for i in range(4):
        t["weight"] = torch.empty(128, 128, 3, 3).normal_(0, 0.03 * (i + 1))  # the last one freed each turn
        _check_call(t, geo, f"fresh weight {i}")
    with torch.inference_mode():
        t["weight"] = torch.randn(128, 128, 3, 3) * 0.03
        _check_call(t, geo, "inference tensor")
        t["weight"].add_(0.1)
        _check_call(t, geo, "inference tensor after add_")


# ---------------------------------------------------------------- input gradient by Winograd
# The input gradient of a routed 3x3 stride-1 layer is a 3x3 convolution of gz with the flipped,
# transposed weight, padding 2 - p: conv_backward runs it by the same core (csrc/cpu/conv.cpp,
# input_grad_by_winograd). Padding 0 and 2 swap there; C != K swaps the channel counts.
INPUT_GRAD_GEOMETRIES = [
    (2, 130, 27, 33, 128, (3, 3), 1, 0, 1, 1),
    (1, 64, 30, 29, 96, (3, 3), 1, 2, 1, 1),
    (3, 128, 17, 40, 129, (3, 3), 1, 1, 1, 1),
]


@pytest.mark.parametrize("geometry", range(len(INPUT_GRAD_GEOMETRIES)))
def test_input_grad_by_winograd(geometry, poison_empty):
    tensors, geo = make_case(*INPUT_GRAD_GEOMETRIES[geometry], residual=geometry != 1, seed=440 + geometry)
    # Only the input wants a gradient: the backward then runs no ATen convolution at all.
    t = cast(tensors, torch.float32, "cpu", requires_grad=False)
    t["input"].requires_grad_(True)
    with bigkernels.use_backend("cpu"), torch.autograd.profiler.profile() as prof:
        y = ours(t, geo, "gelu")
        (grad_input,) = torch.autograd.grad(y, t["input"], torch.randn_like(y))
    assert not any("convolution" in e.name and "bigkernels" not in e.name for e in prof.function_events)
    assert grad_input.shape == t["input"].shape and torch.isfinite(grad_input).all()
    # Every gradient against the float64 reference by the DESIGN rule (dx by Winograd, dw/db by ATen).
    check_against_stock("cpu", "cpu", torch.float32, tensors, geo, ["gelu", "relu", "silu"][geometry], seed=geometry)
