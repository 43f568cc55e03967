"""The package around the kernels: import without a usable extension, backend selection, `info`."""
from __future__ import annotations

import os
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
