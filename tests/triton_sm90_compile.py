"""Compile the Triton conv kernels for sm_90 on a machine without a GPU, as the CUDA sources are
compiled by nvcc alone in CI: catches code the interpreter runs but the GPU compiler refuses, and
reports whether the loads were pipelined into tensor-core dots.

Run in a process WITHOUT TRITON_INTERPRET (the interpreter's kernels cannot be compiled):
    python tests/triton_sm90_compile.py    -> one JSON line per kernel
Used by tests/test_conv_triton.py::test_compiles_for_sm90.

The compile specialises the arguments as a launch on channels_last bf16 tensors with 64-channel
multiples would: channel strides equal to 1, the other strides and the pointers 16-divisible.
"""
from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bigkernels.triton import conv  # noqa: E402

# Arguments that are small or arbitrary in real calls (no 16-divisibility promised).
_ARBITRARY = {"N", "H", "W", "P", "Q", "R", "S", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
              "phase_h", "phase_w", "rows_h", "rows_w", "r_first", "r_step", "taps_r", "s_first", "s_step",
              "taps_s", "split_length", "M", "PQ", "rows_per_program",
              "group_taps", "tap_chunks", "tap_span"}
# Channel strides of channels_last tensors (and of channels_last weights): 1, specialised to constants.
_UNIT_STRIDES = {"sx_c", "sw_c", "sy_k", "sdy_k", "ss_k", "sdx_c", "sdw_c", "sgz_k"}
_FLOAT32_POINTERS = {"dw_ptr", "bias_partial_ptr"}


def compile_kernel(kernel, constexprs: dict, config: triton.Config, dtype: str = "bf16"):
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # autotuned kernels wrap the JITFunction
    names = fn.arg_names
    values = {**constexprs, **config.kwargs, **{name: 1 for name in _UNIT_STRIDES if name in names}}
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in values:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FLOAT32_POINTERS else "*" + dtype
        else:
            signature[name] = "fp32" if name == "negative_slope" else "i32"
        if name.endswith("_ptr") or (signature[name] == "i32" and name not in _ARBITRARY):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in values.items()}, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def main() -> None:
    gelu = conv.ACTIVATIONS.index("gelu")
    cases = [
        ("forward", conv._conv_forward_kernel,
         dict(HAS_BIAS=True, HAS_RESIDUAL=True, STORE_Z=True, ACTIVATION=gelu, DOT_PRECISION="ieee")),
        ("grad_input", conv._conv_grad_input_kernel, dict(ACTIVATION=gelu, FROM_OUTPUT=False, DOT_PRECISION="ieee")),
        ("grad_weight", conv._conv_grad_weight_kernel, dict(ACTIVATION=gelu, FROM_OUTPUT=False, DOT_PRECISION="ieee")),
    ]
    for name, kernel, constexprs in cases:
        config = kernel.configs[0]
        compiled = compile_kernel(kernel, constexprs, config)
        ptx = compiled.asm["ptx"]
        k = config.kwargs
        one_stage = (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * 2  # bytes of one bf16 A + B stage
        print(json.dumps(dict(kernel=name, shared=compiled.metadata.shared, one_stage=one_stage,
                              cp_async="cp.async" in ptx, wgmma="wgmma.mma_async" in ptx)), flush=True)
    gz = compile_kernel(conv._conv_gz_kernel, dict(ACTIVATION=gelu, FROM_OUTPUT=False, STORE_GZ=True, BIAS_GRAD=True,
                                                   BLOCK_M=conv._GZ_BLOCK_M, BLOCK_N=conv._GZ_BLOCK_N),
                        triton.Config({}, num_warps=conv._GZ_WARPS, num_stages=1))
    print(json.dumps(dict(kernel="gz", shared=gz.metadata.shared, one_stage=0, cp_async=False, wgmma=False)))


if __name__ == "__main__":
    main()
