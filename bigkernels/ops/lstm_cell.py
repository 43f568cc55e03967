"""bigkernels::lstm_cell: the fused LSTM cell.

Ops (one schema each):
  bigkernels::lstm_cell / lstm_cell_backward                 C++ CPU and CUDA kernels (csrc/ops.cpp)
  bigkernels::lstm_cell_triton / lstm_cell_backward_triton    Triton kernels (bigkernels/triton/lstm_cell.py)
This module validates the arguments once, declares the candidates the chooser picks from
(bigkernels/_chooser.py: our kernels and torch.lstm_cell, measured on this machine), handles
unbatched input and autocast, and registers the fake implementations and the autograd formula.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from bigkernels import _extension, reference
from bigkernels._chooser import Candidate, Chooser, size_bucket
from bigkernels.ops._checks import check_floating, check_like, check_shape, check_tensor
from bigkernels.ops._dispatch import autocast_args, call_checked, needs_workspace

OP = "lstm_cell"


# ----------------------------------------------------------------------------------- fake kernels
def _fake_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, need_workspace):
    # The real kernels check their arguments; so must this (meta tensors mixed with real ones land here).
    _check_arguments(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    if input.dim() != 2:
        raise ValueError(f"bigkernels::lstm_cell takes a 2-D input, got {input.dim()}-D")
    batch, hidden = input.shape[0], w_hh.shape[1]
    workspace = input.new_empty((batch, 4 * hidden)) if need_workspace else input.new_empty((0,))
    return input.new_empty((batch, hidden)), input.new_empty((batch, hidden)), workspace


def _fake_backward(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, workspace, output_mask):
    need_input, need_hx, need_weights, need_bias = output_mask

    def grad_like(t: Tensor, needed: bool) -> Tensor:
        return t.new_empty(t.shape) if needed else t.new_empty((0,))

    return (
        grad_like(input, need_input),
        grad_like(hx, need_hx),
        cx.new_empty(cx.shape),
        grad_like(w_ih, need_weights),
        grad_like(w_hh, need_weights),
        input.new_empty((w_hh.shape[0],)) if need_bias else input.new_empty((0,)),
    )


# ------------------------------------------------------------------------------- Triton ops
@torch.library.custom_op("bigkernels::lstm_cell_triton", mutates_args=())
def lstm_cell_triton(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    need_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from bigkernels.triton import lstm_cell as kernels  # Triton is optional and slow to import

    return kernels.lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, need_workspace)


@torch.library.custom_op("bigkernels::lstm_cell_backward_triton", mutates_args=())
def lstm_cell_backward_triton(
    grad_hy: Tensor,
    grad_cy: Tensor,
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    cy: Tensor,
    workspace: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from bigkernels.triton import lstm_cell as kernels

    return kernels.lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, workspace, output_mask)


lstm_cell_triton.register_fake(_fake_forward)
lstm_cell_backward_triton.register_fake(_fake_backward)


# ------------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, _need_workspace = inputs
    _hy, cy, workspace = output
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, cy, workspace)
    ctx.has_bias = b_ih is not None


def _make_backward(forward_op, backward_op):
    def backward(ctx, grad_hy, grad_cy, _grad_workspace):
        input, hx, cx, w_ih, w_hh, b_ih, b_hh, cy, workspace = ctx.saved_tensors
        need = ctx.needs_input_grad  # (input, hx, cx, w_ih, w_hh, b_ih, b_hh, need_workspace)
        if workspace.dim() == 1:  # the (0,)-shaped placeholder of need_workspace=False
            # The forward ran as inference (need_workspace=False) and was differentiated anyway,
            # e.g. a direct op call: recompute the gates rather than fail.
            _, cy, workspace = forward_op(input, hx, cx, w_ih, w_hh, b_ih, b_hh, True)
        mask = [need[0], need[1], need[3] or need[4], ctx.has_bias and (need[5] or need[6])]
        g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_bias = backward_op(
            grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, workspace, mask
        )
        return (
            g_input if need[0] else None,
            g_hx if need[1] else None,
            g_cx if need[2] else None,
            g_w_ih if need[3] else None,
            g_w_hh if need[4] else None,
            g_bias if need[5] else None,
            g_bias if need[6] else None,
            None,
        )

    return backward


torch.library.register_autograd(
    "bigkernels::lstm_cell_triton",
    _make_backward(lstm_cell_triton, lstm_cell_backward_triton),
    setup_context=_setup_context,
)

if _extension.AVAILABLE:
    # The C++ op's autograd is in C++ (csrc/autograd/lstm_cell.cpp): a Python autograd.Function
    # would cost more than the whole cell at small batch. Same contract as _make_backward above.
    torch.library.register_fake("bigkernels::lstm_cell")(_fake_forward)
    torch.library.register_fake("bigkernels::lstm_cell_backward")(_fake_backward)


# ----------------------------------------------------------------------------------- public API
def _check_arguments(input, hx, cx, w_ih, w_hh, b_ih, b_hh) -> None:
    """Raise a ValueError/TypeError naming the first argument that is wrong; return if all are fine.

    The C++ and Triton ops check their arguments themselves (cheaply, in C++), so on their happy
    path this runs only after an op has refused a call, to turn its error into a precise one; the
    per-call Python cost matters at batch 1. The reference backend, which would broadcast its way
    through bad shapes, and traced code (free at run time) always run it first."""
    check_tensor(input, "input")
    check_floating(input, "input")
    if input.dim() not in (1, 2):
        raise ValueError(f"input must be 1-D (input_size) or 2-D (batch, input_size), got {input.dim()}-D")
    check_tensor(w_ih, "w_ih")
    check_tensor(w_hh, "w_hh")
    if w_hh.dim() != 2 or w_hh.shape[0] != 4 * w_hh.shape[1]:
        raise ValueError(f"w_hh must have shape (4*hidden_size, hidden_size), got {tuple(w_hh.shape)}")
    hidden = w_hh.shape[1]
    input_size = input.shape[-1]
    if w_ih.dim() != 2 or w_ih.shape[0] != 4 * hidden:
        raise ValueError(f"w_ih must have shape (4*hidden_size, input_size) = ({4 * hidden}, input_size), got {tuple(w_ih.shape)}")
    if w_ih.shape[1] != input_size:
        raise ValueError(f"input has inconsistent input_size: got {input_size}, expected {w_ih.shape[1]} (w_ih.shape[1])")
    state_shape = (hidden,) if input.dim() == 1 else (input.shape[0], hidden)
    meaning = "(hidden_size,) for unbatched input" if input.dim() == 1 else "(batch, hidden_size)"
    for name, t in (("hx", hx), ("cx", cx)):
        check_tensor(t, name)
        check_shape(t, name, state_shape, meaning)
        check_like(t, name, input, "input")
    check_like(w_ih, "w_ih", input, "input")
    check_like(w_hh, "w_hh", input, "input")
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be given or both be None")
    if b_ih is not None:
        for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
            check_tensor(b, name)
            check_shape(b, name, (4 * hidden,), "(4*hidden_size,)")
            check_like(b, name, input, "input")


def lstm_cell(
    input: Tensor,
    hx: Optional[Sequence[Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One fused LSTM step with the semantics of ``torch.lstm_cell`` / ``torch.nn.LSTMCell``.

    Args:
        input: (batch, input_size) or unbatched (input_size,).
        hx: ``(h, c)``, each (batch, hidden_size) (or (hidden_size,) unbatched); None means zeros.
        w_ih: (4*hidden_size, input_size), gate rows ordered i, f, g, o.
        w_hh: (4*hidden_size, hidden_size).
        b_ih, b_hh: (4*hidden_size,), both or neither.

    Returns ``(h', c')`` shaped like the states. Supported: CPU float32/float64/bfloat16 (C++),
    CUDA float16/bfloat16/float32/float64 (CUDA C++ or Triton); any device on the reference backend.
    Differentiable in every tensor argument (first order).
    """
    check_tensor(input, "input")
    if hx is None:
        check_tensor(w_hh, "w_hh")
        state_shape = (w_hh.shape[1],) if input.dim() == 1 else (input.shape[0], w_hh.shape[1])
        h = c = input.new_zeros(state_shape)
    else:
        if len(hx) != 2:
            raise ValueError(f"hx must be a pair (h, c), got a sequence of {len(hx)}")
        h, c = hx
    # Under autocast the stock cell's dtypes: CUDA runs lstm_cell (on autocast's lower-precision list)
    # in the autocast dtype; on CPU it returns the input dtype (only its inner linear calls drop to
    # bfloat16), so ours keeps the input dtype there, GEMMs included: at least as accurate.
    args = autocast_args((input, h, c, w_ih, w_hh, b_ih, b_hh), input.device, ("cuda",))
    unbatched = args[0].dim() == 1
    if torch.compiler.is_compiling() or unbatched:  # checked as given: the chooser sees 2-D states
        _check_arguments(*args)
    if unbatched:
        args = (args[0].unsqueeze(0), args[1].unsqueeze(0), args[2].unsqueeze(0), *args[3:])
    hy, cy = CHOOSER.pick(args[0].device, args, needs_workspace(args)).run(*args)
    if unbatched:
        hy, cy = hy.squeeze(0), cy.squeeze(0)
    return hy, cy


# ------------------------------------------------------------------------------------ candidates
# In order of preference when nothing was measured (bigkernels/_chooser.py picks among them).
def _own_kernel(op):
    def run(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        args = (input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        hy, cy, _ = call_checked(op, (*args, needs_workspace(args)), _check_arguments, args)
        return hy, cy

    return run


def _reference(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    _check_arguments(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    return reference.lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def _stock(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return torch.lstm_cell(input, (hx, cx), w_ih, w_hh, b_ih, b_hh)


def _signature(input, hx, cx, w_ih, w_hh, b_ih, b_hh) -> tuple:
    # torch.Size is a tuple: hashable as it is. Kept short: this runs on every call (~20 us at batch 1).
    return input.shape, input.dtype, hx.shape, cx.shape, w_ih.shape, w_hh.shape, w_ih.dtype, b_ih is None


def _bucket(sig: tuple) -> tuple:
    input_shape, dtype, _, _, w_ih_shape, w_hh_shape, _, no_bias = sig
    return (size_bucket(input_shape[0]), input_shape[-1], w_hh_shape[-1], dtype, no_bias)


CHOOSER = Chooser(
    OP,
    [
        Candidate("cpu", "cpu", _own_kernel(torch.ops.bigkernels.lstm_cell.default if _extension.AVAILABLE else None)),
        Candidate("cuda", "cuda", _own_kernel(torch.ops.bigkernels.lstm_cell.default if _extension.AVAILABLE else None)),
        Candidate("triton", "triton", _own_kernel(torch.ops.bigkernels.lstm_cell_triton.default)),
        Candidate("stock", "stock", _stock),
        Candidate("reference", "reference", _reference),
    ],
    signature=_signature,
    bucket=_bucket,
    check=_check_arguments,
)
