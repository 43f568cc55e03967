"""`bigkernels info`: what this installation holds, each op's candidates, and what the tuner chose."""
from __future__ import annotations

import importlib.util
import platform

import torch

from bigkernels import _backend, _chooser, _extension, _tune_cache
from bigkernels._version import __version__


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
        "tuning": ("on" if _chooser.tuning_enabled() else "off") + " (BIGKERNELS_TUNE)",
        "tuning cache": str(_tune_cache.cache_path()),
        "ops": _candidates(),
    }


def _candidates() -> dict[str, dict[str, str]]:
    """Per op and device type present: the candidates an automatic call may run, and which of them
    the static heuristic would pick with tuning off (not the tuned choice: that depends on the call)."""
    import bigkernels.ops  # noqa: F401  (declares every op's chooser)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    out: dict[str, dict[str, str]] = {}
    for op, chooser in _chooser.Chooser.registry.items():
        out[op] = {}
        for device in devices:
            names = [c.name for c in chooser.candidates if c.backend not in ("reference",)
                     and (c.backend == _chooser.STOCK or _backend.unavailable_reason(c.backend, c.kernel_op or op, device) is None)
                     and not (c.backend == "triton" and device.type != "cuda")]
            out[op][device.type] = ", ".join(names) or "-"
    return out


def main(argv: list[str] | None = None) -> int:
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "ops":
            continue
        print(f"{key:<{width}}  {value}")
    print("candidates per op (automatic calls; the tuner picks among them per call shape):")
    for op, per_device in info["ops"].items():
        print(f"  {op:<{width - 2}}  " + "; ".join(f"{dev}: {names}" for dev, names in per_device.items()))
    entries = _chooser.entries()
    print(f"tuned choices ({len(entries)} in the cache file and this process):")
    limit = None if argv and "--all" in argv else 40
    for key in sorted(entries)[:limit]:
        entry = entries[key]
        times = ", ".join(f"{name} {ms:.3g}" for name, ms in sorted(entry.get("ms", {}).items(), key=lambda kv: kv[1]))
        rejected = "; ".join(f"{name}: {why}" for name, why in entry.get("rejected", {}).items())
        print(f"  {key}\n      -> {entry['choice']} ({entry.get('how', '?')}{'; ms: ' + times if times else ''}"
              f"{'; rejected: ' + rejected if rejected else ''})")
    if limit is not None and len(entries) > limit:
        print(f"  ... {len(entries) - limit} more (bigkernels info --all)")
    return 0
