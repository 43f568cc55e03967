// The conv epilogue on one output tile, for the kernels that produce the output tile by tile
// (conv_pointwise_gemm.cpp): y = act(tile + bias + residual), applied while the
// tile is still in cache, so the epilogue costs no extra pass over the output.
// Also the compile-time activation helpers shared with the whole-tensor passes (conv_epilogue.cpp).
#pragma once
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

#include "../common/activation.h"
#include "fast_math.h"

namespace bigkernels::cpu {

// act(z) for a compile-time activation; float uses fast_math.h's exp/tanh so loops vectorise.
template <Activation A, typename T>
BK_ALWAYS_INLINE T act_forward(T z, T slope) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (A == Activation::Sigmoid) return sigmoid_fast(z);
    if constexpr (A == Activation::SiLU) return z * sigmoid_fast(z);
    if constexpr (A == Activation::GELUTanh) {
      const float inner = 0.79788456080286535588f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.0f + tanh_fast(inner));
    }
  }
  return activation_forward<T>(A, z, slope);
}

// Calls f(std::integral_constant<Activation, A>) for the runtime activation.
template <typename F>
inline void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::None: return f(std::integral_constant<Activation, Activation::None>{});
    case Activation::ReLU: return f(std::integral_constant<Activation, Activation::ReLU>{});
    case Activation::GELU: return f(std::integral_constant<Activation, Activation::GELU>{});
    case Activation::GELUTanh: return f(std::integral_constant<Activation, Activation::GELUTanh>{});
    case Activation::SiLU: return f(std::integral_constant<Activation, Activation::SiLU>{});
    case Activation::Sigmoid: return f(std::integral_constant<Activation, Activation::Sigmoid>{});
    case Activation::LeakyReLU: return f(std::integral_constant<Activation, Activation::LeakyReLU>{});
  }
  TORCH_CHECK(false, "bigkernels::conv: unknown activation code ", static_cast<int>(act));
}

// Where one output segment's epilogue reads and writes: conv holds conv(x) (without bias), y
// receives act(z) (y may be conv itself: each element is read before it is written), z (optional)
// receives the pre-activation z = conv + bias + residual.
// Bias: either one value for the whole segment (NCHW: a segment is part of one channel's plane) or
// one per element (channels_last: a segment is one pixel's channels), or none.
template <typename T>
struct EpilogueSegment {
  const T* conv;
  T* y;
  T* z;               // nullptr: z not kept
  const T* residual;  // nullptr: no residual; else laid out like y
  const T* bias_per_element;  // nullptr unless the bias varies along the segment
  T bias;                     // added to every element (0 when there is no bias)
  int64_t length;
};

template <Activation A, bool kBiasPerElement, bool kResidual, bool kKeepZ, typename T>
BK_ALWAYS_INLINE void epilogue_segment_loop(const EpilogueSegment<T>& s, T slope) {
  const T* c = s.conv;
  T* y = s.y;  // may alias c, index by index (no loop-carried dependence: omp simd is valid)
  T* __restrict__ zo = s.z;
  const T* __restrict__ r = s.residual;
  const T* __restrict__ b = s.bias_per_element;
  const T bias = s.bias;
#pragma omp simd
  for (int64_t i = 0; i < s.length; ++i) {
    T z = c[i] + bias;
    if constexpr (kBiasPerElement) z += b[i];
    if constexpr (kResidual) z += r[i];
    if constexpr (kKeepZ) zo[i] = z;
    y[i] = act_forward<A, T>(z, slope);
  }
}

// One segment, branch-free inner loop for each combination of the optional inputs.
template <Activation A, typename T>
BK_ALWAYS_INLINE void epilogue_segment(const EpilogueSegment<T>& s, T slope) {
  const bool per_element = s.bias_per_element != nullptr, res = s.residual != nullptr, keep = s.z != nullptr;
  if (per_element) {
    if (res) {
      if (keep) epilogue_segment_loop<A, true, true, true>(s, slope);
      else epilogue_segment_loop<A, true, true, false>(s, slope);
    } else {
      if (keep) epilogue_segment_loop<A, true, false, true>(s, slope);
      else epilogue_segment_loop<A, true, false, false>(s, slope);
    }
  } else {
    if (res) {
      if (keep) epilogue_segment_loop<A, false, true, true>(s, slope);
      else epilogue_segment_loop<A, false, true, false>(s, slope);
    } else {
      if (keep) epilogue_segment_loop<A, false, false, true>(s, slope);
      else epilogue_segment_loop<A, false, false, false>(s, slope);
    }
  }
}

}  // namespace bigkernels::cpu
