"""bigkernels scaled_dot_product_attention (bigkernels::attention) on the CPU and Triton backends:
numerics against float64 and torch's SDPA in the same dtype (DESIGN.md rule), every gradient incl.
the float mask's, every option, GQA, broadcasting, non-contiguous input, empty batch, fully masked
rows, dropout, varlen, a hypothesis sweep, gradcheck, opcheck, torch.compile, memory, bad input."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bigkernels
from bigkernels import reference
from bigkernels.nn.functional import scaled_dot_product_attention as sdpa
from bigkernels.ops.attention import dropout_keep_mask
from conftest import HAS_CUDA
from numerics import assert_matches

TRITON_MISSING = importlib.util.find_spec("bigkernels.triton.attention") is None
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: the Triton interpreter
CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16)
# Under the interpreter bf16 dots are wrong and fp64 is not a Triton kernel dtype.
TRITON_DTYPES = (torch.float32, torch.float16)

BACKENDS = [
    pytest.param("cpu", "cpu", CPU_DTYPES, id="cpu"),
    pytest.param(
        "triton",
        TRITON_DEVICE,
        TRITON_DTYPES,
        id="triton",
        marks=[
            pytest.mark.triton,
            pytest.mark.skipif(TRITON_MISSING, reason="bigkernels/triton/attention.py is not in this tree yet"),
        ],
    ),
]


def rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def make_qkv(B, Hq, Hk, L, S, E, Ev, seed=0):
    return rand(B, Hq, L, E, seed=seed), rand(B, Hk, S, E, seed=seed + 1), rand(B, Hk, S, Ev, seed=seed + 2)


def run_backend(backend, fn):
    with bigkernels.use_backend(backend):
        return fn()


def forward_and_grads(fn, tensors, grad_out):
    """fn(*tensors) and the gradients of the tensors that require grad (None for the others)."""
    out = fn(*tensors)
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
    return out, [next(grads) if t is not None and t.requires_grad else None for t in tensors]


def compare(backend, device, dtype, tensors64, call, stock_call=None, grad_mask=False, names=("q", "k", "v", "mask")):
    """ours = call(q, k, v, mask) on `backend` in dtype; ref64 = the reference backend in float64;
    stock = stock_call (torch's SDPA) in dtype, or the reference backend in dtype where torch has no
    such option. Outputs and every gradient must satisfy the DESIGN.md rule."""
    def prepare(dt, dev):
        out = []
        for i, t in enumerate(tensors64):
            if t is None:
                out.append(None)
                continue
            x = t.detach().to(device=dev, dtype=dt if t.is_floating_point() else t.dtype, copy=True)
            needs = t.is_floating_point() and (i < 3 or grad_mask)
            out.append(x.requires_grad_(needs))
        return out

    ref_in = prepare(torch.float64, "cpu")
    with torch.no_grad():  # the upstream gradient: fresh random, shaped like the output
        grad_out64 = rand(*run_backend("reference", lambda: call(*ref_in)).shape, seed=99)
    ref_out, ref_grads = run_backend("reference", lambda: forward_and_grads(call, ref_in, grad_out64))

    ours_in = prepare(dtype, device)
    ours_out, ours_grads = run_backend(backend, lambda: forward_and_grads(call, ours_in, grad_out64.to(device, dtype)))
    stock_in = prepare(dtype, "cpu")
    if stock_call is not None:
        stock_out, stock_grads = forward_and_grads(stock_call, stock_in, grad_out64.to(dtype))
    else:
        stock_out, stock_grads = run_backend("reference", lambda: forward_and_grads(call, stock_in, grad_out64.to(dtype)))
    assert_matches("output", ours_out.cpu(), stock_out, ref_out)
    for name, o, s, r in zip(names, ours_grads, stock_grads, ref_grads):
        if r is not None:
            assert o is not None, f"no gradient for {name}"
            assert_matches(f"grad {name}", o.cpu(), s, r)


# (B, Hq, Hk, L, S, E, Ev): odd sizes, L != S, L or S = 1, E != Ev, E up to 256, GQA, empty batch.
SHAPES = [
    (2, 3, 3, 7, 129, 5, 9),
    (1, 2, 2, 1, 1, 1, 1),
    (1, 1, 1, 129, 63, 64, 64),
    (2, 4, 2, 63, 7, 16, 32),
    (1, 2, 2, 33, 40, 256, 8),
    (1, 2, 1, 1, 257, 32, 32),
    (0, 2, 2, 5, 5, 4, 4),
]


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_torch(backend, device, dtypes, shape, causal, poison_empty):
    B, Hq, Hk, L, S, E, Ev = shape
    q, k, v = make_qkv(*shape, seed=sum(shape))
    gqa = Hq != Hk

    def call(q, k, v, mask):
        return sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)

    def stock(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    for dtype in dtypes:
        compare(backend, device, dtype, (q, k, v, None), call, stock)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize(
    "mask_shape",
    [(2, 3, 9, 17), (9, 17), (3, 1, 17), (2, 1, 1, 17)],
    ids=["full", "broadcast_LS", "broadcast_heads", "key_padding"],
)
def test_float_mask_and_its_gradient(backend, device, dtypes, mask_shape):
    q, k, v = make_qkv(2, 3, 3, 9, 17, 8, 12, seed=3)
    mask = rand(*mask_shape, seed=7)

    def call(q, k, v, m):
        return sdpa(q, k, v, attn_mask=m)

    def stock(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    for dtype in dtypes:
        compare(backend, device, dtype, (q, k, v, mask), call, stock, grad_mask=True)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_bool_mask_broadcast_and_scale(backend, device, dtypes):
    q, k, v = make_qkv(2, 2, 2, 13, 21, 8, 8, seed=11)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(13, 21, generator=g) > 0.3

    def call(q, k, v, _):
        return sdpa(q, k, v, attn_mask=mask.to(q.device), scale=0.37)

    def stock(q, k, v, _):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.37)

    for dtype in dtypes:
        compare(backend, device, dtype, (q, k, v, None), call, stock)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("window", [(4, 0), (3, 5), (-1, 2), (0, 0)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sliding_window(backend, device, dtypes, window, causal):
    q, k, v = make_qkv(1, 2, 2, 37, 300, 8, 8, seed=13)

    def call(q, k, v, _):
        return sdpa(q, k, v, is_causal=causal, window_size=window)

    for dtype in dtypes:
        compare(backend, device, dtype, (q, k, v, None), call)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("option", ["mask", "window", "causal_long_query", "long_query"])
def test_many_key_blocks(backend, device, dtypes, option):
    # S well beyond one key tile (512 on CPU): the online softmax rescales across tiles, and a
    # window or mask that hides whole tiles from some rows. The long queries span several query
    # tiles too (256 rows on CPU), with and without a window (the CPU backward tiles differ).
    if option == "long_query" and backend != "cpu":
        pytest.skip("checks the CPU backward's unwindowed tiles; ~100 s under the Triton interpreter")
    L = 700 if option.endswith("long_query") else 37
    q, k, v = make_qkv(1, 2, 2, L, 1300, 8, 4, seed=17)
    mask = rand(1, 1, L, 1300, seed=18) * 3 if option == "mask" else None
    if mask is not None:
        mask[..., :600] = -math.inf  # the first tiles are masked for every row

    def call(q, k, v, m):
        if option == "mask":
            return sdpa(q, k, v, attn_mask=m)
        if option == "window":
            return sdpa(q, k, v, window_size=(20, 900))
        return sdpa(q, k, v, is_causal=option == "causal_long_query")

    for dtype in dtypes[:2]:
        compare(backend, device, dtype, (q, k, v, mask), call, grad_mask=mask is not None)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_broadcast_batch_dims_and_rank(backend, device, dtypes):
    # 5-D with broadcast batch dims, and key/value shared over the batch (stride 0 after expand).
    q = rand(2, 3, 2, 7, 8, seed=1)
    k = rand(1, 3, 2, 11, 8, seed=2)
    v = rand(2, 1, 2, 11, 5, seed=3)

    def call(q, k, v, _):
        return sdpa(q, k, v)

    def stock(q, k, v, _):
        return F.scaled_dot_product_attention(q, k, v)

    for dtype in dtypes:
        compare(backend, device, dtype, (q, k, v, None), call, stock)
    # 3-D (N, L, E) and 2-D (L, E)
    q3, k3, v3 = rand(3, 7, 8, seed=4), rand(3, 9, 8, seed=5), rand(3, 9, 6, seed=6)
    compare(backend, device, dtypes[0], (q3, k3, v3, None), call, stock)
    compare(backend, device, dtypes[0], (q3[0], k3[0], v3[0], None), call, stock)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_non_contiguous_inputs(backend, device, dtypes):
    # (B, L, H, E) memory seen as (B, H, L, E) (what MultiheadAttention makes), a strided feature
    # dim, and an expanded (stride 0) head dim.
    q = rand(2, 9, 3, 16, seed=1)[..., ::2].transpose(1, 2)
    k = rand(2, 11, 3, 8, seed=2).transpose(1, 2)
    v = rand(2, 1, 11, 6, seed=3).expand(2, 3, 11, 6)
    mask = rand(2, 3, 11, 9, seed=4).transpose(-1, -2)

    def call(q, k, v, m):
        return sdpa(q, k, v, attn_mask=m)

    def stock(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    for dtype in dtypes:
        compare(backend, device, dtype, (q, k, v, mask), call, stock, grad_mask=True)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_fully_masked_rows_give_zero(backend, device, dtypes):
    q, k, v = make_qkv(1, 2, 2, 6, 5, 4, 4, seed=21)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[2] = False  # query 2 sees nothing
    for dtype in dtypes:
        qd, kd, vd = (t.detach().to(device, dtype, copy=True).requires_grad_() for t in (q, k, v))
        with bigkernels.use_backend(backend):
            out, lse = sdpa(qd, kd, vd, attn_mask=mask.to(device), return_lse=True)
        out.sum().backward()
        assert torch.all(out[:, :, 2] == 0)
        assert torch.all(torch.isneginf(lse[:, :, 2])) and torch.isfinite(lse[:, :, [0, 1, 3, 4, 5]]).all()
        for t in (qd, kd, vd):
            assert torch.isfinite(t.grad).all()
        assert torch.all(qd.grad[:, :, 2] == 0)
        # The masked row contributes nothing: the same as attention without that query row.
        keep_rows = [0, 1, 3, 4, 5]
        ref_out, _ = reference.attention(q, k, v, torch.zeros(6, 5, dtype=torch.float64).masked_fill(~mask, -math.inf))
        torch.testing.assert_close(out.detach().cpu().double()[:, :, keep_rows], ref_out[:, :, keep_rows],
                                   atol={torch.bfloat16: 2e-2, torch.float16: 2e-3}.get(dtype, 1e-5), rtol=0)
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (qd[:, :, keep_rows], kd, vd))
        with bigkernels.use_backend(backend):
            sdpa(q2, k2, v2, attn_mask=mask[keep_rows].to(device)).sum().backward()
        torch.testing.assert_close(qd.grad[:, :, keep_rows], q2.grad)
        torch.testing.assert_close(kd.grad, k2.grad)
        torch.testing.assert_close(vd.grad, v2.grad)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_return_lse(backend, device, dtypes):
    q, k, v = make_qkv(2, 2, 2, 9, 14, 8, 8, seed=31)
    _, lse64 = reference.attention(q, k, v, window=(-1, 0))
    for dtype in dtypes:
        with bigkernels.use_backend(backend):
            _, lse = sdpa(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), is_causal=True, return_lse=True)
        assert lse.dtype == torch.float32 and lse.shape == (2, 2, 9)
        torch.testing.assert_close(lse.cpu().double(), lse64, atol=2e-2 if dtype != torch.float64 else 1e-6, rtol=0)


# ------------------------------------------------------------------------------------- dropout
def expected_seed(seed: int, device="cpu") -> torch.Tensor:
    """The dropout_seed the Python layer draws right after torch.manual_seed(seed) (from the
    generator of the tensors' device)."""
    torch.manual_seed(seed)
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_dropout_matches_reference_with_its_mask(backend, device, dtypes):
    B, H, L, S, p = 2, 3, 17, 33, 0.3
    q, k, v = make_qkv(B, H, H, L, S, 8, 8, seed=41)
    mask = rand(B, H, L, S, seed=42)
    seed = expected_seed(1234, device)
    keep = dropout_keep_mask(seed, B, H, L, S, p, backend).cpu()
    assert keep.dtype == torch.bool and keep.shape == (B, H, L, S)
    for dtype in dtypes:
        tensors = [t.detach().to(device, dtype, copy=True).requires_grad_() for t in (q, k, v, mask)]
        torch.manual_seed(1234)
        with bigkernels.use_backend(backend):
            out = sdpa(*tensors[:3], attn_mask=tensors[3], dropout_p=p)
        g = rand(*out.shape, seed=43)
        grads = torch.autograd.grad(out, tensors, g.to(device, dtype))
        ref64 = [t.clone().requires_grad_() for t in (q, k, v, mask)]
        r, _ = reference.attention(*ref64, dropout_keep=keep, dropout_p=p)
        rgrads = torch.autograd.grad(r, ref64, g)
        stock_in = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v, mask)]
        s, _ = reference.attention(*stock_in, dropout_keep=keep, dropout_p=p)
        sgrads = torch.autograd.grad(s, stock_in, g.to(dtype))
        assert_matches("output", out.cpu(), s, r)
        for name, a, b_, c in zip("qkvm", grads, sgrads, rgrads):
            assert_matches(f"grad {name}", a.cpu(), b_, c)


@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
def test_dropout_reproducible_and_keep_rate(backend, device, dtypes):
    q, k, v = (t.to(device, dtypes[0]) for t in make_qkv(2, 2, 2, 16, 24, 8, 8, seed=51))
    with bigkernels.use_backend(backend):
        torch.manual_seed(7)
        a = sdpa(q, k, v, dropout_p=0.5)
        torch.manual_seed(7)
        b = sdpa(q, k, v, dropout_p=0.5)
        c = sdpa(q, k, v, dropout_p=0.5)  # generator advanced: another mask
        plain = sdpa(q, k, v)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, plain)
    # keep-rate statistics over 4 * 4 * 64 * 64 = 65536 draws: within 6 standard deviations
    for p in (0.1, 0.5, 0.9):
        keep = dropout_keep_mask(expected_seed(3, device), 4, 4, 64, 64, p, backend).cpu()
        rate = keep.double().mean().item()
        sigma = math.sqrt(p * (1 - p) / keep.numel())
        assert abs(rate - (1 - p)) < 6 * sigma, (p, rate)
        # no structure across heads or rows: neighbouring rows / heads differ
        assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0], keep[0, 1])
    assert dropout_keep_mask(expected_seed(3, device), 1, 1, 8, 8, 0.0, backend).all()


# -------------------------------------------------------------------------------------- varlen
@pytest.mark.parametrize("backend,device,dtypes", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_matches_per_sequence(backend, device, dtypes, causal):
    lengths_q, lengths_k = [5, 0, 7, 28, 1], [9, 3, 7, 20, 1]
    Hq, Hk, E, Ev = 4, 2, 8, 6
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
    q, k, v = rand(sum(lengths_q), Hq, E, seed=61), rand(sum(lengths_k), Hk, E, seed=62), rand(sum(lengths_k), Hk, Ev, seed=63)

    def call(q, k, v, _):
        return sdpa(q, k, v, is_causal=causal, enable_gqa=True, cu_seqlens_q=cu_q.to(q.device),
                    cu_seqlens_k=cu_k.to(q.device))

    for dtype in dtypes:
        compare(backend, device, dtype, (q, k, v, None), call)
    # the same as running each sequence alone through the padded path
    dtype = dtypes[0]
    qd, kd, vd = (t.to(device, dtype) for t in (q, k, v))
    with bigkernels.use_backend(backend):
        packed = call(qd, kd, vd, None)
        for n in range(len(lengths_q)):
            rows = slice(int(cu_q[n]), int(cu_q[n + 1]))
            keys = slice(int(cu_k[n]), int(cu_k[n + 1]))
            alone = sdpa(qd[rows].transpose(0, 1), kd[keys].transpose(0, 1), vd[keys].transpose(0, 1),
                         is_causal=causal, enable_gqa=True).transpose(0, 1)
            torch.testing.assert_close(packed[rows], alone)


# ---------------------------------------------------------------------------- hypothesis sweep
@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 2), Hk=st.integers(1, 2), group=st.integers(1, 3), L=st.integers(1, 70), S=st.integers(1, 70),
    E=st.integers(1, 40), Ev=st.integers(1, 40), causal=st.booleans(), left=st.integers(-1, 20),
    use_mask=st.booleans(), seed=st.integers(0, 1000),
)
def test_hypothesis_sweep_cpu(B, Hk, group, L, S, E, Ev, causal, left, use_mask, seed):
    q, k, v = make_qkv(B, Hk * group, Hk, L, S, E, Ev, seed=seed)
    mask = rand(1, Hk * group, L, S, seed=seed + 5) if use_mask and not causal else None

    def call(q, k, v, m):
        return sdpa(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True, window_size=(left, -1))

    compare("cpu", "cpu", torch.float32, (q, k, v, mask), call, grad_mask=mask is not None)


# ------------------------------------------------------------------------ gradcheck, opcheck, compile
@pytest.mark.parametrize("option", ["mask", "causal_gqa", "window"])
def test_gradcheck_float64(option):
    # small: gradcheck costs two forward calls per input element
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 1 if option == "causal_gqa" else 2, 5, 6, 3, 2, seed=71))
    mask = rand(1, 2, 5, 6, seed=72).requires_grad_()
    if option == "mask":
        fn = lambda q, k, v, m: sdpa(q, k, v, attn_mask=m)  # noqa: E731
        args = (q, k, v, mask)
    elif option == "causal_gqa":
        fn = lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        args = (q, k, v)
    else:
        fn = lambda q, k, v: sdpa(q, k, v, window_size=(1, 1))  # noqa: E731
        args = (q, k, v)
    with bigkernels.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_dropout_float64():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 4, 5, 3, 2, seed=73))

    def fn(q, k, v):
        torch.manual_seed(0)  # the same mask at every evaluation
        return sdpa(q, k, v, dropout_p=0.4)

    with bigkernels.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, (q, k, v))


def _op_args(dtype=torch.float32, mask=True, dropout=False):
    q, k, v = (t.to(dtype) for t in make_qkv(2, 4, 2, 7, 9, 8, 6, seed=81))
    m = rand(2, 4, 7, 9, seed=82).to(dtype) if mask else None
    seed = torch.tensor([5, 6], dtype=torch.int64) if dropout else None
    return [q, k, v, m, None, None, 0, 0, 0.3, -1, -1, 0.2 if dropout else 0.0, seed]


@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_cpu_ops(dropout):
    args = _op_args(dropout=dropout)
    for t in args[:4]:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.bigkernels.attention.default, args)
    out, lse = torch.ops.bigkernels.attention(*args)
    bargs = [torch.randn_like(out), *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:3]], out.detach(),
             lse, args[3].detach(), *args[4:], True]
    torch.library.opcheck(torch.ops.bigkernels.attention_backward.default, bargs)
    torch.library.opcheck(torch.ops.bigkernels.attention_dropout_mask.default, (torch.tensor([1, 2]), 2, 3, 4, 5, 0.25))


def test_opcheck_varlen_cpu():
    q, k, v = (t.transpose(0, 1).unsqueeze(0).float() for t in (rand(12, 2, 4, seed=1), rand(9, 2, 4, seed=2), rand(9, 2, 4, seed=3)))
    cu_q, cu_k = torch.tensor([0, 5, 12], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    args = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, cu_q, cu_k, 7, 5, 0.5, -1, 0, 0.0, None]
    torch.library.opcheck(torch.ops.bigkernels.attention.default, args)


@pytest.mark.triton
@pytest.mark.skipif(TRITON_MISSING, reason="bigkernels/triton/attention.py is not in this tree yet")
def test_opcheck_triton_ops():
    args = _op_args(mask=True)
    args = [a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    for t in args[:4]:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.bigkernels.attention_triton.default, args)


def test_compile_fullgraph():
    q, k, v = (t.float().requires_grad_() for t in make_qkv(2, 4, 2, 9, 11, 8, 8, seed=91))
    mask = rand(9, 11, seed=92).float().requires_grad_()

    def f(q, k, v, m):
        return sdpa(q, k, v, attn_mask=m, enable_gqa=True, scale=0.5) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, mask)
    expected = f(q, k, v, mask)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v, mask))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v, mask))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)
    causal = torch.compile(lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True, window_size=(3, -1)), fullgraph=True)
    torch.testing.assert_close(causal(q, k, v), sdpa(q, k, v, is_causal=True, enable_gqa=True, window_size=(3, -1)))


def test_compile_fullgraph_varlen_without_max_seqlen():
    """Varlen without max_seqlen_q/k reads no tensor value under compile: no graph break."""
    q, k, v = (t.float().requires_grad_() for t in make_qkv(1, 4, 4, 10, 10, 8, 8, seed=93))
    q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # (total, heads, E): sequences of 3 and 7 rows
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)

    def f(q, k, v):
        return sdpa(q, k, v, is_causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(f(q, k, v).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------- memory
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    import bigkernels
    from bigkernels.nn.functional import scaled_dot_product_attention as sdpa
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.set_num_threads(1)

    def status_mb(field):
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    def peak_growth_mb(fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        start = status_mb("VmRSS")
        fn()
        return status_mb("VmHWM") - start

    q, k, v = (torch.randn(1, 2, 4096, 32, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 2, 4096, 32)
    def math_path():
        with sdpa_kernel([SDPBackend.MATH]):
            torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(g)

    # Warm up both paths once at this size (libraries, thread pools, and glibc's malloc, whose first
    # large frees raise its mmap threshold: a one-time ~34 MiB heap growth, the same at L = 2048 and
    # 8192), so that only each call's own working set counts.
    sdpa(q, k, v).backward(g)
    math_path()
    ours = peak_growth_mb(lambda: sdpa(q, k, v).backward(g))
    math_path_mb = peak_growth_mb(math_path)
    print(json.dumps({"ours_mb": ours, "math_mb": math_path_mb}))
""")



def test_memory_is_linear_in_length():
    """Forward + backward at L = S = 4096 (2 heads): the peak RSS growth of the flash kernel against
    torch's math path (which holds several L x S float matrices, 128 MiB each), each measured as the
    growth of the process's peak RSS (VmHWM, reset before each run) over its RSS at the start."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Every allocation of 64 KiB or more gets its own fresh mapping, returned on free: the peak RSS
    # then follows the live tensors, not whatever the heap kept from earlier work.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, root], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr
    sizes = json.loads(result.stdout.strip().splitlines()[-1])
    # ours: ~3 MiB of gradients + O(L) buffers; math: >= 3 x 128 MiB
    assert sizes["math_mb"] > 200, sizes
    assert sizes["ours_mb"] * 10 < sizes["math_mb"], sizes


# ---------------------------------------------------------------------------------- bad input
def test_bad_input():
    q, k, v = (t.float() for t in make_qkv(2, 4, 2, 5, 6, 8, 8, seed=1))
    with pytest.raises(ValueError, match="query must have at least 2 dims"):
        sdpa(q[0, 0, 0], k, v)
    with pytest.raises(ValueError, match="key must have the query's head dim"):
        sdpa(q, k[..., :4], v, enable_gqa=True)
    with pytest.raises(ValueError, match="value must have the key's length"):
        sdpa(q, k, v[:, :, :3], enable_gqa=True)
    with pytest.raises(ValueError, match="batch dims must broadcast"):
        sdpa(q, torch.cat([k, k, k])[:3], torch.cat([v, v, v])[:3], enable_gqa=True)
    with pytest.raises(ValueError, match="same number of heads"):
        sdpa(q, k, v)  # 4 vs 2 heads without enable_gqa
    with pytest.raises(ValueError, match="multiple of the key's heads"):
        sdpa(q[:, :3], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="key and value must have the same number of heads"):
        sdpa(q, k, v[:, :1], enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask must be broadcastable"):
        sdpa(q, k, v, attn_mask=torch.zeros(5, 7), enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask must be bool or have the dtype of query"):
        sdpa(q, k, v, attn_mask=torch.zeros(5, 6, dtype=torch.float64), enable_gqa=True)
    with pytest.raises(TypeError, match="key must have the dtype of query"):
        sdpa(q, k.double(), v, enable_gqa=True)
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p must be"):
            sdpa(q, k, v, dropout_p=p, enable_gqa=True)
    with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):
        sdpa(q, k, v, attn_mask=torch.zeros(5, 6), is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match="window_size"):
        sdpa(q, k, v, window_size=(-2, 0), enable_gqa=True)
    with pytest.raises(TypeError, match="query must be a floating-point"):
        sdpa(q.int(), k, v)
    with pytest.raises(ValueError, match="must be 3-D"):
        sdpa(q, k, v, cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 6], dtype=torch.int32))
    q3, k3 = q[0].transpose(0, 1), k[0].transpose(0, 1)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q\[-1\] must equal the packed length"):
        sdpa(q3, k3, k3, cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32),
             cu_seqlens_k=torch.tensor([0, 6], dtype=torch.int32), enable_gqa=True)
    # the C++ op's own checks
    with pytest.raises(RuntimeError, match="attn_mask must have shape"):
        torch.ops.bigkernels.attention(q, k, v, torch.zeros(2, 4, 5, 5), None, None, 0, 0, 1.0, -1, -1, 0.0, None)
    with pytest.raises(RuntimeError, match="dividing"):
        torch.ops.bigkernels.attention(q[:, :3], k, v, None, None, None, 0, 0, 1.0, -1, -1, 0.0, None)


def test_float16_on_cpu():
    q, k, v = make_qkv(2, 2, 2, 9, 13, 8, 8, seed=101)

    def call(q, k, v, _):
        return sdpa(q, k, v, is_causal=True)

    def stock(q, k, v, _):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    compare("cpu", "cpu", torch.float16, (q, k, v, None), call, stock)


@pytest.mark.parametrize("inputs", ["float32", "mixed", "float64"])
def test_autocast_cpu_runs_in_the_autocast_dtype_like_torch(inputs):
    """torch's SDPA is on CPU autocast's lower-precision list: float32 (and mixed) inputs run and return
    in bfloat16, float64 stays float64, a float mask is cast with them. Ours does the same, and its
    bfloat16 result meets the DESIGN rule against the float64 reference."""
    q, k, v, mask = *make_qkv(2, 2, 2, 9, 13, 8, 8, seed=103), rand(9, 13, seed=104)
    if inputs != "float64":
        q, k, v, mask = (t.float() for t in (q, k, v, mask))
    if inputs == "mixed":
        q = q.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sdpa(q, k, v, attn_mask=mask)
        stock = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ours.dtype == stock.dtype == (torch.float64 if inputs == "float64" else torch.bfloat16)
    ref = reference.attention(*(t.double() for t in (q, k, v)), mask.double().expand(2, 2, 9, 13),
                              1 / math.sqrt(8), (-1, -1))[0]
    assert_matches("output", ours, stock, ref)


# ------------------------------------------------------------------------------------ benchmark
def test_bench_cases_flops_and_providers():
    from bigkernels.bench import attention as bench
    from bigkernels.bench.cases import Case, select_cases
    from bigkernels.bench.runner import max_abs_error

    case = Case("attention", dict(B=2, H=2, L=33, D=8, causal=1), torch.float32, "fwd+bwd", "cpu")
    assert bench.flops(case) == int(4 * 2 * 2 * 33 * 33 * 8 // 2 * 3.5)
    assert bench.flops(Case("attention", dict(B=1, H=1, L=4, D=2, causal=0), torch.float32, "fwd", "cpu")) == 4 * 16 * 2
    inputs = bench.make_inputs(case)
    expected = bench.reference_outputs(case, inputs)
    providers, skipped = bench.providers(case, full=False)
    names = [p.name for p in providers]
    assert names == ["bigkernels", "bigkernels[cpu]", "torch", "torch.compile"] and "bigkernels[triton]" in skipped
    for provider in providers[:3]:  # torch.compile is exercised by the bench suite itself
        assert max_abs_error(provider.build(case, inputs).next_call()(), expected) < 1e-4
    quick = select_cases(["attention"], device="cpu")
    assert {c.shape["causal"] for c in quick} == {0, 1} and all(c.dtype == torch.float32 for c in quick)
    assert all(c.shape["B"] * c.shape["L"] >= 4096 and 512 <= c.shape["H"] * c.shape["D"] <= 2048 for c in quick)
    gpu = select_cases(["attention"], device="cuda")
    assert {c.shape["D"] for c in gpu} == {64, 128} and {c.dtype for c in gpu} == {torch.bfloat16}


# ------------------------------------------------------------------------- Triton op plumbing
def test_triton_custom_ops_plumbing_with_a_stand_in_launcher(monkeypatch):
    """bigkernels::attention_triton / attention_backward_triton (declared in bigkernels/ops/attention.py)
    with the launcher module replaced by one that runs the CPU kernels: checks the custom ops' schema,
    fake implementations, autograd and dispatch without Triton, so the glue is tested even before
    (or without) the Triton kernels."""
    import types

    stand_in = types.ModuleType("bigkernels.triton.attention")
    stand_in.attention_forward = lambda *args: tuple(t.clone() for t in torch.ops.bigkernels.attention(*args))
    stand_in.attention_backward = lambda *args: tuple(t.clone() for t in torch.ops.bigkernels.attention_backward(*args))
    stand_in.dropout_keep_mask = lambda seed, B, H, L, S, p, device: torch.ops.bigkernels.attention_dropout_mask(seed, B, H, L, S, p)
    import bigkernels.triton as triton_package

    monkeypatch.setitem(sys.modules, "bigkernels.triton.attention", stand_in)
    monkeypatch.setattr(triton_package, "attention", stand_in, raising=False)
    args = _op_args(mask=True)
    for t in args[:4]:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.bigkernels.attention_triton.default, args)
    out, lse = torch.ops.bigkernels.attention_triton(*args)
    ref_out, ref_lse = torch.ops.bigkernels.attention(*args)
    torch.testing.assert_close(out, ref_out)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, args[:4], g)
    ref_grads = torch.autograd.grad(ref_out, args[:4], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    bargs = [g, *[a.detach() for a in args[:3]], out.detach(), lse, args[3].detach(), *args[4:], True]
    torch.library.opcheck(torch.ops.bigkernels.attention_backward_triton.default, bargs)


@pytest.mark.parametrize("shape", [(1, 1, 1, 600, 700), (2, 4, 2, 70, 300)], ids=["one_head_split", "gqa"])
def test_backward_is_deterministic(shape):
    """No atomics: the same call gives bitwise the same gradients (also when one head's key blocks
    are shared out over threads, the first shape, and for grouped-query heads, the second)."""
    B, Hq, Hk, L, S = shape
    q, k, v = (t.float().requires_grad_() for t in make_qkv(B, Hq, Hk, L, S, 16, 8, seed=111))
    g = rand(B, Hq, L, 8, seed=112).float()

    def grads():
        with bigkernels.use_backend("cpu"):
            out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(out, (q, k, v), g)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
