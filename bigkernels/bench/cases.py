"""The benchmark case registry: what gets measured, for every op, in one place.

A *case* is one op at one shape, dtype, mode and device. Each op describes itself once in an
`OpBench` (in bigkernels/bench/<op>.py, named like the op everywhere else): its shape grid, its
FLOP and byte formulas, how to make seeded random inputs, its float64 reference and its providers
(the implementations raced against each other). Adding an op = writing that file and one line in
OP_MODULES below; the runner, reports, CLI and pytest-benchmark suite pick it up unchanged.

Modes:
  fwd      forward only, under torch.no_grad() (inference)
  bwd      backward only: each timed call runs a fresh forward untimed first
  fwd+bwd  forward, then torch.autograd.grad of the outputs w.r.t. inputs and weights (training step)
"""
from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

MODES = ("fwd", "bwd", "fwd+bwd")
DEFAULT_MODES = ("fwd", "fwd+bwd")  # inference and a training step; bwd alone is opt-in (--mode bwd)

# Multiplier on the forward FLOP count of a GEMM-bound op (LSTM, conv): its backward is two GEMMs
# of the forward's size (grad w.r.t. the input, grad w.r.t. the weight). Attention differs (×2.5).
GEMM_FLOP_FACTOR = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}

# Ops and the module defining each one's OpBench (attribute BENCH). Imported on first use so that
# `bigkernels bench --list` does not pay for ops it does not show.
OP_MODULES: dict[str, str] = {
    "lstm_cell": "bigkernels.bench.lstm_cell",
    "lstm": "bigkernels.bench.lstm",
    # ---- attention ----
    "attention": "bigkernels.bench.attention",
    "conv": "bigkernels.bench.conv",  # issue 5
    # --- end-to-end model cases (issue 6): "module:ATTRIBUTE" names an OpBench other than BENCH ---
    "e2e_cnn": "bigkernels.bench.models:CNN_BENCH",
    "e2e_lstm": "bigkernels.bench.models:LSTM_BENCH",
    "e2e_transformer": "bigkernels.bench.models:TRANSFORMER_BENCH",
    # --- end of end-to-end model cases ---
}

DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float64": "fp64", "double": "fp64"}

Inputs = dict[str, Tensor]
Outputs = tuple[Tensor, ...]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (the spelling used in case ids, tables and the CLI)."""
    for name, value in DTYPE_NAMES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def parse_dtype(text: str) -> torch.dtype:
    """"bf16" / "bfloat16" -> torch.bfloat16; ValueError naming the accepted spellings otherwise."""
    key = _DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {text!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]


@dataclass(frozen=True)
class Case:
    """One measurement: op × shape × dtype × mode × device. `shape` maps the op's size names to ints."""

    op: str
    shape: Mapping[str, int]
    dtype: torch.dtype
    mode: str
    device: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    @property
    def shape_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def id(self) -> str:
        return f"{self.op}/{self.mode}/{self.device}/{dtype_name(self.dtype)}/{self.shape_str}"

    @property
    def seed(self) -> int:
        # Stable across runs and processes (hash() is salted per process).
        return zlib.crc32(self.id.encode())

    def __hash__(self) -> int:  # shape is a dict, so the generated hash would fail
        return hash(self.id)


@dataclass
class Step:
    """What a provider hands the timer: a zero-argument call returning the outputs to check.

    `fresh`, when set, is run untimed before every timed call and returns the callable to time;
    backward-only timing needs it, because a graph can be backpropagated through once.
    """

    call: Optional[Callable[[], Outputs]] = None
    fresh: Optional[Callable[[], Callable[[], Outputs]]] = None

    def next_call(self) -> Callable[[], Outputs]:
        return self.fresh() if self.fresh is not None else self.call


@dataclass(frozen=True)
class Provider:
    """One implementation raced in a case. `build` may raise: the runner records the error in the row."""

    name: str
    build: Callable[[Case, Inputs], Step]


@dataclass(frozen=True)
class OpBench:
    """Everything the harness needs to know about one op. See bigkernels/bench/lstm_cell.py."""

    name: str
    shapes: Callable[[str, bool], list[dict[str, int]]]  # (device, full) -> the shape grid
    dtypes: Callable[[str, bool], tuple[torch.dtype, ...]]  # (device, full) -> default dtypes
    make_inputs: Callable[[Case], Inputs]  # fresh, seeded from case.seed
    flops: Callable[[Case], int]
    bytes: Callable[[Case], int]
    reference: Callable[[Case, Inputs], Outputs]  # float64 outputs in the order providers return them
    providers: Callable[[Case, bool], tuple[list[Provider], dict[str, str]]]  # -> (runnable, {skipped: why})
    plot_x: str  # shape key on the x axis of the plots; the other keys pick the panel
    # Values of shape keys that the grid leaves out of a shape when they are at their default (the
    # LSTM's L=1, D=1 ...), so that --shape L=1 still selects those shapes.
    shape_defaults: Mapping[str, int] = field(default_factory=dict)


def op_names() -> tuple[str, ...]:
    return tuple(OP_MODULES)


def get_op(name: str) -> OpBench:
    if name not in OP_MODULES:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(OP_MODULES)}")
    module, _, attribute = OP_MODULES[name].partition(":")  # "module" or "module:ATTRIBUTE"
    return getattr(importlib.import_module(module), attribute or "BENCH")


def select_cases(
    ops: Sequence[str] | None = None,
    modes: Sequence[str] = DEFAULT_MODES,
    dtypes: Sequence[torch.dtype] | None = None,
    device: str = "cpu",
    full: bool = False,
    shape_filter: Mapping[str, int] | None = None,
) -> list[Case]:
    """The cases of `ops` (all when None): the op's grid × dtypes (the op's defaults when None) × modes.

    `shape_filter` keeps the cases whose shape has all the given values (e.g. {"H": 512}); a key a
    shape leaves out counts as its op's shape_defaults value.
    Ordered op, mode, dtype, shape so that reports group naturally.
    """
    cases = []
    for op_name in ops or op_names():
        op = get_op(op_name)
        for mode in modes:
            for dtype in dtypes or op.dtypes(device, full):
                for shape in op.shapes(device, full):
                    if shape_filter and any(
                        shape.get(k, op.shape_defaults.get(k)) != v for k, v in shape_filter.items()
                    ):
                        continue
                    cases.append(Case(op_name, dict(shape), dtype, mode, device))
    return cases


# ----------------------------------------------------------------------- the three modes, generically
def make_step(
    mode: str,
    forward: Callable[[], Outputs],
    grad_leaves: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
) -> Step:
    """Wrap an op's forward call into the Step of `mode`.

    forward:      runs the op on fixed inputs, returns its outputs.
    grad_leaves:  the tensors gradients are taken of (inputs and weights), in the reference's order.
    grad_outputs: the upstream gradient of each output.
    torch.autograd.grad rather than .backward(): nothing accumulates into .grad between calls, and
    the gradients come back to be checked.
    """
    if mode == "fwd":

        def call_fwd() -> Outputs:
            with torch.no_grad():
                return tuple(forward())

        return Step(call=call_fwd)

    def grads_of(outputs: Outputs) -> Outputs:
        return tuple(torch.autograd.grad(outputs, list(grad_leaves), list(grad_outputs)))

    if mode == "fwd+bwd":

        def call_fwd_bwd() -> Outputs:
            outputs = tuple(forward())
            return tuple(o.detach() for o in outputs) + grads_of(outputs)

        return Step(call=call_fwd_bwd)

    def fresh_bwd() -> Callable[[], Outputs]:
        outputs = tuple(forward())
        return lambda: grads_of(outputs)

    return Step(fresh=fresh_bwd)


def float64_copy(inputs: Inputs, device: str | torch.device) -> Inputs:
    """The same values in float64 (exact for every lower precision), with requires_grad kept.
    Integer tensors (a PackedSequence's batch_sizes and indices) are passed through unchanged."""
    return {
        name: t.detach().to(device=device, dtype=torch.float64).requires_grad_(t.requires_grad)
        if t.is_floating_point() else t
        for name, t in inputs.items()
    }

