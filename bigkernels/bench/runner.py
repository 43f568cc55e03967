"""Runs cases and turns measurements into rows: one Row per case × provider.

Per case: fresh seeded inputs; the float64 reference; per provider a first call (compilation and
lazy initialisation happen here, outside any timing) whose outputs are checked against the
reference; one call measured for peak memory; then all providers timed together, interleaved
(timing.py). A provider that fails anywhere gets a row with status "error" and the message; the
run goes on.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from bigkernels import _chooser
from bigkernels.bench import memory, timing
from bigkernels.bench.cases import Case, Outputs, dtype_name, get_op
from bigkernels.bench.providers import TORCH

ERROR_CHARS = 300  # keep the CSV readable; the first line of a compile error says what failed

# Progress callback: (cases done, cases in all, case running, what it is doing now).
Progress = Callable[[int, int, Case, str], None]


@dataclass
class Row:
    """One case × provider. The field order is the CSV column order."""

    case_id: str
    op: str
    mode: str
    device: str
    dtype: str
    shape: str
    provider: str
    status: str  # "ok" or "error"
    error: str
    median_ms: Optional[float]
    p20_ms: Optional[float]
    p80_ms: Optional[float]
    samples: Optional[int]
    timing_method: str
    flops: int
    bytes: int
    gflop_per_s: Optional[float]  # tables show TFLOP/s for CUDA rows
    gb_per_s: Optional[float]
    speedup_vs_torch: Optional[float]  # torch eager median / this median: > 1 is faster than stock
    max_abs_err: Optional[float]  # vs float64 reference: outputs, plus all gradients in bwd modes
    peak_mem_mib: Optional[float]
    peak_mem_method: str
    # The kernel the chooser ran, per op, on the provider's first call ("lstm=cpu.fused"): for
    # "bigkernels" the tuner's pick on this machine, for "bigkernels[<backend>]" the static heuristic.
    choice: str = ""
    # Run metadata (metadata.collect), repeated so that every row stands alone.
    device_name: str = ""
    torch_version: str = ""
    triton_version: str = ""
    bigkernels_version: str = ""
    git_commit: str = ""
    timestamp: str = ""


COLUMNS = tuple(f.name for f in dataclasses.fields(Row))
RUN_FIELDS = COLUMNS[COLUMNS.index("device_name"):]


@dataclass
class RunResult:
    rows: list[Row]
    skipped: dict[str, str] = field(default_factory=dict)  # provider -> why it was not run
    wall_s: float = 0.0


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return (lines[0] if lines else "")[:ERROR_CHARS]


def _describe_error(exc: BaseException) -> str:
    return _first_line(f"{type(exc).__name__}: {exc}")


def max_abs_error(outputs: Outputs, expected: Outputs) -> float:
    """Largest |output - reference| over every output tensor, compared in float64."""
    if len(outputs) != len(expected):
        raise RuntimeError(f"provider returned {len(outputs)} outputs, the reference {len(expected)}")
    worst = 0.0
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        if out.shape != ref.shape:
            raise RuntimeError(f"output {i} has shape {tuple(out.shape)}, the reference {tuple(ref.shape)}")
        if out.numel():
            diff = (out.detach().to(device=ref.device, dtype=torch.float64) - ref).abs().max().item()
            if math.isnan(diff):  # max() would hide it
                return diff
            worst = max(worst, diff)
    return worst


def run_case(
    case: Case,
    full: bool,
    budget: timing.Budget,
    meta: dict[str, object],
    only_providers: Sequence[str] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[list[Row], dict[str, str]]:
    """Rows for every provider of `case`, and {skipped provider: reason}."""
    op = get_op(case.op)
    providers, skipped = op.providers(case, full)
    if only_providers:
        providers = [p for p in providers if p.name in only_providers]
    names = [p.name for p in providers]
    errors: dict[str, str] = {}
    max_err: dict[str, float] = {}
    peaks: dict[str, tuple[Optional[float], str]] = {}
    choices: dict[str, str] = {}
    steps = {}
    try:
        progress("inputs and float64 reference")
        inputs = op.make_inputs(case)
        expected = op.reference(case, inputs)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the largest shapes
        errors = {name: f"case set-up failed: {_describe_error(exc)}" for name in names}
        providers = []
    for provider in providers:
        try:
            progress(f"{provider.name}: first call and check")
            step = provider.build(case, inputs)
            _chooser.last_choice.clear()
            max_err[provider.name] = max_abs_error(step.next_call()(), expected)  # tunes, where it tunes
            choices[provider.name] = " ".join(f"{o}={c}" for o, c in sorted(_chooser.last_choice.items()))
            progress(f"{provider.name}: peak memory")
            peaks[provider.name] = memory.peak_mib(step.next_call(), case.device)
            steps[provider.name] = step
        except Exception as exc:  # noqa: BLE001 - compile failures and kernel errors go in the row
            errors[provider.name] = _describe_error(exc)
    progress(f"timing {len(steps)} providers")
    timings, timing_errors = timing.time_steps(steps, case.device, budget)
    errors.update({name: _first_line(text) for name, text in timing_errors.items()})
    del steps
    if case.device == "cuda":
        torch.cuda.empty_cache()

    flops, nbytes = op.flops(case), op.bytes(case)
    base = timings.get(TORCH)
    rows = []
    for name in names:
        t = timings.get(name) if name not in errors else None
        peak, peak_method = peaks.get(name, (None, ""))
        rows.append(
            Row(
                case_id=case.id,
                op=case.op,
                mode=case.mode,
                device=case.device,
                dtype=dtype_name(case.dtype),
                shape=case.shape_str,
                provider=name,
                status="ok" if t is not None else "error",
                error=errors.get(name, ""),
                median_ms=t.median_ms if t else None,
                p20_ms=t.p20_ms if t else None,
                p80_ms=t.p80_ms if t else None,
                samples=t.samples if t else None,
                timing_method=t.method if t else "",
                flops=flops,
                bytes=nbytes,
                gflop_per_s=flops / (t.median_ms * 1e-3) / 1e9 if t else None,
                gb_per_s=nbytes / (t.median_ms * 1e-3) / 1e9 if t else None,
                speedup_vs_torch=base.median_ms / t.median_ms if t and base else None,
                max_abs_err=max_err.get(name),
                peak_mem_mib=peak,
                peak_mem_method=peak_method,
                choice=choices.get(name, ""),
                **{k: meta.get(k, "") for k in RUN_FIELDS},
            )
        )
    return rows, skipped


def run_cases(
    cases: Sequence[Case],
    full: bool,
    budget: timing.Budget,
    meta: dict[str, object],
    only_providers: Sequence[str] | None = None,
    progress: Optional[Progress] = None,
) -> RunResult:
    start = time.perf_counter()
    result = RunResult(rows=[])
    for index, case in enumerate(cases):
        report = (lambda what, i=index, c=case: progress(i, len(cases), c, what)) if progress else (lambda _: None)
        rows, skipped = run_case(case, full, budget, meta, only_providers, report)
        result.rows.extend(rows)
        result.skipped.update(skipped)
    if progress and cases:
        progress(len(cases), len(cases), cases[-1], "done")
    result.wall_s = time.perf_counter() - start
    return result


def provider_names(rows: Iterable[Row]) -> list[str]:
    """Providers in first-seen order (bigkernels backends first, as the op lists them)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(row.provider)
    return list(seen)
