"""bigkernels::lstm: one LSTM layer in one direction over a whole sequence (forward and BPTT).

Ops (one schema each):
  bigkernels::lstm / lstm_backward                  C++ CPU and CUDA kernels (csrc/ops.cpp)
  bigkernels::lstm_triton / lstm_backward_triton    Triton (bigkernels/triton/lstm.py)
The multi-layer, bidirectional module is bigkernels.nn.LSTM, which calls `lstm_layer` once per
layer and direction. This module validates once, picks the backend once, and registers the fake
implementations and (for the Triton op) the autograd formula; the C++ op's autograd is in C++
(csrc/autograd/lstm.cpp), as for the LSTM cell.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from bigkernels import _extension, reference
from bigkernels._chooser import Candidate, Chooser, size_bucket
from bigkernels.ops._checks import check_floating, check_like, check_shape, check_tensor
from bigkernels.ops._dispatch import autocast_args, call_checked, needs_workspace

OP = "lstm"


# ----------------------------------------------------------------------------------- fake kernels
def _sizes(input, batch_sizes, h0, c0, w_hh, w_hr):
    hidden = c0.shape[-1]
    proj = w_hr.shape[0] if w_hr is not None else hidden
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    return hidden, proj, rows


def _fake_forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, need_workspace, path=0):
    # Shapes only: a fake batch_sizes has no values, and the outputs' shapes do not depend on them.
    _check_arguments(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, check_values=False)
    hidden, proj, rows = _sizes(input, batch_sizes, h0, c0, w_hh, w_hr)
    if batch_sizes is None:
        output = input.new_empty((input.shape[0], input.shape[1], proj))
    else:
        output = input.new_empty((rows, proj))
    gates = input.new_empty((rows, 4 * hidden)) if need_workspace else input.new_empty((0,))
    cells = input.new_empty((rows, hidden)) if need_workspace else input.new_empty((0,))
    return output, h0.new_empty(h0.shape), c0.new_empty(c0.shape), gates, cells


def _fake_backward(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, reverse,
                   output, gates, cells, output_mask, path=0):
    need_input, need_weights, need_bias = output_mask

    def grad_like(t: Tensor, needed: bool) -> Tensor:
        return t.new_empty(t.shape) if needed else t.new_empty((0,))

    return (
        grad_like(input, need_input),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        grad_like(w_ih, need_weights),
        grad_like(w_hh, need_weights),
        input.new_empty((w_ih.shape[0],)) if need_bias else input.new_empty((0,)),
        grad_like(w_hr, need_weights) if w_hr is not None else input.new_empty((0,)),
    )


# ------------------------------------------------------------------------------------ Triton ops
@torch.library.custom_op("bigkernels::lstm_triton", mutates_args=())
def lstm_triton(
    input: Tensor,
    batch_sizes: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    reverse: bool,
    need_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from bigkernels.triton import lstm as kernels  # Triton is optional and slow to import

    return kernels.lstm_forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, need_workspace)


@torch.library.custom_op("bigkernels::lstm_backward_triton", mutates_args=())
def lstm_backward_triton(
    grad_output: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor,
    input: Tensor,
    batch_sizes: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    reverse: bool,
    output: Tensor,
    gates: Tensor,
    cells: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from bigkernels.triton import lstm as kernels

    return kernels.lstm_backward(
        grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, reverse, output, gates, cells,
        output_mask,
    )


lstm_triton.register_fake(_fake_forward)
lstm_backward_triton.register_fake(_fake_backward)


def _setup_context(ctx, inputs, output):
    input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, _need_workspace = inputs
    out, _h_n, _c_n, gates, cells = output
    ctx.save_for_backward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, out, gates, cells)
    ctx.reverse = reverse


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, out, gates, cells = ctx.saved_tensors
    # (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, need_workspace)
    need = ctx.needs_input_grad
    if gates.dim() == 1:  # forward ran without the workspace: recompute it rather than fail
        out, _, _, gates, cells = lstm_triton(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ctx.reverse, True)
    mask = [need[0], need[4] or need[5] or need[8], b_ih is not None and (need[6] or need[7])]
    g_input, g_h0, g_c0, g_w_ih, g_w_hh, g_bias, g_w_hr = lstm_backward_triton(
        grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, ctx.reverse, out, gates, cells,
        mask,
    )
    return (
        g_input if need[0] else None,
        None,
        g_h0 if need[2] else None,
        g_c0 if need[3] else None,
        g_w_ih if need[4] else None,
        g_w_hh if need[5] else None,
        g_bias if need[6] else None,
        g_bias if need[7] else None,
        g_w_hr if need[8] else None,
        None,
        None,
    )


torch.library.register_autograd("bigkernels::lstm_triton", _backward, setup_context=_setup_context)

if _extension.AVAILABLE:
    torch.library.register_fake("bigkernels::lstm")(_fake_forward)
    torch.library.register_fake("bigkernels::lstm_backward")(_fake_backward)


# ----------------------------------------------------------------------------------- public API
def _check_arguments(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, check_values: bool = True) -> None:
    """Raise a ValueError/TypeError naming the first argument that is wrong; return if all are fine.

    As for the LSTM cell: the kernels check their own arguments, so on their happy path this runs
    only after a kernel refused a call; the reference backend and traced code always run it first.
    check_values=False skips the checks that read batch_sizes' values (not available when tracing;
    the kernels check them at run time)."""
    check_tensor(input, "input")
    check_floating(input, "input")
    packed = batch_sizes is not None
    if packed:
        check_tensor(batch_sizes, "batch_sizes")
        if batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu":
            raise ValueError(
                f"batch_sizes must be a 1-D int64 CPU tensor (PackedSequence.batch_sizes), got {batch_sizes.dim()}-D "
                f"{batch_sizes.dtype} on {batch_sizes.device}"
            )
        if input.dim() != 2:
            raise ValueError(f"packed input must be 2-D (total_steps, input_size), got {input.dim()}-D")
    elif input.dim() != 3:
        raise ValueError(f"input must be 3-D (seq_len, batch, input_size), got {input.dim()}-D")
    for name, t in (("h0", h0), ("c0", c0), ("w_ih", w_ih), ("w_hh", w_hh)):
        check_tensor(t, name)
        check_like(t, name, input, "input")
    if c0.dim() != 2:
        raise ValueError(f"c0 must be 2-D (batch, hidden_size), got {c0.dim()}-D")
    batch, hidden = c0.shape
    proj = hidden
    if w_hr is not None:
        check_tensor(w_hr, "w_hr")
        check_like(w_hr, "w_hr", input, "input")
        if w_hr.dim() != 2 or w_hr.shape[1] != hidden or not 0 < w_hr.shape[0] < hidden:
            raise ValueError(f"w_hr must have shape (proj_size, hidden_size) with 0 < proj_size < hidden_size = {hidden}, got {tuple(w_hr.shape)}")
        proj = w_hr.shape[0]
    check_shape(h0, "h0", (batch, proj), "(batch, proj_size or hidden_size)")
    input_size = input.shape[-1]
    check_shape(w_ih, "w_ih", (4 * hidden, input_size), "(4*hidden_size, input_size)")
    check_shape(w_hh, "w_hh", (4 * hidden, proj), "(4*hidden_size, proj_size or hidden_size)")
    if packed and check_values:
        if batch_sizes.numel() and int(batch_sizes[0]) != batch:
            raise ValueError(f"h0 and c0 must have batch_sizes[0] = {int(batch_sizes[0])} rows for packed input, got {batch}")
        if int(batch_sizes.sum()) != input.shape[0]:
            raise ValueError(f"batch_sizes must sum to the packed input's rows ({input.shape[0]}), got {int(batch_sizes.sum())}")
        if batch_sizes.numel() > 1 and bool((batch_sizes[1:] > batch_sizes[:-1]).any()):
            raise ValueError("batch_sizes must be non-increasing (sequences sorted by length, as PackedSequence keeps them)")
    elif not packed and input.shape[1] != batch:
        raise ValueError(f"h0 and c0 must have the input's batch size {input.shape[1]}, got {batch}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be given or both be None")
    if b_ih is not None:
        for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
            check_tensor(b, name)
            check_shape(b, name, (4 * hidden,), "(4*hidden_size,)")
            check_like(b, name, input, "input")


def lstm_layer(
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
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction over a whole sequence: ``(output, h_n, c_n)``.

    Args:
        input: (seq_len, batch, input_size), or packed (total_steps, input_size) with `batch_sizes`.
        batch_sizes: None, or PackedSequence.batch_sizes (1-D int64 CPU, non-increasing).
        h0: (batch, P), c0: (batch, hidden_size); P = proj_size with a projection, else hidden_size.
        w_ih: (4*hidden_size, input_size), w_hh: (4*hidden_size, P), gate rows ordered i, f, g, o.
        b_ih, b_hh: (4*hidden_size,), both or neither. w_hr: (P, hidden_size) or None.
        reverse: run the steps last to first (the reverse direction of a bidirectional LSTM).

    Output is (seq_len, batch, P) or packed (total_steps, P). Supported: CPU float32/float64/bfloat16
    (C++), CUDA float16/bfloat16/float32/float64 (CUDA C++ or Triton); any device on the reference
    backend. Differentiable in every tensor argument (first order).
    """
    check_tensor(input, "input")
    # Stock nn.LSTM runs in the autocast dtype on both devices (cuDNN's and oneDNN's RNN ops are on
    # autocast's lower-precision lists); unlike the cell, which stays float32 on CPU.
    args = autocast_args((input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), input.device, ("cuda", "cpu"))
    call = (*args, bool(reverse))
    if torch.compiler.is_compiling():
        _check_arguments(*args, check_values=False)
    return CHOOSER.pick(args[0].device, call, needs_workspace(args)).run(*call)


# ------------------------------------------------------------------------------------ candidates
# Every way to run a call, in order of preference when nothing was measured (BIGKERNELS_TUNE=off,
# a forced backend, an untuned trace): bigkernels/_chooser.py picks among them.
def _own_kernel(op, path: Optional[int] = None):
    def run(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
        args = (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        extra = (path,) if path is not None else ()
        output, h_n, c_n, _, _ = call_checked(op, (*args, reverse, needs_workspace(args), *extra), _check_arguments, args)
        return output, h_n, c_n

    return run


def _stock(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """torch's own LSTM kernel (oneDNN on CPU, cuDNN on CUDA) for this one layer and direction. The
    reverse direction of padded input runs on the time-flipped sequence."""
    params = [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None else []) + ([w_hr] if w_hr is not None else [])
    hx = (h0.unsqueeze(0), c0.unsqueeze(0))
    train = needs_workspace((input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    if batch_sizes is not None:
        output, h_n, c_n = torch.lstm(input, batch_sizes, hx, params, b_ih is not None, 1, 0.0, train, False)
    else:
        x = input.flip(0) if reverse else input
        output, h_n, c_n = torch.lstm(x, hx, params, b_ih is not None, 1, 0.0, train, False, False)
        if reverse:
            output = output.flip(0)
    return output, h_n[0], c_n[0]


def _reference(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    args = (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    _check_arguments(*args)
    return reference.lstm_layer(*args, reverse)


# BIGKERNELS_LSTM_CPU_PATH values, each pinning one candidate: the recurrence (fused, generic) and
# the GEMM provider (MKL, or "+onednn": oneDNN, csrc/cpu/lstm_onednn_gemm.h).
CPU_PATHS = ("fused", "generic", "fused+onednn", "generic+onednn")
# Read once: a build-time constant, and Dynamo refuses to trace torch.backends' functions.
_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def _forced_cpu_path() -> Optional[str]:
    """BIGKERNELS_LSTM_CPU_PATH=fused|generic|fused+onednn|generic+onednn (tests, benchmarks) pins
    our CPU path, read per call."""
    return os.environ.get("BIGKERNELS_LSTM_CPU_PATH") or None


def _pinned_elsewhere(path: str) -> Optional[str]:
    """Why a candidate for `path` (one of CPU_PATHS) may not run: the env var pins another one."""
    forced = _forced_cpu_path()
    return f"BIGKERNELS_LSTM_CPU_PATH={forced}" if forced not in (None, path) else None


def _fused_reason(input, w_hr, c0) -> Optional[str]:
    if input.dtype != torch.float32 or w_hr is not None or c0.dim() != 2 or 0 in c0.shape:
        return "the fused recurrence takes float32 without projection and a non-empty state"
    return None


def _onednn_reason(input) -> Optional[str]:
    if input.dtype != torch.float32:
        return f"the oneDNN GEMM provider takes float32, got {input.dtype}"
    if not _HAS_ONEDNN:
        return "this torch has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    return None


def _fused_supports(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse) -> Optional[str]:
    return _pinned_elsewhere("fused") or _fused_reason(input, w_hr, c0)


def _generic_supports(*args) -> Optional[str]:
    return _pinned_elsewhere("generic")


def _fused_onednn_supports(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse) -> Optional[str]:
    return _pinned_elsewhere("fused+onednn") or _fused_reason(input, w_hr, c0) or _onednn_reason(input)


def _generic_onednn_supports(input, *rest) -> Optional[str]:
    return _pinned_elsewhere("generic+onednn") or _onednn_reason(input)


def _stock_supports(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse) -> Optional[str]:
    if _forced_cpu_path() is not None:
        return f"BIGKERNELS_LSTM_CPU_PATH={_forced_cpu_path()} pins our kernel"
    if batch_sizes is not None and reverse:
        return "torch's packed LSTM runs the reverse direction only inside a bidirectional call"
    if input.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"unsupported dtype {input.dtype}"
    return None


def _signature(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse) -> tuple:
    return (tuple(input.shape), input.dtype, batch_sizes is None, tuple(c0.shape), tuple(h0.shape), tuple(w_ih.shape),
            w_ih.dtype, tuple(w_hh.shape), b_ih is None, None if w_hr is None else tuple(w_hr.shape), reverse,
            _forced_cpu_path())


def _bucket(sig: tuple) -> tuple:
    """Sequence length and batch in buckets (sizes between them choose alike); widths exact."""
    shape, dtype, padded, c0_shape, _, _, _, _, no_bias, w_hr_shape, reverse, forced_path = sig
    steps = shape[0] if padded else 0
    batch = c0_shape[0] if len(c0_shape) == 2 else 0
    hidden = c0_shape[-1] if c0_shape else 0
    return (size_bucket(steps), size_bucket(batch), shape[-1], hidden, w_hr_shape, dtype, padded, no_bias, reverse,
            forced_path)


_TORCH_LSTM = torch.ops.bigkernels.lstm.default if _extension.AVAILABLE else None
CHOOSER = Chooser(
    OP,
    [
        Candidate("cpu", "cpu", _own_kernel(_TORCH_LSTM, 0), tuned=False),  # C++'s static path choice
        Candidate("cpu.fused", "cpu", _own_kernel(_TORCH_LSTM, 1), _fused_supports),
        Candidate("cpu.generic", "cpu", _own_kernel(_TORCH_LSTM, 2), _generic_supports),
        Candidate("cpu.fused.onednn", "cpu", _own_kernel(_TORCH_LSTM, 5), _fused_onednn_supports),
        Candidate("cpu.generic.onednn", "cpu", _own_kernel(_TORCH_LSTM, 6), _generic_onednn_supports),
        Candidate("cuda", "cuda", _own_kernel(_TORCH_LSTM)),
        Candidate("triton", "triton", _own_kernel(torch.ops.bigkernels.lstm_triton.default)),
        Candidate("stock", "stock", _stock, _stock_supports),
        Candidate("reference", "reference", _reference),
    ],
    signature=_signature,
    bucket=_bucket,
    check=lambda *call: _check_arguments(*call[:-1]),
)
