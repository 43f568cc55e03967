// Activations fused into the epilogues of the conv kernels (CPU C++ and CUDA), with their derivatives.
// Torch-free and header-only, so a .cu file compiled by nvcc alone can include it.
//
// The backward needs act'(z) where z is the pre-activation (conv + bias + residual). For the
// activations whose derivative is a function of the output y alone (none, relu, sigmoid, leaky_relu
// with a positive slope) the kernels keep y only; the others (gelu, gelu_tanh, silu) keep z.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define BK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BK_HOST_DEVICE inline
#endif

namespace bigkernels {

enum class Activation : int { None = 0, ReLU = 1, GELU = 2, GELUTanh = 3, SiLU = 4, Sigmoid = 5, LeakyReLU = 6 };

// The names the Python API accepts, indexed by Activation.
constexpr const char* kActivationNames[] = {"none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "leaky_relu"};
constexpr int kNumActivations = 7;

// True when act'(z) can be computed from y = act(z) alone, so the pre-activation need not be kept.
BK_HOST_DEVICE bool activation_grad_from_output(Activation act, double negative_slope) {
  return act == Activation::None || act == Activation::ReLU || act == Activation::Sigmoid ||
         (act == Activation::LeakyReLU && negative_slope > 0);
}

template <typename T>
BK_HOST_DEVICE T activation_forward(Activation act, T z, T negative_slope) {
  switch (act) {
    case Activation::None: return z;
    case Activation::ReLU: return z > T(0) ? z : T(0);
    case Activation::LeakyReLU: return z > T(0) ? z : z * negative_slope;
    case Activation::Sigmoid: return T(1) / (T(1) + std::exp(-z));
    case Activation::SiLU: return z / (T(1) + std::exp(-z));
    case Activation::GELU: return T(0.5) * z * (T(1) + std::erf(z * T(0.70710678118654752440)));
    case Activation::GELUTanh: {
      const T inner = T(0.79788456080286535588) * (z + T(0.044715) * z * z * z);  // sqrt(2/pi)
      return T(0.5) * z * (T(1) + std::tanh(inner));
    }
  }
  return z;
}

// d act / dz at the pre-activation z.
template <typename T>
BK_HOST_DEVICE T activation_grad(Activation act, T z, T negative_slope) {
  switch (act) {
    case Activation::None: return T(1);
    case Activation::ReLU: return z > T(0) ? T(1) : T(0);
    case Activation::LeakyReLU: return z > T(0) ? T(1) : negative_slope;
    case Activation::Sigmoid: {
      const T s = T(1) / (T(1) + std::exp(-z));
      return s * (T(1) - s);
    }
    case Activation::SiLU: {
      const T s = T(1) / (T(1) + std::exp(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    case Activation::GELU: {
      const T cdf = T(0.5) * (T(1) + std::erf(z * T(0.70710678118654752440)));
      const T pdf = T(0.39894228040143267794) * std::exp(T(-0.5) * z * z);  // 1/sqrt(2*pi)
      return cdf + z * pdf;
    }
    case Activation::GELUTanh: {
      const T k = T(0.79788456080286535588);
      const T t = std::tanh(k * (z + T(0.044715) * z * z * z));
      return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * z * z);
    }
  }
  return T(1);
}

// d act / dz from the output y = act(z); valid only where activation_grad_from_output() holds.
template <typename T>
BK_HOST_DEVICE T activation_grad_of_output(Activation act, T y, T negative_slope) {
  switch (act) {
    case Activation::ReLU: return y > T(0) ? T(1) : T(0);
    case Activation::LeakyReLU: return y > T(0) ? T(1) : negative_slope;
    case Activation::Sigmoid: return y * (T(1) - y);
    default: return T(1);
  }
}

}  // namespace bigkernels
