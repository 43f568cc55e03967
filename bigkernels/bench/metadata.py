"""What a benchmark run was measured on: device, versions, commit, time. Stored with every row,
because a number without its device and versions cannot be compared with anything."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from bigkernels import _backend
from bigkernels._version import __version__

_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
            else:
                model = platform.processor() or platform.machine()
    except OSError:
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} threads"


def triton_version() -> str:
    if not _backend.TRITON_INSTALLED:
        return ""
    import triton

    return triton.__version__


def git_commit() -> str:
    """Short commit of the source tree bigkernels runs from, "+dirty" if it has local changes;
    empty for an installed wheel or without git."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(_SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine since boot, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(interval_s: float = 0.5) -> float | None:
    """How many cores other processes keep busy, sampled while this one sleeps; None off Linux.

    On a shared CPU machine this is the first thing to check when timings look wrong: with torch's
    default one thread per core, one busy core can make every parallel region wait a time slice."""
    try:
        busy0, total0 = _cpu_jiffies()
        time.sleep(interval_s)
        busy1, total1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return None
    return round((busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1), 2)


def collect(device: str, command: str) -> dict[str, object]:
    """The per-run fields repeated in every CSV row, plus the command for the JSON and markdown."""
    return {
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "bigkernels_version": __version__,
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python_version": platform.python_version(),
        "command": command,
    }
