"""Drop-in convolution modules on the fused conv kernels (bigkernels.ops.conv).

Conv2d / Conv1d subclass the stock modules: same constructor (padding_mode included), parameters and
state_dict keys, so weights load both ways; the extra keyword `activation=` (and `negative_slope`)
is fused into the kernel, and `forward(input, residual=None)` adds an optional residual before it.
Conv2dBNAct is conv + BatchNorm2d + activation for training; fuse_conv_bn folds a batch norm into the
conv for inference.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigkernels import reference
from bigkernels.ops import conv as conv_ops


def _padding_for_kernel(module: nn.modules.conv._ConvNd, input: Tensor) -> tuple[Tensor, object]:
    """Non-zero padding modes pad explicitly (as the stock module does), then convolve unpadded."""
    if module.padding_mode != "zeros":
        input = F.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return input, 0
    return input, module.padding


def _normalized_args(module: nn.modules.conv._ConvNd) -> Optional[tuple[list[int], list[int], list[int]]]:
    """(stride, padding, dilation) as the lists the kernels take, cached on the module, or None when a
    call must take the general path (a padding mode other than zeros, or string padding). The
    cache is keyed on the attribute objects themselves, so an assignment to module.stride/padding/
    dilation/padding_mode is seen. Normalising per call cost ~3 us, a visible share of a small layer."""
    key = (module.stride, module.padding, module.dilation, module.padding_mode)
    cached = module.__dict__.get("_bk_normalized")
    if cached is not None and cached[0][0] is key[0] and cached[0][1] is key[1] and cached[0][2] is key[2] \
            and cached[0][3] is key[3]:
        return cached[1]
    args = None
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        stride, padding, dilation = (list(conv_ops._pair(v, name, low)) for v, name, low in (
            (module.stride, "stride", 1), (module.padding, "padding", 0), (module.dilation, "dilation", 1)))
        args = (stride, padding, dilation)
    module.__dict__["_bk_normalized"] = (key, args)
    return args


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with a fused epilogue: ``act(conv(x) + bias + residual)``.

    Same constructor as the stock module plus ``activation`` (None, "relu", "gelu", "gelu_tanh",
    "silu", "sigmoid", "leaky_relu") and ``negative_slope``. ``forward(input, residual=None)``:
    input (N, C, H, W) or (C, H, W); residual like the output or None. Devices and dtypes as
    ``bigkernels.nn.functional.conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding: Union[str, int, tuple] = 0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 *, activation: Optional[str] = None, negative_slope: float = 0.01) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype)
        self.activation = conv_ops._check_activation(activation, negative_slope)
        self.negative_slope = float(negative_slope)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        args = None if torch.compiler.is_compiling() else _normalized_args(self)
        if args is not None:
            return conv_ops.conv2d_normalized(input, self.weight, self.bias, residual, args[0], args[1], args[2],
                                              self.groups, self.activation, self.negative_slope)
        input, padding = _padding_for_kernel(self, input)
        return conv_ops.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                               activation=self.activation, negative_slope=self.negative_slope, residual=residual)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.activation != "none":
            extra += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                extra += f", negative_slope={self.negative_slope}"
        return extra


class Conv1d(nn.Conv1d):
    """``torch.nn.Conv1d`` with the fused epilogue of Conv2d, run by the 2-D kernels on a
    (N, C, 1, L) view. ``forward(input, residual=None)``: input (N, C, L) or (C, L)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding: Union[str, int, tuple] = 0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 *, activation: Optional[str] = None, negative_slope: float = 0.01) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype)
        self.activation = conv_ops._check_activation(activation, negative_slope)
        self.negative_slope = float(negative_slope)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        input, padding = _padding_for_kernel(self, input)
        return conv_ops.conv1d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                               activation=self.activation, negative_slope=self.negative_slope, residual=residual)

    extra_repr = Conv2d.extra_repr


class Conv2dBNAct(nn.Module):
    """Conv2d (no bias by default) -> BatchNorm2d -> (+ residual) -> activation, for training.

    Submodules ``conv`` (a bigkernels.nn.Conv2d) and ``bn`` (a stock BatchNorm2d), so the state_dict
    keys are those of a stock pair held as ``conv``/``bn`` (``conv.weight``, ``bn.running_mean``...).
    Training: the conv kernel, then batch statistics, then the activation. Eval: the batch norm is
    folded into the conv weights, so the whole block is ONE fused conv kernel. The folded weight and
    bias are cached between eval calls (refolding cost a few elementwise ops per call, a visible
    share of a small layer) and refolded when any of conv.weight, conv.bias, bn.weight, bn.bias,
    bn.running_mean, bn.running_var or bn.eps changes: a new tensor object, an in-place change (its
    version counter), a different storage; also after ``train()``/``eval()`` and device/dtype moves.
    Not cached (folded per call) when autograd must reach the parameters, under torch.compile, or
    for inference-mode tensors (they have no version counter). A write that bypasses autograd's
    version counter (through ``.data`` of a view or a NumPy alias) is not seen: call
    ``clear_folded_cache()`` after one.
    ``fuse()`` returns that folded conv as a standalone module for deployment.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding: Union[str, int, tuple] = 0,
                 dilation=1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None,
                 *, activation: Optional[str] = "relu", negative_slope: float = 0.01, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1) -> None:
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode, device, dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.activation = conv_ops._check_activation(activation, negative_slope)
        self.negative_slope = float(negative_slope)
        # (bn.eps, ids, versions, data pointers of the sources, the sources, weight, bias); see the
        # class docstring and _folded_weight_and_bias. A plain attribute: not part of the state_dict.
        self._folded: Optional[tuple] = None

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        bn = self._modules["bn"]
        if self.training or not bn.track_running_stats:
            if self._folded is not None:
                self._folded = None  # the running statistics change in training
            z = bn(self._modules["conv"](input))
            if residual is not None:
                z = z + residual
            return reference.activation(z, self.activation, self.negative_slope)
        weight, bias = self._folded_weight_and_bias()
        conv = self._modules["conv"]
        args = None if torch.compiler.is_compiling() else _normalized_args(conv)
        if args is not None:
            return conv_ops.conv2d_normalized(input, weight, bias, residual, args[0], args[1], args[2], conv.groups,
                                              self.activation, self.negative_slope)
        input, padding = _padding_for_kernel(self.conv, input)
        return conv_ops.conv2d(input, weight, bias, self.conv.stride, padding, self.conv.dilation, self.conv.groups,
                               activation=self.activation, negative_slope=self.negative_slope, residual=residual)

    def clear_folded_cache(self) -> None:
        """Drop the cached eval-mode folded weight and bias (the next eval call refolds)."""
        self._folded = None

    def train(self, mode: bool = True) -> "Conv2dBNAct":
        self._folded = None
        return super().train(mode)

    def _apply(self, *args, **kwargs):  # .to(), .cuda(), .double(), ...: new parameter tensors
        self._folded = None
        return super()._apply(*args, **kwargs)

    def _fold_sources(self) -> tuple[Optional[Tensor], ...]:
        # Read from the modules' parameter/buffer dicts (where nn.Module keeps them, also after a
        # reassignment): six attribute reads through nn.Module.__getattr__ cost ~7 us per call.
        conv, bn = self._modules["conv"], self._modules["bn"]
        conv_p, bn_p, bn_b = conv._parameters, bn._parameters, bn._buffers
        return (conv_p["weight"], conv_p.get("bias"), bn_p.get("weight"), bn_p.get("bias"), bn_b.get("running_mean"),
                bn_b.get("running_var"))

    def _folded_weight_and_bias(self) -> tuple[Tensor, Tensor]:
        sources = self._fold_sources()
        if torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)):
            return _folded_weight_and_bias(self.conv, self.bn)
        # The key: the source tensors' ids, versions and data pointers, compared as flat tuples (this
        # runs on every eval call: a per-entry comparison cost ~12 us, a visible share of a small
        # layer). The cache holds the source tensors themselves, so their ids cannot be reused by
        # new tensors while it is compared against them.
        present = [t for t in sources if t is not None]
        ids = tuple(map(id, sources))
        cached = self._folded
        if cached is not None and cached[0] == self.bn.eps and cached[1] == ids:
            # Same tensor objects: inference tensors were never cached (below), so these have versions.
            if cached[2] == tuple(t._version for t in present) and cached[3] == tuple(t.data_ptr() for t in present):
                return cached[5], cached[6]
        if any(t.is_inference() for t in present):  # no version counter: fold per call
            return _folded_weight_and_bias(self.conv, self.bn)
        with torch.no_grad():
            weight, bias = _folded_weight_and_bias(self.conv, self.bn)
        self._folded = (self.bn.eps, ids, tuple(t._version for t in present), tuple(t.data_ptr() for t in present),
                        sources, weight, bias)
        return weight, bias

    def fuse(self) -> Conv2d:
        """The inference-time equivalent: one Conv2d with the batch norm folded in and the activation."""
        return fuse_conv_bn(self.conv, self.bn, activation=self.activation, negative_slope=self.negative_slope)


def _folded_weight_and_bias(conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """bn(conv(x)) in eval = conv(x) * s + (b - mean) * s + beta with s = gamma / sqrt(var + eps)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn must track running statistics (track_running_stats=True) to be folded into the conv")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn.num_features ({bn.num_features}) must equal conv.out_channels ({conv.out_channels})")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    weight = conv.weight * scale.reshape((-1,) + (1,) * (conv.weight.dim() - 1)).to(conv.weight.dtype)
    bias = -bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    return weight, bias.to(conv.weight.dtype)


def fuse_conv_bn(conv: Union[nn.Conv2d, nn.Conv1d], bn: nn.modules.batchnorm._BatchNorm, *,
                 activation: Optional[str] = None, negative_slope: float = 0.01) -> Union[Conv2d, Conv1d]:
    """Fold an eval-mode batch norm into the conv before it: returns a new bigkernels Conv2d (or Conv1d)
    whose output equals ``bn(conv(x))`` with bn's running statistics, followed by ``activation``.

    conv: a stock or bigkernels Conv2d/Conv1d without an activation of its own (a batch norm after an
    activation cannot be folded). bn: BatchNorm2d/BatchNorm1d with running statistics. The result is
    in eval mode; the inputs are not modified.
    """
    if not isinstance(conv, (nn.Conv2d, nn.Conv1d)):
        raise TypeError(f"conv must be a torch.nn.Conv2d or Conv1d, got {type(conv).__name__}")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn must be a batch norm module, got {type(bn).__name__}")
    if getattr(conv, "activation", "none") != "none":
        raise ValueError(f"conv has activation {conv.activation!r}: a batch norm after an activation cannot be folded")
    cls = Conv2d if isinstance(conv, nn.Conv2d) else Conv1d
    fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, True, conv.padding_mode, conv.weight.device, conv.weight.dtype, activation=activation,
                negative_slope=negative_slope)
    with torch.no_grad():
        weight, bias = _folded_weight_and_bias(conv, bn)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused.eval()
