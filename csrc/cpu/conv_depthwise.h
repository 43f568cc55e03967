// Direct depthwise convolution on the CPU (groups == in_channels == out_channels), with the fused
// epilogue act(conv + bias + residual): the kernels behind bigkernels::conv_depthwise and
// bigkernels::conv_depthwise_backward on CPU tensors (csrc/cpu/conv_depthwise.cpp).
//
// Exposed so that the general CPU conv kernel can run its depthwise calls through them. Arguments
// and results are those of the op schemas in csrc/ops.cpp; `activation` is one of the names of
// csrc/common/activation.h. float32, float64 and bfloat16 (accumulated in float32); NCHW and
// channels_last (the output takes the input's format); kernel sizes 1..31.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

namespace bigkernels::cpu {

// Returns (output, preactivation); preactivation is an empty (0,) tensor unless need_preactivation
// and the activation's derivative needs z.
std::tuple<at::Tensor, at::Tensor> conv_depthwise_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, c10::string_view activation, double negative_slope,
    bool need_preactivation);

// Returns (grad_input, grad_weight, grad_bias, grad_residual); output_mask says which are wanted
// (input, weight, bias, residual); the others come back as empty (0,) tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_depthwise_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& output, const at::Tensor& preactivation, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation,
    double negative_slope, std::array<bool, 4> output_mask);

}  // namespace bigkernels::cpu
