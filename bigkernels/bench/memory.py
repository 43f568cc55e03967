"""Peak memory of one call, beyond what was allocated before it (inputs, weights).

CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before.
CPU:  torch has no CPU allocator statistics, but its profiler records every allocation and free
      made through the CPU allocator (profile_memory=True); the running sum's maximum is the peak.
      Memory allocated outside it (oneDNN/MKL scratch, allocations on intra-op worker threads) is
      not seen. If the profiler API is unusable, the resident-set-size delta is used instead (coarse:
      the C allocator may reuse freed pages), and the method column says so.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

import torch

CUDA_METHOD = "cuda max_memory_allocated delta"
CPU_PROFILER_METHOD = "torch CPU allocator (profiler)"
RSS_METHOD = "process RSS delta"

MIB = 2**20


def peak_mib(call: Callable[[], object], device: str) -> tuple[float | None, str]:
    """(peak MiB above the starting point during call(), how it was measured)."""
    if device == "cuda":
        return _cuda_peak(call), CUDA_METHOD
    with _native_stderr_silenced():
        with torch.autograd.profiler.profile(profile_memory=True) as prof:
            result = call()
        del result
    try:
        return _profiled_peak(prof), CPU_PROFILER_METHOD
    except (AttributeError, TypeError):  # the profiler's result API moved: measure again, coarsely
        return _rss_delta(call), RSS_METHOD


def _cuda_peak(call: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / MIB


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Kineto prints a line to the process's stderr on every profiler start/stop, which would
    break the progress bar; redirect file descriptor 2 (not just sys.stderr) while it runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profiled_peak(prof: torch.autograd.profiler.profile) -> float:
    events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()  # negative for a free
        peak = max(peak, running)
    return peak / MIB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_delta(call: Callable[[], object]) -> float | None:
    try:
        before = _rss_bytes()
        result = call()
        after = _rss_bytes()
    except OSError:  # no /proc (not Linux)
        return None
    del result
    return max(after - before, 0) / MIB
