"""One pytest-benchmark benchmark per case × provider of bigkernels.bench's registry (see conftest.py)."""
from __future__ import annotations

import pytest
import torch

from bigkernels.bench.cases import get_op
from bigkernels.bench.runner import max_abs_error


def test_case(benchmark, bench_case):
    case, provider = bench_case
    op = get_op(case.op)
    inputs = op.make_inputs(case)
    try:
        step = provider.build(case, inputs)
        # First call outside the timed region: torch.compile compiles here, kernels initialise lazily.
        outputs = step.next_call()()
    except Exception as exc:  # noqa: BLE001
        if provider.name.startswith("bigkernels"):
            raise
        # A peer that cannot run the case (torch.compile of torch.nn.LSTM: Dynamo refuses it) is
        # recorded, as `bigkernels bench` records it in an error row, not a failed test.
        first_line = (str(exc).strip().splitlines() or [""])[0]
        pytest.skip(f"{provider.name} failed: {type(exc).__name__}: {first_line}")
    error = max_abs_error(outputs, op.reference(case, inputs))

    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    def run(call):
        call()
        sync()  # a GPU call only counts once it has finished

    # Providers of one case share a group, so pytest-benchmark's table puts them side by side.
    benchmark.group = case.id
    benchmark.extra_info.update(
        provider=provider.name, flops=op.flops(case), bytes=op.bytes(case), max_abs_err=error
    )
    if step.fresh is None:
        benchmark(run, step.call)
    else:  # bwd: a fresh forward, untimed, before every timed backward
        benchmark.pedantic(run, setup=lambda: ((step.fresh(),), {}), rounds=20, iterations=1)

