"""Launch rules shared by every Triton launcher in bigkernels/triton/: the device a kernel runs on and
grids within CUDA's limits.

Device: Triton launches on torch's *current* CUDA device, whatever device the tensors are on, so a
call on cuda:1 tensors while cuda:0 is current would run on the wrong GPU (an illegal address, or
reads of another allocation). `launches_on` checks that a launcher's tensors share one device and
runs it under that device; on CPU tensors (the interpreter) the guard does nothing.

Grids: CUDA allows 2^31 - 1 programs along grid axis x but only 65 535 along y and z. A launcher
whose y or z count can exceed that (batch, groups x taps) folds the excess into x: `fold` gives the
axis `span` programs and x `chunks` times as many, and the kernel recovers its indices with
`unfold_pid` and returns early past the end. GRID_YZ_LIMIT is read at every launch, so tests can set
it tiny and prove the folded indexing on small shapes.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, ContextManager, Iterable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_GRID_X = 2**31 - 1
GRID_YZ_LIMIT = 65_535


def _qualified(op: str) -> str:
    return op if op.startswith("bigkernels::") else f"bigkernels::{op}"


# ------------------------------------------------------------------------------------------- device
def common_device(op: str, named: Iterable[tuple[str, Optional[Tensor]]]) -> Optional[torch.device]:
    """The one device of the named tensors (None if there are none); RuntimeError naming the first
    two arguments that disagree."""
    first_name, device = None, None
    for name, t in named:
        if t is None:
            continue
        if device is None:
            first_name, device = name, t.device
        elif t.device != device:
            raise RuntimeError(f"{_qualified(op)}: all tensors must be on one device, but {first_name} is on "
                               f"{device} and {name} on {t.device}")
    return device


def device_guard(device: Optional[torch.device]) -> ContextManager:
    """torch.cuda.device(device) for a CUDA device (Triton launches on the current one), else nothing."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launches_on(op: str, *names: str) -> Callable:
    """Decorator of a launcher: the tensor arguments `names` must share one device, and the launcher
    runs with that device current. Argument positions are looked up once, not per call (the LSTM
    launchers run once per time step)."""
    def wrap(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters)
        positions = [(name, params.index(name)) for name in names]

        @functools.wraps(fn)
        def launcher(*args, **kwargs):
            named = ((name, args[i] if i < len(args) else kwargs.get(name)) for name, i in positions)
            with device_guard(common_device(op, named)):
                return fn(*args, **kwargs)

        return launcher

    return wrap


# --------------------------------------------------------------------------------------------- grids
def fold(count: int) -> tuple[int, int]:
    """(chunks, span) for `count` programs along grid axis y or z: the axis launches span <=
    GRID_YZ_LIMIT programs and axis x `chunks` times its own count; chunks * span >= count."""
    span = max(1, min(count, GRID_YZ_LIMIT))
    return triton.cdiv(max(count, 1), span), span


def checked_grid(op: str, x: int, y: int = 1, z: int = 1) -> tuple[int, int, int]:
    """(x, y, z), or RuntimeError if an axis is above CUDA's limit (a shape no fold covers)."""
    for axis, count, limit in (("x", x, MAX_GRID_X), ("y", y, GRID_YZ_LIMIT), ("z", z, GRID_YZ_LIMIT)):
        if count > limit:
            raise RuntimeError(f"{_qualified(op)}: the launch needs {count} programs along grid axis {axis}, "
                               f"above CUDA's limit of {limit}")
    return x, y, z


@triton.jit
def unfold_pid(chunks, span, pid_folded):
    """(index along x, index along the folded axis) of this program, for a grid from `fold`:
    x = index * chunks + chunk, folded index = chunk * span + pid_folded (past the end in the last
    chunk: the kernel returns early)."""
    pid = tl.program_id(0)
    return pid // chunks, (pid % chunks) * span + pid_folded
