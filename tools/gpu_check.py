#!/usr/bin/env python3
"""`make gpu-check`: the one prepared script a lent GPU machine runs (H100, torch 2.11+cu130, Triton
3.6, no network), every step time-limited so that the whole fits in about 8 minutes:

  1. info        nvidia-smi, versions, the device's compute capability
  2. build       pip install --no-build-isolation --no-deps -e . for that capability only
                 (BIGKERNELS_CUDA_ARCHS); without a GPU: the toolkit check and an nvcc-only compile of
                 csrc/cuda for sm_90 (tools/check_cuda_build.py) instead
  3. tests       pytest -m "cuda or triton"
  4. memcheck    compute-sanitizer --tool memcheck over the CUDA C++ kernels' tests
  5. racecheck   compute-sanitizer --tool racecheck over the same
  6. validate    python -m bigkernels validate (every GPU kernel checked against stock, in a child process)
  7. bench       python -m bigkernels.bench --quick --device cuda

Each step's output goes to $GPU_CHECK_OUT (default gpu-check-out/) as NN-step.log, with summary.txt
(status and seconds per step). Where a step cannot run (no GPU, no compute-sanitizer) it is skipped
with the reason; exit status 0 unless a step that ran failed or timed out.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("GPU_CHECK_OUT") or ROOT / "gpu-check-out")
TOTAL_BUDGET_S = 470  # under 8 minutes, leaving the machine's start-up and the file transfers aside
# Seconds per step (the sum is the budget): the build of one arch on 16 cores, the GPU tests with
# their autotuning compiles, the sanitizers (slow: every access is checked), a short bench.
BUDGET = {"info": 15, "build": 140, "tests": 120, "memcheck": 45, "racecheck": 45, "validate": 60, "bench": 55}
# The CUDA C++ kernels' tests (csrc/cuda/*.cu): the sanitizers run these, not the Triton ones.
CUDA_CPP_TESTS = ["tests/test_lstm_cell.py", "tests/test_lstm.py", "tests/test_conv_depthwise.py"]

_start = time.monotonic()
_summary: list[tuple[str, str, float, str]] = []


def _remaining() -> float:
    return TOTAL_BUDGET_S - (time.monotonic() - _start)


def step(name: str, cmd: list[str], env: dict | None = None) -> bool:
    """Run `cmd` with the step's time limit; its output into NN-name.log. True when it passed."""
    limit = max(1.0, min(BUDGET[name], _remaining()))
    log = OUT / f"{len(_summary) + 1:02d}-{name}.log"
    began = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n(time limit {limit:.0f} s)\n\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=limit,
                                env={**os.environ, **(env or {})}).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
        except OSError as exc:
            status = f"failed to start: {exc}"
    seconds = time.monotonic() - began
    _summary.append((name, status, seconds, log.name))
    print(f"[{name}] {status} in {seconds:.0f} s -> {log}", flush=True)
    return status == "ok"


def skip(name: str, reason: str) -> None:
    _summary.append((name, f"skipped: {reason}", 0.0, ""))
    print(f"[{name}] skipped: {reason}", flush=True)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real GPU kernels, not the interpreter
    os.environ.clear()
    os.environ.update(env)
    try:
        import torch
    except ImportError:
        print("error: torch is not importable (make setup first)", file=sys.stderr)
        return 2
    gpu = torch.cuda.is_available()
    arch = "{}.{}".format(*torch.cuda.get_device_capability()) if gpu else None

    info = ("import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); "
            "import importlib.util as u; t = u.find_spec('triton'); print('triton', __import__('triton').__version__ "
            "if t else None); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU visible')")
    step("info", ["sh", "-c", f"nvidia-smi || true; {py} -c \"{info}\""])

    if gpu:
        # One arch: the build takes a fraction of the full list's time, and this machine runs only it.
        built = step("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
                     {"BIGKERNELS_CUDA_ARCHS": arch, "BIGKERNELS_FORCE_CUDA": "1",
                      "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))})
    else:
        # What a machine without a GPU can check of the build: the toolkit setup.py would use, and
        # that csrc/cuda compiles for the H100 the lent machines have (nvcc alone).
        built = False
        if shutil.which("nvcc") or os.environ.get("CUDA_HOME"):
            step("build", ["sh", "-c", f"{py} tools/cuda_archs.py --cuda-home && "
                                       f"{py} tools/check_cuda_build.py --archs 9.0 --build-dir build/gpu-check"])
        else:
            skip("build", "no nvcc and no CUDA_HOME")

    no_gpu = "no CUDA GPU visible (torch.cuda.is_available() is False)"
    if not gpu:
        for name in ("tests", "memcheck", "racecheck", "validate", "bench"):
            skip(name, no_gpu)
    else:
        if not built:
            print("warning: the build failed; the remaining steps run against whatever is installed", flush=True)
        step("tests", [py, "-m", "pytest", "-q", "-x", "-m", "cuda or triton", "tests"])
        sanitizer = shutil.which("compute-sanitizer") or next(
            (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer",)
             if p.is_file()), None)
        for tool in ("memcheck", "racecheck"):
            if sanitizer is None:
                skip(tool, "compute-sanitizer not found (PATH, $CUDA_HOME/bin)")
                continue
            step(tool, [sanitizer, "--tool", tool, "--error-exitcode", "1", py, "-m", "pytest", "-q", "-x",
                        "-m", "cuda", "-k", "not triton", *CUDA_CPP_TESTS])
        # The op kernels of the quick grid (the e2e models reuse them), in a child process of its own;
        # its verdicts land in the tuning cache, which the bench below then reads.
        step("validate", [py, "-m", "bigkernels", "validate", "--op", "lstm_cell,lstm,attention,conv",
                          "--timeout", str(BUDGET["validate"] - 5)])
        step("bench", [py, "-m", "bigkernels.bench", "--quick", "--device", "cuda", "--no-plots",
                       "--out", str(OUT / "bench")])

    lines = [f"{name:<10} {status:<40} {seconds:6.0f} s  {log}" for name, status, seconds, log in _summary]
    total = time.monotonic() - _start
    lines.append(f"total {total:.0f} s (budget {TOTAL_BUDGET_S} s); device: {arch or 'none'}")
    (OUT / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [s for s in _summary if not (s[1] == "ok" or s[1].startswith("skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
