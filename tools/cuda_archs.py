#!/usr/bin/env python3
"""The GPU targets of the CUDA build and the CUDA toolkit to build with: the one home that setup.py,
CMakeLists.txt and tools/check_cuda_build.py all read. Pure functions, no torch, no GPU.

Targets are compute capabilities, ';'-separated ("8.0;8.6;9.0"), from BIGKERNELS_CUDA_ARCHS or
DEFAULT_CUDA_ARCHS. Every one gets SASS; the newest *plain* one (not an arch-specific "9.0a"
target, whose PTX no other GPU can JIT) also gets PTX, so that GPUs newer than the
list still run the kernels.

    python tools/cuda_archs.py --cmake    -> the CMAKE_CUDA_ARCHITECTURES list ("80-real;...;120")
    python tools/cuda_archs.py --torch    -> the TORCH_CUDA_ARCH_LIST value ("8.0;...;12.0+PTX")
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional

# What nvcc 13 still builds (`nvcc --list-gpu-arch`: sm_75 and up) and the project supports: Ampere
# (A100 8.0, consumer 8.6), Ada 8.9, Hopper 9.0, Blackwell datacentre 10.0 and consumer 12.0. No
# "9.0a": no source uses an sm_90a-only feature (wgmma, setmaxnreg, TMA multicast), and PTX of an
# "a" target cannot be JIT-compiled by any later GPU.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0"
# CI's `make cuda-check` subset (.ci/run): Ampere, Hopper and datacentre Blackwell, one each. The
# whole default list compiles every kernel six times (78 s vs 54 s for the former four archs on the
# 2-core CI machine, the subset 40 s); the subset still covers the three ptxas generations where
# spills differed (sm_100 spilled where sm_90 did not).
CI_CUDA_ARCHS = "8.0;9.0;10.0"

# "a" targets (sm_90a) but no "f" family targets: torch.utils.cpp_extension refuses those.
_ARCH_RE = re.compile(r"^(\d+)\.(\d+)(a?)$")


def parse_archs(spec: Optional[str]) -> list[str]:
    """Compute capabilities from a ';'- (or space- or comma-) separated spec; an unset or blank spec
    means DEFAULT_CUDA_ARCHS. A trailing "+PTX" is accepted and ignored (PTX placement is decided
    here). ValueError naming BIGKERNELS_CUDA_ARCHS for anything else."""
    if spec is None or not spec.strip():
        spec = DEFAULT_CUDA_ARCHS
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        arch = item.removesuffix("+PTX")
        if not _ARCH_RE.match(arch):
            raise ValueError(f"BIGKERNELS_CUDA_ARCHS: {item!r} is not a compute capability such as 8.0, 9.0 or "
                             f"9.0a (got {spec!r})")
        if arch not in archs:
            archs.append(arch)
    return sorted(archs, key=_arch_order)


def _arch_order(arch: str) -> tuple[int, int, str]:
    major, minor, suffix = _ARCH_RE.match(arch).groups()
    return int(major), int(minor), suffix


def ptx_arch(archs: list[str]) -> Optional[str]:
    """The arch whose PTX is embedded: the newest plain one (None if every one is an "a" target)."""
    plain = [a for a in archs if a[-1].isdigit()]
    return plain[-1] if plain else None


def torch_arch_list(archs: list[str]) -> str:
    """TORCH_CUDA_ARCH_LIST for torch.utils.cpp_extension: "8.0;8.6;9.0+PTX"."""
    ptx = ptx_arch(archs)
    return ";".join(a + ("+PTX" if a == ptx else "") for a in archs)


def cmake_architectures(archs: list[str]) -> str:
    """CMAKE_CUDA_ARCHITECTURES: "80-real" is SASS only, plain "90" SASS plus PTX."""
    ptx = ptx_arch(archs)
    return ";".join(a.replace(".", "") + ("" if a == ptx else "-real") for a in archs)


# ------------------------------------------------------------------------------------ the toolkit
def _has_runtime_header(home: Optional[str]) -> bool:
    return bool(home) and (Path(home) / "include" / "cuda_runtime.h").is_file()


def _nvcc_top(nvcc: str) -> Optional[str]:
    """The toolkit root nvcc itself reports (its dry run prints '#$ TOP=<root>/bin/..'): right even
    when `nvcc` on PATH is a wrapper script or a symlink farm outside the toolkit."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return str(Path(m.group(1).strip()).resolve()) if m else None


def find_cuda_home(env: Mapping[str, str] = os.environ, which: Callable[[str], Optional[str]] = shutil.which,
                   nvcc_top: Callable[[str], Optional[str]] = _nvcc_top, fallback: str = "/usr/local/cuda") -> str:
    """The CUDA toolkit root (holding include/cuda_runtime.h): $CUDA_HOME, else $CUDA_PATH, else the
    toolkit of the nvcc on PATH (through symlinks and wrapper scripts), else /usr/local/cuda.
    RuntimeError naming the variable to set when none is a toolkit; a CUDA_HOME/CUDA_PATH that is set
    but wrong is an error too, never silently passed over."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home:
            if _has_runtime_header(home):
                return home
            raise RuntimeError(f"{var}={home} is not a CUDA toolkit (no include/cuda_runtime.h): set {var} to the "
                               "toolkit's root, e.g. /usr/local/cuda-13.0")
    nvcc = which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        for home in (str(real.parent.parent), nvcc_top(nvcc)):
            if _has_runtime_header(home):
                return home
    if _has_runtime_header(fallback):
        return fallback
    found = f"nvcc at {nvcc} belongs to no toolkit with include/cuda_runtime.h" if nvcc else "no nvcc on PATH"
    raise RuntimeError(f"CUDA toolkit not found ({found}): set CUDA_HOME to the toolkit's root, e.g. "
                       "/usr/local/cuda-13.0, or BIGKERNELS_NO_CUDA=1 for a CPU-only build")


def main(argv: list[str]) -> int:
    try:
        archs = parse_archs(os.environ.get("BIGKERNELS_CUDA_ARCHS"))
        if argv[1:] == ["--cmake"]:
            print(cmake_architectures(archs), end="")
        elif argv[1:] == ["--torch"]:
            print(torch_arch_list(archs))
        elif argv[1:] == ["--cuda-home"]:
            print(find_cuda_home())
        else:
            print(__doc__)
            return 2
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
