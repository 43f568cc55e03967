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
    # The layer-norm / zoneout generalisation below, with both off: one implementation of the maths.
    return lstm_layer_ext(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)


def _schedule(input: Tensor, batch_sizes: Tensor | None, reverse: bool) -> tuple[list[int], list[int], range]:
    """(rows of step t, first row of step t in the [rows, *] layout, steps in processing order)."""
    if batch_sizes is None:
        sizes = [input.shape[1]] * input.shape[0]
    else:
        sizes = [int(n) for n in batch_sizes.tolist()]
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    return sizes, offsets, range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))


def _join_steps(outputs: list, input: Tensor, batch_sizes: Tensor | None, h0: Tensor) -> Tensor:
    """The per-step outputs as [T, B, P] (padded) or [N, P] (packed)."""
    if batch_sizes is None:
        return torch.stack(outputs) if outputs else input.new_empty((0, h0.shape[0], h0.shape[1]))
    return torch.cat(outputs) if outputs else input.new_empty((0, h0.shape[1]))


LAYER_NORM_EPS = 1e-5  # the LayerNorm epsilon of the layer-normalised LSTM (torch's LayerNorm default)


def lstm_layer_ext(
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
    layer_norm: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor] | None = None,
    zoneout_cell: float = 0.0,
    zoneout_hidden: float = 0.0,
    cell_mask: Tensor | None = None,
    hidden_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`lstm_layer` with a layer-normalised cell (Ba et al. 2016) and zoneout (Krueger et al. 2016).

    Same arguments, shapes and outputs as `lstm_layer`, plus:
      layer_norm = (ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b), gains/biases [4H], [4H],
        [4H], [4H], [H], [H], or None. Per row (eps = LAYER_NORM_EPS, LN over the last dim):
          a = LN_ih(x W_ih^T) + LN_hh(h_{t-1} W_hh^T) + b_ih + b_hh;  i, f, g, o = act(a)
          c~ = f * c_{t-1} + i * g;  h~ = o * tanh(LN_c(c~))  (then h~ W_hr^T with a projection)
        Without it: h~ = o * tanh(c~), the stock cell.
      Zoneout: c_t = k_c * c_{t-1} + (1 - k_c) * c~,  h_t = k_h * h_{t-1} + (1 - k_h) * h~, where the
        keep weight k is the mask's element (cell_mask [rows, H], hidden_mask [rows, P], 0/1 in
        training, rows ordered as the input's rows: time-major T*B, or packed) or, without a mask,
        the constant zoneout_cell / zoneout_hidden (evaluation: the expectation). h~ uses the
        candidate c~, not the zoned c_t (Krueger et al., eq. for the LSTM). The output is h_t.
    """
    hidden = c0.shape[-1]
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    x = input.reshape(rows, input.shape[-1])
    norm = torch.nn.functional.layer_norm
    pre = x @ w_ih.t()
    if layer_norm is not None:
        ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b = layer_norm
        pre = norm(pre, (4 * hidden,), ln_ih_w, ln_ih_b, LAYER_NORM_EPS)
    if b_ih is not None:
        pre = pre + b_ih + b_hh
    sizes, offsets, order = _schedule(input, batch_sizes, reverse)

    def keep(mask: Tensor | None, p: float, t: int, n: int) -> Tensor | float:
        return mask[offsets[t]:offsets[t] + n] if mask is not None else p

    h, c = h0, c0
    outputs: list[Tensor | None] = [None] * len(sizes)
    for t in order:
        n = sizes[t]
        rec = h[:n] @ w_hh.t()
        if layer_norm is not None:
            rec = norm(rec, (4 * hidden,), ln_hh_w, ln_hh_b, LAYER_NORM_EPS)
        i, f, g, o = (pre[offsets[t]:offsets[t] + n] + rec).chunk(4, dim=-1)
        c_cand = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(g)
        c_out = norm(c_cand, (hidden,), ln_c_w, ln_c_b, LAYER_NORM_EPS) if layer_norm is not None else c_cand
        h_cand = torch.sigmoid(o) * torch.tanh(c_out)
        if w_hr is not None:
            h_cand = h_cand @ w_hr.t()
        k_c, k_h = keep(cell_mask, zoneout_cell, t, n), keep(hidden_mask, zoneout_hidden, t, n)
        c_new = c_cand if cell_mask is None and zoneout_cell == 0 else (1 - k_c) * c_cand + k_c * c[:n]
        h_new = h_cand if hidden_mask is None and zoneout_hidden == 0 else (1 - k_h) * h_cand + k_h * h[:n]
        outputs[t] = h_new
        h = torch.cat([h_new, h[n:]])
        c = torch.cat([c_new, c[n:]])
    return _join_steps(outputs, input, batch_sizes, h0), h, c


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    dropout_keep: Tensor | None = None,
    dropout_p: float = 0.0,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scaled-dot-product attention with the score matrix materialised: the maths the flash kernels
    compute without it. Returns (output, lse).

    Padded: query (B, Hq, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev) -> output (B, Hq, L, Ev),
    lse (B, Hq, L). Grouped-query: Hq is a multiple of Hk; query head h reads key/value head
    h // (Hq // Hk). attn_mask: additive float, broadcastable to (B, Hq, L, S) (a boolean mask must be
    turned into 0 / -inf by the caller). window = (left, right): query i sees keys j with
    i - left <= j <= i + right, -1 meaning unbounded; torch's is_causal is (-1, 0) (top-left aligned).
    dropout_keep: boolean (B, Hq, L, S), the probabilities kept are scaled by 1 / (1 - dropout_p);
    lse is that of the scores before dropout. A row with no visible key gives output 0 and lse -inf.
    Varlen (cu_seqlens_q/k given, int tensors of length N + 1): B == 1 and sequence n is rows
    cu_seqlens_q[n]:cu_seqlens_q[n+1] of query against rows cu_seqlens_k[n]:cu_seqlens_k[n+1] of
    key/value; windows are relative to each sequence's start.
    """
    if cu_seqlens_q is not None:
        assert cu_seqlens_k is not None and attn_mask is None and dropout_keep is None and query.shape[0] == 1
        starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outputs, lses = [], []
        for n in range(len(starts_q) - 1):
            q = query[:, :, starts_q[n] : starts_q[n + 1]]
            k = key[:, :, starts_k[n] : starts_k[n + 1]]
            v = value[:, :, starts_k[n] : starts_k[n + 1]]
            o, lse = attention(q, k, v, scale=scale, window=window)
            outputs.append(o)
            lses.append(lse)
        return torch.cat(outputs, dim=2), torch.cat(lses, dim=2)

    heads_q, heads_k = query.shape[1], key.shape[1]
    if heads_q != heads_k:
        key = key.repeat_interleave(heads_q // heads_k, dim=1)
        value = value.repeat_interleave(heads_q // heads_k, dim=1)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores + attn_mask
    length_q, length_k = scores.shape[-2], scores.shape[-1]
    left, right = window
    if left >= 0 or right >= 0:
        i = torch.arange(length_q, device=scores.device).unsqueeze(1)
        j = torch.arange(length_k, device=scores.device).unsqueeze(0)
        visible = torch.ones(length_q, length_k, dtype=torch.bool, device=scores.device)
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        scores = scores.masked_fill(~visible, float("-inf"))
    # A row with no visible key would give NaN (exp(-inf - (-inf)), and logsumexp's gradient there):
    # compute such rows on zeros and then give them probability 0 and lse -inf, with zero gradients.
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # True too for a row of no keys (S == 0)
    scores = scores.masked_fill(dead, 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).masked_fill(dead, 0.0)
    lse = lse.masked_fill(dead.squeeze(-1), float("-inf"))
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    return probs @ value, lse


def activation(z: Tensor, name: str | None, negative_slope: float = 0.01) -> Tensor:
    """The activations the conv kernels fuse (csrc/common/activation.h), by name."""
    if name is None or name == "none":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, negative_slope)
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if name == "silu":
        return torch.nn.functional.silu(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"activation must be one of None, 'relu', 'gelu', 'gelu_tanh', 'silu', 'sigmoid', 'leaky_relu', got {name!r}")


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    activation_name: str | None = None,
    negative_slope: float = 0.01,
    residual: Tensor | None = None,
) -> Tensor:
    """act(conv2d(input, weight) + bias + residual): the fused conv's maths. input (N, C, H, W),
    weight (K, C / groups, R, S), residual (N, K, P, Q) like the output."""
    z = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        z = z + residual
    return activation(z, activation_name, negative_slope)
