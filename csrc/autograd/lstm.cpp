// Autograd for bigkernels::lstm (the C++ CPU and CUDA kernels), in C++ for the same reason as
// csrc/autograd/lstm_cell.cpp: a Python autograd.Function would add tens of microseconds per layer
// call. The node saves the inputs, the output and the workspace, and calls lstm_backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace bigkernels::autograd {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, bool, bool, int64_t);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool, const Tensor&,
    const Tensor&, const Tensor&, std::array<bool, 3>, int64_t);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bigkernels::lstm", "").typed<ForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bigkernels::lstm_backward", "")
                             .typed<BackwardSig>();
  return op;
}

OptTensor optional_of(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

class LstmFunction : public torch::autograd::Function<LstmFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& batch_sizes,
                               const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& w_hr, bool reverse, bool need_workspace, int64_t path) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, h_n, c_n, gates, cells] = forward_op().call(
        input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, need_workspace, path);
    ctx->save_for_backward({input, or_undefined(batch_sizes), h0, c0, w_ih, w_hh, or_undefined(b_ih),
                            or_undefined(b_hh), or_undefined(w_hr), output, gates, cells});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["path"] = path;  // the chooser's path holds for the backward too
    ctx->mark_non_differentiable({gates, cells});
    return {output, h_n, c_n, gates, cells};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "bigkernels::lstm does not support double backward (create_graph=True)");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &h0 = saved[2], &c0 = saved[3], &w_ih = saved[4],
                 &w_hh = saved[5];
    const OptTensor batch_sizes = optional_of(saved[1]), b_ih = optional_of(saved[6]),
                    b_hh = optional_of(saved[7]), w_hr = optional_of(saved[8]);
    Tensor output = saved[9], gates = saved[10], cells = saved[11];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    if (gates.dim() == 1) {
      // The forward ran as inference (need_workspace=false) yet is differentiated, e.g. a direct
      // op call: recompute the workspace rather than fail.
      std::tie(output, std::ignore, std::ignore, gates, cells) =
          forward_op().call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, true,
                            ctx->saved_data["path"].toInt());
    }
    // needs_input_grad counts only the tensor arguments that were present, in order.
    int64_t edge = 0;
    auto next_needs = [&](bool present) { return present && ctx->needs_input_grad(edge++); };
    const bool need_input = next_needs(true);
    next_needs(batch_sizes.has_value());
    const bool need_h0 = next_needs(true), need_c0 = next_needs(true),
               need_w_ih = next_needs(true), need_w_hh = next_needs(true),
               need_b_ih = next_needs(b_ih.has_value()), need_b_hh = next_needs(b_hh.has_value()),
               need_w_hr = next_needs(w_hr.has_value());
    const bool need_weights = need_w_ih || need_w_hh || need_w_hr, need_bias = need_b_ih || need_b_hh;

    auto or_zeros = [](const Tensor& g, const Tensor& like) { return g.defined() ? g : at::zeros_like(like); };
    auto [g_input, g_h0, g_c0, g_w_ih, g_w_hh, g_bias, g_w_hr] = backward_op().call(
        or_zeros(grads[0], output), or_zeros(grads[1], h0), or_zeros(grads[2], c0), input,
        batch_sizes, h0, c0, w_ih, w_hh, w_hr, reverse, output, gates, cells,
        {need_input, need_weights, need_bias}, ctx->saved_data["path"].toInt());
    // One entry per forward argument; undefined means "no gradient".
    return {need_input ? g_input : Tensor(), Tensor(),
            need_h0 ? g_h0 : Tensor(),       need_c0 ? g_c0 : Tensor(),
            need_w_ih ? g_w_ih : Tensor(),   need_w_hh ? g_w_hh : Tensor(),
            need_b_ih ? g_bias : Tensor(),   need_b_hh ? g_bias : Tensor(),
            need_w_hr ? g_w_hr : Tensor(),   Tensor(),
            Tensor(),                        Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_autograd(
    const Tensor& input, const OptTensor& batch_sizes, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& w_hr, bool reverse, bool need_workspace, int64_t path) {
  const bool any_requires_grad =
      input.requires_grad() || h0.requires_grad() || c0.requires_grad() || w_ih.requires_grad() ||
      w_hh.requires_grad() || (b_ih.has_value() && b_ih->requires_grad()) ||
      (b_hh.has_value() && b_hh->requires_grad()) || (w_hr.has_value() && w_hr->requires_grad());
  if (!at::GradMode::is_enabled() || !any_requires_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // inference: no node to build
    return forward_op().call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                             need_workspace, path);
  }
  auto out = LstmFunction::apply(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                 need_workspace, path);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, Autograd, m) { m.impl("lstm", &lstm_autograd); }

}  // namespace bigkernels::autograd
