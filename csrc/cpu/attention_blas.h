// The attention kernels' name for the shared row-major GEMM (csrc/cpu/blas.h).
#pragma once
#include "blas.h"

namespace bigkernels::cpu::attention_detail {
using blas::blas_available;
using blas::gemm;
using blas::gemm_loops;
}  // namespace bigkernels::cpu::attention_detail
