"""The maths of every bigkernels op in plain PyTorch: readable, differentiable, device-agnostic.

Tests compare kernels against these (in float64) and the "reference" backend runs them. Nothing else
in the package re-implements the maths.
"""
from __future__ import annotations

import torch
from torch import Tensor


def lstm_cell(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step, torch.nn.LSTMCell semantics. input [B, I], hx/cx [B, H] -> (hy, cy) [B, H].

    gates = input @ w_ih^T + b_ih + hx @ w_hh^T + b_hh, split as (i, f, g, o);
    cy = sigmoid(f) * cx + sigmoid(i) * tanh(g);  hy = sigmoid(o) * tanh(cy).
    """
    gates = input @ w_ih.t() + hx @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    cy = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    hy = torch.sigmoid(o) * torch.tanh(cy)
    return hy, cy
