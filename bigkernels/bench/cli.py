"""`bigkernels bench` / `python -m bigkernels.bench`: run the benchmark cases, write the reports.

Exit status: 0 when every bigkernels provider ran (a failing peer such as torch.compile is recorded
in its row and does not fail the run), 1 when a bigkernels provider failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

from bigkernels.bench import cases as registry
from bigkernels.bench import metadata, plots, report, runner, timing
from bigkernels.bench.progress import ProgressBar

DEFAULT_OUT = "bench-out"
BUSY_WARNING_CORES = 0.25  # other processes' load above which CPU timings are flagged as noisy


class UsageError(ValueError):
    """Bad command-line values; the message is shown as is."""


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()] if text else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigkernels bench",
        description="Benchmark bigkernels' ops against stock torch (eager and torch.compile): "
        "time, throughput, speedup, error vs a float64 reference, peak memory.",
    )
    parser.add_argument("--op", help=f"comma-separated ops (default: all of {', '.join(registry.op_names())})")
    parser.add_argument(
        "--mode", help=f"comma-separated modes out of {', '.join(registry.MODES)} (default: {','.join(registry.DEFAULT_MODES)})"
    )
    parser.add_argument("--dtype", help="comma-separated dtypes, e.g. fp32,bf16 (default: the op's, per device and suite)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    suite = parser.add_mutually_exclusive_group()
    suite.add_argument("--quick", dest="full", action="store_false", help="the quick suite (default): a few minutes at most")
    suite.add_argument("--full", dest="full", action="store_true", help="the whole grid, more dtypes, longer timing")
    parser.set_defaults(full=False)  # else --quick's store_false would make full the default
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"directory for the reports (default: {DEFAULT_OUT}/)")
    parser.add_argument("--list", action="store_true", help="list the selected cases and providers, run nothing")
    parser.add_argument("--shape", help="keep the cases with these sizes, e.g. H=512 or B=16,H=128")
    parser.add_argument("--provider", help="comma-separated providers to run, e.g. torch,bigkernels[cpu] (default: all)")
    parser.add_argument("--target-time", type=float, help="seconds of timing per provider per case (quick 0.2, full 1)")
    parser.add_argument("--min-samples", type=int, help="timed calls per provider at least, however slow (quick 3, full 10)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU cases (default: torch's)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def _parse_shape_filter(text: str | None) -> dict[str, int]:
    out = {}
    for item in _split(text):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise UsageError(f"--shape takes KEY=INT[,KEY=INT...], got {item!r}")
        out[key.strip()] = int(value)
    return out


def select(args: argparse.Namespace) -> list[registry.Case]:
    """The cases the arguments ask for; UsageError when an argument names nothing that exists."""
    ops = _split(args.op) or list(registry.op_names())
    unknown = [op for op in ops if op not in registry.op_names()]
    if unknown:
        raise UsageError(f"unknown op {', '.join(map(repr, unknown))}; known ops: {', '.join(registry.op_names())}")
    modes = _split(args.mode) or list(registry.DEFAULT_MODES)
    bad_modes = [m for m in modes if m not in registry.MODES]
    if bad_modes:
        raise UsageError(f"unknown mode {', '.join(map(repr, bad_modes))}; expected {', '.join(registry.MODES)}")
    try:
        dtypes = [registry.parse_dtype(d) for d in _split(args.dtype)] or None
    except ValueError as exc:
        raise UsageError(f"--dtype: {exc}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available() and not args.list:  # listing needs no GPU
        raise UsageError("--device cuda: torch.cuda.is_available() is False on this machine")
    cases = registry.select_cases(ops, modes, dtypes, device, args.full, _parse_shape_filter(args.shape))
    if not cases:
        raise UsageError("no case matches these arguments (see --list)")
    return cases


def _budget(args: argparse.Namespace) -> timing.Budget:
    budget = timing.FULL if args.full else timing.QUICK
    if args.target_time is not None:
        budget = replace(budget, target_s=args.target_time, warmup_s=min(budget.warmup_s, args.target_time))
    if args.min_samples is not None:
        budget = replace(budget, min_samples=max(1, args.min_samples))
    return budget


def _check_providers(cases: list[registry.Case], full: bool, only: list[str]) -> str | None:
    """Why --provider cannot be honoured (a name that is unknown, or not runnable here), or None."""
    if not only:
        return None
    runnable, skipped = set(), {}
    for case in {(c.op, c.device): c for c in cases}.values():
        providers, why = registry.get_op(case.op).providers(case, full)
        runnable.update(p.name for p in providers)
        skipped.update(why)
    for name in only:
        if name in skipped and name not in runnable:
            return f"provider {name} is not run here: {skipped[name]}"
        if name not in runnable:
            return f"unknown provider {name!r}; providers here: {', '.join(sorted(runnable))}"
    return None


def _list(cases: list[registry.Case], full: bool, only: list[str]) -> None:
    seen_ops = set()
    for case in cases:
        print(case.id)
    for case in cases:
        if case.op in seen_ops:
            continue
        seen_ops.add(case.op)
        providers, skipped = registry.get_op(case.op).providers(case, full)
        names = [p.name for p in providers if not only or p.name in only]
        print(f"{case.op} providers on {case.device}: {', '.join(names)}")
        for name, why in skipped.items():
            print(f"  not run: {name} ({why})")
    print(f"{len(cases)} cases")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on errors; callers want a status
        return int(exc.code or 0)
    try:
        cases = select(args)
    except UsageError as exc:
        print(f"bigkernels bench: {exc}", file=sys.stderr)
        return 2
    only = _split(args.provider)
    problem = _check_providers(cases, args.full, only)
    if problem:
        print(f"bigkernels bench: {problem}", file=sys.stderr)
        return 2
    if args.list:
        _list(cases, args.full, only)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = metadata.collect(cases[0].device, "bigkernels bench " + shlex.join(argv))
    meta["busy_cores_before"] = metadata.busy_cores()
    result = runner.run_cases(cases, args.full, _budget(args), meta, only, progress=ProgressBar())
    meta["busy_cores_after"] = metadata.busy_cores()

    print(report.format_table(result))
    busy = max((b for b in (meta["busy_cores_before"], meta["busy_cores_after"]) if b is not None), default=0.0)
    if cases[0].device == "cpu" and busy >= BUSY_WARNING_CORES:
        print(
            f"warning: other processes kept {busy:.1f} of {os.cpu_count()} cores busy around this run; "
            "CPU timings are noisy (ratios within the run are still fair, each case's providers are interleaved). "
            "Rerun on an idle machine, or with --threads 1."
        )
    written = [out_dir / report.CSV_NAME, out_dir / report.JSON_NAME, out_dir / report.MARKDOWN_NAME]
    report.write_csv(result.rows, written[0])
    report.write_json(result, meta, written[1])
    report.write_markdown(result, meta, written[2])
    if not args.no_plots:
        missing = plots.matplotlib_missing()
        if missing:
            print(f"note: {missing}")
        else:
            written += plots.write_plots(result.rows, out_dir)
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"{len(cases)} cases, {len(result.rows)} rows in {result.wall_s:.1f} s")
    failed = [r for r in result.rows if r.status == "error" and r.provider.startswith("bigkernels")]
    return 1 if failed else 0
