// bigkernels::lstm_cell and lstm_cell_backward on CUDA tensors: the torch-facing half of
// csrc/cuda/lstm_cell.cu. Same checks, outputs and semantics as csrc/cpu/lstm_cell.cpp.
//
// Forward:  gates = input @ w_ih^T, then gates += hx @ w_hh^T in place (cuBLAS, one [B, 4H] buffer),
//           then one fused pointwise kernel (biases, activations, c and h, the saved gates).
// Backward: one fused pointwise kernel (gate gradients, grad_cx and the bias gradient), then up to
//           four cuBLAS GEMMs, each only when output_mask asks for that gradient.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../common/lstm_cell.h"
#include "kernels.h"

namespace bigkernels::cuda {
namespace {

DType check_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "bigkernels::lstm_cell CUDA kernel got a tensor on ", input.device());
  switch (input.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK(false, "bigkernels::lstm_cell on CUDA supports float16, bfloat16, float32 and "
                         "float64, got ", input.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool need_workspace) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const auto s = check_lstm_cell_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  const DType dtype = check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());

  auto buf = lstm_cell_forward_buffers(input, hx, cx, w_ih, w_hh, b_ih, b_hh, need_workspace, s);
  C10_CUDA_CHECK(lstm_cell_forward(
      dtype, buf.gates.const_data_ptr(), buf.b_ih.defined() ? buf.b_ih.const_data_ptr() : nullptr,
      buf.b_hh.defined() ? buf.b_hh.const_data_ptr() : nullptr, buf.cx.const_data_ptr(),
      buf.hy.mutable_data_ptr(), buf.cy.mutable_data_ptr(),
      need_workspace ? buf.workspace.mutable_data_ptr() : nullptr, s.batch, s.hidden_size,
      at::cuda::getCurrentCUDAStream().stream()));
  return {buf.hy, buf.cy, buf.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward_cuda(const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                        const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                        const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& cy,
                        const at::Tensor& workspace, std::array<bool, 4> output_mask) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const auto s = check_lstm_cell_args(input, hx, cx, w_ih, w_hh, std::nullopt, std::nullopt);
  check_lstm_cell_backward_args(grad_hy, grad_cy, cy, workspace, input, s);
  const DType dtype = check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const bool need_bias = output_mask[3];

  auto buf = lstm_cell_backward_buffers(grad_hy, grad_cy, cx, cy, workspace, input, need_bias, s);
  // Partial bias sums live in the caching allocator like any other temporary.
  const size_t scratch_bytes =
      lstm_cell_backward_scratch_bytes(dtype, s.batch, s.hidden_size, need_bias);
  at::Tensor scratch =
      at::empty({static_cast<int64_t>(scratch_bytes)}, input.options().dtype(at::kByte));
  C10_CUDA_CHECK(lstm_cell_backward(
      dtype, buf.grad_hy.const_data_ptr(), buf.grad_cy.const_data_ptr(), buf.cx.const_data_ptr(),
      buf.cy.const_data_ptr(), buf.workspace.const_data_ptr(), buf.grad_gates.mutable_data_ptr(),
      buf.grad_cx.mutable_data_ptr(), need_bias ? buf.grad_bias.mutable_data_ptr() : nullptr,
      scratch_bytes > 0 ? scratch.mutable_data_ptr() : nullptr, s.batch, s.hidden_size,
      at::cuda::getCurrentCUDAStream().stream()));
  return lstm_cell_backward_gemms(buf, input, hx, w_ih, w_hh, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("lstm_cell", &lstm_cell_cuda);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cuda);
}

}  // namespace bigkernels::cuda
