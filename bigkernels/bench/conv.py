"""Benchmark definition of the fused conv: bigkernels.nn.Conv2d(activation=...)(x, residual) against
the stock sequence torch.nn.Conv2d (+ bias) -> (+ residual) -> activation, eager and torch.compile.

Shapes: N (batch), C -> K channels, H = W (input size), R = S (kernel), stride, groups, res (1: a
residual is added before the activation, the ResNet block tail). Activation: relu throughout.
CPU: float32 NCHW (the stock default layout). GPU: bfloat16 channels_last (the fast GPU layout).
Depthwise cases (groups = C = K) go through the public function, so they run whichever kernel the
dispatcher picks for depthwise calls.
"""
from __future__ import annotations

import torch
from torch import nn

import bigkernels
from bigkernels import reference
from bigkernels.bench.cases import GEMM_FLOP_FACTOR, Case, Inputs, OpBench, Outputs, float64_copy, make_step
from bigkernels.bench.providers import ModulePair, module_providers

OP = "conv"
ACTIVATION = "relu"


def _shape(n, c, k, h, r, stride=1, groups=1, res=0):
    return {"N": n, "C": c, "K": k, "H": h, "R": r, "stride": stride, "groups": groups, "res": res}


# Quick CPU suite: one layer of each kind at batch 1, sized so that the whole suite (fwd and fwd+bwd,
# three providers, torch.compile's compilations included) stays within ~35 s on a 2-core CPU.
QUICK_CPU = [
    _shape(1, 128, 128, 28, 3, res=1),  # ResNet layer2 3x3 conv with the block's residual + relu tail
    _shape(1, 64, 256, 56, 1, res=1),  # ResNet bottleneck expand 1x1 + residual + relu
    _shape(1, 128, 128, 56, 3, groups=128),  # MobileNet-style depthwise 3x3
    _shape(1, 96, 96, 56, 7, groups=96),  # ConvNeXt-style depthwise 7x7
]
# Full CPU suite adds the 1x1 reduce layer, batch 8 and the strided layers.
FULL_CPU = QUICK_CPU + [
    _shape(1, 256, 64, 56, 1),  # ResNet bottleneck reduce 1x1 + relu
    _shape(8, 128, 128, 28, 3, res=1),
    _shape(8, 64, 256, 56, 1, res=1),
    _shape(8, 64, 128, 56, 3, stride=2),
    _shape(8, 256, 512, 56, 1, stride=2),
    _shape(8, 96, 96, 56, 7, groups=96),
]
# GPU: ResNet-50 layer shapes at batch 32 (3x3 and 1x1 of each stage) and depthwise k = 3, 7, 13.
QUICK_GPU = [
    _shape(32, 64, 64, 56, 3, res=1),
    _shape(32, 64, 256, 56, 1, res=1),
    _shape(32, 128, 128, 28, 3, res=1),
    _shape(32, 256, 256, 14, 3, res=1),
    _shape(32, 1024, 256, 14, 1),
    _shape(32, 512, 512, 7, 3, res=1),
    _shape(32, 128, 128, 56, 3, groups=128),
    _shape(32, 96, 96, 56, 7, groups=96),
    _shape(32, 384, 384, 14, 7, groups=384),
]
FULL_GPU = QUICK_GPU + [_shape(32, 256, 256, 28, 13, groups=256), _shape(32, 128, 256, 56, 1, stride=2)]


def shapes(device: str, full: bool) -> list[dict[str, int]]:
    if device == "cpu":
        return list(FULL_CPU if full else QUICK_CPU)
    return list(FULL_GPU if full else QUICK_GPU)


def dtypes(device: str, full: bool) -> tuple[torch.dtype, ...]:
    if device == "cpu":
        return (torch.float32, torch.bfloat16) if full else (torch.float32,)
    return (torch.bfloat16, torch.float16) if full else (torch.bfloat16,)


def _padding(shape) -> int:
    return shape["R"] // 2


def _out_size(shape) -> int:
    return (shape["H"] + 2 * _padding(shape) - shape["R"]) // shape["stride"] + 1


# ------------------------------------------------------------------------------ cost formulas
def flops(case: Case) -> int:
    """2·N·K·(C/groups)·R·S·P·Q for the forward (bias, residual and activation left out, as for every
    GEMM-bound op); × 2 for the backward (input and weight gradients), × 3 for fwd+bwd."""
    s = case.shape
    p = _out_size(s)
    forward = 2 * s["N"] * s["K"] * (s["C"] // s["groups"]) * s["R"] * s["R"] * p * p
    return forward * GEMM_FLOP_FACTOR[case.mode]


def bytes_moved(case: Case) -> int:
    """Minimum memory traffic (E bytes per element) of a fully fused kernel:
      forward  = E·[ x + w + b (+ residual) + y ]
      backward = E·[ dy + y + x + w + dx + dw + db (+ d residual) ]
    """
    s = case.shape
    elem = torch.finfo(case.dtype).bits // 8
    x = s["N"] * s["C"] * s["H"] * s["H"]
    w = s["K"] * (s["C"] // s["groups"]) * s["R"] * s["R"]
    y = s["N"] * s["K"] * _out_size(s) ** 2
    res = y if s["res"] else 0
    forward = x + w + s["K"] + res + y
    backward = 2 * y + 2 * x + 2 * w + s["K"] + res
    return elem * {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[case.mode]


# ------------------------------------------------------------------------------ inputs and reference
def make_inputs(case: Case) -> Inputs:
    """x, residual, upstream gradient ~ N(0, 1); weight ~ N(0, 2 / fan_in) (He init, so activations
    keep their scale); bias ~ N(0, 0.1). Drawn in float32 on the CPU, then cast; channels_last on GPU."""
    s = case.shape
    gen = torch.Generator().manual_seed(case.seed)
    p = _out_size(s)
    fan_in = (s["C"] // s["groups"]) * s["R"] * s["R"]
    values = {
        "x": torch.randn(s["N"], s["C"], s["H"], s["H"], generator=gen),
        "weight": torch.randn(s["K"], s["C"] // s["groups"], s["R"], s["R"], generator=gen) * (2.0 / fan_in) ** 0.5,
        "bias": torch.randn(s["K"], generator=gen) * 0.1,
    }
    if s["res"]:
        values["residual"] = torch.randn(s["N"], s["K"], p, p, generator=gen)
    if case.mode != "fwd":
        values["grad_y"] = torch.randn(s["N"], s["K"], p, p, generator=gen)
    layout = torch.channels_last if case.device != "cpu" else torch.contiguous_format
    inputs = {}
    for name, t in values.items():
        t = t.to(device=case.device, dtype=case.dtype)
        inputs[name] = t.contiguous(memory_format=layout) if t.dim() == 4 else t
    if case.mode != "fwd":
        inputs["x"].requires_grad_(True)
        if "residual" in inputs:
            inputs["residual"].requires_grad_(True)
    return inputs


def _input_grads(case: Case) -> tuple[str, ...]:
    return ("x", "residual") if case.shape["res"] else ("x",)


def reference_outputs(case: Case, inputs: Inputs) -> Outputs:
    """bigkernels.reference.conv2d in float64, in provider output order: y for fwd; grads of
    (x, [residual,] weight, bias) for bwd; both for fwd+bwd."""
    s = case.shape
    ref = float64_copy(inputs, case.device)
    if case.mode != "fwd":
        ref["weight"].requires_grad_(True)
        ref["bias"].requires_grad_(True)
    leaves = [ref[name] for name in _input_grads(case)] + [ref["weight"], ref["bias"]]
    grad_outputs = [ref["grad_y"]] if case.mode != "fwd" else []
    pad = _padding(s)

    def forward() -> Outputs:
        return (reference.conv2d(ref["x"], ref["weight"], ref["bias"], (s["stride"],) * 2, (pad, pad), (1, 1),
                                 s["groups"], ACTIVATION, 0.01, ref.get("residual")),)

    return make_step(case.mode, forward, leaves, grad_outputs).next_call()()


# ------------------------------------------------------------------------------ providers
class StockConvBlock(nn.Module):
    """The stock sequence the fused kernel replaces: conv2d (+ bias) -> (+ residual) -> activation."""

    def __init__(self, conv: nn.Conv2d, activation: str) -> None:
        super().__init__()
        self.conv = conv
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x)
        if residual is not None:
            y = y + residual
        return reference.activation(y, self.activation)


def _conv_args(case: Case) -> dict:
    s = case.shape
    return dict(in_channels=s["C"], out_channels=s["K"], kernel_size=s["R"], stride=s["stride"], padding=_padding(s),
                groups=s["groups"], device=case.device, dtype=case.dtype)


def _loaded(module: nn.Module, inputs: Inputs) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(inputs["weight"])
        module.bias.copy_(inputs["bias"])
    return module


def _stock(case: Case, inputs: Inputs) -> nn.Module:
    return StockConvBlock(_loaded(nn.Conv2d(**_conv_args(case)), inputs), ACTIVATION)


def _drop_in(case: Case, inputs: Inputs) -> nn.Module:
    return _loaded(bigkernels.nn.Conv2d(**_conv_args(case), activation=ACTIVATION), inputs)


def _forward(module: nn.Module, inputs: Inputs) -> Outputs:
    return (module(inputs["x"], inputs.get("residual")),)


def _module_pair(case: Case) -> ModulePair:
    return ModulePair(
        bigkernels_module=_drop_in,
        stock_module=_stock,
        forward=_forward,
        input_grads=_input_grads(case),
        grad_outputs=("grad_y",),
    )


BENCH = OpBench(
    name=OP,
    shapes=shapes,
    dtypes=dtypes,
    make_inputs=make_inputs,
    flops=flops,
    bytes=bytes_moved,
    reference=reference_outputs,
    providers=lambda case, full: module_providers(OP, case, full, _module_pair(case)),
    plot_x="C",
)
