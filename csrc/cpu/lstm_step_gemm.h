// The per-step recurrent GEMM of the generic CPU LSTM path (the StepGemm policy of
// csrc/common/lstm_layer.h), multiplying against a copy of w_hh that MKL packs once per call; the
// same class, built on w_ih, runs the input projection of each chunk of steps (project()).
//
// Why: at::addmm / at::mm on a step's few rows make MKL re-pack the whole of w_hh (4H x P) into
// its internal layout on every call, once per time step. Packing it once (cblas_sgemm_pack) and
// calling cblas_sgemm_compute per step measured 1.2-2.6x faster per step on the 2-core Sapphire
// Rapids (fp32, 2 threads: [64 x 512] @ [512 x 2048] 524 -> 373 us, [8 x 1024] @ [1024 x 4096]
// 884 -> 335 us, [256 x 512] @ [512 x 2048] 1715 -> 1447 us). Float32 only; other dtypes, a
// torch without MKL's packed GEMM, and steps whose row count differs from the one packed for
// (packed sequences past their longest steps) take the ATen GEMM.
// The input projection, a chunk of a few hundred rows at a time (projection_chunks), pays the
// same repacking of w_ih once per chunk: packed once per call it measured 6.7 -> 5.5 ms per
// [256 x 1024] @ [1024 x 4096] chunk and 3.2 -> 2.8 ms per [512 x 512] @ [512 x 2048] one (the
// chunks of hidden 1024 and 512 at T = 64, batch 64); packing all of w_ih costs 0.8 ms at 1024.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "blas.h"

namespace bigkernels::cpu {

class PackedStepGemm {
 public:
  // Below this many rows MKL's GEMV-like path on the unpacked w_hh is as fast per step, and the
  // packed path measured slower overall at batch 1 (hidden 1024: 24 -> 36 ms for T = 64).
  static constexpr int64_t kMinPackedRows = 8;

  // backward = false: gates [n, 4H] += h [n, P] @ w_hh^T.  backward = true: dh [n, P] = dG [n, 4H] @ w_hh.
  // `rows` is the row count most steps run (the batch): the packed copy serves steps of that many rows.
  PackedStepGemm(const at::Tensor& w_hh, int64_t rows, bool backward)
      : w_(w_hh), rows_(rows), backward_(backward) {
    if (w_hh.scalar_type() != at::kFloat || rows < kMinPackedRows || !blas::packed_sgemm_available()) {
      return;
    }
    const int64_t gates = w_hh.size(0), P = w_hh.size(1);
    if (std::max({rows, gates, P}) > INT32_MAX / 2) return;  // MKL's 32-bit integer interface
    const at::Tensor w = w_hh.contiguous();
    const int m = static_cast<int>(rows);
    n_ = static_cast<int>(backward ? P : gates);
    k_ = static_cast<int>(backward ? gates : P);
    const size_t bytes = ::cblas_sgemm_pack_get_size(blas::kCblasBMatrix, m, n_, k_);
    packed_ = at::empty({static_cast<int64_t>(bytes / sizeof(float)) + 1}, w.options());
    // B = w_hh^T (forward: w_hh is [4H, P] row-major, read transposed) or w_hh itself (backward).
    ::cblas_sgemm_pack(blas::kCblasRowMajor, blas::kCblasBMatrix,
                           backward ? blas::kCblasNoTrans : blas::kCblasTrans, m, n_, k_, 1.0f,
                           w.const_data_ptr<float>(), static_cast<int>(P),
                           packed_.mutable_data_ptr<float>());
  }

  void operator()(const at::Tensor& a, const at::Tensor& c) const { multiply(a, c, !backward_); }

  // Built on w_ih (backward = false, rows = the chunks' row count): out [n, 4H] = x [n, I] @ w_ih^T
  // (+ bias). The CPU's pointwise pass adds the biases (CpuPointwise::kAddsBias), so the packed
  // GEMM runs without them; a bias given here takes ATen's addmm.
  void project(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& bias) const {
    if (bias.has_value()) {
      at::Tensor dst = out;
      at::addmm_out(dst, *bias, x, w_.t());
      return;
    }
    multiply(x, out, /*accumulate=*/false);
  }

 private:
  // c = a @ op(w) (accumulate: c += a @ op(w)), op(w) = w^T forward, w backward.
  void multiply(const at::Tensor& a, const at::Tensor& c, bool accumulate) const {
    const int64_t n = a.size(0);
    if (packed_.defined() && n == rows_ && a.is_contiguous() && c.is_contiguous()) {
      ::cblas_sgemm_compute(blas::kCblasRowMajor, blas::kCblasNoTrans, blas::kCblasPacked,
                            static_cast<int>(n), n_, k_, a.const_data_ptr<float>(), k_,
                            packed_.const_data_ptr<float>(), n_, accumulate ? 1.0f : 0.0f,
                            c.mutable_data_ptr<float>(), n_);
      return;
    }
    at::Tensor out = c;
    const at::Tensor w = backward_ ? w_ : w_.t();
    if (accumulate) out.addmm_(a, w);
    else at::mm_out(out, a, w);
  }


  at::Tensor w_, packed_;
  int64_t rows_;
  bool backward_;
  int n_ = 0, k_ = 0;
};

}  // namespace bigkernels::cpu
