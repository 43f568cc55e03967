"""`bigkernels info`: what this installation holds and which backend each op will use."""
from __future__ import annotations

import importlib.util
import platform

import torch

from bigkernels import _backend, _extension
from bigkernels._version import __version__

OPS = tuple(_backend.GPU_PREFERENCE)


def _triton_line() -> str:
    if not _backend.TRITON_INSTALLED:
        return "not installed"
    import triton

    if _backend.triton_interpreting():
        mode = "interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors"
    elif torch.cuda.is_available():
        mode = "compiled for the GPU"
    else:
        mode = "no GPU: kernels run only under the interpreter (TRITON_INTERPRET=1)"
    return f"{triton.__version__}, {mode}"


def collect() -> dict[str, object]:
    if _extension.AVAILABLE:
        compiled = "CPU" + (f", CUDA {_extension.BUILD_INFO.CUDA_VERSION} (archs {_extension.CUDA_ARCHS})" if _extension.WITH_CUDA else "")
    else:
        compiled = f"none: {_extension.UNAVAILABLE_REASON}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        device = f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "bigkernels": __version__,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})" if torch.version.cuda else torch.__version__,
        "triton": _triton_line(),
        "compiled kernels": compiled,
        "device": device,
        "backend override": _backend.requested() or "none (automatic)",
        "ops": {op: _backend.describe(op) for op in OPS},
    }


def main() -> int:
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "ops":
            continue
        print(f"{key:<{width}}  {value}")
    print("backend per op:")
    for op, per_device in info["ops"].items():
        print(f"  {op:<{width - 2}}  " + ", ".join(f"{dev} -> {b}" for dev, b in per_device.items()))
    return 0
