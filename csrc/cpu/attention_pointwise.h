// Row-wise pointwise steps of the CPU flash attention: max, exp-and-sum, the backward's dS.
//
// The float versions use a polynomial 2^x (arithmetic only): hand-written AVX-512 where the CPU has
// it, else loops compiled once per instruction set (target_clones) that the compiler vectorises
// (`#pragma omp simd reduction` vectorises the sums and maxima without -ffast-math). double uses
// libm: it is the precision reference and the gradcheck dtype.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fast_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(__clang__)
#define BK_ATT_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BK_ATT_MULTIVERSION
#endif

namespace bigkernels::cpu::attention_detail {

// Score units. The float kernels keep scores in base-2 units: the Q K^T GEMM's alpha is
// scale * log2(e) (and a mask is multiplied by log2(e) when it is added), so a probability is
// 2^(s - max) and the exponential needs no multiply by log2(e) per element. double stays in natural
// units (e^(s - max) through libm): it is the precision reference. kScoreUnit converts a natural
// log into score units; unit_exp / unit_log are the exponential and logarithm of those units.
template <typename T>
constexpr T kScoreUnit = T(1);
template <>
constexpr float kScoreUnit<float> = 1.44269504088896341f;  // log2(e)

inline float unit_exp(float x) { return std::exp2(x); }
inline double unit_exp(double x) { return std::exp(x); }
inline float unit_log(float x) { return std::log2(x); }
inline double unit_log(double x) { return std::log(x); }

// 2^x for x <= 0 (every caller passes scores minus their row maximum or their log-sum-exp), and
// exactly 0 below the float range: masked scores are -inf, and their probability must be 0, not
// 2^-126, so that a masked key contributes nothing to any gradient. 2^x = 2^n 2^f with
// n = round(x), |f| <= 1/2; 2^f by a degree-5 polynomial (relative error <= 1.4e-7 on |f| <= 1/2,
// about one float ulp). NaN propagates (the comparison is false for it).
constexpr float kExp2Poly[6] = {1.0000001192092896f, 0.6931469440460205f, 0.24022120237350464f,
                                0.05550742521882057f, 0.009675469249486923f, 0.0013266978785395622f};

BK_ALWAYS_INLINE float exp2_or_zero(float x) {
  const bool underflow = x < -126.0f;
  x = underflow ? -126.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x + shifter) - shifter;
  const float f = x - n;
  float p = kExp2Poly[5];
  p = p * f + kExp2Poly[4];
  p = p * f + kExp2Poly[3];
  p = p * f + kExp2Poly[2];
  p = p * f + kExp2Poly[1];
  p = p * f + kExp2Poly[0];
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflow ? 0.0f : p * two_n;
}

// ------------------------------------------------------------------------------------- float
// Portable versions (compiled per instruction set); the AVX-512 ones below replace them at run
// time where the CPU has AVX-512.
BK_ATT_MULTIVERSION static float row_max_portable(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

BK_ATT_MULTIVERSION static float exp2_shift_sum_portable(float* s, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp2_or_zero(s[j] - shift);
    s[j] = e;
    sum += e;
  }
  return sum;
}

BK_ATT_MULTIVERSION static void exp2_shift_portable(float* s, int64_t n, float shift) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = exp2_or_zero(s[j] - shift);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BK_ATT_AVX512 1
// Hand-written AVX-512: the exponential is the forward's largest cost after the two GEMMs, and
// vrndscale + vscalef (2^n applied in one instruction, no integer bit tricks) make it ~11 vector
// operations per 16 scores, about half of the portable loop.
// Underflow: lanes below -125 (masked scores are -inf) are set to exactly 0 by the write mask
// rather than computed: letting vscalef underflow to 0 costs a microcode assist per vector on
// Intel cores without flush-to-zero (it made the causal forward 30% slower). The clamp keeps the
// skipped lanes finite; max(-126, x) returns x when x is NaN, and NaN is "not less than" -125, so
// NaN still propagates.
#define BK_ATT_TARGET_AVX512 __attribute__((target("avx512f")))

BK_ATT_TARGET_AVX512 static inline __m512 exp2_or_zero_avx512(__m512 x) {
  const __mmask16 in_range = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[5]);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[4]));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[3]));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[2]));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[1]));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[0]));
  return _mm512_maskz_scalef_ps(in_range, p, n);
}

BK_ATT_TARGET_AVX512 static inline __mmask16 tail_mask(int64_t remaining) {
  return static_cast<__mmask16>((1u << remaining) - 1u);
}

BK_ATT_TARGET_AVX512 static float row_max_avx512(const float* s, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
  if (j < n) {
    const __mmask16 k = tail_mask(n - j);
    m = _mm512_mask_max_ps(m, k, m, _mm512_maskz_loadu_ps(k, s + j));
  }
  return _mm512_reduce_max_ps(m);
}

BK_ATT_TARGET_AVX512 static float exp2_shift_sum_avx512(float* s, int64_t n, float shift) {
  const __m512 c = _mm512_set1_ps(shift);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();  // two chains: add latency
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp2_or_zero_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + j), c));
    const __m512 e1 = exp2_or_zero_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), c));
    _mm512_storeu_ps(s + j, e0);
    _mm512_storeu_ps(s + j + 16, e1);
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
  }
  for (; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - j);
    const __m512 e = exp2_or_zero_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), c));
    _mm512_mask_storeu_ps(s + j, k, e);
    sum0 = _mm512_mask_add_ps(sum0, k, sum0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

BK_ATT_TARGET_AVX512 static void exp2_shift_avx512(float* s, int64_t n, float shift) {
  const __m512 c = _mm512_set1_ps(shift);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    _mm512_storeu_ps(s + j, exp2_or_zero_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + j), c)));
  }
  if (j < n) {
    const __mmask16 k = tail_mask(n - j);
    _mm512_mask_storeu_ps(s + j, k, exp2_or_zero_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), c)));
  }
}

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#else
inline bool cpu_has_avx512() { return false; }
#endif

// Row maximum; and s <- 2^(s - shift) (s in score units, see kScoreUnit), with and without the
// sum of the new s.
inline float row_max(const float* s, int64_t n) {
#ifdef BK_ATT_AVX512
  if (cpu_has_avx512()) return row_max_avx512(s, n);
#endif
  return row_max_portable(s, n);
}

inline float exp_shift_sum(float* s, int64_t n, float shift) {
#ifdef BK_ATT_AVX512
  if (cpu_has_avx512()) return exp2_shift_sum_avx512(s, n, shift);
#endif
  return exp2_shift_sum_portable(s, n, shift);
}

inline void exp_shift(float* s, int64_t n, float shift) {
#ifdef BK_ATT_AVX512
  if (cpu_has_avx512()) return exp2_shift_avx512(s, n, shift);
#endif
  exp2_shift_portable(s, n, shift);
}

// ds <- p_dropped * dp - p * D  (= P ∘ (dP ∘ keep / (1 - p) - D), the softmax backward)
BK_ATT_MULTIVERSION static void softmax_grad(const float* p, const float* p_dropped, float* dp,
                                             int64_t n, float d) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p_dropped[j] * dp[j] - p[j] * d;
}

// sum_j a[j] * b[j], vectorised (the order of the sum is the compiler's).
BK_ATT_MULTIVERSION static float row_dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

BK_ATT_MULTIVERSION static void scale_row(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}


// ------------------------------------------------------------------------------------ double
inline double row_max(const double* s, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

inline double exp_shift_sum(double* s, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

inline void exp_shift(double* s, int64_t n, double shift) {
  for (int64_t j = 0; j < n; ++j) s[j] = std::exp(s[j] - shift);
}

inline void softmax_grad(const double* p, const double* p_dropped, double* dp, int64_t n, double d) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p_dropped[j] * dp[j] - p[j] * d;
}

inline double row_dot(const double* a, const double* b, int64_t n) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

inline void scale_row(double* x, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}


}  // namespace bigkernels::cpu::attention_detail
