"""bigkernels.optimize: the convolution rules (lone Conv2d/Conv1d, Conv2d → activation and
Conv2d → BatchNorm2d [→ activation] runs of an nn.Sequential) and the MultiheadAttention rule."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bigkernels
from numerics import assert_matches


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds contention on a busy 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),       # -> Conv2dBNAct(relu)
        nn.Conv2d(8, 8, 3, padding=1), nn.GELU(approximate="tanh"),          # -> Conv2d(gelu_tanh)
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),                               # -> Conv2dBNAct(None)
        nn.Conv2d(8, 4, 3, stride=2),                                        # -> Conv2d (lone)
        nn.Flatten(),
    )


def _outputs_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.ones_like(y))
    return [y, x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("training", [True, False])
def test_conv_runs_fuse_and_match_the_stock_model(training):
    torch.manual_seed(0)
    stock = _cnn().train(training)
    if not training:  # non-trivial running statistics to fold
        with torch.no_grad():
            for m in stock.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
    ref = copy.deepcopy(stock).double()
    report = bigkernels.optimize(stock, inplace=False)
    ours = report.model
    kinds = [type(m).__name__ for m in ours]
    assert kinds[:8] == ["Conv2dBNAct", "Identity", "Identity", "Conv2d", "Identity", "Conv2dBNAct", "Identity", "Conv2d"]
    assert isinstance(ours[0], bigkernels.nn.Conv2dBNAct) and ours[0].activation == "relu"
    assert ours[3].activation == "gelu_tanh" and ours[7].activation == "none"
    assert type(ours[0].bn) is nn.BatchNorm2d and type(stock[0]) is nn.Conv2d  # the stock model is untouched
    assert len(report.swapped) == 4 and report.left == []
    x = torch.randn(2, 3, 9, 9)
    for i, (o, s, r) in enumerate(zip(_outputs_and_grads(ours, x), _outputs_and_grads(copy.deepcopy(stock), x),
                                      _outputs_and_grads(ref, x.double()))):
        assert_matches(f"tensor {i}", o, s, r)


def test_fused_conv_state_dict_keeps_the_stock_keys_both_ways():
    torch.manual_seed(0)
    stock = _cnn().eval()
    saved = copy.deepcopy(stock.state_dict())
    before = _cnn().eval()
    conv_weight, bn = before[0].weight, before[1]
    ours = bigkernels.optimize(before).model
    assert ours is before and ours[0].bn is bn and ours[0].conv.weight is conv_weight  # the same objects
    assert list(ours.state_dict()) == list(saved)
    ours.load_state_dict(saved)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(ours(x), stock(x), rtol=1e-4, atol=1e-5)
    fresh = _cnn().eval()
    fresh.load_state_dict(ours.state_dict())
    torch.testing.assert_close(fresh(x), stock(x), rtol=1e-4, atol=1e-5)


def test_conv_patterns_left_with_reasons():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    seq[1].register_forward_hook(lambda *a: None)
    report = bigkernels.optimize(seq)
    assert "hooks attached to nn.ReLU" in report.left[0].reason
    off = bigkernels.optimize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), conv=False)
    assert off.swapped == [] and off.left[0].reason == "disabled (conv=False)"

    class Custom(nn.Module):  # forward order is not provable: only the lone conv rule applies
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3), nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(x))

    custom = bigkernels.optimize(Custom()).model
    assert type(custom.conv) is bigkernels.nn.Conv2d and custom.conv.activation == "none"
    assert type(custom.act) is nn.ReLU


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_swapped_and_matches(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    stock = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    ref = copy.deepcopy(stock).double()
    report = bigkernels.optimize(stock, inplace=False)
    ours = report.model
    assert [s.replacement for s in report.swapped] == ["bigkernels.nn.MultiheadAttention"] * 2
    assert isinstance(ours.layers[0].self_attn, bigkernels.nn.MultiheadAttention)
    assert type(stock.layers[0].self_attn) is nn.MultiheadAttention  # inplace=False: untouched
    x = torch.randn(3, 5, 16)
    for i, (o, s, r) in enumerate(zip(_outputs_and_grads(ours, x), _outputs_and_grads(copy.deepcopy(stock), x),
                                      _outputs_and_grads(ref, x.double()))):
        assert_matches(f"tensor {i}", o, s, r)
    fresh = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, 0.0, batch_first=batch_first), 2,
                                  enable_nested_tensor=False)
    fresh.load_state_dict(ours.state_dict())
    ours.load_state_dict(fresh.state_dict())
    attention = stock.layers[1].self_attn
    in_proj, out_proj = attention.in_proj_weight, attention.out_proj
    bigkernels.optimize(stock)
    assert stock.layers[1].self_attn.in_proj_weight is in_proj and stock.layers[1].self_attn.out_proj is out_proj


def test_a_conv_shared_outside_its_run_gets_a_plain_swap_there():
    conv = nn.Conv2d(3, 4, 3)
    model = nn.ModuleDict({"seq": nn.Sequential(conv, nn.ReLU()), "alone": conv})
    report = bigkernels.optimize(model)
    assert model["seq"][0].activation == "relu" and model["alone"].activation == "none"
    assert model["alone"].weight is model["seq"][0].weight is conv.weight
    assert len(report.swapped) == 2
