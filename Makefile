# bigkernels: the two Quickstart commands are `make bench` and `make test`; each sets up what it needs.
#
# Setup makes a virtual environment in $(VENV) that also sees the system's packages (so a machine that
# ships its own torch, e.g. a GPU box with torch+CUDA, keeps it), installs torch only if none is
# importable ($(TORCH_SPEC); the CPU build here), the build and test tools, then builds bigkernels._C
# in place. Override on the command line, e.g. `make test TORCH_SPEC=torch==2.11.0`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEV_DEPS := ninja numpy triton pytest hypothesis expecttest pytest-benchmark matplotlib wheel scikit-learn
BENCH_ARGS ?= --quick
export MAX_JOBS ?= 2

.PHONY: setup bench test cuda-check triton-check gpu-check wheel wheel-check ci clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(DEV_DEPS) "setuptools>=64"
	touch $@

setup: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m bigkernels info

## The main job: the default (quick) benchmark suite; table on screen, CSV/JSON/PNG/markdown in bench-out/.
bench: setup
	$(PY) -m bigkernels.bench $(BENCH_ARGS) --out bench-out

## The tests: everything that runs without a GPU, Triton kernels under the interpreter.
test: setup
	$(PY) -m pytest tests -q

## Compile csrc/cuda/*.cu with nvcc alone for every target arch; fails on a compile error or a spill.
## CUDA_CHECK_ARGS="--archs ci": CI's subset (tools/cuda_archs.py CI_CUDA_ARCHS).
CUDA_CHECK_ARGS ?=
cuda-check: $(VENV)/.deps
	$(PY) tools/check_cuda_build.py $(CUDA_CHECK_ARGS)

## Compile every Triton kernel and kept autotune config for sm_80 and sm_90 (no GPU); fails on a compile
## error, a spill or shared memory above the target's limit. TRITON_CHECK_ARGS="--subset ci" for CI's part.
TRITON_CHECK_ARGS ?=
triton-check: $(VENV)/.deps
	env -u TRITON_INTERPRET $(PY) tools/triton_check.py $(TRITON_CHECK_ARGS)

## On a lent GPU machine: build for its arch, GPU tests, compute-sanitizer, validate, quick bench, all
## under $(GPU_CHECK_OUT) within ~8 minutes. Without a GPU it runs the build checks and says what it skipped.
export GPU_CHECK_OUT ?= gpu-check-out
gpu-check: $(VENV)/.deps
	env -u TRITON_INTERPRET $(PY) tools/gpu_check.py

## Build the wheel (its local version names the target: +cpu or +cu<ver>torch<maj.min>) into dist/.
wheel: $(VENV)/.deps
	rm -rf dist
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .

## Install the wheel into a fresh virtual environment and run one op from outside the source tree.
wheel-check: wheel
	rm -rf .wheel-venv
	$(PYTHON) -m venv .wheel-venv
	.wheel-venv/bin/pip install -q "$(TORCH_SPEC)" numpy dist/bigkernels-*.whl
	cd /tmp && $(CURDIR)/.wheel-venv/bin/python $(CURDIR)/tools/smoke_test_wheel.py

ci: test cuda-check triton-check wheel-check

clean:
	rm -rf build dist bench-out gpu-check-out .wheel-venv *.egg-info bigkernels/_C*.so bigkernels/_build_info.py
