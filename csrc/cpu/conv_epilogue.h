// The fused pointwise passes of the CPU conv (csrc/cpu/conv.cpp).
//
// Forward epilogue: z = conv (+ residual); y = act(z), one pass over the conv output, in place.
// Backward prologue: gz = dy * act'(z or y), one pass.
// All tensors are dense in the same memory layout (flat element i of one is element i of the
// others) and of one dtype: float32, float64 or bfloat16. The bias is not here: the conv core adds
// it while it produces the output (see conv.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include "../common/activation.h"

namespace bigkernels::cpu {

// conv holds the convolution (+ bias) on entry. residual: undefined or like conv. If preactivation
// is defined, it receives z and output receives act(z); otherwise output (which may be conv itself)
// receives act(z).
void conv_forward_epilogue(const at::Tensor& conv, const at::Tensor& residual,
                           const at::Tensor& preactivation, const at::Tensor& output,
                           Activation act, double negative_slope);

// grad_z = grad_output * act'(source): source is the pre-activation z when
// use_preactivation, else the output y (only for activations where activation_grad_from_output).
void conv_backward_prologue(const at::Tensor& grad_output, const at::Tensor& source,
                            bool use_preactivation, const at::Tensor& grad_z, Activation act,
                            double negative_slope);

}  // namespace bigkernels::cpu
