"""bigkernels.nn.functional: torch.nn.functional-style entry points to the fused kernels."""
from bigkernels.ops.lstm import lstm_layer
from bigkernels.ops.lstm_cell import lstm_cell

__all__ = ["lstm_cell", "lstm_layer"]

# ---- attention ----
from bigkernels.ops.attention import scaled_dot_product_attention  # noqa: E402

__all__ += ["scaled_dot_product_attention"]
# conv (issue 5)
from bigkernels.ops.conv import conv1d, conv2d  # noqa: E402

__all__ += ["conv1d", "conv2d"]
# lstm_ext: lstm_layer with a layer-normalised cell and/or zoneout.
from bigkernels.ops.lstm_ext import lstm_layer_ext  # noqa: E402

__all__ = ["lstm_cell", "lstm_layer", "lstm_layer_ext"]
