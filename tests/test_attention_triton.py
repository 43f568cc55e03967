"""The Triton flash-attention kernels (bigkernels/triton/attention.py), called through their launchers.

On this CPU-only CI they run under the Triton interpreter (tests/conftest.py), so the shapes are tiny
and each case runs forward and backward once; they still span several 16-row tiles of the
interpreter's config, so tile edges, loops and skipped blocks are exercised. Every result is judged by
the DESIGN rule against bigkernels.reference.attention in float64, "stock" being the same reference
in the test dtype. `cuda` tests at realistic shapes compare with torch's SDPA on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from bigkernels import reference
from conftest import HAS_CUDA
from numerics import assert_matches

attention_triton = pytest.importorskip("bigkernels.triton.attention")

pytestmark = pytest.mark.triton
DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: the Triton interpreter
# bf16 tl.dot is wrong under the interpreter (DESIGN.md): bf16 is checked by the cuda tests only.
DTYPES = [torch.float32, torch.float16]


def _random(generator, shape, dtype, layout, device=DEVICE):
    """Fresh random values of `shape` (B, H, N, D) in one of the memory layouts the kernels must read:
    contiguous, "transposed" ((B, N, H, D) memory, as MultiheadAttention makes), "strided" (every
    other element of the last dim) or "broadcast" (stride 0 over the batch, like expand)."""
    B, H, N, D = shape
    if layout == "transposed":
        t = torch.randn(B, N, H, D, generator=generator).transpose(1, 2)
    elif layout == "strided":
        t = torch.randn(B, H, N, 2 * D, generator=generator)[..., ::2]
    elif layout == "broadcast":
        t = torch.randn(1, H, N, D, generator=generator).expand(B, H, N, D)
    else:
        t = torch.randn(B, H, N, D, generator=generator)
    return t.to(device=device, dtype=dtype)


def _reference_grads(dtype, q, k, v, mask, grad_output, *, window, keep, dropout_p, cu_q, cu_k, mask_grad):
    """(output, lse, grads) of bigkernels.reference.attention in `dtype` on CPU."""
    leaves = [x.detach().cpu().to(dtype).requires_grad_() for x in (q, k, v)]
    mask_leaf = None if mask is None else mask.detach().cpu().to(dtype).requires_grad_(mask_grad)
    keep = None if keep is None else keep.cpu()
    cu = {} if cu_q is None else dict(cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu())
    out, lse = reference.attention(*leaves, mask_leaf, scale=q.shape[-1] ** -0.5, window=window,
                                   dropout_keep=keep, dropout_p=dropout_p, **cu)
    inputs = leaves + ([mask_leaf] if mask_grad else [])
    grads = torch.autograd.grad(out, inputs, grad_output.detach().cpu().to(dtype))
    return out.detach(), lse.detach(), grads


def _assert_lse(ours, stock, ref64):
    """lse is -inf exactly on the rows that see no key; elsewhere the DESIGN rule (float32 output)."""
    dead = torch.isinf(ref64)
    assert torch.equal(torch.isneginf(ours.cpu()), dead), "lse: -inf rows differ from the reference"
    assert_matches("lse", ours.cpu()[~dead], stock.float()[~dead], ref64[~dead])


def check_against_reference(dtype, B, Hq, Hk, L, S, E, Ev, *, layouts=("contiguous",) * 3, mask=None,
                            window=(-1, -1), dropout_p=0.0, cu_seqlens=None, mask_grad=False, seed=0):
    """Forward and backward of the Triton launchers against the float64 reference, every output.
    mask: None, "random" (additive, full shape), "broadcast" (a (L, S) mask expanded with stride 0)
    or "dead_rows" (a boolean keep pattern with some rows fully masked, turned into 0 / -inf)."""
    g = torch.Generator().manual_seed(seed)
    q = _random(g, (B, Hq, L, E), dtype, layouts[0])
    k = _random(g, (B, Hk, S, E), dtype, layouts[1])
    v = _random(g, (B, Hk, S, Ev), dtype, layouts[2])
    attn_mask = None
    if mask == "random":
        attn_mask = torch.randn(B, Hq, L, S, generator=g).to(DEVICE, dtype)
    elif mask == "broadcast":
        attn_mask = torch.randn(L, S, generator=g).to(DEVICE, dtype).expand(B, Hq, L, S)
    elif mask == "dead_rows":
        allowed = torch.rand(B, Hq, L, S, generator=g) > 0.3
        allowed[:, :, ::3] = False  # every third row sees no key
        attn_mask = torch.zeros(B, Hq, L, S).masked_fill(~allowed, float("-inf")).to(DEVICE, dtype)
    cu_q = cu_k = None
    max_q = max_k = 0
    if cu_seqlens is not None:
        lengths_q, lengths_k = cu_seqlens
        cu_q = torch.tensor([0] + lengths_q, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
        cu_k = torch.tensor([0] + lengths_k, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
        max_q, max_k = max(lengths_q), max(lengths_k)
        assert (B, L, S) == (1, sum(lengths_q), sum(lengths_k))
    dropout_seed = keep = None
    if dropout_p > 0:
        dropout_seed = torch.randint(0, 2**62, (2,), generator=g, dtype=torch.int64).to(DEVICE)
        keep = attention_triton.dropout_keep_mask(dropout_seed, B, Hq, L, S, dropout_p, DEVICE)
    scale = E ** -0.5
    args = (attn_mask, cu_q, cu_k, max_q, max_k, scale, window[0], window[1], dropout_p, dropout_seed)

    out, lse = attention_triton.attention_forward(q, k, v, *args)
    assert out.shape == (B, Hq, L, Ev) and out.transpose(1, 2).is_contiguous(), "output memory is (B, L, Hq, Ev)"
    grad_output = torch.randn(B, Hq, L, Ev, generator=g).to(DEVICE, dtype)
    grads = attention_triton.attention_backward(grad_output, q, k, v, out, lse, *args, mask_grad)

    common = dict(window=window, keep=keep, dropout_p=dropout_p, cu_q=cu_q, cu_k=cu_k, mask_grad=mask_grad)
    out64, lse64, grads64 = _reference_grads(torch.float64, q, k, v, attn_mask, grad_output, **common)
    out_st, lse_st, grads_st = _reference_grads(dtype, q, k, v, attn_mask, grad_output, **common)
    assert_matches("output", out.cpu(), out_st, out64)
    _assert_lse(lse, lse_st, lse64)
    names = ["grad_query", "grad_key", "grad_value"] + (["grad_attn_mask"] if mask_grad else [])
    for name, ours, stock, ref in zip(names, grads, grads_st, grads64):
        assert_matches(name, ours.cpu(), stock, ref)
    if not mask_grad:
        assert grads[3].shape == (0,)
    return out, lse, grads


# ------------------------------------------------------------------------------- numerics, options
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, Hq, Hk, L, S, E, Ev, window",
    [
        pytest.param(2, 2, 2, 33, 21, 16, 16, (-1, -1), id="L33_S21"),
        pytest.param(1, 4, 2, 7, 40, 72, 24, (-1, 0), id="gqa_causal_E72_Ev24"),
        # Window (1, 1): the block-skipping bounds land exactly on a 16-row tile edge here.
        pytest.param(1, 3, 1, 18, 18, 1, 5, (1, 1), id="mqa_window_E1_Ev5"),
    ],
)
def test_matches_reference(poison_empty, dtype, B, Hq, Hk, L, S, E, Ev, window):
    check_against_reference(dtype, B, Hq, Hk, L, S, E, Ev, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_additive_mask_and_its_gradient(poison_empty, dtype):
    check_against_reference(dtype, 1, 2, 1, 17, 35, 16, 16, mask="random", mask_grad=True, window=(-1, 0))


def test_broadcast_and_non_contiguous_inputs(poison_empty):
    # query broadcast over the batch (stride 0), key in (B, S, H, E) memory, value strided; the mask is
    # one (L, S) matrix expanded over batch and heads.
    check_against_reference(torch.float32, 2, 2, 2, 19, 23, 8, 12, layouts=("broadcast", "transposed", "strided"),
                            mask="broadcast")


def test_rows_that_see_no_key(poison_empty):
    # Fully masked rows (mask -inf) and rows past the window's reach (i - 2 > S - 1): output 0,
    # lse -inf, gradients 0, no NaN anywhere.
    out, lse, grads = check_against_reference(torch.float16, 1, 2, 2, 24, 9, 16, 16, mask="dead_rows",
                                              mask_grad=True)
    assert (out[:, :, ::3] == 0).all() and torch.isneginf(lse[:, :, ::3]).all()
    assert (grads[0][:, :, ::3] == 0).all() and (grads[3][:, :, ::3] == 0).all()
    out, lse, _ = check_against_reference(torch.float32, 1, 1, 1, 20, 9, 16, 16, window=(2, -1))
    assert (out[:, :, 11:] == 0).all() and torch.isneginf(lse[:, :, 11:]).all()


def test_varlen(poison_empty):
    # Sequences of lengths 5/9, 0/3, 17/1, 2/0 (a sequence with no key: rows output 0), causal.
    lengths_q, lengths_k = [5, 0, 17, 2], [9, 3, 1, 0]
    check_against_reference(torch.float32, 1, 2, 1, sum(lengths_q), sum(lengths_k), 16, 8,
                            cu_seqlens=(lengths_q, lengths_k), window=(-1, 0))
    check_against_reference(torch.float16, 1, 2, 2, 20, 20, 16, 16, cu_seqlens=([3, 17], [3, 17]), window=(5, 1))


# ------------------------------------------------------------------------------------------ dropout
def test_dropout_matches_reference_with_the_kernels_keep_mask(poison_empty):
    check_against_reference(torch.float32, 1, 2, 1, 21, 18, 16, 16, dropout_p=0.3, window=(-1, 0))


def test_dropout_keep_mask_rate_and_determinism():
    seed = torch.tensor([1234, 99], dtype=torch.int64, device=DEVICE)
    keep = attention_triton.dropout_keep_mask(seed, 2, 3, 40, 50, 0.25, DEVICE)
    assert keep.dtype == torch.bool and keep.shape == (2, 3, 40, 50)
    rate = keep.float().mean().item()
    assert abs(rate - 0.75) < 0.02, f"keep rate {rate} for p = 0.25"
    assert torch.equal(keep, attention_triton.dropout_keep_mask(seed, 2, 3, 40, 50, 0.25, DEVICE))
    # A pure function of the coordinates: a smaller mask is a corner of the bigger one.
    assert torch.equal(keep[:1, :2, :7, :9], attention_triton.dropout_keep_mask(seed, 1, 2, 7, 9, 0.25, DEVICE))
    other = attention_triton.dropout_keep_mask(seed + 1, 2, 3, 40, 50, 0.25, DEVICE)
    assert not torch.equal(keep, other), "a different seed must give a different mask"
    shifted = attention_triton.dropout_keep_mask(seed + torch.tensor([0, 1], device=DEVICE), 2, 3, 40, 50, 0.25, DEVICE)
    assert not torch.equal(keep, shifted), "a different offset must give a different mask"


# ------------------------------------------------------------------- launch rules (bigkernels/triton/_launch.py)
def test_launchers_refuse_mixed_devices_naming_the_arguments():
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 5, 8, device="meta")
    args = (None, None, None, 0, 0, 0.5, -1, -1, 0.0, None)
    with pytest.raises(RuntimeError, match=r"attention_triton: all tensors must be on one device, but query is on "
                                           r"cpu and key on meta"):
        attention_triton.attention_forward(q, k, q, *args)
    with pytest.raises(RuntimeError, match=r"grad_output is on cpu and lse on meta"):
        attention_triton.attention_backward(q, q, q, q, q, torch.empty(1, 2, 5, device="meta"), *args, False)


def test_device_guard_selection():
    """Triton launches on the current CUDA device: a CUDA tensor's launch runs under its device (index
    kept, so cuda:1 tensors launch on cuda:1), anything else under no guard at all."""
    import contextlib

    from bigkernels.triton import _launch

    guard = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_launch.device_guard(torch.device("cuda")), torch.cuda.device)
    for device in (torch.device("cpu"), torch.device("meta"), None):
        assert isinstance(_launch.device_guard(device), contextlib.nullcontext)
    cpu = torch.empty(1)
    assert _launch.common_device("op", [("a", cpu), ("b", None), ("c", cpu)]) == torch.device("cpu")
    assert _launch.common_device("op", [("a", None)]) is None
    with pytest.raises(RuntimeError, match="bigkernels::op: .* but a is on cpu and c on meta"):
        _launch.common_device("op", [("a", cpu), ("b", None), ("c", torch.empty(1, device="meta"))])


def test_grid_folds_a_batch_above_cudas_limit():
    """grid z = batch passes CUDA's 65 535 (e.g. 100 000 sequences of varlen): the excess folds into x,
    every (block, head, batch) is covered exactly once, no axis is above its limit."""
    from bigkernels.triton._launch import GRID_YZ_LIMIT, MAX_GRID_X

    for length, block, heads, batch in ((4096, 64, 16, 100_000), (1, 16, 1, 65_535), (1 << 20, 16, 32, 65_536),
                                        (300, 128, 8, 3 * 65_535 + 1)):
        (x, y, z), chunks, span = attention_triton.attention_grid("op", length, block, heads, batch)
        blocks = -(-length // block)
        assert z <= GRID_YZ_LIMIT and y == heads and x <= MAX_GRID_X
        assert x == blocks * chunks and z == span and chunks * span >= batch > (chunks - 1) * span
    with pytest.raises(RuntimeError, match="70000 programs along grid axis y"):
        attention_triton.attention_grid("op", 16, 16, 70_000, 1)


@pytest.mark.parametrize("limit", [2, 3])
def test_folded_batch_indexing_matches_the_plain_grid(monkeypatch, limit):
    """With CUDA's limit forced down to 2 or 3, batch 5 (and 5 varlen sequences) runs folded, the last
    chunk ragged; forward, backward (delta, dK/dV, dQ) and the dropout mask must equal the plain grid's."""
    from bigkernels.triton import _launch

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(5, 2, 19, 16, generator=g).to(DEVICE) for _ in range(3))
    cu = torch.tensor([0, 3, 10, 10, 15, 19], dtype=torch.int32, device=DEVICE)
    seed = torch.tensor([7, 1], dtype=torch.int64, device=DEVICE)
    calls = [(q, k, v, (None, None, None, 0, 0, 0.25, -1, 0, 0.2, seed)),
             (q[:1], k[:1], v[:1], (None, cu, cu, 7, 7, 0.25, -1, -1, 0.0, None))]

    def run_all():
        results = [attention_triton.dropout_keep_mask(seed, 5, 2, 19, 21, 0.3, DEVICE)]
        for qq, kk, vv, args in calls:
            out, lse = attention_triton.attention_forward(qq, kk, vv, *args)
            do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
            results += [out, lse, *attention_triton.attention_backward(do, qq, kk, vv, out, lse, *args, False)[:3]]
        return results

    plain = run_all()
    monkeypatch.setattr(_launch, "GRID_YZ_LIMIT", limit)
    assert attention_triton.attention_grid("op", 19, 16, 2, 5)[1:] == (-(-5 // limit), limit)
    for a, b in zip(plain, run_all()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------- edge cases
def test_backward_is_deterministic():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 20, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    args = (None, None, None, 0, 0, 0.25, -1, -1, 0.0, None)
    out, lse = attention_triton.attention_forward(q, k, v, *args)
    do = torch.randn(out.shape, generator=g)
    first = attention_triton.attention_backward(do, q, k, v, out, lse, *args, False)
    second = attention_triton.attention_backward(do, q, k, v, out, lse, *args, False)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B, L, S", [(0, 5, 5), (1, 0, 5), (1, 5, 0)], ids=["batch0", "L0", "S0"])
def test_empty_sizes(B, L, S):
    q, k, v = torch.randn(B, 2, L, 8), torch.randn(B, 2, S, 8), torch.randn(B, 2, S, 8)
    args = (None, None, None, 0, 0, 0.5, -1, -1, 0.0, None)
    out, lse = attention_triton.attention_forward(q, k, v, *args)
    assert out.shape == (B, 2, L, 8) and lse.shape == (B, 2, L)
    if S == 0:  # nothing to see: output 0, lse -inf
        assert (out == 0).all() and torch.isneginf(lse).all()
    grads = attention_triton.attention_backward(torch.randn(B, 2, L, 8), q, k, v, out, lse, *args, False)
    for grad, x in zip(grads[:3], (q, k, v)):
        assert grad.shape == x.shape and (grad == 0).all()


def test_bad_input_names_the_argument():
    q, k, v = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    args = (None, None, None, 0, 0, 0.5, -1, -1, 0.0, None)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        attention_triton.attention_forward(q, k, v, *args)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        attention_triton.attention_forward(q[:, :2].double(), k.double(), v.double(), *args)
    with pytest.raises(RuntimeError, match="attn_mask must have shape"):
        attention_triton.attention_forward(q[:, :2], k, v, torch.zeros(1, 2, 4, 5), *args[1:])
    with pytest.raises(RuntimeError, match="dropout_seed"):
        attention_triton.attention_forward(q[:, :2], k, v, *args[:8], 0.1, None)
    with pytest.raises(RuntimeError, match="head dim E must be in 1..256"):
        big = torch.randn(1, 1, 2, 300)
        attention_triton.attention_forward(big, big, big, *args)


# ------------------------------------------------------------------------- GPU: realistic shapes
def _sdpa_reference(q, k, v, is_causal, grad_output, dtype, backend_math):
    """torch SDPA output and gradients in `dtype` (its best GPU backend, or the math one in float64)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    if backend_math:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=is_causal)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=is_causal)
    return out, torch.autograd.grad(out, leaves, grad_output.to(dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("L, D", [(1024, 64), (2048, 128), (4096, 64), (1531, 128)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_matches_sdpa_at_realistic_shapes(dtype, L, D, causal):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H = 2, 4
    q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    grad_output = torch.randn(B, H, L, D, device="cuda", generator=g, dtype=dtype)
    args = (None, None, None, 0, 0, D ** -0.5, -1, 0 if causal else -1, 0.0, None)
    out, lse = attention_triton.attention_forward(q, k, v, *args)
    grads = attention_triton.attention_backward(grad_output, q, k, v, out, lse, *args, False)
    out64, grads64 = _sdpa_reference(q, k, v, causal, grad_output, torch.float64, True)
    out_st, grads_st = _sdpa_reference(q, k, v, causal, grad_output, dtype, False)
    assert_matches("output", out, out_st, out64)
    for name, ours, stock, ref in zip(("grad_query", "grad_key", "grad_value"), grads, grads_st, grads64):
        assert_matches(name, ours, stock, ref)


@pytest.mark.cuda
def test_gpu_gqa_window_dropout_varlen_bf16():
    # Every option at once on the GPU, small enough for the float64 reference.
    for mask, window, dropout_p, cu in [("random", (-1, 0), 0.0, None), (None, (64, 0), 0.2, None),
                                        (None, (-1, 0), 0.0, ([100, 300, 7], [90, 310, 7]))]:
        B, L, S = (1, 407, 407) if cu else (2, 300, 333)
        check_against_reference(torch.bfloat16, B, 8, 2, L, S, 128, 64, mask=mask, window=window,
                                dropout_p=dropout_p, cu_seqlens=cu, mask_grad=mask is not None)


@pytest.mark.cuda
def test_gpu_fp32_uses_tf32_only_when_allowed():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 64, device="cuda", generator=g) for _ in range(3))
    args = (None, None, None, 0, 0, 0.125, -1, -1, 0.0, None)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        out, _ = attention_triton.attention_forward(q, k, v, *args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    out64, _ = reference.attention(q.double(), k.double(), v.double(), scale=0.125)
    assert (out.double() - out64).abs().max().item() < 1e-5, "ieee float32 dots expected"
