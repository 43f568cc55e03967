"""The DESIGN.md accuracy rule for tests; the rule itself lives in bigkernels/_numerics.py (the
chooser's GPU self-validation judges by the same function).

    err(ours, ref64) <= 2 * err(stock, ref64) + eps(dtype) * sqrt(reduction) * scale
"""
from __future__ import annotations

from torch import Tensor

from bigkernels._numerics import EPS, max_err, rule_violation  # noqa: F401  (re-exported for the tests)


def assert_matches(name: str, ours: Tensor, stock: Tensor, ref64: Tensor, reduction: int = 1) -> None:
    """`reduction`: how many terms are summed into each element (e.g. the rows a weight or bias
    gradient accumulates over); the slack grows with its square root (see eps_for)."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    assert ours.dtype == stock.dtype, f"{name}: dtype {ours.dtype} != stock {stock.dtype}"
    problem = rule_violation(ours, stock, ref64, reduction)
    assert problem is None, f"{name}: {problem}"
