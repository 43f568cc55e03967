"""`bigkernels tune` and `bigkernels validate`: fill the tuning cache ahead of time.

tune      runs the automatic provider (`bigkernels`) of every selected benchmark case once, which
          makes the chooser time (and on a GPU, validate) the candidates of every call in it, then
          once more from the cache; prints per case what was chosen and what the first call cost.
          Takes the benchmark's case selection options (--op, --mode, --dtype, --shape, --full,
          --device); later processes on this machine read the choices from the cache.
validate  the same on the GPU, in a child process (a kernel that crashes the process cannot take
          the caller down), then lists each GPU kernel's verdict per call key from the cache.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from bigkernels import _chooser, _tune_cache


def _select(argv: list[str]):
    from bigkernels.bench import cli as bench_cli

    parser = bench_cli.build_parser()
    parser.prog = "bigkernels tune"
    parser.description = "Pre-tune the benchmark grid's calls (the bench's case selection options apply)."
    args = parser.parse_args(argv)
    return bench_cli.select(args)


def tune_main(argv: list[str]) -> int:
    from bigkernels.bench import cases as registry
    from bigkernels.bench.models import OPTIMIZED
    from bigkernels.bench.providers import AUTO
    from bigkernels.bench.cli import UsageError

    try:
        selected = _select(argv)
    except UsageError as exc:
        print(f"bigkernels tune: {exc}", file=sys.stderr)
        return 2
    if not _chooser.tuning_enabled():
        print("bigkernels tune: BIGKERNELS_TUNE=off: nothing is measured (unset it to tune)", file=sys.stderr)
        return 2
    print(f"tuning {len(selected)} cases; cache: {_tune_cache.cache_path()}")
    width = max(len(c.id) for c in selected)
    print(f"{'case':<{width}}  {'first call ms':>13}  {'next call ms':>12}  chosen")
    failures = 0
    for case in selected:
        op = registry.get_op(case.op)
        providers, _ = op.providers(case, False)
        # The automatic provider; for the end-to-end models, the optimized model (its layers tune).
        auto = next((p for p in providers if p.name in (AUTO, OPTIMIZED)), None)
        if auto is None:
            continue
        try:
            step = auto.build(case, op.make_inputs(case))
            _chooser.last_choice.clear()
            start = time.perf_counter()
            step.next_call()()
            first = time.perf_counter() - start
            start = time.perf_counter()
            step.next_call()()
            second = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - report and go on with the other cases
            failures += 1
            print(f"{case.id:<{width}}  failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        chosen = " ".join(f"{o}={c}" for o, c in sorted(_chooser.last_choice.items()))
        print(f"{case.id:<{width}}  {first * 1e3:13.2f}  {second * 1e3:12.2f}  {chosen}")
    return 1 if failures else 0


def validate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigkernels validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=600, help="seconds the child process may take (default 600)")
    parser.add_argument("--full", action="store_true", help="the full benchmark grid (default: the quick one)")
    parser.add_argument("--op", help="comma-separated ops (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bigkernels validate: no CUDA GPU visible; GPU kernels are validated on the GPU that runs them "
              "(nothing to do here)")
        return 0
    child = [sys.executable, "-m", "bigkernels", "tune", "--device", "cuda"] + (["--full"] if args.full else [])
    child += ["--op", args.op] if args.op else []
    env = dict(os.environ, BIGKERNELS_TUNE="on")
    env.pop("BIGKERNELS_BACKEND", None)  # validation is of the automatic choice
    print("running:", " ".join(child))
    try:
        done = subprocess.run(child, env=env, timeout=args.timeout)
        status = done.returncode
    except subprocess.TimeoutExpired:
        print(f"bigkernels validate: the child process ran past {args.timeout:.0f} s and was stopped")
        status = -1
    if status < 0:
        print(f"bigkernels validate: the child process died ({'signal ' + str(-status) if status != -1 else 'timeout'}): "
              "a kernel crashed it; the cache holds the verdicts reached before")
    _chooser.forget()
    gpu = {k: e for k, e in _chooser.entries().items() if "|cuda:" in k}
    rejected = 0
    for key in sorted(gpu):
        entry = gpu[key]
        for name in entry.get("validated", []):
            print(f"ok        {name:<16} {key}")
        for name, why in entry.get("rejected", {}).items():
            rejected += 1
            print(f"DISABLED  {name:<16} {key}: {why}")
    print(f"{len(gpu)} GPU call keys in {_tune_cache.cache_path()}; {rejected} kernel verdicts disabled")
    return 0 if status == 0 and rejected == 0 else 1
