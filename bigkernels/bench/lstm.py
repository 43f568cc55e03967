"""Benchmark definition of the LSTM layer module: bigkernels.nn.LSTM against torch.nn.LSTM.

Both modules hold the same weights (the case's, put in with load_state_dict) and run on the whole
sequence at once, with a given initial state (h_0, c_0): outputs (output, h_n, c_n); in the
training modes the gradients of the input, h_0, c_0 and every parameter.

Shape keys (the last four appear only when not at their default, so that the quick suite's ids
stay short; `--shape L=1` still selects those shapes, see OpBench.shape_defaults):
  T  sequence length          B  batch           I  input_size (the grid uses I = H)
  H  hidden_size              L  num_layers (1)  D  directions: 2 = bidirectional (1)
  P  proj_size (0: none)      ragged  1 = a PackedSequence of sequences of unequal lengths (0)
A ragged batch's lengths are spread evenly from T down to T//4 (mean about 5T/8) and shuffled
(seeded), so the module unsorts its states as in real use; the packed data is built once, outside
the timing, as a data loader would.

torch.compile of the stock module: Dynamo refuses to trace torch.nn.LSTM ("Attempted to wrap RNN,
GRU, or LSTM"), so with fullgraph=True the torch.compile row records that error. Without fullgraph
it would silently run the eager module; with torch._dynamo.config.allow_rnn, Inductor unrolls the
recurrence, which took 15 s (fwd) and 75 s (fwd+bwd) to compile at T=16, H=128 on the 2-core CPU,
so it is not raced. bigkernels.nn.LSTM compiles with fullgraph=True: bigkernels[<backend>]+compile,
on the cases that are not ragged (see providers() below).
"""
from __future__ import annotations

import math

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import bigkernels
from bigkernels.bench.cases import (
    GEMM_FLOP_FACTOR, Case, Inputs, OpBench, Outputs, Provider, float64_copy, make_step,
)
from bigkernels.bench.providers import ModulePair, module_providers

OP = "lstm"

SHAPE_DEFAULTS = {"L": 1, "D": 1, "P": 0, "ragged": 0}

# CPU grid. Quick: one layer, one direction, fp32, T x B x H below (36 cases, ~45 s on an idle
# 2-core CPU, so that `bigkernels bench --quick` of every op stays under 3 minutes there). Full:
# longer sequences too, the variants below, bf16.
CPU_SEQ_LENS = (16, 64)
CPU_FULL_SEQ_LENS = (16, 64, 256)
CPU_BATCHES = (1, 16, 64)
CPU_HIDDENS = (128, 256, 512)
# --full adds a few of issue 4's larger CPU sizes (batch 8 and 256, hidden 1024, T = 512), not the
# whole product: at hidden 1024 one fwd+bwd call takes up to ~3 s on the 2-core CPU.
CPU_FULL_LARGE = (
    {"T": 64, "B": 8, "H": 1024}, {"T": 64, "B": 64, "H": 1024}, {"T": 64, "B": 256, "H": 512},
    {"T": 64, "B": 256, "H": 1024}, {"T": 512, "B": 8, "H": 512},
    # batch 8 at the grid's hidden sizes: issue 4's ">= 1.5x at batch <= 8" is checked there too.
    {"T": 64, "B": 8, "H": 128}, {"T": 64, "B": 8, "H": 256}, {"T": 64, "B": 8, "H": 512},
)

# GPU grid. Quick: bf16, short and long sequences, a few batches and sizes; full adds every size,
# fp16 and fp32, the variants.
GPU_SEQ_LENS = (128, 512, 1024)
GPU_BATCHES = (1, 16, 64, 256)
GPU_HIDDENS = (256, 1024, 2048)
QUICK_GPU_SEQ_LENS = (128, 1024)
QUICK_GPU_BATCHES = (1, 64, 256)
QUICK_GPU_HIDDENS = (256, 1024, 2048)

# --full: variants of the base shapes below, one feature at a time, then the usual stack of 2
# bidirectional layers. The projection is P = H/4, as in the LSTMP (speech) models.
CPU_VARIANT_BASES = ({"T": 64, "B": 16, "H": 256}, {"T": 256, "B": 64, "H": 512})
GPU_VARIANT_BASES = ({"T": 512, "B": 64, "H": 1024}, {"T": 1024, "B": 256, "H": 1024})


def _shape(T: int, B: int, H: int, **extra: int) -> dict[str, int]:
    shape = {"T": T, "B": B, "I": H, "H": H}
    shape.update({key: value for key, value in extra.items() if value != SHAPE_DEFAULTS[key]})
    return shape


def _variants(bases: tuple[dict[str, int], ...]) -> list[dict[str, int]]:
    return [
        _shape(**base, **variant)
        for base in bases
        for variant in ({"L": 2}, {"D": 2}, {"P": base["H"] // 4}, {"ragged": 1}, {"L": 2, "D": 2})
    ]


def shapes(device: str, full: bool) -> list[dict[str, int]]:
    if device == "cpu":
        seq_lens = CPU_FULL_SEQ_LENS if full else CPU_SEQ_LENS
        grid = [_shape(T, B, H) for T in seq_lens for H in CPU_HIDDENS for B in CPU_BATCHES]
        return grid + [_shape(**large) for large in CPU_FULL_LARGE] + _variants(CPU_VARIANT_BASES) if full else grid
    if full:
        return [_shape(T, B, H) for T in GPU_SEQ_LENS for H in GPU_HIDDENS for B in GPU_BATCHES] + _variants(
            GPU_VARIANT_BASES
        )
    return [_shape(T, B, H) for T in QUICK_GPU_SEQ_LENS for H in QUICK_GPU_HIDDENS for B in QUICK_GPU_BATCHES]


def dtypes(device: str, full: bool) -> tuple[torch.dtype, ...]:
    if device == "cpu":
        return (torch.float32, torch.bfloat16) if full else (torch.float32,)
    return (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,)


def _dims(shape: dict[str, int]) -> tuple[int, int, int, int, int, int, int, bool]:
    """(T, B, I, H, L, D, P, ragged) with the defaults filled in; P = H when there is no projection."""
    get = lambda key: shape.get(key, SHAPE_DEFAULTS[key])  # noqa: E731
    H = shape["H"]
    return shape["T"], shape["B"], shape["I"], H, get("L"), get("D"), get("P") or H, bool(get("ragged"))


def ragged_lengths(T: int, B: int) -> list[int]:
    """The sequence lengths of a ragged batch, longest first: evenly from T down to max(T//4, 1)."""
    shortest = max(T // 4, 1)
    return [T - (b * (T - shortest)) // max(B - 1, 1) for b in range(B)]


def steps(shape: dict[str, int]) -> int:
    """N, the (sequence, step) pairs each layer and direction runs: T·B, or the lengths' sum if ragged."""
    T, B, *_, ragged = _dims(shape)
    return sum(ragged_lengths(T, B)) if ragged else T * B


def _layer_inputs(shape: dict[str, int]) -> list[int]:
    """The input width of each layer: I, then D·P (the directions' outputs, concatenated)."""
    _, _, I, _, L, D, P, _ = _dims(shape)
    return [I] + [D * P] * (L - 1)


# ------------------------------------------------------------------------------ cost formulas
def forward_flops(shape: dict[str, int]) -> int:
    """Σ over layers and directions of the GEMMs of N = T·B steps (the lengths' sum if ragged):

      2·N·4H·(I_l + P)   the gates: input and recurrent GEMMs (P = H without a projection)
      + 2·N·P·H          the projection h = (o·tanh c)·W_hrᵀ, with proj_size P only
    I_l = I for the first layer, D·P above it. Without a projection this is DESIGN.md's
    2·T·B·4H·(I+H) per layer and direction. The gate pointwise work (~10 ops per N·H element) is
    under 1% at H >= 128 and is left out, as for every GEMM-bound op."""
    _, _, _, H, _, D, P, _ = _dims(shape)
    N = steps(shape)
    projection = 2 * N * P * H if P != H else 0
    return D * sum(2 * N * 4 * H * (I_l + P) + projection for I_l in _layer_inputs(shape))


def flops(case: Case) -> int:
    """Forward FLOPs × 1 (fwd), × 2 (bwd: grad-input and grad-weight GEMMs), × 3 (fwd+bwd)."""
    return forward_flops(case.shape) * GEMM_FLOP_FACTOR[case.mode]


def bytes_moved(case: Case) -> int:
    """Minimum memory traffic in the input dtype (E bytes per element) of a kernel that runs one
    layer and direction over the whole sequence, keeping the 4H gates and the state on chip between
    steps. Per layer and direction, with N steps (as in forward_flops), input width I_l, weights
    W = 4H·(I_l + P) (+ P·H with a projection) and biases 8H:

      forward  = E·[ N·I_l + B·P + B·H       read x, h_0, c_0
                   + W + 8H                  read the weights and biases
                   + N·P + B·P + B·H ]       write output, h_n, c_n
               = E·[ N·(I_l + P) + 2·B·(P + H) + W + 8H ]
      backward = E·[ N·P + B·P + B·H         read grad output, grad h_n, grad c_n
                   + N·I_l + B·P + B·H       read x, h_0, c_0
                   + N·P + 2·N·H             read output (h_t); the cell states c_t, written by the
                                             training forward and read back (gates are recomputed)
                   + W                       read the weights
                   + N·I_l + B·P + B·H       write grad x, grad h_0, grad c_0
                   + W + 8H ]                write the weight and bias gradients
               = E·[ 2·N·(I_l + P + H) + 3·B·(P + H) + 2·W + 8H ]
    Summed over layers and directions (a layer's output is written, then read by the next layer);
    fwd+bwd is the sum of both.
    """
    _, B, _, H, _, D, P, _ = _dims(case.shape)
    N = steps(case.shape)
    projection = P * H if P != H else 0
    forward = backward = 0
    for I_l in _layer_inputs(case.shape):
        W = 4 * H * (I_l + P) + projection
        forward += N * (I_l + P) + 2 * B * (P + H) + W + 8 * H
        backward += 2 * N * (I_l + P + H) + 3 * B * (P + H) + 2 * W + 8 * H
    count = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[case.mode]
    return torch.finfo(case.dtype).bits // 8 * D * count


# ------------------------------------------------------------------------------ inputs and reference
def _module_args(case: Case) -> dict[str, int | bool]:
    _, _, I, H, L, D, P, _ = _dims(case.shape)
    return dict(input_size=I, hidden_size=H, num_layers=L, bidirectional=D == 2, proj_size=P if P != H else 0)


def weight_names(case: Case) -> list[str]:
    """The stock module's parameter names, in .parameters() order (weight_ih_l0, ..., *_reverse)."""
    return [name for name, _ in torch.nn.LSTM(**_module_args(case), device="meta").named_parameters()]


def make_inputs(case: Case) -> Inputs:
    """Fresh random inputs, seeded by the case: x, h_0, c_0 ~ N(0, 1); the parameters
    ~ U(-1/sqrt(H), 1/sqrt(H)) like torch.nn.LSTM's init, so the gates are not saturated; upstream
    gradients ~ N(0, 1). Drawn in float32 on the CPU, then cast, so every dtype and device sees the
    same values up to rounding. A ragged case's x is the packed data (N, I), with batch_sizes (int64,
    on the CPU as PackedSequence keeps it), sorted_indices and unsorted_indices beside it."""
    T, B, _, H, L, D, P, ragged = _dims(case.shape)
    args = _module_args(case)
    gen = torch.Generator().manual_seed(case.seed)
    bound = 1.0 / math.sqrt(H)

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen)

    values = {"x": normal(T, B, args["input_size"]), "h0": normal(L * D, B, P), "c0": normal(L * D, B, H)}
    for name, param in torch.nn.LSTM(**args, device="meta").named_parameters():
        values[name] = (torch.rand(*param.shape, generator=gen) * 2 - 1) * bound
    indices = {}
    if ragged:
        lengths = torch.tensor(ragged_lengths(T, B))[torch.randperm(B, generator=gen)]
        packed = pack_padded_sequence(values["x"], lengths, enforce_sorted=False)
        values["x"] = packed.data
        indices = {
            "batch_sizes": packed.batch_sizes,
            "sorted_indices": packed.sorted_indices.to(case.device),
            "unsorted_indices": packed.unsorted_indices.to(case.device),
        }
    if case.mode != "fwd":
        values["grad_output"] = normal(*values["x"].shape[:-1], D * P)
        values["grad_h_n"], values["grad_c_n"] = normal(L * D, B, P), normal(L * D, B, H)
    inputs = {name: t.to(device=case.device, dtype=case.dtype) for name, t in values.items()}
    if case.mode != "fwd":
        for name in INPUT_GRADS:
            inputs[name].requires_grad_(True)
    return {**inputs, **indices}


INPUT_GRADS = ("x", "h0", "c0")
GRAD_OUTPUTS = ("grad_output", "grad_h_n", "grad_c_n")


def _forward(module: torch.nn.Module, inputs: Inputs) -> Outputs:
    """(output, h_n, c_n); a ragged case's output is the packed data (N, D·P)."""
    x = inputs["x"]
    if "batch_sizes" in inputs:
        x = PackedSequence(x, inputs["batch_sizes"], inputs["sorted_indices"], inputs["unsorted_indices"])
    output, (h_n, c_n) = module(x, (inputs["h0"], inputs["c0"]))
    if isinstance(output, PackedSequence):
        output = output.data
    return output, h_n, c_n


def _loaded(module: torch.nn.Module, case: Case, inputs: Inputs) -> torch.nn.Module:
    module.load_state_dict({name: inputs[name] for name in weight_names(case)})
    return module


def _stock(case: Case, inputs: Inputs, dtype: torch.dtype | None = None) -> torch.nn.Module:
    return _loaded(torch.nn.LSTM(**_module_args(case), device=case.device, dtype=dtype or case.dtype), case, inputs)


def _drop_in(case: Case, inputs: Inputs) -> torch.nn.Module:
    return _loaded(bigkernels.nn.LSTM(**_module_args(case), device=case.device, dtype=case.dtype), case, inputs)


def reference_outputs(case: Case, inputs: Inputs) -> Outputs:
    """A float64 copy of the stock torch.nn.LSTM, on the case's device, in provider output order:
    (output, h_n, c_n) for fwd; grads of (x, h_0, c_0, *parameters) for bwd; both for fwd+bwd.
    The stock module rather than bigkernels.reference.lstm_layer per layer: it shares no code with
    bigkernels.nn.LSTM (packing, directions, projection, layer stacking included), and the Python
    reference's per-step autograd graph keeps about ten B×H tensors per step, ~40 GB in float64
    at T=1024, B=256, H=2048."""
    ref = float64_copy(inputs, case.device)
    module = _stock(case, ref, torch.float64)
    leaves = [ref[name] for name in INPUT_GRADS] + list(module.parameters())
    grad_outputs = [ref[name] for name in GRAD_OUTPUTS] if case.mode != "fwd" else []
    return make_step(case.mode, lambda: _forward(module, ref), leaves, grad_outputs).next_call()()


# ------------------------------------------------------------------------------ providers
MODULES = ModulePair(
    bigkernels_module=_drop_in,
    stock_module=_stock,
    forward=_forward,
    input_grads=INPUT_GRADS,
    grad_outputs=GRAD_OUTPUTS,
    compile_bigkernels=True,
)


def providers(case: Case, full: bool) -> tuple[list[Provider], dict[str, str]]:
    runnable, skipped = module_providers(OP, case, full, MODULES)
    if case.shape.get("ragged"):
        # Documented in bigkernels.nn.LSTM: a PackedSequence's batch_sizes are read on the host,
        # which breaks the graph; fullgraph=True then fails ("Could not guard on data-dependent
        # expression"), and without it the row would time a half-compiled module.
        compiled = [p.name for p in runnable if p.name.endswith("+compile")]
        runnable = [p for p in runnable if p.name not in compiled]
        skipped.update({name: RAGGED_COMPILE_SKIP for name in compiled})
    return runnable, skipped


RAGGED_COMPILE_SKIP = (
    "not on ragged (packed) cases: bigkernels.nn.LSTM reads a PackedSequence's batch_sizes on the host, "
    "a graph break under torch.compile(fullgraph=True)"
)


BENCH = OpBench(
    name=OP,
    shapes=shapes,
    dtypes=dtypes,
    make_inputs=make_inputs,
    flops=flops,
    bytes=bytes_moved,
    reference=reference_outputs,
    providers=providers,
    plot_x="B",
    shape_defaults=SHAPE_DEFAULTS,
)
