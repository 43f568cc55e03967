"""End-to-end benchmark cases: an inference step (mode fwd) and a training step (mode fwd+bwd: forward
and the gradients of every parameter) of three small models written with stock layers, against the
same models after bigkernels.optimize. Reported like every op: speedup vs the stock model (provider
"torch") and peak memory.

  e2e_cnn          R=0: SmallCNN, conv 3×3 → BN → ReLU ×2, max-pool, conv 3×3 → ReLU, global pool,
                   linear (tiny layers: it measures per-call overhead);
                   R=1: SmallResNet, a ResNet-style stem conv 3×3 → BN → ReLU, a basic block at C
                   channels (S×S), a strided basic block to 2C channels (S/2×S/2, 1×1 strided
                   projection shortcut), global pool, linear (layers of realistic size)
                   shape: B batch, C channels, S image side (S×S, 3 input channels), R model, 10 classes
  e2e_lstm         embedding → 2-layer LSTM (batch_first) → linear on the last step
                   shape: B batch, T sequence length, H hidden size (= embedding size), 16 classes
  e2e_transformer  embedding → 2 nn.TransformerEncoderLayer (batch_first, 4 heads, FFN 4D) → linear
                   shape: B batch, T sequence length, D model width, 16 classes

Both providers hold the same weights (a seeded stock model's state_dict, kept in the inputs). The
float64 reference is the stock model in float64. The models are built fresh per case. What
bigkernels.optimize swaps (bigkernels/train/swap.py): in SmallCNN both Conv2d → BatchNorm2d → ReLU
runs (bigkernels.nn.Conv2dBNAct) and the Conv2d → ReLU (bigkernels.nn.Conv2d(activation="relu"));
in SmallResNet every Conv2d → BatchNorm2d [→ ReLU] run of its nn.Sequential branches (Conv2dBNAct;
the add of the shortcut and the block's final ReLU stay stock);
in the LSTM classifier the nn.LSTM; in the encoder each layer's nn.MultiheadAttention (which the
stock layer calls with need_weights=False, the fused path; in eval mode under no_grad the stock
layer takes torch's own fused fast path instead, around self_attn, for both providers alike).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bigkernels.bench.cases import Case, Inputs, OpBench, Outputs, Provider, Step, float64_copy, make_step

CLASSES = {"e2e_cnn": 10, "e2e_lstm": 16, "e2e_transformer": 16}
VOCAB = 64
WEIGHT_PREFIX = "w:"  # inputs holding the models' state_dict entries

# Quick CPU: one small shape per model, each step a few ms on an idle 2-core CPU, so that the six
# quick cases (two modes) stay within ~25 s with the runner's warm-up, checks and timing; full and
# GPU: larger ones.
# e2e_cnn: R=0 SmallCNN (tiny: the per-call overhead), R=1 SmallResNet (realistic layers; the quick
# shape is a few seconds of the quick suite: ~0.1 s per training step on the 2-core CPU).
SHAPES = {
    "e2e_cnn": {"quick_cpu": [{"B": 8, "C": 8, "S": 16, "R": 0}, {"B": 8, "C": 64, "S": 32, "R": 1}],
                "full_cpu": [{"B": 8, "C": 8, "S": 16, "R": 0}, {"B": 16, "C": 16, "S": 32, "R": 0},
                             {"B": 64, "C": 32, "S": 32, "R": 0}, {"B": 8, "C": 64, "S": 32, "R": 1},
                             {"B": 8, "C": 64, "S": 56, "R": 1}],
                "gpu": [{"B": 64, "C": 64, "S": 64, "R": 0}, {"B": 256, "C": 64, "S": 64, "R": 0},
                        {"B": 64, "C": 64, "S": 56, "R": 1}]},
    "e2e_lstm": {"quick_cpu": [{"B": 8, "T": 16, "H": 64}],
                 "full_cpu": [{"B": 8, "T": 16, "H": 64}, {"B": 16, "T": 32, "H": 128}, {"B": 64, "T": 64, "H": 256}],
                 "gpu": [{"B": 64, "T": 128, "H": 512}, {"B": 256, "T": 256, "H": 1024}]},
    "e2e_transformer": {"quick_cpu": [{"B": 4, "T": 32, "D": 64}],
                        "full_cpu": [{"B": 4, "T": 32, "D": 64}, {"B": 8, "T": 64, "D": 128}, {"B": 32, "T": 128, "D": 256}],
                        "gpu": [{"B": 64, "T": 256, "D": 512}, {"B": 32, "T": 1024, "D": 512}]},
}


# ------------------------------------------------------------------------------ the models
class SmallCNN(nn.Module):
    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """ResNet's basic block: relu(branch(x) + shortcut(x)), branch = conv 3×3 → BN → ReLU → conv 3×3
    → BN (the first conv strided when the block downsamples), shortcut = identity or a strided 1×1
    conv → BN projection. Written with nn.Sequential branches, as many models are."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
        )
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv 3×3 → BN → ReLU at C channels, a basic block at C, a strided basic block to 2C (half
    the side), global average pool, linear."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(c, c, 1), BasicBlock(c, 2 * c, 2))
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class LSTMClassifier(nn.Module):
    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


class EncoderClassifier(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, 4, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def stock_model(case: Case) -> nn.Module:
    s, classes = case.shape, CLASSES[case.op]
    if case.op == "e2e_cnn":
        return SmallResNet(s["C"], classes) if s.get("R", 0) == 1 else SmallCNN(s["C"], classes)
    if case.op == "e2e_lstm":
        return LSTMClassifier(s["H"], classes)
    return EncoderClassifier(s["D"], classes)


# ------------------------------------------------------------------------------ cost formulas
def forward_flops(op: str, shape: dict[str, int]) -> int:
    """Multiply-adds × 2 of the GEMM-like layers (pointwise work, pooling and softmax left out):
    conv 2·N·K·C·R·S·P·Q; LSTM 2·T·B·4H·(I+H) per layer; encoder layer 2·B·T·(4D² + 8D²) for the
    projections and FFN, plus 4·B·T²·D for attention; the final linear layer."""
    classes = CLASSES[op]
    if op == "e2e_cnn" and shape.get("R", 0) == 1:
        B, C, S = shape["B"], shape["C"], shape["S"]
        h = (S + 1) // 2  # the strided block's side
        full = 2 * B * S * S * (3 * C * 9 + 2 * C * C * 9)  # stem, block 1's two convs
        strided = 2 * B * h * h * (C * 2 * C * 9 + 2 * C * 2 * C * 9 + C * 2 * C)  # block 2: 3×3 s2, 3×3, 1×1 s2
        return full + strided + 2 * B * 2 * C * classes
    if op == "e2e_cnn":
        B, C, S = shape["B"], shape["C"], shape["S"]
        half = S // 2
        convs = 2 * B * C * 3 * 9 * S * S + 2 * B * C * C * 9 * S * S + 2 * B * 2 * C * C * 9 * half * half
        return convs + 2 * B * 2 * C * classes
    if op == "e2e_lstm":
        B, T, H = shape["B"], shape["T"], shape["H"]
        return 2 * (2 * T * B * 4 * H * (H + H)) + 2 * B * H * classes
    B, T, D = shape["B"], shape["T"], shape["D"]
    per_layer = 2 * B * T * (4 * D * D + 8 * D * D) + 4 * B * T * T * D
    return 2 * per_layer + 2 * B * D * classes


def flops(case: Case) -> int:
    """Forward × 1 (fwd), × 2 (bwd), × 3 (fwd+bwd): GEMM-bound models, as the ops' GEMM_FLOP_FACTOR
    (attention's ×2.5 backward is a small part of these models)."""
    return forward_flops(case.op, case.shape) * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[case.mode]


def bytes_moved(case: Case) -> int:
    """A lower bound: every parameter read once (and its gradient written once in the training
    modes), the input read and the logits written once; activations between layers are not counted."""
    params = sum(p.numel() for p in _meta_model(case).parameters())
    batch = case.shape["B"]
    inputs = batch * 3 * case.shape["S"] ** 2 if case.op == "e2e_cnn" else 0  # tokens are int64, tiny
    count = params * (1 if case.mode == "fwd" else 2) + inputs + batch * CLASSES[case.op]
    return count * (torch.finfo(case.dtype).bits // 8)


def _meta_model(case: Case) -> nn.Module:
    with torch.device("meta"):
        return stock_model(case)


# ------------------------------------------------------------------------------ inputs and reference
def make_inputs(case: Case) -> Inputs:
    """x: images ~ N(0, 1) (CNN) or tokens in [0, VOCAB) (int64); the stock model's seeded initial
    weights and buffers (keys "w:<name>"); grad_logits ~ N(0, 1) in the training modes."""
    s = case.shape
    gen = torch.Generator().manual_seed(case.seed)
    if case.op == "e2e_cnn":
        x = torch.randn(s["B"], 3, s["S"], s["S"], generator=gen).to(case.dtype)
    else:
        x = torch.randint(0, VOCAB, (s["B"], s["T"]), generator=gen)
    torch.manual_seed(case.seed)  # the model's default initialisation draws from the global RNG
    state = stock_model(case).state_dict()
    inputs = {"x": x.to(case.device)}
    for name, value in state.items():
        value = value.to(case.dtype) if value.is_floating_point() else value
        inputs[WEIGHT_PREFIX + name] = value.to(case.device)
    if case.mode != "fwd":
        inputs["grad_logits"] = torch.randn(s["B"], CLASSES[case.op], generator=gen).to(device=case.device, dtype=case.dtype)
    return inputs


def _built(case: Case, inputs: Inputs, dtype: torch.dtype) -> nn.Module:
    model = stock_model(case).to(device=case.device, dtype=dtype)
    model.load_state_dict({k[len(WEIGHT_PREFIX):]: v for k, v in inputs.items() if k.startswith(WEIGHT_PREFIX)})
    # fwd is inference (eval: BN running statistics); the training modes run the model in train mode.
    return model.train(case.mode != "fwd")


def _step(case: Case, inputs: Inputs, model: nn.Module) -> Step:
    grad_outputs = [inputs["grad_logits"]] if case.mode != "fwd" else []
    return make_step(case.mode, lambda: (model(inputs["x"]),), list(model.parameters()), grad_outputs)


def reference_outputs(case: Case, inputs: Inputs) -> Outputs:
    """The stock model in float64, on the case's device: (logits,) for fwd; the gradients of every
    parameter for bwd; both for fwd+bwd."""
    ref = float64_copy(inputs, case.device)
    return _step(case, ref, _built(case, ref, torch.float64)).next_call()()


# ------------------------------------------------------------------------------ providers
STOCK = "torch"
OPTIMIZED = "bigkernels.optimize"


def _provider(name: str, prepare: Callable[[nn.Module], nn.Module]) -> Provider:
    def build(case: Case, inputs: Inputs) -> Step:
        return _step(case, inputs, prepare(_built(case, inputs, case.dtype)))

    return Provider(name, build)


def _optimized(model: nn.Module) -> nn.Module:
    from bigkernels.train import optimize  # the training package imports the module classes

    return optimize(model).model


def providers(case: Case, full: bool) -> tuple[list[Provider], dict[str, str]]:
    return [_provider(OPTIMIZED, _optimized), _provider(STOCK, lambda m: m)], {}


def _bench(op: str, plot_x: str) -> OpBench:
    def shapes(device: str, full: bool) -> list[dict[str, int]]:
        grid = SHAPES[op]
        if device != "cpu":
            return grid["gpu"]
        return grid["full_cpu"] if full else grid["quick_cpu"]

    def dtypes(device: str, full: bool) -> tuple[torch.dtype, ...]:
        if device == "cpu":
            return (torch.float32,)
        return (torch.bfloat16, torch.float32) if full else (torch.bfloat16,)

    return OpBench(
        name=op, shapes=shapes, dtypes=dtypes, make_inputs=make_inputs, flops=flops, bytes=bytes_moved,
        reference=reference_outputs, providers=providers, plot_x=plot_x,
    )


CNN_BENCH = _bench("e2e_cnn", "B")
LSTM_BENCH = _bench("e2e_lstm", "B")
TRANSFORMER_BENCH = _bench("e2e_transformer", "B")
