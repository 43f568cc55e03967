"""The end-to-end model cases of the benchmark suite (bigkernels/bench/models.py): formulas,
registry, and a tiny run of every model and mode through the harness. Not speed."""
from __future__ import annotations

import pytest
import torch

import bigkernels
from bigkernels.bench import cases as registry
from bigkernels.bench import models, runner, timing
from bigkernels.bench.cases import Case


# Tiny models: see the one_thread fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = timing.Budget(target_s=0.005, min_samples=2, warmup_s=0.001)
TINY_SHAPES = {
    "e2e_cnn": {"B": 2, "C": 4, "S": 8},
    "e2e_lstm": {"B": 3, "T": 5, "H": 8},
    "e2e_transformer": {"B": 2, "T": 6, "D": 8},
}
OPS = tuple(TINY_SHAPES)


def test_registered_with_their_own_bench_objects():
    assert registry.get_op("e2e_cnn") is models.CNN_BENCH
    assert registry.get_op("e2e_lstm") is models.LSTM_BENCH
    assert registry.get_op("e2e_transformer") is models.TRANSFORMER_BENCH
    quick = registry.select_cases(list(OPS), device="cpu")
    # One quick shape per model, two for the CNN (the tiny SmallCNN and SmallResNet), two modes.
    assert len(quick) == 4 * 2 and {c.mode for c in quick} == {"fwd", "fwd+bwd"}
    full = registry.select_cases(list(OPS), device="cpu", full=True)
    assert {c.id for c in quick} < {c.id for c in full}
    assert {c.dtype for c in registry.select_cases(list(OPS), device="cuda")} == {torch.bfloat16}


def test_flops_by_hand():
    # CNN B=1, C=1, S=2, 10 classes: convs 2·1·3·9·4 + 2·1·1·9·4 + 2·2·1·9·1 = 216 + 72 + 36, head 2·2·10.
    assert models.forward_flops("e2e_cnn", {"B": 1, "C": 1, "S": 2}) == 216 + 72 + 36 + 40
    # LSTM B=1, T=1, H=1, 16 classes: two layers of 2·4·2 = 16, head 2·16.
    assert models.forward_flops("e2e_lstm", {"B": 1, "T": 1, "H": 1}) == 2 * 16 + 32
    # Encoder B=1, T=2, D=1: per layer 2·2·12 + 4·4 = 64, two layers, head 2·16.
    assert models.forward_flops("e2e_transformer", {"B": 1, "T": 2, "D": 1}) == 2 * 64 + 32
    case = Case("e2e_lstm", {"B": 1, "T": 1, "H": 1}, torch.float32, "fwd+bwd", "cpu")
    assert models.flops(case) == 3 * 64


def test_bytes_count_parameters_and_their_gradients():
    fwd = Case("e2e_lstm", TINY_SHAPES["e2e_lstm"], torch.float32, "fwd", "cpu")
    train = Case("e2e_lstm", TINY_SHAPES["e2e_lstm"], torch.float32, "fwd+bwd", "cpu")
    params = sum(p.numel() for p in models.stock_model(fwd).parameters())
    assert models.bytes_moved(fwd) == 4 * (params + 3 * 16)
    assert models.bytes_moved(train) == 4 * (2 * params + 3 * 16)


def test_both_providers_hold_the_same_weights_and_the_lstm_is_swapped():
    case = Case("e2e_lstm", TINY_SHAPES["e2e_lstm"], torch.float32, "fwd", "cpu")
    inputs = models.make_inputs(case)
    stock = models._built(case, inputs, torch.float32)
    optimized = models._optimized(models._built(case, inputs, torch.float32))
    assert isinstance(optimized.lstm, bigkernels.nn.LSTM) and not optimized.training
    for a, b in zip(stock.parameters(), optimized.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_tiny_run_through_the_harness(op, mode):
    case = Case(op, TINY_SHAPES[op], torch.float32, mode, "cpu")
    rows, skipped = runner.run_case(case, False, TINY, {"device_name": "test"})
    assert skipped == {}
    assert [r.provider for r in rows] == [models.OPTIMIZED, models.STOCK]
    for row in rows:
        assert row.status == "ok", row.error
        assert row.max_abs_err < 1e-4 and row.peak_mem_mib is not None and row.median_ms > 0
    assert rows[1].speedup_vs_torch == 1.0


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_tiny_resnet_case_runs_and_is_swapped(mode):
    """e2e_cnn R=1 (SmallResNet): every conv → BN [→ ReLU] run of its branches becomes a
    Conv2dBNAct, and the case runs through the harness within the reference tolerance."""
    shape = {"B": 2, "C": 4, "S": 9, "R": 1}
    case = Case("e2e_cnn", shape, torch.float32, mode, "cpu")
    inputs = models.make_inputs(case)
    optimized = models._optimized(models._built(case, inputs, torch.float32))
    fused = [m for m in optimized.modules() if isinstance(m, bigkernels.nn.Conv2dBNAct)]
    assert len(fused) == 6  # stem, 2 + 2 branch convs, the projection shortcut
    rows, skipped = runner.run_case(case, False, TINY, {"device_name": "test"})
    assert skipped == {}
    for row in rows:
        assert row.status == "ok", row.error
        assert row.max_abs_err < 1e-4
    assert models.forward_flops("e2e_cnn", shape) > 0
