"""bigkernels::conv_depthwise: depthwise convolution (groups == in_channels == out_channels) with the
fused epilogue act(conv + bias + residual).

Ops (one schema each, csrc/ops.cpp):
  bigkernels::conv_depthwise / conv_depthwise_backward    direct C++ CPU kernels (csrc/cpu/conv_depthwise.cpp)
                                                          and CUDA kernels (csrc/cuda/conv_depthwise.cu)
This module validates the arguments, declares the candidates the chooser picks from (bigkernels/_chooser.py:
the C++ or CUDA kernels, and torch's grouped conv2d + epilogue), and registers the fake implementations and
the autograd formula. The public conv2d (bigkernels/ops/conv.py) runs the same kernels as its own candidates.

Fast layouts: both NCHW-contiguous and channels_last inputs run without conversion; the output (and
every gradient) has the input's memory format. Any other strides cost one copy to NCHW.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from bigkernels import _extension, reference
from bigkernels._chooser import Candidate, Chooser
from bigkernels.ops._checks import check_floating, check_like, check_tensor
# The general conv op and this one share the activation names, the layout rule and act's needs.
from bigkernels.ops.conv import ACTIVATIONS, grad_needs_preactivation
from bigkernels.ops.conv import output_memory_format as memory_format

OP = "conv_depthwise"
# Largest kernel side the kernels take (RepLKNet's 31x31).
MAX_KERNEL = 31

IntPair = Union[int, Sequence[int]]


# -------------------------------------------------------------------------------------- helpers
def _pair(value: IntPair, name: str) -> list[int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return [value, value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items


def output_size(input_hw: Sequence[int], kernel: Sequence[int], stride, padding, dilation) -> tuple[int, int]:
    return tuple(
        (input_hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
    )


# ------------------------------------------------------------------------------------ argument checks
def _check_arguments(input, weight, bias, residual, stride, padding, dilation, activation, negative_slope) -> None:
    """Raise a ValueError/TypeError naming the first argument that is wrong; return if all are fine.

    The C++/CUDA ops check their arguments themselves, so on their happy path this runs only after an
    op refused a call, to turn its error into a precise one; the reference backend and traced code
    always run it first."""
    check_tensor(input, "input")
    check_floating(input, "input")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got {input.dim()}-D")
    channels = input.shape[1]
    check_tensor(weight, "weight")
    if weight.dim() != 4 or weight.shape[0] != channels or weight.shape[1] != 1:
        raise ValueError(
            f"weight must have shape (C, 1, R, S) with C = {channels} (input channels) for a depthwise "
            f"convolution, got {tuple(weight.shape)}"
        )
    check_like(weight, "weight", input, "input")
    kernel = weight.shape[2:]
    if not all(1 <= k <= MAX_KERNEL for k in kernel):
        raise ValueError(f"weight's kernel size must be within 1..{MAX_KERNEL}, got {tuple(kernel)}")
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        pair = _pair(value, name)
        if min(pair) < low:
            raise ValueError(f"{name} must be >= {low}, got {tuple(pair)}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    for i, dim in enumerate("HW"):
        if input.shape[2 + i] + 2 * padding[i] < dilation[i] * (kernel[i] - 1) + 1:
            raise ValueError(
                f"input's padded {dim} ({input.shape[2 + i]} + 2*{padding[i]}) is smaller than the dilated "
                f"kernel ({dilation[i] * (kernel[i] - 1) + 1})"
            )
    if bias is not None:
        check_tensor(bias, "bias")
        if tuple(bias.shape) != (channels,):
            raise ValueError(f"bias must have shape (C,) = ({channels},), got {tuple(bias.shape)}")
        check_like(bias, "bias", input, "input")
    if residual is not None:
        check_tensor(residual, "residual")
        out = (input.shape[0], channels, *output_size(input.shape[2:], kernel, stride, padding, dilation))
        if tuple(residual.shape) != out:
            raise ValueError(f"residual must have the output's shape (N, C, P, Q) = {out}, got {tuple(residual.shape)}")
        check_like(residual, "residual", input, "input")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {', '.join(repr(a) for a in ACTIVATIONS)}, got {activation!r}")
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")


# ----------------------------------------------------------------------------------- fake kernels
def _fake_forward(input, weight, bias, residual, stride, padding, dilation, activation, negative_slope, need_preactivation):
    _check_arguments(input, weight, bias, residual, stride, padding, dilation, activation, negative_slope)
    p, q = output_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    shape = (input.shape[0], input.shape[1], p, q)
    fmt = memory_format(input)
    out = input.new_empty(shape).contiguous(memory_format=fmt)
    if need_preactivation and grad_needs_preactivation(activation, negative_slope):
        z = input.new_empty(shape).contiguous(memory_format=fmt)
    else:
        z = input.new_empty((0,))
    return out, z


def _fake_backward(grad_output, input, weight, output, preactivation, stride, padding, dilation,
                   activation, negative_slope, output_mask):
    need_input, need_weight, need_bias, need_residual = output_mask
    fmt = memory_format(input)
    empty = input.new_empty((0,))
    return (
        input.new_empty(input.shape).contiguous(memory_format=fmt) if need_input else empty,
        weight.new_empty(weight.shape) if need_weight else input.new_empty((0,)),
        input.new_empty((weight.shape[0],)) if need_bias else input.new_empty((0,)),
        grad_output.new_empty(grad_output.shape).contiguous(memory_format=fmt) if need_residual else input.new_empty((0,)),
    )


# ------------------------------------------------------------------------------------ autograd
if _extension.AVAILABLE:
    # Autograd is in C++ (csrc/autograd/conv.cpp, shared with bigkernels::conv): a Python formula's
    # per-call cost was a visible share of a small depthwise conv.
    torch.library.register_fake("bigkernels::conv_depthwise")(_fake_forward)
    torch.library.register_fake("bigkernels::conv_depthwise_backward")(_fake_backward)


# ----------------------------------------------------------------------------------- public API
def conv_depthwise(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
    activation: Optional[str] = None,
    negative_slope: float = 0.01,
) -> Tensor:
    """``act(conv2d(input, weight, bias, stride, padding, dilation, groups=C) + residual)`` in one kernel.

    Args:
        input: (N, C, H, W), NCHW-contiguous or channels_last (both fast; the output keeps the format).
        weight: (C, 1, R, S), one R x S filter per channel, 1 <= R, S <= 31.
        bias: (C,) or None.
        residual: (N, C, P, Q) like the output, added before the activation, or None.
        stride, padding, dilation: ints or pairs (symmetric explicit padding only).
        activation: None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid" or "leaky_relu".
        negative_slope: leaky_relu's slope.

    Returns the (N, C, P, Q) output. Supported: CPU float32/float64/bfloat16 (direct C++ kernels,
    float32 accumulation for bfloat16), CUDA float16/bfloat16/float32 (direct CUDA kernels); any
    device on the reference backend. Differentiable in input, weight, bias and residual (first order).
    """
    activation = "none" if activation is None else activation
    check_tensor(input, "input")
    if input.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        input, weight, bias, residual = (t.to(dtype) if t is not None else None for t in (input, weight, bias, residual))
    args = (input, weight, bias, residual, stride, padding, dilation, activation, negative_slope)
    if torch.compiler.is_compiling():
        _check_arguments(*args)
    try:
        stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    except (TypeError, ValueError):
        _check_arguments(*args)
        raise
    call = (input, weight, bias, residual, stride, padding, dilation, activation, float(negative_slope))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, residual))
    try:
        return CHOOSER.pick(input.device, call, grad).run(*call)
    except (RuntimeError, TypeError, ValueError):
        _check_arguments(*args)  # raises the precise error when the arguments are at fault
        raise


# ------------------------------------------------------------------------------------ candidates
def _own_kernel(input, weight, bias, residual, stride, padding, dilation, activation, negative_slope):
    need_preactivation = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias, residual))
    return torch.ops.bigkernels.conv_depthwise.default(input, weight, bias, residual, stride, padding, dilation,
                                                       activation, negative_slope, need_preactivation)[0]


def _stock(input, weight, bias, residual, stride, padding, dilation, activation, negative_slope):
    """torch's grouped conv2d + residual + activation (the reference's composition)."""
    return reference.conv2d(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation), input.shape[1],
                            activation, negative_slope, residual)


def _reference(*call):
    _check_arguments(*call)
    return _stock(*call)


def _signature(input, weight, bias, residual, stride, padding, dilation, activation, negative_slope) -> tuple:
    return (input.shape, input.stride(), input.dtype, weight.shape, bias is None, residual is None, tuple(stride),
            tuple(padding), tuple(dilation), activation, negative_slope)


CHOOSER = Chooser(
    OP,
    [
        Candidate("cpu", "cpu", _own_kernel),
        Candidate("cuda", "cuda", _own_kernel),
        Candidate("stock", "stock", _stock),
        Candidate("reference", "reference", _reference),
    ],
    signature=_signature,
    check=_check_arguments,
)
