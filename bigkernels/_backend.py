"""Backend choice, in one place.

Every op asks `resolve(op, device)` once per call, and gets one of:
  "cpu"        C++ kernels in bigkernels._C (CPU tensors)
  "cuda"       CUDA C++ kernels in bigkernels._C (CUDA tensors)
  "triton"     Triton kernels (CUDA tensors; CPU tensors under the Triton interpreter)
  "reference"  plain PyTorch from bigkernels.reference (any device; slow, always correct)

Automatic choice: CPU tensors -> "cpu"; CUDA tensors -> the fastest GPU backend built for that op
(GPU_PREFERENCE); anything else -> "reference". Override with the environment variable
BIGKERNELS_BACKEND (read once, at import) or, per block of code, `with bigkernels.use_backend(...)`.
An override that cannot run the call raises BackendUnavailable saying why; it is never ignored.
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

# GPU backends that implement each op, fastest first (measured: see benchmarks/results/).
GPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "lstm_cell": ("cuda", "triton"),
    "lstm": ("cuda", "triton"),
    # ---- attention ----
    "attention": ("triton",),
    # conv (issue 5): Triton implicit GEMM; depthwise calls are routed in bigkernels/ops/conv.py.
    "conv": ("triton",),
    # lstm_ext (layer norm / zoneout): Triton only; the "cuda" backend runs the Triton op too.
    "lstm_ext": ("triton",),
    # ---- conv_depthwise: direct CUDA kernels; forcing "triton" runs the Triton conv with groups = C ----
    "conv_depthwise": ("cuda", "triton"),
}


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
_warned_reference_fallback = False


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
    if op not in GPU_PREFERENCE or "triton" not in GPU_PREFERENCE[op]:
        return f"op {op} has no Triton kernel"
    if not TRITON_INSTALLED:
        return "Triton is not installed (pip install triton)"
    if device.type == "cpu" and not triton_interpreting():
        return "Triton kernels run on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing bigkernels"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels take CUDA tensors, got tensors on {device}"
    return None


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs `op` for tensors on `device`."""
    forced = requested()
    if forced is not None:
        reason = unavailable_reason(forced, op, device)
        if reason is not None:
            raise BackendUnavailable(f"bigkernels backend {forced!r} cannot run {op}: {reason}")
        return forced
    if device.type == "cpu":
        if _extension.AVAILABLE:
            return "cpu"
        _warn_reference_fallback(op)
        return "reference"
    if device.type == "cuda":
        for backend in GPU_PREFERENCE.get(op, ()):
            if unavailable_reason(backend, op, device) is None:
                return backend
        _warn_reference_fallback(op)
    return "reference"


def _warn_reference_fallback(op: str) -> None:
    global _warned_reference_fallback
    if not _warned_reference_fallback:
        _warned_reference_fallback = True
        warnings.warn(
            f"bigkernels: no compiled kernel can run {op} here, using the (slow) reference backend. "
            f"{_extension.UNAVAILABLE_REASON or ''}",
            RuntimeWarning,
            stacklevel=3,
        )


def describe(op: str) -> dict[str, str]:
    """For `bigkernels info`: the backend `op` would use on each device type present here."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    out = {}
    for device in devices:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[device.type] = resolve(op, device)
        except BackendUnavailable as exc:
            out[device.type] = f"error: {exc}"
    return out
