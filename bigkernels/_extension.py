"""Loads the compiled extension bigkernels._C, or records in one line why it is not usable.

`import bigkernels` never fails because of the extension: the `reference` backend (and `triton`,
where Triton is installed) keep working without it, and anything that needs it raises
ExtensionUnavailable with the reason and the rebuild command.
"""
from __future__ import annotations

import importlib
import warnings

import torch

REBUILD_COMMAND = "pip install --no-build-isolation --no-deps --force-reinstall -e ."


class ExtensionUnavailable(RuntimeError):
    """The compiled kernels (bigkernels._C) are missing or were built for another torch."""


def _torch_release(version: str) -> str:
    return version.split("+")[0]


def _load() -> tuple[bool, str | None, object | None]:
    try:
        build_info = importlib.import_module("bigkernels._build_info")
    except ImportError:
        build_info = None
    # Compare versions before loading the library: a library built against another torch fails
    # with an undefined C++ symbol, or worse, loads and misbehaves.
    if build_info is not None and build_info.TORCH_VERSION != torch.__version__:
        return False, (
            f"bigkernels._C was built for torch {build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild with: {REBUILD_COMMAND}"
        ), build_info
    try:
        importlib.import_module("bigkernels._C")
    except ImportError as exc:
        text = str(exc)
        if "undefined symbol" in text or "version" in text.lower():
            reason = (
                f"bigkernels._C does not match the installed torch {torch.__version__} ({text.splitlines()[0]}); "
                f"rebuild with: {REBUILD_COMMAND}"
            )
        else:
            reason = f"bigkernels._C is not built ({text.splitlines()[0]}); build it with: {REBUILD_COMMAND}"
        return False, reason, build_info
    return True, None, build_info


AVAILABLE, UNAVAILABLE_REASON, BUILD_INFO = _load()
WITH_CUDA = bool(AVAILABLE and BUILD_INFO is not None and BUILD_INFO.WITH_CUDA)
CUDA_ARCHS = (BUILD_INFO.CUDA_ARCHS if WITH_CUDA else "") if BUILD_INFO is not None else ""

if not AVAILABLE:
    warnings.warn(
        f"bigkernels: compiled kernels unavailable, only the reference and Triton backends work. "
        f"{UNAVAILABLE_REASON}",
        RuntimeWarning,
        stacklevel=2,
    )


def require() -> None:
    """Raise ExtensionUnavailable (one line: what is wrong and how to rebuild) if _C is unusable."""
    if not AVAILABLE:
        raise ExtensionUnavailable(UNAVAILABLE_REASON)
