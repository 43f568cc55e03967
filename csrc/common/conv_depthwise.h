// What the CPU kernel (csrc/cpu/conv_depthwise.cpp) and the CUDA binding
// (csrc/cuda/conv_depthwise_binding.cpp) of bigkernels::conv_depthwise share: argument checks, the
// output geometry, the activation name, and the memory-format rule.
//
// The checks guard every call of torch.ops.bigkernels.conv_depthwise*, so a bad call never reads
// out of bounds; the Python layer (bigkernels/ops/conv_depthwise.py) turns a refusal into a
// message naming the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <string>

#include "activation.h"

namespace bigkernels {

// Sizes of one depthwise convolution: input (N, C, H, W), weight (C, 1, R, S), output (N, C, P, Q).
struct DepthwiseGeometry {
  int64_t N, C, H, W, R, S, P, Q;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// The output (and every gradient) takes the input's memory format. Channels-last only when the
// input is channels_last-contiguous and not also NCHW-contiguous; the Python fake kernels apply the
// same rule, so that real and fake outputs have the same strides. Other inputs are made
// NCHW-contiguous (a copy: the caller's cost).
inline at::MemoryFormat depthwise_memory_format(const at::Tensor& input) {
  return (input.dim() == 4 && !input.is_contiguous() &&
          input.is_contiguous(at::MemoryFormat::ChannelsLast))
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline Activation parse_activation(c10::string_view name) {
  for (int i = 0; i < kNumActivations; ++i) {
    if (name == kActivationNames[i]) return static_cast<Activation>(i);
  }
  TORCH_CHECK_VALUE(false, "bigkernels::conv_depthwise: activation must be one of none, relu, gelu, "
                    "gelu_tanh, silu, sigmoid, leaky_relu, got '", std::string(name), "'");
}

inline void check_depthwise_like(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "bigkernels::conv_depthwise: ", name,
              " must have dtype ", input.scalar_type(), " like input, got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "bigkernels::conv_depthwise: ", name,
              " must be on device ", input.device(), " like input, got ", t.device());
}

inline DepthwiseGeometry check_depthwise_args(const at::Tensor& input, const at::Tensor& weight,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, int64_t max_kernel) {
  TORCH_CHECK_VALUE(input.dim() == 4, "bigkernels::conv_depthwise: input must be 4-D (N, C, H, W), got ",
                    input.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()),
                   "bigkernels::conv_depthwise: input must be a floating-point tensor, got ",
                   input.scalar_type());
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1,
                    "bigkernels::conv_depthwise: weight must be (C, 1, R, S) with C = ", C,
                    " (input channels), got ", weight.sizes());
  check_depthwise_like(weight, input, "weight");
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "bigkernels::conv_depthwise: stride, padding and dilation must have 2 values each");
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "bigkernels::conv_depthwise: stride must be >= 1, got ",
                    stride);
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1,
                    "bigkernels::conv_depthwise: dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0,
                    "bigkernels::conv_depthwise: padding must be >= 0, got ", padding);
  DepthwiseGeometry g;
  g.N = input.size(0);
  g.C = C;
  g.H = input.size(2);
  g.W = input.size(3);
  g.R = weight.size(2);
  g.S = weight.size(3);
  TORCH_CHECK_VALUE(g.R >= 1 && g.S >= 1 && g.R <= max_kernel && g.S <= max_kernel,
                    "bigkernels::conv_depthwise: kernel size must be within 1..", max_kernel,
                    " here, got ", g.R, "x", g.S);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  const int64_t span_h = g.dil_h * (g.R - 1) + 1, span_w = g.dil_w * (g.S - 1) + 1;
  TORCH_CHECK_VALUE(g.H + 2 * g.pad_h >= span_h && g.W + 2 * g.pad_w >= span_w,
                    "bigkernels::conv_depthwise: the padded input (", g.H + 2 * g.pad_h, "x",
                    g.W + 2 * g.pad_w, ") is smaller than the dilated kernel (", span_h, "x", span_w,
                    ")");
  g.P = (g.H + 2 * g.pad_h - span_h) / g.stride_h + 1;
  g.Q = (g.W + 2 * g.pad_w - span_w) / g.stride_w + 1;
  return g;
}

inline void check_depthwise_epilogue_args(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& residual,
                                          const DepthwiseGeometry& g) {
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.C,
                      "bigkernels::conv_depthwise: bias must be (C,) = (", g.C, ",), got ", bias->sizes());
    check_depthwise_like(*bias, input, "bias");
  }
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->dim() == 4 && residual->size(0) == g.N && residual->size(1) == g.C &&
                          residual->size(2) == g.P && residual->size(3) == g.Q,
                      "bigkernels::conv_depthwise: residual must have the output's shape (", g.N, ", ",
                      g.C, ", ", g.P, ", ", g.Q, "), got ", residual->sizes());
    check_depthwise_like(*residual, input, "residual");
  }
}

inline void check_output_like(const at::Tensor& t, const at::Tensor& input, const DepthwiseGeometry& g,
                              const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == g.N && t.size(1) == g.C && t.size(2) == g.P &&
                        t.size(3) == g.Q,
                    "bigkernels::conv_depthwise_backward: ", name, " must have the output's shape (",
                    g.N, ", ", g.C, ", ", g.P, ", ", g.Q, "), got ", t.sizes());
  check_depthwise_like(t, input, name);
}

// The tensor the backward derives act'(z) from: the preactivation z, or the output y for the
// activations whose derivative is a function of y (activation.h).
inline const at::Tensor& check_depthwise_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                                       const at::Tensor& output, const at::Tensor& preactivation,
                                                       Activation act, double negative_slope,
                                                       const DepthwiseGeometry& g) {
  check_output_like(grad_output, input, g, "grad_output");
  if (activation_grad_from_output(act, negative_slope)) {
    check_output_like(output, input, g, "output");
    return output;
  }
  TORCH_CHECK_VALUE(preactivation.dim() == 4,
                    "bigkernels::conv_depthwise_backward: this activation's derivative needs the "
                    "preactivation: run the forward with need_preactivation=True");
  check_output_like(preactivation, input, g, "preactivation");
  return preactivation;
}

}  // namespace bigkernels
