// 1x1 convolution (groups 1, no padding, any stride) as tiled GEMMs with the epilogue fused per tile.
#pragma once
#include <ATen/core/Tensor.h>

#include "../common/activation.h"

namespace bigkernels::cpu {

// True when conv_pointwise_gemm can run the call: float32/float64, 1x1 kernel, groups 1, no
// padding, input dense in `channels_last` or NCHW order, and a BLAS is linked.
bool conv_pointwise_gemm_supports(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef padding,
                                  int64_t groups);

// output (and preactivation, when defined) are fresh dense tensors of the output's shape in the
// input's layout; input is dense in that layout. bias/residual may be undefined.
void conv_pointwise_gemm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& residual, at::IntArrayRef stride, bool channels_last,
                         const at::Tensor& output, const at::Tensor& preactivation, Activation act,
                         double negative_slope);

}  // namespace bigkernels::cpu
