// Autograd for bigkernels::lstm_cell (the C++ CPU and CUDA kernels), in C++.
//
// Why not torch.library.register_autograd, as DESIGN.md suggests: its generated Python
// autograd.Function costs ~30 us per call on the CPU, more than the whole fused cell at batch <= 16,
// so the training step would be slower than the stock cell (whose autograd graph is all C++). This
// node does the same job (save inputs and the gate workspace, call lstm_cell_backward) without
// Python. The Triton op, a Python custom op, keeps register_autograd (bigkernels/ops/lstm_cell.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace bigkernels::autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&,
                                                      const std::optional<Tensor>&,
                                                      const std::optional<Tensor>&, bool);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, std::array<bool, 4>);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bigkernels::lstm_cell", "")
                             .typed<ForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bigkernels::lstm_cell_backward", "")
                             .typed<BackwardSig>();
  return op;
}

class LstmCellFunction : public torch::autograd::Function<LstmCellFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx,
                               const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                               const std::optional<Tensor>& b_ih,
                               const std::optional<Tensor>& b_hh, bool need_workspace) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [hy, cy, workspace] =
        forward_op().call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, need_workspace);
    const bool has_bias = b_ih.has_value();
    ctx->save_for_backward({input, hx, cx, w_ih, w_hh, has_bias ? *b_ih : Tensor(),
                            has_bias ? *b_hh : Tensor(), cy, workspace});
    ctx->saved_data["has_bias"] = has_bias;
    ctx->mark_non_differentiable({workspace});
    return {hy, cy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "bigkernels::lstm_cell does not support double backward (create_graph=True)");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &hx = saved[1], &cx = saved[2], &w_ih = saved[3],
                 &w_hh = saved[4];
    Tensor cy = saved[7], workspace = saved[8];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    std::optional<Tensor> b_ih, b_hh;
    if (has_bias) {
      b_ih = saved[5];
      b_hh = saved[6];
    }
    if (workspace.dim() == 1) {
      // The forward ran as inference (need_workspace=false) yet is differentiated, e.g. a direct
      // op call: recompute the gates rather than fail.
      std::tie(std::ignore, cy, workspace) =
          forward_op().call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, true);
    }
    // Gradient edges exist only for tensor arguments: 0..4, then 5 and 6 when there are biases.
    const bool need_input = ctx->needs_input_grad(0), need_hx = ctx->needs_input_grad(1),
               need_cx = ctx->needs_input_grad(2),
               need_weights = ctx->needs_input_grad(3) || ctx->needs_input_grad(4),
               need_bias = has_bias && (ctx->needs_input_grad(5) || ctx->needs_input_grad(6));
    const Tensor grad_hy = grads[0].defined() ? grads[0] : at::zeros_like(cy);
    const Tensor grad_cy = grads[1].defined() ? grads[1] : at::zeros_like(cy);
    auto [g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_bias] =
        backward_op().call(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, workspace,
                           {need_input, need_hx, need_weights, need_bias});
    // One entry per forward argument; undefined means "no gradient".
    return {need_input ? g_input : Tensor(),
            need_hx ? g_hx : Tensor(),
            need_cx ? g_cx : Tensor(),
            ctx->needs_input_grad(3) ? g_w_ih : Tensor(),
            ctx->needs_input_grad(4) ? g_w_hh : Tensor(),
            has_bias && ctx->needs_input_grad(5) ? g_bias : Tensor(),
            has_bias && ctx->needs_input_grad(6) ? g_bias : Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> lstm_cell_autograd(const Tensor& input, const Tensor& hx,
                                                      const Tensor& cx, const Tensor& w_ih,
                                                      const Tensor& w_hh,
                                                      const std::optional<Tensor>& b_ih,
                                                      const std::optional<Tensor>& b_hh,
                                                      bool need_workspace) {
  const bool any_requires_grad =
      input.requires_grad() || hx.requires_grad() || cx.requires_grad() || w_ih.requires_grad() ||
      w_hh.requires_grad() || (b_ih.has_value() && b_ih->requires_grad()) ||
      (b_hh.has_value() && b_hh->requires_grad());
  if (!at::GradMode::is_enabled() || !any_requires_grad) {
    // Inference: no graph to record, so skip building an autograd node.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, need_workspace);
  }
  auto out = LstmCellFunction::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh, need_workspace);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, Autograd, m) { m.impl("lstm_cell", &lstm_cell_autograd); }

}  // namespace bigkernels::autograd
