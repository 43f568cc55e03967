"""Build bigkernels._C: the C++ CPU kernels always, the CUDA kernels when a CUDA build is possible.

Environment:
  BIGKERNELS_FORCE_CUDA=1      build the CUDA sources even where no GPU is visible (needs a CUDA torch)
  BIGKERNELS_NO_CUDA=1         never build the CUDA sources
  BIGKERNELS_CUDA_ARCHS        ';'-separated compute capabilities; unset or empty: the default of
                               tools/cuda_archs.py (PTX is embedded for the newest plain arch, so
                               newer GPUs JIT from it)
  CUDA_HOME / CUDA_PATH        the CUDA toolkit (else the one of the nvcc on PATH, through wrapper
                               scripts, else /usr/local/cuda); checked for include/cuda_runtime.h
  MAX_JOBS                     parallel compile jobs (honoured by torch's ninja build)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

import torch
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_archs  # noqa: E402  (tools/cuda_archs.py: the arch list and toolkit search, shared with CMake)

BASE_VERSION = "0.1.0"


def want_cuda() -> bool:
    if os.environ.get("BIGKERNELS_NO_CUDA") == "1":
        return False
    if os.environ.get("BIGKERNELS_FORCE_CUDA") == "1":
        return True
    nvcc_found = any(os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")) or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and nvcc_found


def cuda_arch_list() -> str:
    try:
        return cuda_archs.torch_arch_list(cuda_archs.parse_archs(os.environ.get("BIGKERNELS_CUDA_ARCHS")))
    except ValueError as exc:
        sys.exit(f"error: {exc}")


def use_cuda_toolkit() -> None:
    """Point torch.utils.cpp_extension at the real toolkit, or stop now: torch's own guess (made at
    import) takes the directory above the nvcc on PATH, which is wrong for a wrapper script and fails
    much later, deep in the build."""
    try:
        home = cuda_archs.find_cuda_home()
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    os.environ["CUDA_HOME"] = home  # for the nvcc/ninja subprocesses
    cpp_extension.CUDA_HOME = home  # read by CUDAExtension and BuildExtension at call time


def local_version(with_cuda: bool) -> str:
    if not with_cuda:
        return "cpu"
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return f"cu{torch.version.cuda.replace('.', '')}torch{torch_mm}"


def write_build_info(with_cuda: bool, archs: str) -> None:
    """bigkernels/_build_info.py tells the package, at import time, what this build holds and which
    torch it was compiled against (so a mismatch is reported in one line, not as a symbol error)."""
    with open(os.path.join(ROOT, "bigkernels", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time; not tracked by git.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n")
        f.write(f"CUDA_ARCHS = {(archs if with_cuda else '')!r}\n")


def extension():
    with_cuda = want_cuda()
    if with_cuda:
        use_cuda_toolkit()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/autograd/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
    archs = ""
    if with_cuda:
        archs = cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_binding.cpp"))
        ext = CUDAExtension(
            "bigkernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
            define_macros=[("BIGKERNELS_WITH_CUDA", "1")],
        )
    else:
        ext = CppExtension("bigkernels._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    write_build_info(with_cuda, archs)
    return ext, with_cuda


ext, with_cuda = extension()

setup(
    version=f"{BASE_VERSION}+{local_version(with_cuda)}",
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
