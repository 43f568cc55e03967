"""bigkernels::lstm_ext: one LSTM layer with a layer-normalised cell and/or zoneout (forward and BPTT).

The options of ``bigkernels.nn.LSTM(layer_norm=True, zoneout=p)``; the maths is
bigkernels.reference.lstm_layer_ext (Ba et al. 2016 layer normalisation, Krueger et al. 2016
zoneout).

Why separate ops rather than more arguments of ``bigkernels::lstm``: the default path is the one
that must stay as fast as it is, with its schema, its fused float32 recurrence
(csrc/cpu/lstm_recurrent.cpp), its CUDA kernels and its C++ autograd untouched; the options need
other workspace (the LayerNorm statistics), other inputs (LN parameters, zoneout masks) and other
gradients (LN gains). A second op keeps both small and lets the default path's kernels ignore
options they would only have to reject.

Ops (one schema each):
  bigkernels::lstm_ext / lstm_ext_backward                C++ CPU (csrc/cpu/lstm_ext.cpp; schema in
                                                          csrc/ops.cpp)
  bigkernels::lstm_ext_triton / lstm_ext_backward_triton  Triton (bigkernels/triton/lstm_ext.py):
                                                          the GPU path. There is no CUDA C++ kernel
                                                          for these options: CUDA tensors run the
                                                          Triton op; a forced "cuda" backend is
                                                          refused (BackendUnavailable says why).
Autograd is registered here, in Python, for both forward ops: one formula, and the per-call Python
cost (tens of microseconds) is small beside a whole-sequence call.

Zoneout masks are drawn here with torch's generator (so ``torch.manual_seed`` reproduces them)
and passed to the op as inputs, which saves them for the backward: the same mask in both passes.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from bigkernels import _extension, reference
from bigkernels._chooser import Candidate, Chooser
from bigkernels.ops._checks import check_like, check_shape, check_tensor
from bigkernels.ops._dispatch import autocast_args, needs_workspace
from bigkernels.ops.lstm import _check_arguments as _check_lstm_arguments

OP = "lstm_ext"
LayerNormParams = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
LN_NAMES = ("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b")


# ----------------------------------------------------------------------------------- fake kernels
def _fake_forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b,
                  ln_c_w, ln_c_b, cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, reverse, need_workspace):
    hidden = c0.shape[-1]
    proj = w_hr.shape[0] if w_hr is not None else hidden
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    output = input.new_empty((rows, proj) if batch_sizes is not None else (input.shape[0], input.shape[1], proj))
    width = 5 * hidden + 2 if ln_ih_w is not None else hidden

    def workspace(cols):
        return input.new_empty((rows, cols) if need_workspace else (0,))

    return output, h0.new_empty(h0.shape), c0.new_empty(c0.shape), workspace(4 * hidden), workspace(hidden), workspace(width)


def _fake_backward(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, ln_ih_w, ln_hh_w,
                   ln_c_w, ln_c_b, cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, reverse, output, gates,
                   cells, norms):
    def like(t: Optional[Tensor]) -> Tensor:
        return t.new_empty(t.shape) if t is not None else input.new_empty((0,))

    return (like(input), like(h0), like(c0), like(w_ih), like(w_hh), input.new_empty((w_ih.shape[0],)), like(w_hr),
            like(ln_ih_w), like(ln_hh_w), like(ln_c_w), like(ln_c_b))


# ------------------------------------------------------------------------------------ Triton ops
@torch.library.custom_op("bigkernels::lstm_ext_triton", mutates_args=())
def lstm_ext_triton(
    input: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], ln_ih_w: Optional[Tensor],
    ln_ih_b: Optional[Tensor], ln_hh_w: Optional[Tensor], ln_hh_b: Optional[Tensor], ln_c_w: Optional[Tensor],
    ln_c_b: Optional[Tensor], cell_mask: Optional[Tensor], hidden_mask: Optional[Tensor], zoneout_cell: float,
    zoneout_hidden: float, reverse: bool, need_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from bigkernels.triton import lstm_ext as kernels  # Triton is optional and slow to import

    return kernels.lstm_ext_forward(
        input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
        cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, reverse, need_workspace,
    )


@torch.library.custom_op("bigkernels::lstm_ext_backward_triton", mutates_args=())
def lstm_ext_backward_triton(
    grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, input: Tensor, batch_sizes: Optional[Tensor],
    h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], ln_ih_w: Optional[Tensor],
    ln_hh_w: Optional[Tensor], ln_c_w: Optional[Tensor], ln_c_b: Optional[Tensor], cell_mask: Optional[Tensor],
    hidden_mask: Optional[Tensor], zoneout_cell: float, zoneout_hidden: float, reverse: bool, output: Tensor,
    gates: Tensor, cells: Tensor, norms: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from bigkernels.triton import lstm_ext as kernels

    return kernels.lstm_ext_backward(
        grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, ln_ih_w, ln_hh_w, ln_c_w,
        ln_c_b, cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, reverse, output, gates, cells, norms,
    )


@lstm_ext_triton.register_fake
def _fake_forward_triton(*args, **kwargs):
    from bigkernels.triton.lstm_ext import norms_dtype  # the Triton op keeps its LayerNorm statistics wider

    *outputs, norms = _fake_forward(*args, **kwargs)
    return (*outputs, norms.new_empty(norms.shape, dtype=norms_dtype(norms.dtype)))


lstm_ext_backward_triton.register_fake(_fake_backward)


# ------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
     cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, reverse, _need_workspace) = inputs
    out, _h_n, _c_n, gates, cells, norms = output
    ctx.save_for_backward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih_w, ln_ih_b, ln_hh_w,
                          ln_hh_b, ln_c_w, ln_c_b, cell_mask, hidden_mask, out, gates, cells, norms)
    ctx.scalars = (zoneout_cell, zoneout_hidden, reverse)


def _make_backward(forward_op, backward_op):
    """The autograd formula of `forward_op`, calling `backward_op` (each forward op its own backward,
    whatever backend is selected when the backward runs)."""
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells, _grad_norms):
        return _backward(forward_op(), backward_op(), ctx, grad_output, grad_h_n, grad_c_n)

    return backward


def _backward(forward_op, backward_op, ctx, grad_output, grad_h_n, grad_c_n):
    (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
     cell_mask, hidden_mask, out, gates, cells, norms) = ctx.saved_tensors
    zoneout_cell, zoneout_hidden, reverse = ctx.scalars
    if gates.dim() == 1:  # forward ran without the workspace: recompute it rather than fail
        out, _, _, gates, cells, norms = forward_op(
            input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w,
            ln_c_b, cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, reverse, True)

    def zeros_if_none(g, like):
        return g if g is not None else torch.zeros_like(like)

    (g_input, g_h0, g_c0, g_w_ih, g_w_hh, g_bias, g_w_hr, g_ln_ih_w, g_ln_hh_w, g_ln_c_w, g_ln_c_b) = backward_op(
        zeros_if_none(grad_output, out), zeros_if_none(grad_h_n, h0), zeros_if_none(grad_c_n, c0), input,
        batch_sizes, h0, c0, w_ih, w_hh, w_hr, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, cell_mask, hidden_mask,
        zoneout_cell, zoneout_hidden, reverse, out, gates, cells, norms)
    grads = (g_input, None, g_h0, g_c0, g_w_ih, g_w_hh, g_bias, g_bias, g_w_hr, g_ln_ih_w, g_bias, g_ln_hh_w,
             g_bias, g_ln_c_w, g_ln_c_b)
    need = ctx.needs_input_grad
    return tuple(g if need[k] else None for k, g in enumerate(grads)) + (None,) * 6


torch.library.register_autograd(
    "bigkernels::lstm_ext_triton",
    _make_backward(lambda: torch.ops.bigkernels.lstm_ext_triton, lambda: torch.ops.bigkernels.lstm_ext_backward_triton),
    setup_context=_setup_context,
)

if _extension.AVAILABLE:
    torch.library.register_fake("bigkernels::lstm_ext")(_fake_forward)
    torch.library.register_fake("bigkernels::lstm_ext_backward")(_fake_backward)
    torch.library.register_autograd(
        "bigkernels::lstm_ext",
        _make_backward(lambda: torch.ops.bigkernels.lstm_ext, lambda: torch.ops.bigkernels.lstm_ext_backward),
        setup_context=_setup_context,
    )


# ----------------------------------------------------------------------------------- public API
def zoneout_pair(zoneout: Union[float, Sequence[float]]) -> tuple[float, float]:
    """(p_cell, p_hidden) from a float p (both) or a pair; ValueError unless each is in [0, 1)."""
    if isinstance(zoneout, (int, float)) and not isinstance(zoneout, bool):
        pair = (float(zoneout), float(zoneout))
    elif isinstance(zoneout, (tuple, list)) and len(zoneout) == 2 and all(
        isinstance(p, (int, float)) and not isinstance(p, bool) for p in zoneout
    ):
        pair = (float(zoneout[0]), float(zoneout[1]))
    else:
        raise TypeError(f"zoneout must be a float or a pair (p_cell, p_hidden) of floats, got {zoneout!r}")
    if not all(0.0 <= p < 1.0 for p in pair):
        raise ValueError(f"zoneout probabilities must be in [0, 1), got {zoneout!r}")
    return pair


def _check_layer_norm(layer_norm: Optional[LayerNormParams], input: Tensor, hidden: int) -> None:
    if layer_norm is None:
        return
    if not isinstance(layer_norm, (tuple, list)) or len(layer_norm) != 6:
        raise ValueError(f"layer_norm must be None or a tuple of 6 tensors {LN_NAMES}, got {type(layer_norm).__name__}")
    sizes = (4 * hidden, 4 * hidden, 4 * hidden, 4 * hidden, hidden, hidden)
    for name, t, size in zip(LN_NAMES, layer_norm, sizes):
        check_tensor(t, f"layer_norm {name}")
        check_shape(t, f"layer_norm {name}", (size,), "(4*hidden_size,)" if size != hidden else "(hidden_size,)")
        check_like(t, f"layer_norm {name}", input, "input")


def _keep_mask(rows: int, width: int, p: float, like: Tensor) -> Tensor:
    # Drawn in float32 whatever the dtype, so one seed gives the same mask in every dtype.
    return (torch.rand((rows, width), device=like.device) < p).to(like.dtype)


def lstm_layer_ext(
    input: Tensor,
    batch_sizes: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    reverse: bool = False,
    *,
    layer_norm: Optional[LayerNormParams] = None,
    zoneout: Union[float, Sequence[float]] = 0.0,
    training: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """`bigkernels.ops.lstm.lstm_layer` with a layer-normalised cell and/or zoneout: (output, h_n, c_n).

    Args as `lstm_layer`, plus (keyword-only):
        layer_norm: None, or the LayerNorm (gain, bias) pairs (ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b,
            ln_c_w, ln_c_b), shaped (4H,) x 4 and (H,) x 2, in the input's dtype and device.
        zoneout: p in [0, 1) for both cell and hidden state, or a pair (p_cell, p_hidden).
        training: with zoneout, keep each unit's previous c / h with probability p (a fresh Bernoulli
            mask per step, unit and row from torch's generator); else blend with the expectation p.

    Supported: CPU float32/float64/bfloat16 (C++), CUDA float16/bfloat16/float32/float64 (Triton;
    no CUDA C++ kernel for these options), any device on the reference backend. Differentiable in
    every tensor argument (first order).
    """
    zoneout_cell, zoneout_hidden = zoneout_pair(zoneout)
    check_tensor(input, "input")
    # As bigkernels.ops.lstm: the autocast dtype on both devices, LayerNorm parameters included.
    args = autocast_args((input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) + tuple(layer_norm or ()), input.device,
                         ("cuda", "cpu"))
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args[:8]
    if layer_norm is not None:
        layer_norm = tuple(args[8:])
    # Always checked (this path is not the batch-1 hot loop); batch_sizes' values only in eager mode.
    _check_lstm_arguments(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                          check_values=not torch.compiler.is_compiling())
    _check_layer_norm(layer_norm, input, c0.shape[-1])
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    cell_mask = hidden_mask = None
    if training:
        # The masks carry the zoneout; the constants are the evaluation-mode blend only.
        if zoneout_cell > 0:
            cell_mask = _keep_mask(rows, c0.shape[-1], zoneout_cell, input)
        if zoneout_hidden > 0:
            hidden_mask = _keep_mask(rows, h0.shape[-1], zoneout_hidden, input)
        zoneout_cell = zoneout_hidden = 0.0
    # Flat, so that the chooser sees (and detaches, and validates in float64) every tensor.
    ln = tuple(layer_norm) if layer_norm is not None else (None,) * 6
    call = (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, *ln, zoneout_cell, zoneout_hidden,
            cell_mask, hidden_mask)
    output, h_n, c_n = CHOOSER.pick(input.device, call, needs_workspace(args)).run(*call)
    return output, h_n, c_n


# ------------------------------------------------------------------------------------ candidates
# No stock op has these options: the GPU kernel is validated against the reference instead
# (bigkernels/_chooser.py), and there is nothing to race on the CPU.
def _own_kernel(op):
    def run(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, *rest):
        *ln, zoneout_cell, zoneout_hidden, cell_mask, hidden_mask = rest
        args = (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *ln)
        output, h_n, c_n, _, _, _ = op(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *ln, cell_mask,
                                       hidden_mask, zoneout_cell, zoneout_hidden, reverse, needs_workspace(args))
        return output, h_n, c_n

    return run


def _reference(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, *rest):
    *ln, zoneout_cell, zoneout_hidden, cell_mask, hidden_mask = rest
    layer_norm = tuple(ln) if ln[0] is not None else None
    return reference.lstm_layer_ext(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, layer_norm,
                                    zoneout_cell, zoneout_hidden, cell_mask, hidden_mask)


def _signature(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, *rest) -> tuple:
    *ln, zoneout_cell, zoneout_hidden, cell_mask, hidden_mask = rest
    return (input.shape, input.dtype, batch_sizes is None, c0.shape, h0.shape, w_ih.shape, b_ih is None,
            None if w_hr is None else w_hr.shape, reverse, ln[0] is None, zoneout_cell, zoneout_hidden,
            cell_mask is None, hidden_mask is None)


CHOOSER = Chooser(
    OP,
    [
        Candidate("cpu", "cpu", _own_kernel(torch.ops.bigkernels.lstm_ext.default if _extension.AVAILABLE else None)),
        Candidate("triton", "triton", _own_kernel(torch.ops.bigkernels.lstm_ext_triton.default)),
        Candidate("reference", "reference", _reference),
    ],
    signature=_signature,
)
