"""The standard contenders of an op that has a drop-in module: bigkernels[<backend>], torch, torch.compile.

An op file describes its module pair with a `ModulePair`; `module_providers` turns it into the
providers of a case. Ops without a module (functional only) write their providers by hand with the
same Provider/Step types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

import bigkernels
from bigkernels import _backend
from bigkernels.bench.cases import Case, Inputs, Outputs, Provider, Step, make_step

TORCH = "torch"  # stock eager: the baseline every speedup is measured against
TORCH_COMPILE = "torch.compile"


def bigkernels_provider_name(backend: str) -> str:
    return f"bigkernels[{backend}]"


@dataclass(frozen=True)
class ModulePair:
    """How to race an op through modules.

    bigkernels_module / stock_module: build the drop-in and the stock module holding the case's
        weights (taken from the inputs), on the case's device and dtype.
    forward: call a module on the inputs, returning the outputs in the reference's order.
    input_grads: names of the inputs whose gradients are checked, in the reference's order; the
        module's parameters (in .parameters() order) follow them.
    grad_outputs: names of the inputs holding the upstream gradient of each output.
    """

    bigkernels_module: Callable[[Case, Inputs], torch.nn.Module]
    stock_module: Callable[[Case, Inputs], torch.nn.Module]
    forward: Callable[[torch.nn.Module, Inputs], Outputs]
    input_grads: Sequence[str]
    grad_outputs: Sequence[str]


def bigkernels_backends(op: str, device: str, full: bool) -> tuple[list[str], dict[str, str]]:
    """The bigkernels backends worth timing for `op` on `device`, and why each other one is skipped."""
    dev = torch.device(device)
    runnable, skipped = [], {}
    for backend in _backend.BACKENDS:
        name = bigkernels_provider_name(backend)
        reason = _backend.unavailable_reason(backend, op, dev)
        if backend == "triton" and dev.type == "cpu":
            reason = "Triton on CPU runs under the interpreter, which is a correctness tool, not a benchmark"
        elif backend == "reference" and not full:
            reason = "plain-PyTorch reference: timed with --full only"
        if reason is None:
            runnable.append(backend)
        else:
            skipped[name] = reason
    return runnable, skipped


def _step_for(
    case: Case, inputs: Inputs, pair: ModulePair, module: torch.nn.Module, call_module: Callable[[Inputs], Outputs]
) -> Step:
    leaves: list[Tensor] = [inputs[name] for name in pair.input_grads] + list(module.parameters())
    grad_outputs = [inputs[name] for name in pair.grad_outputs] if case.mode != "fwd" else []
    return make_step(case.mode, lambda: call_module(inputs), leaves, grad_outputs)


def _bigkernels(backend: str, pair: ModulePair) -> Provider:
    def build(case: Case, inputs: Inputs) -> Step:
        module = pair.bigkernels_module(case, inputs)

        def call(inputs: Inputs) -> Outputs:
            # Forcing the backend (rather than letting bigkernels pick) makes the row name honest.
            with bigkernels.use_backend(backend):
                return pair.forward(module, inputs)

        return _step_for(case, inputs, pair, module, call)

    return Provider(bigkernels_provider_name(backend), build)


def _torch_eager(pair: ModulePair) -> Provider:
    def build(case: Case, inputs: Inputs) -> Step:
        module = pair.stock_module(case, inputs)
        return _step_for(case, inputs, pair, module, lambda inputs: pair.forward(module, inputs))

    return Provider(TORCH, build)


def _torch_compile(pair: ModulePair) -> Provider:
    def build(case: Case, inputs: Inputs) -> Step:
        # A fresh Dynamo cache per case: the stock module's forward is one code object, and after
        # torch._dynamo.config.recompile_limit shapes Dynamo would silently fall back to eager.
        torch._dynamo.reset()
        module = pair.stock_module(case, inputs)
        # fullgraph: a graph break would time a half-compiled module; better an error in the row.
        # dynamic=False: specialise on this exact shape, as a deployed model would be.
        compiled = torch.compile(module, fullgraph=True, dynamic=False)
        # Compilation happens on the first call, which the runner makes before timing.
        return _step_for(case, inputs, pair, module, lambda inputs: pair.forward(compiled, inputs))

    return Provider(TORCH_COMPILE, build)


def module_providers(op: str, case: Case, full: bool, pair: ModulePair) -> tuple[list[Provider], dict[str, str]]:
    """bigkernels[<each runnable backend>], torch, torch.compile; plus {skipped provider: reason}."""
    backends, skipped = bigkernels_backends(op, case.device, full)
    providers = [_bigkernels(b, pair) for b in backends] + [_torch_eager(pair), _torch_compile(pair)]
    return providers, skipped
