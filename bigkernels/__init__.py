"""bigkernels: fused convolution, LSTM and attention kernels for PyTorch.

    import bigkernels
    cell = bigkernels.nn.LSTMCell(256, 512)        # drop-in for torch.nn.LSTMCell
    with bigkernels.use_backend("reference"):      # or BIGKERNELS_BACKEND=cpu|cuda|triton|reference
        ...

Each call runs the kernel measured fastest for its shape on this machine, torch's own op included
(BIGKERNELS_TUNE=off: a static rule; `with bigkernels.tuning(False)` per block). `python -m bigkernels
info` shows what this installation holds, each op's candidates and the tuning cache.
"""
from bigkernels import _extension  # loads bigkernels._C (registers the C++ ops) before anything else
from bigkernels._backend import BACKENDS, BackendUnavailable, use_backend
from bigkernels._chooser import tuning
from bigkernels._extension import ExtensionUnavailable
from bigkernels import ops, nn, reference
from bigkernels._version import __version__

# --- training utilities (issue 7) ---
from bigkernels import train
from bigkernels.train import optimize
# --- end training utilities ---

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "ExtensionUnavailable",
    "__version__",
    "nn",
    "ops",
    "reference",
    "optimize",
    "train",
    "tuning",
    "use_backend",
]
