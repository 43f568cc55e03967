// Autograd for bigkernels::attention (the C++ CPU kernels), in C++.
//
// Why not torch.library.register_autograd (which the Triton twin keeps, bigkernels/ops/attention.py):
// its generated Python autograd.Function runs on every call and cost tens of microseconds per
// attention call here, more than the kernel itself for the small heads of a small Transformer
// (B=4, H=4, L=32, E=16 measured ~34 us of kernel), the same reason as csrc/autograd/conv.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace bigkernels::autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// The non-tensor arguments shared by the forward and backward schemas.
struct AttentionArgs {
  int64_t max_seqlen_q, max_seqlen_k;
  double scale;
  int64_t window_left, window_right;
  double dropout_p;
};

using ForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                              const OptTensor&, const OptTensor&, int64_t, int64_t, double,
                                              int64_t, int64_t, double, const OptTensor&);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, int64_t, int64_t, double, int64_t, int64_t, double, const OptTensor&, bool);

std::tuple<Tensor, Tensor> call_forward(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask,
                                        const OptTensor& cu_q, const OptTensor& cu_k, const AttentionArgs& a,
                                        const OptTensor& seed) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bigkernels::attention", "").typed<ForwardSig>();
  return op.call(q, k, v, mask, cu_q, cu_k, a.max_seqlen_q, a.max_seqlen_k, a.scale, a.window_left,
                 a.window_right, a.dropout_p, seed);
}

OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& query, const Tensor& key, const Tensor& value,
                               const OptTensor& attn_mask, const OptTensor& cu_seqlens_q,
                               const OptTensor& cu_seqlens_k, AttentionArgs args, const OptTensor& dropout_seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, lse] = call_forward(query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k, args, dropout_seed);
    ctx->save_for_backward({query, key, value, attn_mask.value_or(Tensor()), cu_seqlens_q.value_or(Tensor()),
                            cu_seqlens_k.value_or(Tensor()), output, lse, dropout_seed.value_or(Tensor())});
    ctx->saved_data["need"] = c10::List<bool>({query.requires_grad(), key.requires_grad(), value.requires_grad(),
                                               attn_mask.has_value() && attn_mask->requires_grad()});
    ctx->saved_data["max_seqlen_q"] = args.max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = args.max_seqlen_k;
    ctx->saved_data["scale"] = args.scale;
    ctx->saved_data["window_left"] = args.window_left;
    ctx->saved_data["window_right"] = args.window_right;
    ctx->saved_data["dropout_p"] = args.dropout_p;
    // lse is an output for callers that combine partial attentions; its gradient is not supported.
    ctx->mark_non_differentiable({lse});
    return {output, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "bigkernels::attention does not support double backward "
                "(create_graph=True)");
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("bigkernels::attention_backward", "").typed<BackwardSig>();
    const auto saved = ctx->get_saved_variables();
    const Tensor &query = saved[0], &key = saved[1], &value = saved[2], &output = saved[6], &lse = saved[7];
    const auto need = ctx->saved_data["need"].toBoolList();
    const bool need_grad_mask = need[3];
    const Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    auto [g_query, g_key, g_value, g_mask] =
        op.call(grad_output, query, key, value, output, lse, optional(saved[3]), optional(saved[4]),
                optional(saved[5]), ctx->saved_data["max_seqlen_q"].toInt(), ctx->saved_data["max_seqlen_k"].toInt(),
                ctx->saved_data["scale"].toDouble(), ctx->saved_data["window_left"].toInt(),
                ctx->saved_data["window_right"].toInt(), ctx->saved_data["dropout_p"].toDouble(),
                optional(saved[8]), need_grad_mask);
    // One entry per forward argument; undefined means "no gradient".
    return {need[0] ? g_query : Tensor(), need[1] ? g_key : Tensor(), need[2] ? g_value : Tensor(),
            need_grad_mask ? g_mask : Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_autograd(const Tensor& query, const Tensor& key, const Tensor& value,
                                              const OptTensor& attn_mask, const OptTensor& cu_seqlens_q,
                                              const OptTensor& cu_seqlens_k, int64_t max_seqlen_q,
                                              int64_t max_seqlen_k, double scale, int64_t window_left,
                                              int64_t window_right, double dropout_p, const OptTensor& dropout_seed) {
  const AttentionArgs args{max_seqlen_q, max_seqlen_k, scale, window_left, window_right, dropout_p};
  const bool any_requires_grad = query.requires_grad() || key.requires_grad() || value.requires_grad() ||
                                 (attn_mask.has_value() && attn_mask->requires_grad());
  if (!at::GradMode::is_enabled() || !any_requires_grad) {
    // Inference: no graph to record, so skip building an autograd node.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k, args, dropout_seed);
  }
  auto out = AttentionFunction::apply(query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k, args, dropout_seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, Autograd, m) { m.impl("attention", &attention_autograd); }

}  // namespace bigkernels::autograd
