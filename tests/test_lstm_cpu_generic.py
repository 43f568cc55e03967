"""The generic CPU path of bigkernels::lstm (csrc/common/lstm_layer.h with csrc/cpu/lstm_step_gemm.h),
forced with BIGKERNELS_LSTM_CPU_PATH=generic, where its newer parts run: the per-step recurrent GEMM
against MKL's packed w_hh (float32, batch >= PackedStepGemm::kMinPackedRows = 8; packed sequences'
shorter steps fall back to ATen) and the input projection computed a few steps at a time
(kProjectionChunkBytes = 4 MiB: the large cases below span several chunks, which the fused path
shares). Outputs, final states and every gradient against the float64 reference and stock
torch.lstm in float32 (the DESIGN.md rule), padded and packed, forward and reverse."""
from __future__ import annotations

import pytest
import torch

from test_lstm_cpu_recurrent import (ARGS, ONEDNN, ONEDNN_CASES, assert_layer_matches, make_case, our_layer,
                                     path_layer, reference_layer, run)


def check_against_reference(seq, batch, input_size, hidden, packed, reverse, bias, seed, layer=None, grad=True):
    case, batch_sizes = make_case(seq, batch, input_size, hidden, packed, bias, seed=seed)
    upstream = None
    if grad:
        outs64, _ = run(reference_layer, case, batch_sizes, reverse, torch.float64)
        g = torch.Generator().manual_seed(seed + 1)
        upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs64]
    assert_layer_matches(case, batch_sizes, reverse, upstream, layer=layer)


@pytest.mark.parametrize("batch, hidden", [(8, 7), (9, 65), (17, 129)], ids=lambda v: str(v))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_packed_step_gemm(batch, hidden, packed, reverse, monkeypatch, poison_empty):
    monkeypatch.setenv("BIGKERNELS_LSTM_CPU_PATH", "generic")
    check_against_reference(5, batch, 5, hidden, packed, reverse, bias=hidden != 65, seed=batch * 100 + hidden)


@pytest.mark.parametrize("path", ["generic", "fused"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_input_projection_in_several_chunks(path, packed, reverse, monkeypatch, poison_empty):
    # One step's float32 pre-activations are 130 x 4*257 x 4 B = 534 KB: 7 steps per 4 MiB chunk, so
    # 16 steps take three chunks (more, with a ragged batch's shorter steps packed together).
    monkeypatch.setenv("BIGKERNELS_LSTM_CPU_PATH", path)
    check_against_reference(16, 130, 5, 257, packed, reverse, bias=True, seed=17)


def test_inference_chunks_match_training_forward(poison_empty):
    """need_workspace=False (one reused chunk buffer) gives bit-identical outputs to the training
    forward (the chunks written into the workspace), on both paths."""
    case, batch_sizes = make_case(16, 130, 5, 257, True, True, seed=23)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (case[k].float() for k in ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"))
    with pytest.MonkeyPatch.context() as mp:
        for path in ("generic", "fused"):
            mp.setenv("BIGKERNELS_LSTM_CPU_PATH", path)
            for reverse in (False, True):
                train = torch.ops.bigkernels.lstm(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse, True)
                infer = torch.ops.bigkernels.lstm(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse, False)
                for a, b in zip(infer[:3], train[:3]):
                    torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------- path 6: oneDNN input projection and per-step recurrent GEMMs
@ONEDNN
@pytest.mark.parametrize("seq, batch, hidden", ONEDNN_CASES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_generic_onednn_matches_reference_and_stock(seq, batch, hidden, packed, reverse, grad, poison_empty):
    # Packed: the shorter steps run fewer rows than oneDNN's weight layout was chosen for.
    check_against_reference(seq, batch, 5, hidden, packed, reverse, bias=hidden != 63,
                            seed=seq * 100 + batch + hidden, layer=path_layer(6), grad=grad)


@ONEDNN
def test_generic_onednn_with_projection(poison_empty):
    """proj_size: the generic path's recurrent GEMM multiplies [n, P] @ w_hh^T, P < H, on oneDNN."""
    from lstm_cases import make_case as make_layer_case
    from test_lstm_cpu_recurrent import stock_lstm_layer
    from numerics import assert_matches

    case, batch_sizes = make_layer_case(5, 7, 5, 63, 17, [5, 4, 4, 3, 2, 2, 1], bias=True, seed=41)
    names = ARGS + ("w_hr",)

    def call(dtype, fn):
        args = {k: case[k].to(dtype).requires_grad_() for k in names}
        outs = fn(*(args[k] for k in names))
        g = torch.Generator().manual_seed(43)
        up = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype) for o in outs]
        grads = torch.autograd.grad(outs, [args[k] for k in names], up)
        return outs, grads

    def stock(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        return stock_lstm_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, False)

    def ours(*a):
        return torch.ops.bigkernels.lstm(a[0], batch_sizes, *a[1:], False, True, 6)[:3]

    ref, ref_g = call(torch.float64, lambda *a: reference_layer_proj(batch_sizes, *a))
    got, got_g = call(torch.float32, ours)
    st, st_g = call(torch.float32, stock)
    for name, o, s, r in zip(("output", "h_n", "c_n"), got, st, ref):
        assert_matches(name, o, s, r)
    for name, o, s, r in zip(names, got_g, st_g, ref_g):
        assert_matches(f"grad {name}", o, s, r)


def reference_layer_proj(batch_sizes, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
    from bigkernels import reference
    return reference.lstm_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, False)


@ONEDNN
def test_generic_onednn_env_pins_path_6(monkeypatch, poison_empty):
    """BIGKERNELS_LSTM_CPU_PATH=generic+onednn through the public function runs what path 6 runs."""
    case, batch_sizes = make_case(5, 9, 5, 65, True, True, seed=37)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = [case[k].float() for k in ARGS]
    direct = torch.ops.bigkernels.lstm(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, True, False, 6)
    monkeypatch.setenv("BIGKERNELS_LSTM_CPU_PATH", "generic+onednn")
    public = our_layer(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, True)
    for a, b in zip(public, direct[:3]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
