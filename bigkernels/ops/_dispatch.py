"""The call wrapper every op module shares: autocast, workspace decision, and re-checking a refused call.

Kept to plain functions over tuples: they sit on the batch-1 path of the LSTM cell (~20 us a call),
where each extra Python call costs about 0.1 us and an extra tuple or closure about as much.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor


def autocast_args(args: tuple, device: torch.device, device_types: tuple[str, ...]) -> tuple:
    """`args` with each float32/float16/bfloat16 tensor cast to the autocast dtype, when autocast is on
    for `device` and its type is one of `device_types` (the devices where the stock op runs in the
    autocast dtype); else `args` unchanged. Like autocast itself, float64 tensors are left alone (a
    float64 op stays float64), and so are non-tensors (None, ints) and tensors of other kinds."""
    if device.type not in device_types or not torch.is_autocast_enabled(device.type):
        return args
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t for t in args)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def needs_workspace(tensors: tuple[Optional[Tensor], ...]) -> bool:
    """Whether the forward must keep what its backward needs: grad mode on and a tensor that wants a
    gradient (inference writes no workspace at all)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def call_checked(op: Callable[..., Any], args: tuple, check: Callable[..., None], check_args: tuple) -> Any:
    """op(*args). The kernels check their own arguments, so Python validates only when one refuses a
    call: then check(*check_args) raises the precise error naming the argument at fault, and the
    kernel's own error is re-raised if the arguments pass (a genuine kernel failure)."""
    try:
        return op(*args)
    except (RuntimeError, TypeError):
        check(*check_args)
        raise
