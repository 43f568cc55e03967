"""Case builders shared by the LSTM layer tests (test_lstm.py, test_lstm_cpu_recurrent.py,
test_lstm_ext.py): fresh random float64 arguments of one layer, and the same layer through stock
torch.lstm."""
from __future__ import annotations

import torch


def shape_id(s):
    seq, batch, inp, hidden, proj, lengths = s
    text = f"T{seq}xB{batch}xI{inp}xH{hidden}" + (f"xP{proj}" if proj else "")
    return text + ("-packed" + "_".join(map(str, lengths)) if lengths else "")


def make_case(seq, batch, input_size, hidden, proj=0, lengths=None, *, bias=True, seed=0):
    """Fresh random float64 arguments of one layer (never zeros: a kernel that ignores a term fails)."""
    g = torch.Generator().manual_seed(seed)
    out = proj or hidden
    scale = hidden ** -0.5

    def rnd(*shape, s=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * s

    rows = sum(lengths) if lengths is not None else None
    case = dict(
        input=rnd(rows, input_size) if lengths is not None else rnd(seq, batch, input_size),
        h0=rnd(batch, out),
        c0=rnd(batch, hidden, s=2.0),
        w_ih=rnd(4 * hidden, input_size, s=2 * scale),
        w_hh=rnd(4 * hidden, out, s=2 * scale),
        b_ih=rnd(4 * hidden, s=scale) if bias else None,
        b_hh=rnd(4 * hidden, s=scale) if bias else None,
        w_hr=rnd(proj, hidden, s=2 * scale) if proj else None,
    )
    batch_sizes = None
    if lengths is not None:
        # PackedSequence layout: step t holds the first batch_sizes[t] sequences (sorted by length).
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(max(lengths))], dtype=torch.int64)
    return case, batch_sizes


def cast(case, dtype, device, requires_grad=False):
    return {
        k: None if v is None else v.to(device=device, dtype=dtype).requires_grad_(requires_grad) for k, v in case.items()
    }


def stock_lstm_layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False):
    """The same layer through stock torch.lstm (what torch.nn.LSTM calls). The reverse direction alone
    is the second half of a bidirectional call whose forward half runs on detached copies."""
    params = [t for t in (w_ih, w_hh, b_ih, b_hh, w_hr) if t is not None]
    h, c = h0.unsqueeze(0), c0.unsqueeze(0)
    if reverse:
        params = [t.detach() for t in params] + params
        h, c = torch.cat([h.detach(), h]), torch.cat([c.detach(), c])
    has_bias = b_ih is not None
    if batch_sizes is None:
        out, h_n, c_n = torch.lstm(input, [h, c], params, has_bias, 1, 0.0, False, reverse, False)
    else:
        out, h_n, c_n = torch.lstm(input, batch_sizes, [h, c], params, has_bias, 1, 0.0, False, reverse)
    if reverse:
        return out[..., h0.shape[-1]:], h_n[1], c_n[1]
    return out, h_n[0], c_n[0]


def upstream_grads(outs64, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device, dtype) for o in outs64]
