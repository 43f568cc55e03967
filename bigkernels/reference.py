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


def lstm_layer(
    input: Tensor,
    batch_sizes: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction, torch.nn.LSTM semantics (gate order i, f, g, o).

    Padded: input [T, B, I] -> output [T, B, P]. Packed (batch_sizes given, a non-increasing int64
    CPU tensor [T] as in PackedSequence): input [N, I] -> output [N, P]; step t runs the first
    batch_sizes[t] rows. h0 [B, P], c0 [B, H] -> h_n [B, P], c_n [B, H], each row's state after its
    last step. P = w_hr.shape[0] with a projection (h = (o * tanh(c)) @ w_hr^T), else H.
    reverse runs the steps from last to first (the backward direction of a bidirectional LSTM).
    """
    if batch_sizes is None:
        sizes = [input.shape[1]] * input.shape[0]
        steps = list(input.unbind(0))
    else:
        sizes = [int(n) for n in batch_sizes.tolist()]
        steps = list(input.split(sizes, dim=0))
    h, c = h0, c0
    outputs: list[Tensor | None] = [None] * len(sizes)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in order:
        n = sizes[t]
        # Rows past n are finished (forward) or not yet started (reverse): their state is kept.
        hy, cy = lstm_cell(steps[t], h[:n], c[:n], w_ih, w_hh, b_ih, b_hh)
        if w_hr is not None:
            hy = hy @ w_hr.t()
        outputs[t] = hy
        h = torch.cat([hy, h[n:]])
        c = torch.cat([cy, c[n:]])
    if batch_sizes is None:
        output = torch.stack(outputs) if outputs else input.new_empty((0, h0.shape[0], h0.shape[1]))
    else:
        output = torch.cat(outputs) if outputs else input.new_empty((0, h0.shape[1]))
    return output, h, c
