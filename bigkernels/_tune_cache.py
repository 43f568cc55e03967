"""The chooser's on-disk memory: which candidate won each call key, on this machine, with these versions.

One JSON file per machine and versions under BIGKERNELS_CACHE_DIR (default ~/.cache/bigkernels, or
$XDG_CACHE_HOME/bigkernels): its name carries the CPU model and a hash of the fingerprint (CPU model,
ISA flags, bigkernels/torch/Triton versions), and the fingerprint is stored inside, so a file copied
from another machine, or left by another version, is recognised and ignored. GPU entries carry the GPU's
name and compute capability in their key (bigkernels/_chooser.py), so one file serves a machine with
several GPU models.

Never a crash: a corrupt or foreign file is ignored with one warning and rewritten by the next save;
an unwritable directory (read-only home, say) leaves the choices in memory with one warning. Writes
are atomic (a temporary file in the same directory, then os.replace) and merged under an advisory
lock, so two processes tuning at once both land their entries and never leave a torn file.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

FORMAT = 1
# ISA features that change which kernel wins (vector width, bf16/AMX units).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")

_warned: set[str] = set()


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"bigkernels tuning cache: {message}", RuntimeWarning, stacklevel=4)


def cache_dir() -> Path:
    explicit = os.environ.get("BIGKERNELS_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bigkernels"


@functools.lru_cache(maxsize=1)  # the CPU does not change under a running process
def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = "", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    present = set(value.split())
                    flags = [flag for flag in _ISA_FLAGS if flag in present]
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown-cpu", flags


def _version_of(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def fingerprint() -> dict[str, Any]:
    """What the cached timings depend on, besides the call key."""
    from bigkernels._version import __version__

    model, flags = _cpu_model_and_flags()
    return {
        "cpu": model,
        "isa": list(flags),
        "cpus": os.cpu_count(),
        "bigkernels": __version__,
        "torch": torch.__version__,
        "triton": _version_of("triton"),
    }


def cache_path(machine: Optional[dict[str, Any]] = None) -> Path:
    machine = machine or fingerprint()
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine["cpu"]).strip("-").lower()[:40] or "cpu"
    return cache_dir() / f"tune-{slug}-{digest}.json"


def _read(path: Path, machine: dict[str, Any], warn: bool) -> dict[str, Any]:
    """The entries of `path`, or {} if it is missing, corrupt or from another machine/version."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if warn:
            _warn_once("unreadable", f"cannot read {path} ({exc}); tuning again in this process")
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError("not a bigkernels tuning cache")
    except ValueError as exc:
        if warn:
            _warn_once("corrupt", f"{path} is corrupt ({str(exc)[:80]}); ignoring it, it will be rewritten")
        return {}
    if data.get("format") != FORMAT or data.get("machine") != machine:
        if warn:
            _warn_once("foreign", f"{path} was written by another machine or version "
                                  f"({data.get('machine', {}).get('cpu', '?')}); ignoring it, it will be rewritten")
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(v, dict) and isinstance(v.get("choice"), str)}


def load() -> dict[str, Any]:
    """The cached entries for this machine and versions ({} if none or unusable, with one warning)."""
    machine = fingerprint()
    return _read(cache_path(machine), machine, warn=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic replace alone keeps the file whole
        yield
        return
    with open(directory / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save(entries: dict[str, Any]) -> Optional[Path]:
    """Merge `entries` into the cache file (ours win on a shared key); the file's path, or None with
    one warning if it cannot be written."""
    machine = fingerprint()
    path = cache_path(machine)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent):
            merged = _read(path, machine, warn=False)
            merged.update(entries)
            payload = json.dumps({"format": FORMAT, "machine": machine, "entries": merged}, indent=1, sort_keys=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(payload)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as exc:
        _warn_once("unwritable", f"cannot write {path} ({exc}); choices are kept in memory for this process only. "
                                 "Set BIGKERNELS_CACHE_DIR to a writable directory to keep them.")
        return None
    return path
