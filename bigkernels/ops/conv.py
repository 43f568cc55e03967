"""bigkernels::conv: fused convolution, y = act(conv2d(x, w) + bias + residual).

Ops (one schema each):
  bigkernels::conv / conv_backward                     C++ CPU kernels (csrc/ops.cpp, csrc/cpu/conv.cpp)
  bigkernels::conv_triton / conv_backward_triton       Triton kernels (bigkernels/triton/conv.py)
This module validates the arguments once, turns torch's padding forms ("same", "valid", ints) into
the ops' symmetric padding, declares the candidates the chooser picks from (bigkernels/_chooser.py:
our kernels, torch's conv2d + epilogue; `_heuristic` is the static rule), and registers the fake implementations and the autograd formula of every op.

Layouts: NCHW-contiguous and channels_last inputs are both fast; the output takes the input's layout
(`output_memory_format`). Other strides work but cost a copy inside the kernel. On the CPU, 1x1
layers run the GEMM core in either layout; NCHW float32 3x3 stride-1 layers of 32-512 channels with
14-112 px outputs run Winograd F(2x2, 3x3) (their input gradient too; transformed weights cached);
other dense layers take oneDNN's fused primitive (as fast as stock there) or at::convolution + one
pass; NCHW depthwise layers run the direct kernel (csrc/cpu/conv.cpp and _heuristic say where and
why; with tuning on, measured on this machine instead). No call converts the layout for you: convert the model once (model.to(memory_format=...)) if
you want the other one.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from bigkernels import _backend, _extension, reference
from bigkernels._chooser import Candidate, Chooser, size_bucket
from bigkernels.ops._checks import check_floating, check_like, check_tensor

OP = "conv"

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "leaky_relu")

IntPair = Union[int, Sequence[int]]


# ------------------------------------------------------------------------------------ helpers
def output_memory_format(input: Tensor) -> torch.memory_format:
    """The layout of the ops' outputs (and of grad_input): channels_last exactly when the input is
    channels_last and not also NCHW-contiguous (C == 1 or H == W == 1 can be both); grad_weight
    follows the weight by the same rule. csrc/cpu/conv.cpp (layout_of) uses the same rule."""
    if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def grad_needs_preactivation(activation: str, negative_slope: float) -> bool:
    """True when act'(z) cannot be computed from y = act(z) (csrc/common/activation.h)."""
    return activation in ("gelu", "gelu_tanh", "silu") or (activation == "leaky_relu" and negative_slope <= 0)


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _empty(shape, like: Tensor, memory_format=torch.contiguous_format) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


# ----------------------------------------------------------------------------------- fake kernels
def _fake_forward(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope,
                  need_preactivation):
    _check_arguments(input, weight, bias, residual, stride, padding, dilation, groups, activation)
    n, k = input.shape[0], weight.shape[0]
    p = output_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    q = output_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    layout = output_memory_format(input)
    output = _empty((n, k, p, q), input, layout)
    if need_preactivation and grad_needs_preactivation(activation, negative_slope):
        preactivation = _empty((n, k, p, q), input, layout)
    else:
        preactivation = input.new_empty((0,))
    return output, preactivation


def _fake_backward(grad_output, input, weight, output, preactivation, stride, padding, dilation, groups, activation,
                   negative_slope, output_mask):
    layout = output_memory_format(input)
    need_input, need_weight, need_bias, need_residual = output_mask
    return (
        _empty(input.shape, input, layout) if need_input else input.new_empty((0,)),
        _empty(weight.shape, weight, output_memory_format(weight)) if need_weight else input.new_empty((0,)),
        input.new_empty((weight.shape[0],)) if need_bias else input.new_empty((0,)),
        _empty(grad_output.shape, input, layout) if need_residual else input.new_empty((0,)),
    )


# ------------------------------------------------------------------------------- Triton ops
@torch.library.custom_op("bigkernels::conv_triton", mutates_args=())
def conv_triton(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    activation: str,
    negative_slope: float,
    need_preactivation: bool,
) -> tuple[Tensor, Tensor]:
    from bigkernels.triton import conv as kernels  # Triton is optional and slow to import

    return kernels.conv_forward(input, weight, bias, residual, stride, padding, dilation, groups, activation,
                                negative_slope, need_preactivation)


@torch.library.custom_op("bigkernels::conv_backward_triton", mutates_args=())
def conv_backward_triton(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    output: Tensor,
    preactivation: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    activation: str,
    negative_slope: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from bigkernels.triton import conv as kernels

    return kernels.conv_backward(grad_output, input, weight, output, preactivation, stride, padding, dilation,
                                 groups, activation, negative_slope, output_mask)


conv_triton.register_fake(_fake_forward)
conv_backward_triton.register_fake(_fake_backward)


# ------------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope, _need = inputs
    y, z = output
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups, activation, negative_slope)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    # Without z (the forward ran as inference) an activation that needs it is recomputed: keep what
    # the recompute reads, only then.
    recompute = grad_needs_preactivation(activation, negative_slope) and z.dim() == 1
    ctx.recompute = recompute
    ctx.save_for_backward(input, weight, y, z, bias if recompute else None, residual if recompute else None)


def _make_backward(forward_op, backward_op):
    def backward(ctx, grad_output, _grad_preactivation):
        input, weight, y, z, bias, residual = ctx.saved_tensors
        stride, padding, dilation, groups, activation, negative_slope = ctx.conv_args
        need = ctx.needs_input_grad  # (input, weight, bias, residual, ...)
        if ctx.recompute:
            y, z = forward_op(input, weight, bias, residual, stride, padding, dilation, groups, activation,
                              negative_slope, True)
        mask = [need[0], need[1], ctx.has_bias and need[2], ctx.has_residual and need[3]]
        g_input, g_weight, g_bias, g_residual = backward_op(
            grad_output, input, weight, y, z, stride, padding, dilation, groups, activation, negative_slope, mask
        )
        return (
            g_input if mask[0] else None,
            g_weight if mask[1] else None,
            g_bias if mask[2] else None,
            g_residual if mask[3] else None,
            None, None, None, None, None, None, None,
        )

    return backward


torch.library.register_autograd(
    "bigkernels::conv_triton", _make_backward(conv_triton, conv_backward_triton), setup_context=_setup_context
)

if _extension.AVAILABLE:
    # The C++ op's autograd is in C++ (csrc/autograd/conv.cpp): this Python formula's per-call cost
    # was a visible share of a small conv. Same contract as _make_backward above.
    torch.library.register_fake("bigkernels::conv")(_fake_forward)
    torch.library.register_fake("bigkernels::conv_backward")(_fake_backward)


# ------------------------------------------------------------------------------ argument checks
def _pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    """An int or a sequence of 2 ints (as torch's conv2d takes them), each >= minimum."""
    # Fast paths first: this runs three times per call, and isinstance(x, Sequence) is slow.
    if type(value) is int and value >= minimum:
        return (value, value)
    if type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        if value[0] >= minimum and value[1] >= minimum:
            return (value[0], value[1])
    if isinstance(value, bool) or not isinstance(value, (int, Sequence, torch.SymInt)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__}")
    pair = (value, value) if not isinstance(value, Sequence) else tuple(value)
    if len(pair) == 1:
        pair = (pair[0], pair[0])
    if len(pair) != 2 or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def _check_activation(activation: Optional[str], negative_slope: float) -> str:
    name = "none" if activation is None else activation
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of None, {', '.join(repr(a) for a in ACTIVATIONS)}, got {activation!r}")
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")
    return name


def _check_arguments(input, weight, bias, residual, stride, padding, dilation, groups, activation) -> None:
    """Raise a ValueError/TypeError naming the first argument that is wrong; return if all are fine.
    Takes the ops' normalised arguments (4-D input, pairs, activation name)."""
    check_tensor(input, "input")
    check_floating(input, "input")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got {input.dim()}-D")
    check_tensor(weight, "weight")
    check_like(weight, "weight", input, "input")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels / groups, kH, kW), got {weight.dim()}-D")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    channels, filters = input.shape[1], weight.shape[0]
    if channels % groups != 0:
        raise ValueError(f"groups ({groups}) must divide the input channels (input.shape[1] = {channels})")
    if filters % groups != 0:
        raise ValueError(f"groups ({groups}) must divide the output channels (weight.shape[0] = {filters})")
    if weight.shape[1] * groups != channels:
        raise ValueError(
            f"weight.shape[1] must be input channels / groups = {channels} / {groups} = {channels // groups} "
            f"(channel mismatch between input {tuple(input.shape)} and weight {tuple(weight.shape)})"
        )
    for name, pair, minimum in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(pair) != 2 or any(v < minimum for v in pair):
            raise ValueError(f"{name} must be a pair of ints >= {minimum}, got {tuple(pair)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    spatial = []
    for i in range(2):
        size, kernel = input.shape[2 + i], weight.shape[2 + i]
        if size + 2 * padding[i] < dilation[i] * (kernel - 1) + 1:
            raise ValueError(
                f"input spatial size {tuple(input.shape[2:])} (padded by {tuple(padding)}) is smaller than the "
                f"kernel {tuple(weight.shape[2:])} dilated by {tuple(dilation)}"
            )
        spatial.append(output_size(size, kernel, stride[i], padding[i], dilation[i]))
    if bias is not None:
        check_tensor(bias, "bias")
        check_like(bias, "bias", input, "input")
        if tuple(bias.shape) != (filters,):
            raise ValueError(f"bias must have shape (out_channels,) = ({filters},), got {tuple(bias.shape)}")
    if residual is not None:
        check_tensor(residual, "residual")
        check_like(residual, "residual", input, "input")
        expected = (input.shape[0], filters, spatial[0], spatial[1])
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual must have the output's shape (N, out_channels, H_out, W_out) = {expected}, "
                             f"got {tuple(residual.shape)}")


def _resolve_padding(input: Tensor, weight: Tensor, padding, stride, dilation) -> tuple[Tensor, tuple[int, int]]:
    """torch's padding forms -> (input, symmetric padding). 'same' with an even (dilated) kernel needs
    one more element on the right/bottom than on the left/top: that one is padded here, as torch does."""
    if isinstance(padding, str):
        if padding == "valid":
            return input, (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
        if any(s != 1 for s in stride):
            raise ValueError(f"padding='same' is not supported for strided convolutions (stride = {tuple(stride)})")
        total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
        left = (total[0] // 2, total[1] // 2)
        extra = [total[i] - 2 * left[i] for i in range(2)]
        if any(extra):
            input = F.pad(input, [0, extra[1], 0, extra[0]])
        return input, left
    return input, _pair(padding, "padding", 0)


# ----------------------------------------------------------------------------------- kernel choice


def _is_depthwise(input: Tensor, weight: Tensor, groups: int) -> bool:
    """One filter per channel (groups == C == K): the calls the direct conv_depthwise kernels serve."""
    channels = input.shape[1]
    return groups == channels and weight.shape[0] == channels and weight.shape[1] == 1 and channels > 1


# CPU depthwise: the direct kernel (csrc/cpu/conv_depthwise.cpp) or oneDNN inside the conv op. Measured
# side by side on the idle 2-core Xeon (fp32, bias + relu, inference): NCHW input, the direct kernel
# is the fastest everywhere (N=1..8, C=64..256, 14..56 px, 3x3 and 7x7: 0.25 vs 1.18 ms for oneDNN at
# 1x96x56x56 7x7); channels_last input, it ties oneDNN at batch 1 but loses at batch 4-8 with 7x7
# (1.13 vs 0.62 ms). Training takes the direct kernel (its backward: 1.6-2.9x faster fwd+bwd at 7x7).
# So channels_last inference with kernels larger than this stays on the conv op (static heuristic;
# the chooser measures both where tuning is on).
CPU_DEPTHWISE_MAX_CHANNELS_LAST_INFERENCE_KERNEL = 5

# CPU layers with nothing to fuse (no activation, no residual) that the C++ op would hand to
# at::convolution anyway go to torch's conv2d (the stock candidate) in the static heuristic: the op
# would add only its fixed cost, which on a small layer is a visible share (SmallCNN's 8 -> 8 3x3
# 16x16 batch 8 training forward, fp32, 2 threads: ~10 us per call, ~220 vs ~200 us for its three
# convs). The op keeps the layers where its own cores may run: 1x1 layers (the GEMM core), 3x3
# layers of >= 32 input and output channels (Winograd; this mirrors kWinogradMinChannels in
# csrc/cpu/conv.cpp prefer_winograd: keep them equal) and depthwise layers (the direct kernel).
CPU_OWN_CORE_MIN_CHANNELS_3X3 = 32


def _torch_conv_suffices(weight: Tensor, groups: int, activation: str, residual: Optional[Tensor]) -> bool:
    if activation != "none" or residual is not None or groups != 1:
        return False
    kh, kw = weight.shape[2], weight.shape[3]
    if kh == 1 and kw == 1:
        return False
    return not (kh == 3 and kw == 3 and min(weight.shape[0], weight.shape[1]) >= CPU_OWN_CORE_MIN_CHANNELS_3X3)


def _need_preactivation(input, weight, bias, residual) -> bool:
    return torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad))


# Candidates: every one takes the call (input, weight, bias, residual, stride, padding, dilation,
# groups, activation, negative_slope), normalised and validated, and returns the output.
def _cpu_conv(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope):
    need = _need_preactivation(input, weight, bias, residual)
    out = None
    if not torch.compiler.is_compiling():  # the direct entry is for eager calls; traces take torch.ops
        out = _CPU_CONV(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope,
                        need)
    if out is None:  # __torch_function__ somewhere: torch.ops honours it
        out = torch.ops.bigkernels.conv.default(input, weight, bias, residual, stride, padding, dilation, groups,
                                                activation, negative_slope, need)[0]
    return out


def _cpu_depthwise(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope):
    need = _need_preactivation(input, weight, bias, residual)
    out = None
    if not torch.compiler.is_compiling():
        out = _CPU_CONV_DEPTHWISE(input, weight, bias, residual, stride, padding, dilation, activation,
                                  negative_slope, need)
    if out is None:
        out = torch.ops.bigkernels.conv_depthwise.default(input, weight, bias, residual, stride, padding, dilation,
                                                          activation, negative_slope, need)[0]
    return out


def _cuda_depthwise(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope):
    need = _need_preactivation(input, weight, bias, residual)
    return torch.ops.bigkernels.conv_depthwise.default(input, weight, bias, residual, stride, padding, dilation,
                                                       activation, negative_slope, need)[0]


def _triton_conv(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope):
    need = _need_preactivation(input, weight, bias, residual)
    return torch.ops.bigkernels.conv_triton.default(input, weight, bias, residual, stride, padding, dilation, groups,
                                                    activation, negative_slope, need)[0]


def _stock(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope):
    """torch's conv2d, + residual, then the activation: what the layer costs without us (the
    reference's maths, which is exactly that composition)."""
    return reference.conv2d(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope, residual)


def _reference(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope):
    _check_arguments(input, weight, bias, residual, stride, padding, dilation, groups, activation)
    return reference.conv2d(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope, residual)


def _depthwise_only(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope):
    return None if _is_depthwise(input, weight, groups) else "the direct kernels take depthwise calls (groups = C = K) only"


def _heuristic(eligible, call):
    """The static choice (tuning off, forced backend, untuned trace): the rules measured on the Xeon."""
    names = {c.name: c for c in eligible}
    input, weight, bias, residual, _, _, _, groups, activation, _ = call
    if "cpu.depthwise" in names and (_need_preactivation(input, weight, bias, residual)
                                     or output_memory_format(input) != torch.channels_last
                                     or max(weight.shape[2:]) <= CPU_DEPTHWISE_MAX_CHANNELS_LAST_INFERENCE_KERNEL):
        return names["cpu.depthwise"]
    if "cpu" in names:
        if "stock" in names and _torch_conv_suffices(weight, groups, activation, residual):
            return names["stock"]
        return names["cpu"]
    for name in ("cuda.depthwise", "triton", "cpu.depthwise"):
        if name in names:
            return names[name]
    return eligible[0]


def _signature(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope) -> tuple:
    return (input.shape, input.stride(), input.dtype, weight.shape, weight.dtype, bias is None, residual is None,
            tuple(stride), tuple(padding), tuple(dilation), groups, activation, negative_slope)


def _bucket(sig: tuple) -> tuple:
    shape, strides = sig[0], sig[1]
    channels_last = len(shape) == 4 and strides[1] == 1 and shape[1] > 1
    return ((size_bucket(shape[0]),) + tuple(shape[1:2]) + tuple(size_bucket(n) for n in shape[2:])
            + (channels_last,) + sig[2:])


def _check_call(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope):
    check_tensor(weight, "weight")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels / groups, kH, kW), got {weight.dim()}-D")
    _check_arguments(input, weight, bias, residual, stride, padding, dilation, groups, activation)


def _autocast(device_type: str, tensors: tuple[Optional[Tensor], ...]) -> tuple[Optional[Tensor], ...]:
    """conv2d is on autocast's lower-precision list (CUDA and CPU): run (and return) in the autocast
    dtype, as the stock conv2d does."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


# ------------------------------------------------------------------------------- CPU fast path
# The eager entries into the C++ ops: bigkernels._C._conv / _conv_depthwise parse their arguments
# like torch's own conv2d binding and call the op's typed handle (autograd included); calling
# through torch.ops cost ~6 us more per call (csrc/autograd/conv_call.cpp says where measured).
# They return None for tensors with __torch_function__: those calls go through torch.ops.
def _entry(name: str, op_name: str) -> Optional[Callable[..., Optional[Tensor]]]:
    if not _extension.AVAILABLE:
        return None
    import bigkernels._C as compiled

    direct = getattr(compiled, name, None)
    if direct is None:  # an extension built before the entries existed: same contract via torch.ops
        overload = getattr(torch.ops.bigkernels, op_name).default
        return lambda *args: overload(*args)[0]
    return direct


_CPU_CONV = _entry("_conv", "conv")
_CPU_CONV_DEPTHWISE = _entry("_conv_depthwise", "conv_depthwise")


def conv2d_normalized(input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                      stride: list[int], padding: list[int], dilation: list[int], groups: int, activation: str,
                      negative_slope: float) -> Tensor:
    """``conv2d`` for callers that hold already-normalised arguments (the modules cache them):
    stride/padding/dilation lists of 2 ints (symmetric padding), activation a name of ACTIVATIONS,
    negative_slope a float. A 4-D CPU input on the C++ backend (automatic or forced "cpu"), outside
    torch.compile and CPU autocast, runs straight to the kernel; anything else takes ``conv2d``.
    Bad arguments raise the same errors as ``conv2d`` (the checks run after the kernel refused)."""
    if isinstance(input, Tensor) and _cpu_fast_path(input):
        return _run_cpu(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope)
    return conv2d(input, weight, bias, stride, padding, dilation, groups, activation=activation,
                  negative_slope=negative_slope, residual=residual)


def _cpu_fast_path(input: Tensor) -> bool:
    """A call conv2d_normalized/conv2d may run straight on the C++ kernels."""
    return (_CPU_CONV is not None and input.is_cpu and input.dim() == 4 and _backend.requested() in (None, "cpu")
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


def _run_cpu(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope) -> Tensor:
    """A CPU call with normalised arguments, through the chooser (the kernel entries above)."""
    call = (input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope)
    try:
        return CHOOSER.pick(input.device, call, _need_preactivation(input, weight, bias, residual)).run(*call)
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError):
        # Raises the precise error when the arguments are at fault (weight/bias of a wrong type
        # fail above with an AttributeError or IndexError first).
        _check_call(*call)
        raise


CHOOSER = Chooser(
    OP,
    [
        Candidate("cpu.depthwise", "cpu", _cpu_depthwise, _depthwise_only, kernel_op="conv_depthwise"),
        Candidate("cpu", "cpu", _cpu_conv),
        Candidate("cuda.depthwise", "cuda", _cuda_depthwise, _depthwise_only, kernel_op="conv_depthwise"),
        Candidate("triton", "triton", _triton_conv),
        Candidate("stock", "stock", _stock),
        Candidate("reference", "reference", _reference),
    ],
    signature=_signature,
    bucket=_bucket,
    heuristic=_heuristic,
    check=_check_call,
)


# ----------------------------------------------------------------------------------- public API
def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: Union[IntPair, str] = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    activation: Optional[str] = None,
    negative_slope: float = 0.01,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """``act(torch.nn.functional.conv2d(input, weight, bias, ...) + residual)`` in one fused kernel.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); NCHW-contiguous or channels_last (both fast; the
            output takes the input's layout).
        weight: (K, C / groups, kH, kW).
        bias: (K,) or None.
        stride, padding, dilation, groups: as ``torch.nn.functional.conv2d`` (padding may be
            "same" or "valid").
        activation: None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid" or "leaky_relu"
            (slope ``negative_slope``), applied after the bias and residual.
        residual: None or a tensor of the output's shape (N, K, H_out, W_out), added before the
            activation (the ResNet block tail ``relu(conv(x) + b + shortcut)``).

    Supported: CPU float32/float64/bfloat16 (C++), CUDA float16/bfloat16/float32 (Triton); any device
    on the reference backend. Differentiable in input, weight, bias and residual (first order).
    """
    check_tensor(input, "input")
    check_tensor(weight, "weight")
    act = _check_activation(activation, negative_slope)
    stride_ = _pair(stride, "stride", 1)
    dilation_ = _pair(dilation, "dilation", 1)
    if not isinstance(padding, str) and _cpu_fast_path(input):
        padding_ = _pair(padding, "padding", 0)
        return _run_cpu(input, weight, bias, residual, list(stride_), list(padding_), list(dilation_), groups, act,
                        float(negative_slope))
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
        if residual is not None:
            check_tensor(residual, "residual")
            residual = residual.unsqueeze(0)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W) or 3-D unbatched (C, H, W), got {input.dim()}-D")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels / groups, kH, kW), got {weight.dim()}-D")
    input, padding_ = _resolve_padding(input, weight, padding, stride_, dilation_)
    if input.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(input.device.type):
        input, weight, bias, residual = _autocast(input.device.type, (input, weight, bias, residual))
    args = (input, weight, bias, residual, stride_, padding_, dilation_, groups, act)

    if input.device.type != "cpu" or torch.compiler.is_compiling():
        _check_arguments(*args)  # the CPU kernels check for themselves; see _run_cpu
    call = (input, weight, bias, residual, list(stride_), list(padding_), list(dilation_), groups, act,
            float(negative_slope))
    try:
        out = CHOOSER.pick(input.device, call, _need_preactivation(input, weight, bias, residual)).run(*call)
    except (RuntimeError, TypeError, ValueError):
        _check_arguments(*args)  # raises the precise error when the arguments are at fault
        raise
    return out.squeeze(0) if unbatched else out


def conv1d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: Union[IntPair, str] = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    activation: Optional[str] = None,
    negative_slope: float = 0.01,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """``act(torch.nn.functional.conv1d(input, weight, bias, ...) + residual)``, through the 2-D
    kernels on a (N, C, 1, L) view (no copy for contiguous input).

    input (N, C, L) or unbatched (C, L); weight (K, C / groups, kL); residual (N, K, L_out) or None.
    Same dtypes, devices, activations and padding forms as ``conv2d``."""
    check_tensor(input, "input")
    check_tensor(weight, "weight")
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be 3-D (N, C, L) or 2-D unbatched (C, L), got {input.dim()}-D")
    if weight.dim() != 3:
        raise ValueError(f"weight must be 3-D (out_channels, in_channels / groups, kL), got {weight.dim()}-D")

    def single(value: IntPair, name: str) -> int:
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != 1:
                raise ValueError(f"{name} must be an int or a 1-element sequence for conv1d, got {value!r}")
            value = value[0]
        return value  # type: ignore[return-value]

    stride_ = (1, single(stride, "stride"))
    dilation_ = (1, single(dilation, "dilation"))
    padding_ = padding if isinstance(padding, str) else (0, single(padding, "padding"))
    if residual is not None:
        check_tensor(residual, "residual")
        residual = residual.unsqueeze(-2)
    out = conv2d(input.unsqueeze(-2), weight.unsqueeze(2), bias, stride_, padding_, dilation_, groups,
                 activation=activation, negative_slope=negative_slope, residual=residual)
    return out.squeeze(-2)
