"""The backends, which of them can run where, and the user's override.

  "cpu"        C++ kernels in bigkernels._C (CPU tensors)
  "cuda"       CUDA C++ kernels in bigkernels._C (CUDA tensors)
  "triton"     Triton kernels (CUDA tensors; CPU tensors under the Triton interpreter)
  "reference"  plain PyTorch from bigkernels.reference (any device; slow, always correct)

Which kernel runs a call is decided in one place, bigkernels/_chooser.py (measured on this machine,
the stock op a candidate too); this module tells it what the user forced and what is available.
Force a backend with the environment variable BIGKERNELS_BACKEND (read once, at import) or, per block
of code, `with bigkernels.use_backend(...)`. A forced backend that cannot run the call raises
BackendUnavailable saying why; it is never ignored.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from typing import Iterator

import torch

from bigkernels import _extension

BACKENDS = ("cpu", "cuda", "triton", "reference")

# Ops with Triton kernels (bigkernels/triton/<op>.py). Which kernel runs is the chooser's business
# (each op's candidates, bigkernels/ops/<op>.py); CUDA C++ kernels are asked of the dispatcher.
TRITON_OPS = frozenset({"lstm_cell", "lstm", "attention", "conv", "lstm_ext"})


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this call (wrong device, not built, not installed)."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


_ENV_BACKEND = os.environ.get("BIGKERNELS_BACKEND") or None
if _ENV_BACKEND is not None:
    _check_name(_ENV_BACKEND, "BIGKERNELS_BACKEND")

# A plain list, not a ContextVar: torch.compile traces a module-level list without a graph break.
_override_stack: list[str] = []

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend `name` ("cpu", "cuda", "triton" or "reference").

    Overrides BIGKERNELS_BACKEND; nests. Under torch.compile the choice is made when the function is
    traced, so enter the block outside the compiled function.
    """
    _override_stack.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override_stack.pop()


def requested() -> str | None:
    """The backend forced by use_backend or BIGKERNELS_BACKEND, or None for automatic choice."""
    return _override_stack[-1] if _override_stack else _ENV_BACKEND


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def has_cuda_kernel(op: str, namespace: str = "bigkernels") -> bool:
    """Whether `namespace::op` has a kernel registered for CUDA tensors (csrc/cuda/*_binding.cpp), asked
    of the dispatcher rather than a hand-kept list, so it cannot go stale."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{op}", "CUDA")
    except RuntimeError:  # no such operator (e.g. bigkernels._C not loaded)
        return False


def unavailable_reason(backend: str, op: str, device: torch.device) -> str | None:
    """Why `backend` cannot run `op` on `device`, or None if it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got tensors on {device}"
        return _extension.UNAVAILABLE_REASON
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, got tensors on {device}"
        if not _extension.AVAILABLE:
            return _extension.UNAVAILABLE_REASON
        if not _extension.WITH_CUDA:
            return "bigkernels._C was built without CUDA kernels (CPU-only torch or no nvcc at build time)"
        if not has_cuda_kernel(op):
            return f"op {op} has no CUDA C++ kernel (use the triton backend, or none to choose automatically)"
        return None
    # triton
    if op not in TRITON_OPS:
        return f"op {op} has no Triton kernel"
    if not TRITON_INSTALLED:
        return "Triton is not installed (pip install triton)"
    if device.type == "cpu" and not triton_interpreting():
        return "Triton kernels run on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing bigkernels"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels take CUDA tensors, got tensors on {device}"
    return None
