"""Triton LSTM cell: the kernels behind bigkernels::lstm_cell_triton / lstm_cell_backward_triton.

Forward: ONE kernel per [BLOCK_B, BLOCK_H] tile of the new state. It accumulates the four gate tiles
(i, f, g, o) of input @ w_ih^T + hx @ w_hh^T in registers with tl.dot, then adds the biases, applies
the activations and updates c and h, so the [B, 4H] pre-activations never touch memory. For training
it also stores the activated gates (the workspace) that the backward needs.

Backward: one pointwise kernel turns (grad_hy, grad_cy) into the pre-activation gate gradients,
grad_cx and the bias gradient; the input/weight gradients are then plain torch.mm calls (three GEMMs
read the same gate gradients, so there is no epilogue worth fusing, and cuBLAS is hard to beat).

Semantics, shapes and empty-tensor conventions are those of csrc/cpu/lstm_cell.cpp. Non-contiguous
inputs are read through their strides, never copied: a copy of the weights would cost a full extra
read and write of them on every step. Outputs are allocated contiguous.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from bigkernels._backend import triton_interpreting
from bigkernels.triton._launch import launches_on

# Read once, like triton.jit: the kernels below were built for the interpreter or not at import time.
_INTERPRETED = triton_interpreting()

# Arithmetic type per storage type: half-precision inputs accumulate in float32.
_ACC_DTYPES = {
    torch.float16: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

# Forward tiles by batch size: (largest batch, BLOCK_B, BLOCK_H, num_warps). tl.dot needs every block
# dimension >= 16, so batch 1 still computes a 16-row tile; that costs nothing there, where the step
# is bound by reading the weights. Small batches use narrow BLOCK_H so that more programs stream the
# weights in parallel. The four gate accumulators and their operand tiles spilled at 4 warps for
# the 32 x 32 and 64 x 32 tiles (tools/triton_check.py, sm_80/sm_90): those take 8 warps. Not yet
# timed on a GPU: tune them there.
_FORWARD_TILES = ((16, 16, 16, 4), (32, 32, 32, 8), (1 << 62, 64, 32, 8))
# K extent of one pipeline stage: 32 elements (16 for float64), at most 128 bytes. 64 bf16 elements
# spilled the gate tiles; 3 stages of the largest fp32 tile take 36 KiB.
_FORWARD_BLOCK_K = 32
_FORWARD_BLOCK_K_BYTES = 128
_FORWARD_STAGES = 3
# The interpreter accepts any dot shape, so CI would not catch a tile a GPU refuses: check here.
assert all(min(b, h) >= 16 for _, b, h, _ in _FORWARD_TILES) and _FORWARD_BLOCK_K_BYTES // 8 >= 16

# Backward pointwise tiles: no tl.dot, so only enough columns for wide loads and rows for a few
# loads in flight. The batch is split so that about _BACKWARD_TARGET_PROGRAMS programs run (a few
# per SM); each split writes its own partial bias sums, added afterwards in a fixed order. Splits
# keep at least _BACKWARD_MIN_ROWS rows: small batches skip that extra reduction launch.
_BACKWARD_BLOCK_B = 16
_BACKWARD_MIN_ROWS = 32
_BACKWARD_MAX_BLOCK_H = 64
_BACKWARD_TARGET_PROGRAMS = 512
_BACKWARD_WARPS = 4


# ------------------------------------------------------------------------------------------ kernels
# Activations from exp(-|x|), which lies in (0, 1]: no overflow to inf for large |x| (harmless on a
# GPU, but numpy warns about it under the interpreter). tl has no tanh in its stable API, and
# libdevice's is missing under the interpreter. Both are within a few ulp of 1 in absolute error,
# far below the gate GEMMs' rounding.
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
def _accumulate_gate_products(acc_i, acc_f, acc_g, acc_o, a_ptr, stride_a_row, stride_a_k, w_ptr,
                              stride_w_row, stride_w_k, K, H, rows, row_mask, cols, col_mask,
                              BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc_q += a[rows, :] @ w[q*H + cols, :]^T for the gates q = i, f, g, o (one a tile, four w tiles)."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_a_row + ks[None, :] * stride_a_k
    # The transposed [BLOCK_K, BLOCK_H] tile of gate i; gate q starts q*H rows further down w.
    w_ptrs = w_ptr + cols[None, :] * stride_w_row + ks[:, None] * stride_w_k
    gate_step = H * stride_w_row
    for k0 in range(0, K, BLOCK_K):
        k_mask = ks < K - k0
        # Masked elements load as 0 and so add nothing to the products.
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w_i = tl.load(w_ptrs, mask=w_mask, other=0.0)
        w_f = tl.load(w_ptrs + gate_step, mask=w_mask, other=0.0)
        w_g = tl.load(w_ptrs + 2 * gate_step, mask=w_mask, other=0.0)
        w_o = tl.load(w_ptrs + 3 * gate_step, mask=w_mask, other=0.0)
        # `acc += dot` rather than dot(..., acc): the accumulator keyword's dtype rules differ between
        # Triton versions (float64); Triton's combine pass folds the add into the dot.
        acc_i += tl.dot(a, w_i, input_precision=DOT_PRECISION)
        acc_f += tl.dot(a, w_f, input_precision=DOT_PRECISION)
        acc_g += tl.dot(a, w_g, input_precision=DOT_PRECISION)
        acc_o += tl.dot(a, w_o, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_a_k
        w_ptrs += BLOCK_K * stride_w_k
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _bias_sum(b_ih_ptr, b_hh_ptr, stride_b_ih, stride_b_hh, index, mask, ACC_DTYPE: tl.constexpr):
    """b_ih[index] + b_hh[index] in the arithmetic type, as a [1, BLOCK_H] row to add to a gate tile."""
    b_ih = tl.load(b_ih_ptr + index * stride_b_ih, mask=mask, other=0.0).to(ACC_DTYPE)
    b_hh = tl.load(b_hh_ptr + index * stride_b_hh, mask=mask, other=0.0).to(ACC_DTYPE)
    return (b_ih + b_hh)[None, :]


@triton.jit
def _lstm_cell_forward_kernel(
    x_ptr, hx_ptr, cx_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr,  # inputs, any strides
    hy_ptr, cy_ptr, gates_ptr,  # outputs, contiguous: [B, H], [B, H], [B, 4H]
    B, I, H,
    stride_x_b, stride_x_i, stride_hx_b, stride_hx_h, stride_cx_b, stride_cx_h,
    stride_w_ih_row, stride_w_ih_col, stride_w_hh_row, stride_w_hh_col, stride_b_ih, stride_b_hh,
    HAS_BIAS: tl.constexpr, STORE_GATES: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Batch tiles vary fastest: the programs that share a weight tile run together, and all but the
    # first find it in L2.
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < B
    col_mask = cols < H
    # Row offsets in int64: B * 4H can pass 2**31. Weight offsets stay int32 (< 2**31 weight elements).
    rows = rows.to(tl.int64)

    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DTYPE)
    acc_i, acc_f, acc_g, acc_o = _accumulate_gate_products(
        acc, acc, acc, acc, x_ptr, stride_x_b, stride_x_i, w_ih_ptr, stride_w_ih_row, stride_w_ih_col,
        I, H, rows, row_mask, cols, col_mask, BLOCK_K, DOT_PRECISION)
    acc_i, acc_f, acc_g, acc_o = _accumulate_gate_products(
        acc_i, acc_f, acc_g, acc_o, hx_ptr, stride_hx_b, stride_hx_h, w_hh_ptr, stride_w_hh_row,
        stride_w_hh_col, H, H, rows, row_mask, cols, col_mask, BLOCK_K, DOT_PRECISION)
    if HAS_BIAS:
        acc_i += _bias_sum(b_ih_ptr, b_hh_ptr, stride_b_ih, stride_b_hh, cols, col_mask, ACC_DTYPE)
        acc_f += _bias_sum(b_ih_ptr, b_hh_ptr, stride_b_ih, stride_b_hh, H + cols, col_mask, ACC_DTYPE)
        acc_g += _bias_sum(b_ih_ptr, b_hh_ptr, stride_b_ih, stride_b_hh, 2 * H + cols, col_mask, ACC_DTYPE)
        acc_o += _bias_sum(b_ih_ptr, b_hh_ptr, stride_b_ih, stride_b_hh, 3 * H + cols, col_mask, ACC_DTYPE)

    i = _sigmoid(acc_i)
    f = _sigmoid(acc_f)
    g = _tanh(acc_g)
    o = _sigmoid(acc_o)
    mask = row_mask[:, None] & col_mask[None, :]
    c_prev = tl.load(cx_ptr + rows[:, None] * stride_cx_b + cols[None, :] * stride_cx_h, mask=mask, other=0.0)
    c = f * c_prev.to(ACC_DTYPE) + i * g
    h = o * _tanh(c)
    state = rows[:, None] * H + cols[None, :]
    tl.store(cy_ptr + state, c.to(cy_ptr.dtype.element_ty), mask=mask)
    tl.store(hy_ptr + state, h.to(hy_ptr.dtype.element_ty), mask=mask)
    if STORE_GATES:
        out_ty = gates_ptr.dtype.element_ty
        gates = gates_ptr + rows[:, None] * (4 * H) + cols[None, :]
        tl.store(gates, i.to(out_ty), mask=mask)
        tl.store(gates + H, f.to(out_ty), mask=mask)
        tl.store(gates + 2 * H, g.to(out_ty), mask=mask)
        tl.store(gates + 3 * H, o.to(out_ty), mask=mask)


@triton.jit
def _lstm_cell_backward_kernel(
    grad_hy_ptr, grad_cy_ptr, cx_ptr,  # [B, H], any strides
    cy_ptr, gates_ptr,  # contiguous [B, H] and [B, 4H] (activated i, f, g, o from the forward)
    grad_gates_ptr, grad_cx_ptr,  # outputs, contiguous [B, 4H] and [B, H]
    grad_bias_ptr,  # [splits, 4H]: one row of partial bias sums per batch split
    B, H, rows_per_program,
    stride_dh_b, stride_dh_h, stride_dc_b, stride_dc_h, stride_cx_b, stride_cx_h,
    STORE_GRAD_GATES: tl.constexpr, BIAS_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Each program owns BLOCK_H columns of rows_per_program rows and walks them BLOCK_B at a time, so
    # its share of the bias gradient is summed in registers: no atomics, a deterministic result.
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    sum_i = tl.zeros((BLOCK_H,), dtype=ACC_DTYPE)
    sum_f = tl.zeros((BLOCK_H,), dtype=ACC_DTYPE)
    sum_g = tl.zeros((BLOCK_H,), dtype=ACC_DTYPE)
    sum_o = tl.zeros((BLOCK_H,), dtype=ACC_DTYPE)
    first_row = pid_b * rows_per_program
    for r0 in range(0, rows_per_program, BLOCK_B):
        rows = first_row + r0 + tl.arange(0, BLOCK_B)
        mask = (rows < B)[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)[:, None]  # B * 4H can pass 2**31
        # Masked elements load as 0, which makes every gradient below 0: the sums need no select.
        gates = gates_ptr + rows * (4 * H) + cols[None, :]
        i = tl.load(gates, mask=mask, other=0.0).to(ACC_DTYPE)
        f = tl.load(gates + H, mask=mask, other=0.0).to(ACC_DTYPE)
        g = tl.load(gates + 2 * H, mask=mask, other=0.0).to(ACC_DTYPE)
        o = tl.load(gates + 3 * H, mask=mask, other=0.0).to(ACC_DTYPE)
        state = rows * H + cols[None, :]
        tc = _tanh(tl.load(cy_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE))
        dh = tl.load(grad_hy_ptr + rows * stride_dh_b + cols[None, :] * stride_dh_h, mask=mask, other=0.0)
        dh = dh.to(ACC_DTYPE)
        dc = tl.load(grad_cy_ptr + rows * stride_dc_b + cols[None, :] * stride_dc_h, mask=mask, other=0.0)
        c_prev = tl.load(cx_ptr + rows * stride_cx_b + cols[None, :] * stride_cx_h, mask=mask, other=0.0)

        dc = dc.to(ACC_DTYPE) + dh * o * (1 - tc * tc)
        di = dc * g * i * (1 - i)
        df = dc * c_prev.to(ACC_DTYPE) * f * (1 - f)
        dg = dc * i * (1 - g * g)
        do = dh * tc * o * (1 - o)
        tl.store(grad_cx_ptr + state, (dc * f).to(grad_cx_ptr.dtype.element_ty), mask=mask)
        if STORE_GRAD_GATES:
            out_ty = grad_gates_ptr.dtype.element_ty
            grad_gates = grad_gates_ptr + rows * (4 * H) + cols[None, :]
            tl.store(grad_gates, di.to(out_ty), mask=mask)
            tl.store(grad_gates + H, df.to(out_ty), mask=mask)
            tl.store(grad_gates + 2 * H, dg.to(out_ty), mask=mask)
            tl.store(grad_gates + 3 * H, do.to(out_ty), mask=mask)
        if BIAS_GRAD:
            sum_i += tl.sum(di, axis=0)
            sum_f += tl.sum(df, axis=0)
            sum_g += tl.sum(dg, axis=0)
            sum_o += tl.sum(do, axis=0)
    if BIAS_GRAD:
        out_ty = grad_bias_ptr.dtype.element_ty
        bias = grad_bias_ptr + pid_b * (4 * H) + cols
        tl.store(bias, sum_i.to(out_ty), mask=col_mask)
        tl.store(bias + H, sum_f.to(out_ty), mask=col_mask)
        tl.store(bias + 2 * H, sum_g.to(out_ty), mask=col_mask)
        tl.store(bias + 3 * H, sum_o.to(out_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------- launchers
def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    try:
        return _ACC_DTYPES[dtype]
    except KeyError:
        raise RuntimeError(
            f"bigkernels::lstm_cell_triton supports float16, bfloat16, float32 and float64, got {dtype}"
        ) from None


def _dot_precision(t: Tensor) -> str:
    """Float32 gate GEMMs use TF32 exactly when torch's own CUDA matmuls would."""
    if t.dtype != torch.float32 or not t.is_cuda:
        return "ieee"  # other dtypes ignore it; the interpreter's dots are numpy's
    matmul = torch.backends.cuda.matmul
    try:
        allow_tf32 = matmul.allow_tf32
    except RuntimeError:  # torch >= 2.9 refuses the legacy flag once the fp32_precision API was used
        allow_tf32 = matmul.fp32_precision == "tf32"
    return "tf32" if allow_tf32 else "ieee"


def _check_args(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor,
                b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> tuple[int, int, int]:
    """(B, I, H). A direct torch.ops call skips bigkernels/ops/lstm_cell.py's friendlier checks; these
    keep a bad call from reading out of bounds and raise RuntimeError like the C++ ops' TORCH_CHECKs.
    They run on every step (~3 us at batch 1): messages are built only on failure."""
    if input.dim() != 2 or w_hh.dim() != 2:
        raise RuntimeError(
            f"bigkernels::lstm_cell_triton: input must be [batch, input_size] and w_hh "
            f"[4*hidden_size, hidden_size], got {list(input.shape)} and {list(w_hh.shape)}"
        )
    batch, input_size = input.shape
    hidden = w_hh.shape[1]
    named = [("w_hh", w_hh, (4 * hidden, hidden), "[4*hidden_size, hidden_size]"),
             ("w_ih", w_ih, (4 * hidden, input_size), "[4*hidden_size, input_size]"),
             ("hx", hx, (batch, hidden), "[batch, hidden_size]"),
             ("cx", cx, (batch, hidden), "[batch, hidden_size]")]
    if (b_ih is None) != (b_hh is None):
        raise RuntimeError("bigkernels::lstm_cell_triton: b_ih and b_hh must both be given or both be None")
    if b_ih is not None:
        named += [("b_ih", b_ih, (4 * hidden,), "[4*hidden_size]"), ("b_hh", b_hh, (4 * hidden,), "[4*hidden_size]")]
    _check_like(named, input, "lstm_cell_triton")
    if not input.is_cuda and not _INTERPRETED:
        raise RuntimeError(
            f"bigkernels::lstm_cell_triton takes CUDA tensors, got tensors on {input.device} (CPU tensors "
            "run under the Triton interpreter: set TRITON_INTERPRET=1 before importing bigkernels)"
        )
    return batch, input_size, hidden


def _check_like(named: list, input: Tensor, op: str) -> None:
    """Each (name, tensor, shape, meaning) has its shape, and the dtype and device of input."""
    dtype, device = input.dtype, input.device
    if all(t.shape == shape and t.dtype == dtype and t.device == device for _, t, shape, _ in named):
        return
    for name, t, shape, meaning in named:
        if t.shape != shape:
            raise RuntimeError(f"bigkernels::{op}: {name} must be {meaning} = {list(shape)}, got {list(t.shape)}")
        if t.dtype != dtype or t.device != device:
            raise RuntimeError(
                f"bigkernels::{op}: {name} must have the dtype and device of input "
                f"({dtype}, {device}), got ({t.dtype}, {t.device})"
            )


def _forward_tiles(batch: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps) for this batch size and dtype width."""
    for max_batch, block_b, block_h, warps in _FORWARD_TILES:
        if batch <= max_batch:
            return block_b, block_h, min(_FORWARD_BLOCK_K, _FORWARD_BLOCK_K_BYTES // element_size), warps
    raise AssertionError("unreachable: the last tile row takes any batch")


@launches_on("lstm_cell_triton", "input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh")
def lstm_cell_forward(
    input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor], need_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One fused LSTM step. input [B, I], hx/cx [B, H], w_ih [4H, I], w_hh [4H, H], b_ih/b_hh [4H] or
    both None; float16/bfloat16/float32/float64, CUDA (or CPU under TRITON_INTERPRET=1).

    Returns (hy [B, H], cy [B, H], workspace): the activated gates [B, 4H] (i, f, g, o) when
    need_workspace, else an empty (0,) tensor. All contiguous, in the input dtype.
    """
    batch, input_size, hidden = _check_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    acc_dtype = _acc_dtype(input.dtype)
    hy = input.new_empty((batch, hidden))
    cy = input.new_empty((batch, hidden))
    workspace = input.new_empty((batch, 4 * hidden) if need_workspace else (0,))
    if batch == 0 or hidden == 0:
        return hy, cy, workspace

    block_b, block_h, block_k, warps = _forward_tiles(batch, input.element_size())
    has_bias = b_ih is not None
    if not has_bias:  # any valid pointer will do: HAS_BIAS=False never reads it
        b_ih = b_hh = hy
    grid = (triton.cdiv(batch, block_b), triton.cdiv(hidden, block_h))
    _lstm_cell_forward_kernel[grid](
        input, hx, cx, w_ih, w_hh, b_ih, b_hh,
        hy, cy, workspace,
        batch, input_size, hidden,
        input.stride(0), input.stride(1), hx.stride(0), hx.stride(1), cx.stride(0), cx.stride(1),
        w_ih.stride(0), w_ih.stride(1), w_hh.stride(0), w_hh.stride(1),
        b_ih.stride(0) if has_bias else 0, b_hh.stride(0) if has_bias else 0,
        HAS_BIAS=has_bias, STORE_GATES=need_workspace, ACC_DTYPE=acc_dtype,
        DOT_PRECISION=_dot_precision(input), BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
        num_warps=warps, num_stages=_FORWARD_STAGES,
    )
    return hy, cy, workspace


@launches_on("lstm_cell_backward_triton", "grad_hy", "grad_cy", "input", "hx", "cx", "w_ih", "w_hh", "cy",
             "workspace")
def lstm_cell_backward(
    grad_hy: Tensor, grad_cy: Tensor, input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor,
    w_hh: Tensor, cy: Tensor, workspace: Tensor, output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of one LSTM step from the forward's cy and workspace (activated gates [B, 4H]).

    output_mask = (input, hx, weights, bias) says which gradients to compute. Returns (grad_input [B, I],
    grad_hx [B, H], grad_cx [B, H], grad_w_ih [4H, I], grad_w_hh [4H, H], grad_bias [4H]), each one not
    asked for an empty (0,) tensor (grad_cx is always computed). All contiguous, in the input dtype.
    """
    batch, _, hidden = _check_args(input, hx, cx, w_ih, w_hh, None, None)
    state = "[batch, hidden_size]"
    _check_like([("grad_hy", grad_hy, (batch, hidden), state), ("grad_cy", grad_cy, (batch, hidden), state),
                 ("cy", cy, (batch, hidden), state),
                 ("workspace", workspace, (batch, 4 * hidden),
                  "the [batch, 4*hidden_size] gates saved by lstm_cell_triton(need_workspace=True)")],
                input, "lstm_cell_backward_triton")
    need_input, need_hx, need_weights, need_bias = (bool(m) for m in output_mask)
    acc_dtype = _acc_dtype(input.dtype)
    need_gates = need_input or need_hx or need_weights
    grad_gates = input.new_empty((batch, 4 * hidden) if need_gates else (0,))
    grad_cx = input.new_empty((batch, hidden))
    grad_bias = input.new_empty((4 * hidden,) if need_bias else (0,))

    if batch > 0 and hidden > 0:
        block_h = min(_BACKWARD_MAX_BLOCK_H, max(16, triton.next_power_of_2(hidden)))
        column_tiles = triton.cdiv(hidden, block_h)
        wanted_splits = max(1, _BACKWARD_TARGET_PROGRAMS // column_tiles)
        rows_per_program = triton.cdiv(triton.cdiv(batch, wanted_splits), _BACKWARD_BLOCK_B) * _BACKWARD_BLOCK_B
        rows_per_program = max(_BACKWARD_MIN_ROWS, rows_per_program)
        splits = triton.cdiv(batch, rows_per_program)
        # One split writes grad_bias itself; several write partial sums in the arithmetic type.
        partial_bias = grad_bias
        if need_bias and splits > 1:
            partial_bias = torch.empty((splits, 4 * hidden), dtype=torch.float64 if acc_dtype == tl.float64
                                       else torch.float32, device=input.device)
        # cy and the workspace come from the forward, already contiguous: .contiguous() is free there
        # and saves four stride arguments.
        _lstm_cell_backward_kernel[(splits, column_tiles)](
            grad_hy, grad_cy, cx, cy.contiguous(), workspace.contiguous(),
            grad_gates, grad_cx, partial_bias,
            batch, hidden, rows_per_program,
            grad_hy.stride(0), grad_hy.stride(1), grad_cy.stride(0), grad_cy.stride(1),
            cx.stride(0), cx.stride(1),
            STORE_GRAD_GATES=need_gates, BIAS_GRAD=need_bias, ACC_DTYPE=acc_dtype,
            BLOCK_B=_BACKWARD_BLOCK_B, BLOCK_H=block_h, num_warps=_BACKWARD_WARPS,
        )
        if partial_bias is not grad_bias:
            grad_bias = partial_bias.sum(0).to(input.dtype)  # torch's reduction order is fixed
    elif need_bias:
        grad_bias.zero_()  # an empty batch contributes nothing

    # The op's precision is decided by its caller (bigkernels/ops/lstm_cell.py casts under autocast);
    # the GEMMs inside must not be autocast a second time.
    device_type = input.device.type
    no_autocast = (torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type)
                   else contextlib.nullcontext())
    with no_autocast:
        # Distinct empties: a custom op's outputs must not alias each other.
        grad_input = torch.mm(grad_gates, w_ih) if need_input else input.new_empty((0,))
        grad_hx = torch.mm(grad_gates, w_hh) if need_hx else input.new_empty((0,))
        grad_w_ih = torch.mm(grad_gates.t(), input) if need_weights else input.new_empty((0,))
        grad_w_hh = torch.mm(grad_gates.t(), hx) if need_weights else input.new_empty((0,))
    return grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias
