#!/usr/bin/env python3
"""Compile every Triton kernel of bigkernels/triton/*.py for sm_80 and sm_90 without a GPU, with every
config a launch may use (the autotune configs its pruning keeps, or the launcher's fixed tiles), and
fail on a compile error, shared memory above the target's limit, or register spills: what
tools/check_cuda_build.py does for the CUDA C++ kernels.

    python tools/triton_check.py [--subset ci] [--targets 80,90] [--only attention] [-j N]

Prints one row per (kernel, case, config, target): registers, spilled bytes, shared memory, and for
sm_90 whether the dots became wgmma. Needs Triton with its NVIDIA backend (its bundled ptxas), no
GPU and no TRITON_INTERPRET (the interpreter's kernels cannot be compiled). Each run compiles into a
fresh Triton cache: a cached kernel would skip ptxas and report nothing.

Specialisation: a case compiles the kernel as a launch on 16-byte aligned tensors would (pointers and
strides divisible by 16, unit strides of the contiguous dimension specialised to 1, sizes arbitrary).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1 (the interpreter's kernels cannot be compiled)")
# Before triton is imported: ptxas's -v report is printed (captured below), into a fresh cache.
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="bigkernels-triton-check-"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is what launches use

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from check_cuda_build import SPILL_RE  # noqa: E402  (one parser of ptxas's spill line)

# Triton's own ptxas names itself "ptxas" or "ptxas-blackwell" in its report.
USED_RE = re.compile(r"ptxas[\w-]* info\s*: Used (?P<regs>\d+) registers")

# Shared memory a block may opt in to (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
FLOAT_SCALARS = {"qk_scale", "scale", "dropout_p", "dropout_scale", "negative_slope", "eps", "keep_c", "keep_h"}
_STRIDE_RE = re.compile(r"^(stride_\w+|s[a-z]*_[a-z]+)$")  # stride_qb, sx_c, sdw_split, s_bias
_TL = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Case:
    module: str
    kernel: str
    label: str
    dtype: str
    constexprs: dict
    configs: list  # triton.Config: what launches of this case may use
    pointers: dict = field(default_factory=dict)  # pointer name -> element type, where not `dtype`
    unit: frozenset = frozenset()  # strides specialised to 1 (the contiguous dimension)
    ci: bool = False  # in the CI subset
    divisible: frozenset = frozenset()  # sizes (not strides) that are multiples of 16 in the case


# ----------------------------------------------------------------------------------------- cases
def attention_cases(m) -> list[Case]:
    unit_q = {"stride_qe", "stride_ke", "stride_ve", "stride_oe", "stride_doe", "stride_dke", "stride_dve",
              "stride_dqe", "stride_ms", "stride_dms", "stride_de"}
    pointers = {"lse_ptr": "fp32", "delta_ptr": "fp32", "cu_q_ptr": "i32", "cu_k_ptr": "i32", "seed_ptr": "i64",
                "keep_ptr": "i8"}
    cases = []
    # (dtype, head dim, dropout, causal, in CI): the head dims models use, float32 where its tiles
    # are largest, and dropout, which the pruning treats apart.
    shapes = [("bf16", 64, False, True, True), ("bf16", 128, False, False, True), ("bf16", 256, False, True, True),
              ("fp32", 64, False, False, False), ("fp32", 128, False, False, False), ("fp32", 256, False, False, True),
              ("bf16", 64, True, False, False), ("bf16", 128, True, True, False)]
    for dtype, dim, dropout, causal, ci in shapes:
        flags = dict(IS_VARLEN=False, HAS_MASK=False, HAS_DROPOUT=dropout, HAS_LEFT=False, HAS_RIGHT=causal,
                     DOT_PRECISION="tf32" if dtype == "fp32" else "ieee", HEAD_DIM=dim, HEAD_DIM_V=dim,
                     BLOCK_E=dim, BLOCK_EV=dim)
        named = dict(flags, q_ptr=torch.empty(0, dtype=_TORCH[dtype]))
        label = f"{dtype} d{dim}" + (" dropout" if dropout else "") + (" causal" if causal else "")
        for kernel, kind, configs, extra in (
                ("_attention_forward_kernel", "forward", m.FORWARD_CONFIGS, {}),
                ("_attention_backward_dkdv_kernel", "dkdv", m.DKDV_CONFIGS, {"STORE_MASK_GRAD": False}),
                ("_attention_backward_dq_kernel", "dq", m.DQ_CONFIGS, {})):
            kept = m._pruner(kind, configs)(list(configs.values()), named)
            cases.append(Case("attention", kernel, label, dtype, {**flags, **extra}, kept, pointers,
                              frozenset(unit_q), ci))
    cases.append(Case("attention", "_attention_backward_delta_kernel", "bf16 d128", "bf16", {"BLOCK_EV": 128},
                      [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3)], pointers, frozenset(unit_q), True))
    cases.append(Case("attention", "_dropout_keep_mask_kernel", "mask", "bf16", {},
                      [triton.Config({"BLOCK_M": m._MASK_BLOCK_M, "BLOCK_N": m._MASK_BLOCK_N}, num_warps=4,
                                     num_stages=3)], pointers,
                      frozenset(), True))
    return cases


def conv_cases(m) -> list[Case]:
    gelu = m.ACTIVATIONS.index("gelu")
    pointers = {"dw_ptr": "fp32", "bias_partial_ptr": "fp32"}
    # channels_last: the channel strides are 1.
    unit = frozenset({"sx_c", "sw_c", "sy_k", "sdy_k", "ss_k", "sdx_c", "sdw_c", "sgz_k", "sr_k"})
    channels = frozenset({"Cg", "Kg", "K"})  # 64-channel multiples, as tests/triton_sm90_compile.py
    cases = []
    for dtype, ci in (("bf16", True), ("fp32", False)):
        precision = "tf32" if dtype == "fp32" else "ieee"
        for kernel, configs, flags in (
                ("_conv_forward_kernel", m._FORWARD_CONFIGS,
                 dict(HAS_BIAS=True, HAS_RESIDUAL=True, STORE_Z=True, ACTIVATION=gelu)),
                ("_conv_grad_input_kernel", m._GRAD_INPUT_CONFIGS, dict(ACTIVATION=gelu, FROM_OUTPUT=False)),
                ("_conv_grad_weight_kernel", m._GRAD_WEIGHT_CONFIGS, dict(ACTIVATION=gelu, FROM_OUTPUT=False))):
            kept = m._prune_configs(configs, {"x_ptr": torch.empty(0, dtype=_TORCH[dtype])})
            cases.append(Case("conv", kernel, f"{dtype} C%64", dtype, dict(flags, DOT_PRECISION=precision), kept,
                              pointers, unit, ci, channels))
    cases.append(Case("conv", "_conv_gz_kernel", "bf16", "bf16",
                      dict(ACTIVATION=gelu, FROM_OUTPUT=False, STORE_GZ=True, BIAS_GRAD=True),
                      [triton.Config({"BLOCK_M": m._GZ_BLOCK_M, "BLOCK_N": m._GZ_BLOCK_N}, num_warps=m._GZ_WARPS,
                                     num_stages=3)], pointers, unit, True, channels))
    return cases


def lstm_cell_cases(m) -> list[Case]:
    cases = []
    for dtype, ci in (("bf16", True), ("fp32", True)):
        size = _TORCH[dtype].itemsize
        tiles = [triton.Config({"BLOCK_B": b, "BLOCK_H": h, "BLOCK_K": m._forward_tiles(batch, size)[2]},
                               num_warps=w, num_stages=m._FORWARD_STAGES) for batch, b, h, w in m._FORWARD_TILES]
        flags = dict(ACC_DTYPE=tl.float32, DOT_PRECISION="tf32" if dtype == "fp32" else "ieee")
        cases.append(Case("lstm_cell", "_lstm_cell_forward_kernel", dtype, dtype,
                          dict(flags, HAS_BIAS=True, STORE_GATES=True), tiles, ci=ci))
        cases.append(Case("lstm", "_lstm_step_forward_kernel", dtype, dtype, dict(flags, STORE_WORKSPACE=True),
                          tiles, ci=ci))
        cases.append(Case("lstm_cell", "_lstm_cell_backward_kernel", dtype, dtype,
                          dict(STORE_GRAD_GATES=True, BIAS_GRAD=True, ACC_DTYPE=tl.float32),
                          [triton.Config({"BLOCK_B": m._BACKWARD_BLOCK_B, "BLOCK_H": m._BACKWARD_MAX_BLOCK_H},
                                         num_warps=m._BACKWARD_WARPS, num_stages=3)],
                          {"grad_bias_ptr": "fp32"}, ci=ci))
    return cases


def lstm_ext_cases(m) -> list[Case]:
    cases = []
    for hidden, ci in ((256, True), (1024, False)):
        config = [triton.Config({"BLOCK_H": hidden}, num_warps=m.row_warps(hidden), num_stages=3)]
        flags = dict(LAYER_NORM=True, ZONE_C=True, MASK_C=True, ZONE_H=True, MASK_H=True, ACC_DTYPE=tl.float32)
        cases.append(Case("lstm_ext", "_ext_step_forward_kernel", f"bf16 H{hidden}", "bf16",
                          dict(flags, STORE_WORKSPACE=True), config, {"norms_ptr": "fp32"}, ci=ci))
        cases.append(Case("lstm_ext", "_ext_step_backward_kernel", f"bf16 H{hidden}", "bf16", flags, config,
                          {"norms_ptr": "fp32"}, ci=ci))
    return cases


CASE_BUILDERS = {"attention": attention_cases, "conv": conv_cases, "lstm_cell": lstm_cell_cases,
                 "lstm": lambda m: [], "lstm_ext": lstm_ext_cases}  # lstm's kernel: with lstm_cell's tiles


def all_cases(only: set | None) -> list[Case]:
    """Every case, after checking that every *_kernel of every module has one (a new kernel must be
    added here, not silently skipped)."""
    import importlib

    cases, kernels = [], set()
    for name, build in CASE_BUILDERS.items():
        module = importlib.import_module(f"bigkernels.triton.{name}")
        kernels |= {(name, k) for k, v in vars(module).items()
                    if k.endswith("_kernel") and isinstance(v, (triton.runtime.JITFunction, triton.runtime.Autotuner))
                    and getattr(v, "fn", v).__module__ == module.__name__}
        cases += build(module)
    missing = kernels - {(c.module, c.kernel) for c in cases}
    if missing:
        raise SystemExit(f"error: no triton-check case for {sorted(missing)}: add one in tools/triton_check.py")
    return [c for c in cases if not only or c.module in only]


# ------------------------------------------------------------------------------------- compiling
@dataclass
class Result:
    case: str
    config: str
    target: int
    regs: int = 0
    spill_bytes: int = 0
    shared: int = 0
    wgmma: bool = False
    seconds: float = 0.0
    error: str = ""

    def failures(self) -> list[str]:
        out = [self.error] if self.error else []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} bytes")
        if self.shared > SHARED_LIMIT[self.target]:
            out.append(f"shared memory {self.shared} > {SHARED_LIMIT[self.target]}")
        return out


def _signature(fn, case: Case, values: dict) -> tuple[dict, dict]:
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in values:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + case.pointers.get(name, case.dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if _STRIDE_RE.match(name) or name in case.divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def config_name(config) -> str:
    tiles = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


def compile_one(case: Case, config, target: int) -> Result:
    import importlib

    module = importlib.import_module(f"bigkernels.triton.{case.module}")
    kernel = getattr(module, case.kernel)
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    values = {**case.constexprs, **config.kwargs, **{n: 1 for n in case.unit if n in fn.arg_names}}
    signature, attrs = _signature(fn, case, values)
    constexprs = {(fn.arg_names.index(k),): v for k, v in values.items() if k in fn.arg_names}
    result = Result(f"{case.kernel} {case.label}", config_name(config), target)
    start = time.monotonic()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", target, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as exc:  # a compile error is a result to report, not a crash of the tool
        result.error = f"compile error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        result.seconds = time.monotonic() - start
        return result
    result.seconds = time.monotonic() - start
    report = log.getvalue()
    if used := USED_RE.search(report):
        result.regs = int(used["regs"])
    result.spill_bytes = sum(int(m["st"]) + int(m["ld"]) for m in SPILL_RE.finditer(report))
    result.shared = compiled.metadata.shared
    result.wgmma = target >= 90 and "wgmma.mma_async" in compiled.asm["ptx"]
    if not used:
        result.error = "no ptxas report (is the kernel cached? TRITON_CACHE_DIR must be fresh)"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=("all", "ci"), default="all",
                        help="ci: the representative cases CI compiles (marked ci=True above)")
    parser.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--only", default="", help="comma-separated modules (attention, conv, lstm_cell, lstm_ext)")
    parser.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or 2))
    args = parser.parse_args()
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        print("error: this Triton build has no NVIDIA backend", file=sys.stderr)
        return 2
    targets = [int(t) for t in args.targets.split(",")]
    cases = [c for c in all_cases(set(filter(None, args.only.split(",")))) if args.subset == "all" or c.ci]
    jobs = [(c, cfg, t) for c in cases for cfg in c.configs for t in targets]
    start = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(compile_one, *zip(*jobs)))
    elapsed = time.monotonic() - start

    width = max(len(r.case) for r in results)
    print(f"{'kernel / case':<{width}}  {'config':<18} {'sm':>3} {'regs':>4} {'spill':>6} {'shared':>7} wgmma  s")
    failed = []
    for r in results:
        wgmma = ("yes" if r.wgmma else "no") if r.target >= 90 else "-"
        problems = r.failures()
        print(f"{r.case:<{width}}  {r.config:<18} {r.target:>3} {r.regs:>4} {r.spill_bytes:>6} {r.shared:>7} "
              f"{wgmma:<5} {r.seconds:3.0f}" + ("  FAIL: " + "; ".join(problems) if problems else ""))
        if problems:
            failed.append(r)
    dots = [r for r in results if r.target >= 90]
    print(f"\n{len(results)} compiles ({len(cases)} cases x configs x targets {targets}) in {elapsed:.0f} s; "
          f"max regs {max(r.regs for r in results)}, max shared {max(r.shared for r in results)} bytes, "
          f"wgmma in {sum(r.wgmma for r in dots)}/{len(dots)} sm_90 compiles")
    if failed:
        print(f"error: {len(failed)} compile(s) failed, spill or exceed shared memory", file=sys.stderr)
        return 1
    print("ok: no compile error, no spill, shared memory within every target's limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
