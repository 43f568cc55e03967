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

#include "../shapes/lstm_cell.h"
#include "kernels.h"

namespace bigkernels::cuda {
namespace {

// The op itself decides its precision (bigkernels/ops/lstm_cell.py casts under autocast, as the stock
// cell does); the GEMMs inside must not be autocast a second time, or they return another dtype.
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

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
  const int64_t B = s.batch, H = s.hidden_size;

  // at::mm returns a fresh row-major tensor and addmm_ keeps its layout; contiguous() is a no-op
  // that documents what the kernel relies on.
  at::Tensor gates = at::mm(input, w_ih.t());
  gates.addmm_(hx, w_hh.t());
  gates = gates.contiguous();
  const at::Tensor cx_c = cx.contiguous();
  at::Tensor bias_ih, bias_hh;  // undefined without biases: the kernel gets null pointers
  if (b_ih.has_value()) {
    bias_ih = b_ih->contiguous();
    bias_hh = b_hh->contiguous();
  }
  at::Tensor hy = at::empty({B, H}, input.options());
  at::Tensor cy = at::empty({B, H}, input.options());
  at::Tensor workspace = need_workspace ? at::empty({B, 4 * H}, input.options())
                                        : at::empty({0}, input.options());

  C10_CUDA_CHECK(lstm_cell_forward(
      dtype, gates.const_data_ptr(), bias_ih.defined() ? bias_ih.const_data_ptr() : nullptr,
      bias_hh.defined() ? bias_hh.const_data_ptr() : nullptr, cx_c.const_data_ptr(),
      hy.mutable_data_ptr(), cy.mutable_data_ptr(),
      need_workspace ? workspace.mutable_data_ptr() : nullptr, B, H,
      at::cuda::getCurrentCUDAStream().stream()));
  return {hy, cy, workspace};
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
  const int64_t B = s.batch, H = s.hidden_size;
  const bool need_bias = output_mask[3];

  const auto opts = input.options();
  at::Tensor grad_gates = at::empty({B, 4 * H}, opts);
  at::Tensor grad_cx = at::empty({B, H}, opts);
  at::Tensor grad_bias = at::empty({need_bias ? 4 * H : 0}, opts);
  // Incoming gradients may be expanded (e.g. from a sum); saved tensors are normally contiguous
  // already, and contiguous() does not copy them then.
  const at::Tensor dh = grad_hy.contiguous(), dc = grad_cy.contiguous(), c0 = cx.contiguous(),
                   c1 = cy.contiguous(), ws = workspace.contiguous();
  // Partial bias sums live in the caching allocator like any other temporary.
  const size_t scratch_bytes = lstm_cell_backward_scratch_bytes(dtype, B, H, need_bias);
  at::Tensor scratch = at::empty({static_cast<int64_t>(scratch_bytes)}, opts.dtype(at::kByte));

  C10_CUDA_CHECK(lstm_cell_backward(
      dtype, dh.const_data_ptr(), dc.const_data_ptr(), c0.const_data_ptr(), c1.const_data_ptr(),
      ws.const_data_ptr(), grad_gates.mutable_data_ptr(), grad_cx.mutable_data_ptr(),
      need_bias ? grad_bias.mutable_data_ptr() : nullptr,
      scratch_bytes > 0 ? scratch.mutable_data_ptr() : nullptr, B, H,
      at::cuda::getCurrentCUDAStream().stream()));

  const at::Tensor empty = at::empty({0}, opts);
  at::Tensor grad_input = output_mask[0] ? at::mm(grad_gates, w_ih) : empty;
  at::Tensor grad_hx = output_mask[1] ? at::mm(grad_gates, w_hh) : empty;
  at::Tensor grad_w_ih = output_mask[2] ? at::mm(grad_gates.t(), input) : empty;
  at::Tensor grad_w_hh = output_mask[2] ? at::mm(grad_gates.t(), hx) : empty;
  return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("lstm_cell", &lstm_cell_cuda);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cuda);
}

}  // namespace bigkernels::cuda
