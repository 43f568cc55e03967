// The fused pointwise passes of the CPU conv (declared in conv_epilogue.h).
//
// The activation is a template parameter, so each loop holds no branch on it and vectorises;
// float math uses fast_math.h's exp (libm's expf is an opaque call that keeps a loop scalar);
// double uses libm through activation.h (it is the precision reference and the gradcheck dtype).
#include "conv_epilogue.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <type_traits>

#include "conv_tile_epilogue.h"  // act_forward, with_activation
#include "fast_math.h"

namespace bigkernels::cpu {
namespace {

// Elements per parallel task: below this, waking the threads costs more than the pass itself.
constexpr int64_t kPointwiseGrain = 32768;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename scalar_t>
using storage_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, uint16_t, scalar_t>;

// act'(z) for a compile-time activation.
template <Activation A, typename T>
BK_ALWAYS_INLINE T act_grad(T z, T slope) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (A == Activation::Sigmoid) {
      const float s = sigmoid_fast(z);
      return s * (1.0f - s);
    }
    if constexpr (A == Activation::SiLU) {
      const float s = sigmoid_fast(z);
      return s * (1.0f + z * (1.0f - s));
    }
    if constexpr (A == Activation::GELUTanh) {
      const float k = 0.79788456080286535588f;
      const float t = tanh_fast(k * (z + 0.044715f * z * z * z));
      return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * z * z);
    }
  }
  return activation_grad<T>(A, z, slope);
}

template <Activation A, bool kHasResidual, bool kKeepZ, typename S>
void forward_range(const S* conv, const S* __restrict__ residual, S* z_out, S* y_out, double slope_d,
                   int64_t begin, int64_t end) {
  using T = acc_t<S>;
  const T slope = static_cast<T>(slope_d);
  // conv may alias z_out or y_out (in-place): the same index is read then written.
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    T z = load_acc(conv[i]);
    if constexpr (kHasResidual) z += load_acc(residual[i]);
    if constexpr (kKeepZ) z_out[i] = store_as<S>(z);
    y_out[i] = store_as<S>(act_forward<A, T>(z, slope));
  }
}

template <Activation A, bool kFromZ, typename S>
void backward_range(const S* __restrict__ dy, const S* __restrict__ src, S* __restrict__ gz,
                    double slope_d, int64_t begin, int64_t end) {
  using T = acc_t<S>;
  const T slope = static_cast<T>(slope_d);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T v = load_acc(src[i]);
    T d;
    if constexpr (kFromZ) {
      d = act_grad<A, T>(v, slope);
    } else {
      d = activation_grad_of_output<T>(A, v, slope);
    }
    gz[i] = store_as<S>(load_acc(dy[i]) * d);
  }
}

template <Activation A, typename S>
void forward_dispatch(const S* conv, const S* residual, S* z_out, S* y_out, double slope, int64_t n) {
  at::parallel_for(0, n, kPointwiseGrain, [&](int64_t begin, int64_t end) {
    if (residual != nullptr) {
      if (z_out != nullptr) forward_range<A, true, true>(conv, residual, z_out, y_out, slope, begin, end);
      else forward_range<A, true, false>(conv, residual, z_out, y_out, slope, begin, end);
    } else {
      if (z_out != nullptr) forward_range<A, false, true>(conv, residual, z_out, y_out, slope, begin, end);
      else forward_range<A, false, false>(conv, residual, z_out, y_out, slope, begin, end);
    }
  });
}

template <Activation A, typename S>
void backward_dispatch(const S* dy, const S* src, bool from_z, S* gz, double slope, int64_t n) {
  at::parallel_for(0, n, kPointwiseGrain, [&](int64_t begin, int64_t end) {
    if (from_z) backward_range<A, true>(dy, src, gz, slope, begin, end);
    else backward_range<A, false>(dy, src, gz, slope, begin, end);
  });
}

template <typename scalar_t>
storage_t<scalar_t>* raw(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<storage_t<scalar_t>*>(t.data_ptr<scalar_t>()) : nullptr;
}

}  // namespace

void conv_forward_epilogue(const at::Tensor& conv, const at::Tensor& residual,
                           const at::Tensor& preactivation, const at::Tensor& output,
                           Activation act, double negative_slope) {
  const int64_t n = conv.numel();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, conv.scalar_type(), "conv_forward_epilogue", [&] {
    using S = storage_t<scalar_t>;
    const S* c = raw<scalar_t>(conv);
    const S* r = raw<scalar_t>(residual);
    S* z = raw<scalar_t>(preactivation);
    S* y = raw<scalar_t>(output);
    with_activation(act, [&](auto a) { forward_dispatch<decltype(a)::value, S>(c, r, z, y, negative_slope, n); });
  });
}

void conv_backward_prologue(const at::Tensor& grad_output, const at::Tensor& source,
                            bool use_preactivation, const at::Tensor& grad_z, Activation act,
                            double negative_slope) {
  const int64_t n = grad_z.numel();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_z.scalar_type(), "conv_backward_prologue", [&] {
    using S = storage_t<scalar_t>;
    const S* dy = raw<scalar_t>(grad_output);
    const S* src = raw<scalar_t>(source);
    S* gz = raw<scalar_t>(grad_z);
    with_activation(act, [&](auto a) {
      backward_dispatch<decltype(a)::value, S>(dy, src, use_preactivation, gz, negative_slope, n);
    });
  });
}

}  // namespace bigkernels::cpu
