"""pytest-benchmark suite over bigkernels.bench's case registry (the same cases as `bigkernels bench`).

    pytest benchmarks/ --benchmark-only                        quick cases, this machine's device
    pytest benchmarks/ --benchmark-only --bench-full           the full grid
    pytest benchmarks/ --benchmark-only --bench-device cpu -k "fwd/ and B16-I128-H128"

Not part of the test suite (pyproject's testpaths is tests/). Use it for pytest-benchmark's
tooling (--benchmark-compare, --benchmark-json, histograms); `bigkernels bench` gives the
interleaved timings, error and memory columns and the reports.
"""
from __future__ import annotations

import pytest
import torch

from bigkernels.bench.cases import Case, dtype_name, get_op, select_cases


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bigkernels bench")
    group.addoption("--bench-full", action="store_true", help="the full grid (as bigkernels bench --full)")
    group.addoption("--bench-device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")


def test_id(case: Case, provider_name: str) -> str:
    """Like case.id, but spelt so that -k can select it: -k accepts no '=' nor ','."""
    shape = "-".join(f"{k}{v}" for k, v in case.shape.items())
    return f"{case.op}/{case.mode}/{case.device}/{dtype_name(case.dtype)}/{shape}/{provider_name}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `bench_case` with one (case, provider, full) per case × provider of the registry."""
    if "bench_case" not in metafunc.fixturenames:
        return
    full = metafunc.config.getoption("--bench-full")
    device = metafunc.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    params = []
    for case in select_cases(device=device, full=full):
        providers, _skipped = get_op(case.op).providers(case, full)
        params += [pytest.param((case, provider), id=test_id(case, provider.name)) for provider in providers]
    metafunc.parametrize("bench_case", params)
