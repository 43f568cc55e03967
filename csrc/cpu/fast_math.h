// Sigmoid and tanh for the CPU pointwise kernels.
//
// libm's expf/tanhf are opaque calls, so a loop that uses them runs one element at a time. These
// float versions use arithmetic and bit tricks only, so the compiler vectorises the loops that call
// them (SSE/AVX2/AVX-512 through target_clones in the kernels). Accuracy: exp within ~2 ulp over
// the clamped range; tanh within ~1e-7 absolute (an LSTM only ever adds tanh values to O(1)
// quantities, and the gate GEMM's rounding is orders of magnitude larger). double uses libm: it is
// the precision reference and the gradcheck dtype, where exactness beats speed.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

// The kernels are compiled once per instruction set (target_clones); the math must be inlined into
// each clone to be vectorised for that instruction set rather than called at the baseline one.
#if defined(__GNUC__)
#define BK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define BK_ALWAYS_INLINE inline
#endif

namespace bigkernels::cpu {

BK_ALWAYS_INLINE float exp_fast(float x) {
  // Clamp so that 2^n stays a normal float; NaN passes through the comparisons unchanged.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln2) with the 1.5 * 2^23 trick (round-to-nearest, no libm call).
  const float shifter = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  // r = x - n ln2 in two steps (Cody-Waite), |r| <= ln2 / 2.
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  // e^r by its Taylor series to degree 7: truncation error < 1e-8 relative on |r| <= 0.347.
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

BK_ALWAYS_INLINE float sigmoid_fast(float x) { return 1.0f / (1.0f + exp_fast(-x)); }

// 1/x for finite x >= 1 without a division: a bit-trick first guess (within 5.1%) and three
// Newton steps y += y(1 - xy), each squaring the relative error: ~1e-7 at the end, about one ulp.
// Why: a 512-bit vdivps costs ~10 cycles of throughput on the one divider port of Sapphire Rapids,
// and the fused LSTM epilogue (lstm_recurrent.cpp) divides five times per 16 units; the division
// was ~60% of that epilogue. Six FMAs run on both FMA ports instead.
BK_ALWAYS_INLINE float reciprocal_newton(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits = 0x7EF311C3 - bits;
  float y;
  std::memcpy(&y, &bits, sizeof(y));
  for (int step = 0; step < 3; ++step) y = y + y * (1.0f - x * y);
  return y;
}

// sigmoid_fast and tanh_fast with reciprocal_newton for their one division (same exp_fast; within
// ~1e-7 of them). Used where the pointwise maths is on the critical path of every LSTM step.
BK_ALWAYS_INLINE float sigmoid_newton(float x) { return reciprocal_newton(1.0f + exp_fast(-x)); }

BK_ALWAYS_INLINE float tanh_fast(float x) {
  const float ax = x < 0.0f ? -x : x;
  // Near 0, (1 - e^-2|x|) / (1 + e^-2|x|) cancels; the odd series is exact to < 1e-9 there.
  const float x2 = x * x;
  const float series = x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  const float t = exp_fast(-2.0f * ax);
  const float mag = (1.0f - t) / (1.0f + t);
  const float far = x < 0.0f ? -mag : mag;
  return ax < 0.125f ? series : far;
}

BK_ALWAYS_INLINE float tanh_newton(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float x2 = x * x;
  const float series = x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  const float t = exp_fast(-2.0f * ax);
  const float mag = (1.0f - t) * reciprocal_newton(1.0f + t);
  const float far = x < 0.0f ? -mag : mag;
  return ax < 0.125f ? series : far;
}

// bfloat16 as raw bits, so that conversion loops vectorise (c10::BFloat16's struct copies and NaN
// branch stop the vectoriser). Same results as c10's conversions: round to nearest even, NaN kept.
BK_ALWAYS_INLINE float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

BK_ALWAYS_INLINE uint16_t float_to_bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

// Storage <-> arithmetic conversions used by the kernels (uint16_t means bfloat16 bits).
BK_ALWAYS_INLINE float load_acc(float v) { return v; }
BK_ALWAYS_INLINE double load_acc(double v) { return v; }
BK_ALWAYS_INLINE float load_acc(uint16_t v) { return bf16_bits_to_float(v); }
template <typename T>
BK_ALWAYS_INLINE T store_as(float v);
template <>
BK_ALWAYS_INLINE float store_as<float>(float v) { return v; }
template <>
BK_ALWAYS_INLINE uint16_t store_as<uint16_t>(float v) { return float_to_bf16_bits(v); }
template <typename T>
BK_ALWAYS_INLINE T store_as(double v) { return v; }

BK_ALWAYS_INLINE double sigmoid_fast(double x) { return 1.0 / (1.0 + std::exp(-x)); }
BK_ALWAYS_INLINE double tanh_fast(double x) { return std::tanh(x); }

}  // namespace bigkernels::cpu
