// The fused pointwise passes of the LSTM on the CPU, shared by the cell (csrc/cpu/lstm_cell.cpp)
// and the layer (csrc/cpu/lstm.cpp, once per time step).
#pragma once
#include <ATen/core/Tensor.h>

namespace bigkernels::cpu {

// Forward: biases + sigmoid/tanh + c and h update, in one pass.
//   gates [n, 4H] pre-activations (both projections, no biases); b_ih, b_hh [4H] or undefined;
//   cx [n, H]. Writes hy [n, H], cy [n, H] and, if defined, workspace [n, 4H] (activated gates).
// All tensors dense row-major (row ranges of larger buffers are fine), one dtype: float32,
// float64 or bfloat16.
void lstm_pointwise_forward(const at::Tensor& gates, const at::Tensor& b_ih, const at::Tensor& b_hh,
                            const at::Tensor& cx, const at::Tensor& hy, const at::Tensor& cy,
                            const at::Tensor& workspace);

// Backward: (grad_hy, grad_cy) -> pre-activation gate gradients and grad_cx, in one pass.
//   grad_hy, grad_cy, cx, cy [n, H]; workspace [n, 4H] (from the forward). Writes grad_gates
//   [n, 4H], grad_cx [n, H] and, if defined, grad_bias [4H] = grad_gates summed over the rows.
void lstm_pointwise_backward(const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                             const at::Tensor& cx, const at::Tensor& cy,
                             const at::Tensor& workspace, const at::Tensor& grad_gates,
                             const at::Tensor& grad_cx, const at::Tensor& grad_bias);

}  // namespace bigkernels::cpu
