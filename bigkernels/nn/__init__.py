"""Drop-in modules: subclasses of the stock modules with the same constructor and state_dict."""
from bigkernels.nn import functional
from bigkernels.nn.lstm import LSTM
from bigkernels.nn.lstm_cell import LSTMCell

__all__ = ["LSTM", "LSTMCell", "functional"]

# ---- attention ----
from bigkernels.nn.multihead_attention import MultiheadAttention  # noqa: E402

__all__ += ["MultiheadAttention"]
# conv (issue 5)
from bigkernels.nn.conv import Conv1d, Conv2d, Conv2dBNAct, fuse_conv_bn  # noqa: E402

__all__ += ["Conv1d", "Conv2d", "Conv2dBNAct", "fuse_conv_bn"]
