"""Reports of a run: terminal table, long-format CSV, JSON, markdown summary (plots: plots.py).

Rows come from runner.Row (one per case × provider); every report groups them by
op / mode / device / dtype and puts the providers of a shape side by side.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from bigkernels.bench.providers import AUTO, TORCH, TORCH_COMPILE
from bigkernels.bench.runner import COLUMNS, Row, RunResult, provider_names

CSV_NAME = "results.csv"
JSON_NAME = "results.json"
MARKDOWN_NAME = "summary.md"

GroupKey = tuple[str, str, str, str]  # op, mode, device, dtype


def group_rows(rows: Iterable[Row]) -> dict[GroupKey, dict[str, dict[str, Row]]]:
    """{(op, mode, device, dtype): {shape: {provider: row}}}, in run order."""
    groups: dict[GroupKey, dict[str, dict[str, Row]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        groups[(row.op, row.mode, row.device, row.dtype)][row.shape][row.provider] = row
    return groups


def format_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "error"
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.3g}"


def format_speedup(x: Optional[float]) -> str:
    return "" if x is None else f"×{x:.2f}"


def _throughput(row: Row) -> str:
    """GFLOP/s on the CPU, TFLOP/s on a GPU (where GFLOP/s would be 4-6 digit numbers)."""
    if row.gflop_per_s is None:
        return ""
    return f"{row.gflop_per_s / 1e3:.1f} TFLOP/s" if row.device == "cuda" else f"{row.gflop_per_s:.1f} GFLOP/s"


def _fastest(by_provider: dict[str, Row]) -> Optional[Row]:
    ok = [r for r in by_provider.values() if r.median_ms is not None]
    return min(ok, key=lambda r: r.median_ms) if ok else None


def _best_bigkernels(by_provider: dict[str, Row]) -> Optional[Row]:
    """The automatic choice (what a user gets) where it ran; else the fastest forced backend."""
    auto = by_provider.get(AUTO)
    if auto is not None and auto.median_ms is not None:
        return auto
    return _fastest({n: r for n, r in by_provider.items() if n.startswith("bigkernels")})


def tuning_summary(rows: Iterable[Row]) -> Optional[str]:
    """One line on the automatic choice over the run: in how many cases it ran our kernel (and beat
    torch eager), ran the stock op, and fell below 0.97x stock (timing noise aside, it should not)."""
    autos = [r for r in rows if r.provider == AUTO and r.status == "ok" and r.speedup_vs_torch is not None]
    if not autos:
        return None
    ours = [r for r in autos if r.choice and "=stock" not in r.choice]
    winning = [r for r in ours if r.speedup_vs_torch >= 1.0]
    below = [r for r in autos if r.speedup_vs_torch < 0.97]
    text = (f"automatic choice (bigkernels): our kernel in {len(ours)} of {len(autos)} cases "
            f"({len(winning)} of them at >= 1.0x torch), the stock op in {len(autos) - len(ours)}; "
            f"speedup {min(r.speedup_vs_torch for r in autos):.2f}-{max(r.speedup_vs_torch for r in autos):.2f}x, "
            f"{len(below)} below 0.97x")
    if below:
        text += " (" + "; ".join(f"{r.op} {r.mode} {r.shape} {r.speedup_vs_torch:.2f}x [{r.choice}]" for r in below) + ")"
    return text


# ---------------------------------------------------------------------------------- terminal table
def _align(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    # First column left-aligned (shape), the numbers right-aligned.
    return [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
        for line in lines
    ]


def _shapes_text(failed: list[str], total: int) -> str:
    """The shapes a provider failed at with one message: named when one, else counted."""
    if len(failed) == 1:
        return failed[0]
    return f"all {total} shapes" if len(failed) == total else f"{len(failed)} shapes ({failed[0]} ... {failed[-1]})"


def format_table(result: RunResult) -> str:
    """Per op/mode/device/dtype: one line per shape, each provider's median ms and speedup vs torch
    eager side by side, the fastest named; then the error of each provider and any failures (one
    line per provider and message, however many shapes it failed at)."""
    out: list[str] = []
    providers = provider_names(result.rows)
    for (op, mode, device, dtype), shapes in group_rows(result.rows).items():
        present = [p for p in providers if any(p in by_p for by_p in shapes.values())]
        out.append(f"{op}  {mode}  {device}  {dtype}    median ms  (×: speedup vs torch eager, >1 is faster)")
        lines = [["shape", "GFLOP"] + present + ["fastest", "its throughput", "bigkernels chose"]]
        failures: dict[tuple[str, str], list[str]] = defaultdict(list)  # (provider, error) -> shapes
        worst_err: dict[str, float] = defaultdict(float)
        for shape, by_provider in shapes.items():
            any_row = next(iter(by_provider.values()))
            line = [shape, f"{any_row.flops / 1e9:.3g}"]
            for p in present:
                row = by_provider.get(p)
                line.append(f"{format_ms(row.median_ms)} {format_speedup(row.speedup_vs_torch)}".strip() if row else "-")
                if row and row.status == "error":
                    failures[(p, row.error)].append(shape)
                if row and row.max_abs_err is not None:
                    worst_err[p] = max(worst_err[p], row.max_abs_err)
            fastest = _fastest(by_provider)
            auto = by_provider.get(AUTO)
            line += [fastest.provider if fastest else "-", _throughput(fastest) if fastest else "",
                     auto.choice if auto else ""]
            lines.append(line)
        out += ["  " + line for line in _align(lines)]
        if worst_err:
            out.append("  max abs err vs float64 reference: " + " · ".join(f"{p} {e:.2g}" for p, e in worst_err.items()))
        out += [f"  FAILED {p} @ {_shapes_text(failed, len(shapes))}: {error}" for (p, error), failed in failures.items()]
        out.append("")
    summary = tuning_summary(result.rows)
    if summary:
        out.append(summary)
    if result.skipped:
        out.append("not run: " + "; ".join(f"{p} ({why})" for p, why in sorted(result.skipped.items())))
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------- CSV and JSON
def _cell(value: object) -> object:
    return "" if value is None else value


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """Long format: one line per case × provider, columns = runner.COLUMNS."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in dataclasses.asdict(row).items()})


def run_metadata(result: RunResult, meta: dict[str, object]) -> dict[str, object]:
    rows = result.rows
    return {
        **meta,
        "wall_s": round(result.wall_s, 2),
        "cases": len({r.case_id for r in rows}),
        "rows": len(rows),
        "timing_methods": sorted({r.timing_method for r in rows if r.timing_method}),
        "peak_mem_methods": sorted({r.peak_mem_method for r in rows if r.peak_mem_method}),
        "skipped_providers": result.skipped,
        "columns": list(COLUMNS),
    }


def write_json(result: RunResult, meta: dict[str, object], path: Path) -> None:
    payload = {"metadata": run_metadata(result, meta), "rows": [dataclasses.asdict(r) for r in result.rows]}
    path.write_text(json.dumps(payload, indent=1) + "\n")


# ---------------------------------------------------------------------------------- markdown
def format_markdown(result: RunResult, meta: dict[str, object]) -> str:
    """A summary a README or benchmarks/results/ can embed: what was run on what, then per group
    the providers' median ms and bigkernels' speedup over torch eager and torch.compile."""
    info = run_metadata(result, meta)
    out = [
        "## Benchmark summary",
        "",
        f"- device: {info['device_name']}",
        f"- versions: bigkernels {info['bigkernels_version']} (commit {info['git_commit'] or 'unknown'}), "
        f"torch {info['torch_version']}, triton {info['triton_version'] or 'not installed'}, python {info['python_version']}",
        f"- command: `{info['command']}`",
        f"- run: {info['timestamp']}, {info['cases']} cases, {info['wall_s']:.0f} s",
        f"- timing: {'; '.join(info['timing_methods'])}; peak memory: {'; '.join(info['peak_mem_methods'])}",
        f"- other processes' CPU load: {info.get('busy_cores_before', '?')} cores busy before the run, "
        f"{info.get('busy_cores_after', '?')} after",
        "- speedup = other provider's median / bigkernels' median (the automatic choice, `bigkernels`, where it ran; "
        "else the fastest forced backend): > 1 means bigkernels is faster; `chose` = the kernel the chooser ran",
        "",
    ]
    providers = provider_names(result.rows)
    for (op, mode, device, dtype), shapes in group_rows(result.rows).items():
        present = [p for p in providers if any(p in by_p for by_p in shapes.values())]
        out += [f"### {op} · {mode} · {device} · {dtype}", ""]
        header = ["shape"] + [f"{p} ms" for p in present] + ["vs torch", "vs torch.compile", "bigkernels max err", "chose"]
        out += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for shape, by_provider in shapes.items():
            best = _best_bigkernels(by_provider)
            cells = [shape] + [format_ms(by_provider[p].median_ms) if p in by_provider else "-" for p in present]
            for baseline in (TORCH, TORCH_COMPILE):
                other = by_provider.get(baseline)
                ok = best and other and other.median_ms is not None
                cells.append(f"{other.median_ms / best.median_ms:.2f}x" if ok else "-")
            cells.append(f"{best.max_abs_err:.1e}" if best and best.max_abs_err is not None else "-")
            cells.append(best.choice if best and best.choice else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    summary = tuning_summary(result.rows)
    if summary:
        out += [summary[0].upper() + summary[1:] + ".", ""]
    if result.skipped:
        out += ["Not run: " + "; ".join(f"{p} ({why})" for p, why in sorted(result.skipped.items())), ""]
    return "\n".join(out)


def write_markdown(result: RunResult, meta: dict[str, object], path: Path) -> None:
    path.write_text(format_markdown(result, meta))
