"""bigkernels.optimize: the module swap keeps weights (the same Parameter objects), devices, dtypes,
training mode and state_dict keys; outputs and gradients agree with the stock model within the
DESIGN.md rule; anything it leaves is reported with the reason."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bigkernels
from numerics import assert_matches


# Tiny models: see the one_thread fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


class Tagger(nn.Module):
    """An LSTM stack, a cell run over the steps, a shared cell used twice, and a head."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 7)
        self.lstm = nn.LSTM(7, 9, num_layers=2, batch_first=True, bidirectional=True, proj_size=4, dropout=dropout)
        self.cell = nn.LSTMCell(8, 6)
        self.blocks = nn.ModuleList([self.cell, nn.Sequential(nn.LSTMCell(6, 6, bias=False))])
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(torch.tanh(self.embed(x)))
        h = c = None
        for t in range(out.shape[1]):
            h, c = self.blocks[0](out[:, t], None if h is None else (h, c))
        h2, _ = self.blocks[1][0](h)
        return self.head(h2)


def _inputs(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(3, 7, 5, dtype=dtype)


def test_swaps_lstm_and_cells_keeping_parameters_and_mode():
    model = Tagger().eval()
    params_before = {name: p for name, p in model.named_parameters()}
    report = bigkernels.optimize(model)
    assert report.model is model
    assert isinstance(model.lstm, bigkernels.nn.LSTM)
    assert isinstance(model.cell, bigkernels.nn.LSTMCell)
    assert model.blocks[0] is model.cell, "a shared module must stay shared"
    assert isinstance(model.blocks[1][0], bigkernels.nn.LSTMCell)
    assert {s.path for s in report.swapped} == {"lstm", "cell", "blocks.1.0"}
    assert report.left == []
    for name, p in model.named_parameters():
        assert p is params_before[name], f"{name} is not the same Parameter object"
    assert not model.lstm.training and not model.cell.training
    text = str(report)
    assert "3 swapped" in text and "nn.LSTM -> bigkernels.nn.LSTM" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_gradients_follow_the_accuracy_rule(dtype):
    stock = Tagger().to(dtype)
    ref64 = copy.deepcopy(stock).double()
    report = bigkernels.optimize(stock, inplace=False)
    ours = report.model
    assert len(report.swapped) == 3 and not isinstance(stock.lstm, bigkernels.nn.LSTM)
    x = _inputs()
    outputs = {}
    for name, model, dt in (("ours", ours, dtype), ("stock", stock, dtype), ("ref", ref64, torch.float64)):
        xi = x.to(dt).clone().requires_grad_(True)
        y = model(xi)
        y.backward(torch.ones_like(y))
        outputs[name] = [y, xi.grad] + [p.grad for p in model.parameters()]
    for i, (o, s, r) in enumerate(zip(outputs["ours"], outputs["stock"], outputs["ref"])):
        assert_matches(f"tensor {i}", o, s, r)


def test_optimizer_made_before_the_swap_still_trains_the_model():
    torch.manual_seed(0)
    model = Tagger()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bigkernels.optimize(model)
    x = _inputs()
    model(x).sum().backward()
    before = model.head.weight.detach().clone()
    lstm_before = model.lstm.weight_ih_l0.detach().clone()
    opt.step()
    assert not torch.equal(model.head.weight, before)
    assert not torch.equal(model.lstm.weight_ih_l0, lstm_before)
    # The swapped model's flat weight list follows the step (RNNBase keeps one).
    torch.testing.assert_close(model(x), bigkernels.optimize(_load(twin, model)).model(x))


def _load(target: nn.Module, source: nn.Module) -> nn.Module:
    target.load_state_dict(source.state_dict())
    return target


def test_state_dicts_load_both_ways():
    stock = Tagger()
    saved_before = copy.deepcopy(stock.state_dict())
    optimized = bigkernels.optimize(Tagger()).model
    optimized.load_state_dict(saved_before)  # strict: same keys, same shapes
    assert list(optimized.state_dict()) == list(saved_before)
    x = _inputs()
    torch.testing.assert_close(optimized(x), stock(x), rtol=1e-5, atol=1e-5)
    fresh_stock = Tagger()
    fresh_stock.load_state_dict(optimized.state_dict())
    torch.testing.assert_close(fresh_stock(x), stock(x), rtol=1e-5, atol=1e-5)


def test_model_that_is_itself_a_layer():
    lstm = nn.LSTM(4, 5)
    report = bigkernels.optimize(lstm)
    assert isinstance(report.model, bigkernels.nn.LSTM) and report.model.weight_hh_l0 is lstm.weight_hh_l0
    assert [s.path for s in report.swapped] == [""]


def test_disabled_family_hooks_subclasses_and_dtypes_are_left_with_reasons():
    class MyLSTM(nn.LSTM):
        pass

    model = nn.ModuleDict({
        "hooked": nn.LSTMCell(3, 4),
        "sub": MyLSTM(3, 4),
        "fp16": nn.LSTM(3, 4).half(),
        "plain": nn.LSTM(3, 4),
    })
    model["hooked"].register_forward_hook(lambda *args: None)
    report = bigkernels.optimize(model)
    reasons = {left.path: left.reason for left in report.left}
    assert [s.path for s in report.swapped] == ["plain"]
    assert "hooks attached (forward_hooks)" in reasons["hooked"]
    assert "subclass of LSTM" in reasons["sub"]
    assert "float16 on cpu" in reasons["fp16"]
    assert type(model["sub"]) is MyLSTM and type(model["hooked"]) is nn.LSTMCell

    off = bigkernels.optimize(nn.Sequential(nn.LSTM(3, 4)), lstm=False)
    assert off.swapped == [] and off.left[0].reason == "disabled (lstm=False)"


def test_training_mode_and_dropout_are_kept():
    model = Tagger(dropout=0.5).train()
    bigkernels.optimize(model)
    assert model.lstm.training and model.lstm.dropout == 0.5
    x = _inputs()
    assert not torch.equal(model(x), model(x)), "dropout between layers must be active in training"
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_bad_model_is_a_type_error():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bigkernels.optimize("not a model")


def test_optimized_model_compiles_without_graph_breaks():
    model = nn.Sequential(nn.LSTMCell(4, 6))
    bigkernels.optimize(model)
    cell = model[0]
    x, h, c = torch.randn(2, 4), torch.randn(2, 6), torch.randn(2, 6)
    compiled = torch.compile(cell, fullgraph=True)
    torch.testing.assert_close(compiled(x, (h, c)), cell(x, (h, c)))
