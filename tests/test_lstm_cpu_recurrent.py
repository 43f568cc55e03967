"""The fused float32 CPU recurrence of bigkernels::lstm (csrc/cpu/lstm_recurrent.cpp), forced on with
BIGKERNELS_LSTM_CPU_PATH=fused whatever the size thresholds say: outputs, final states, workspace and
every gradient against the float64 reference and stock torch.lstm in float32 (the DESIGN.md rule),
over odd sizes, padded and packed, forward and reverse, with and without biases and the workspace.
Its workspace is interchangeable with the generic path's, both ways."""
from __future__ import annotations

import pytest
import torch

import bigkernels  # noqa: F401  (registers the ops)
from bigkernels import reference
from lstm_cases import make_case as make_layer_case, stock_lstm_layer
from numerics import assert_matches

ARGS = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")
HIDDEN = (1, 7, 65, 129)
BATCH = (1, 3, 17)


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("BIGKERNELS_LSTM_CPU_PATH", "fused")


def make_case(seq, batch, input_size, hidden, packed, bias, seed):
    """lstm_cases.make_case's layer without projection; packed with ragged random lengths, longest
    first (PackedSequence order), the longest running every step."""
    lengths = None
    if packed:
        g = torch.Generator().manual_seed(seed)
        lengths = sorted(torch.randint(1, seq + 1, (batch,), generator=g).tolist(), reverse=True)
        lengths[0] = seq
    case, batch_sizes = make_layer_case(seq, batch, input_size, hidden, 0, lengths, bias=bias, seed=seed)
    del case["w_hr"]
    return case, batch_sizes


def stock_layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    return stock_lstm_layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse)


def reference_layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    return reference.lstm_layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse)


def our_layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    return bigkernels.nn.functional.lstm_layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse)


def run(fn, case, batch_sizes, reverse, dtype, upstream=None):
    """Outputs (and, given upstream gradients, the gradient of every tensor argument)."""
    args = {k: (v.to(dtype).requires_grad_(upstream is not None) if v is not None else None) for k, v in case.items()}
    with torch.set_grad_enabled(upstream is not None):
        outs = fn(args["input"], batch_sizes, args["h0"], args["c0"], args["w_ih"], args["w_hh"],
                  args["b_ih"], args["b_hh"], reverse)
    if upstream is None:
        return outs, {}
    names = [k for k in ARGS if args[k] is not None]
    grads = torch.autograd.grad(outs, [args[k] for k in names], [u.to(dtype) for u in upstream])
    return outs, dict(zip(names, grads))


CASES = [
    pytest.param(seq, batch, hidden, packed, id=f"T{seq}xB{batch}xH{hidden}" + ("-packed" if packed else ""))
    for seq in (1, 5)
    for batch in BATCH
    for hidden in HIDDEN
    for packed in (False, True)
    if not (packed and seq == 1)
]


@pytest.mark.parametrize("seq, batch, hidden, packed", CASES)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_fused_matches_reference_and_stock(seq, batch, hidden, packed, reverse, grad, fused, poison_empty):
    bias = (HIDDEN.index(hidden) + BATCH.index(batch)) % 2 == 0  # with and without biases, over the grid
    case, batch_sizes = make_case(seq, batch, 5, hidden, packed, bias, seed=seq * 1000 + batch * 10 + hidden)
    outs64, _ = run(reference_layer, case, batch_sizes, reverse, torch.float64)
    upstream = None
    if grad:
        g = torch.Generator().manual_seed(7)
        upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs64]
    assert_layer_matches(case, batch_sizes, reverse, upstream)


def path_layer(path):
    """The op itself on one schema path (1 fused, 2 generic, + 4 oneDNN GEMMs), differentiable (its C++
    autograd runs the backward on the same path)."""
    def layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
        need_workspace = torch.is_grad_enabled()
        return torch.ops.bigkernels.lstm(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse,
                                         need_workspace, path)[:3]
    return layer


def assert_layer_matches(case, batch_sizes, reverse, upstream, layer=None):
    """Ours (float32; `layer`, default the public function) against the float64 reference and stock
    torch.lstm (float32) by the DESIGN rule: outputs, final states and, when `upstream` gradients are
    given, every input gradient."""
    ref, ref_grads = run(reference_layer, case, batch_sizes, reverse, torch.float64, upstream)
    ours, our_grads = run(layer or our_layer, case, batch_sizes, reverse, torch.float32, upstream)
    stock, stock_grads = run(stock_layer, case, batch_sizes, reverse, torch.float32, upstream)
    for name, o, s, r in zip(("output", "h_n", "c_n"), ours, stock, ref):
        assert_matches(name, o, s, r)
    for name, r in ref_grads.items():
        assert_matches(f"grad {name}", our_grads[name], stock_grads[name], r)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_workspace_interchangeable_with_generic_path(packed, reverse, monkeypatch, poison_empty):
    """Each path's workspace (activated gates, cells) feeds the other path's backward."""
    case, batch_sizes = make_case(5, 17, 5, 65, packed, True, seed=3)
    args = [case[k].float() if case[k] is not None else None for k in ARGS]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
    g = torch.Generator().manual_seed(11)
    results = {}
    for fwd_path in ("fused", "generic"):
        monkeypatch.setenv("BIGKERNELS_LSTM_CPU_PATH", fwd_path)
        out, h_n, c_n, gates, cells = torch.ops.bigkernels.lstm(
            x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse, True)
        upstream = [torch.randn(t.shape, generator=g) for t in (out, h_n, c_n)] if not results else results["up"]
        results["up"] = upstream
        for bwd_path in ("fused", "generic"):
            monkeypatch.setenv("BIGKERNELS_LSTM_CPU_PATH", bwd_path)
            grads = torch.ops.bigkernels.lstm_backward(
                *upstream, x, batch_sizes, h0, c0, w_ih, w_hh, None, reverse, out, gates, cells, [True, True, True])
            results[fwd_path, bwd_path] = (out, h_n, c_n, gates, cells) + tuple(grads[:6])
    base = results["generic", "generic"]
    for key in (("fused", "fused"), ("fused", "generic"), ("generic", "fused")):
        for a, b in zip(results[key], base):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_no_workspace_forward_matches(fused, poison_empty):
    """Inference (need_workspace=False) carries c in place: same outputs as with the workspace."""
    case, batch_sizes = make_case(5, 17, 5, 129, True, True, seed=5)
    args = [case[k].float() if case[k] is not None else None for k in ARGS]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
    for reverse in (False, True):
        with_ws = torch.ops.bigkernels.lstm(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse, True)
        without = torch.ops.bigkernels.lstm(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse, False)
        for a, b in zip(without[:3], with_ws[:3]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert without[3].numel() == 0 and without[4].numel() == 0


def test_projection_falls_back_to_generic_path(fused):
    """proj_size is not fused: with the path forced it still runs (the generic path) and is right."""
    g = torch.Generator().manual_seed(0)
    T, B, I, H, P = 4, 3, 5, 9, 4
    x, h0, c0 = torch.randn(T, B, I, generator=g), torch.randn(B, P, generator=g), torch.randn(B, H, generator=g)
    w_ih, w_hh, w_hr = torch.randn(4 * H, I, generator=g), torch.randn(4 * H, P, generator=g), torch.randn(P, H, generator=g)
    out, h_n, c_n, _, _ = torch.ops.bigkernels.lstm(x, None, h0, c0, w_ih, w_hh, None, None, w_hr, False, False)
    ref = reference.lstm_layer(x.double(), None, h0.double(), c0.double(), w_ih.double(), w_hh.double(),
                               None, None, w_hr.double(), False)
    for a, r in zip((out, h_n, c_n), ref):
        torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_batch_split_forward(packed, reverse, fused, poison_empty):
    """From batch 8, at hidden 256 (w_hh of 1 MiB), the forward splits the batch (not the panels)
    across the threads, and from batch 16 the backward too (splits_batch in lstm_recurrent.cpp):
    packed sequences change the active rows per step, so each thread's share shrinks (or, reversed,
    grows) unevenly; batch 17 splits unevenly. With the workspace (then every gradient) and without it."""
    case, batch_sizes = make_case(6, 17, 5, 256, packed, True, seed=21)
    g = torch.Generator().manual_seed(13)
    ref, _ = run(reference_layer, case, batch_sizes, reverse, torch.float64)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ref]
    assert_layer_matches(case, batch_sizes, reverse, upstream)
    args = [case[k].float() if case[k] is not None else None for k in ARGS]
    with_ws = torch.ops.bigkernels.lstm(*args[:1], batch_sizes, *args[1:], None, reverse, True)
    without = torch.ops.bigkernels.lstm(*args[:1], batch_sizes, *args[1:], None, reverse, False)
    for a, b in zip(without[:3], with_ws[:3]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("split", ["batch", "panels"])
@pytest.mark.parametrize("seq, batch, hidden, packed", [(5, 3, 65, True), (4, 9, 33, False), (5, 17, 7, True)],
                         ids=["T5xB3xH65-packed", "T4xB9xH33", "T5xB17xH7-packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_forced_split(split, seq, batch, hidden, packed, reverse, fused, monkeypatch, poison_empty):
    """BIGKERNELS_LSTM_CPU_SPLIT forces either split of the work over the threads, forward and backward,
    whatever the sizes say: batch rows (uneven shares, a thread with rows some steps do not run) or
    panels (a panel split of 1-5 panels), every gradient."""
    monkeypatch.setenv("BIGKERNELS_LSTM_CPU_SPLIT", split)
    case, batch_sizes = make_case(seq, batch, 5, hidden, packed, True, seed=batch * 7 + hidden)
    g = torch.Generator().manual_seed(5)
    ref, _ = run(reference_layer, case, batch_sizes, reverse, torch.float64)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ref]
    assert_layer_matches(case, batch_sizes, reverse, upstream)


# ------------------------------------------------------------------ path 5: oneDNN input projection
ONEDNN = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
# Batch 1 and odd sizes; the last spans several input-projection chunks (see
# test_lstm_cpu_generic.test_input_projection_in_several_chunks), so the last, shorter chunk runs on
# the weight oneDNN laid out for the longer ones.
ONEDNN_CASES = [pytest.param(5, 1, 7, id="T5xB1xH7"), pytest.param(5, 7, 63, id="T5xB7xH63"),
                pytest.param(16, 130, 257, id="T16xB130xH257")]


@ONEDNN
@pytest.mark.parametrize("seq, batch, hidden", ONEDNN_CASES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_fused_onednn_matches_reference_and_stock(seq, batch, hidden, packed, reverse, grad, poison_empty):
    case, batch_sizes = make_case(seq, batch, 5, hidden, packed, bias=hidden != 63, seed=seq * 100 + batch + hidden)
    upstream = None
    if grad:
        outs64, _ = run(reference_layer, case, batch_sizes, reverse, torch.float64)
        g = torch.Generator().manual_seed(13)
        upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs64]
    assert_layer_matches(case, batch_sizes, reverse, upstream, layer=path_layer(5))


@ONEDNN
def test_fused_onednn_env_pins_path_5(monkeypatch, poison_empty):
    """BIGKERNELS_LSTM_CPU_PATH=fused+onednn through the public function runs what path 5 runs."""
    case, batch_sizes = make_case(5, 7, 5, 63, True, True, seed=31)
    args = [case[k].float() if case[k] is not None else None for k in ARGS]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
    direct = torch.ops.bigkernels.lstm(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, False, 5)
    monkeypatch.setenv("BIGKERNELS_LSTM_CPU_PATH", "fused+onednn")
    public = our_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, False)
    for a, b in zip(public, direct[:3]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("path", [-1, 3, 4, 7, 8, 13])
def test_invalid_path_refused(path):
    case, batch_sizes = make_case(3, 2, 5, 7, False, True, seed=1)
    args = [case[k].float() if case[k] is not None else None for k in ARGS]
    with pytest.raises(ValueError, match=f"path must be 0 .*got {path}"):
        torch.ops.bigkernels.lstm(args[0], batch_sizes, *args[1:], None, False, True, path)


@ONEDNN
@pytest.mark.parametrize("path", [5, 6])
def test_onednn_paths_refuse_non_float32(path):
    case, batch_sizes = make_case(3, 2, 5, 7, False, True, seed=1)
    args = [case[k].double() if case[k] is not None else None for k in ARGS]
    with pytest.raises(ValueError, match=f"path {path} .*oneDNN.* float32"):
        torch.ops.bigkernels.lstm(args[0], batch_sizes, *args[1:], None, False, True, path)


@ONEDNN
@pytest.mark.parametrize("path", [5, 6])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_opcheck_onednn_paths(path, packed, reverse):
    case, batch_sizes = make_case(4, 3, 5, 7, packed, True, seed=path)
    args = [case[k].float().requires_grad_() if case[k] is not None else None for k in ARGS]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
    torch.library.opcheck(torch.ops.bigkernels.lstm.default,
                          (x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse, True, path),
                          atol=1e-4, rtol=1e-4)
