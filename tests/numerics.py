"""The DESIGN.md accuracy rule: judge a kernel against the stock op in the same dtype.

    err(ours, ref64) <= 2 * err(stock, ref64) + eps(dtype) * scale

err is the max absolute difference from the float64 reference; scale is the reference's magnitude
(at least 1), so the slack does not depend on the size of the values.
"""
from __future__ import annotations

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
    return (x.detach().to(torch.float64).cpu() - ref64.detach().cpu()).abs().max().item()


def assert_matches(name: str, ours: Tensor, stock: Tensor, ref64: Tensor) -> None:
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    assert ours.dtype == stock.dtype, f"{name}: dtype {ours.dtype} != stock {stock.dtype}"
    if ref64.numel() == 0:
        return
    assert torch.isfinite(ours.detach()).all(), f"{name}: non-finite values (unwritten output?)"
    scale = max(1.0, ref64.abs().max().item())
    err_ours, err_stock = max_err(ours, ref64), max_err(stock, ref64)
    bound = 2 * err_stock + EPS[ours.dtype] * scale
    assert err_ours <= bound, f"{name}: error {err_ours:.3g} > 2 * stock error {err_stock:.3g} + eps ({bound:.3g})"
