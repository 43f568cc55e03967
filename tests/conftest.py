"""Test setup shared by every test file.

- Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter; it must be switched
  on before triton (or bigkernels) is imported, so it happens here, first.
- `cuda`-marked tests are skipped, with the reason shown, where no GPU is visible.
- Tuning is off (BIGKERNELS_TUNE=off) unless a test turns it on, and the cache is a temporary folder.
"""
import os
import tempfile

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests check our kernels: automatic calls take the static heuristic (our kernel), not a timed
# choice that could hand a test's shape to the stock op. tests/test_chooser.py turns tuning on where
# it tests it, with a cache directory of its own; no test writes to the user's cache.
os.environ.setdefault("BIGKERNELS_TUNE", "off")
os.environ.setdefault("BIGKERNELS_CACHE_DIR", tempfile.mkdtemp(prefix="bigkernels-test-cache-"))

import pytest  # noqa: E402

import bigkernels  # noqa: E402,F401  (after TRITON_INTERPRET is set)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture
def poison_empty():
    """Fill every torch.empty with NaN while the test runs (deterministic mode's
    fill_uninitialized_memory), so an output element a kernel forgets to write fails the check."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs: for tiny models a second thread only adds contention
    (several times slower on a busy 2-core CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
