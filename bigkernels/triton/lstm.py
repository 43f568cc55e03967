"""Triton LSTM layer: the kernels behind bigkernels::lstm_triton / lstm_backward_triton.

One layer, one direction, a whole (padded or packed) sequence; the contract (shapes, workspace,
empty-tensor conventions) is the schema comment of `lstm` / `lstm_backward` in csrc/ops.cpp, the
maths is bigkernels.reference.lstm_layer. This is the portable GPU path: a Python loop over the
time steps that launches one fused kernel per step, so its per-step work is kept to that launch
(no per-step allocations, no host synchronisation; batch_sizes lives on the CPU).

Forward: the input projection of ALL steps is one GEMM with both biases folded in (`pre`,
[rows, 4H]). Each step then runs ONE kernel, _lstm_step_forward_kernel: it starts the four gate
tiles from that step's slice of `pre`, accumulates h_{t-1} @ w_hh^T into them with tl.dot, applies
the activations, updates c in a running [B, H] state (in place) and writes h (or, with a
projection, r = o * tanh(c), which one torch.mm then projects into the output). For training it
writes c into `cells` and the activated gates over the step's own slice of `pre`, which thereby
becomes the `gates` workspace without a second [rows, 4H] buffer.

Backward (BPTT): per step the LSTM cell's pointwise backward kernel (lstm_cell.py) and one
torch.mm for dh_{t-1} = dG_t @ w_hh (plus dr = dh_t @ w_hr with a projection). Everything that
does not depend on time is done once after the loop over the whole sequence: grad_input = dG @ w_ih,
dW_ih = dG^T @ X, dW_hh = dG^T @ H_prev, grad_bias = sum(dG), dW_hr = dH^T @ R.

Packed sequences shrink (forward direction) or grow (reverse) the active batch; step t touches only
its first batch_sizes[t] rows. A step whose batch grew starts its new rows from h0/c0.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from bigkernels.triton._launch import launches_on
from bigkernels.triton.lstm_cell import (
    _BACKWARD_BLOCK_B,
    _BACKWARD_MAX_BLOCK_H,
    _BACKWARD_MIN_ROWS,
    _BACKWARD_TARGET_PROGRAMS,
    _BACKWARD_WARPS,
    _FORWARD_STAGES,
    _INTERPRETED,
    _ACC_DTYPES,
    _accumulate_gate_products,
    _check_like,
    _dot_precision,
    _forward_tiles,
    _lstm_cell_backward_kernel,
    _sigmoid,
    _tanh,
)

# Tiles, warps and stages of the step kernel are the cell's (lstm_cell._forward_tiles): the step is
# the cell's forward with the input GEMM moved out, so the same shapes apply to its recurrent GEMM.
# The backward reuses the cell's pointwise kernel and its launch constants unchanged.


# ------------------------------------------------------------------------------------------ kernel
# The row offsets and the active batch change from step to step: not specialising on them (value 1,
# divisibility by 16) keeps one compiled kernel for the whole sequence instead of a few variants.
@triton.jit(do_not_specialize=["n", "row0", "h_prev_row0", "h_out_row0"])
def _lstm_step_forward_kernel(
    pre_ptr,  # [rows, 4H] contiguous: x @ w_ih^T + b_ih + b_hh; gates written over it (STORE_WORKSPACE)
    h_prev_ptr,  # previous h, any strides; this step's row r is its row h_prev_row0 + r
    w_hh_ptr,  # [4H, P], any strides
    c_ptr,  # [B, H] contiguous running cell state: row r read and overwritten (only by its own tile)
    h_out_ptr,  # h (no projection) or r = o * tanh(c) (projection): row stride H, row h_out_row0 + r
    cells_ptr,  # [rows, H] contiguous: c after this step (STORE_WORKSPACE)
    n, P, H, row0, h_prev_row0, h_out_row0,
    stride_hp_b, stride_hp_p, stride_w_row, stride_w_col,
    STORE_WORKSPACE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Batch tiles vary fastest, as in the cell: programs sharing a w_hh tile run together (L2 reuse).
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    local = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # row within this step's active batch
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = local < n
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    # Offsets in int64: rows * 4H can pass 2**31 over a long sequence.
    step_rows = (row0 + local).to(tl.int64)
    local = local.to(tl.int64)

    # The gate tiles start from this step's input projection (biases included).
    pre = pre_ptr + step_rows[:, None] * (4 * H) + cols[None, :]
    acc_i = tl.load(pre, mask=mask, other=0.0).to(ACC_DTYPE)
    acc_f = tl.load(pre + H, mask=mask, other=0.0).to(ACC_DTYPE)
    acc_g = tl.load(pre + 2 * H, mask=mask, other=0.0).to(ACC_DTYPE)
    acc_o = tl.load(pre + 3 * H, mask=mask, other=0.0).to(ACC_DTYPE)
    prev_rows = (h_prev_row0 + local).to(tl.int64)
    acc_i, acc_f, acc_g, acc_o = _accumulate_gate_products(
        acc_i, acc_f, acc_g, acc_o, h_prev_ptr, stride_hp_b, stride_hp_p, w_hh_ptr, stride_w_row,
        stride_w_col, P, H, prev_rows, row_mask, cols, col_mask, BLOCK_K, DOT_PRECISION)

    i = _sigmoid(acc_i)
    f = _sigmoid(acc_f)
    g = _tanh(acc_g)
    o = _sigmoid(acc_o)
    state = c_ptr + local[:, None] * H + cols[None, :]
    c = f * tl.load(state, mask=mask, other=0.0).to(ACC_DTYPE) + i * g
    h = o * _tanh(c)
    tl.store(state, c.to(c_ptr.dtype.element_ty), mask=mask)
    out_rows = (h_out_row0 + local).to(tl.int64)
    tl.store(h_out_ptr + out_rows[:, None] * H + cols[None, :], h.to(h_out_ptr.dtype.element_ty), mask=mask)
    if STORE_WORKSPACE:
        tl.store(cells_ptr + step_rows[:, None] * H + cols[None, :], c.to(cells_ptr.dtype.element_ty), mask=mask)
        out_ty = pre_ptr.dtype.element_ty
        tl.store(pre, i.to(out_ty), mask=mask)
        tl.store(pre + H, f.to(out_ty), mask=mask)
        tl.store(pre + 2 * H, g.to(out_ty), mask=mask)
        tl.store(pre + 3 * H, o.to(out_ty), mask=mask)


# ------------------------------------------------------------------------------------- the schedule
@dataclass
class _Layer:
    """Sizes of one call and its time schedule, all on the host."""
    batch: int
    input_size: int
    hidden: int
    proj: int  # P: proj_size with a projection, else hidden
    rows: int  # T*B (padded, time-major) or N (packed)
    packed: bool
    reverse: bool
    sizes: list  # active rows of step t
    offsets: list  # first row of step t in the [rows, *] buffers
    order: list  # steps in processing order (last to first when reverse)

    def previous(self, k: int, n: int) -> tuple[int, int]:
        """(row offset, m) of the state the k-th processed step starts from: its rows below m are the
        rows of the previous processed step at that offset, the rest (a reversed packed sequence
        whose shorter sequences start later) come from the initial state."""
        if k == 0:
            return 0, 0
        t_prev = self.order[k - 1]
        return self.offsets[t_prev], min(n, self.sizes[t_prev])


def _layer(input: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Tensor, w_ih: Tensor,
           w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor],
           reverse: bool, op: str) -> _Layer:
    """Check the arguments (RuntimeError naming the first bad one, like the C++ op's TORCH_CHECKs: a
    direct torch.ops call skips bigkernels/ops/lstm.py's checks) and plan the steps."""
    packed = batch_sizes is not None
    if input.dtype not in _ACC_DTYPES:
        raise RuntimeError(f"bigkernels::{op} supports float16, bfloat16, float32 and float64, got {input.dtype}")
    if input.dim() != (2 if packed else 3):
        shape = "2-D [total_steps, input_size] (packed)" if packed else "3-D [seq_len, batch, input_size]"
        raise RuntimeError(f"bigkernels::{op}: input must be {shape}, got {list(input.shape)}")
    if c0.dim() != 2:
        raise RuntimeError(f"bigkernels::{op}: c0 must be [batch, hidden_size], got {list(c0.shape)}")
    batch, hidden = c0.shape
    input_size = input.shape[-1]
    proj = hidden
    named = []
    if w_hr is not None:
        if w_hr.dim() != 2 or not 0 < w_hr.shape[0] < hidden:
            raise RuntimeError(f"bigkernels::{op}: w_hr must be [proj_size, hidden_size] with "
                               f"0 < proj_size < {hidden}, got {list(w_hr.shape)}")
        proj = w_hr.shape[0]
        named.append(("w_hr", w_hr, (proj, hidden), "[proj_size, hidden_size]"))
    named += [("c0", c0, (batch, hidden), "[batch, hidden_size]"),
              ("h0", h0, (batch, proj), "[batch, proj_size or hidden_size]"),
              ("w_ih", w_ih, (4 * hidden, input_size), "[4*hidden_size, input_size]"),
              ("w_hh", w_hh, (4 * hidden, proj), "[4*hidden_size, proj_size or hidden_size]")]
    if (b_ih is None) != (b_hh is None):
        raise RuntimeError(f"bigkernels::{op}: b_ih and b_hh must both be given or both be None")
    if b_ih is not None:
        named += [("b_ih", b_ih, (4 * hidden,), "[4*hidden_size]"), ("b_hh", b_hh, (4 * hidden,), "[4*hidden_size]")]
    _check_like(named, input, op)
    if not input.is_cuda and not _INTERPRETED:
        raise RuntimeError(
            f"bigkernels::{op} takes CUDA tensors, got tensors on {input.device} (CPU tensors run under "
            "the Triton interpreter: set TRITON_INTERPRET=1 before importing bigkernels)"
        )
    if packed:
        if batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu":
            raise RuntimeError(f"bigkernels::{op}: batch_sizes must be a 1-D int64 CPU tensor, got "
                               f"{list(batch_sizes.shape)} {batch_sizes.dtype} on {batch_sizes.device}")
        sizes = batch_sizes.tolist()
        if any(not 0 <= n <= (sizes[t - 1] if t else batch) for t, n in enumerate(sizes)):
            raise RuntimeError(f"bigkernels::{op}: batch_sizes must be non-increasing and at most the batch "
                               f"({batch}), got {sizes}")
        if sizes and sizes[0] != batch:
            raise RuntimeError(f"bigkernels::{op}: h0/c0 must have batch_sizes[0] = {sizes[0]} rows, got {batch}")
        if sum(sizes) != input.shape[0]:
            raise RuntimeError(f"bigkernels::{op}: batch_sizes sum to {sum(sizes)} but the packed input has "
                               f"{input.shape[0]} rows")
    else:
        if input.shape[1] != batch:
            raise RuntimeError(f"bigkernels::{op}: h0/c0 must have the input's batch {input.shape[1]}, got {batch}")
        sizes = [batch] * input.shape[0]
    offsets, rows = [], 0
    for n in sizes:
        offsets.append(rows)
        rows += n
    order = list(range(len(sizes)))
    if reverse:
        order.reverse()
    return _Layer(batch, input_size, hidden, proj, rows, packed, reverse, sizes, offsets, order)


def _previous_rows(layer: _Layer, k: int, n: int, all_rows: Tensor, init: Tensor,
                   scratch: Optional[Tensor]) -> tuple[Tensor, int]:
    """(tensor, first row) holding the n-row state the k-th processed step starts from: the previous
    step's rows of `all_rows` ([rows, D]), `init` ([B, D]), or, where both contribute, `scratch`
    ([B, D]) filled with the two (only on steps where a reversed packed batch grows)."""
    offset, m = layer.previous(k, n)
    if m == n:
        return all_rows, offset
    if m == 0:
        return init, 0
    scratch[:m].copy_(all_rows[offset:offset + m])
    scratch[m:n].copy_(init[m:n])
    return scratch, 0


def _final_h(layer: _Layer, output: Tensor, h0: Tensor) -> Tensor:
    """Each sequence's h after its last step, [B, P], as a new tensor (op outputs never alias)."""
    if not layer.sizes:
        return h0.clone(memory_format=torch.contiguous_format)
    last = layer.order[-1]
    if layer.sizes[last] == layer.batch:  # padded, or reversed (the last step processed is t = 0)
        offset = layer.offsets[last]
        return output[offset:offset + layer.batch].clone()
    # Forward-direction packed: sequence b ends at step length(b) - 1, in row offsets[that] + b.
    sizes = torch.tensor(layer.sizes, dtype=torch.int64)
    sequence = torch.arange(layer.batch)
    lengths = (sizes[None, :] > sequence[:, None]).sum(1)
    rows = torch.tensor(layer.offsets, dtype=torch.int64)[lengths - 1] + sequence
    return output.index_select(0, _to_device(rows, output.device))


def _to_device(index: Tensor, device: torch.device) -> Tensor:
    """A host-built index on the device without a host sync: a blocking host-to-device copy would
    wait for every kernel queued so far; an asynchronous one from pageable memory returns as soon
    as the (small) index is staged."""
    return index.to(device, non_blocking=True)


def _no_autocast(device_type: str):
    """The op's precision is decided by its caller (bigkernels/ops/lstm.py casts under autocast): the
    GEMMs inside must not be autocast a second time."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------- forward
@launches_on("lstm_triton", "input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")  # batch_sizes: CPU
def lstm_forward(
    input: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], reverse: bool,
    need_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction: (output, h_n, c_n, gates, cells).

    input [T, B, I] (padded) or [N, I] with batch_sizes (1-D int64 CPU, non-increasing); h0 [B, P],
    c0 [B, H]; w_ih [4H, I], w_hh [4H, P], b_ih/b_hh [4H] or both None, w_hr [P, H] or None.
    float16/bfloat16/float32/float64 on CUDA (or CPU under TRITON_INTERPRET=1). output is [T, B, P]
    or [N, P]; gates [rows, 4H] (activated i, f, g, o) and cells [rows, H] (c after each step) when
    need_workspace, else empty (0,) tensors. All outputs contiguous, in the input dtype.
    """
    layer = _layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, "lstm_triton")
    with _no_autocast(input.device.type):
        return _forward(layer, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_workspace)


def _forward(layer: _Layer, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_workspace):
    B, H, P, rows = layer.batch, layer.hidden, layer.proj, layer.rows
    x = input.reshape(rows, layer.input_size)
    # The time-independent half of every gate, for all steps at once; the step kernel adds the rest.
    pre = torch.mm(x, w_ih.t()) if b_ih is None else torch.addmm(b_ih + b_hh, x, w_ih.t())
    pre = pre.contiguous()  # a no-op for a fresh GEMM result; the kernel indexes it densely
    output = input.new_empty((rows, P))
    cells = input.new_empty((rows, H) if need_workspace else (0,))
    c_state = c0.clone(memory_format=torch.contiguous_format)  # becomes c_n
    r = input.new_empty((B, H)) if w_hr is not None else None
    # Only a reversed packed sequence's batch grows, needing rows from two places.
    scratch = input.new_empty((B, P)) if layer.packed and layer.reverse else None

    if rows > 0 and H > 0:
        block_b, block_h, block_k, warps = _forward_tiles(B, input.element_size())
        acc_dtype = _ACC_DTYPES[input.dtype]
        precision = _dot_precision(input)
        column_tiles = triton.cdiv(H, block_h)
        cells_arg = cells if need_workspace else c_state  # any valid pointer: never written then
        for k, t in enumerate(layer.order):
            n, row0 = layer.sizes[t], layer.offsets[t]
            if n == 0:
                continue
            h_prev, h_prev_row0 = _previous_rows(layer, k, n, output, h0, scratch)
            h_out, h_out_row0 = (output, row0) if r is None else (r, 0)
            _lstm_step_forward_kernel[(triton.cdiv(n, block_b), column_tiles)](
                pre, h_prev, w_hh, c_state, h_out, cells_arg,
                n, P, H, row0, h_prev_row0, h_out_row0,
                h_prev.stride(0), h_prev.stride(1), w_hh.stride(0), w_hh.stride(1),
                STORE_WORKSPACE=need_workspace, ACC_DTYPE=acc_dtype, DOT_PRECISION=precision,
                BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
                num_warps=warps, num_stages=_FORWARD_STAGES,
            )
            if r is not None:
                torch.mm(r[:n], w_hr.t(), out=output[row0:row0 + n])

    h_n = _final_h(layer, output, h0)
    if not layer.packed:
        output = output.view(input.shape[0], B, P)
    gates = pre if need_workspace else input.new_empty((0,))
    return output, h_n, c_state, gates, cells


# --------------------------------------------------------------------------------------- backward
@launches_on("lstm_backward_triton", "grad_output", "grad_h_n", "grad_c_n", "input", "h0", "c0", "w_ih",
             "w_hh", "w_hr", "output", "gates", "cells")
def lstm_backward(
    grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, input: Tensor, batch_sizes: Optional[Tensor],
    h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], reverse: bool,
    output: Tensor, gates: Tensor, cells: Tensor, output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BPTT of lstm_forward from its output and workspace (gates, cells; need_workspace=True).

    output_mask = (input, weights, bias) says which gradients to compute. Returns (grad_input,
    grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias [4H] (that of b_ih, equal to that of b_hh),
    grad_w_hr): each one not asked for is an empty (0,) tensor, as is grad_w_hr without a projection;
    grad_h0 and grad_c0 are always computed. All contiguous, in the input dtype.
    """
    op = "lstm_backward_triton"
    layer = _layer(input, batch_sizes, h0, c0, w_ih, w_hh, None, None, w_hr, reverse, op)
    B, H, P, rows = layer.batch, layer.hidden, layer.proj, layer.rows
    out_shape = (rows, P) if layer.packed else (input.shape[0], B, P)
    workspace = "the workspace saved by lstm_triton(need_workspace=True)"
    _check_like([("output", output, out_shape, "the forward's output"),
                 ("grad_output", grad_output, out_shape, "the forward's output"),
                 ("grad_h_n", grad_h_n, (B, P), "[batch, proj_size or hidden_size]"),
                 ("grad_c_n", grad_c_n, (B, H), "[batch, hidden_size]"),
                 ("gates", gates, (rows, 4 * H), f"[rows, 4*hidden_size], {workspace}"),
                 ("cells", cells, (rows, H), f"[rows, hidden_size], {workspace}")], input, op)
    with _no_autocast(input.device.type):
        return _backward(layer, grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, output,
                         gates, cells, [bool(m) for m in output_mask])


def _backward(layer: _Layer, grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, output,
              gates, cells, output_mask):
    need_input, need_weights, need_bias = output_mask
    B, H, P, rows = layer.batch, layer.hidden, layer.proj, layer.rows
    grad_out = grad_output.reshape(rows, P)
    out2d = output.reshape(rows, P)
    gates, cells = gates.contiguous(), cells.contiguous()  # from the forward: already contiguous
    grad_gates = input.new_empty((rows, 4 * H))  # dG: pre-activation gate gradients of every step
    # Gradients of the running state, one row per sequence; rows a step does not run keep theirs
    # (they become grad_h0 / grad_c0).
    dh = grad_h_n.clone(memory_format=torch.contiguous_format)
    dc = grad_c_n.clone(memory_format=torch.contiguous_format)
    projected = w_hr is not None
    dh_all = input.new_empty((rows, P)) if projected and need_weights else None  # dH for dW_hr
    dr = input.new_empty((B, H)) if projected else None  # gradient of r = o * tanh(c)
    scratch = input.new_empty((B, H)) if layer.packed and layer.reverse else None  # see _forward

    if rows > 0 and H > 0:
        # The cell's pointwise backward, without its bias reduction (one sum over dG comes after the
        # loop), so a batch split only sets the parallelism: the cell's split rule for the full batch.
        block_h = min(_BACKWARD_MAX_BLOCK_H, max(16, triton.next_power_of_2(H)))
        column_tiles = triton.cdiv(H, block_h)
        wanted_splits = max(1, _BACKWARD_TARGET_PROGRAMS // column_tiles)
        rows_per_program = triton.cdiv(triton.cdiv(B, wanted_splits), _BACKWARD_BLOCK_B) * _BACKWARD_BLOCK_B
        rows_per_program = max(_BACKWARD_MIN_ROWS, rows_per_program)
        acc_dtype = _ACC_DTYPES[input.dtype]
        for k in range(len(layer.order) - 1, -1, -1):
            t = layer.order[k]
            n, row0 = layer.sizes[t], layer.offsets[t]
            if n == 0:
                continue
            step = slice(row0, row0 + n)
            # dh_t: the output's own gradient plus the recurrence's.
            if dh_all is not None:
                grad_h = torch.add(grad_out[step], dh[:n], out=dh_all[step])
            else:
                grad_h = dh[:n].add_(grad_out[step])
            if projected:
                grad_h = torch.mm(grad_h, w_hr, out=dr[:n])
            c_prev, c_prev_row0 = _previous_rows(layer, k, n, cells, c0, scratch)
            c_prev = c_prev[c_prev_row0:c_prev_row0 + n]
            grad_g = grad_gates[step]
            # grad_cx is written over grad_cy (dc): each element is read before its own tile stores it.
            _lstm_cell_backward_kernel[(triton.cdiv(n, rows_per_program), column_tiles)](
                grad_h, dc, c_prev, cells[step], gates[step],
                grad_g, dc, grad_g,  # the last: bias partials, never written (BIAS_GRAD=False)
                n, H, rows_per_program,
                grad_h.stride(0), grad_h.stride(1), dc.stride(0), dc.stride(1),
                c_prev.stride(0), c_prev.stride(1),
                STORE_GRAD_GATES=True, BIAS_GRAD=False, ACC_DTYPE=acc_dtype,
                BLOCK_B=_BACKWARD_BLOCK_B, BLOCK_H=block_h, num_warps=_BACKWARD_WARPS,
            )
            torch.mm(grad_g, w_hh, out=dh[:n])

    def empty() -> Tensor:  # distinct empties: a custom op's outputs must not alias each other
        return input.new_empty((0,))

    grad_input = torch.mm(grad_gates, w_ih).view(input.shape) if need_input else empty()
    grad_w_ih, grad_w_hh, grad_w_hr = empty(), empty(), empty()
    if need_weights:
        grad_w_ih = torch.mm(grad_gates.t(), input.reshape(rows, layer.input_size))
        grad_w_hh = _recurrent_weight_grad(layer, grad_gates, out2d, h0)
        if projected:
            # r_t = o_t * tanh(c_t), recomputed from the workspace rather than stored by the forward.
            r_all = gates[:, 3 * H:] * torch.tanh(cells)
            grad_w_hr = torch.mm(dh_all.t(), r_all)
    grad_bias = grad_gates.sum(0) if need_bias else empty()
    return grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr


def _recurrent_weight_grad(layer: _Layer, grad_gates: Tensor, out2d: Tensor, h0: Tensor) -> Tensor:
    """dW_hh = sum over steps of dG_t^T @ h_{t-1}, as whole-sequence GEMMs."""
    B, rows = layer.batch, layer.rows
    if rows == 0:  # no step ran: nothing reached w_hh
        return grad_gates.new_zeros((grad_gates.shape[1], out2d.shape[1]))
    if not layer.packed:
        # Padded: every step but the first processed one starts from the previous step's output
        # block, B rows away: two GEMMs over shifted views, no copy.
        if layer.reverse:  # the last step runs first, from h0
            first, rest, prev = slice(rows - B, rows), slice(0, rows - B), slice(B, rows)
        else:
            first, rest, prev = slice(0, B), slice(B, rows), slice(0, rows - B)
        grad = torch.mm(grad_gates[first].t(), h0)
        return grad.addmm_(grad_gates[rest].t(), out2d[prev])
    # Packed: step t's rows start from the first rows of the previous processed step, which do not
    # sit at a fixed distance; gather every row's previous state from [h0; output] once.
    sizes = torch.tensor(layer.sizes, dtype=torch.int64)
    offsets = torch.tensor(layer.offsets, dtype=torch.int64)
    step = torch.repeat_interleave(torch.arange(len(layer.sizes)), sizes)
    position = torch.arange(rows) - offsets[step]
    previous = step + (1 if layer.reverse else -1)
    valid = (previous >= 0) & (previous < len(layer.sizes))
    previous = previous.clamp(0, len(layer.sizes) - 1)
    carried = valid & (position < sizes[previous])
    index = torch.where(carried, B + offsets[previous] + position, position)
    h_prev = torch.cat([h0, out2d]).index_select(0, _to_device(index, out2d.device))
    return torch.mm(grad_gates.t(), h_prev)
