"""The examples in examples/ run end to end at their --tiny size (what CI can afford); their full
runs, with the accuracy each states, are documented in each file."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the examples import their sibling _common

    def load(name: str):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    # Tiny models: a second intra-op thread only adds contention (several times slower on a busy
    # 2-core CI machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "name, swapped",
    [
        pytest.param("train_cnn_digits", 3, marks=pytest.mark.skipif(
            importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn (its digits data set)")),
        ("train_lstm_classifier", 1),
        ("train_transformer_encoder", 2),
    ],
)
def test_example_runs_tiny(example, capsys, name, swapped):
    assert example(name).main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "stock: test accuracy" in out and "optimized: test accuracy" in out
    assert "bigkernels.optimize:" in out  # the swap report
    if swapped is not None:
        assert f"{swapped} layers swapped" in out
