// 3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3), the epilogue fused into the
// output transform (conv_winograd.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include "../common/activation.h"

namespace bigkernels::cpu {

// True when conv_winograd can run the call: float32, NCHW-contiguous input, 3x3 kernel, stride 1,
// dilation 1, groups 1, padding <= 2, and a BLAS is linked. (Whether it is the FASTER core is
// conv.cpp's choice.)
bool conv_winograd_supports(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// output (and preactivation, when defined): fresh NCHW-contiguous tensors of the output's shape.
// bias/residual (NCHW-contiguous) may be undefined.
void conv_winograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& residual, at::IntArrayRef padding, const at::Tensor& output,
                   const at::Tensor& preactivation, Activation act, double negative_slope);

// grad_input (fresh, NCHW-contiguous, the input's shape) of the 3x3 stride-1 convolution that
// conv_winograd_supports accepted, from grad_z (NCHW-contiguous, the output's shape): itself a 3x3
// stride-1 convolution of grad_z with the flipped, transposed weight and padding 2 - padding.
void conv_winograd_input_grad(const at::Tensor& grad_z, const at::Tensor& weight, at::IntArrayRef padding,
                              const at::Tensor& grad_input);

}  // namespace bigkernels::cpu
