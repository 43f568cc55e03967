"""Triton flash attention: the kernels behind bigkernels::attention_triton / attention_backward_triton.

Flash-attention-2 (Dao, 2023), written from the maths in bigkernels.reference.attention:

Forward: one program per (query block, query head, batch or sequence). It walks the key blocks the
window lets its rows see, keeping a running row max m, row sum l and output accumulator in registers
(online softmax), so the L x S score matrix never exists. Scores are kept in base 2: log2(e) is folded
into the scale and the additive mask, and exp2 is the hardware's native exponential. It stores the
output and the natural-log log-sum-exp lse = ln(sum_j exp(s_ij)) for the backward.

Backward (recompute from lse, no atomics, so deterministic):
  1. delta kernel: D_i = rowsum(dO_i * O_i), the softmax Jacobian's row term (also right with dropout,
     since O already holds the dropout scaling).
  2. dK/dV kernel: one program per key block of one key/value head; it loops over the query blocks
     that see it, for every query head of the grouped-query group, and sums their contributions in
     registers: dV = sum P~^T dO, dK = scale * sum dS^T Q, dS = P * (dP - D), dP = (dO V^T) * Z.
  3. dQ kernel: one program per query block: dQ = scale * sum dS K over the visible key blocks.
  When asked, the dK/dV kernel also stores dS, the gradient of the additive mask.

Shapes (the op interface of /work/helper-notes/attention.md): query (B, Hq, L, E), key (B, Hk, S, E),
value (B, Hk, S, Ev), any strides (stride 0 included); attn_mask additive (B, Hq, L, S) any strides;
output (B, Hq, L, Ev) stored as (B, L, Hq, Ev) memory; lse (B, Hq, L) float32. Varlen: B == 1 and
cu_seqlens_q/k split the rows into sequences; one program per (sequence, block), the grid sized by
max_seqlen. Windows: query i sees key j iff (left < 0 or j >= i - left) and (right < 0 or j <= i + right);
blocks no row of a tile can see are never visited (a causal window halves the work).

Dropout: element (b, h, i, j) (i, j absolute row indices of the query/key tensors) is kept iff
uniform(philox(key = seed, counter = (j, i, h, b + offset))) >= p. A pure function of the coordinates,
so the forward, both backward kernels and `dropout_keep_mask` agree whatever their tiling.

A row that sees no key has l = 0: its output is 0, its lse -inf and its gradients 0, with no NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from bigkernels._backend import triton_interpreting
from bigkernels.triton._launch import checked_grid, device_guard, fold, launches_on, unfold_pid

# Read once, like triton.jit: the kernels below were built for the interpreter or not at import time.
_INTERPRETED = triton_interpreting()

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); the kernels spell it (and ln 2) out as literals
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
# tl.dot needs every operand dimension >= 16 on the GPU: smaller head dims are padded (masked) to 16.
_MIN_DOT_DIM = 16


# ------------------------------------------------------------------------------ autotune configs
def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Named tiles (the names are for people tuning them; the autotuner sees the list of values).
if _INTERPRETED:
    # The interpreter runs every program in numpy: one small tile keeps CI fast, and 16 rows still
    # makes tiny test shapes (7, 33) span several blocks, so the loops and edge masks are exercised.
    FORWARD_CONFIGS = {"interpreter": _config(16, 16, 1, 1)}
    DKDV_CONFIGS = {"interpreter": _config(16, 16, 1, 1)}
    DQ_CONFIGS = {"interpreter": _config(16, 16, 1, 1)}
else:
    # First guesses for Hopper/Ampere from the flash-attention-2 paper's tiling, not yet timed on a GPU:
    # the autotuner picks among the configs that fit (_FITS) per (head dims, length buckets, dtype, options).
    FORWARD_CONFIGS = {
        # Big query tiles, most reuse of each K/V tile: head dim <= 64 (<= 128 at 8 warps).
        "fwd_m128_n128_w8": _config(128, 128, 8, 3),
        "fwd_m128_n64_w4": _config(128, 64, 4, 3),
        "fwd_m128_n64_w8": _config(128, 64, 8, 3),
        "fwd_m64_n64_w4": _config(64, 64, 4, 3),
        # Head dim 128 (and float32): 8 warps halve the accumulator registers a thread.
        "fwd_m64_n64_w8": _config(64, 64, 8, 2),
        "fwd_m64_n32_w4": _config(64, 32, 4, 2),
        "fwd_m64_n32_w8": _config(64, 32, 8, 2),
        # Head dim 256: the only tile with no spill in float32.
        "fwd_m32_n32_w4": _config(32, 32, 4, 2),
    }
    # dK/dV: a key tile (BLOCK_N) stays in registers with its dK/dV accumulators while thin query tiles
    # (BLOCK_M) stream past it; the accumulators (2 x BLOCK_N x head dim, fp32) bound the tile.
    DKDV_CONFIGS = {
        "dkdv_n64_m32_w8": _config(32, 64, 8, 2),
        "dkdv_n32_m32_w4": _config(32, 32, 4, 2),
        "dkdv_n32_m32_w8": _config(32, 32, 8, 2),
        "dkdv_n32_m16_w8": _config(16, 32, 8, 2),
        "dkdv_n16_m16_w4_s1": _config(16, 16, 4, 1),  # head dim 256
    }
    # dQ: the mirror image: a tall query tile with its dQ accumulator, thin key tiles streaming.
    DQ_CONFIGS = {
        "dq_m128_n32_w8": _config(128, 32, 8, 3),
        "dq_m64_n32_w4": _config(64, 32, 4, 3),
        "dq_m64_n32_w8": _config(64, 32, 8, 2),
        "dq_m32_n32_w4": _config(32, 32, 4, 2),
        "dq_m32_n32_w8": _config(32, 32, 8, 2),
        "dq_m32_n16_w4": _config(32, 16, 4, 2),
        "dq_m16_n16_w4_s1": _config(16, 16, 4, 1),
    }

# Which configs fit, by (head dim bucket, operand bytes): no register spill and shared memory within
# the A100's 163 KiB, for sm_80 and sm_90, measured with tools/triton_check.py (Triton 3.9's ptxas).
# E.g. at head dim 128 the dK/dV 32 x 128 / 64 x 64 tiles at 4 warps spilled 0.5-2 KiB, the forward's
# 128 x 128 took 224 KiB (sm_90); at 256 every 4-warp dK/dV tile spilled. float32 head dims <= 64
# use the head-dim-128 float32 list (fewer registers, never more).
_FITS = {
    "forward": {
        (64, 2): ("fwd_m128_n128_w8", "fwd_m128_n64_w4", "fwd_m128_n64_w8", "fwd_m64_n64_w4", "fwd_m64_n32_w4"),
        (128, 2): ("fwd_m128_n64_w8", "fwd_m64_n64_w8", "fwd_m64_n32_w4", "fwd_m64_n32_w8"),
        (256, 2): ("fwd_m64_n32_w8", "fwd_m32_n32_w4"),
        (128, 4): ("fwd_m64_n64_w8", "fwd_m64_n32_w4", "fwd_m64_n32_w8"),
        (256, 4): ("fwd_m32_n32_w4",),
    },
    "dkdv": {
        (64, 2): ("dkdv_n64_m32_w8", "dkdv_n32_m32_w4", "dkdv_n32_m32_w8", "dkdv_n32_m16_w8"),
        (128, 2): ("dkdv_n64_m32_w8", "dkdv_n32_m32_w4", "dkdv_n32_m32_w8", "dkdv_n32_m16_w8"),
        (256, 2): ("dkdv_n32_m16_w8", "dkdv_n16_m16_w4_s1"),
        (128, 4): ("dkdv_n32_m32_w4", "dkdv_n32_m32_w8", "dkdv_n32_m16_w8"),
        (256, 4): ("dkdv_n32_m32_w8", "dkdv_n16_m16_w4_s1"),
    },
    "dq": {
        (64, 2): ("dq_m128_n32_w8", "dq_m64_n32_w4", "dq_m64_n32_w8", "dq_m32_n32_w4"),
        (128, 2): ("dq_m64_n32_w4", "dq_m64_n32_w8", "dq_m32_n32_w4", "dq_m32_n32_w8", "dq_m32_n16_w4"),
        (256, 2): ("dq_m64_n32_w8", "dq_m32_n16_w4", "dq_m16_n16_w4_s1"),
        (128, 4): ("dq_m64_n32_w8", "dq_m32_n32_w8", "dq_m16_n16_w4_s1"),
        (256, 4): ("dq_m32_n32_w8", "dq_m32_n16_w4", "dq_m16_n16_w4_s1"),
    },
}


# With dropout the dK/dV kernel also holds the Philox state of its transposed score tile: 4-warp
# tiles and 32 x 64 at 8 warps spilled (head dims 64 and 128), only these did not.
_DROPOUT_FITS = {"dkdv": ("dkdv_n32_m32_w8", "dkdv_n32_m16_w8")}


def _fit_key(head_block: int, element_size: int) -> tuple[int, int]:
    bucket = 64 if head_block <= 64 else 128 if head_block <= 128 else 256
    if element_size >= 4 and bucket == 64:
        bucket = 128
    return bucket, min(element_size, 4)


def _pruner(kind: str, named: dict):
    """early_config_prune for one kernel: the configs of _FITS for the call's head dim and dtype; with
    dropout only tiles of <= 64 x 64 scores (the Philox state of every score spills larger ones), and
    for dK/dV only those of _DROPOUT_FITS."""
    def prune(configs, named_args, **kwargs):
        if _INTERPRETED:
            return configs
        args = {**named_args, **kwargs}  # the launchers pass the head blocks and flags as keywords
        fits = _FITS[kind][_fit_key(max(args["BLOCK_E"], args["BLOCK_EV"]), args["q_ptr"].element_size())]
        if args["HAS_DROPOUT"] and kind in _DROPOUT_FITS:
            fits = [name for name in fits if name in _DROPOUT_FITS[kind]] or fits[-1:]
        allowed = [named[name] for name in fits]
        kept = [c for c in configs if any(c is a for a in allowed)
                and (not args["HAS_DROPOUT"] or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)]
        return kept or [allowed[-1]]

    return prune


_AUTOTUNE_KEY = ["BLOCK_E", "BLOCK_EV", "LEN_Q_BUCKET", "LEN_K_BUCKET", "HAS_MASK", "HAS_DROPOUT",
                 "HAS_LEFT", "HAS_RIGHT"]


# ------------------------------------------------------------------------------------ jit helpers
@triton.jit
def _dropout_keep(seed, offset, batch, head, rows, cols, dropout_p):
    """Keep decision of elements (batch, head, rows, cols); rows/cols broadcast against each other
    (absolute row indices of the query and key tensors). Philox with the coordinates as its counter."""
    zero = rows * 0 + cols * 0
    c0 = zero + cols
    c1 = zero + rows
    c2 = zero + head
    c3 = zero + (batch + offset).to(tl.int32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return tl.uint_to_uniform_float(r0) >= dropout_p


@triton.jit
def _sequence_bounds(cu_q_ptr, cu_k_ptr, pid_batch, len_q, len_k, IS_VARLEN: tl.constexpr):
    """(batch index for the strides, first query row, first key row, query length, key length)."""
    if IS_VARLEN:
        start_q = tl.load(cu_q_ptr + pid_batch)
        start_k = tl.load(cu_k_ptr + pid_batch)
        seq_q = tl.load(cu_q_ptr + pid_batch + 1) - start_q
        seq_k = tl.load(cu_k_ptr + pid_batch + 1) - start_k
        batch = pid_batch * 0  # the packed tensors have batch 1
    else:
        batch = pid_batch
        start_q = pid_batch * 0
        start_k = start_q
        seq_q = start_q + len_q
        seq_k = start_q + len_k
    return batch, start_q, start_k, seq_q, seq_k


@triton.jit
def _visible(rows, cols, seq_q, seq_k, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Which (row, col) pairs exist and lie inside the window; rows/cols broadcast (local indices)."""
    visible = (rows < seq_q) & (cols < seq_k)
    if HAS_LEFT:
        visible = visible & (cols >= rows - window_left)
    if HAS_RIGHT:
        visible = visible & (cols <= rows + window_right)
    return visible


@triton.jit
def _block_ranges(first, last, length, lower_reach, upper_reach, BLOCK: tl.constexpr,
                  HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr):
    """The blocks of the other side that indices first..last of this side see, as block starts
    lo <= full_lo <= full_hi <= hi: [lo, full_lo) and [full_hi, hi) hold blocks that need the
    per-element visibility mask, the blocks of [full_lo, full_hi) are visible to every index (no mask).
    Index x sees y iff x - lower_reach <= y <= x + upper_reach (when HAS_*) and y < length: for keys
    seen by query rows that is (left, right); for query rows that see keys it is (right, left)."""
    zero = first * 0
    lo = zero
    hi = zero + length
    full_lo = zero
    full_hi = (hi // BLOCK) * BLOCK
    if HAS_LOWER:
        lo = tl.maximum(zero, first - lower_reach)
        full_lo = tl.maximum(zero, last - lower_reach)
        full_lo = ((full_lo + BLOCK - 1) // BLOCK) * BLOCK
    if HAS_UPPER:
        hi = tl.minimum(hi, last + upper_reach + 1)
        full_hi = tl.minimum(full_hi, (tl.maximum(zero, first + upper_reach + 1) // BLOCK) * BLOCK)
    lo = (lo // BLOCK) * BLOCK  # divisions on non-negative values only: C and numpy round alike
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


# ---------------------------------------------------------------------------------------- forward
@triton.jit
def _forward_block(m_i, l_i, acc, q, k_base, v_base, mask_base, first_col, rows, row_in, seq_q, seq_k, start_q,
                   start_k, stride_ks, stride_ke, stride_vs, stride_ve, stride_ms, offs_e, e_in, offs_ev, ev_in,
                   offs_n, qk_scale, window_left, window_right, seed, offset, batch, head, dropout_p,
                   MASKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax: returns the updated (m_i, l_i, acc). MASKED: the block
    straddles the window's edge or the sequence end, so scores get the per-element visibility mask."""
    cols = first_col + offs_n
    cols64 = cols.to(tl.int64)
    col_in = cols < seq_k
    k_t = tl.load(k_base + cols64[None, :] * stride_ks + offs_e[:, None] * stride_ke,
                  mask=e_in[:, None] & col_in[None, :], other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if HAS_MASK:
        bias = tl.load(mask_base + cols64[None, :] * stride_ms, mask=row_in[:, None] & col_in[None, :], other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    if MASKED:
        visible = _visible(rows[:, None], cols[None, :], seq_q, seq_k, window_left, window_right,
                           HAS_LEFT, HAS_RIGHT)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; subtract 0 there so that exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, offset, batch, head, (start_q + rows)[:, None], (start_k + cols)[None, :],
                             dropout_p)
        p = tl.where(keep, p, 0.0)
    v = tl.load(v_base + cols64[:, None] * stride_vs + offs_ev[None, :] * stride_ve,
                mask=col_in[:, None] & ev_in[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.autotune(configs=list(FORWARD_CONFIGS.values()), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner("forward", FORWARD_CONFIGS)})
@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, seed_ptr,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_ob, stride_oh, stride_ol, stride_oe,
    stride_lseb, stride_lseh,
    group_size, len_q, len_k,
    qk_scale, window_left, window_right, dropout_p, dropout_scale,
    batch_programs, batch_chunks, batch_span,  # batch axis folded into x: _launch.fold
    LEN_Q_BUCKET, LEN_K_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,  # E, Ev: a power of two needs no column mask
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_batch = unfold_pid(batch_chunks, batch_span, tl.program_id(2))
    head = tl.program_id(1)
    batch, start_q, start_k, seq_q, seq_k = _sequence_bounds(
        cu_q_ptr, cu_k_ptr, tl.minimum(pid_batch, batch_programs - 1), len_q, len_k, IS_VARLEN)
    first_row = pid_m * BLOCK_M
    # The grid is sized for the longest sequence, and the last batch chunk may run past the end.
    if (first_row >= seq_q) | (pid_batch >= batch_programs):
        return
    # 64-bit offsets: batch * stride and row * stride can pass 2**31 elements.
    batch64 = batch.to(tl.int64)
    head64 = head.to(tl.int64)
    kv_head64 = (head // group_size).to(tl.int64)
    rows = first_row + tl.arange(0, BLOCK_M)
    rows64 = (start_q + rows).to(tl.int64)
    row_in = rows < seq_q
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    e_in = offs_e < HEAD_DIM
    ev_in = offs_ev < HEAD_DIM_V
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(q_ptr + batch64 * stride_qb + head64 * stride_qh + rows64[:, None] * stride_ql
                + offs_e[None, :] * stride_qe, mask=row_in[:, None] & e_in[None, :], other=0.0)
    k_base = k_ptr + batch64 * stride_kb + kv_head64 * stride_kh + start_k.to(tl.int64) * stride_ks
    v_base = v_ptr + batch64 * stride_vb + kv_head64 * stride_vh + start_k.to(tl.int64) * stride_vs
    mask_base = mask_ptr + batch64 * stride_mb + head64 * stride_mh + rows64[:, None] * stride_ml
    seed = 0  # the dropout seed and offset are read only when HAS_DROPOUT
    offset = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        offset = tl.load(seed_ptr + 1)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max, base 2
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running row sum of exp2(s - m_i), before dropout
    acc = tl.zeros((BLOCK_M, BLOCK_EV), dtype=tl.float32)
    lo, full_lo, full_hi, hi = _block_ranges(first_row, first_row + BLOCK_M - 1, seq_k, window_left, window_right,
                                             BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # Edge blocks (window diagonal, sequence end) with the per-element mask, the interior without it.
    for first_col in range(lo, full_lo, BLOCK_N):
        m_i, l_i, acc = _forward_block(
            m_i, l_i, acc, q, k_base, v_base, mask_base, first_col, rows, row_in, seq_q, seq_k, start_q, start_k,
            stride_ks, stride_ke, stride_vs, stride_ve, stride_ms, offs_e, e_in, offs_ev, ev_in, offs_n, qk_scale,
            window_left, window_right, seed, offset, batch, head, dropout_p,
            True, HAS_MASK, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT, DOT_PRECISION)
    for first_col in range(full_lo, full_hi, BLOCK_N):
        m_i, l_i, acc = _forward_block(
            m_i, l_i, acc, q, k_base, v_base, mask_base, first_col, rows, row_in, seq_q, seq_k, start_q, start_k,
            stride_ks, stride_ke, stride_vs, stride_ve, stride_ms, offs_e, e_in, offs_ev, ev_in, offs_n, qk_scale,
            window_left, window_right, seed, offset, batch, head, dropout_p,
            False, HAS_MASK, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT, DOT_PRECISION)
    for first_col in range(full_hi, hi, BLOCK_N):
        m_i, l_i, acc = _forward_block(
            m_i, l_i, acc, q, k_base, v_base, mask_base, first_col, rows, row_in, seq_q, seq_k, start_q, start_k,
            stride_ks, stride_ke, stride_vs, stride_ve, stride_ms, offs_e, e_in, offs_ev, ev_in, offs_n, qk_scale,
            window_left, window_right, seed, offset, batch, head, dropout_p,
            True, HAS_MASK, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT, DOT_PRECISION)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc * (dropout_scale / l_safe)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    out_ptrs = (out_ptr + batch64 * stride_ob + head64 * stride_oh + rows64[:, None] * stride_ol
                + offs_ev[None, :] * stride_oe)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & ev_in[None, :])
    tl.store(lse_ptr + batch64 * stride_lseb + head64 * stride_lseh + rows64, lse, mask=row_in)


# --------------------------------------------------------------------------------------- backward
@triton.jit
def _attention_backward_delta_kernel(
    out_ptr, dout_ptr, delta_ptr,
    stride_ob, stride_oh, stride_ol, stride_oe,
    stride_db, stride_dh, stride_dl, stride_de,
    num_heads, len_q, head_dim_v, batch_size, batch_chunks, batch_span,
    BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """delta[b, h, i] = sum_e dO[b, h, i, e] * O[b, h, i, e] in float32; delta is (B, H, L) contiguous."""
    pid_m, batch = unfold_pid(batch_chunks, batch_span, tl.program_id(2))
    if batch >= batch_size:  # past the end in the last batch chunk
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    row_in = rows < len_q
    rows64 = rows.to(tl.int64)
    offs_ev = tl.arange(0, BLOCK_EV)
    mask = row_in[:, None] & (offs_ev < head_dim_v)[None, :]
    batch = batch.to(tl.int64)
    head = head.to(tl.int64)
    o = tl.load(out_ptr + batch * stride_ob + head * stride_oh + rows64[:, None] * stride_ol
                + offs_ev[None, :] * stride_oe, mask=mask, other=0.0)
    do = tl.load(dout_ptr + batch * stride_db + head * stride_dh + rows64[:, None] * stride_dl
                 + offs_ev[None, :] * stride_de, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + (batch * num_heads + head) * len_q + rows64, delta, mask=row_in)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, first_row, cols, col_in,
                seq_q, seq_k, start_q, start_k, stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_dml,
                offs_e, e_in, offs_ev, ev_in, offs_m, qk_scale, window_left, window_right, seed, offset, batch, head,
                dropout_p, dropout_scale,
                MASKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr, STORE_MASK_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(dk, dv) plus the contributions of one query block; tiles are (keys, queries). Also stores the
    block's dS when STORE_MASK_GRAD. dk is in scaled-score units: the caller multiplies by scale."""
    rows = first_row + offs_m
    rows64 = rows.to(tl.int64)
    row_in = rows < seq_q
    q_t = tl.load(q_base + rows64[None, :] * stride_ql + offs_e[:, None] * stride_qe,
                  mask=e_in[:, None] & row_in[None, :], other=0.0)
    do = tl.load(do_base + rows64[:, None] * stride_dol + offs_ev[None, :] * stride_doe,
                 mask=row_in[:, None] & ev_in[None, :], other=0.0)
    lse = tl.load(lse_base + rows64, mask=row_in, other=0.0)
    # A row that sees nothing has lse -inf and every score -inf: use 0 so that P is 0, not NaN.
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(delta_base + rows64, mask=row_in, other=0.0)

    s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
    if HAS_MASK:
        bias = tl.load(mask_base + rows64[None, :] * stride_ml, mask=col_in[:, None] & row_in[None, :], other=0.0)
        s_t += bias.to(tl.float32) * 1.4426950408889634
    p_t = tl.exp2(s_t - lse2[None, :])
    if MASKED:
        visible = _visible(rows[None, :], cols[:, None], seq_q, seq_k, window_left, window_right,
                           HAS_LEFT, HAS_RIGHT)
        p_t = tl.where(visible, p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, offset, batch, head, (start_q + rows)[None, :], (start_k + cols)[:, None],
                             dropout_p)
        dv += tl.dot(tl.where(keep, p_t * dropout_scale, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if STORE_MASK_GRAD:
        tl.store(dmask_base + rows64[None, :] * stride_dml, ds_t.to(dmask_base.dtype.element_ty),
                 mask=col_in[:, None] & row_in[None, :])
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=list(DKDV_CONFIGS.values()), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner("dkdv", DKDV_CONFIGS)})
@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dmask_ptr,
    cu_q_ptr, cu_k_ptr, seed_ptr,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_dob, stride_doh, stride_dol, stride_doe,
    stride_lseb, stride_lseh,
    stride_dkb, stride_dkh, stride_dks, stride_dke,
    stride_dvb, stride_dvh, stride_dvs, stride_dve,
    stride_dmb, stride_dmh, stride_dml, stride_dms,
    num_heads_q, group_size, len_q, len_k,
    scale, qk_scale, window_left, window_right, dropout_p, dropout_scale,
    batch_programs, batch_chunks, batch_span,  # batch axis folded into x: _launch.fold
    LEN_Q_BUCKET, LEN_K_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,  # E, Ev: a power of two needs no column mask
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, STORE_MASK_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Tiles are (keys, queries): this program's keys are the rows, so dK/dV accumulate without transposes.
    pid_n, pid_batch = unfold_pid(batch_chunks, batch_span, tl.program_id(2))
    kv_head = tl.program_id(1)
    batch, start_q, start_k, seq_q, seq_k = _sequence_bounds(
        cu_q_ptr, cu_k_ptr, tl.minimum(pid_batch, batch_programs - 1), len_q, len_k, IS_VARLEN)
    first_col = pid_n * BLOCK_N
    if (first_col >= seq_k) | (pid_batch >= batch_programs):
        return
    batch64 = batch.to(tl.int64)
    kv_head64 = kv_head.to(tl.int64)
    cols = first_col + tl.arange(0, BLOCK_N)
    cols64 = (start_k + cols).to(tl.int64)
    col_in = cols < seq_k
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    e_in = offs_e < HEAD_DIM
    ev_in = offs_ev < HEAD_DIM_V
    offs_m = tl.arange(0, BLOCK_M)

    k = tl.load(k_ptr + batch64 * stride_kb + kv_head64 * stride_kh + cols64[:, None] * stride_ks
                + offs_e[None, :] * stride_ke, mask=col_in[:, None] & e_in[None, :], other=0.0)
    v = tl.load(v_ptr + batch64 * stride_vb + kv_head64 * stride_vh + cols64[:, None] * stride_vs
                + offs_ev[None, :] * stride_ve, mask=col_in[:, None] & ev_in[None, :], other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_EV), dtype=tl.float32)
    seed = 0  # the dropout seed and offset are read only when HAS_DROPOUT
    offset = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        offset = tl.load(seed_ptr + 1)
    # Query rows i see key j iff j - right <= i <= j + left: the window's reaches swap sides.
    lo, full_lo, full_hi, hi = _block_ranges(first_col, first_col + BLOCK_N - 1, seq_q, window_right, window_left,
                                             BLOCK_M, HAS_RIGHT, HAS_LEFT)
    start_q64 = start_q.to(tl.int64)
    # The query heads of this key/value head's group, in order: their sums stay in registers (no atomics).
    for g in range(0, group_size):
        head = kv_head * group_size + g
        head64 = head.to(tl.int64)
        q_base = q_ptr + batch64 * stride_qb + head64 * stride_qh + start_q64 * stride_ql
        do_base = dout_ptr + batch64 * stride_dob + head64 * stride_doh + start_q64 * stride_dol
        lse_base = lse_ptr + batch64 * stride_lseb + head64 * stride_lseh + start_q64
        delta_base = delta_ptr + (batch64 * num_heads_q + head64) * len_q + start_q64
        # Row offsets of the mask and its gradient are added per block (start_q is 0: no mask with varlen).
        mask_base = mask_ptr + batch64 * stride_mb + head64 * stride_mh + cols64[:, None] * stride_ms
        dmask_base = dmask_ptr + batch64 * stride_dmb + head64 * stride_dmh + cols64[:, None] * stride_dms
        for first_row in range(lo, full_lo, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, first_row, cols, col_in,
                seq_q, seq_k, start_q, start_k, stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_dml,
                offs_e, e_in, offs_ev, ev_in, offs_m, qk_scale, window_left, window_right, seed, offset, batch, head,
                dropout_p, dropout_scale,
                True, HAS_MASK, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT, STORE_MASK_GRAD, DOT_PRECISION)
        for first_row in range(full_lo, full_hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, first_row, cols, col_in,
                seq_q, seq_k, start_q, start_k, stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_dml,
                offs_e, e_in, offs_ev, ev_in, offs_m, qk_scale, window_left, window_right, seed, offset, batch, head,
                dropout_p, dropout_scale,
                False, HAS_MASK, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT, STORE_MASK_GRAD, DOT_PRECISION)
        for first_row in range(full_hi, hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, first_row, cols, col_in,
                seq_q, seq_k, start_q, start_k, stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_dml,
                offs_e, e_in, offs_ev, ev_in, offs_m, qk_scale, window_left, window_right, seed, offset, batch, head,
                dropout_p, dropout_scale,
                True, HAS_MASK, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT, STORE_MASK_GRAD, DOT_PRECISION)

    dk *= scale
    tile = col_in[:, None]
    tl.store(dk_ptr + batch64 * stride_dkb + kv_head64 * stride_dkh + cols64[:, None] * stride_dks
             + offs_e[None, :] * stride_dke, dk.to(dk_ptr.dtype.element_ty), mask=tile & e_in[None, :])
    tl.store(dv_ptr + batch64 * stride_dvb + kv_head64 * stride_dvh + cols64[:, None] * stride_dvs
             + offs_ev[None, :] * stride_dve, dv.to(dv_ptr.dtype.element_ty), mask=tile & ev_in[None, :])


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, mask_base, first_col, rows, row_in, seq_q, seq_k, start_q,
              start_k, stride_ks, stride_ke, stride_vs, stride_ve, stride_ms, offs_e, e_in, offs_ev, ev_in, offs_n,
              qk_scale, window_left, window_right, seed, offset, batch, head, dropout_p, dropout_scale,
              MASKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq + dS K^T of one key block (dq in scaled-score units; the caller multiplies by scale)."""
    cols = first_col + offs_n
    cols64 = cols.to(tl.int64)
    col_in = cols < seq_k
    k_t = tl.load(k_base + cols64[None, :] * stride_ks + offs_e[:, None] * stride_ke,
                  mask=e_in[:, None] & col_in[None, :], other=0.0)
    v_t = tl.load(v_base + cols64[None, :] * stride_vs + offs_ev[:, None] * stride_ve,
                  mask=ev_in[:, None] & col_in[None, :], other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if HAS_MASK:
        bias = tl.load(mask_base + cols64[None, :] * stride_ms, mask=row_in[:, None] & col_in[None, :], other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        visible = _visible(rows[:, None], cols[None, :], seq_q, seq_k, window_left, window_right,
                           HAS_LEFT, HAS_RIGHT)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, offset, batch, head, (start_q + rows)[:, None], (start_k + cols)[None, :],
                             dropout_p)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)


@triton.autotune(configs=list(DQ_CONFIGS.values()), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner("dq", DQ_CONFIGS)})
@triton.jit
def _attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    cu_q_ptr, cu_k_ptr, seed_ptr,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_dob, stride_doh, stride_dol, stride_doe,
    stride_lseb, stride_lseh,
    stride_dqb, stride_dqh, stride_dql, stride_dqe,
    num_heads_q, group_size, len_q, len_k,
    scale, qk_scale, window_left, window_right, dropout_p, dropout_scale,
    batch_programs, batch_chunks, batch_span,  # batch axis folded into x: _launch.fold
    LEN_Q_BUCKET, LEN_K_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,  # E, Ev: a power of two needs no column mask
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_batch = unfold_pid(batch_chunks, batch_span, tl.program_id(2))
    head = tl.program_id(1)
    batch, start_q, start_k, seq_q, seq_k = _sequence_bounds(
        cu_q_ptr, cu_k_ptr, tl.minimum(pid_batch, batch_programs - 1), len_q, len_k, IS_VARLEN)
    first_row = pid_m * BLOCK_M
    if (first_row >= seq_q) | (pid_batch >= batch_programs):
        return
    batch64 = batch.to(tl.int64)
    head64 = head.to(tl.int64)
    kv_head64 = (head // group_size).to(tl.int64)
    rows = first_row + tl.arange(0, BLOCK_M)
    rows64 = (start_q + rows).to(tl.int64)
    row_in = rows < seq_q
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    e_in = offs_e < HEAD_DIM
    ev_in = offs_ev < HEAD_DIM_V
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(q_ptr + batch64 * stride_qb + head64 * stride_qh + rows64[:, None] * stride_ql
                + offs_e[None, :] * stride_qe, mask=row_in[:, None] & e_in[None, :], other=0.0)
    do = tl.load(dout_ptr + batch64 * stride_dob + head64 * stride_doh + rows64[:, None] * stride_dol
                 + offs_ev[None, :] * stride_doe, mask=row_in[:, None] & ev_in[None, :], other=0.0)
    lse = tl.load(lse_ptr + batch64 * stride_lseb + head64 * stride_lseh + rows64, mask=row_in, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + (batch64 * num_heads_q + head64) * len_q + rows64, mask=row_in, other=0.0)
    k_base = k_ptr + batch64 * stride_kb + kv_head64 * stride_kh + start_k.to(tl.int64) * stride_ks
    v_base = v_ptr + batch64 * stride_vb + kv_head64 * stride_vh + start_k.to(tl.int64) * stride_vs
    mask_base = mask_ptr + batch64 * stride_mb + head64 * stride_mh + rows64[:, None] * stride_ml
    seed = 0  # the dropout seed and offset are read only when HAS_DROPOUT
    offset = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        offset = tl.load(seed_ptr + 1)

    dq = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    lo, full_lo, full_hi, hi = _block_ranges(first_row, first_row + BLOCK_M - 1, seq_k, window_left, window_right,
                                             BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for first_col in range(lo, full_lo, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base, v_base, mask_base, first_col, rows, row_in, seq_q, seq_k, start_q,
            start_k, stride_ks, stride_ke, stride_vs, stride_ve, stride_ms, offs_e, e_in, offs_ev, ev_in, offs_n,
            qk_scale, window_left, window_right, seed, offset, batch, head, dropout_p, dropout_scale,
            True, HAS_MASK, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT, DOT_PRECISION)
    for first_col in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base, v_base, mask_base, first_col, rows, row_in, seq_q, seq_k, start_q,
            start_k, stride_ks, stride_ke, stride_vs, stride_ve, stride_ms, offs_e, e_in, offs_ev, ev_in, offs_n,
            qk_scale, window_left, window_right, seed, offset, batch, head, dropout_p, dropout_scale,
            False, HAS_MASK, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT, DOT_PRECISION)
    for first_col in range(full_hi, hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base, v_base, mask_base, first_col, rows, row_in, seq_q, seq_k, start_q,
            start_k, stride_ks, stride_ke, stride_vs, stride_ve, stride_ms, offs_e, e_in, offs_ev, ev_in, offs_n,
            qk_scale, window_left, window_right, seed, offset, batch, head, dropout_p, dropout_scale,
            True, HAS_MASK, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT, DOT_PRECISION)

    dq *= scale
    tl.store(dq_ptr + batch64 * stride_dqb + head64 * stride_dqh + rows64[:, None] * stride_dql
             + offs_e[None, :] * stride_dqe, dq.to(dq_ptr.dtype.element_ty), mask=row_in[:, None] & e_in[None, :])


# 32 x 64 keep decisions a program: at 64 x 64 the Philox state spilled (tools/triton_check.py).
_MASK_BLOCK_M, _MASK_BLOCK_N = (16, 16) if _INTERPRETED else (32, 64)


@triton.jit
def _dropout_keep_mask_kernel(seed_ptr, keep_ptr, num_heads, len_q, len_k, dropout_p, batch_size, batch_chunks,
                              batch_span, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep[b, h, i, j] (int8, contiguous (B, H, L, S)) exactly as the attention kernels decide it."""
    pid_m, batch = unfold_pid(batch_chunks, batch_span, tl.program_id(2))
    if batch >= batch_size:  # past the end in the last batch chunk
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    seed = tl.load(seed_ptr)
    offset = tl.load(seed_ptr + 1)
    base = keep_ptr + ((batch.to(tl.int64) * num_heads + head) * len_q + rows.to(tl.int64)[:, None]) * len_k
    for first_col in range(0, len_k, BLOCK_N):
        cols = first_col + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, offset, batch, head, rows[:, None], cols[None, :], dropout_p)
        tl.store(base + cols[None, :], keep.to(tl.int8), mask=(rows < len_q)[:, None] & (cols < len_k)[None, :])


# ---------------------------------------------------------------------------------------- launchers
def _dot_precision(t: Tensor) -> str:
    """Float32 dots use TF32 exactly when torch's own CUDA matmuls would."""
    if t.dtype != torch.float32 or not t.is_cuda:
        return "ieee"  # other dtypes ignore it; the interpreter's dots are numpy's
    matmul = torch.backends.cuda.matmul
    try:
        allow_tf32 = matmul.allow_tf32
    except RuntimeError:  # torch >= 2.9 refuses the legacy flag once the fp32_precision API was used
        allow_tf32 = matmul.fp32_precision == "tf32"
    return "tf32" if allow_tf32 else "ieee"


def _head_block(dim: int) -> int:
    return max(_MIN_DOT_DIM, triton.next_power_of_2(dim))


def _length_bucket(length: int) -> int:
    return triton.next_power_of_2(max(1, length))


def _fail(op: str, message: str) -> None:
    raise RuntimeError(f"bigkernels::{op}: {message}")


def _check_inputs(op: str, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                  cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], dropout_p: float,
                  dropout_seed: Optional[Tensor]) -> None:
    """A direct torch.ops call skips bigkernels/ops/attention.py's friendlier checks: these keep a bad
    call from reading out of bounds, raising RuntimeError like the C++ ops' TORCH_CHECKs."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            _fail(op, f"{name} must be 4-D (batch, heads, length, head_dim), got shape {list(t.shape)}")
        if t.dtype != query.dtype or t.device != query.device:
            _fail(op, f"{name} must have the dtype and device of query ({query.dtype}, {query.device}), "
                      f"got ({t.dtype}, {t.device})")
    if query.dtype not in _SUPPORTED_DTYPES:
        _fail(op, f"query must be float16, bfloat16 or float32, got {query.dtype}")
    if not query.is_cuda and not _INTERPRETED:
        _fail(op, f"takes CUDA tensors, got tensors on {query.device} (CPU tensors run under the Triton "
                  "interpreter: set TRITON_INTERPRET=1 before importing bigkernels)")
    batch, heads_q, len_q, head_dim = query.shape
    _, heads_k, len_k, _ = key.shape
    if key.shape[0] != batch or key.shape[3] != head_dim:
        _fail(op, f"key must be (batch={batch}, heads_k, S, E={head_dim}), got {list(key.shape)}")
    if value.shape[:3] != key.shape[:3]:
        _fail(op, f"value must be (batch, heads_k, S) = {list(key.shape[:3])} by Ev, got {list(value.shape)}")
    if heads_k == 0 or heads_q % heads_k != 0:
        _fail(op, f"query heads ({heads_q}) must be a multiple of key/value heads ({heads_k})")
    for name, dim in (("query/key head dim E", head_dim), ("value head dim Ev", value.shape[3])):
        if not 1 <= dim <= _MAX_HEAD_DIM:
            _fail(op, f"{name} must be in 1..{_MAX_HEAD_DIM}, got {dim}")
    if attn_mask is not None:
        if tuple(attn_mask.shape) != (batch, heads_q, len_q, len_k):
            _fail(op, f"attn_mask must have shape (B, Hq, L, S) = {(batch, heads_q, len_q, len_k)}, "
                      f"got {tuple(attn_mask.shape)}")
        if attn_mask.dtype != query.dtype or attn_mask.device != query.device:
            _fail(op, f"attn_mask must be an additive mask of query's dtype and device ({query.dtype}, "
                      f"{query.device}), got ({attn_mask.dtype}, {attn_mask.device})")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        _fail(op, "cu_seqlens_q and cu_seqlens_k must both be given or both be None")
    if cu_seqlens_q is not None:
        for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if t.dim() != 1 or t.dtype != torch.int32 or t.device != query.device or t.numel() < 1:
                _fail(op, f"{name} must be a 1-D int32 tensor of length N + 1 on {query.device}, got "
                          f"{t.dtype} of shape {list(t.shape)} on {t.device}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            _fail(op, "cu_seqlens_q and cu_seqlens_k must have the same length N + 1")
        if batch != 1:
            _fail(op, f"varlen (cu_seqlens given) needs batch 1, got {batch}")
        if attn_mask is not None:
            _fail(op, "attn_mask must be None with varlen (cu_seqlens given)")
    if not 0.0 <= dropout_p < 1.0:
        _fail(op, f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        if (dropout_seed is None or dropout_seed.shape != (2,) or dropout_seed.dtype != torch.int64
                or dropout_seed.device != query.device):
            _fail(op, f"dropout_seed must be an int64 tensor of shape (2,) ([seed, offset]) on {query.device} "
                      "when dropout_p > 0")


def _common_meta(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                 cu_seqlens_q: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, window_left: int,
                 window_right: int, dropout_p: float) -> tuple[int, int, int, dict]:
    """(programs along the batch axis, longest query sequence, longest key sequence, constexprs and keys)."""
    varlen = cu_seqlens_q is not None
    batch_programs = cu_seqlens_q.numel() - 1 if varlen else query.shape[0]
    longest_q = max_seqlen_q if varlen else query.shape[2]
    longest_k = max_seqlen_k if varlen else key.shape[2]
    meta = dict(
        LEN_Q_BUCKET=_length_bucket(longest_q), LEN_K_BUCKET=_length_bucket(longest_k),
        IS_VARLEN=varlen, HAS_MASK=attn_mask is not None, HAS_DROPOUT=dropout_p > 0.0,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, DOT_PRECISION=_dot_precision(query),
        HEAD_DIM=query.shape[3], HEAD_DIM_V=value.shape[3],
        BLOCK_E=_head_block(query.shape[3]), BLOCK_EV=_head_block(value.shape[3]),
    )
    return batch_programs, longest_q, longest_k, meta


def attention_grid(op: str, length: int, block: int, heads: int, batch_programs: int,
                   ) -> tuple[tuple[int, int, int], int, int]:
    """(grid, chunks, span) for one program per (block of `length` rows, head, batch or sequence): the
    batch axis is grid z up to CUDA's 65 535, folded into x beyond (chunks, span: the kernels' unfold_pid)."""
    chunks, span = fold(batch_programs)
    return checked_grid(op, triton.cdiv(length, block) * chunks, heads, span), chunks, span


def _strides(t: Optional[Tensor], n: int = 4) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


@launches_on("attention_triton", "query", "key", "value", "attn_mask", "cu_seqlens_q", "cu_seqlens_k", "dropout_seed")
def attention_forward(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    scale: float, window_left: int, window_right: int, dropout_p: float, dropout_seed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Flash attention forward. query (B, Hq, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev), any
    strides; float16/bfloat16/float32 on CUDA (or CPU under TRITON_INTERPRET=1). Arguments as the
    bigkernels::attention schema. Returns output (B, Hq, L, Ev) with (B, L, Hq, Ev) memory, and
    lse (B, Hq, L) float32 (natural log, -inf for a row that sees no key)."""
    _check_inputs("attention_triton", query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k, dropout_p,
                  dropout_seed)
    batch, heads_q, len_q, _ = query.shape
    heads_k, len_k, head_dim_v = key.shape[1], key.shape[2], value.shape[3]
    output = query.new_empty((batch, len_q, heads_q, head_dim_v)).transpose(1, 2)
    lse = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=query.device)
    batch_programs, longest_q, longest_k, meta = _common_meta(
        query, key, value, attn_mask, cu_seqlens_q, max_seqlen_q, max_seqlen_k, window_left, window_right,
        dropout_p)
    if batch_programs == 0 or heads_q == 0 or longest_q == 0 or len_q == 0:
        return output, lse
    any_tensor = query  # stands in for the optional pointers a False constexpr never reads
    op = "attention_triton"
    _, chunks, span = attention_grid(op, longest_q, 1, heads_q, batch_programs)
    grid = lambda META: attention_grid(op, longest_q, META["BLOCK_M"], heads_q, batch_programs)[0]  # noqa: E731
    _attention_forward_kernel[grid](
        query, key, value, attn_mask if attn_mask is not None else any_tensor, output, lse,
        cu_seqlens_q if cu_seqlens_q is not None else any_tensor,
        cu_seqlens_k if cu_seqlens_k is not None else any_tensor,
        dropout_seed if dropout_p > 0.0 else any_tensor,
        *query.stride(), *key.stride(), *value.stride(), *_strides(attn_mask), *output.stride(),
        lse.stride(0), lse.stride(1),
        heads_q // heads_k, len_q, len_k,
        scale * _LOG2E, window_left, window_right, dropout_p, 1.0 / (1.0 - dropout_p),
        batch_programs, chunks, span, **meta,
    )
    return output, lse


@launches_on("attention_backward_triton", "grad_output", "query", "key", "value", "output", "lse", "attn_mask",
             "cu_seqlens_q", "cu_seqlens_k", "dropout_seed")
def attention_backward(
    grad_output: Tensor, query: Tensor, key: Tensor, value: Tensor, output: Tensor, lse: Tensor,
    attn_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
    dropout_p: float, dropout_seed: Optional[Tensor], need_grad_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flash attention backward from the forward's output and lse. Returns (grad_query, grad_key,
    grad_value) contiguous, shaped like query/key/value (grouped-query heads summed per key/value
    head), and grad_attn_mask (B, Hq, L, S) in query's dtype when need_grad_mask, else an empty (0,)."""
    op = "attention_backward_triton"
    _check_inputs(op, query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k, dropout_p, dropout_seed)
    batch, heads_q, len_q, head_dim = query.shape
    heads_k, len_k, head_dim_v = key.shape[1], key.shape[2], value.shape[3]
    for name, t in (("grad_output", grad_output), ("output", output)):
        if tuple(t.shape) != (batch, heads_q, len_q, head_dim_v) or t.dtype != query.dtype or t.device != query.device:
            _fail(op, f"{name} must be (B, Hq, L, Ev) = {(batch, heads_q, len_q, head_dim_v)} of query's dtype "
                      f"and device, got {tuple(t.shape)} {t.dtype} on {t.device}")
    if tuple(lse.shape) != (batch, heads_q, len_q) or lse.dtype != torch.float32 or lse.stride(2) != 1:
        _fail(op, f"lse must be the forward's float32 (B, Hq, L) = {(batch, heads_q, len_q)} with unit last "
                  f"stride, got {tuple(lse.shape)} {lse.dtype}")
    grad_query = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    grad_key = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    grad_value = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    # Zeros: blocks outside the window are never visited, and their mask gradient is 0.
    grad_mask = (torch.zeros((batch, heads_q, len_q, len_k), dtype=query.dtype, device=query.device)
                 if need_grad_mask else query.new_empty((0,)))
    batch_programs, longest_q, longest_k, meta = _common_meta(
        query, key, value, attn_mask, cu_seqlens_q, max_seqlen_q, max_seqlen_k, window_left, window_right,
        dropout_p)
    if batch_programs == 0 or heads_q == 0:
        return grad_query, grad_key, grad_value, grad_mask
    if len_q == 0 or longest_q == 0:  # no query: key/value get no gradient
        grad_key.zero_()
        grad_value.zero_()
        return grad_query, grad_key, grad_value, grad_mask
    if len_k == 0 or longest_k == 0:  # no key: every row sees nothing
        grad_query.zero_()
        return grad_query, grad_key, grad_value, grad_mask

    delta = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=query.device)
    delta_block_m = 16 if _INTERPRETED else 64  # pointwise: 64 rows of up to 256 columns a program
    delta_grid, chunks, span = attention_grid(op, len_q, delta_block_m, heads_q, batch)
    _attention_backward_delta_kernel[delta_grid](
        output, grad_output, delta, *output.stride(), *grad_output.stride(), heads_q, len_q, head_dim_v,
        batch, chunks, span,
        BLOCK_M=delta_block_m, BLOCK_EV=meta["BLOCK_EV"], num_warps=4,
    )

    any_tensor = query
    mask_arg = attn_mask if attn_mask is not None else any_tensor
    cu_q = cu_seqlens_q if cu_seqlens_q is not None else any_tensor
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else any_tensor
    seed = dropout_seed if dropout_p > 0.0 else any_tensor
    common = (*query.stride(), *key.stride(), *value.stride(), *_strides(attn_mask), *grad_output.stride(),
              lse.stride(0), lse.stride(1))
    numbers = (heads_q, heads_q // heads_k, len_q, len_k, scale, scale * _LOG2E,
               window_left, window_right, dropout_p, 1.0 / (1.0 - dropout_p))
    _, chunks, span = attention_grid(op, longest_k, 1, heads_k, batch_programs)
    numbers += (batch_programs, chunks, span)
    dkdv_grid = lambda META: attention_grid(op, longest_k, META["BLOCK_N"], heads_k, batch_programs)[0]  # noqa: E731
    _attention_backward_dkdv_kernel[dkdv_grid](
        query, key, value, mask_arg, grad_output, lse, delta, grad_key, grad_value,
        grad_mask if need_grad_mask else any_tensor, cu_q, cu_k, seed,
        *common, *grad_key.stride(), *grad_value.stride(), *_strides(grad_mask if need_grad_mask else None),
        *numbers, STORE_MASK_GRAD=need_grad_mask, **meta,
    )
    dq_grid = lambda META: attention_grid(op, longest_q, META["BLOCK_M"], heads_q, batch_programs)[0]  # noqa: E731
    _attention_backward_dq_kernel[dq_grid](
        query, key, value, mask_arg, grad_output, lse, delta, grad_query, cu_q, cu_k, seed,
        *common, *grad_query.stride(), *numbers, **meta,
    )
    return grad_query, grad_key, grad_value, grad_mask


def dropout_keep_mask(seed: Tensor, B: int, H: int, L: int, S: int, p: float,
                      device: torch.device | str | None = None) -> Tensor:
    """The keep mask (B, H, L, S) bool the attention kernels use for dropout_seed `seed` ([seed, offset]
    int64) and probability p; for varlen, B = 1 and L, S are the packed totals. For tests."""
    device = torch.device(device) if device is not None else seed.device
    keep = torch.empty((B, H, L, S), dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    grid, chunks, span = attention_grid("dropout_keep_mask", L, _MASK_BLOCK_M, H, B)
    with device_guard(device):
        _dropout_keep_mask_kernel[grid](
            seed.to(device=device, dtype=torch.int64), keep, H, L, S, float(p), B, chunks, span,
            BLOCK_M=_MASK_BLOCK_M, BLOCK_N=_MASK_BLOCK_N,
        )
    return keep.bool()
