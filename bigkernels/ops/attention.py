"""bigkernels::attention: flash attention (forward and backward without the L x S score matrix).

Ops (one schema each, the interface is in csrc/ops.cpp):
  bigkernels::attention / attention_backward                 C++ CPU kernels (csrc/cpu/attention.cpp)
  bigkernels::attention_dropout_mask                         the CPU kernels' dropout keep mask
  bigkernels::attention_triton / attention_backward_triton   Triton kernels (bigkernels/triton/attention.py)
The ops take the canonical layout: query (B, Hq, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev),
any strides, an additive mask of shape (B, Hq, L, S) (any strides, stride 0 for broadcast dims), a
window (left, right) instead of is_causal. This module turns torch's SDPA calling convention into
that layout (broadcast batch dims by expand, boolean mask -> additive at the mask's own size,
is_causal -> window, scale None -> 1/sqrt(E), dropout seed from torch's generator), validates the
arguments naming the one at fault, declares the candidates the chooser picks from
(bigkernels/_chooser.py: our kernels and torch's own function), and registers the
fake implementations and the autograd formula of every op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

import torch.nn.functional as F

from bigkernels import _extension, reference
from bigkernels._chooser import Candidate, Chooser, size_bucket
from bigkernels.ops._checks import check_floating, check_like, check_tensor
from bigkernels.ops._dispatch import autocast_args, needs_workspace

OP = "attention"
# dropout_seed is [seed, offset], drawn uniformly below 2^62 (any int64 works; this keeps it positive).
_SEED_BOUND = 2**62


# ----------------------------------------------------------------------------------- fake kernels
def _fake_forward(query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  scale, window_left, window_right, dropout_p, dropout_seed):
    batch, heads, length, _ = query.shape
    output = query.new_empty((batch, length, heads, value.shape[-1])).transpose(1, 2)
    return output, query.new_empty((batch, heads, length), dtype=torch.float32)


def _fake_backward(grad_output, query, key, value, output, lse, attn_mask, cu_seqlens_q, cu_seqlens_k,
                   max_seqlen_q, max_seqlen_k, scale, window_left, window_right, dropout_p, dropout_seed,
                   need_grad_mask):
    if need_grad_mask:
        grad_mask = query.new_empty((query.shape[0], query.shape[1], query.shape[2], key.shape[2]))
    else:
        grad_mask = query.new_empty((0,))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_mask


# ------------------------------------------------------------------------------------ Triton ops
@torch.library.custom_op("bigkernels::attention_triton", mutates_args=())
def attention_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
    dropout_seed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    from bigkernels.triton import attention as kernels  # Triton is optional and slow to import

    return kernels.attention_forward(query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, scale, window_left, window_right, dropout_p, dropout_seed)


@torch.library.custom_op("bigkernels::attention_backward_triton", mutates_args=())
def attention_backward_triton(
    grad_output: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    output: Tensor,
    lse: Tensor,
    attn_mask: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
    dropout_seed: Optional[Tensor],
    need_grad_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from bigkernels.triton import attention as kernels

    return kernels.attention_backward(grad_output, query, key, value, output, lse, attn_mask, cu_seqlens_q,
                                      cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                                      window_right, dropout_p, dropout_seed, need_grad_mask)


attention_triton.register_fake(_fake_forward)
attention_backward_triton.register_fake(_fake_backward)


# --------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (query, key, value, attn_mask, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed) = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, cu_q, cu_k, out, lse, seed)
    ctx.options = (max_q, max_k, scale, left, right, dropout_p)
    # lse is an output for callers that combine partial attentions; its gradient is not supported.
    ctx.mark_non_differentiable(lse)


def _make_backward(backward_op):
    def backward(ctx, grad_output, _grad_lse):
        query, key, value, attn_mask, cu_q, cu_k, out, lse, seed = ctx.saved_tensors
        max_q, max_k, scale, left, right, dropout_p = ctx.options
        need = ctx.needs_input_grad
        need_grad_mask = attn_mask is not None and need[3]
        grad_q, grad_k, grad_v, grad_mask = backward_op(
            grad_output, query, key, value, out, lse, attn_mask, cu_q, cu_k, max_q, max_k, scale, left, right,
            dropout_p, seed, need_grad_mask,
        )
        return (
            grad_q if need[0] else None,
            grad_k if need[1] else None,
            grad_v if need[2] else None,
            grad_mask if need_grad_mask else None,
        ) + (None,) * 9

    return backward


torch.library.register_autograd(
    "bigkernels::attention_triton", _make_backward(attention_backward_triton), setup_context=_setup_context
)

if _extension.AVAILABLE:
    torch.library.register_fake("bigkernels::attention")(_fake_forward)
    torch.library.register_fake("bigkernels::attention_backward")(_fake_backward)

    @torch.library.register_fake("bigkernels::attention_dropout_mask")
    def _fake_dropout_mask(seed, B, H, L, S, p):
        return seed.new_empty((B, H, L, S), dtype=torch.bool)

    # bigkernels::attention's autograd is C++ (csrc/autograd/attention.cpp): the Python formula's
    # per-call cost was more than the kernel's at small heads.


def dropout_keep_mask(seed: Tensor, batch: int, heads: int, length_q: int, length_k: int, p: float,
                      backend: str) -> Tensor:
    """The keep mask (batch, heads, length_q, length_k) bool that `backend` ("cpu" or "triton") draws
    for dropout_seed `seed` and probability p: what the kernels apply, for tests to compare with
    `reference.attention(..., dropout_keep=mask)`."""
    if backend == "triton":
        from bigkernels.triton import attention as kernels

        return kernels.dropout_keep_mask(seed, batch, heads, length_q, length_k, p, seed.device)
    return torch.ops.bigkernels.attention_dropout_mask(seed, batch, heads, length_q, length_k, p)


# ------------------------------------------------------------------------------------ validation
def _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size) -> None:
    """Raise a ValueError/TypeError/RuntimeError naming the first argument that is wrong."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(t, name)
        check_floating(t, name)
    check_like(key, "key", query, "query")
    check_like(value, "value", query, "query")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if len(window_size) != 2 or not all(isinstance(w, int) and w >= -1 for w in window_size):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
    if is_causal and attn_mask is not None:
        # torch's own error for this combination
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if attn_mask is not None:
        check_tensor(attn_mask, "attn_mask")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"attn_mask must be bool or have the dtype of query ({query.dtype}), got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask must be on the device of query ({query.device}), got {attn_mask.device}")


def _check_padded_shapes(query, key, value, enable_gqa) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., L, E), got {t.dim()}-D")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key must have the query's head dim E = {query.shape[-1]} (last dim), got {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"value must have the key's length S = {key.shape[-2]} (dim -2), got {value.shape[-2]}")
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv:
            raise ValueError(f"with enable_gqa, key and value must have the same number of heads, got {hk} and {hv}")
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"with enable_gqa, the query's heads ({hq}) must be a multiple of the key's heads ({hk})")


# -------------------------------------------------------------------------------------- dispatch
def _call_op(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, need_lse):
    """Run the call on canonical-layout tensors through the chooser; returns (output (B, Hq, L, Ev),
    lse (B, Hq, L) or None when not need_lse)."""
    call = (q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, need_lse)
    return CHOOSER.pick(q.device, call, needs_workspace((q, k, v, mask))).run(*call)


def _reference(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, need_lse):
    keep = None
    if dropout_p > 0:
        if cu_q is not None:
            raise ValueError("the reference backend does not support dropout with cu_seqlens")
        keep = torch.rand(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device) >= dropout_p
    out, lse = reference.attention(q, k, v, mask, scale, (left, right), keep, dropout_p, cu_q, cu_k)
    return out, lse.to(torch.float32) if need_lse else None


def _own_kernel(op):
    def run(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, need_lse):
        seed = None
        if dropout_p > 0:
            # From torch's generator: torch.manual_seed makes the dropout mask reproducible.
            seed = torch.randint(0, _SEED_BOUND, (2,), dtype=torch.int64, device=q.device)
        out, lse = op(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed)
        return out, lse if need_lse else None

    return run


def _stock(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, need_lse):
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=right == 0, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out, None


def _stock_supports(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, need_lse):
    """torch's function covers the plain calls: no varlen, window, lse or mask (a fully masked row's
    output differs between torch's CPU kernels), non-empty."""
    if cu_q is not None or need_lse or mask is not None:
        return "varlen, return_lse and attn_mask calls are ours only"
    if left != -1 or right not in (-1, 0):
        return "sliding windows are ours only"
    if 0 in q.shape or 0 in k.shape or 0 in v.shape:
        return "empty calls are ours only"
    return None


def _signature(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, need_lse) -> tuple:
    return (q.shape, k.shape, v.shape, q.dtype, None if mask is None else (mask.shape, mask.dtype, mask.requires_grad),
            cu_q is None, left, right, dropout_p > 0, need_lse)


def _bucket(sig: tuple) -> tuple:
    q_shape, k_shape, v_shape = sig[0], sig[1], sig[2]
    return ((size_bucket(q_shape[0] * q_shape[1]), k_shape[1], size_bucket(q_shape[2]), size_bucket(k_shape[2]),
             q_shape[3], v_shape[3]) + sig[3:])


CHOOSER = Chooser(
    OP,
    [
        Candidate("cpu", "cpu", _own_kernel(torch.ops.bigkernels.attention.default if _extension.AVAILABLE else None)),
        Candidate("triton", "triton", _own_kernel(torch.ops.bigkernels.attention_triton.default)),
        Candidate("stock", "stock", _stock, _stock_supports),
        Candidate("reference", "reference", _reference),
    ],
    signature=_signature,
    bucket=_bucket,
    comparable=lambda *call: call[11] == 0,  # dropout draws different masks
)


def _broadcast_shapes(*shapes) -> tuple:
    """torch.broadcast_shapes for a few short shapes, without its cost (~25 us a call, measured): this
    runs on every call, and small attentions take about as long as that."""
    ndim = max(len(shape) for shape in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[i] != 1 and out[i] != size:
                    raise RuntimeError(f"shapes {shapes} do not broadcast")
                out[i] = size
    return tuple(out)


def _window(is_causal: bool, window_size) -> tuple[int, int]:
    left, right = int(window_size[0]), int(window_size[1])
    if is_causal:  # torch's top-left aligned causal mask: key j <= query i
        right = 0 if right < 0 else min(right, 0)
    return left, right


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    return_lse: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
):
    """Flash attention with the meaning of ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes (torch's): query (N, ..., Hq, L, E), key (N, ..., Hk, S, E), value (N, ..., Hk, S, Ev);
    batch dims broadcast; any number of leading dims (2-D and 3-D inputs too). Hk == Hq, or with
    ``enable_gqa=True`` Hq a multiple of Hk (grouped-query attention). attn_mask: bool (True = take
    part) or additive float in the query's dtype, broadcastable to (N, ..., Hq, L, S); its gradient is
    computed when it requires grad. is_causal: top-left aligned causal mask (not with attn_mask).
    dropout_p is applied whenever > 0 (as torch's function does, also in eval mode), its mask drawn
    from torch's generator. Returns output (N, ..., Hq, L, Ev), in memory as (N, ..., L, Hq, Ev).

    Keyword-only extras:
      return_lse: also return the log-sum-exp of the scaled, masked scores, (N, ..., Hq, L) float32
        (-inf for a query that sees no key); not differentiable.
      window_size=(left, right): sliding window, query i sees keys i - left ... i + right (-1 =
        unbounded); combined with is_causal (right becomes min(right, 0)).
      cu_seqlens_q / cu_seqlens_k: varlen (packed) sequences in FlashAttention's layout: query
        (total_q, Hq, E), key (total_k, Hk, E), value (total_k, Hk, Ev), cu_seqlens int32 (N + 1,)
        cumulative lengths; sequence n is rows cu[n]:cu[n+1]; no attn_mask. Returns (total_q, Hq, Ev)
        and lse (Hq, total_q). max_seqlen_q/k: the longest sequences, or any upper bound (on CUDA,
        computed with one device read when None, except under torch.compile, which takes the packed
        total: pass them to get the tightest Triton grid there).

    Devices and dtypes: CPU float32/float64/bfloat16/float16 (C++ kernels), CUDA float16/bfloat16/
    float32 (Triton kernels), anything on the reference backend. Under autocast (CPU or CUDA) it runs
    in the autocast dtype, as torch's function does. A row whose keys are all masked gives
    output 0 (torch's math path since 2.5) and zero gradients. Never materialises the L x S scores:
    extra memory O(L + S) per head, forward and backward.
    """
    if isinstance(query, Tensor):
        # torch's SDPA is on autocast's lower-precision lists of both devices: under autocast it runs
        # (and returns) in the autocast dtype, float64 inputs excepted.
        query, key, value, attn_mask = autocast_args((query, key, value, attn_mask), query.device, ("cuda", "cpu"))
    _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size)
    left, right = _window(is_causal, window_size)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        return _varlen(query, key, value, attn_mask, dropout_p, scale, enable_gqa, return_lse, left, right,
                       cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_padded_shapes(query, key, value, enable_gqa)

    q, k, v, batch, rank = _canonical(query, key, value, enable_gqa)
    heads_q, length_q, length_k, dim_e, dim_v = q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    flat = q.shape[0]

    mask = None
    if attn_mask is not None:
        full = (*batch, heads_q, length_q, length_k)
        try:
            _broadcast_shapes(tuple(attn_mask.shape), full)
            if attn_mask.dim() > len(full):
                raise RuntimeError
        except RuntimeError as exc:
            raise ValueError(f"attn_mask must be broadcastable to (N, ..., Hq, L, S) = {full}, "
                             f"got {tuple(attn_mask.shape)}") from exc
        if attn_mask.dtype == torch.bool:  # at the mask's own size: the broadcast stays free
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        mask = attn_mask.expand(full).reshape(flat, heads_q, length_q, length_k)

    if scale is None:
        scale = 1.0 / math.sqrt(dim_e) if dim_e > 0 else 1.0
    out, lse = _call_op(q, k, v, mask, None, None, 0, 0, float(scale), left, right, float(dropout_p), return_lse)
    if rank != 4:
        out = out.reshape(*batch, heads_q, length_q, dim_v)
        lse = lse.reshape(*batch, heads_q, length_q) if return_lse else None
        if max(query.dim(), key.dim(), value.dim()) < rank:
            out, lse = out.squeeze(0), lse.squeeze(0) if return_lse else None
    return (out, lse) if return_lse else out


def _canonical(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """query, key, value as (B, H, L, E) with the broadcast batch dims expanded (stride 0) and
    flattened (no copy when there is one batch dim); also the batch dims and the working rank."""
    if (query.dim() == key.dim() == value.dim() == 4 and query.shape[0] == key.shape[0] == value.shape[0]
            and key.shape[1] == value.shape[1] and (query.shape[1] == key.shape[1] or enable_gqa)):
        # Already canonical (the common case, e.g. MultiheadAttention): no reshapes, ~10 us a call.
        return query, key, value, (query.shape[0],), 4
    rank = max(query.dim(), key.dim(), value.dim(), 3)
    q, k, v = (t.reshape((1,) * (rank - t.dim()) + tuple(t.shape)) for t in (query, key, value))
    try:
        batch = _broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError as exc:
        raise ValueError(f"query, key and value batch dims must broadcast, got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}, value {tuple(value.shape)}") from exc
    heads_q, heads_k = q.shape[-3], k.shape[-3]
    if not (enable_gqa and heads_q != heads_k):
        try:
            heads_q = heads_k = _broadcast_shapes(q.shape[-3:-2], k.shape[-3:-2], v.shape[-3:-2])[0]
        except RuntimeError as exc:
            raise ValueError(f"query, key and value must have the same number of heads (dim -3) unless "
                             f"enable_gqa=True, got {q.shape[-3]}, {k.shape[-3]}, {v.shape[-3]}") from exc
    length_q, length_k, dim_e, dim_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    flat = math.prod(batch)
    q = q.expand(*batch, heads_q, length_q, dim_e).reshape(flat, heads_q, length_q, dim_e)
    k = k.expand(*batch, heads_k, length_k, dim_e).reshape(flat, heads_k, length_k, dim_e)
    v = v.expand(*batch, heads_k, length_k, dim_v).reshape(flat, heads_k, length_k, dim_v)
    return q, k, v, batch, rank


def _longest_sequence(cu_seqlens: Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if cu_seqlens.numel() > 1 else 0


def _varlen(query, key, value, attn_mask, dropout_p, scale, enable_gqa, return_lse, left, right, cu_q, cu_k,
            max_q, max_k):
    if cu_q is None or cu_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported with cu_seqlens_q/cu_seqlens_k (varlen)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 3:
            raise ValueError(f"with cu_seqlens, {name} must be 3-D (total, heads, head_dim), got {t.dim()}-D")
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        check_tensor(t, name)
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64) or t.numel() < 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor (num_sequences + 1,), got {t.dtype} {tuple(t.shape)}")
        if t.device != query.device:
            raise ValueError(f"{name} must be on the device of query ({query.device}), got {t.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_q.numel()} and {cu_k.numel()}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key must have the query's head dim E = {query.shape[-1]}, got {key.shape[-1]}")
    if key.shape[0] != value.shape[0] or key.shape[1] != value.shape[1]:
        raise ValueError(f"value must have the key's (total_k, heads) = {tuple(key.shape[:2])}, got {tuple(value.shape[:2])}")
    heads_q, heads_k = query.shape[1], key.shape[1]
    if heads_q != heads_k and not (enable_gqa and heads_k > 0 and heads_q % heads_k == 0):
        raise ValueError(f"query has {heads_q} heads and key {heads_k}: they must be equal, or (enable_gqa=True) "
                         f"the query's a multiple of the key's")
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    # Only the Triton kernels use max_seqlen (to size their grid). Any upper bound is correct: the
    # packed total costs no device read and keeps torch.compile's graph whole; eager CUDA calls read
    # the exact longest length (a smaller grid).
    exact = query.is_cuda and not torch.compiler.is_compiling()
    if max_q is None:
        max_q = _longest_sequence(cu_q) if exact else query.shape[0]
    if max_k is None:
        max_k = _longest_sequence(cu_k) if exact else key.shape[0]
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    out, lse = _call_op(q, k, v, None, cu_q, cu_k, int(max_q), int(max_k), float(scale), left, right,
                        float(dropout_p), return_lse)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out
