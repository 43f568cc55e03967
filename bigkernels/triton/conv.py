"""Triton fused convolution: the kernels behind bigkernels::conv_triton / conv_backward_triton.

    y = act(conv2d(x, w, stride, padding, dilation, groups) + bias + residual)

Every kernel is an implicit GEMM: the im2col matrix is never built; each program gathers its tiles
straight from the 4-D tensors with masks for padding, stride and dilation.

- Forward: rows = N*P*Q output pixels, columns = K/groups output channels, reduction = R*S*C/groups
  walked tap by tap ((r, s) outer, input channels inner, one flat loop so Triton pipelines it). The
  epilogue adds bias and residual, stores the pre-activation z when the backward will need it, applies
  the activation and stores y: one kernel, one write of the output.
- grad_input: the transposed convolution as an implicit GEMM over input pixels: rows = N*H*W, columns
  = C/groups, reduction = taps x K/groups; for tap (r, s) an input pixel h receives from output row
  p = (h + pad - r*dil) / stride when that division is exact and p is in range. Which taps divide
  exactly depends only on h mod stride, so there is one launch per stride phase, over only the taps
  that contribute to it (no work masked away for stride 2; see _grad_input_phases).
- grad_weight: rows = K/groups, columns = C/groups for one tap (r, s) per program, reduction over the
  N*P*Q output pixels, split over several programs when there are few output tiles (each split writes
  float32 partial sums, added afterwards in a fixed order: deterministic, no atomics).
- Both gradient GEMMs form gz = dy * act'(z) (or act'(y), see grad_from_output) in their loads: there
  is no separate pass over the output gradient. grad_bias (a deterministic reduction of gz) and
  grad_residual (= gz) come from one small pointwise kernel; when grad_residual is materialised the
  GEMMs read it instead of recomputing act'.

Layouts: the kernels take every tensor's strides, so NCHW and channels_last (NHWC) both work without
a copy (nothing is converted per call). channels_last is the fast layout, for the input AND the weight
(module.to(memory_format=torch.channels_last) converts both): the reductions run along channels, which
are then contiguous, so the gathers become 16-byte loads that Triton pipelines (cp.async) into the
tensor-core dots. With NCHW tensors the same gathers are strided, element by element. (Checked by
compiling for sm_90 without a GPU: channels_last input and weight give 3-stage cp.async pipelines and
wgmma in all three GEMM kernels; an NCHW-contiguous weight leaves the weight loads unpipelined:
tests/triton_sm90_compile.py.) Outputs (y, z, grad_input, grad_residual) are allocated in the input's
memory format (input.suggest_memory_format(), as torch's conv does); grad_weight in the weight's
(weight.suggest_memory_format()); grad_bias contiguous.

Known costs: tiles are at least 16 channels wide (tl.dot's minimum), so groups with fewer channels
(depthwise, ResNeXt-style groups of 4 or 8) waste most of each dot; depthwise calls on CUDA go to the
direct bigkernels::conv_depthwise kernels instead.

dtypes: float16, bfloat16, float32 (float32 accumulation; float32 dots use TF32 exactly when torch's
cuDNN convolutions would). CUDA tensors, or CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set before importing bigkernels; tests/conftest.py does it).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from bigkernels._backend import triton_interpreting
from bigkernels.triton._launch import checked_grid, fold, launches_on, unfold_pid

# Read once, like triton.jit: the kernels below were built for the interpreter or not at import time.
_INTERPRETED = triton_interpreting()

_OP = "bigkernels::conv_triton"
_BACKWARD_OP = "bigkernels::conv_backward_triton"

# Activation ids: the order of csrc/common/activation.h (enum class Activation).
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "leaky_relu")
_NONE, _RELU, _GELU, _GELU_TANH, _SILU, _SIGMOID, _LEAKY_RELU = range(len(ACTIVATIONS))

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:  # the Python twin of ATen's Tensor::suggest_memory_format (torch >= 2.0)
    from torch._prims_common import suggest_memory_format as _suggest_memory_format
except ImportError:  # pragma: no cover - a future torch that moved it: the unambiguous cases only
    def _suggest_memory_format(t: Tensor) -> torch.memory_format:
        if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        return torch.contiguous_format


# --------------------------------------------------------------------------------------- tile configs
# Tiles by name: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). GROUP_M = 8 row tiles share
# their column tiles in L2 (see _tile_ids).
if _INTERPRETED:
    # One small tile: the interpreter runs numpy per block op, so the tests' tiny shapes need few
    # programs, and with one config the autotuner benchmarks nothing.
    _FORWARD_TILES = _GRAD_INPUT_TILES = _GRAD_WEIGHT_TILES = {"interpreter": (32, 16, 16, 4, 1)}
else:
    # First choices for Hopper/Ampere (bf16/fp16 at 16-byte loads), not yet tuned on a GPU. A tile
    # too large for shared memory in some dtype (fp32 at BLOCK_K = 64 with 4 stages) is pruned for
    # that dtype (_prune_configs).
    _FORWARD_TILES = {
        "large": (128, 128, 64, 8, 3),        # many pixels and >= 128 output channels
        "many_pixels": (128, 64, 64, 4, 4),   # 64-channel layers (ResNet stage 1) at 56x56
        "many_channels": (64, 128, 64, 4, 4), # late stages: few pixels (14x14, 7x7), wide layers
        "small": (64, 64, 64, 4, 4),          # small layers: more programs to fill the SMs
        "fp32": (128, 128, 32, 8, 4),         # half the shared memory per stage for 4-byte data
        "few_outputs": (128, 32, 32, 4, 4),   # few output channels per group (grouped convs)
        "thin_reduction": (128, 64, 16, 4, 4),  # the RGB stem (C = 3), few input channels per group
    }
    # The transposed conv is the same GEMM family (pixels x channels, reduced over taps x channels),
    # but its gathers of the weight hold more registers: at BLOCK_K = 64, or 128 x 128 tiles at 4
    # warps, every forward tile spilled (tools/triton_check.py, sm_80/sm_90), so K steps are 32 and
    # the large tiles take 8 warps.
    _GRAD_INPUT_TILES = {
        "tall": (128, 64, 32, 8, 4),
        "wide": (64, 128, 32, 8, 4),
        "small": (64, 64, 32, 4, 4),
        "thin_reduction": (128, 64, 16, 4, 4),
    }
    # grad_weight tiles are (K x C) for one tap, reduced over N*P*Q pixels: long reductions. Same
    # register limits as grad_input (measured); one deep-K tile for few input channels.
    _GRAD_WEIGHT_TILES = {
        "tall": (128, 64, 32, 8, 4),          # more output than input channels (1x1 expand layers)
        "wide": (64, 128, 32, 8, 4),          # more input than output channels (1x1 reduce layers)
        "small": (64, 64, 32, 4, 4),
        "thin_input": (64, 16, 128, 4, 3),    # few input channels per group (the RGB stem)
    }


def _configs(tiles: dict) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for m, n, k, w, st in tiles.values()]


# Shared memory the pipelined A and B tiles may take: the A100's opt-in 163 KiB (the smallest of the
# supported GPUs) less room for the epilogue's layout conversions. Above it a tile fails to launch
# (fp32 at BLOCK_K = 64 with 4 stages, 192 KiB), so it is pruned rather than left to fail.
_SHARED_BUDGET = 144 * 1024


def _pipelined_bytes(config, element_size: int) -> int:
    k = config.kwargs
    return config.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * element_size


def _prune_configs(configs, named_args, **kwargs):
    """The configs whose pipelined tiles fit _SHARED_BUDGET for this call's dtype (at least one)."""
    size = next(v for v in named_args.values() if isinstance(v, torch.Tensor)).element_size()
    kept = [c for c in configs if _pipelined_bytes(c, size) <= _SHARED_BUDGET]
    return kept or [min(configs, key=lambda c: _pipelined_bytes(c, size))]


_PRUNE = {"early_config_prune": _prune_configs}
_FORWARD_CONFIGS = _configs(_FORWARD_TILES)
_GRAD_INPUT_CONFIGS = _configs(_GRAD_INPUT_TILES)
_GRAD_WEIGHT_CONFIGS = _configs(_GRAD_WEIGHT_TILES)

# The grad_weight split length is a multiple of every config's BLOCK_K, so a split never ends inside
# a reduction block (each block lies wholly in one split).
_MAX_GRAD_WEIGHT_BLOCK_K = max(c.kwargs["BLOCK_K"] for c in _GRAD_WEIGHT_CONFIGS)
# Enough programs to fill a GPU a few times over; on CPU (interpreter) 2, so the split path runs in CI.
_TARGET_PROGRAMS_PER_SM = 4
_INTERPRETER_TARGET_PROGRAMS = 2
# A split never reduces fewer pixels than this (below it the partial sums cost more than they save).
_MIN_PIXELS_PER_SPLIT = 512 if not _INTERPRETED else 16

# Pointwise gz kernel (grad_bias/grad_residual): no tl.dot, only wide loads; rows split as the LSTM's.
_GZ_BLOCK_M = 32
_GZ_BLOCK_N = 32 if _INTERPRETED else 64
_GZ_WARPS = 4
_GZ_TARGET_PROGRAMS = 512 if not _INTERPRETED else 2

# The interpreter accepts any dot shape, so CI would not catch a tile a GPU refuses: check here.
assert all(min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) >= 16
           for c in _FORWARD_CONFIGS + _GRAD_INPUT_CONFIGS + _GRAD_WEIGHT_CONFIGS)

# Autotune keys: the problem's shape (the dtypes of the tensor arguments are added by the autotuner),
# and the channel strides of the gathered tensors, so that NCHW and channels_last calls (strided vs
# 16-byte loads) are tuned apart.
_KEY = ["N", "Cg", "H", "W", "Kg", "P", "Q", "R", "S", "stride_h", "stride_w"]


# -------------------------------------------------------------------------------------- activations
# From exp(-|x|) in (0, 1]: no overflow for large |x| (and no numpy warnings under the interpreter).
# tl has no tanh in its stable API and libdevice's is missing under the interpreter.
@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    s = 1 / (1 + e)
    return tl.where(x >= 0, s, e * s)


@triton.jit
def _tanh(x):
    e = tl.exp(-2 * tl.abs(x))
    t = (1 - e) / (1 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _activation(z, negative_slope, ACTIVATION: tl.constexpr):
    """act(z) in float32; ids as csrc/common/activation.h."""
    y = z
    if ACTIVATION == 1:  # relu
        y = tl.where(z > 0, z, 0.0)
    elif ACTIVATION == 2:  # gelu (erf)
        y = 0.5 * z * (1 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:  # gelu_tanh
        y = 0.5 * z * (1 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == 4:  # silu
        y = z * _sigmoid(z)
    elif ACTIVATION == 5:  # sigmoid
        y = _sigmoid(z)
    elif ACTIVATION == 6:  # leaky_relu
        y = tl.where(z > 0, z, z * negative_slope)
    return y


@triton.jit
def _activation_grad(v, negative_slope, ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """d act / dz in float32, from v = z, or from v = y = act(z) when FROM_OUTPUT (relu, sigmoid,
    leaky_relu with a positive slope: the same outputs as from z)."""
    d = tl.full(v.shape, 1.0, tl.float32)
    if ACTIVATION == 1:  # relu: y > 0 exactly where z > 0
        d = tl.where(v > 0, 1.0, 0.0)
    elif ACTIVATION == 2:  # gelu: Phi(z) + z * phi(z)
        cdf = 0.5 * (1 + tl.math.erf(v * 0.7071067811865476))
        d = cdf + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)
    elif ACTIVATION == 3:  # gelu_tanh
        t = _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))
        d = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * v * v)
    elif ACTIVATION == 4:  # silu: s * (1 + z * (1 - s))
        s = _sigmoid(v)
        d = s * (1 + v * (1 - s))
    elif ACTIVATION == 5:  # sigmoid
        if FROM_OUTPUT:
            d = v * (1 - v)
        else:
            s = _sigmoid(v)
            d = s * (1 - s)
    elif ACTIVATION == 6:  # leaky_relu (from y only for a positive slope: sign(y) == sign(z))
        d = tl.where(v > 0, 1.0, negative_slope)
    return d


@triton.jit
def _load_gz(dy_ptr, saved_ptr, dy_offsets, saved_offsets, mask, negative_slope,
             ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """gz = dy * act'(saved) in float32 at the given offsets (0 where masked)."""
    gz = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        v = tl.load(saved_ptr + saved_offsets, mask=mask, other=0.0).to(tl.float32)
        gz = gz * _activation_grad(v, negative_slope, ACTIVATION, FROM_OUTPUT)
    return gz


@triton.jit
def _tile_ids(pid, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program pid, in groups of GROUP_M row tiles: the programs running
    together share their column (weight) tiles and a few row tiles, which then stay in L2."""
    per_group = GROUP_M * num_n_tiles
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


# ------------------------------------------------------------------------------------------ forward
@triton.autotune(configs=_FORWARD_CONFIGS, key=_KEY + ["sx_c", "sw_c"], prune_configs_by=_PRUNE)
@triton.jit
def _conv_forward_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, y_ptr, z_ptr,
    N, Cg, H, W, Kg, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    s_bias,
    sr_n, sr_k, sr_p, sr_q,
    sy_n, sy_k, sy_p, sy_q,  # y and z share their strides (both allocated like the input)
    negative_slope,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_Z: tl.constexpr,
    ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    group = tl.program_id(1)
    M = N * P * Q
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(Kg, BLOCK_N), GROUP_M)

    # Rows: output pixels (n, p, q). Columns: output channels of this group.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    n = rows // (P * Q)
    pq = rows % (P * Q)
    p = pq // Q
    q = pq % Q
    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    x_rows = x_ptr + n.to(tl.int64) * sx_n + (group * Cg).to(tl.int64) * sx_c  # N*C*H*W may pass 2**31
    ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < Kg
    w_cols = w_ptr + (group * Kg + ks).to(tl.int64) * sw_k
    cs = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_blocks = tl.cdiv(Cg, BLOCK_K)
    # One flat loop over (tap, channel block), so that Triton software-pipelines all of it.
    for t in range(0, R * S * c_blocks):
        tap = t // c_blocks
        c0 = (t - tap * c_blocks) * BLOCK_K
        r = tap // S
        s = tap - r * S
        ih = h0 + r * dil_h
        iw = w0 + s * dil_w
        pixel_ok = row_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = (c0 + cs) < Cg
        # Masked elements (padding, tails) load as 0 and so add nothing.
        a = tl.load(x_rows[:, None] + (ih * sx_h + iw * sx_w)[:, None] + (c0 + cs)[None, :] * sx_c,
                    mask=pixel_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + (c0 + cs)[:, None] * sw_c + r * sw_r + s * sw_s,
                    mask=c_ok[:, None] & k_mask[None, :], other=0.0)
        # `acc += dot` rather than dot(..., acc): the accumulator keyword's dtype rules differ between
        # Triton versions; Triton's combine pass folds the add into the dot.
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)

    # Epilogue: z = acc + bias + residual; y = act(z).
    channels = group * Kg + ks
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channels * s_bias, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & k_mask[None, :]
    n64 = n.to(tl.int64)
    if HAS_RESIDUAL:
        res_offsets = (n64 * sr_n + p * sr_p + q * sr_q)[:, None] + channels.to(tl.int64)[None, :] * sr_k
        acc += tl.load(residual_ptr + res_offsets, mask=mask, other=0.0).to(tl.float32)
    out_offsets = (n64 * sy_n + p * sy_p + q * sy_q)[:, None] + channels.to(tl.int64)[None, :] * sy_k
    if STORE_Z:
        tl.store(z_ptr + out_offsets, acc.to(z_ptr.dtype.element_ty), mask=mask)
    y = _activation(acc, negative_slope, ACTIVATION)
    tl.store(y_ptr + out_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------- grad_input
@triton.autotune(configs=_GRAD_INPUT_CONFIGS, key=_KEY + ["sdy_k", "sw_c"], prune_configs_by=_PRUNE)
@triton.jit
def _conv_grad_input_kernel(
    dy_ptr, saved_ptr, w_ptr, dx_ptr,
    N, Cg, H, W, Kg, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdy_n, sdy_k, sdy_p, sdy_q,
    ss_n, ss_k, ss_p, ss_q,
    sw_k, sw_c, sw_r, sw_s,
    sdx_n, sdx_c, sdx_h, sdx_w,
    # The stride phase this launch covers (see _grad_input_phases): input rows phase_h + i*stride_h
    # (i < rows_h) and columns likewise, and the taps r = r_first + j*r_step (j < taps_r), s likewise.
    phase_h, phase_w, rows_h, rows_w, r_first, r_step, taps_r, s_first, s_step, taps_s,
    negative_slope,
    ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    group = tl.program_id(1)
    M = N * rows_h * rows_w
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(Cg, BLOCK_N), GROUP_M)

    # Rows: the input pixels (n, h, w) of this stride phase. Columns: input channels of this group.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = rows // (rows_h * rows_w)
    hw = rows % (rows_h * rows_w)
    ih = phase_h + (hw // rows_w) * stride_h
    iw = phase_w + (hw % rows_w) * stride_w
    row_mask = (rows < M) & (ih < H) & (iw < W)
    n64 = n.to(tl.int64)
    dy_rows = n64 * sdy_n
    saved_rows = n64 * ss_n
    cs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = cs < Cg
    ks = tl.arange(0, BLOCK_K)
    first_k = group * Kg

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_blocks = tl.cdiv(Kg, BLOCK_K)
    for t in range(0, taps_r * taps_s * k_blocks):
        tap = t // k_blocks
        k0 = (t - tap * k_blocks) * BLOCK_K
        r = r_first + (tap // taps_s) * r_step
        s = s_first + (tap % taps_s) * s_step
        # Every tap of this phase divides exactly: the output pixel that tap (r, s) of input pixel
        # (h, w) feeds is ((h + pad - r*dil) / stride, ...) when inside the output. (The >= 0 test
        # comes first, so the rounding of // for negative numerators does not matter.)
        oh_num = ih + pad_h - r * dil_h
        ow_num = iw + pad_w - s * dil_w
        oh = oh_num // stride_h
        ow = ow_num // stride_w
        pixel_ok = row_mask & (oh_num >= 0) & (ow_num >= 0) & (oh < P) & (ow < Q)
        k_ok = (k0 + ks) < Kg
        channels = (first_k + k0 + ks).to(tl.int64)
        gz_mask = pixel_ok[:, None] & k_ok[None, :]
        a = _load_gz(dy_ptr, saved_ptr,
                     (dy_rows + oh * sdy_p + ow * sdy_q)[:, None] + channels[None, :] * sdy_k,
                     (saved_rows + oh * ss_p + ow * ss_q)[:, None] + channels[None, :] * ss_k,
                     gz_mask, negative_slope, ACTIVATION, FROM_OUTPUT)
        b = tl.load(w_ptr + channels[:, None] * sw_k + cs[None, :] * sw_c + r * sw_r + s * sw_s,
                    mask=k_ok[:, None] & c_mask[None, :], other=0.0)
        acc += tl.dot(a.to(b.dtype), b, input_precision=DOT_PRECISION)

    # Pixels no tap reaches (a phase without taps, rows past the last output) get their zeros here.
    mask = row_mask[:, None] & c_mask[None, :]
    dx_offsets = (n64 * sdx_n + ih * sdx_h + iw * sdx_w)[:, None] + (group * Cg + cs).to(tl.int64)[None, :] * sdx_c
    tl.store(dx_ptr + dx_offsets, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ grad_weight
@triton.autotune(configs=_GRAD_WEIGHT_CONFIGS, key=_KEY + ["sdy_k", "sx_c", "split_length"], prune_configs_by=_PRUNE)
@triton.jit
def _conv_grad_weight_kernel(
    dy_ptr, saved_ptr, x_ptr, dw_ptr,
    N, Cg, H, W, Kg, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdy_n, sdy_k, sdy_p, sdy_q,
    ss_n, ss_k, ss_p, ss_q,
    sx_n, sx_c, sx_h, sx_w,
    sdw_split, sdw_k, sdw_c, sdw_r, sdw_s,
    split_length,  # output pixels each split reduces; a multiple of BLOCK_K
    group_taps, tap_chunks, tap_span,  # groups * R * S, and its fold into axis 0 (grad_weight_grid)
    negative_slope,
    ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Axis 1 holds (group, tap), its excess over CUDA's 65 535 folded into axis 0; axis 2 the split of
    # the N*P*Q reduction.
    tile, group_tap = unfold_pid(tap_chunks, tap_span, tl.program_id(1))
    if group_tap >= group_taps:  # past the end in the last chunk
        return
    group = group_tap // (R * S)
    tap = group_tap % (R * S)
    r = tap // S
    s = tap % S
    split = tl.program_id(2)
    pid_m, pid_n = _tile_ids(tile, tl.cdiv(Kg, BLOCK_M), tl.cdiv(Cg, BLOCK_N), GROUP_M)

    # Rows: output channels of this group. Columns: input channels of this group.
    ks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_mask = ks < Kg
    cs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = cs < Cg
    dy_cols = (group * Kg + ks).to(tl.int64) * sdy_k
    saved_cols = (group * Kg + ks).to(tl.int64) * ss_k
    x_cols = (group * Cg + cs).to(tl.int64) * sx_c
    js = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    PQ = P * Q
    NPQ = N * PQ
    start = split * split_length
    end = tl.minimum(start + split_length, NPQ)
    for j0 in range(start, end, BLOCK_K):
        pixels = j0 + js
        pixel_mask = pixels < end
        n64 = (pixels // PQ).to(tl.int64)
        pq = pixels % PQ
        p = pq // Q
        q = pq % Q
        a = _load_gz(dy_ptr, saved_ptr,
                     dy_cols[:, None] + (n64 * sdy_n + p * sdy_p + q * sdy_q)[None, :],
                     saved_cols[:, None] + (n64 * ss_n + p * ss_p + q * ss_q)[None, :],
                     k_mask[:, None] & pixel_mask[None, :], negative_slope, ACTIVATION, FROM_OUTPUT)
        ih = p * stride_h - pad_h + r * dil_h
        iw = q * stride_w - pad_w + s * dil_w
        x_ok = pixel_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_ptr + (n64 * sx_n + ih * sx_h + iw * sx_w)[:, None] + x_cols[None, :],
                    mask=x_ok[:, None] & c_mask[None, :], other=0.0)
        acc += tl.dot(a.to(b.dtype), b, input_precision=DOT_PRECISION)

    mask = k_mask[:, None] & c_mask[None, :]
    dw_offsets = (split * sdw_split + r * sdw_r + s * sdw_s
                  + (group * Kg + ks)[:, None] * sdw_k + cs[None, :] * sdw_c)
    tl.store(dw_ptr + dw_offsets, acc.to(dw_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ gz: grad_bias and grad_residual
@triton.jit
def _conv_gz_kernel(
    dy_ptr, saved_ptr, gz_ptr, bias_partial_ptr,
    M, K, PQ, Q, rows_per_program,
    sdy_n, sdy_k, sdy_p, sdy_q,
    ss_n, ss_k, ss_p, ss_q,
    sgz_n, sgz_k, sgz_p, sgz_q,
    negative_slope,
    ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, STORE_GZ: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each program owns BLOCK_N channels of rows_per_program output pixels and sums its share of the
    # bias gradient in registers: one partial row per split, added afterwards in a fixed order.
    split = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    k64 = ks.to(tl.int64)
    bias_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = split * rows_per_program
    for m0 in range(first, tl.minimum(first + rows_per_program, M), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & k_mask[None, :]
        n64 = (rows // PQ).to(tl.int64)
        p = (rows % PQ) // Q
        q = rows % Q
        gz = _load_gz(dy_ptr, saved_ptr,
                      (n64 * sdy_n + p * sdy_p + q * sdy_q)[:, None] + k64[None, :] * sdy_k,
                      (n64 * ss_n + p * ss_p + q * ss_q)[:, None] + k64[None, :] * ss_k,
                      mask, negative_slope, ACTIVATION, FROM_OUTPUT)
        if STORE_GZ:
            gz_offsets = (n64 * sgz_n + p * sgz_p + q * sgz_q)[:, None] + k64[None, :] * sgz_k
            tl.store(gz_ptr + gz_offsets, gz.to(gz_ptr.dtype.element_ty), mask=mask)
        if BIAS_GRAD:
            # Rounded to the storage dtype first, as the stock backward sums the stored gz.
            bias_sum += tl.sum(gz.to(gz_ptr.dtype.element_ty).to(tl.float32), axis=0)
    if BIAS_GRAD:
        tl.store(bias_partial_ptr + split * K + ks, bias_sum, mask=k_mask)


# ---------------------------------------------------------------------------------------- launchers
def _activation_id(activation: str) -> int:
    try:
        return ACTIVATIONS.index(activation)
    except ValueError:
        raise RuntimeError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}") from None


def grad_from_output(activation: str, negative_slope: float) -> bool:
    """True when act'(z) is a function of y = act(z) alone, so the forward need not keep z
    (csrc/common/activation.h activation_grad_from_output)."""
    return activation in ("none", "relu", "sigmoid") or (activation == "leaky_relu" and negative_slope > 0)


def _dot_precision(t: Tensor) -> str:
    """Float32 dots use TF32 exactly when torch's cuDNN convolutions would."""
    if t.dtype != torch.float32 or not t.is_cuda:
        return "ieee"  # other dtypes ignore it; the interpreter's dots are numpy's
    try:
        allow_tf32 = torch.backends.cudnn.allow_tf32
    except RuntimeError:  # torch >= 2.9 refuses the legacy flag once the fp32_precision API was used
        allow_tf32 = torch.backends.cudnn.conv.fp32_precision == "tf32"
    return "tf32" if allow_tf32 else "ieee"


def _memory_format(input: Tensor) -> torch.memory_format:
    """The outputs' layout: the one ATen's input.suggest_memory_format() names, as torch's own conv
    does (channels_last for channels_last strides, also in the ambiguous cases C == 1 or H == W == 1,
    decided by the strides), else NCHW-contiguous."""
    return _suggest_memory_format(input)


def _pair(value: Sequence[int], name: str, op: str) -> tuple[int, int]:
    if len(value) != 2:
        raise RuntimeError(f"{op}: {name} must have 2 elements, got {list(value)}")
    return int(value[0]), int(value[1])


def output_size(input_size: Sequence[int], weight_size: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    """(P, Q) of a convolution of an (N, C, H, W) input with a (K, C/groups, R, S) weight."""
    (_, _, H, W), (_, _, R, S) = input_size, weight_size
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return P, Q


def _check_conv(input: Tensor, weight: Tensor, stride, padding, dilation, groups: int, op: str):
    """Sizes of a valid call, as a tuple; RuntimeError naming the argument otherwise. A direct
    torch.ops call skips bigkernels/ops/conv.py's friendlier checks: these keep it from reading out of
    bounds."""
    stride, padding, dilation = (_pair(stride, "stride", op), _pair(padding, "padding", op),
                                 _pair(dilation, "dilation", op))
    if input.dim() != 4 or weight.dim() != 4:
        raise RuntimeError(f"{op}: input must be (N, C, H, W) and weight (K, C/groups, R, S), got "
                           f"{list(input.shape)} and {list(weight.shape)}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(f"{op}: input must be float16, bfloat16 or float32, got {input.dtype}")
    if weight.dtype != input.dtype or weight.device != input.device:
        raise RuntimeError(f"{op}: weight must have the dtype and device of input ({input.dtype}, "
                           f"{input.device}), got ({weight.dtype}, {weight.device})")
    if not input.is_cuda and not _INTERPRETED:
        raise RuntimeError(f"{op} takes CUDA tensors, got tensors on {input.device} (CPU tensors run "
                           "under the Triton interpreter: set TRITON_INTERPRET=1 before importing bigkernels)")
    N, C, H, W = input.shape
    K, Cg, R, S = weight.shape
    if groups < 1 or C % groups or K % groups:
        raise RuntimeError(f"{op}: groups must be >= 1 and divide the input channels ({C}) and the "
                           f"output channels ({K}), got {groups}")
    if Cg * groups != C:
        raise RuntimeError(f"{op}: weight must have input channels / groups = {C // groups} channels "
                           f"in dim 1, got weight of shape {list(weight.shape)}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise RuntimeError(f"{op}: stride and dilation must be >= 1 and padding >= 0, got stride "
                           f"{list(stride)}, padding {list(padding)}, dilation {list(dilation)}")
    P, Q = output_size(input.shape, weight.shape, stride, padding, dilation)
    if P < 1 or Q < 1:
        raise RuntimeError(f"{op}: the (dilated) kernel {R}x{S} is larger than the padded input "
                           f"{H + 2 * padding[0]}x{W + 2 * padding[1]}")
    return (N, C, H, W, K, Cg, R, S, P, Q), stride, padding, dilation


def _check_output_like(name: str, t: Tensor, shape: tuple, input: Tensor, op: str, meaning: str) -> None:
    if tuple(t.shape) != shape:
        raise RuntimeError(f"{op}: {name} must be {meaning} = {list(shape)}, got {list(t.shape)}")
    if t.dtype != input.dtype or t.device != input.device:
        raise RuntimeError(f"{op}: {name} must have the dtype and device of input ({input.dtype}, "
                           f"{input.device}), got ({t.dtype}, {t.device})")


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@launches_on(_OP, "input", "weight", "bias", "residual")
def conv_forward(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    activation: str, negative_slope: float, need_preactivation: bool,
) -> tuple[Tensor, Tensor]:
    """y = act(conv2d(input, weight) + bias + residual). input (N, C, H, W), weight (K, C/groups, R, S),
    bias (K,) or None, residual (N, K, P, Q) or None, any strides (channels_last input is the fast
    layout); float16/bfloat16/float32, CUDA (or CPU under TRITON_INTERPRET=1).

    Returns (output (N, K, P, Q) in the input's memory format, preactivation): z = the pre-activation,
    same shape and layout, when need_preactivation and the activation's derivative needs z
    (grad_from_output() False), else an empty (0,) tensor.
    """
    sizes, stride, padding, dilation = _check_conv(input, weight, stride, padding, dilation, groups, _OP)
    N, C, H, W, K, Cg, R, S, P, Q = sizes
    act = _activation_id(activation)
    if bias is not None:
        _check_output_like("bias", bias, (K,), input, _OP, "(output channels,)")
    if residual is not None:
        _check_output_like("residual", residual, (N, K, P, Q), input, _OP, "(N, K, P, Q) like the output")
    fmt = _memory_format(input)
    output = torch.empty((N, K, P, Q), dtype=input.dtype, device=input.device, memory_format=fmt)
    store_z = bool(need_preactivation) and not grad_from_output(activation, negative_slope)
    preactivation = (torch.empty((N, K, P, Q), dtype=input.dtype, device=input.device, memory_format=fmt)
                     if store_z else input.new_empty((0,)))
    if output.numel() == 0:
        return output, preactivation
    Kg = K // groups
    # Unused pointers (HAS_BIAS/HAS_RESIDUAL/STORE_Z False) point at the output: never read or written.
    bias_arg = bias if bias is not None else output
    residual_arg = residual if residual is not None else output
    z_arg = preactivation if store_z else output
    grid = lambda meta: checked_grid(  # noqa: E731
        _OP, triton.cdiv(N * P * Q, meta["BLOCK_M"]) * triton.cdiv(Kg, meta["BLOCK_N"]), groups)
    _conv_forward_kernel[grid](
        input, weight, bias_arg, residual_arg, output, z_arg,
        N, Cg, H, W, Kg, P, Q, R, S,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *input.stride(), *weight.stride(),
        bias.stride(0) if bias is not None else 0,
        *(residual.stride() if residual is not None else (0, 0, 0, 0)),
        *output.stride(),
        float(negative_slope),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, STORE_Z=store_z,
        ACTIVATION=act, DOT_PRECISION=_dot_precision(input),
    )
    return output, preactivation


def _gz_splits(rows: int, column_tiles: int) -> tuple[int, int]:
    """(splits, rows per split) for the pointwise gz kernel: about _GZ_TARGET_PROGRAMS programs."""
    wanted = max(1, _GZ_TARGET_PROGRAMS // column_tiles)
    per_split = triton.cdiv(triton.cdiv(rows, wanted), _GZ_BLOCK_M) * _GZ_BLOCK_M
    per_split = max(per_split, _GZ_BLOCK_M)
    return triton.cdiv(rows, per_split), per_split


def _grad_weight_splits(pixels: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, pixels per split) of grad_weight's N*P*Q reduction: enough programs to fill the GPU
    when the output has few tiles, never splits shorter than _MIN_PIXELS_PER_SPLIT."""
    target = (_TARGET_PROGRAMS_PER_SM * _sm_count(device)) if device.type == "cuda" else _INTERPRETER_TARGET_PROGRAMS
    splits = max(1, min(triton.cdiv(target, tiles), pixels // _MIN_PIXELS_PER_SPLIT))
    length = triton.cdiv(triton.cdiv(pixels, splits), _MAX_GRAD_WEIGHT_BLOCK_K) * _MAX_GRAD_WEIGHT_BLOCK_K
    return triton.cdiv(pixels, length), length


def grad_weight_grid(Kg: int, Cg: int, group_taps: int, splits: int, block_m: int, block_n: int,
                     ) -> tuple[tuple[int, int, int], int, int]:
    """(grid, chunks, span) of the grad_weight kernel: x the (Kg, Cg) tiles, y the groups * R * S
    (group, tap) pairs, z the splits. y passes CUDA's 65 535 for large depthwise/grouped convs (C = 2048
    at 7 x 7: 100 352), so its excess folds into x (chunks, span: the kernel's unfold_pid)."""
    chunks, span = fold(group_taps)
    tiles = triton.cdiv(Kg, block_m) * triton.cdiv(Cg, block_n)
    return checked_grid(_BACKWARD_OP, tiles * chunks, span, splits), chunks, span


def _grad_input_phases(size: int, taps: int, stride: int, padding: int, dilation: int):
    """Stride phases of grad_input along one axis: (phase, rows, (first tap, tap step, tap count)).

    Input pixel h = phase + i*stride receives from tap r exactly when stride divides
    h + padding - r*dilation, i.e. phase + padding - r*dilation: which taps depends on the phase only.
    One launch per phase (stride_h * stride_w launches) then visits only the taps that contribute,
    instead of masking (stride_h * stride_w - 1) / (stride_h * stride_w) of every gathered tile.
    """
    step = stride // math.gcd(stride, dilation)  # r and r + step hit the same phase
    phases = []
    for phase in range(min(stride, size)):
        rows = triton.cdiv(size - phase, stride)
        first = next((r for r in range(min(step, taps)) if (phase + padding - r * dilation) % stride == 0), None)
        count = 0 if first is None else triton.cdiv(taps - first, step)
        phases.append((phase, rows, (first or 0, step, count)))
    return phases


@launches_on(_BACKWARD_OP, "grad_output", "input", "weight", "output", "preactivation")
def conv_backward(
    grad_output: Tensor, input: Tensor, weight: Tensor, output: Tensor, preactivation: Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    activation: str, negative_slope: float, output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of conv_forward from its output (and preactivation, for gelu/gelu_tanh/silu and
    leaky_relu with slope <= 0, which need z). output_mask = (input, weight, bias, residual) says which
    to compute; the others are empty (0,) tensors.

    Returns (grad_input (N, C, H, W) in the input's memory format, grad_weight (K, C/groups, R, S) in
    the weight's, grad_bias (K,), grad_residual (N, K, P, Q) in the input's memory format).
    """
    sizes, stride, padding, dilation = _check_conv(input, weight, stride, padding, dilation, groups, _BACKWARD_OP)
    N, C, H, W, K, Cg, R, S, P, Q = sizes
    act = _activation_id(activation)
    out_shape = (N, K, P, Q)
    _check_output_like("grad_output", grad_output, out_shape, input, _BACKWARD_OP, "(N, K, P, Q) like the output")
    from_output = grad_from_output(activation, negative_slope)
    saved = grad_output  # any valid pointer for ACTIVATION == none: never read
    if act != _NONE:
        if from_output:
            _check_output_like("output", output, out_shape, input, _BACKWARD_OP, "the forward's (N, K, P, Q) output")
            saved = output
        else:
            _check_output_like("preactivation", preactivation, out_shape, input, _BACKWARD_OP,
                               f"the (N, K, P, Q) pre-activation that {activation} needs (saved by "
                               "conv_triton with need_preactivation=True)")
            saved = preactivation
    need_input, need_weight, need_bias, need_residual = (bool(m) for m in output_mask)
    fmt = _memory_format(input)
    device = input.device
    # Distinct empties: a custom op's outputs must not alias each other.
    grad_input = (torch.empty((N, C, H, W), dtype=input.dtype, device=device, memory_format=fmt)
                  if need_input else input.new_empty((0,)))
    # In the weight's layout: AccumulateGrad would otherwise copy it into the parameter's strides.
    grad_weight = (torch.empty((K, Cg, R, S), dtype=input.dtype, device=device,
                               memory_format=_suggest_memory_format(weight))
                   if need_weight else input.new_empty((0,)))
    grad_bias = input.new_empty((K,)) if need_bias else input.new_empty((0,))
    grad_residual = (torch.empty(out_shape, dtype=input.dtype, device=device, memory_format=fmt)
                     if need_residual else input.new_empty((0,)))
    pixels = N * P * Q
    if pixels == 0 or K == 0:  # nothing flows back
        for g in (grad_input, grad_weight, grad_bias, grad_residual):
            g.zero_()
        return grad_input, grad_weight, grad_bias, grad_residual
    negative_slope = float(negative_slope)
    geometry = (N, Cg, H, W, K // groups, P, Q, R, S,
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])

    # gz source for the GEMMs: grad_output with act' applied in their loads, or the materialised gz.
    gz_src, gz_saved, gz_act = grad_output, saved, act
    if need_bias or need_residual:
        column_tiles = triton.cdiv(K, _GZ_BLOCK_N)
        splits, rows_per_split = _gz_splits(pixels, column_tiles)
        partial = torch.empty((splits, K), dtype=torch.float32, device=device) if need_bias else grad_bias
        gz_out = grad_residual if need_residual else grad_output  # STORE_GZ False: never written
        _conv_gz_kernel[(splits, column_tiles)](
            grad_output, saved, gz_out, partial,
            pixels, K, P * Q, Q, rows_per_split,
            *grad_output.stride(), *saved.stride(), *gz_out.stride(),
            negative_slope,
            ACTIVATION=act, FROM_OUTPUT=from_output, STORE_GZ=need_residual, BIAS_GRAD=need_bias,
            BLOCK_M=_GZ_BLOCK_M, BLOCK_N=_GZ_BLOCK_N, num_warps=_GZ_WARPS,
        )
        if need_bias:
            grad_bias.copy_(partial.sum(0))  # torch's reduction order is fixed: deterministic
        if need_residual:
            gz_src, gz_saved, gz_act = grad_residual, grad_residual, _NONE
    dot_precision = _dot_precision(input)

    if need_input and grad_input.numel() > 0:
        for phase_h, rows_h, taps_h in _grad_input_phases(H, R, stride[0], padding[0], dilation[0]):
            for phase_w, rows_w, taps_w in _grad_input_phases(W, S, stride[1], padding[1], dilation[1]):
                rows = N * rows_h * rows_w
                grid = lambda meta: checked_grid(  # noqa: E731
                    _BACKWARD_OP, triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(Cg, meta["BLOCK_N"]), groups)
                _conv_grad_input_kernel[grid](
                    gz_src, gz_saved, weight, grad_input, *geometry,
                    *gz_src.stride(), *gz_saved.stride(), *weight.stride(), *grad_input.stride(),
                    phase_h, phase_w, rows_h, rows_w, *taps_h, *taps_w,
                    negative_slope,
                    ACTIVATION=gz_act, FROM_OUTPUT=from_output, DOT_PRECISION=dot_precision,
                )

    if need_weight and grad_weight.numel() > 0:
        Kg = K // groups
        nominal_tiles = triton.cdiv(Kg, 64) * triton.cdiv(Cg, 64) * R * S * groups
        splits, split_length = _grad_weight_splits(pixels, nominal_tiles, device)
        target = grad_weight
        if splits > 1:
            target = torch.empty((splits, K, Cg, R, S), dtype=torch.float32, device=device)
            dw_strides = target.stride()
        else:
            dw_strides = (0, *grad_weight.stride())
        _, tap_chunks, tap_span = grad_weight_grid(Kg, Cg, groups * R * S, splits, 1, 1)
        grid = lambda meta: grad_weight_grid(Kg, Cg, groups * R * S, splits, meta["BLOCK_M"], meta["BLOCK_N"])[0]
        _conv_grad_weight_kernel[grid](
            gz_src, gz_saved, input, target, *geometry,
            *gz_src.stride(), *gz_saved.stride(), *input.stride(), *dw_strides,
            split_length, groups * R * S, tap_chunks, tap_span, negative_slope,
            ACTIVATION=gz_act, FROM_OUTPUT=from_output, DOT_PRECISION=dot_precision,
        )
        if splits > 1:
            grad_weight.copy_(target.sum(0))  # fixed order: deterministic
    return grad_input, grad_weight, grad_bias, grad_residual


def tuned_tiles() -> dict[str, dict[str, str]]:
    """The tile the autotuner chose for each kernel and problem key so far, by name (for benchmark
    reports): {kernel: {key: name}}."""
    result = {}
    for kernel_name, kernel, tiles in (("forward", _conv_forward_kernel, _FORWARD_TILES),
                                       ("grad_input", _conv_grad_input_kernel, _GRAD_INPUT_TILES),
                                       ("grad_weight", _conv_grad_weight_kernel, _GRAD_WEIGHT_TILES)):
        names = {}
        for key, config in getattr(kernel, "cache", {}).items():
            k = config.kwargs
            found = (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], config.num_warps, config.num_stages)
            names[str(key)] = next((name for name, tile in tiles.items() if tile == found), str(found))
        result[kernel_name] = names
    return result
