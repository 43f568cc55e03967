"""Drop-in modules: subclasses of the stock modules with the same constructor and state_dict."""
from bigkernels.nn import functional
from bigkernels.nn.lstm import LSTM
from bigkernels.nn.lstm_cell import LSTMCell

__all__ = ["LSTM", "LSTMCell", "functional"]

# ---- attention ----
from bigkernels.nn.multihead_attention import MultiheadAttention  # noqa: E402

__all__ += ["MultiheadAttention"]
