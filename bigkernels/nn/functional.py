"""bigkernels.nn.functional: torch.nn.functional-style entry points to the fused kernels."""
from bigkernels.ops.lstm import lstm_layer
from bigkernels.ops.lstm_cell import lstm_cell

# lstm_ext: lstm_layer with a layer-normalised cell and/or zoneout.
from bigkernels.ops.lstm_ext import lstm_layer_ext  # noqa: E402

__all__ = ["lstm_cell", "lstm_layer", "lstm_layer_ext"]
