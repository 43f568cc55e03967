"""Build bigkernels._C: the C++ CPU kernels always, the CUDA kernels when a CUDA build is possible.

Environment:
  BIGKERNELS_FORCE_CUDA=1      build the CUDA sources even where no GPU is visible (needs a CUDA torch)
  BIGKERNELS_NO_CUDA=1         never build the CUDA sources
  BIGKERNELS_CUDA_ARCHS        ';'-separated compute capabilities, default "8.0;8.6;8.9;9.0a"
                               (PTX is embedded for the newest, so newer GPUs JIT from it)
  MAX_JOBS                     parallel compile jobs (honoured by torch's ninja build)
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

BASE_VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0a"
ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("BIGKERNELS_NO_CUDA") == "1":
        return False
    if os.environ.get("BIGKERNELS_FORCE_CUDA") == "1":
        return True
    nvcc_found = CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and nvcc_found


def cuda_arch_list() -> str:
    archs = [a.strip() for a in os.environ.get("BIGKERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";")]
    archs = [a for a in archs if a]
    archs[-1] += "+PTX"
    return ";".join(archs)


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
