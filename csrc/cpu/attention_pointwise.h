// Row-wise pointwise steps of the CPU flash attention: max, exp-and-sum, the backward's dS.
//
// The float versions are compiled once per instruction set (target_clones) and use exp_fast
// (fast_math.h: arithmetic only, so the loops vectorise); `#pragma omp simd reduction` lets the
// compiler vectorise the sums and maxima without -ffast-math. double uses libm: it is the
// precision reference and the gradcheck dtype.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "fast_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(__clang__)
#define BK_ATT_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BK_ATT_MULTIVERSION
#endif

namespace bigkernels::cpu::attention_detail {

// exp(x) for x <= 0 (every caller passes scores minus their row maximum or their log-sum-exp),
// and exactly 0 below the float range: masked scores are -inf, and their probability must be 0,
// not e^-87, so that a masked key contributes nothing to any gradient. Cheaper than exp_fast: no
// upper clamp (x <= 0), and a degree-5 polynomial fitted for relative error on |r| <= ln2 / 2
// (max 8e-8, under one float ulp) instead of the degree-7 Taylor series. The exponentials are a
// fifth of the forward's time at head dim 64, so two operations fewer per element show.
BK_ALWAYS_INLINE float exp_or_zero(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 0.008291722275316715f;
  p = p * r + 0.04191507026553154f;
  p = p * r + 0.1666766256093979f;
  p = p * r + 0.49998897314071655f;
  p = p * r + 0.9999996423721313f;
  p = p * r + 1.0000001192092896f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflow ? 0.0f : p * two_n;
}

// ------------------------------------------------------------------------------------- float
BK_ATT_MULTIVERSION static float row_max(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s <- exp(s - shift); returns the sum of the new s.
BK_ATT_MULTIVERSION static float exp_shift_sum(float* s, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_or_zero(s[j] - shift);
    s[j] = e;
    sum += e;
  }
  return sum;
}

BK_ATT_MULTIVERSION static void exp_shift(float* s, int64_t n, float shift) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = exp_or_zero(s[j] - shift);
}

// ds <- p_dropped * dp - p * D  (= P ∘ (dP ∘ keep / (1 - p) - D), the softmax backward)
BK_ATT_MULTIVERSION static void softmax_grad(const float* p, const float* p_dropped, float* dp,
                                             int64_t n, float d) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p_dropped[j] * dp[j] - p[j] * d;
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

inline void scale_row(double* x, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}


}  // namespace bigkernels::cpu::attention_detail
