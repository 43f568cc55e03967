"""The standard contenders of an op that has a drop-in module: bigkernels (the automatic choice),
bigkernels[<backend>] (each backend forced), torch, torch.compile, and optionally torch.compile of the bigkernels module (bigkernels[<backend>]+compile).

An op file describes its module pair with a `ModulePair`; `module_providers` turns it into the
providers of a case. Ops without a module (functional only) write their providers by hand with the
same Provider/Step types.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

import bigkernels
from bigkernels import _backend
from bigkernels.bench.cases import Case, Inputs, Outputs, Provider, Step, make_step

TORCH = "torch"  # stock eager: the baseline every speedup is measured against
AUTO = "bigkernels"  # no backend forced: the chooser's pick on this machine (what a user gets)
TORCH_COMPILE = "torch.compile"


def bigkernels_provider_name(backend: Optional[str]) -> str:
    """"bigkernels" for the automatic choice (backend None), "bigkernels[<backend>]" when forced."""
    return AUTO if backend is None else f"bigkernels[{backend}]"


@contextlib.contextmanager
def forced(backend: Optional[str]) -> Iterator[None]:
    """use_backend(backend), or nothing for the automatic choice."""
    if backend is None:
        yield
    else:
        with bigkernels.use_backend(backend):
            yield


def compiled_provider_name(backend: str) -> str:
    """torch.compile of the bigkernels module on `backend`. Named bigkernels... so that its failure
    fails the run (cli.py) and it counts as a bigkernels provider in the reports."""
    return f"bigkernels[{backend}]+compile"


@dataclass(frozen=True)
class ModulePair:
    """How to race an op through modules.

    bigkernels_module / stock_module: build the drop-in and the stock module holding the case's
        weights (taken from the inputs), on the case's device and dtype.
    forward: call a module on the inputs, returning the outputs in the reference's order.
    input_grads: names of the inputs whose gradients are checked, in the reference's order; the
        module's parameters (in .parameters() order) follow them.
    grad_outputs: names of the inputs holding the upstream gradient of each output.
    compile_bigkernels: also race torch.compile(fullgraph=True) of the bigkernels module, per
        compiled backend (not the reference backend, whose Python loops would be unrolled).
    """

    bigkernels_module: Callable[[Case, Inputs], torch.nn.Module]
    stock_module: Callable[[Case, Inputs], torch.nn.Module]
    forward: Callable[[torch.nn.Module, Inputs], Outputs]
    input_grads: Sequence[str]
    grad_outputs: Sequence[str]
    compile_bigkernels: bool = False


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


def _bigkernels(backend: Optional[str], pair: ModulePair) -> Provider:
    def build(case: Case, inputs: Inputs) -> Step:
        module = pair.bigkernels_module(case, inputs)

        def call(inputs: Inputs) -> Outputs:
            # A forced backend runs that backend's kernel whatever is faster, so its row says how
            # our kernel itself does; the automatic row is what a user gets.
            with forced(backend):
                return pair.forward(module, inputs)

        return _step_for(case, inputs, pair, module, call)

    return Provider(bigkernels_provider_name(backend), build)


def _torch_eager(pair: ModulePair) -> Provider:
    def build(case: Case, inputs: Inputs) -> Step:
        module = pair.stock_module(case, inputs)
        return _step_for(case, inputs, pair, module, lambda inputs: pair.forward(module, inputs))

    return Provider(TORCH, build)


_dynamo_reset_for: Optional[weakref.ref] = None


def _fresh_dynamo_cache(inputs: Inputs) -> None:
    """torch._dynamo.reset(), once per case (per set of inputs): a module's forward is one code
    object, and after torch._dynamo.config.recompile_limit shapes Dynamo would silently fall back
    to eager. Once, not per provider: a reset also drops the code an earlier provider of the same
    case compiled, which would then compile again inside its timing warm-up."""
    global _dynamo_reset_for
    key = next(iter(inputs.values()))
    if _dynamo_reset_for is None or _dynamo_reset_for() is not key:
        torch._dynamo.reset()
        _dynamo_reset_for = weakref.ref(key)


def _bigkernels_compile(backend: str, pair: ModulePair) -> Provider:
    def build(case: Case, inputs: Inputs) -> Step:
        _fresh_dynamo_cache(inputs)
        module = pair.bigkernels_module(case, inputs)
        compiled = torch.compile(module, fullgraph=True, dynamic=False)  # as _torch_compile below

        def call(inputs: Inputs) -> Outputs:
            # The backend is chosen when Dynamo traces (on the first call, made inside this block).
            with bigkernels.use_backend(backend):
                return pair.forward(compiled, inputs)

        return _step_for(case, inputs, pair, module, call)

    return Provider(compiled_provider_name(backend), build)


def _torch_compile(pair: ModulePair) -> Provider:
    def build(case: Case, inputs: Inputs) -> Step:
        _fresh_dynamo_cache(inputs)
        module = pair.stock_module(case, inputs)
        # fullgraph: a graph break would time a half-compiled module; better an error in the row.
        # dynamic=False: specialise on this exact shape, as a deployed model would be.
        compiled = torch.compile(module, fullgraph=True, dynamic=False)
        # Compilation happens on the first call, which the runner makes before timing.
        return _step_for(case, inputs, pair, module, lambda inputs: pair.forward(compiled, inputs))

    return Provider(TORCH_COMPILE, build)


def module_providers(op: str, case: Case, full: bool, pair: ModulePair) -> tuple[list[Provider], dict[str, str]]:
    """bigkernels (automatic), bigkernels[<each runnable backend>], [their +compile variants,] torch,
    torch.compile; plus {skipped provider: reason}."""
    backends, skipped = bigkernels_backends(op, case.device, full)
    providers = [_bigkernels(None, pair)] + [_bigkernels(b, pair) for b in backends]
    if pair.compile_bigkernels:
        providers += [_bigkernels_compile(b, pair) for b in backends if b != "reference"]
    providers += [_torch_eager(pair), _torch_compile(pair)]
    return providers, skipped
