"""bigkernels.optimize: swap the stock layers of a model for bigkernels' drop-in modules.

    report = bigkernels.optimize(model)      # in place; report.model is the model to use
    print(report)                            # what was swapped, and why anything was left

The swap is a small registry of rules, one per stock type (`SWAP_RULES`). A rule names the stock
type, the optimize() flag that enables it (conv / lstm / attention), why a given instance cannot be
swapped (an unsupported option, dtype or device) and how to build the replacement. The replacement
adopts the stock module's Parameter and buffer objects themselves (not copies), so an optimizer
built before the swap keeps working, devices and dtypes do not change, and state_dict keys stay the
same: checkpoints load both ways.

What is never swapped, whatever the rule says (each is reported with the reason):
  - subclasses of a stock type: their forward may differ from the stock one the rule replaces;
  - modules with hooks (forward, backward, state_dict) or parametrizations attached: the hook's
    code may depend on the module's identity or its exact class;
  - TorchScript modules.
A module that appears at several places in the tree (shared weights) is swapped once and the one
replacement is put at every place, so the sharing survives.

Convolutions followed by a batch norm and/or an activation are fused only where the graph proves
the pattern: consecutive children of a plain nn.Sequential (its forward calls them in order, each on
the previous one's output), see `_Walk._fuse_conv_runs`: Conv2d [→ BatchNorm2d] [→ activation], the
activation one of ReLU, GELU, SiLU, Sigmoid, LeakyReLU. Conv → activation becomes one
bigkernels.nn.Conv2d(activation=...); Conv → BatchNorm2d [→ activation] becomes one
bigkernels.nn.Conv2dBNAct holding the conv's weights and the batch-norm module itself (batch
statistics in training; in eval mode it folds the running statistics into the conv on the fly, as
fuse_conv_bn does, so switching modes stays correct). The absorbed positions hold nn.Identity, and
the Sequential gets a state_dict hook pair that keeps the stock keys ("3.weight", "4.running_mean"),
so checkpoints still load both ways.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

import bigkernels.nn as bk_nn

FAMILIES = ("conv", "lstm", "attention")  # the keyword flags of optimize()

# Dtypes the compiled kernels of the LSTM ops take, per device type (bigkernels/ops/lstm*.py).
# Elsewhere only the slow reference backend would run, so the stock module is kept.
LSTM_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


@dataclass(frozen=True)
class SwapRule:
    """How to replace one stock module type.

    stock_type:   the exact class replaced (subclasses are left alone).
    family:       the optimize() flag that enables the rule: "conv", "lstm" or "attention".
    replacement:  the replacing class's name, for the report.
    unsupported:  why this instance cannot be swapped (a sentence), or None when it can.
    build:        the replacement, holding the stock module's own Parameter and buffer objects.
    """

    stock_type: type
    family: str
    replacement: str
    unsupported: Callable[[nn.Module], Optional[str]]
    build: Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class Swapped:
    path: str  # dotted path in the model ("" for the model itself)
    stock: str
    replacement: str


@dataclass(frozen=True)
class Left:
    path: str
    module_type: str
    reason: str


@dataclass
class OptimizeReport:
    """What optimize() did. `model` is the optimized model: the same object that was passed with
    inplace=True (unless the model itself was a swappable layer), a deep copy otherwise."""

    model: nn.Module
    swapped: list[Swapped] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"bigkernels.optimize: {len(self.swapped)} swapped, {len(self.left)} left"]
        lines += [f"  swapped {s.path or '<model>'}: {s.stock} -> {s.replacement}" for s in self.swapped]
        lines += [f"  left    {s.path or '<model>'} ({s.module_type}): {s.reason}" for s in self.left]
        return "\n".join(lines)


# --------------------------------------------------------------------------- shared checks and moves
_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _attached_hooks(module: nn.Module) -> list[str]:
    return [name.strip("_") for name in _HOOK_DICTS if getattr(module, name, None)]


def _tensors_reason(module: nn.Module, kernel_dtypes: dict[str, tuple[torch.dtype, ...]]) -> Optional[str]:
    """The module's parameters must share one device and dtype that a compiled kernel takes."""
    tensors = [p for p in module.parameters(recurse=False)]
    if not tensors:
        return None
    devices = {t.device for t in tensors}
    dtypes = {t.dtype for t in tensors}
    if len(devices) > 1 or len(dtypes) > 1:
        return f"parameters on several devices/dtypes ({sorted(map(str, devices))}, {sorted(map(str, dtypes))})"
    device, dtype = tensors[0].device, tensors[0].dtype
    supported = kernel_dtypes.get(device.type)
    if supported is None:
        return f"no bigkernels kernel for {device.type} tensors"
    if dtype not in supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported)
        return f"{str(dtype).removeprefix('torch.')} on {device.type} has no bigkernels kernel (supported: {names})"
    return None


def _adopt_tensors(stock: nn.Module, new: nn.Module) -> nn.Module:
    """Move the stock module's Parameter and buffer objects into `new` (built on the meta device,
    with the same parameter names), and its training flag."""
    if set(new._parameters) != set(stock._parameters) or set(new._buffers) != set(stock._buffers):
        raise RuntimeError(
            f"bigkernels.optimize: {type(new).__name__} has parameters {sorted(new._parameters)}, the stock "
            f"{type(stock).__name__} {sorted(stock._parameters)}; the swap rule is out of date"
        )
    for name, param in stock._parameters.items():
        setattr(new, name, param)  # through __setattr__: RNNBase refreshes its flat weight list
    for name, buf in stock._buffers.items():
        new._buffers[name] = buf
    if set(new._modules) != set(stock._modules):
        raise RuntimeError(
            f"bigkernels.optimize: {type(new).__name__} has submodules {sorted(new._modules)}, the stock "
            f"{type(stock).__name__} {sorted(stock._modules)}; the swap rule is out of date"
        )
    for name, child in stock._modules.items():
        new._modules[name] = child
    new._non_persistent_buffers_set = set(stock._non_persistent_buffers_set)
    return new.train(stock.training)


def _first_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# --------------------------------------------------------------------------- rules: LSTM, LSTMCell
def _lstm_unsupported(module: nn.LSTM) -> Optional[str]:
    return _tensors_reason(module, LSTM_KERNEL_DTYPES)


def _build_lstm(stock: nn.LSTM) -> nn.Module:
    new = bk_nn.LSTM(
        stock.input_size, stock.hidden_size, stock.num_layers, stock.bias, stock.batch_first,
        stock.dropout, stock.bidirectional, stock.proj_size, device="meta", dtype=_first_dtype(stock),
    )
    return _adopt_tensors(stock, new)


def _build_lstm_cell(stock: nn.LSTMCell) -> nn.Module:
    new = bk_nn.LSTMCell(stock.input_size, stock.hidden_size, stock.bias, device="meta", dtype=_first_dtype(stock))
    return _adopt_tensors(stock, new)


# --------------------------------------------------------------------------- rules: convolution
# bigkernels/ops/conv.py: CPU float32/float64/bfloat16 (C++), CUDA float16/bfloat16/float32 (Triton).
CONV_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}


def _conv_unsupported(module: nn.Module) -> Optional[str]:
    return _tensors_reason(module, CONV_KERNEL_DTYPES)


def _build_conv(stock: nn.Module, activation: Optional[str] = None, negative_slope: float = 0.01) -> nn.Module:
    cls = bk_nn.Conv2d if isinstance(stock, nn.Conv2d) else bk_nn.Conv1d
    new = cls(
        stock.in_channels, stock.out_channels, stock.kernel_size, stock.stride, stock.padding, stock.dilation,
        stock.groups, stock.bias is not None, stock.padding_mode, device="meta", dtype=_first_dtype(stock),
        activation=activation, negative_slope=negative_slope,
    )
    return _adopt_tensors(stock, new)


def fusable_activation(module: nn.Module) -> Optional[tuple[str, float]]:
    """(activation name, negative_slope) of a stock activation module the conv kernels fuse, or None."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu", 0.01
    if kind is nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.01
    if kind is nn.SiLU:
        return "silu", 0.01
    if kind is nn.Sigmoid:
        return "sigmoid", 0.01
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    return None


def _build_conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[tuple[str, float]]) -> nn.Module:
    name, slope = activation if activation is not None else (None, 0.01)
    block = bk_nn.Conv2dBNAct(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, conv.bias is not None, conv.padding_mode, device="meta", dtype=_first_dtype(conv),
        activation=name, negative_slope=slope, eps=bn.eps, momentum=bn.momentum,
    )
    block.conv = _build_conv(conv)
    block.bn = bn  # the stock batch norm itself: its parameters, running statistics and mode
    return block.train(conv.training)


# --------------------------------------------------------------------------- rules: attention
# bigkernels/ops/attention.py: CPU float32/float64/bfloat16/float16 (C++), CUDA float16/bfloat16/float32.
ATTENTION_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}


def _attention_unsupported(module: nn.MultiheadAttention) -> Optional[str]:
    return _tensors_reason(module, ATTENTION_KERNEL_DTYPES)


def _build_attention(stock: nn.MultiheadAttention) -> nn.Module:
    new = bk_nn.MultiheadAttention(
        stock.embed_dim, stock.num_heads, stock.dropout, bias=stock.in_proj_bias is not None,
        add_bias_kv=stock.bias_k is not None, add_zero_attn=stock.add_zero_attn, kdim=stock.kdim, vdim=stock.vdim,
        batch_first=stock.batch_first, device="meta", dtype=_first_dtype(stock),
    )
    return _adopt_tensors(stock, new)


SWAP_RULES: list[SwapRule] = [
    SwapRule(nn.LSTM, "lstm", "bigkernels.nn.LSTM", _lstm_unsupported, _build_lstm),
    SwapRule(nn.LSTMCell, "lstm", "bigkernels.nn.LSTMCell", _lstm_unsupported, _build_lstm_cell),
    SwapRule(nn.Conv2d, "conv", "bigkernels.nn.Conv2d", _conv_unsupported, _build_conv),
    SwapRule(nn.Conv1d, "conv", "bigkernels.nn.Conv1d", _conv_unsupported, _build_conv),
    SwapRule(nn.MultiheadAttention, "attention", "bigkernels.nn.MultiheadAttention", _attention_unsupported,
             _build_attention),
]
BIGKERNELS_TYPES = (bk_nn.LSTM, bk_nn.LSTMCell, bk_nn.Conv2d, bk_nn.Conv1d, bk_nn.Conv2dBNAct, bk_nn.MultiheadAttention)


# --------------------------------------------------------------------------- conv patterns in nn.Sequential
def _renaming_hooks(sequential: nn.Sequential, renames: list[tuple[str, str]]) -> None:
    """Keep the stock state_dict keys of a fused run: ("0.conv.", "0.") and ("0.bn.", "1.") map the
    fused block's keys to those its modules had before the swap. state_dict writes the stock keys;
    load_state_dict accepts them (and the fused keys too)."""

    def rename(state_dict, prefix, pairs, skip=()):
        items = list(state_dict.items())
        state_dict.clear()
        for key, value in items:
            for src, dst in pairs if not key.startswith(skip) else ():
                if key.startswith(prefix + src):
                    key = prefix + dst + key[len(prefix + src):]
                    break
            state_dict[key] = value

    def on_save(module, state_dict, prefix, local_metadata):
        rename(state_dict, prefix, renames)
        return state_dict

    def on_load(module, state_dict, prefix, *args):
        # Keys are matched with their trailing dot, so "1." never captures "10.". Keys already in the
        # fused form ("0.conv.weight") are left as they are.
        fused = tuple(prefix + src for src, _ in renames)
        stock_keys = {k: v for k, v in state_dict.items() if k.startswith(prefix) and not k.startswith(fused)}
        if stock_keys:
            rename(state_dict, prefix, [(dst, src) for src, dst in renames], skip=fused)

    sequential._register_state_dict_hook(on_save)
    sequential._register_load_state_dict_pre_hook(on_load, with_module=True)


def _rule_for(module: nn.Module) -> Optional[SwapRule]:
    """The rule of `module`'s type or of a stock base class of it (the latter only to report it)."""
    for rule in SWAP_RULES:
        if isinstance(module, rule.stock_type):
            return rule
    return None


def _type_name(module: nn.Module) -> str:
    """nn.LSTM for torch's modules, module.Class for everything else."""
    cls = type(module)
    prefix = "nn" if cls.__module__.startswith("torch.nn.") else cls.__module__
    return f"{prefix}.{cls.__qualname__}"


# --------------------------------------------------------------------------- the walk
class _Walk:
    def __init__(self, enabled: dict[str, bool], report: OptimizeReport) -> None:
        self.enabled = enabled
        self.report = report
        self.done: dict[int, nn.Module] = {}  # id(stock module) -> what replaced it (or itself)

    def visit(self, module: nn.Module, path: str) -> nn.Module:
        """`module`, or its replacement; its children are visited (and replaced) in place."""
        key = id(module)
        if key in self.done:  # shared module: one replacement for every place it appears
            return self.done[key]
        result = self._swap_or_descend(module, path)
        self.done[key] = result
        return result

    def _leave(self, module: nn.Module, path: str, reason: str) -> None:
        self.report.left.append(Left(path, _type_name(module), reason))

    def _swap_or_descend(self, module: nn.Module, path: str) -> nn.Module:
        if isinstance(module, torch.jit.ScriptModule):
            self._leave(module, path, "TorchScript module: its code is compiled, its submodules cannot be replaced")
            return module
        if isinstance(module, BIGKERNELS_TYPES):
            return module  # already bigkernels
        rule = _rule_for(module)
        if rule is not None:
            reason = self._why_not(module, rule)
            if reason is None:
                new = rule.build(module)
                self.report.swapped.append(Swapped(path, _type_name(module), rule.replacement))
                return new
            self._leave(module, path, reason)
        if type(module) is nn.Sequential and self.enabled["conv"]:
            self._fuse_conv_runs(module, path)
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = self.visit(child, f"{path}.{name}" if path else name)
        return module

    def _fuse_conv_runs(self, sequential: nn.Sequential, path: str) -> None:
        """Conv2d [→ BatchNorm2d] [→ activation] runs among the children of a plain nn.Sequential."""
        names = list(sequential._modules)
        children = list(sequential._modules.values())
        renames: list[tuple[str, str]] = []
        i = 0
        while i < len(children):
            conv = children[i]
            if type(conv) is not nn.Conv2d or id(conv) in self.done:
                i += 1
                continue
            run = [conv]
            bn = children[i + 1] if i + 1 < len(children) and type(children[i + 1]) is nn.BatchNorm2d else None
            if bn is not None:
                run.append(bn)
            after = i + len(run)
            act = fusable_activation(children[after]) if after < len(children) else None
            if act is not None:
                run.append(children[after])
            if len(run) == 1:
                i += 1
                continue  # a lone conv: the Conv2d rule, when the walk reaches it
            where = f"{path}.{names[i]}" if path else names[i]
            reason = self._why_not_run(run, bn)
            if reason is not None:
                self._leave(conv, where, f"conv pattern of {len(run)} modules not fused: {reason}")
                i += len(run)
                continue
            if bn is not None:
                fused = _build_conv_bn_act(conv, bn, act)
                renames += [(f"{names[i]}.conv.", f"{names[i]}."), (f"{names[i]}.bn.", f"{names[i + 1]}.")]
                replacement = "bigkernels.nn.Conv2dBNAct"
            else:
                fused = _build_conv(conv, *act)
                replacement = f"bigkernels.nn.Conv2d(activation={act[0]!r})"
            stock_names = " + ".join(_type_name(m) for m in run)
            self.report.swapped.append(Swapped(where, stock_names, replacement))
            # Not recorded in self.done: were the conv also used elsewhere, that place must get a
            # plain swap (sharing the same Parameters), not this block with its batch norm and activation.
            sequential._modules[names[i]] = fused
            for k in range(1, len(run)):
                sequential._modules[names[i + k]] = nn.Identity()
            i += len(run)
        if renames:
            _renaming_hooks(sequential, renames)

    def _why_not_run(self, run: list[nn.Module], bn: Optional[nn.Module]) -> Optional[str]:
        for module in run:
            hooks = _attached_hooks(module)
            if hooks:
                return f"hooks attached to {_type_name(module)} ({', '.join(hooks)})"
            if torch.nn.utils.parametrize.is_parametrized(module):
                return f"parametrized weights in {_type_name(module)}"
        if bn is not None and bn.num_features != run[0].out_channels:
            return f"BatchNorm2d has {bn.num_features} features, the conv {run[0].out_channels} output channels"
        if bn is not None and bn.training != run[0].training:
            return "the conv and the batch norm are in different modes (train/eval)"
        return _conv_unsupported(run[0]) or (_tensors_reason(bn, CONV_KERNEL_DTYPES) if bn is not None else None)

    def _why_not(self, module: nn.Module, rule: SwapRule) -> Optional[str]:
        if not self.enabled[rule.family]:
            return f"disabled ({rule.family}=False)"
        if type(module) is not rule.stock_type:
            return (
                f"a subclass of {rule.stock_type.__name__}: its forward may differ from the stock one "
                f"{rule.replacement} replaces"
            )
        hooks = _attached_hooks(module)
        if hooks:
            return f"hooks attached ({', '.join(hooks)}): they may depend on the module's identity or class"
        if torch.nn.utils.parametrize.is_parametrized(module):
            return "parametrized weights (torch.nn.utils.parametrize)"
        return rule.unsupported(module)


def optimize(
    model: nn.Module, *, conv: bool = True, lstm: bool = True, attention: bool = True, inplace: bool = True
) -> OptimizeReport:
    """Replace the stock layers of `model` with bigkernels modules, keeping weights, devices, dtypes
    and training mode; returns an :class:`OptimizeReport` (``report.model`` is the model to use).

    Args:
        model: any ``nn.Module``; the model itself may be a swappable layer.
        conv, lstm, attention: enable the rules of each family. conv: nn.Conv2d, nn.Conv1d, and the
            Conv2d [→ BatchNorm2d] [→ activation] runs of an nn.Sequential; lstm: nn.LSTM,
            nn.LSTMCell; attention: nn.MultiheadAttention.
        inplace: swap inside `model` (True), or inside a deep copy of it (False; `model` untouched).

    The replacements hold the stock modules' own Parameter objects, so an optimizer made before
    the call keeps updating the model, and ``state_dict`` keys are unchanged (a checkpoint saved
    before the swap loads after it, and the other way round). Outputs agree with the stock modules
    within the DESIGN.md accuracy rule. Modules that cannot be swapped are listed in
    ``report.left`` with the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    enabled = {"conv": bool(conv), "lstm": bool(lstm), "attention": bool(attention)}
    if not inplace:
        model = copy.deepcopy(model)
    report = OptimizeReport(model=model)
    report.model = _Walk(enabled, report).visit(model, "")
    return report
