// Autograd for bigkernels::conv and bigkernels::conv_depthwise (the C++ CPU and CUDA kernels), in C++.
//
// Why not torch.library.register_autograd (as for the Triton twins in bigkernels/ops/conv.py): its
// generated Python autograd.Function runs on every call, even under no_grad, and cost ~15-25 us per
// conv on the CPU here, a visible share of a small layer (batch 1, a few hundred microseconds), which
// left the fused conv slower than the stock conv + add + activation sequence (same reason as
// csrc/autograd/lstm_cell.cpp). One template serves both ops: they differ only in `groups`.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../common/activation.h"

namespace bigkernels::autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The non-tensor arguments shared by the forward and backward schemas.
struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;  // unused by conv_depthwise
  std::string activation;
  double negative_slope;
};

using OptTensor = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

struct ConvOps {
  using ForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                                at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                                c10::string_view, double, bool);
  using BackwardSig = Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view, double,
                            std::array<bool, 4>);
  static const char* name() { return "bigkernels::conv"; }

  static std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& w, const OptTensor& b, const OptTensor& r,
                                            const ConvArgs& a, bool need_preactivation) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("bigkernels::conv", "").typed<ForwardSig>();
    return op.call(x, w, b, r, a.stride, a.padding, a.dilation, a.groups, a.activation, a.negative_slope,
                   need_preactivation);
  }
  static Grads backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& y, const Tensor& z,
                        const ConvArgs& a, std::array<bool, 4> mask) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("bigkernels::conv_backward", "").typed<BackwardSig>();
    return op.call(dy, x, w, y, z, a.stride, a.padding, a.dilation, a.groups, a.activation, a.negative_slope, mask);
  }
};

struct ConvDepthwiseOps {
  using ForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                                at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, c10::string_view,
                                                double, bool);
  using BackwardSig = Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, c10::string_view, double,
                            std::array<bool, 4>);
  static const char* name() { return "bigkernels::conv_depthwise"; }

  static std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& w, const OptTensor& b, const OptTensor& r,
                                            const ConvArgs& a, bool need_preactivation) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("bigkernels::conv_depthwise", "").typed<ForwardSig>();
    return op.call(x, w, b, r, a.stride, a.padding, a.dilation, a.activation, a.negative_slope, need_preactivation);
  }
  static Grads backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& y, const Tensor& z,
                        const ConvArgs& a, std::array<bool, 4> mask) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bigkernels::conv_depthwise_backward", "")
                               .typed<BackwardSig>();
    return op.call(dy, x, w, y, z, a.stride, a.padding, a.dilation, a.activation, a.negative_slope, mask);
  }
};

// act'(z) cannot be computed from y = act(z) for these (csrc/common/activation.h).
bool grad_needs_preactivation(const ConvArgs& a) {
  for (int i = 0; i < kNumActivations; ++i) {
    if (a.activation == kActivationNames[i]) {
      return !activation_grad_from_output(static_cast<Activation>(i), a.negative_slope);
    }
  }
  return false;  // an unknown name: the kernel has already refused it
}

// Positions in the packed integer entry of saved_data (ConvFunction::forward).
constexpr int kArgsStride = 0, kArgsPadding = 2, kArgsDilation = 4, kArgsGroups = 6, kArgsNeed = 7,
              kArgsRecompute = 11;

template <typename Ops>
class ConvFunction : public torch::autograd::Function<ConvFunction<Ops>> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& residual, ConvArgs args, bool need_preactivation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, z] = Ops::forward(input, weight, bias, residual, args, need_preactivation);
    // Without z (the forward ran as inference) an activation that needs it is recomputed in the
    // backward: keep what the recompute reads, only then.
    const bool recompute = grad_needs_preactivation(args) && z.dim() != 4;
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_residual = residual.has_value() && residual->defined();
    ctx->save_for_backward({input, weight, y, z, recompute && has_bias ? *bias : Tensor(),
                            recompute && has_residual ? *residual : Tensor()});
    // Which gradients are wanted, from the tensors themselves (needs_input_grad's numbering skips
    // absent optional tensors).
    // The integer arguments and flags in ONE entry (each saved_data entry is a hashed string key
    // and a boxed value: ten of them cost a few microseconds per call): the layout of kArgs*.
    ctx->saved_data["args"] = std::vector<int64_t>{
        args.stride[0], args.stride[1], args.padding[0], args.padding[1], args.dilation[0], args.dilation[1],
        args.groups, input.requires_grad(), weight.requires_grad(), has_bias && bias->requires_grad(),
        has_residual && residual->requires_grad(), recompute};
    ctx->saved_data["activation"] = args.activation;
    ctx->saved_data["negative_slope"] = args.negative_slope;
    ctx->mark_non_differentiable({z});
    // z never gets a gradient: no zero tensor is made for it (backward handles undefined grads).
    ctx->set_materialize_grads(false);
    return {y, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), Ops::name(), " does not support double backward (create_graph=True)");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1];
    Tensor y = saved[2], z = saved[3];
    const std::vector<int64_t> packed = ctx->saved_data["args"].toIntVector();
    const ConvArgs args{{packed[kArgsStride], packed[kArgsStride + 1]},
                        {packed[kArgsPadding], packed[kArgsPadding + 1]},
                        {packed[kArgsDilation], packed[kArgsDilation + 1]},
                        packed[kArgsGroups],
                        ctx->saved_data["activation"].toStringRef(),
                        ctx->saved_data["negative_slope"].toDouble()};
    if (packed[kArgsRecompute] != 0) {
      const OptTensor bias = saved[4].defined() ? OptTensor(saved[4]) : std::nullopt;
      const OptTensor residual = saved[5].defined() ? OptTensor(saved[5]) : std::nullopt;
      std::tie(y, z) = Ops::forward(input, weight, bias, residual, args, true);
    }
    const std::array<bool, 4> mask{packed[kArgsNeed] != 0, packed[kArgsNeed + 1] != 0, packed[kArgsNeed + 2] != 0,
                                   packed[kArgsNeed + 3] != 0};
    const Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(y);
    auto [g_input, g_weight, g_bias, g_residual] = Ops::backward(grad_output, input, weight, y, z, args, mask);
    // One entry per forward argument; undefined means "no gradient".
    return {mask[0] ? g_input : Tensor(), mask[1] ? g_weight : Tensor(), mask[2] ? g_bias : Tensor(),
            mask[3] ? g_residual : Tensor(), Tensor(), Tensor()};
  }
};

template <typename Ops>
std::tuple<Tensor, Tensor> run_with_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                                             const OptTensor& residual, ConvArgs args, bool need_preactivation) {
  const bool any_requires_grad = input.requires_grad() || weight.requires_grad() ||
                                 (bias.has_value() && bias->requires_grad()) ||
                                 (residual.has_value() && residual->requires_grad());
  if (!at::GradMode::is_enabled() || !any_requires_grad) {
    // Inference: no graph to record, so skip building an autograd node.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return Ops::forward(input, weight, bias, residual, args, need_preactivation);
  }
  auto out = ConvFunction<Ops>::apply(input, weight, bias, residual, std::move(args), need_preactivation);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> conv_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                                         const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
                                         double negative_slope, bool need_preactivation) {
  ConvArgs args{stride.vec(), padding.vec(), dilation.vec(), groups, std::string(activation), negative_slope};
  return run_with_autograd<ConvOps>(input, weight, bias, residual, std::move(args), need_preactivation);
}

std::tuple<Tensor, Tensor> conv_depthwise_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                                                   const OptTensor& residual, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                                   c10::string_view activation, double negative_slope,
                                                   bool need_preactivation) {
  ConvArgs args{stride.vec(), padding.vec(), dilation.vec(), 1, std::string(activation), negative_slope};
  return run_with_autograd<ConvDepthwiseOps>(input, weight, bias, residual, std::move(args), need_preactivation);
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, Autograd, m) {
  m.impl("conv", &conv_autograd);
  m.impl("conv_depthwise", &conv_depthwise_autograd);
}

}  // namespace bigkernels::autograd
