"""Triton kernels behind bigkernels::lstm_ext_triton / lstm_ext_backward_triton: the GPU path of
``bigkernels.nn.LSTM(layer_norm=True, zoneout=p)``.

Contract (shapes, workspace layout, keep masks vs constant keep weights): the lstm_ext schema comment
in csrc/ops.cpp; maths: bigkernels.reference.lstm_layer_ext. Same plan as the C++ CPU kernel
(csrc/cpu/lstm_ext.cpp), over the schedule of bigkernels/triton/lstm.py (padded, packed, reverse):

Forward: x @ w_ih^T for all steps is one GEMM, then LN_ih over all rows and every constant term
(b_ih + b_hh + the LN betas of ih and hh) once. Per step: one GEMM rec = h_{t-1} @ w_hh^T (torch.mm)
and ONE Triton kernel, _ext_step_forward_kernel, one program per row: LayerNorm needs the whole
4H-wide row, so a program holds it (BLOCK_H >= H columns of each gate). It computes LN_hh's
statistics, the gates, c~, LN_c's statistics, h~ and the zoneout blends, and writes c, h (or
r = o * tanh(.) for a projection, projected and blended with torch ops) and the workspace.
Backward: per step one kernel per row (zoneout split, LN_c, gates, LN_hh backward) and one torch.mm
for dh_{t-1}; the gradients that do not depend on time are whole-sequence torch ops after the loop.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from bigkernels.reference import LAYER_NORM_EPS
from bigkernels.triton._launch import launches_on
from bigkernels.triton.lstm import _final_h, _layer, _no_autocast, _previous_rows
from bigkernels.triton.lstm_cell import _ACC_DTYPES, _check_like, _sigmoid, _tanh

# The norms workspace (LayerNorm's normalised inputs and 1/std, or the candidate cell) is kept in the
# arithmetic type, as stock LayerNorm keeps its statistics in float32: rounding them to fp16/bf16
# between the passes would put that rounding into every gradient that flows through a LayerNorm.
_STAT_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
                torch.float64: torch.float64}


def norms_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the norms workspace for inputs of `dtype` (the op's fake kernel uses it too)."""
    return _STAT_DTYPES.get(dtype, dtype)


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    """The step kernels index their [rows, H] masks and [H] / [4H] LayerNorm parameters densely."""
    return t.contiguous() if t is not None else None


# One program per row holds a whole row: 4 gates x BLOCK_H columns, each live in several arrays.
# Warps grow with the row so that a thread keeps at most 4 columns of each gate (no spills: measured
# with tools/triton_check.py); rows above 2048 units hold more a thread, and may spill (still correct).
_MIN_ROW_WARPS, _MAX_ROW_WARPS = 4, 16


def row_warps(block_h: int) -> int:
    """num_warps of the step kernels for a row of BLOCK_H columns a gate."""
    return min(_MAX_ROW_WARPS, max(_MIN_ROW_WARPS, block_h // 128))


@triton.jit
def _row_norm(x, mask, count, eps):
    """(normalised x, 1/std) over the masked elements of x, for LayerNorm."""
    mean = tl.sum(tl.where(mask, x, 0.0), axis=0) / count
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1 / tl.sqrt(tl.sum(d * d, axis=0) / count + eps)
    return d * rstd, rstd


@triton.jit
def _ext_step_forward_kernel(
    pre_ptr, rec_ptr,  # [n, 4H] contiguous: constant part of the gates, h_{t-1} @ w_hh^T
    c_prev_ptr, h_prev_ptr,  # [n, H] contiguous (h_prev only with ZONE_H)
    mask_c_ptr, mask_h_ptr,  # [n, H] keep masks (MASK_C / MASK_H)
    g_hh_ptr, g_c_ptr, b_c_ptr,  # LayerNorm gains [4H], [H] and cell bias [H] (LAYER_NORM)
    c_out_ptr, h_out_ptr,  # [n, H]
    gates_ptr, norms_ptr,  # [n, 4H], [n, E] workspace (STORE_WORKSPACE)
    H, E, keep_c, keep_h, eps,
    LAYER_NORM: tl.constexpr, ZONE_C: tl.constexpr, MASK_C: tl.constexpr, ZONE_H: tl.constexpr,
    MASK_H: tl.constexpr, STORE_WORKSPACE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    m = cols < H
    g4 = row * 4 * H + cols
    h1 = row * H + cols
    r_i = tl.load(rec_ptr + g4, mask=m, other=0.0).to(ACC_DTYPE)
    r_f = tl.load(rec_ptr + g4 + H, mask=m, other=0.0).to(ACC_DTYPE)
    r_g = tl.load(rec_ptr + g4 + 2 * H, mask=m, other=0.0).to(ACC_DTYPE)
    r_o = tl.load(rec_ptr + g4 + 3 * H, mask=m, other=0.0).to(ACC_DTYPE)
    if LAYER_NORM:
        count = 4 * H
        mean = (tl.sum(r_i, 0) + tl.sum(r_f, 0) + tl.sum(r_g, 0) + tl.sum(r_o, 0)) / count
        d_i, d_f = tl.where(m, r_i - mean, 0.0), tl.where(m, r_f - mean, 0.0)
        d_g, d_o = tl.where(m, r_g - mean, 0.0), tl.where(m, r_o - mean, 0.0)
        var = (tl.sum(d_i * d_i, 0) + tl.sum(d_f * d_f, 0) + tl.sum(d_g * d_g, 0) + tl.sum(d_o * d_o, 0)) / count
        rstd_h = 1 / tl.sqrt(var + eps)
        r_i, r_f, r_g, r_o = d_i * rstd_h, d_f * rstd_h, d_g * rstd_h, d_o * rstd_h
        if STORE_WORKSPACE:
            e = row * E + cols
            ty = norms_ptr.dtype.element_ty
            tl.store(norms_ptr + e, r_i.to(ty), mask=m)
            tl.store(norms_ptr + e + H, r_f.to(ty), mask=m)
            tl.store(norms_ptr + e + 2 * H, r_g.to(ty), mask=m)
            tl.store(norms_ptr + e + 3 * H, r_o.to(ty), mask=m)
        r_i = r_i * tl.load(g_hh_ptr + cols, mask=m, other=0.0).to(ACC_DTYPE)
        r_f = r_f * tl.load(g_hh_ptr + H + cols, mask=m, other=0.0).to(ACC_DTYPE)
        r_g = r_g * tl.load(g_hh_ptr + 2 * H + cols, mask=m, other=0.0).to(ACC_DTYPE)
        r_o = r_o * tl.load(g_hh_ptr + 3 * H + cols, mask=m, other=0.0).to(ACC_DTYPE)
    i = _sigmoid(r_i + tl.load(pre_ptr + g4, mask=m, other=0.0).to(ACC_DTYPE))
    f = _sigmoid(r_f + tl.load(pre_ptr + g4 + H, mask=m, other=0.0).to(ACC_DTYPE))
    g = _tanh(r_g + tl.load(pre_ptr + g4 + 2 * H, mask=m, other=0.0).to(ACC_DTYPE))
    o = _sigmoid(r_o + tl.load(pre_ptr + g4 + 3 * H, mask=m, other=0.0).to(ACC_DTYPE))
    c_prev = tl.load(c_prev_ptr + h1, mask=m, other=0.0).to(ACC_DTYPE)
    c_cand = f * c_prev + i * g
    if LAYER_NORM:
        n_c, rstd_c = _row_norm(c_cand, m, H, eps)
        l = n_c * tl.load(g_c_ptr + cols, mask=m, other=0.0).to(ACC_DTYPE) + tl.load(
            b_c_ptr + cols, mask=m, other=0.0).to(ACC_DTYPE)
        stored = n_c
    else:
        l = c_cand
        stored = c_cand
    h = o * _tanh(l)
    c = c_cand
    if ZONE_C:
        if MASK_C:
            k_c = tl.load(mask_c_ptr + h1, mask=m, other=0.0).to(ACC_DTYPE)
        else:
            k_c = keep_c
        c = (1 - k_c) * c + k_c * c_prev  # exactly c_{t-1} where the mask keeps it
    if ZONE_H:
        if MASK_H:
            k_h = tl.load(mask_h_ptr + h1, mask=m, other=0.0).to(ACC_DTYPE)
        else:
            k_h = keep_h
        h = (1 - k_h) * h + k_h * tl.load(h_prev_ptr + h1, mask=m, other=0.0).to(ACC_DTYPE)
    tl.store(c_out_ptr + h1, c.to(c_out_ptr.dtype.element_ty), mask=m)
    tl.store(h_out_ptr + h1, h.to(h_out_ptr.dtype.element_ty), mask=m)
    if STORE_WORKSPACE:
        ty = gates_ptr.dtype.element_ty
        tl.store(gates_ptr + g4, i.to(ty), mask=m)
        tl.store(gates_ptr + g4 + H, f.to(ty), mask=m)
        tl.store(gates_ptr + g4 + 2 * H, g.to(ty), mask=m)
        tl.store(gates_ptr + g4 + 3 * H, o.to(ty), mask=m)
        e = row * E + cols
        n_ty = norms_ptr.dtype.element_ty
        if LAYER_NORM:
            tl.store(norms_ptr + e + 4 * H, stored.to(n_ty), mask=m)
            tl.store(norms_ptr + row * E + 5 * H, rstd_h.to(n_ty))
            tl.store(norms_ptr + row * E + 5 * H + 1, rstd_c.to(n_ty))
        else:
            tl.store(norms_ptr + e, stored.to(n_ty), mask=m)


@triton.jit
def _ln_backward(dy, n, mask, count, rstd):
    """LayerNorm's input gradient from dn = dy * gain: rstd * (dn - mean(dn) - n * mean(dn * n))."""
    m1 = tl.sum(tl.where(mask, dy, 0.0), 0) / count
    m2 = tl.sum(tl.where(mask, dy * n, 0.0), 0) / count
    return rstd * (dy - m1 - n * m2)


@triton.jit
def _ext_step_backward_kernel(
    dh_ptr,  # [n, H] gradient of h (no projection) or of r (projection)
    dc_ptr,  # [n, H] in: gradient of c_t; out: of c_{t-1} (each program its own row)
    c_prev_ptr, gates_ptr, norms_ptr, mask_c_ptr, mask_h_ptr, g_hh_ptr, g_c_ptr, b_c_ptr,
    carry_ptr,  # [n, H] out: k_h * dh (ZONE_H)
    grad_pre_ptr, grad_rec_ptr,  # [n, 4H] out (grad_rec with LAYER_NORM)
    dl_ptr,  # [n, H] out: gradient of LN_c's output (LAYER_NORM)
    H, E, keep_c, keep_h,
    LAYER_NORM: tl.constexpr, ZONE_C: tl.constexpr, MASK_C: tl.constexpr, ZONE_H: tl.constexpr,
    MASK_H: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    m = cols < H
    g4 = row * 4 * H + cols
    h1 = row * H + cols
    e = row * E + cols
    dh = tl.load(dh_ptr + h1, mask=m, other=0.0).to(ACC_DTYPE)
    if ZONE_H:
        if MASK_H:
            k_h = tl.load(mask_h_ptr + h1, mask=m, other=0.0).to(ACC_DTYPE)
        else:
            k_h = keep_h
        tl.store(carry_ptr + h1, (k_h * dh).to(carry_ptr.dtype.element_ty), mask=m)
        dh = dh * (1 - k_h)
    i = tl.load(gates_ptr + g4, mask=m, other=0.0).to(ACC_DTYPE)
    f = tl.load(gates_ptr + g4 + H, mask=m, other=0.0).to(ACC_DTYPE)
    g = tl.load(gates_ptr + g4 + 2 * H, mask=m, other=0.0).to(ACC_DTYPE)
    o = tl.load(gates_ptr + g4 + 3 * H, mask=m, other=0.0).to(ACC_DTYPE)
    if LAYER_NORM:
        n_c = tl.load(norms_ptr + e + 4 * H, mask=m, other=0.0).to(ACC_DTYPE)
        g_c = tl.load(g_c_ptr + cols, mask=m, other=0.0).to(ACC_DTYPE)
        l = g_c * n_c + tl.load(b_c_ptr + cols, mask=m, other=0.0).to(ACC_DTYPE)
    else:
        l = tl.load(norms_ptr + e, mask=m, other=0.0).to(ACC_DTYPE)
    tl_ = _tanh(l)
    d_o = dh * tl_
    d_l = dh * o * (1 - tl_ * tl_)
    dc = tl.load(dc_ptr + h1, mask=m, other=0.0).to(ACC_DTYPE)
    d_cc = dc
    carry_c = dc * 0
    if ZONE_C:
        if MASK_C:
            k_c = tl.load(mask_c_ptr + h1, mask=m, other=0.0).to(ACC_DTYPE)
        else:
            k_c = keep_c
        d_cc = dc * (1 - k_c)
        carry_c = dc * k_c
    if LAYER_NORM:
        tl.store(dl_ptr + h1, d_l.to(dl_ptr.dtype.element_ty), mask=m)
        rstd_c = tl.load(norms_ptr + row * E + 5 * H + 1).to(ACC_DTYPE)
        d_cc += _ln_backward(d_l * g_c, n_c, m, H, rstd_c)
    else:
        d_cc += d_l
    c_prev = tl.load(c_prev_ptr + h1, mask=m, other=0.0).to(ACC_DTYPE)
    da_i = d_cc * g * i * (1 - i)
    da_f = d_cc * c_prev * f * (1 - f)
    da_g = d_cc * i * (1 - g * g)
    da_o = d_o * o * (1 - o)
    tl.store(dc_ptr + h1, (d_cc * f + carry_c).to(dc_ptr.dtype.element_ty), mask=m)
    ty = grad_pre_ptr.dtype.element_ty
    tl.store(grad_pre_ptr + g4, da_i.to(ty), mask=m)
    tl.store(grad_pre_ptr + g4 + H, da_f.to(ty), mask=m)
    tl.store(grad_pre_ptr + g4 + 2 * H, da_g.to(ty), mask=m)
    tl.store(grad_pre_ptr + g4 + 3 * H, da_o.to(ty), mask=m)
    if LAYER_NORM:
        # LN_hh backward over the whole 4H row.
        dn_i = da_i * tl.load(g_hh_ptr + cols, mask=m, other=0.0).to(ACC_DTYPE)
        dn_f = da_f * tl.load(g_hh_ptr + H + cols, mask=m, other=0.0).to(ACC_DTYPE)
        dn_g = da_g * tl.load(g_hh_ptr + 2 * H + cols, mask=m, other=0.0).to(ACC_DTYPE)
        dn_o = da_o * tl.load(g_hh_ptr + 3 * H + cols, mask=m, other=0.0).to(ACC_DTYPE)
        n_i = tl.load(norms_ptr + e, mask=m, other=0.0).to(ACC_DTYPE)
        n_f = tl.load(norms_ptr + e + H, mask=m, other=0.0).to(ACC_DTYPE)
        n_g = tl.load(norms_ptr + e + 2 * H, mask=m, other=0.0).to(ACC_DTYPE)
        n_o = tl.load(norms_ptr + e + 3 * H, mask=m, other=0.0).to(ACC_DTYPE)
        count = 4 * H
        m1 = (tl.sum(tl.where(m, dn_i, 0.0), 0) + tl.sum(tl.where(m, dn_f, 0.0), 0)
              + tl.sum(tl.where(m, dn_g, 0.0), 0) + tl.sum(tl.where(m, dn_o, 0.0), 0)) / count
        m2 = (tl.sum(tl.where(m, dn_i * n_i, 0.0), 0) + tl.sum(tl.where(m, dn_f * n_f, 0.0), 0)
              + tl.sum(tl.where(m, dn_g * n_g, 0.0), 0) + tl.sum(tl.where(m, dn_o * n_o, 0.0), 0)) / count
        rstd_h = tl.load(norms_ptr + row * E + 5 * H).to(ACC_DTYPE)
        ty = grad_rec_ptr.dtype.element_ty
        tl.store(grad_rec_ptr + g4, (rstd_h * (dn_i - m1 - n_i * m2)).to(ty), mask=m)
        tl.store(grad_rec_ptr + g4 + H, (rstd_h * (dn_f - m1 - n_f * m2)).to(ty), mask=m)
        tl.store(grad_rec_ptr + g4 + 2 * H, (rstd_h * (dn_g - m1 - n_g * m2)).to(ty), mask=m)
        tl.store(grad_rec_ptr + g4 + 3 * H, (rstd_h * (dn_o - m1 - n_o * m2)).to(ty), mask=m)


# ------------------------------------------------------------------------------------- host side
def _check_ext(layer, input, ln, cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, op) -> None:
    H = layer.hidden
    present = [t is not None for t in ln]
    if any(present) and not all(present[k] for k in range(len(ln)) if ln[k] is not None or k in (0, 2, 4)):
        raise RuntimeError(f"bigkernels::{op}: the layer-norm parameters must all be given or all be None")
    named = [(name, t, (size,), f"[{size}]") for name, t, size in
             zip(("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b")[:len(ln)], ln,
                 (4 * H, 4 * H, 4 * H, 4 * H, H, H)) if t is not None]
    for name, mask, width in (("cell_mask", cell_mask, H), ("hidden_mask", hidden_mask, layer.proj)):
        if mask is not None:
            named.append((name, mask, (layer.rows, width), f"[rows, {width}]"))
    _check_like(named, input, op)
    if not (0 <= zoneout_cell < 1 and 0 <= zoneout_hidden < 1):
        raise RuntimeError(f"bigkernels::{op}: zoneout probabilities must be in [0, 1), got {zoneout_cell} and "
                           f"{zoneout_hidden}")


@launches_on("lstm_ext_triton", "input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "ln_ih_w", "ln_ih_b",
             "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b", "cell_mask", "hidden_mask")  # batch_sizes: CPU
def lstm_ext_forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b,
                     ln_c_w, ln_c_b, cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, reverse, need_workspace):
    """(output, h_n, c_n, gates, cells, norms): see the lstm_ext schema in csrc/ops.cpp."""
    op = "lstm_ext_triton"
    layer = _layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, op)
    ln = (ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b)
    if any(t is not None for t in ln) and any(t is None for t in ln):
        raise RuntimeError(f"bigkernels::{op}: the layer-norm parameters must all be given or all be None")
    _check_ext(layer, input, ln, cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, op)
    ln_hh_w, ln_c_w, ln_c_b, cell_mask, hidden_mask = map(_dense, (ln_hh_w, ln_c_w, ln_c_b, cell_mask, hidden_mask))
    with _no_autocast(input.device.type):
        B, H, P, rows = layer.batch, layer.hidden, layer.proj, layer.rows
        layer_norm = ln_ih_w is not None
        E = 5 * H + 2 if layer_norm else H
        x = input.reshape(rows, layer.input_size)
        pre = torch.mm(x, w_ih.t())
        if layer_norm:
            pre = torch.nn.functional.layer_norm(pre, (4 * H,), ln_ih_w, ln_ih_b, LAYER_NORM_EPS) + ln_hh_b
        if b_ih is not None:
            pre = pre + (b_ih + b_hh)
        pre = pre.contiguous()
        output = input.new_empty((rows, P))
        cells = input.new_empty((rows, H))
        gates = input.new_empty((rows, 4 * H) if need_workspace else (0,))
        norms = input.new_empty((rows, E) if need_workspace else (0,), dtype=norms_dtype(input.dtype))
        rec = input.new_empty((B, 4 * H))
        r = input.new_empty((B, H)) if w_hr is not None else None
        scratch_h = input.new_empty((B, P)) if layer.packed and layer.reverse else None
        scratch_c = input.new_empty((B, H)) if layer.packed and layer.reverse else None
        zone_c = cell_mask is not None or zoneout_cell != 0
        zone_h = hidden_mask is not None or zoneout_hidden != 0
        zone_h_inside = zone_h and w_hr is None
        block_h = triton.next_power_of_2(max(H, 1))
        for k, t in enumerate(layer.order):
            n, row0 = layer.sizes[t], layer.offsets[t]
            if n == 0 or H == 0:
                continue
            h_all, h_row0 = _previous_rows(layer, k, n, output, h0, scratch_h)
            c_all, c_row0 = _previous_rows(layer, k, n, cells, c0, scratch_c)
            h_prev = h_all[h_row0:h_row0 + n].contiguous()
            c_prev = c_all[c_row0:c_row0 + n].contiguous()
            torch.mm(h_prev, w_hh.t(), out=rec[:n])
            step = slice(row0, row0 + n)
            h_out = r[:n] if r is not None else output[step]
            _ext_step_forward_kernel[(n,)](
                pre[step], rec, c_prev, h_prev, cell_mask[step] if cell_mask is not None else pre,
                hidden_mask[step] if hidden_mask is not None and zone_h_inside else pre,
                ln_hh_w if layer_norm else pre, ln_c_w if layer_norm else pre, ln_c_b if layer_norm else pre,
                cells[step], h_out, gates[step] if need_workspace else pre, norms[step] if need_workspace else pre,
                H, E, float(zoneout_cell), float(zoneout_hidden), LAYER_NORM_EPS,
                LAYER_NORM=layer_norm, ZONE_C=zone_c, MASK_C=cell_mask is not None, ZONE_H=zone_h_inside,
                MASK_H=hidden_mask is not None, STORE_WORKSPACE=need_workspace,
                ACC_DTYPE=_ACC_DTYPES[input.dtype], BLOCK_H=block_h, num_warps=row_warps(block_h),
            )
            if r is not None:
                out_t = torch.mm(r[:n], w_hr.t(), out=output[step])
                if zone_h:
                    out_t.lerp_(h_prev, hidden_mask[step] if hidden_mask is not None else float(zoneout_hidden))
        h_n = _final_h(layer, output, h0)
        c_n = _final_h(layer, cells, c0)
        if not layer.packed:
            output = output.view(input.shape[0], B, P)
        if not need_workspace:
            cells = input.new_empty((0,))
        return output, h_n, c_n, gates, cells, norms


@launches_on("lstm_ext_backward_triton", "grad_output", "grad_h_n", "grad_c_n", "input", "h0", "c0", "w_ih",
             "w_hh", "w_hr", "ln_ih_w", "ln_hh_w", "ln_c_w", "ln_c_b", "cell_mask", "hidden_mask", "output",
             "gates", "cells", "norms")
def lstm_ext_backward(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, ln_ih_w,
                      ln_hh_w, ln_c_w, ln_c_b, cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, reverse, output,
                      gates, cells, norms):
    """BPTT of lstm_ext_forward: the 11 gradients of the lstm_ext_backward schema in csrc/ops.cpp."""
    op = "lstm_ext_backward_triton"
    layer = _layer(input, batch_sizes, h0, c0, w_ih, w_hh, None, None, w_hr, reverse, op)
    B, H, P, rows = layer.batch, layer.hidden, layer.proj, layer.rows
    layer_norm = ln_ih_w is not None
    if layer_norm and any(t is None for t in (ln_hh_w, ln_c_w, ln_c_b)):
        raise RuntimeError(f"bigkernels::{op}: the layer-norm parameters must all be given or all be None")
    _check_ext(layer, input, (ln_ih_w, None, ln_hh_w, None, ln_c_w, ln_c_b), cell_mask, hidden_mask, zoneout_cell,
               zoneout_hidden, op)
    E = 5 * H + 2 if layer_norm else H
    out_shape = (rows, P) if layer.packed else (input.shape[0], B, P)
    workspace = "the workspace saved by lstm_ext_triton(need_workspace=True)"
    _check_like([("output", output, out_shape, "the forward's output"),
                 ("grad_output", grad_output, out_shape, "the forward's output"),
                 ("grad_h_n", grad_h_n, (B, P), "[batch, proj_size or hidden_size]"),
                 ("grad_c_n", grad_c_n, (B, H), "[batch, hidden_size]"),
                 ("gates", gates, (rows, 4 * H), f"[rows, 4*hidden_size], {workspace}"),
                 ("cells", cells, (rows, H), f"[rows, hidden_size], {workspace}")], input, op)
    _check_like([("norms", norms, (rows, E), f"[rows, {E}] in {norms_dtype(input.dtype)}, {workspace}")],
                input.new_empty((0,), dtype=norms_dtype(input.dtype)), op)
    ln_hh_w, ln_c_w, ln_c_b, cell_mask, hidden_mask = map(_dense, (ln_hh_w, ln_c_w, ln_c_b, cell_mask, hidden_mask))
    with _no_autocast(input.device.type):
        return _backward(layer, grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, ln_ih_w, ln_hh_w,
                         ln_c_w, ln_c_b, cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, output,
                         gates.contiguous(), cells.contiguous(), norms.contiguous())


def _backward(layer, grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, ln_ih_w, ln_hh_w, ln_c_w,
              ln_c_b, cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, output, gates, cells, norms):
    from bigkernels.triton.lstm import _recurrent_weight_grad

    B, H, P, rows = layer.batch, layer.hidden, layer.proj, layer.rows
    layer_norm = ln_ih_w is not None
    E = norms.shape[1]
    projected = w_hr is not None
    zone_c = cell_mask is not None or zoneout_cell != 0
    zone_h = hidden_mask is not None or zoneout_hidden != 0
    dout = grad_output.reshape(rows, P)
    grad_pre = input.new_empty((rows, 4 * H))
    grad_rec = input.new_empty((rows, 4 * H)) if layer_norm else grad_pre
    dl_all = input.new_empty((rows, H)) if layer_norm else grad_pre
    dh = grad_h_n.clone(memory_format=torch.contiguous_format)
    dc = grad_c_n.clone(memory_format=torch.contiguous_format)
    carry = input.new_empty((B, P)) if zone_h else dh
    dh_tilde_all = input.new_empty((rows, P)) if projected else None
    dr = input.new_empty((B, H)) if projected else None
    scratch = input.new_empty((B, H)) if layer.packed and layer.reverse else None
    block_h = triton.next_power_of_2(max(H, 1))
    for k in range(len(layer.order) - 1, -1, -1):
        t = layer.order[k]
        n, row0 = layer.sizes[t], layer.offsets[t]
        if n == 0 or H == 0:
            continue
        step = slice(row0, row0 + n)
        dh_t = dout[step] + dh[:n]
        if projected:
            if zone_h:
                keep = hidden_mask[step] if hidden_mask is not None else zoneout_hidden
                torch.mul(dh_t, keep, out=carry[:n])
                dh_t = dh_t - carry[:n]
            dh_tilde_all[step] = dh_t
            dh_t = torch.mm(dh_t, w_hr, out=dr[:n])
        c_all, c_row0 = _previous_rows(layer, k, n, cells, c0, scratch)
        # Dense, as in the forward: at the first step this is c0, which may be expanded or transposed
        # (batch-first states); the kernel indexes it as [n, H] contiguous.
        c_prev = c_all[c_row0:c_row0 + n].contiguous()
        inside = zone_h and not projected
        _ext_step_backward_kernel[(n,)](
            dh_t, dc, c_prev, gates[step], norms[step], cell_mask[step] if cell_mask is not None else dh_t,
            hidden_mask[step] if hidden_mask is not None and inside else dh_t,
            ln_hh_w if layer_norm else dh_t, ln_c_w if layer_norm else dh_t, ln_c_b if layer_norm else dh_t,
            carry, grad_pre[step], grad_rec[step], dl_all[step],
            H, E, float(zoneout_cell), float(zoneout_hidden),
            LAYER_NORM=layer_norm, ZONE_C=zone_c, MASK_C=cell_mask is not None, ZONE_H=inside,
            MASK_H=hidden_mask is not None, ACC_DTYPE=_ACC_DTYPES[input.dtype], BLOCK_H=block_h,
            num_warps=row_warps(block_h),
        )
        if zone_h:
            torch.addmm(carry[:n], grad_rec[step], w_hh, out=dh[:n])
        else:
            torch.mm(grad_rec[step], w_hh, out=dh[:n])

    def empty() -> Tensor:
        return input.new_empty((0,))

    x = input.reshape(rows, layer.input_size)
    grad_gx = grad_pre
    grad_ln_ih_w = grad_ln_hh_w = grad_ln_c_w = grad_ln_c_b = None
    if layer_norm:
        gx = torch.mm(x, w_ih.t())  # recomputed: cheaper to keep than [rows, 4H]
        _, mean, rstd = torch.ops.aten.native_layer_norm(gx, [4 * H], ln_ih_w, None, LAYER_NORM_EPS)
        grad_gx, grad_ln_ih_w, _ = torch.ops.aten.native_layer_norm_backward(
            grad_pre, gx, [4 * H], mean, rstd, ln_ih_w, None, [True, True, False])
        grad_ln_hh_w = (grad_pre * norms[:, :4 * H]).sum(0).to(input.dtype)  # summed in the stats' type
        grad_ln_c_w = (dl_all * norms[:, 4 * H:5 * H]).sum(0).to(input.dtype)
        grad_ln_c_b = dl_all.sum(0)
    grad_input = torch.mm(grad_gx, w_ih).view(input.shape)
    grad_w_ih = torch.mm(grad_gx.t(), x)
    grad_w_hh = _recurrent_weight_grad(layer, grad_rec, output.reshape(rows, P), h0)
    grad_w_hr = empty()
    if projected:
        l = norms[:, 4 * H:5 * H] * ln_c_w + ln_c_b if layer_norm else norms[:, :H]
        grad_w_hr = torch.mm(dh_tilde_all.t(), (gates[:, 3 * H:] * torch.tanh(l)).to(input.dtype))
    grad_bias = grad_pre.sum(0)
    return (grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr,
            *(g if g is not None else empty() for g in (grad_ln_ih_w, grad_ln_hh_w, grad_ln_c_w, grad_ln_c_b)))
