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


SWAP_RULES: list[SwapRule] = [
    SwapRule(nn.LSTM, "lstm", "bigkernels.nn.LSTM", _lstm_unsupported, _build_lstm),
    SwapRule(nn.LSTMCell, "lstm", "bigkernels.nn.LSTMCell", _lstm_unsupported, _build_lstm_cell),
]


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
        if isinstance(module, (bk_nn.LSTM, bk_nn.LSTMCell)):
            return module  # already bigkernels
        rule = _rule_for(module)
        if rule is not None:
            reason = self._why_not(module, rule)
            if reason is None:
                new = rule.build(module)
                self.report.swapped.append(Swapped(path, _type_name(module), rule.replacement))
                return new
            self._leave(module, path, reason)
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = self.visit(child, f"{path}.{name}" if path else name)
        return module

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
        conv, lstm, attention: enable the rules of each family (``lstm``: nn.LSTM, nn.LSTMCell).
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
