"""The package around the kernels: import without a usable extension, backend selection, `info`."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import bigkernels
from bigkernels import _backend


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_version_names_the_build_target():
    local = bigkernels.__version__.split("+")[-1]
    assert local == "cpu" or local.startswith("cu"), bigkernels.__version__


def _cell_choice() -> str:
    """The candidate an automatic lstm_cell call on CPU tensors runs (tuning is off in the tests)."""
    from bigkernels.ops.lstm_cell import CHOOSER

    args = (torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4), torch.randn(16, 3), torch.randn(16, 4), None, None)
    return CHOOSER.pick(torch.device("cpu"), args, False).name


def test_use_backend_nests_and_validates():
    assert _backend.requested() is None
    expected = "cpu" if bigkernels._extension.AVAILABLE else "stock"
    with bigkernels.use_backend("reference"):
        assert _backend.requested() == "reference"
        with bigkernels.use_backend("cpu"):
            assert _cell_choice() == "cpu"
        assert _cell_choice() == "reference"
    assert _cell_choice() == expected
    with pytest.raises(ValueError, match="use_backend\\(name\\) must be one of cpu, cuda, triton, reference, got 'gpu'"):
        with bigkernels.use_backend("gpu"):
            pass


def test_backend_reasons():
    cpu = torch.device("cpu")
    assert "CUDA tensors" in _backend.unavailable_reason("cuda", "lstm_cell", cpu)
    assert "no Triton kernel" in _backend.unavailable_reason("triton", "no_such_op", cpu)
    assert _backend.unavailable_reason("reference", "lstm_cell", cpu) is None


def test_env_variable_selects_backend():
    code = ("import torch, bigkernels; from bigkernels.ops.lstm_cell import CHOOSER; "
            "args = (torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4), torch.randn(16, 3), torch.randn(16, 4), "
            "None, None); print(CHOOSER.pick(torch.device('cpu'), args, False).name)")
    assert run_python(code, BIGKERNELS_BACKEND="reference").stdout.strip() == "reference"
    bad = run_python(code, BIGKERNELS_BACKEND="fastest")
    assert bad.returncode != 0 and "BIGKERNELS_BACKEND must be one of" in bad.stderr


MISSING_EXTENSION = """
import sys, types, warnings
{setup}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, bigkernels
print("WARN", [str(w.message) for w in caught if "bigkernels" in str(w.message)][0])
x = torch.randn(2, 3); w_ih = torch.randn(8, 3); w_hh = torch.randn(8, 2)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    h, c = bigkernels.nn.functional.lstm_cell(x, None, w_ih, w_hh)  # falls back to torch's own cell
print("FALLBACK", tuple(h.shape))
try:
    with bigkernels.use_backend("cpu"):
        bigkernels.nn.functional.lstm_cell(x, None, w_ih, w_hh)
except bigkernels.BackendUnavailable as exc:
    print("ERROR", str(exc))
"""


def test_import_without_extension_explains_and_falls_back():
    setup = "sys.modules['bigkernels._C'] = None  # as if never built"
    out = run_python(MISSING_EXTENSION.format(setup=setup))
    assert out.returncode == 0, out.stderr
    assert "bigkernels._C is not built" in out.stdout and "pip install --no-build-isolation" in out.stdout
    assert "FALLBACK (2, 2)" in out.stdout
    assert "ERROR bigkernels backend 'cpu' cannot run lstm_cell: bigkernels._C is not built" in out.stdout


def test_import_with_extension_for_another_torch_gives_one_line():
    setup = (
        "info = types.ModuleType('bigkernels._build_info'); info.TORCH_VERSION = '2.0.0+cpu'; "
        "info.WITH_CUDA = False; info.CUDA_VERSION = None; info.CUDA_ARCHS = ''; "
        "sys.modules['bigkernels._build_info'] = info"
    )
    out = run_python(MISSING_EXTENSION.format(setup=setup))
    assert out.returncode == 0, out.stderr
    error = [line for line in out.stdout.splitlines() if line.startswith("ERROR")][0]
    assert f"built for torch 2.0.0+cpu but torch {torch.__version__} is installed; rebuild with: pip install" in error
    assert "undefined symbol" not in out.stdout + out.stderr


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "bigkernels", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for field in ("bigkernels", "torch", "triton", "compiled kernels", "device", "lstm_cell"):
        assert field in out.stdout
    assert "cpu: cpu, stock" in out.stdout  # lstm_cell's candidates on CPU tensors
    assert "tuning cache" in out.stdout and "tuned choices" in out.stdout


def test_cli_usage():
    out = subprocess.run([sys.executable, "-m", "bigkernels", "frobnicate"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


# ------------------------------------------------------------------- CUDA build targets and toolkit
def _cuda_archs():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "cuda_archs.py")
    spec = importlib.util.spec_from_file_location("cuda_archs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_arch_list_parsing():
    """BIGKERNELS_CUDA_ARCHS="" used to crash setup.py (IndexError); PTX went to compute_90a, which no
    later GPU can JIT. Now: blank means the default, PTX of the newest plain arch, one list for
    setup.py (TORCH_CUDA_ARCH_LIST) and CMake (CMAKE_CUDA_ARCHITECTURES)."""
    ca = _cuda_archs()
    default = ca.parse_archs(None)
    assert default == ca.parse_archs("") == ca.parse_archs("  ") == ["8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]
    assert ca.torch_arch_list(default) == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    assert ca.cmake_architectures(default) == "80-real;86-real;89-real;90-real;100-real;120"
    archs = ca.parse_archs(" 9.0a; 8.0,9.0+PTX ;;8.0 ")
    assert archs == ["8.0", "9.0", "9.0a"]
    assert ca.torch_arch_list(archs) == "8.0;9.0+PTX;9.0a"
    assert ca.cmake_architectures(archs) == "80-real;90;90a-real"
    assert ca.torch_arch_list(["9.0a"]) == "9.0a" and ca.cmake_architectures(["9.0a"]) == "90a-real"
    assert ca.parse_archs("12.0;8.6") == ["8.6", "12.0"]  # numeric order, not text order
    assert set(ca.parse_archs(ca.CI_CUDA_ARCHS)) <= set(default)
    for bad in ("sm_90", "9", "9.0b", "10.0f", "8.0;x"):
        with pytest.raises(ValueError, match="BIGKERNELS_CUDA_ARCHS"):
            ca.parse_archs(bad)


def _toolkit(root, name):
    home = root / name
    (home / "include").mkdir(parents=True)
    (home / "include" / "cuda_runtime.h").write_text("")
    (home / "bin").mkdir()
    return home


def test_cuda_toolkit_detection(tmp_path):
    ca = _cuda_archs()
    real = _toolkit(tmp_path, "cuda-13.0")
    wrapper = tmp_path / "wrappers" / "bin" / "nvcc"  # a script elsewhere that execs the real nvcc
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f"#!/bin/sh\nexec {real}/bin/nvcc \"$@\"\n")
    nowhere = str(tmp_path / "none")

    def find(env, nvcc=None, top=None):
        return ca.find_cuda_home(env, which=lambda _: nvcc, nvcc_top=lambda _: top, fallback=nowhere)

    assert find({"CUDA_HOME": str(real)}) == str(real)
    assert find({"CUDA_PATH": str(real)}) == str(real)
    with pytest.raises(RuntimeError, match=re.escape(f"CUDA_HOME={tmp_path} is not") + ".*set CUDA_HOME"):
        find({"CUDA_HOME": str(tmp_path)}, nvcc=str(wrapper), top=str(real))  # set but wrong: never passed over
    # nvcc on PATH: a symlink into the toolkit resolves; a wrapper script is asked for its TOP.
    (real / "bin" / "nvcc").write_text("")
    link = tmp_path / "nvcc-link"
    link.symlink_to(real / "bin" / "nvcc")
    assert find({}, nvcc=str(link)) == str(real)
    assert find({}, nvcc=str(wrapper), top=str(real)) == str(real)
    with pytest.raises(RuntimeError, match="nvcc at .* belongs to no toolkit.*set CUDA_HOME"):
        find({}, nvcc=str(wrapper), top=None)
    with pytest.raises(RuntimeError, match="no nvcc on PATH.*set CUDA_HOME"):
        find({})


def test_cuda_toolkit_of_this_machines_nvcc():
    """Through the real nvcc (on this machine a wrapper script in /usr/local/bin): its toolkit root."""
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    ca = _cuda_archs()
    home = ca.find_cuda_home({}, fallback="/nonexistent")
    assert os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
    done = subprocess.run([sys.executable, ca.__file__, "--cmake"], capture_output=True, text=True,
                          env={**os.environ, "BIGKERNELS_CUDA_ARCHS": ""})
    assert done.stdout == ca.cmake_architectures(ca.parse_archs(None))
