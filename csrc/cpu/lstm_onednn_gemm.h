// The oneDNN GEMM provider of the CPU LSTM (schema path bit 4, csrc/ops.cpp): the same StepGemm
// policy interface as PackedStepGemm (lstm_step_gemm.h), multiplying through torch's registered
// mkldnn::_linear_pointwise op against a weight that mkldnn::_reorder_linear_weight lays out once
// per call for oneDNN.
//
// Why: MKL's fp32 sgemm takes a slow code path on non-Intel CPUs. Measured on a 2-core AMD EPYC
// (Zen 4, family 25 model 17, AVX-512), torch 2.13, 2 threads, GFLOP/s of MKL packed sgemm (what
// PackedStepGemm runs) -> oneDNN with the reordered weight:
//   per step [B x H] @ [H x 4H]  H = 512:  B = 8  80 -> 173, B = 16 112 -> 199, B = 64 154 -> 216,
//                                          B = 256 175 -> 213
//                                H = 1024: B = 8  34 -> 156, B = 16  58 -> 163, B = 64 117 -> 189,
//                                          B = 256 170 -> 216
//   input projection chunk [256/512 x H] @ [H x 4H]: H = 512 167/178 -> 216/217,
//                                                    H = 1024 149/164 -> 213/222
// oneDNN costs about 15 us per call against MKL's 1-3 us (dispatcher, primitive cache lookup, a
// fresh output tensor), which only tiny steps feel; the measured chooser (bigkernels/ops/lstm.py)
// races the providers per machine and shape, so an Intel CPU where MKL wins keeps MKL.
// The op returns a new tensor, so the result is copied (or, for the accumulating forward step,
// added) into place: one pass over [n x 4H], measured within 1-4 % of the bare call above.
// Float32 only; the caller (csrc/cpu/lstm.cpp) refuses other dtypes and torch builds without oneDNN.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace bigkernels::cpu {

// Whether torch was built with oneDNN and registers the two ops this provider calls.
bool onednn_gemm_available();

class OneDnnStepGemm {
 public:
  // backward = false: gates [n, 4H] += h [n, P] @ w_hh^T.  backward = true: dh [n, P] = dG [n, 4H] @ w_hh.
  // `rows` is the row count most calls run (the batch, or a projection chunk): oneDNN's weight
  // layout is chosen for it; calls of other row counts reuse it (correct, measured no slower
  // than the plain weight at 1-200 rows).
  OneDnnStepGemm(const at::Tensor& w, int64_t rows, bool backward);

  void operator()(const at::Tensor& a, const at::Tensor& c) const;

  // Built on w_ih (backward = false): out [n, 4H] = x [n, I] @ w_ih^T (+ bias, oneDNN's bias term).
  void project(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& bias) const;

 private:
  // y = a @ W^T for linear's weight W ([out, in]): w_hh forward, w_hh^T backward.
  at::Tensor linear(const at::Tensor& a, const std::optional<at::Tensor>& bias) const;

  at::Tensor weight_;  // oneDNN's layout of W
  bool backward_;
};

}  // namespace bigkernels::cpu
