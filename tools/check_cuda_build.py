#!/usr/bin/env python3
"""Compile every csrc/cuda/*.cu with nvcc alone (CMakeLists.txt) and report ptxas resource usage.

Needs nvcc and CMake, no GPU and no torch: CI runs it on a CPU-only machine. Prints one row per kernel
with registers, shared memory and spills (stores/loads, bytes) for every target architecture, and
exits non-zero if the build fails, ptxas reported nothing, or any kernel spills.

    python tools/check_cuda_build.py [--build-dir build/cuda-check] [--archs "8.0;9.0" | --archs ci] [-j N]

Environment: BIGKERNELS_CUDA_ARCHS (default arch list, else tools/cuda_archs.py's, the one setup.py
builds), MAX_JOBS (default -j, else 2), CUDACXX (nvcc to use; else nvcc on PATH, else
$CUDA_HOME/bin/nvcc).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ptxas -v lines (CUDA 12/13 wording).
ENTRY_RE = re.compile(r"ptxas info\s*: Compiling entry function '(?P<name>[^']+)' for '(?P<arch>[^']+)'")
PROPS_RE = re.compile(r"ptxas info\s*: Function properties for (?P<name>\S+)")
SPILL_RE = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
USED_RE = re.compile(r"ptxas info\s*: Used (?P<regs>\d+) registers")
SMEM_RE = re.compile(r"(?P<smem>\d+) bytes smem")


def is_ptxas_report(line: str) -> bool:
    return line.startswith("ptxas info") or SPILL_RE.search(line) is not None


@dataclass
class Usage:
    regs: int = 0
    smem: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas(log: str) -> dict[tuple[str, str], Usage]:
    """(mangled kernel, arch) -> usage. ptxas prints, per function and arch: 'Compiling entry
    function', 'Function properties', the spill line, then 'Used N registers'. Non-entry functions
    (out-of-line device calls) get their spill line attributed to their own name and the arch of the
    entry being compiled, so their spills count too."""
    usage: dict[tuple[str, str], Usage] = {}
    entry: tuple[str, str] | None = None
    props_for: str | None = None
    for line in log.splitlines():
        if m := ENTRY_RE.search(line):
            entry = (m["name"], m["arch"])
            usage.setdefault(entry, Usage())
        elif m := PROPS_RE.search(line):
            props_for = m["name"]
        elif (m := SPILL_RE.search(line)) and props_for is not None:
            u = usage.setdefault((props_for, entry[1] if entry else "?"), Usage())
            u.spill_stores, u.spill_loads = int(m["st"]), int(m["ld"])
        elif (m := USED_RE.search(line)) and entry is not None:
            usage[entry].regs = int(m["regs"])
            if s := SMEM_RE.search(line):
                usage[entry].smem = int(s["smem"])
    return usage


def short_names(mangled: list[str]) -> dict[str, str]:
    """Demangle with c++filt (or cu++filt) when present and drop namespaces and parameter lists:
    'lstm_cell_forward_kernel<float, 4>'. Falls back to the mangled names."""
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not mangled:
        return {m: m for m in mangled}
    out = subprocess.run([filt], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(mangled):
        return {m: m for m in mangled}
    names = {}
    for m, d in zip(mangled, out):
        d = d.replace("(anonymous namespace)::", "")
        d = re.sub(r"^void ", "", d)
        d = re.sub(r"\(.*\)$", "", d)  # parameter list
        d = re.sub(r"\b\w+::", "", d)  # namespaces, also inside template arguments
        names[m] = d
    return names


def arch_key(arch: str) -> tuple[int, str]:
    digits = re.sub(r"\D", "", arch)
    return (int(digits) if digits else 0, arch)


def print_table(usage: dict[tuple[str, str], Usage]) -> None:
    archs = sorted({a for _, a in usage}, key=arch_key)
    kernels = sorted({k for k, _ in usage})
    names = short_names(kernels)
    width = max(len("kernel"), *(len(names[k]) for k in kernels))
    cell = "{:>5} {:>6} {:>9}"
    print(f"{'':<{width}} | " + " | ".join(f"{a:^22}" for a in archs))
    print(f"{'kernel':<{width}} | " + " | ".join(cell.format("regs", "smem", "spill s/l") for _ in archs))
    print("-" * (width + 25 * len(archs) + 1))
    for k in sorted(kernels, key=lambda k: names[k]):
        cells = []
        for a in archs:
            u = usage.get((k, a))
            if u is None:
                cells.append(cell.format("-", "-", "-"))
            else:
                spill = f"{u.spill_stores}/{u.spill_loads}" + (" !" if u.spills else "")
                cells.append(cell.format(u.regs, u.smem, spill))
        print(f"{names[k]:<{width}} | " + " | ".join(cells))


def find_nvcc() -> str | None:
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    if nvcc := shutil.which("nvcc"):
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default="build/cuda-check", help="CMake build directory")
    parser.add_argument("--archs", default=os.environ.get("BIGKERNELS_CUDA_ARCHS"),
                        help="';'-separated compute capabilities (default: $BIGKERNELS_CUDA_ARCHS, else "
                             "tools/cuda_archs.py's DEFAULT_CUDA_ARCHS; CI passes its CI_CUDA_ARCHS subset)")
    parser.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or 2))
    args = parser.parse_args()
    if args.archs == "ci":
        sys.path.insert(0, str(ROOT / "tools"))
        from cuda_archs import CI_CUDA_ARCHS

        args.archs = CI_CUDA_ARCHS

    start = time.monotonic()
    build_dir = (ROOT / args.build_dir).resolve()
    configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DBIGKERNELS_PYTHON={sys.executable}"]
    if not (build_dir / "CMakeCache.txt").exists():
        # Ninja prints each command's output in one piece, so parallel ptxas reports never interleave.
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        nvcc = find_nvcc()
        if nvcc is None:
            print("error: nvcc not found (set CUDACXX or CUDA_HOME)", file=sys.stderr)
            return 2
        configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    # An explicit list wins; otherwise drop any cached one so that tools/cuda_archs.py's default applies.
    configure += [f"-DBIGKERNELS_CUDA_ARCHS={args.archs}"] if args.archs else ["-UBIGKERNELS_CUDA_ARCHS"]
    result = run(configure)
    if result.returncode != 0:
        print(result.stdout)
        print("error: CMake configure failed", file=sys.stderr)
        return result.returncode

    # --clean-first: ptxas only reports what it compiles, so every kernel must be rebuilt.
    result = run(["cmake", "--build", str(build_dir), "--clean-first", "-j", str(args.jobs)])
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        # The compiler's own messages, without the ptxas report of the kernels that did compile.
        print("\n".join(line for line in result.stdout.splitlines() if not is_ptxas_report(line)))
        print(f"error: CUDA build failed ({elapsed:.0f} s)", file=sys.stderr)
        return result.returncode

    usage = parse_ptxas(result.stdout)
    if not usage:
        print(result.stdout)
        print("error: no ptxas report found in the build output (is -Xptxas=-v set?)", file=sys.stderr)
        return 1
    print()
    print_table(usage)
    kernels = {k for k, _ in usage}
    archs = {a for _, a in usage}
    spilling = sorted({k for (k, _), u in usage.items() if u.spills})
    print()
    if spilling:
        names = short_names(spilling)
        print(f"error: {len(spilling)} kernel(s) spill registers ({elapsed:.0f} s): "
              + ", ".join(names[k] for k in spilling), file=sys.stderr)
        return 1
    print(f"ok: {len(kernels)} kernels x {len(archs)} archs, no spills ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
