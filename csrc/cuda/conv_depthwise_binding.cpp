// bigkernels::conv_depthwise and conv_depthwise_backward on CUDA tensors: the torch-facing half of
// csrc/cuda/conv_depthwise.cu. Same checks, outputs and semantics as csrc/cpu/conv_depthwise.cpp
// (shared in csrc/common/conv_depthwise.h): the output and every gradient take the input's memory
// format (NCHW or channels_last; other strides cost one copy); float16, bfloat16 and float32.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../common/conv_depthwise.h"
#include "kernels.h"

namespace bigkernels::cuda {
namespace {

// Largest kernel side the CUDA kernels take (RepLKNet's 31x31); 1 and 2 work as well.
constexpr int64_t kMaxKernel = 31;

DType check_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "bigkernels::conv_depthwise CUDA kernel got a tensor on ", input.device());
  switch (input.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default:
      TORCH_CHECK_TYPE(false, "bigkernels::conv_depthwise on CUDA supports float16, bfloat16 and float32, got ",
                       input.scalar_type());
  }
}

DepthwiseConvShape to_shape(const DepthwiseGeometry& g, bool channels_last) {
  return DepthwiseConvShape{g.N,        g.C,        g.H,       g.W,        g.R,          g.S,        g.P,
                            g.Q,        g.stride_h, g.stride_w, g.pad_h,   g.pad_w,      g.dil_h,    g.dil_w,
                            channels_last};
}

void check_launch(cudaError_t status) {
  TORCH_CHECK(status != cudaErrorNotSupported,
              "bigkernels::conv_depthwise: tensors of 2^31 elements or more are not supported by the CUDA "
              "kernels");
  C10_CUDA_CHECK(status);
}

std::tuple<at::Tensor, at::Tensor> conv_depthwise_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, c10::string_view activation, double negative_slope, bool need_preactivation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Activation act = parse_activation(activation);
  const DepthwiseGeometry g = check_depthwise_args(input, weight, stride, padding, dilation, kMaxKernel);
  check_depthwise_epilogue_args(input, bias, residual, g);
  const DType dtype = check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::MemoryFormat fmt = depthwise_memory_format(input);
  const auto options = input.options();
  at::Tensor out = at::empty({g.N, g.C, g.P, g.Q}, options.memory_format(fmt));
  const bool need_z = need_preactivation && !activation_grad_from_output(act, negative_slope);
  at::Tensor z = need_z ? at::empty({g.N, g.C, g.P, g.Q}, options.memory_format(fmt)) : at::empty({0}, options);
  if (out.numel() == 0) return {out, z};

  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor res = residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  // The filter and bias are tiny: the kernels read them as float32.
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  check_launch(conv_depthwise_forward(
      dtype, to_shape(g, fmt == at::MemoryFormat::ChannelsLast), x.const_data_ptr(), w.const_data_ptr<float>(),
      b.defined() ? b.const_data_ptr<float>() : nullptr, res.defined() ? res.const_data_ptr() : nullptr,
      out.mutable_data_ptr(), need_z ? z.mutable_data_ptr() : nullptr, static_cast<int>(act),
      static_cast<float>(negative_slope), at::cuda::getCurrentCUDAStream().stream()));
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_depthwise_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& output,
    const at::Tensor& preactivation, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    c10::string_view activation, double negative_slope, std::array<bool, 4> output_mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Activation act = parse_activation(activation);
  const DepthwiseGeometry g = check_depthwise_args(input, weight, stride, padding, dilation, kMaxKernel);
  const at::Tensor& src =
      check_depthwise_backward_args(grad_output, input, output, preactivation, act, negative_slope, g);
  const DType dtype = check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const bool need_input = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2],
             need_residual = output_mask[3];
  const at::MemoryFormat fmt = depthwise_memory_format(input);
  const auto options = input.options();

  at::Tensor grad_input = need_input ? at::empty(input.sizes(), options.memory_format(fmt)) : at::empty({0}, options);
  at::Tensor grad_weight = need_weight ? at::empty(weight.sizes(), options) : at::empty({0}, options);
  at::Tensor grad_bias = need_bias ? at::empty({g.C}, options) : at::empty({0}, options);
  at::Tensor grad_residual =
      need_residual ? at::empty({g.N, g.C, g.P, g.Q}, options.memory_format(fmt)) : at::empty({0}, options);
  if (grad_output.numel() == 0) {
    // An empty output (N == 0 or C == 0) fed nothing back.
    for (at::Tensor* t : {&grad_input, &grad_weight, &grad_bias}) t->zero_();
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }
  if (!(need_input || need_weight || need_bias || need_residual)) {
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }

  const at::Tensor dy = grad_output.contiguous(fmt);
  const at::Tensor s = src.contiguous(fmt);
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const DepthwiseConvShape shape = to_shape(g, fmt == at::MemoryFormat::ChannelsLast);
  // gz and the weight gradient's partial sums live in the caching allocator like any temporary.
  const size_t scratch_bytes = conv_depthwise_backward_scratch_bytes(shape, need_weight);
  at::Tensor scratch = at::empty({static_cast<int64_t>(scratch_bytes)}, options.dtype(at::kByte));
  check_launch(conv_depthwise_backward(
      dtype, shape, dy.const_data_ptr(), x.const_data_ptr(), w.const_data_ptr<float>(), s.const_data_ptr(),
      activation_grad_from_output(act, negative_slope), static_cast<int>(act), static_cast<float>(negative_slope),
      need_input ? grad_input.mutable_data_ptr() : nullptr, need_weight ? grad_weight.mutable_data_ptr() : nullptr,
      need_bias ? grad_bias.mutable_data_ptr() : nullptr, need_residual ? grad_residual.mutable_data_ptr() : nullptr,
      scratch.mutable_data_ptr(), at::cuda::getCurrentCUDAStream().stream()));
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("conv_depthwise", &conv_depthwise_cuda);
  m.impl("conv_depthwise_backward", &conv_depthwise_backward_cuda);
}

}  // namespace bigkernels::cuda
