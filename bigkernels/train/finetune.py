"""Fine-tuning helpers: freeze and unfreeze parameters by name pattern, and optimizer parameter
groups with their own learning rate (or any other optimizer option) per pattern.

Patterns are shell-style (fnmatch) over the dotted parameter names of model.named_parameters():
"encoder.*", "*.bias", "head.weight". A pattern that matches no parameter is an error: it is
almost always a typo, and silently training the wrong layers is expensive.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping, Sequence, Union

from torch import nn

Patterns = Union[str, Sequence[str]]


def _as_list(patterns: Patterns) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def matching(model: nn.Module, patterns: Patterns) -> list[str]:
    """Names of the parameters of `model` that match any of `patterns`; ValueError naming a pattern
    that matches nothing."""
    names = [name for name, _ in model.named_parameters()]
    found: list[str] = []
    for pattern in _as_list(patterns):
        hits = [n for n in names if fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"pattern {pattern!r} matches no parameter of {type(model).__name__} "
                             f"(names look like {names[:3]})")
        found += [n for n in hits if n not in found]
    return found


def _set_requires_grad(model: nn.Module, patterns: Patterns, value: bool) -> list[str]:
    names = set(matching(model, patterns))
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(value)
    return sorted(names)


def freeze(model: nn.Module, patterns: Patterns = "*") -> list[str]:
    """Stop training the matching parameters (requires_grad=False); returns their names."""
    return _set_requires_grad(model, patterns, False)


def unfreeze(model: nn.Module, patterns: Patterns = "*") -> list[str]:
    """Train the matching parameters again (requires_grad=True); returns their names."""
    return _set_requires_grad(model, patterns, True)


def param_groups(
    model: nn.Module,
    groups: Mapping[str, Mapping[str, Any]],
    default: Mapping[str, Any] | None = None,
    *,
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: each parameter goes to the first pattern of `groups` it matches
    (dict order), the rest to a group with the `default` options.

        torch.optim.AdamW(param_groups(model, {"backbone.*": {"lr": 1e-5}}, {"lr": 1e-3}))

    Frozen parameters (requires_grad=False) are left out unless trainable_only=False. Empty groups
    are dropped; a pattern that matches no parameter raises ValueError.
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in groups:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"param_groups: pattern {pattern!r} matches no parameter of {type(model).__name__}")
    buckets: dict[str | None, list] = {pattern: [] for pattern in groups}
    buckets[None] = []
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        target = next((p for p in groups if fnmatchcase(name, p)), None)
        buckets[target].append(param)
    out = [{"params": params, **groups[pattern]} for pattern, params in buckets.items() if pattern is not None and params]
    if buckets[None]:
        out.append({"params": buckets[None], **(default or {})})
    return out


def parameter_count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
