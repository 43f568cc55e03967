"""bigkernels.nn.LSTMCell: torch.nn.LSTMCell with a fused kernel behind forward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bigkernels.ops.lstm_cell import lstm_cell


class LSTMCell(torch.nn.LSTMCell):
    """Drop-in for :class:`torch.nn.LSTMCell` (same constructor, parameters and ``state_dict``).

    ``forward(input, hx=None) -> (h', c')`` with input (batch, input_size) or (input_size,), and
    ``hx = (h, c)`` each (batch, hidden_size) or (hidden_size,), zeros when omitted. The whole step
    (gate GEMMs, biases, activations, state update) runs in bigkernels' fused LSTM-cell op; see
    :func:`bigkernels.nn.functional.lstm_cell` for the devices and dtypes each backend supports.
    """

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise ValueError("LSTMCell: hx must be a tuple (h, c) of two tensors")
        return lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
