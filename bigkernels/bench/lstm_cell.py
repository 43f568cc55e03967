"""Benchmark definition of the fused LSTM cell: bigkernels.nn.LSTMCell against torch.nn.LSTMCell.

Shapes: B (batch), I (input_size), H (hidden_size); the grid uses I = H, the common stacked case.
"""
from __future__ import annotations

import math

import torch

import bigkernels
from bigkernels import reference
from bigkernels.bench.cases import GEMM_FLOP_FACTOR, Case, Inputs, OpBench, Outputs, float64_copy, make_step
from bigkernels.bench.providers import ModulePair, module_providers

OP = "lstm_cell"

BATCHES = (1, 16, 64, 256, 1024)
HIDDENS = (128, 512, 2048)

# Quick CPU suite: the grid cut to the shapes whose forward costs at most ~1 GFLOP (about 30 ms on
# a 2-core CPU), so that `bigkernels bench` finishes in under 3 minutes there. This keeps every
# batch at H=128, B<=256 at H=512 and B<=16 at H=2048; --full runs all of them.
QUICK_CPU_MAX_FORWARD_FLOPS = 2**30
# Quick GPU suite: small, middle and large batch at every hidden size.
QUICK_GPU_BATCHES = (1, 64, 1024)

WEIGHT_NAMES = ("w_ih", "w_hh", "b_ih", "b_hh")  # torch.nn.LSTMCell.parameters() order


def _full_grid() -> list[dict[str, int]]:
    return [{"B": b, "I": h, "H": h} for h in HIDDENS for b in BATCHES]


def shapes(device: str, full: bool) -> list[dict[str, int]]:
    grid = _full_grid()
    if full:
        return grid
    if device == "cpu":
        return [s for s in grid if forward_flops(s) <= QUICK_CPU_MAX_FORWARD_FLOPS]
    return [s for s in grid if s["B"] in QUICK_GPU_BATCHES]


def dtypes(device: str, full: bool) -> tuple[torch.dtype, ...]:
    if device == "cpu":
        return (torch.float32, torch.bfloat16) if full else (torch.float32,)
    return (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,)


# ------------------------------------------------------------------------------ cost formulas
def forward_flops(shape: dict[str, int]) -> int:
    """2·B·4H·(I+H): the two gate GEMMs (input and recurrent) of one step; the gate pointwise work
    (~10 ops per B·H element) is under 1% at H >= 128 and is left out, as for every GEMM-bound op."""
    B, I, H = shape["B"], shape["I"], shape["H"]
    return 2 * B * 4 * H * (I + H)


def flops(case: Case) -> int:
    """Forward FLOPs × 1 (fwd), × 2 (bwd: grad-input and grad-weight GEMMs), × 3 (fwd+bwd)."""
    return forward_flops(case.shape) * GEMM_FLOP_FACTOR[case.mode]


def bytes_moved(case: Case) -> int:
    """Minimum memory traffic in the input dtype (E bytes per element): what a fully fused kernel
    must read and write once, with the 4H gates kept on chip (saved gates, if any, are extra).

      forward  = E·[ B·I + 2·B·H            read x, h, c
                   + 4H·(I+H) + 2·4H        read W_ih, W_hh, b_ih, b_hh
                   + 2·B·H ]                write h', c'
      backward = E·[ 2·B·H + B·I + 3·B·H    read grad h', grad c', x, h, c, c'
                   + 4H·(I+H)               read W_ih, W_hh
                   + B·I + 2·B·H            write grad x, grad h, grad c
                   + 4H·(I+H) + 2·4H ]      write grad W_ih, grad W_hh, grad b_ih, grad b_hh
               = E·[ 2·B·I + 7·B·H + 8H·(I+H) + 8H ]
    fwd+bwd is the sum.
    """
    B, I, H = case.shape["B"], case.shape["I"], case.shape["H"]
    elem = torch.finfo(case.dtype).bits // 8
    forward = B * I + 2 * B * H + 4 * H * (I + H) + 2 * 4 * H + 2 * B * H
    backward = 2 * B * I + 7 * B * H + 8 * H * (I + H) + 8 * H
    count = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[case.mode]
    return elem * count


# ------------------------------------------------------------------------------ inputs and reference
def make_inputs(case: Case) -> Inputs:
    """Fresh random inputs, seeded by the case: x, h, c ~ N(0, 1); weights and biases
    ~ U(-1/sqrt(H), 1/sqrt(H)) like torch.nn.LSTMCell's init, so the gates are not saturated;
    upstream gradients ~ N(0, 1). Drawn in float32 on the CPU, then cast, so every dtype and device
    sees the same values up to rounding."""
    B, I, H = case.shape["B"], case.shape["I"], case.shape["H"]
    gen = torch.Generator().manual_seed(case.seed)
    bound = 1.0 / math.sqrt(H)

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen)

    def uniform(*size: int) -> torch.Tensor:
        return (torch.rand(*size, generator=gen) * 2 - 1) * bound

    values = {
        "x": normal(B, I), "h": normal(B, H), "c": normal(B, H),
        "w_ih": uniform(4 * H, I), "w_hh": uniform(4 * H, H), "b_ih": uniform(4 * H), "b_hh": uniform(4 * H),
    }
    if case.mode != "fwd":
        values["grad_hy"], values["grad_cy"] = normal(B, H), normal(B, H)
    inputs = {name: t.to(device=case.device, dtype=case.dtype) for name, t in values.items()}
    if case.mode != "fwd":
        for name in ("x", "h", "c"):
            inputs[name].requires_grad_(True)
    return inputs


def reference_outputs(case: Case, inputs: Inputs) -> Outputs:
    """bigkernels.reference.lstm_cell in float64 on the case's device (fp64 on a GPU is exact enough
    and far faster than the CPU at B=1024, H=2048), in provider output order: (h', c') for fwd;
    grads of (x, h, c, W_ih, W_hh, b_ih, b_hh) for bwd; both for fwd+bwd."""
    ref = float64_copy(inputs, case.device)
    if case.mode != "fwd":
        for name in WEIGHT_NAMES:
            ref[name].requires_grad_(True)
    leaves = [ref[name] for name in ("x", "h", "c", *WEIGHT_NAMES)]
    grad_outputs = [ref[name] for name in ("grad_hy", "grad_cy")] if case.mode != "fwd" else []

    def forward() -> Outputs:
        return reference.lstm_cell(*(ref[name] for name in ("x", "h", "c", *WEIGHT_NAMES)))

    return make_step(case.mode, forward, leaves, grad_outputs).next_call()()


# ------------------------------------------------------------------------------ providers
def _loaded(module: torch.nn.LSTMCell, inputs: Inputs) -> torch.nn.LSTMCell:
    with torch.no_grad():
        for param, name in zip(module.parameters(), WEIGHT_NAMES):
            param.copy_(inputs[name])
    return module


def _stock(case: Case, inputs: Inputs) -> torch.nn.Module:
    I, H = case.shape["I"], case.shape["H"]
    return _loaded(torch.nn.LSTMCell(I, H, device=case.device, dtype=case.dtype), inputs)


def _drop_in(case: Case, inputs: Inputs) -> torch.nn.Module:
    I, H = case.shape["I"], case.shape["H"]
    return _loaded(bigkernels.nn.LSTMCell(I, H, device=case.device, dtype=case.dtype), inputs)


def _forward(module: torch.nn.Module, inputs: Inputs) -> Outputs:
    return tuple(module(inputs["x"], (inputs["h"], inputs["c"])))


MODULES = ModulePair(
    bigkernels_module=_drop_in,
    stock_module=_stock,
    forward=_forward,
    input_grads=("x", "h", "c"),
    grad_outputs=("grad_hy", "grad_cy"),
)

BENCH = OpBench(
    name=OP,
    shapes=shapes,
    dtypes=dtypes,
    make_inputs=make_inputs,
    flops=flops,
    bytes=bytes_moved,
    reference=reference_outputs,
    providers=lambda case, full: module_providers(OP, case, full, MODULES),
    plot_x="B",
)
