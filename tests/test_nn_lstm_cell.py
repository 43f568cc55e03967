"""bigkernels.nn.LSTMCell as a drop-in for torch.nn.LSTMCell."""
from __future__ import annotations

import pytest
import torch

import bigkernels
from conftest import HAS_CUDA
from numerics import assert_matches

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pair(input_size=7, hidden_size=11, bias=True, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    stock = torch.nn.LSTMCell(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
    ours = bigkernels.nn.LSTMCell(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def test_is_a_stock_lstm_cell_with_the_same_state_dict():
    stock, ours = pair()
    assert isinstance(ours, torch.nn.LSTMCell)
    assert list(ours.state_dict()) == list(stock.state_dict()) == ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    assert repr(ours).endswith("LSTMCell(7, 11)")
    # And back: the stock module loads ours.
    fresh = torch.nn.LSTMCell(7, 11)
    fresh.load_state_dict(ours.state_dict())
    for a, b in zip(fresh.parameters(), stock.parameters()):
        assert torch.equal(a, b)


def test_constructor_matches_stock():
    ours = bigkernels.nn.LSTMCell(3, 4, bias=False, dtype=torch.float64)
    assert ours.bias_ih is None and ours.bias_hh is None
    assert ours.weight_ih.dtype == torch.float64 and ours.weight_ih.shape == (16, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_forward_backward_equal_stock(device, bias, batched, with_state):
    stock, ours = pair(bias=bias, device=device, seed=1)
    ref = torch.nn.LSTMCell(7, 11, bias=bias, dtype=torch.float64)
    ref.load_state_dict({k: v.double().cpu() for k, v in stock.state_dict().items()})
    shape = (5,) if batched else ()
    x = torch.randn(*shape, 7, device=device)
    hx = (torch.randn(*shape, 11, device=device), torch.randn(*shape, 11, device=device)) if with_state else None

    def go(module, dtype, dev):
        xi = x.to(dev, dtype).requires_grad_()
        hi = tuple(t.to(dev, dtype).requires_grad_() for t in hx) if hx else None
        h, c = module(xi, hi)
        (h.sum() * 2 + (c * c).sum()).backward()
        grads = [xi.grad] + ([t.grad for t in hi] if hi else []) + [p.grad for p in module.parameters()]
        return (h, c), grads

    ref_out, ref_grads = go(ref, torch.float64, "cpu")
    stock_out, stock_grads = go(stock, torch.float32, device)
    ours_out, ours_grads = go(ours, torch.float32, device)
    for name, o, s, r in zip(("h", "c"), ours_out, stock_out, ref_out):
        assert_matches(name, o, s, r)
    for i, (o, s, r) in enumerate(zip(ours_grads, stock_grads, ref_grads)):
        assert_matches(f"grad[{i}]", o, s, r)


def test_training_steps_track_stock():
    """A few SGD steps of a tiny sequence model: parameters stay equal to the stock cell's."""
    stock, ours = pair(seed=2)
    opt_s = torch.optim.SGD(stock.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    xs = torch.randn(6, 4, 7)
    for _ in range(3):
        for module, opt in ((stock, opt_s), (ours, opt_o)):
            opt.zero_grad()
            h = c = torch.zeros(4, 11)
            for x in xs:
                h, c = module(x, (h, c))
            (h ** 2).mean().backward()
            opt.step()
    for a, b in zip(stock.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compile_fullgraph_module():
    torch._dynamo.reset()
    _, ours = pair(seed=3)
    x = torch.randn(6, 3, 7)

    def unroll(xs):
        h = c = torch.zeros(3, 11)
        for x in xs:
            h, c = ours(x, (h, c))
        return h

    compiled = torch.compile(unroll, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    grad_compiled = ours.weight_hh.grad.clone()
    ours.zero_grad()
    expected = unroll(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_compiled, ours.weight_hh.grad)


def test_bad_input_messages():
    _, ours = pair()
    with pytest.raises(ValueError, match="input_size: got 6, expected 7"):
        ours(torch.randn(2, 6))
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D"):
        ours(torch.randn(1, 2, 7))
    with pytest.raises(ValueError, match="hx must have shape"):
        ours(torch.randn(2, 7), (torch.randn(3, 11), torch.randn(3, 11)))
    with pytest.raises(TypeError, match="must have the dtype of input"):
        ours(torch.randn(2, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hx must be a tuple \(h, c\)"):
        ours(torch.randn(2, 7), torch.randn(2, 11))
