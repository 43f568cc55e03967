// Row-major block GEMM for the CPU kernels (attention tiles, conv GEMM tiles):
// C = alpha * op(A) op(B) + beta * C, called from inside at::parallel_for tasks (the BLAS then runs
// single-threaded in each).
//
// The attention tiles are small (64..256 per side) and called millions of times, so the dispatcher
// cost of at::mm per tile would rival the arithmetic; the conv kernels apply their epilogue to each
// GEMM tile while it is still in cache. We call the Fortran BLAS that libtorch_cpu
// carries (MKL in the x86 wheels: sgemm_/dgemm_ are exported there) through WEAK references: if a
// torch build does not export them the references resolve to null at load time and the portable
// loops below take over, so the extension never fails to load because of this.
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));

// MKL's packed single-precision GEMM (CBLAS, 32-bit integers): pack one operand once, then
// multiply against the packed copy many times without MKL repacking it every call (the LSTM's
// per-step recurrent GEMMs, csrc/cpu/lstm_step_gemm.h). Enum values are MKL's CBLAS constants.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}

namespace bigkernels::cpu::blas {

inline bool blas_available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// The packed GEMM above, and its constants (row-major; B the packed operand).
inline bool packed_sgemm_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
         cblas_sgemm_compute != nullptr;
}
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112, kCblasPacked = 151,
              kCblasBMatrix = 162;

// Portable fallback; also the reference for the argument convention. a is m x k (or k x m when
// trans_a), b is k x n (or n x k when trans_b), c is m x n; all row-major with leading dims.
template <typename T>
void gemm_loops(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* crow = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) crow[j] = beta == T(0) ? T(0) : beta * crow[j];
    for (int64_t p = 0; p < k; ++p) {
      const T av = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) crow[j] += av * b[j * ldb + p];
      } else {
        const T* brow = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) crow[j] += av * brow[j];
      }
    }
  }
}

// Row-major C = A B is column-major C^T = B^T A^T: swap the operands and the sizes.
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    gemm_loops(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (!blas_available()) {
    gemm_loops(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ia = static_cast<int>(ldb), ib = static_cast<int>(lda), ic = static_cast<int>(ldc);
  if constexpr (sizeof(T) == 4) {
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ia, a, &ib, &beta, c, &ic);
  } else {
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ia, a, &ib, &beta, c, &ic);
  }
}

}  // namespace bigkernels::cpu::blas
