"""Python side of every op: validation, backend dispatch, fake (meta) implementations, autograd.

Importing this package registers the fake and autograd implementations of all ops.
"""
from bigkernels.ops.lstm_cell import lstm_cell

__all__ = ["lstm_cell"]
