// Fused LSTM cell on the CPU: bigkernels::lstm_cell and bigkernels::lstm_cell_backward.
//
// Forward:  gates = input @ w_ih^T, then gates += hx @ w_hh^T in place (both projections accumulate
//           into one buffer: no second [B, 4H] tensor, no add pass), then ONE fused pass
//           (lstm_pointwise.cpp) adds both biases, applies sigmoid/tanh, updates c and h, and (for
//           training only) stores the activated gates for the backward.
// Backward: ONE fused pass turns (grad_hy, grad_cy) into the pre-activation gate gradients, grad_cx
//           and the bias gradient; the remaining work is four GEMMs, each skipped when the
//           corresponding gradient is not needed.
// The stock CPU cell runs ~10 separate elementwise ATen ops over [B, 4H] tensors after its GEMMs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "../common/lstm_cell.h"
#include "lstm_pointwise.h"

namespace bigkernels::cpu {
namespace {

void check_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "bigkernels::lstm_cell CPU kernel got a tensor on ",
              input.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
              "bigkernels::lstm_cell on CPU supports float32, float64 and bfloat16, got ", dt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool need_workspace) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const auto s = check_lstm_cell_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  check_cpu(input);
  auto buf = lstm_cell_forward_buffers(input, hx, cx, w_ih, w_hh, b_ih, b_hh, need_workspace, s);
  lstm_pointwise_forward(buf.gates, buf.b_ih, buf.b_hh, buf.cx, buf.hy, buf.cy,
                         need_workspace ? buf.workspace : at::Tensor());
  return {buf.hy, buf.cy, buf.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward_cpu(const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                       const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& cy,
                       const at::Tensor& workspace, std::array<bool, 4> output_mask) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const auto s = check_lstm_cell_args(input, hx, cx, w_ih, w_hh, std::nullopt, std::nullopt);
  check_lstm_cell_backward_args(grad_hy, grad_cy, cy, workspace, input, s);
  check_cpu(input);
  const bool need_bias = output_mask[3];

  auto buf = lstm_cell_backward_buffers(grad_hy, grad_cy, cx, cy, workspace, input, need_bias, s);

  lstm_pointwise_backward(buf.grad_hy, buf.grad_cy, buf.cx, buf.cy, buf.workspace, buf.grad_gates,
                          buf.grad_cx, need_bias ? buf.grad_bias : at::Tensor());

  return lstm_cell_backward_gemms(buf, input, hx, w_ih, w_hh, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("lstm_cell", &lstm_cell_cpu);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cpu);
}

}  // namespace bigkernels::cpu
