"""The DESIGN.md accuracy rule, in one place: judge a kernel against the stock op in the same dtype.

    err(ours, ref64) <= 2 * err(stock, ref64) + eps(dtype) * scale

err is the max absolute difference from the float64 reference; scale is the reference's magnitude
(at least 1), so the slack does not depend on the size of the values. The tests (tests/numerics.py)
and the chooser's GPU self-validation (bigkernels/_chooser.py) both judge by this function.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

EPS = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


def max_err(x: Tensor, ref64: Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.detach().to(torch.float64) - ref64.detach().to(device=x.device, dtype=torch.float64)).abs().max().item()


def eps_for(dtype: torch.dtype, reduction: int = 1) -> float:
    """The rule's slack per unit of scale. `reduction` is the number of terms summed into each
    element (e.g. the rows a bias gradient accumulates): a sum of n rounded terms drifts like
    sqrt(n) roundings on any CPU, and Intel and AMD sum in different orders, so the slack grows
    with sqrt(n) rather than being tuned to the digits one machine printed."""
    return EPS[dtype] * math.sqrt(max(1, reduction))


def rule_violation(ours: Tensor, stock: Tensor, ref64: Tensor, reduction: int = 1) -> Optional[str]:
    """None if `ours` passes the rule against `stock` and the float64 reference `ref64`, else why not."""
    if tuple(ours.shape) != tuple(ref64.shape):
        return f"shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    if ours.dtype != stock.dtype:
        return f"dtype {ours.dtype} != stock {stock.dtype}"
    if ref64.numel() == 0:
        return None
    if not bool(torch.isfinite(ours.detach()).all()):
        return "non-finite values (unwritten output?)"
    scale = max(1.0, ref64.detach().abs().max().item())
    err_ours, err_stock = max_err(ours, ref64), max_err(stock, ref64)
    bound = 2 * err_stock + eps_for(ours.dtype, reduction) * scale
    if err_ours <= bound:
        return None
    return f"error {err_ours:.3g} > 2 * stock error {err_stock:.3g} + eps ({bound:.3g})"
