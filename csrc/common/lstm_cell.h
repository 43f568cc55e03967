// What the CPU kernel (csrc/cpu/lstm_cell.cpp) and the CUDA binding (csrc/cuda/lstm_cell_binding.cpp)
// of bigkernels::lstm_cell share: argument checks, the gate GEMMs, and the buffers the fused
// pointwise kernels read and write. Only the pointwise passes differ between devices.
//
// The checks guard every call of torch.ops.bigkernels.lstm_cell*, so a bad call never reads out of
// bounds; the Python layer turns a refusal into a message naming the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace bigkernels {

struct LstmCellSizes {
  int64_t batch;
  int64_t input_size;
  int64_t hidden_size;
};

inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "bigkernels::lstm_cell: ", name,
              " must have dtype ", like.scalar_type(), " like input, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "bigkernels::lstm_cell: ", name,
              " must be on device ", like.device(), " like input, got ", t.device());
}

inline LstmCellSizes check_lstm_cell_args(const at::Tensor& input, const at::Tensor& hx,
                                          const at::Tensor& cx, const at::Tensor& w_ih,
                                          const at::Tensor& w_hh,
                                          const std::optional<at::Tensor>& b_ih,
                                          const std::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(input.dim() == 2, "bigkernels::lstm_cell: input must be 2-D [batch, input_size], got ",
              input.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "bigkernels::lstm_cell: input must be a floating-point tensor, got ",
              input.scalar_type());
  const int64_t batch = input.size(0), input_size = input.size(1);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0 && w_hh.size(1) * 4 == w_hh.size(0),
              "bigkernels::lstm_cell: w_hh must be [4*hidden_size, hidden_size], got ",
              w_hh.sizes());
  const int64_t hidden = w_hh.size(1);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == 4 * hidden && w_ih.size(1) == input_size,
              "bigkernels::lstm_cell: w_ih must be [4*hidden_size, input_size] = [", 4 * hidden,
              ", ", input_size, "], got ", w_ih.sizes());
  TORCH_CHECK(hx.dim() == 2 && hx.size(0) == batch && hx.size(1) == hidden,
              "bigkernels::lstm_cell: hx must be [batch, hidden_size] = [", batch, ", ", hidden,
              "], got ", hx.sizes());
  TORCH_CHECK(cx.dim() == 2 && cx.size(0) == batch && cx.size(1) == hidden,
              "bigkernels::lstm_cell: cx must be [batch, hidden_size] = [", batch, ", ", hidden,
              "], got ", cx.sizes());
  check_same(hx, input, "hx");
  check_same(cx, input, "cx");
  check_same(w_ih, input, "w_ih");
  check_same(w_hh, input, "w_hh");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "bigkernels::lstm_cell: b_ih and b_hh must both be given or both be None");
  if (b_ih.has_value()) {
    for (const auto* b : {&*b_ih, &*b_hh}) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == 4 * hidden,
                  "bigkernels::lstm_cell: biases must be [4*hidden_size] = [", 4 * hidden,
                  "], got ", b->sizes());
      check_same(*b, input, b == &*b_ih ? "b_ih" : "b_hh");
    }
  }
  return {batch, input_size, hidden};
}

// The kernels read raw pointers, so the backward's extra tensors need input's dtype and device too.
inline void check_lstm_cell_backward_args(const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                                          const at::Tensor& cy, const at::Tensor& workspace,
                                          const at::Tensor& input, const LstmCellSizes& s) {
  for (const auto* t : {&grad_hy, &grad_cy, &cy}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == s.batch && t->size(1) == s.hidden_size,
                "bigkernels::lstm_cell_backward: grad_hy, grad_cy and cy must be [batch, "
                "hidden_size] = [", s.batch, ", ", s.hidden_size, "], got ", t->sizes());
  }
  TORCH_CHECK(workspace.dim() == 2 && workspace.size(0) == s.batch &&
                  workspace.size(1) == 4 * s.hidden_size,
              "bigkernels::lstm_cell_backward: workspace must be the [batch, 4*hidden_size] "
              "gates saved by lstm_cell(need_workspace=True), got ", workspace.sizes());
  check_same(grad_hy, input, "grad_hy");
  check_same(grad_cy, input, "grad_cy");
  check_same(cy, input, "cy");
  check_same(workspace, input, "workspace");
}

// The op decides its own precision (bigkernels/ops/lstm_cell.py casts under autocast, as the stock
// cell does); the GEMMs inside must not be autocast a second time, or they return another dtype.
// Usage: `NoAutocast no_autocast(c10::autocast_dispatch_keyset);` at the top of each kernel.
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

// Inputs and outputs of the forward pointwise pass, all dense row-major.
struct LstmCellForwardBuffers {
  at::Tensor gates;      // [B, 4H] = input @ w_ih^T + hx @ w_hh^T, without biases
  at::Tensor cx;         // [B, H]
  at::Tensor b_ih, b_hh; // [4H] each, or undefined
  at::Tensor hy, cy;     // [B, H], to be written
  at::Tensor workspace;  // [B, 4H] activated gates to be written, or [0] for inference
};

inline LstmCellForwardBuffers lstm_cell_forward_buffers(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool need_workspace, const LstmCellSizes& s) {
  const auto opts = input.options();
  // Both projections accumulate into one buffer: no second [B, 4H] tensor and no add pass. The
  // biases are added by the pointwise pass, which reads the gates anyway.
  at::Tensor gates = at::mm(input, w_ih.t());
  gates.addmm_(hx, w_hh.t());
  return {gates,
          cx.contiguous(),
          b_ih.has_value() ? b_ih->contiguous() : at::Tensor(),
          b_hh.has_value() ? b_hh->contiguous() : at::Tensor(),
          at::empty({s.batch, s.hidden_size}, opts),
          at::empty({s.batch, s.hidden_size}, opts),
          need_workspace ? at::empty({s.batch, 4 * s.hidden_size}, opts) : at::empty({0}, opts)};
}

// Inputs and outputs of the backward pointwise pass, all dense row-major.
struct LstmCellBackwardBuffers {
  at::Tensor grad_hy, grad_cy, cx, cy, workspace;  // read
  at::Tensor grad_gates;                           // [B, 4H] pre-activation gate grads, written
  at::Tensor grad_cx;                              // [B, H], written
  at::Tensor grad_bias;                            // [4H] if output_mask[3], else [0]
};

inline LstmCellBackwardBuffers lstm_cell_backward_buffers(
    const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& cx,
    const at::Tensor& cy, const at::Tensor& workspace, const at::Tensor& input, bool need_bias,
    const LstmCellSizes& s) {
  const auto opts = input.options();
  const int64_t B = s.batch, H = s.hidden_size;
  // Incoming gradients may be expanded (e.g. from a sum); saved tensors are normally contiguous
  // already, and contiguous() does not copy them then.
  return {grad_hy.contiguous(),
          grad_cy.contiguous(),
          cx.contiguous(),
          cy.contiguous(),
          workspace.contiguous(),
          at::empty({B, 4 * H}, opts),
          at::empty({B, H}, opts),
          at::empty({need_bias ? 4 * H : 0}, opts)};
}

// The GEMM half of the backward, after the pointwise pass: each gradient only if output_mask
// (input, hx, weights, bias) asks for it.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward_gemms(const LstmCellBackwardBuffers& buf, const at::Tensor& input,
                         const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         std::array<bool, 4> output_mask) {
  const at::Tensor& dg = buf.grad_gates;
  // Each skipped gradient is its own empty tensor: op outputs must never alias one another.
  auto empty = [&] { return at::empty({0}, input.options()); };
  return {output_mask[0] ? at::mm(dg, w_ih) : empty(),
          output_mask[1] ? at::mm(dg, w_hh) : empty(),
          buf.grad_cx,
          output_mask[2] ? at::mm(dg.t(), input) : empty(),
          output_mask[2] ? at::mm(dg.t(), hx) : empty(),
          buf.grad_bias};
}

}  // namespace bigkernels
