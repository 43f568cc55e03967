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

from test_lstm_cpu_recurrent import assert_layer_matches, make_case, reference_layer, run


def check_against_reference(seq, batch, input_size, hidden, packed, reverse, bias, seed):
    case, batch_sizes = make_case(seq, batch, input_size, hidden, packed, bias, seed=seed)
    outs64, _ = run(reference_layer, case, batch_sizes, reverse, torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs64]
    assert_layer_matches(case, batch_sizes, reverse, upstream)


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
