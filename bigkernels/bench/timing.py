"""Timing of the providers of one case, interleaved so that drift (thermal, turbo, a noisy
neighbour) hits them all alike.

CPU:  warm-up, then single calls timed with time.perf_counter, in round-robin rounds: every round
      runs each provider, the fast ones several calls in a row so each gets about `target_s` in all.
CUDA: triton.testing.do_bench (median, p20, p80; it flushes L2 and syncs) in `GPU_ROUNDS`
      interleaved rounds, the reported quantiles being the median over rounds. Without Triton, or
      for steps that need untimed set-up per call (mode bwd), CUDA events around each call, in the
      same rounds as the CPU (no L2 flush there).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from bigkernels.bench.cases import Step

GPU_ROUNDS = 3


@dataclass(frozen=True)
class Budget:
    """How long to measure. target_s is per provider per case; min_samples wins for slow calls."""

    target_s: float = 0.2
    min_samples: int = 3
    max_samples: int = 10_000
    warmup_s: float = 0.02


QUICK = Budget()
FULL = Budget(target_s=1.0, min_samples=10, warmup_s=0.1)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int | None  # timed calls; None where do_bench chose the count itself
    method: str


Clock = Callable[[Step], float]  # runs one call of the step, returns its duration in seconds


def _perf_counter_clock(step: Step) -> float:
    call = step.next_call()
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _cuda_event_clock(step: Step) -> float:
    call = step.next_call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _summary(seconds: list[float], method: str) -> Timing:
    ms = np.asarray(seconds) * 1e3
    p50, p20, p80 = np.quantile(ms, [0.5, 0.2, 0.8])
    return Timing(float(p50), float(p20), float(p80), len(ms), method)


def _warm_up(step: Step, clock: Clock, budget: Budget) -> float:
    """Run untimed calls for budget.warmup_s (at least 3 unless they are slow); return the fastest,
    the least disturbed estimate of one call's duration."""
    durations = [clock(step)]
    start = time.perf_counter()
    while len(durations) < 100:
        elapsed = time.perf_counter() - start
        if elapsed >= budget.warmup_s and (len(durations) >= 3 or elapsed >= budget.target_s):
            break
        durations.append(clock(step))
    return max(min(durations), 1e-7)


def _interleaved(steps: dict[str, Step], clock: Clock, budget: Budget, errors: dict[str, str]) -> dict[str, list[float]]:
    """Per-call samples for every step. A step that raises is dropped and its error recorded."""
    estimate: dict[str, float] = {}
    for name, step in steps.items():
        try:
            estimate[name] = _warm_up(step, clock, budget)
        except Exception as exc:  # noqa: BLE001 - a failing provider must not stop the others
            errors[name] = f"{type(exc).__name__}: {exc}"
    if not estimate:
        return {}
    wanted = {
        name: int(min(max(budget.target_s / t, budget.min_samples), budget.max_samples))
        for name, t in estimate.items()
    }
    # As many rounds as the slowest provider has samples; faster ones take several per round.
    rounds = min(wanted.values())
    per_round = {name: max(1, n // rounds) for name, n in wanted.items()}
    # The estimates come from few calls: on a loaded machine (another process competing for the
    # cores makes OpenMP threads wait a whole time slice) the real calls can be 100x slower. Stop
    # after 3x the planned time, once every provider has min_samples.
    deadline = time.perf_counter() + 3 * budget.target_s * len(estimate)
    samples: dict[str, list[float]] = {name: [] for name in estimate}
    for _ in range(rounds):
        for name in list(samples):
            try:
                for _ in range(per_round[name]):
                    samples[name].append(clock(steps[name]))
                    if len(samples[name]) >= budget.min_samples and time.perf_counter() > deadline:
                        break
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}"
                del samples[name]
        if time.perf_counter() > deadline and all(len(s) >= budget.min_samples for s in samples.values()):
            break
    return samples


def _do_bench_interleaved(steps: dict[str, Step], budget: Budget, errors: dict[str, str]) -> dict[str, Timing]:
    from triton.testing import do_bench

    rep_ms = max(budget.target_s * 1e3 / GPU_ROUNDS, 5.0)
    warmup_ms = max(budget.warmup_s * 1e3, 5.0)
    per_round: dict[str, list[list[float]]] = {name: [] for name in steps}
    for _ in range(GPU_ROUNDS):
        for name in list(per_round):
            try:
                per_round[name].append(
                    list(do_bench(steps[name].call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
                )
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}"
                del per_round[name]
    out = {}
    for name, rounds in per_round.items():
        p50, p20, p80 = (float(np.median([r[i] for r in rounds])) for i in range(3))
        out[name] = Timing(p50, p20, p80, None, f"triton.testing.do_bench, median of {GPU_ROUNDS} rounds")
    return out


def time_steps(steps: dict[str, Step], device: str, budget: Budget = QUICK) -> tuple[dict[str, Timing], dict[str, str]]:
    """Time each provider's step on `device`; returns ({provider: Timing}, {provider: error})."""
    errors: dict[str, str] = {}
    if device == "cuda":
        from bigkernels import _backend

        plain = {n: s for n, s in steps.items() if s.fresh is None}
        timings: dict[str, Timing] = {}
        if _backend.TRITON_INSTALLED and plain:
            timings.update(_do_bench_interleaved(plain, budget, errors))
            rest = {n: s for n, s in steps.items() if n not in plain}
        else:
            rest = steps
        samples = _interleaved(rest, _cuda_event_clock, budget, errors)
        timings.update({n: _summary(s, "CUDA events, interleaved rounds") for n, s in samples.items()})
        return timings, errors
    samples = _interleaved(steps, _perf_counter_clock, budget, errors)
    return {n: _summary(s, "time.perf_counter, interleaved rounds") for n, s in samples.items()}, errors
