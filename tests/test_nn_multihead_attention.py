"""bigkernels.nn.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention: same parameters and
state_dict, outputs and every gradient against the stock module (float64 reference, same-dtype
stock), every option, a swapped-in stock TransformerEncoderLayer, torch.compile."""
from __future__ import annotations

import copy

import pytest
import torch

import bigkernels
from numerics import assert_matches

E, H = 16, 4


def make_pair(seed=0, **cfg):
    torch.manual_seed(seed)
    stock = torch.nn.MultiheadAttention(E, H, **cfg)
    # non-zero biases everywhere (the stock init zeroes some)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    ours = bigkernels.nn.MultiheadAttention(E, H, **cfg)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def inputs(cfg, L=7, S=9, N=3, seed=1, batched=True):
    g = torch.Generator().manual_seed(seed)
    kdim, vdim = cfg.get("kdim") or E, cfg.get("vdim") or E

    def shape(length, dim):
        if not batched:
            return (length, dim)
        return (N, length, dim) if cfg.get("batch_first") else (length, N, dim)

    return (torch.randn(*shape(L, E), generator=g, dtype=torch.float64),
            torch.randn(*shape(S, kdim), generator=g, dtype=torch.float64),
            torch.randn(*shape(S, vdim), generator=g, dtype=torch.float64))


def run(module, q, k, v, dtype, **kw):
    m = copy.deepcopy(module).to(dtype)
    args = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    kw = {name: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for name, t in kw.items()}
    out, weights = m(*args, need_weights=False, **kw)
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, args + list(m.parameters()), grad, allow_unused=True)
    names = ["query", "key", "value"] + [n for n, _ in m.named_parameters()]
    return out, weights, dict(zip(names, grads))


def check(stock, ours, q, k, v, dtype=torch.float32, **kw):
    ref, _, ref_grads = run(stock, q, k, v, torch.float64, **kw)
    st, _, st_grads = run(stock, q, k, v, dtype, **kw)
    out, weights, grads = run(ours, q, k, v, dtype, **kw)
    assert weights is None
    assert_matches("output", out, st, ref)
    for name, r in ref_grads.items():
        if r is None:
            assert grads[name] is None, name
            continue
        assert_matches(f"grad {name}", grads[name], st_grads[name], r)


CONFIGS = [
    dict(),
    dict(batch_first=True),
    dict(bias=False),
    dict(kdim=5, vdim=11),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, batch_first=True, kdim=6, vdim=6),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_stock_module(cfg):
    stock, ours = make_pair(**cfg)
    q, k, v = inputs(cfg)
    check(stock, ours, q, k, v)
    N, S = 3, 9
    g = torch.Generator().manual_seed(3)
    kpm = torch.rand(N, S, generator=g) > 0.7
    kpm[:, 0] = False  # every query keeps a key
    check(stock, ours, q, k, v, key_padding_mask=kpm)
    attn_mask = torch.rand(7, S, generator=g) > 0.8
    attn_mask[:, 1] = False
    check(stock, ours, q, k, v, attn_mask=attn_mask, key_padding_mask=kpm)
    float_mask = torch.randn(N * H, 7, S, generator=g, dtype=torch.float64)
    check(stock, ours, q, k, v, attn_mask=float_mask)


def test_self_attention_causal_unbatched_and_float_kpm():
    stock, ours = make_pair(batch_first=True)
    x = inputs(dict(batch_first=True), L=8, S=8)[0]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(8, dtype=torch.float64)
    check(stock, ours, x, x, x, attn_mask=causal, is_causal=True)
    kpm = torch.zeros(3, 8, dtype=torch.float64)
    kpm[:, -2:] = float("-inf")
    check(stock, ours, x, x, x, attn_mask=causal, is_causal=True, key_padding_mask=kpm)
    check(stock, ours, x, x, x, dtype=torch.float64)
    qu, ku, vu = inputs(dict(), batched=False)
    check(stock, ours, qu, ku, vu)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x.float(), x.float(), x.float(), need_weights=False, is_causal=True)


def test_bfloat16():
    stock, ours = make_pair()
    check(stock, ours, *inputs(dict()), dtype=torch.bfloat16)


def test_need_weights_takes_the_stock_path():
    stock, ours = make_pair()
    q, k, v = (t.float() for t in inputs(dict()))
    stock, ours = stock.float(), ours.float()
    out, w = ours(q, k, v)
    ref_out, ref_w = stock(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)


def test_state_dict_both_ways():
    stock, ours = make_pair(kdim=5, vdim=7, add_bias_kv=True)
    assert list(stock.state_dict()) == list(ours.state_dict())
    fresh_stock = torch.nn.MultiheadAttention(E, H, kdim=5, vdim=7, add_bias_kv=True)
    fresh_stock.load_state_dict(ours.state_dict())
    for a, b in zip(fresh_stock.state_dict().values(), stock.state_dict().values()):
        assert torch.equal(a, b)


def test_dropout_in_training_only():
    _, ours = make_pair(dropout=0.5, batch_first=True)
    x = inputs(dict(batch_first=True))[0].float()
    ours = ours.float()
    ours.train()
    torch.manual_seed(0)
    a, _ = ours(x, x, x, need_weights=False)
    torch.manual_seed(0)
    b, _ = ours(x, x, x, need_weights=False)
    c, _ = ours(x, x, x, need_weights=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ours.eval()
    d, _ = ours(x, x, x, need_weights=False)
    e, _ = ours(x, x, x, need_weights=False)
    assert torch.equal(d, e) and not torch.allclose(a, d)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_with_swapped_self_attn(batch_first):
    torch.manual_seed(0)
    stock = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    layer = copy.deepcopy(stock)
    swapped = bigkernels.nn.MultiheadAttention(E, H, dropout=0.0, batch_first=batch_first)
    swapped.load_state_dict(stock.self_attn.state_dict())
    layer.self_attn = swapped
    x = torch.randn(3, 10, E) if batch_first else torch.randn(10, 3, E)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(10)
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[1, -3:] = True
    for mode in ("train", "eval"):
        getattr(stock, mode)()
        getattr(layer, mode)()
        for kw in (dict(), dict(src_mask=causal, is_causal=True), dict(src_key_padding_mask=kpm)):
            xs, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
            ref, out = stock(xs, **kw), layer(xl, **kw)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            ref.sum().backward()
            out.sum().backward()
            torch.testing.assert_close(xl.grad, xs.grad, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(layer.self_attn.in_proj_weight.grad, stock.self_attn.in_proj_weight.grad,
                                       atol=1e-4, rtol=1e-4)
            stock.zero_grad()
            layer.zero_grad()
        # inference: the stock layer's own fast path may take over (it reads our parameters)
        with torch.no_grad():
            torch.testing.assert_close(layer(x, src_key_padding_mask=kpm), stock(x, src_key_padding_mask=kpm),
                                       atol=1e-5, rtol=1e-5)


def test_compile_fullgraph():
    _, ours = make_pair(batch_first=True, add_bias_kv=True)
    ours = ours.float()
    x = inputs(dict(batch_first=True))[0].float().requires_grad_()
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[0, -1] = True

    def f(x):
        return ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, f(x))
    (g1,) = torch.autograd.grad(out.sum(), x)
    (g2,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(g1, g2)
