// Argument checks for bigkernels::lstm_cell shared by the CPU kernel and the CUDA binding.
// The Python layer (bigkernels/ops/lstm_cell.py) validates first with friendlier messages; these
// checks guard direct calls of torch.ops.bigkernels.* so a bad call never reads out of bounds.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

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

}  // namespace bigkernels
