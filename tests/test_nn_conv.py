"""bigkernels.nn.Conv2d / Conv1d as drop-ins for the stock modules (same weights, padding modes,
state_dict both ways, gradients), Conv2dBNAct, fuse_conv_bn and torch.compile of the modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigkernels
from bigkernels import reference
from bigkernels.nn import Conv1d, Conv2d, Conv2dBNAct, fuse_conv_bn


def _assert_same_params_grads(ours: nn.Module, stock: nn.Module) -> None:
    for (name, p), (_, q) in zip(ours.named_parameters(), stock.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=f"grad of {name}")


CONV2D_CONFIGS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=2, padding=(1, 0), bias=False),
    dict(kernel_size=3, padding="same", dilation=2, padding_mode="reflect"),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=3, padding=2, padding_mode="circular", groups=2),
    dict(kernel_size=3, padding=1, padding_mode="replicate"),
    dict(kernel_size=1, padding="valid"),
]


@pytest.mark.parametrize("config", CONV2D_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv2d_drop_in(config):
    torch.manual_seed(0)
    stock = nn.Conv2d(4, 6, dtype=torch.float64, **config)
    ours = Conv2d(4, 6, dtype=torch.float64, **config)
    assert list(ours.state_dict()) == list(stock.state_dict())
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_stock, y_ours = stock(x1), ours(x2)
    torch.testing.assert_close(y_ours, y_stock)
    g = torch.randn_like(y_stock)
    y_stock.backward(g)
    y_ours.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)
    _assert_same_params_grads(ours, stock)
    # And the other way round: our weights into a stock module.
    stock2 = nn.Conv2d(4, 6, dtype=torch.float64, **config)
    stock2.load_state_dict(ours.state_dict())
    torch.testing.assert_close(stock2(x), ours(x))


@pytest.mark.parametrize("activation", ["relu", "gelu", "leaky_relu", "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv2d_activation_and_residual(activation, channels_last):
    torch.manual_seed(1)
    stock = nn.Conv2d(5, 7, 3, stride=2, padding=1, dtype=torch.float64)
    ours = Conv2d(5, 7, 3, stride=2, padding=1, dtype=torch.float64, activation=activation, negative_slope=0.1)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(3, 5, 11, 10, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn(3, 7, 6, 5, dtype=torch.float64)
    expected = reference.activation(stock(x) + r, activation, 0.1)
    torch.testing.assert_close(ours(x, r), expected)
    torch.testing.assert_close(ours(x), reference.activation(stock(x), activation, 0.1))
    assert f"activation='{activation}'" in repr(ours)


def test_conv2d_float32_and_unbatched():
    torch.manual_seed(2)
    stock = nn.Conv2d(3, 4, 3, padding=1)
    ours = Conv2d(3, 4, 3, padding=1, activation="relu")
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(3, 8, 8)
    torch.testing.assert_close(ours(x), torch.relu(stock(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [dict(kernel_size=3, padding=1), dict(kernel_size=4, padding="same", padding_mode="reflect"),
                                    dict(kernel_size=5, stride=2, dilation=2, groups=2, padding=3, padding_mode="circular")])
def test_conv1d_drop_in(config):
    torch.manual_seed(3)
    stock = nn.Conv1d(4, 6, dtype=torch.float64, **config)
    ours = Conv1d(4, 6, dtype=torch.float64, **config)
    ours.load_state_dict(stock.state_dict())
    x1 = torch.randn(2, 4, 19, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y_stock, y_ours = stock(x1), ours(x2)
    torch.testing.assert_close(y_ours, y_stock)
    g = torch.randn_like(y_stock)
    y_stock.backward(g)
    y_ours.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)
    _assert_same_params_grads(ours, stock)
    stock.load_state_dict(ours.state_dict())
    act = Conv1d(4, 6, dtype=torch.float64, activation="silu", **config)
    act.load_state_dict(stock.state_dict())
    r = torch.randn_like(y_stock)
    torch.testing.assert_close(act(x1.detach(), r), F.silu(stock(x1.detach()) + r))


def _stock_block(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    return lambda x, r=None: torch.relu(bn(conv(x)) + (0 if r is None else r))


def test_conv2d_bn_act_training_and_eval():
    torch.manual_seed(4)
    block = Conv2dBNAct(4, 6, 3, padding=1, dtype=torch.float64)
    stock_conv = nn.Conv2d(4, 6, 3, padding=1, bias=False, dtype=torch.float64)
    stock_bn = nn.BatchNorm2d(6, dtype=torch.float64)
    stock_conv.load_state_dict(block.conv.state_dict())
    stock = _stock_block(stock_conv, stock_bn)
    assert set(block.state_dict()) == {f"conv.{k}" for k in stock_conv.state_dict()} | {f"bn.{k}" for k in stock_bn.state_dict()}
    for step in range(2):  # training: batch statistics, running stats updated like the stock pair
        x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
        r = torch.randn(3, 6, 7, 7, dtype=torch.float64)
        y_ours, y_stock = block(x, r), stock(x, r)
        torch.testing.assert_close(y_ours, y_stock)
        y_ours.sum().backward()
        y_stock.sum().backward()
    torch.testing.assert_close(block.bn.running_mean, stock_bn.running_mean)
    torch.testing.assert_close(block.bn.running_var, stock_bn.running_var)
    torch.testing.assert_close(block.conv.weight.grad, stock_conv.weight.grad)
    torch.testing.assert_close(block.bn.weight.grad, stock_bn.weight.grad)
    block.eval()
    stock_bn.eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    r = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(block(x, r), stock(x, r))  # eval: batch norm folded into one fused conv
    torch.testing.assert_close(block.fuse()(x, r), stock(x, r))


def _unfused_eval(block: Conv2dBNAct, x: torch.Tensor) -> torch.Tensor:
    """The eval block's maths without the module: stock conv, eval batch norm, activation."""
    z = F.batch_norm(F.conv2d(x, block.conv.weight, block.conv.bias, block.conv.stride, block.conv.padding),
                     block.bn.running_mean, block.bn.running_var, block.bn.weight, block.bn.bias, False, 0.0,
                     block.bn.eps)
    return reference.activation(z, block.activation)


def test_conv2d_bn_act_eval_fold_cache_invalidation():
    """Eval calls reuse the folded weight/bias; any change to a folded parameter, buffer, eps, the
    mode, or a dtype move refolds (each change is checked against the unfused maths)."""
    torch.manual_seed(7)
    block = Conv2dBNAct(3, 5, 3, padding=1, bias=True, dtype=torch.float64).eval()
    with torch.no_grad():
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)

    def check(what: str) -> None:
        with torch.no_grad():
            torch.testing.assert_close(block(x), _unfused_eval(block, x), msg=what)

    check("first call")
    cached = block._folded
    check("second call")
    assert block._folded is cached, "an unchanged block must reuse its folded weight"
    changes = {
        "conv.weight in place": lambda: block.conv.weight.mul_(1.5),
        "conv.bias in place": lambda: block.conv.bias.add_(0.25),
        "bn.weight in place": lambda: block.bn.weight.mul_(-2.0),
        "bn.bias in place": lambda: block.bn.bias.add_(1.0),
        "bn.running_mean in place": lambda: block.bn.running_mean.add_(0.5),
        "bn.running_var in place": lambda: block.bn.running_var.mul_(3.0),
        "bn.eps": lambda: setattr(block.bn, "eps", 0.5),
        "a new conv.weight": lambda: setattr(block.conv, "weight", nn.Parameter(torch.randn_like(block.conv.weight))),
        "a new running_var buffer": lambda: setattr(block.bn, "running_var", torch.rand(5, dtype=torch.float64) + 0.5),
        "load_state_dict": lambda: block.load_state_dict(
            {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in block.state_dict().items()}
            | {"bn.running_var": torch.rand(5, dtype=torch.float64) + 0.1}),
    }
    for what, change in changes.items():
        with torch.no_grad():
            change()
        check(what)
    # Training updates the running statistics; eval afterwards refolds.
    block.train()
    assert block._folded is None
    block(torch.randn(4, 3, 6, 7, dtype=torch.float64))
    block.eval()
    check("after a training step")
    # A dtype move refolds in the new dtype.
    check("before the move")
    block.float()
    assert block._folded is None
    x = x.float()
    with torch.no_grad():
        y = block(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _unfused_eval(block, x).detach(), rtol=1e-4, atol=1e-5)


def test_conv2d_bn_act_eval_with_grad_is_not_cached():
    """Eval with autograd on (frozen batch norm, fine-tuning): gradients reach the parameters every
    call, so no folded tensor (with its graph) is reused."""
    block = Conv2dBNAct(3, 4, 3, padding=1, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for _ in range(2):
        block.zero_grad()
        block(x).sum().backward()
        assert block.conv.weight.grad is not None and block.bn.weight.grad is not None
    assert block._folded is None
    with torch.inference_mode():
        torch.testing.assert_close(block(x), _unfused_eval(block, x))


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_fuse_conv_bn_matches_unfused_pair(activation, conv_bias):
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=conv_bias, dtype=torch.float64)
    bn = nn.BatchNorm2d(8, dtype=torch.float64)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    conv.eval()
    bn.eval()
    fused = fuse_conv_bn(conv, bn, activation=activation)
    assert isinstance(fused, Conv2d) and not fused.training
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    torch.testing.assert_close(fused(x), reference.activation(bn(conv(x)), activation))
    # float32 too, within float32 rounding of the folded weights.
    fused32 = fuse_conv_bn(conv.float(), bn.float(), activation=activation)
    torch.testing.assert_close(fused32(x.float()), reference.activation(bn(conv(x.float())), activation), atol=1e-5, rtol=1e-4)


def test_fuse_conv_bn_conv1d_and_errors():
    torch.manual_seed(6)
    conv, bn = nn.Conv1d(3, 5, 3, padding=1).double().eval(), nn.BatchNorm1d(5).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    fused = fuse_conv_bn(conv, bn)
    assert isinstance(fused, Conv1d)
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    torch.testing.assert_close(fused(x), bn(conv(x)))
    with pytest.raises(ValueError, match="cannot be folded"):
        fuse_conv_bn(Conv2d(3, 5, 3, activation="relu"), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="must equal conv.out_channels"):
        fuse_conv_bn(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(6))
    with pytest.raises(TypeError, match="conv must be"):
        fuse_conv_bn(nn.Linear(3, 5), nn.BatchNorm2d(5))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        Conv2d(3, 4, 3, activation="tanh")
    with pytest.raises(ValueError):  # stock check, kept
        Conv2d(3, 4, 3, groups=2)


def test_compile_fullgraph_module():
    torch._dynamo.reset()
    torch.manual_seed(7)
    model = nn.Sequential(Conv2d(3, 8, 3, padding=1, activation="relu"), Conv2d(8, 8, 1, activation="silu"))
    block = Conv2dBNAct(8, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)

    def run(x):
        return block(model(x)).sum()

    with bigkernels.use_backend("cpu"):
        compiled = torch.compile(run, fullgraph=True)
        loss_c = compiled(x)
        (gc,) = torch.autograd.grad(loss_c, [x])
        loss_e = run(x)
        (ge,) = torch.autograd.grad(loss_e, [x])
    torch.testing.assert_close(loss_c, loss_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gc, ge, atol=1e-4, rtol=1e-4)


def test_cached_call_arguments_follow_attribute_changes():
    """The module caches its normalised stride/padding/dilation; assigning new ones is seen."""
    torch.manual_seed(1)
    ours = Conv2d(3, 5, 3, padding=1, activation="relu", dtype=torch.float64)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    assert ours(x).shape == (2, 5, 9, 7)
    ours.padding, ours.stride = (0, 2), (2, 1)
    expected = torch.relu(F.conv2d(x, ours.weight, ours.bias, (2, 1), (0, 2)))
    torch.testing.assert_close(ours(x), expected)
    ours.padding_mode, ours._reversed_padding_repeated_twice = "reflect", [2, 2, 0, 0]
    expected = torch.relu(F.conv2d(F.pad(x, [2, 2, 0, 0], mode="reflect"), ours.weight, ours.bias, (2, 1)))
    torch.testing.assert_close(ours(x), expected)


class _TracedTensor(torch.Tensor):
    """A subclass whose __torch_function__ records the functions it sees."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("activation", [None, "relu"])
def test_cpu_fast_path_honours_torch_function(activation):
    """The eager CPU entry (bigkernels._C._conv) hands tensors with __torch_function__ to torch.ops /
    torch's conv2d, which honour it; results are unchanged."""
    torch.manual_seed(2)
    ours = Conv2d(4, 4, 3, padding=1, activation=activation)
    x = torch.randn(2, 4, 6, 6)
    _TracedTensor.seen = []
    y = ours(x.as_subclass(_TracedTensor))
    assert any("conv" in str(f) for f in _TracedTensor.seen), f"__torch_function__ was bypassed: {_TracedTensor.seen}"
    expected = reference.activation(F.conv2d(x, ours.weight, ours.bias, 1, 1), activation or "none")
    torch.testing.assert_close(y.as_subclass(torch.Tensor), expected)


def test_cpu_fast_path_bad_input_errors():
    """Bad input through the cached module path raises the precise errors of conv2d."""
    for activation in (None, "relu"):
        ours = Conv2d(3, 4, 3, activation=activation)
        with pytest.raises(ValueError, match="channel mismatch"):
            ours(torch.randn(1, 5, 8, 8))
        with pytest.raises(TypeError, match="input must be a torch.Tensor"):
            ours([[1.0]])
        with pytest.raises(ValueError, match="residual must have the output's shape"):
            ours(torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8))
        with pytest.raises(ValueError, match="smaller than the kernel"):
            ours(torch.randn(1, 3, 2, 8))
