"""Python side of every op: validation, backend dispatch, fake (meta) implementations, autograd.

One module per op, named after it (bigkernels.ops.lstm_cell, ...). Importing this package registers
the fake and autograd implementations of all ops. The public entry points live in
bigkernels.nn.functional.
"""
from bigkernels.ops import lstm, lstm_cell  # noqa: F401  (registers the ops' fake/autograd kernels)
from bigkernels.ops import conv  # noqa: F401  (conv, issue 5)

# ---- attention ----
from bigkernels.ops import attention  # noqa: F401,E402

__all__ = ["lstm", "lstm_cell"]
__all__ += ["attention"]  # attention
__all__ += ["conv"]
# lstm_ext: the layer-norm / zoneout options of bigkernels.nn.LSTM.
from bigkernels.ops import lstm_ext  # noqa: F401,E402

__all__ = ["lstm", "lstm_cell", "lstm_ext"]
