// Fused convolution on the CPU: bigkernels::conv and bigkernels::conv_backward.
//
//   y = act(conv2d(x, w, stride, padding, dilation, groups) + bias + residual)
//
// Forward, 1x1 layers (groups 1, no padding; float32/float64; NCHW or channels_last): tiled BLAS
//          GEMMs, bias + residual + activation applied to each output tile as the GEMM produces it
//          (conv_pointwise_gemm.cpp; pick_own_core says where and why).
// Forward, 3x3 stride-1 NCHW float32 layers of 32-512 channels on 14x14 to 112x112 images:
//          Winograd F(2x2, 3x3), the epilogue fused into its output transform (conv_winograd.cpp;
//          prefer_winograd says where and why).
// Forward, float32/bfloat16, where it measured fastest (prefer_onednn_fused: channels_last,
//          depthwise, or with a residual; not tiny): oneDNN's fused convolution primitive (the ATen
//          op mkldnn::_convolution_pointwise that inductor's CPU conv fusions use), configured with
//          post-ops so that bias, residual add and activation are applied while oneDNN writes each
//          output block: one pass, no intermediate tensor. oneDNN takes a residual add followed by
//          relu (or no activation); any other activation after a residual, or one whose gradient
//          needs the pre-activation z in training, gets ONE extra in-place pass (conv_epilogue.cpp).
// Forward, otherwise (float64, NCHW without residual, tiny layers, no oneDNN): at::convolution
//          (oneDNN or ATen's own kernels, with the bias folded in), then that one in-place pass.
//          The stock sequence runs up to three passes after the conv (+ bias when not fused,
//          + residual, activation) and allocates a tensor for each.
// Backward: ONE pass gz = dy * act'(z or y), then ATen's convolution_backward on gz for the
//          input, weight and bias gradients (each skipped when not wanted); grad_residual is gz.
//          The input gradient of NCHW float32 3x3 stride-1 layers in Winograd's range is itself a
//          3x3 convolution run by the Winograd core (input_grad_by_winograd).
//          NCHW strided 1x1 layers take plain GEMMs instead (pointwise_backward_gemm).
//
// Layouts: NCHW-contiguous and channels_last input are both fast (oneDNN takes either without a
// reorder of the activations); the output takes the input's layout. Any other strides work but
// cost a copy inside ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>

#include "conv_epilogue.h"
#include "conv_pointwise_gemm.h"
#include "conv_winograd.h"

namespace bigkernels::cpu {
namespace {

Activation parse_activation(const std::string& name) {
  for (int i = 0; i < kNumActivations; ++i) {
    if (name == kActivationNames[i]) return static_cast<Activation>(i);
  }
  TORCH_CHECK_VALUE(false, "bigkernels::conv: activation must be one of none, relu, gelu, gelu_tanh, silu, ",
                    "sigmoid, leaky_relu; got '", name, "'");
}

// The output's layout: channels_last exactly when the input is channels_last (and not also
// NCHW-contiguous, as a tensor with C == 1 or H == W == 1 can be). bigkernels/ops/conv.py's fake
// implementation uses the same rule.
at::MemoryFormat layout_of(const at::Tensor& input) {
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// The strides at::empty(sizes, layout) gives a 4-D tensor (sizes of 0 count as 1), computed
// rather than read off a fresh allocation: in_layout runs on every output of every call.
std::array<int64_t, 4> layout_strides(at::IntArrayRef sizes, at::MemoryFormat layout) {
  const auto extent = [&](int d) { return std::max<int64_t>(sizes[d], 1); };
  if (layout == at::MemoryFormat::ChannelsLast) {  // memory order N, H, W, C
    const int64_t c = 1, w = extent(1), h = w * extent(3), n = h * extent(2);
    return {n, c, h, w};
  }
  const int64_t w = 1, h = extent(3), c = h * extent(2), n = c * extent(1);
  return {n, c, h, w};
}

// t itself when it already has exactly the strides of a fresh tensor of its shape in `layout`,
// else a copy that has them (so the real outputs match the fake implementation bit for bit).
at::Tensor in_layout(const at::Tensor& t, at::MemoryFormat layout) {
  TORCH_INTERNAL_ASSERT(t.dim() == 4);
  const auto expected = layout_strides(t.sizes(), layout);
  if (t.strides() == at::IntArrayRef(expected.data(), expected.size())) return t;
  auto fresh = at::empty(t.sizes(), t.options().memory_format(layout));
  fresh.copy_(t);
  return fresh;
}

// ---------------------------------------------------------------------------- oneDNN fused core
// The post-op names of mkldnn::_convolution_pointwise for our activations ("none" = no post-op).
struct OneDnnPostOp {
  const char* attr;
  const char* algorithm;  // nullptr = None
};
OneDnnPostOp onednn_post_op(Activation act) {
  switch (act) {
    case Activation::None: return {"none", nullptr};
    case Activation::ReLU: return {"relu", nullptr};
    case Activation::GELU: return {"gelu", "none"};
    case Activation::GELUTanh: return {"gelu", "tanh"};
    case Activation::SiLU: return {"swish", nullptr};
    case Activation::Sigmoid: return {"sigmoid", nullptr};
    case Activation::LeakyReLU: return {"leaky_relu", nullptr};
  }
  return {"none", nullptr};
}

// The fused-conv ops, looked up once; nullopt when this torch has none (built without oneDNN).
const std::optional<c10::OperatorHandle>& onednn_op(bool binary) {
  static const std::optional<c10::OperatorHandle> unary_op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
  static const std::optional<c10::OperatorHandle> binary_op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", "binary"});
  return binary ? binary_op : unary_op;
}

bool onednn_usable(const at::Tensor& input) {
  const auto dt = input.scalar_type();
  return (dt == at::kFloat || dt == at::kBFloat16) && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() &&
         (input.is_contiguous() || input.is_contiguous(at::MemoryFormat::ChannelsLast)) && onednn_op(false).has_value() &&
         onednn_op(true).has_value();
}

// conv + bias [+ residual] [+ act] in one oneDNN primitive (act = None: no activation post-op).
// Called through the dispatcher, boxed: the op's C++ signature is not part of torch's API.
// Returns an undefined tensor if oneDNN refuses the call (e.g. bfloat16 on a CPU without the
// instructions it needs): the caller then takes the generic path.
at::Tensor onednn_fused_conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, Activation act, double negative_slope) {
  const OneDnnPostOp post = onednn_post_op(act);
  c10::List<std::optional<at::Scalar>> scalars;
  if (act == Activation::LeakyReLU) scalars.push_back(at::Scalar(negative_slope));
  torch::jit::Stack stack;
  stack.emplace_back(input);
  if (residual.defined()) stack.emplace_back(residual);
  stack.emplace_back(weight);
  stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(padding.vec());
  stack.emplace_back(stride.vec());
  stack.emplace_back(dilation.vec());
  stack.emplace_back(groups);
  if (residual.defined()) {
    stack.emplace_back(std::string("add"));
    stack.emplace_back(c10::IValue());  // alpha
    stack.emplace_back(act == Activation::None ? c10::IValue() : c10::IValue(std::string(post.attr)));
  } else {
    stack.emplace_back(std::string(post.attr));
  }
  stack.emplace_back(scalars);
  stack.emplace_back(post.algorithm != nullptr ? c10::IValue(std::string(post.algorithm)) : c10::IValue());
  try {
    onednn_op(residual.defined())->callBoxed(&stack);
  } catch (const c10::Error&) {
    return at::Tensor();
  }
  return stack[0].toTensor();
}

struct ConvGeometry {
  int64_t batch, channels, height, width, filters, kernel_h, kernel_w, out_h, out_w;
};

// torch 2.13's CPU convolution crashes (SIGSEGV, stock F.conv2d included) on some channels_last
// inputs with a spatial size of 1, e.g. input (1, 6, 5, 1) channels_last, weight (6, 2, 2, 1), bias,
// stride (3, 2), padding (2, 3), dilation 2, groups 3. Such a tensor's channels_last strides are
// degenerate; the ATen/oneDNN core gets an NCHW copy of it (tiny by construction: one spatial side
// is 1) and the results still come back in the caller's layout.
at::Tensor core_layout(const at::Tensor& t, at::MemoryFormat layout) {
  const bool degenerate = layout == at::MemoryFormat::ChannelsLast && (t.size(2) == 1 || t.size(3) == 1);
  return degenerate ? t.contiguous() : t;
}

// Below this many output elements the fused primitive's fixed cost (~40 us on the machine below:
// it builds its oneDNN primitive on every call, where at::convolution caches its own) outweighs the
// pass over the output it saves (~0.5 MB of float32 read and written).
constexpr int64_t kOneDnnFusedMinOutputs = 1 << 17;

// Which core runs a float32/bfloat16 call. Measured side by side on a 2-core Xeon (1 and 2 threads,
// batch 1 and 4, ResNet/MobileNet/ConvNeXt layer shapes): the fused primitive is at least as fast
// as at::convolution + our in-place pass for channels_last input, depthwise layers and calls with
// a residual, but up to 2x slower on NCHW layers without a residual (e.g. 1x1 256 -> 64: it takes
// a slower kernel than at::convolution's); those take the generic path.
bool prefer_onednn_fused(const at::Tensor& input, const at::Tensor& weight, const ConvGeometry& g, int64_t groups,
                         bool has_residual, at::MemoryFormat layout) {
  const int64_t outputs = g.batch * g.filters * g.out_h * g.out_w;
  const bool depthwise = groups == g.channels && groups == g.filters;
  return outputs >= kOneDnnFusedMinOutputs && (layout == at::MemoryFormat::ChannelsLast || depthwise || has_residual) &&
         onednn_usable(input);
}

// ------------------------------------------------------------------ our own tiled cores
enum class OwnCore { None, PointwiseGemm, Winograd };

// 1x1 convolutions (groups 1, no padding, any stride; float32/float64; NCHW or channels_last) run as
// tiled BLAS GEMMs with the epilogue fused per tile (conv_pointwise_gemm.cpp). Measured side by side
// on the machine above (fp32, 2 threads, bias + relu [+ residual], bench/conv.py's FULL_CPU 1x1
// layers): 1.14-1.81x the stock conv2d + add + relu where oneDNN's fused primitive or
// at::convolution + our pass measured 0.93-1.23x.
// 3x3 stride-1 NCHW float32 layers run Winograd F(2x2, 3x3) (conv_winograd.cpp) where it measured
// faster than stock. Side by side on the machine above (fp32, 2 threads, bias + residual + relu, vs
// stock conv2d + add + relu, interleaved in one run; run-to-run spread ~5-10%):
//   128 -> 128 28x28: 1.37-1.42x (N=1, 0.51-0.52 vs 0.71-0.72 ms), 1.29-1.38x (N=8, 3.8-4.1 vs 5.2-5.5 ms)
//   64 -> 64 56x56: 1.44x (N=1), 1.24x (N=2), 1.24-1.40x (N=8);  64 -> 64 28x28: 1.38x (N=1)
//   64 -> 64 112x112: 1.42x (N=1);  32 -> 32 56x56: 1.34x (N=1);  96 -> 96 40x40: 1.29x (N=1)
//   128 -> 128 56x56: 1.20x (N=1), 1.43x (N=8);  128 -> 128 14x14: 1.48x (N=1), 1.01-1.03x (N=8)
//   256 -> 256 28x28: 1.49x (N=1);  256 -> 256 14x14: 1.11-1.22x (N=1), 1.13-1.17x (N=8)
//   512 -> 512 14x14: 1.21-1.26x (N=1)
// It loses on smaller images: 256 -> 256 10x10 0.73x, 512 -> 512 7x7 0.98x (N=1), 0.54x (N=8): a
// tile row of 4-5 tiles wastes a fifth of the GEMM on its junk tile and the GEMMs are tiny. (Before
// the transforms were vectorised and the GEMMs run over whole 16-float column vectors it won only
// at 128 -> 128 28x28, 1.07-1.14x.) Layers outside the measured range (fewer than 32 or more than
// 512 channels, sides above 112) take the other cores.
// bigkernels/ops/conv.py CPU_OWN_CORE_MIN_CHANNELS_3X3 mirrors kWinogradMinChannels (keep equal).
constexpr int64_t kWinogradMinChannels = 32;
constexpr int64_t kWinogradMaxChannels = 512;
constexpr int64_t kWinogradMinOutputSide = 14;
constexpr int64_t kWinogradMaxOutputSide = 112;

bool prefer_winograd(const ConvGeometry& g) {
  const auto in_range = [](int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi; };
  return in_range(g.channels, kWinogradMinChannels, kWinogradMaxChannels) &&
         in_range(g.filters, kWinogradMinChannels, kWinogradMaxChannels) &&
         in_range(g.out_h, kWinogradMinOutputSide, kWinogradMaxOutputSide) &&
         in_range(g.out_w, kWinogradMinOutputSide, kWinogradMaxOutputSide);
}

OwnCore pick_own_core(const at::Tensor& input, const at::Tensor& weight, const ConvGeometry& g,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      at::MemoryFormat layout) {
  if (!input.is_contiguous(layout)) return OwnCore::None;
  if (conv_pointwise_gemm_supports(input, weight, padding, groups)) return OwnCore::PointwiseGemm;
  if (layout == at::MemoryFormat::Contiguous && prefer_winograd(g) &&
      conv_winograd_supports(input, weight, stride, padding, dilation, groups)) {
    return OwnCore::Winograd;
  }
  return OwnCore::None;
}

ConvGeometry check_conv_args(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(input.dim() == 4, "bigkernels::conv: input must be 4-D (N, C, H, W), got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 4, "bigkernels::conv: weight must be 4-D (K, C/groups, R, S), got ",
                    weight.dim(), "-D");
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(),
              "bigkernels::conv CPU kernel got tensors on ", input.device(), " and ", weight.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
                   "bigkernels::conv on CPU supports float32, float64 and bfloat16 input, got ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, "bigkernels::conv: weight must have the dtype of input (", dt,
                   "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "bigkernels::conv: stride, padding and dilation must have 2 elements");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(stride[i] >= 1, "bigkernels::conv: stride must be >= 1, got ", stride);
    TORCH_CHECK_VALUE(padding[i] >= 0, "bigkernels::conv: padding must be >= 0, got ", padding);
    TORCH_CHECK_VALUE(dilation[i] >= 1, "bigkernels::conv: dilation must be >= 1, got ", dilation);
  }
  TORCH_CHECK_VALUE(groups >= 1, "bigkernels::conv: groups must be >= 1, got ", groups);
  ConvGeometry g{};
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.filters = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  TORCH_CHECK_VALUE(g.channels % groups == 0 && g.filters % groups == 0,
                    "bigkernels::conv: groups (", groups, ") must divide the input channels (", g.channels,
                    ") and the output channels (", g.filters, ")");
  TORCH_CHECK_VALUE(weight.size(1) * groups == g.channels, "bigkernels::conv: weight.size(1) must be input channels / groups = ",
                    g.channels / groups, ", got ", weight.size(1));
  g.out_h = (g.height + 2 * padding[0] - dilation[0] * (g.kernel_h - 1) - 1) / stride[0] + 1;
  g.out_w = (g.width + 2 * padding[1] - dilation[1] * (g.kernel_w - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(g.height + 2 * padding[0] >= dilation[0] * (g.kernel_h - 1) + 1 &&
                        g.width + 2 * padding[1] >= dilation[1] * (g.kernel_w - 1) + 1,
                    "bigkernels::conv: the (padded) input ", g.height, "x", g.width,
                    " is smaller than the (dilated) kernel");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.filters, "bigkernels::conv: bias must have shape (",
                      g.filters, ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == dt, "bigkernels::conv: bias must have the dtype of input");
  }
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({g.batch, g.filters, g.out_h, g.out_w}),
                      "bigkernels::conv: residual must have the output's shape (", g.batch, ", ", g.filters, ", ",
                      g.out_h, ", ", g.out_w, "), got ", residual->sizes());
    TORCH_CHECK_TYPE(residual->scalar_type() == dt, "bigkernels::conv: residual must have the dtype of input");
  }
  return g;
}

std::tuple<at::Tensor, at::Tensor> conv_cpu(const at::Tensor& input, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& residual,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, int64_t groups,
                                            c10::string_view activation, double negative_slope,
                                            bool need_preactivation) {
  // The ATen calls below must run in the caller's dtype: autocast applies at our op's boundary.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto g = check_conv_args(input, weight, bias, residual, stride, padding, dilation, groups);
  const Activation act = parse_activation(std::string(activation));
  const auto layout = layout_of(input);
  const bool has_residual = residual.has_value() && residual->defined();
  const bool keep_z = need_preactivation && !activation_grad_from_output(act, negative_slope);

  const at::Tensor core_input = core_layout(input, layout);
  at::Tensor res;
  if (has_residual) res = residual->is_contiguous(layout) ? *residual : residual->contiguous(layout);
  at::Tensor preactivation = at::empty({0}, input.options());

  // Our own cores, where they measured faster: they produce the output tile by tile and apply the
  // epilogue to each tile as it is produced.
  const OwnCore own = pick_own_core(input, weight, g, stride, padding, dilation, groups, layout);
  if (own != OwnCore::None) {
    const auto options = input.options().memory_format(layout);
    at::Tensor output = at::empty({g.batch, g.filters, g.out_h, g.out_w}, options);
    if (keep_z) preactivation = at::empty({g.batch, g.filters, g.out_h, g.out_w}, options);
    const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    if (own == OwnCore::PointwiseGemm) {
      conv_pointwise_gemm(input, weight, b, res, stride, layout == at::MemoryFormat::ChannelsLast, output,
                          keep_z ? preactivation : at::Tensor(), act, negative_slope);
    } else {
      conv_winograd(input, weight, b, res, padding, output, keep_z ? preactivation : at::Tensor(), act,
                    negative_slope);
    }
    return {output, preactivation};
  }

  // Fast path: oneDNN applies bias, residual and (when it can) the activation as post-ops.
  if (prefer_onednn_fused(input, weight, g, groups, has_residual, layout)) {
    // The activation goes into the primitive unless z must be kept, or a residual comes first and
    // the activation is not relu (oneDNN's residual fusion takes relu only).
    const bool act_in_primitive = !keep_z && (!has_residual || act == Activation::ReLU);
    at::Tensor fused = onednn_fused_conv(core_input, weight.contiguous(), bias, res, stride, padding, dilation, groups,
                                         act_in_primitive ? act : Activation::None, negative_slope);
    if (fused.defined()) {
      fused = in_layout(fused, layout);
      if (act_in_primitive || act == Activation::None) return {fused, preactivation};
      // fused holds z: one pass for the activation (z kept for the backward when needed).
      at::Tensor output = fused;
      if (keep_z) {
        preactivation = fused;
        output = at::empty(fused.sizes(), fused.options().memory_format(layout));
      }
      conv_forward_epilogue(fused, at::Tensor(), keep_z ? preactivation : at::Tensor(), output, act, negative_slope);
      return {output, preactivation};
    }
  }

  // Generic path: the convolution with the bias folded in, then one pass for residual + activation.
  // The result is a fresh tensor we own, so the pass may overwrite it.
  at::Tensor conv = at::convolution(core_input, weight, bias, stride, padding, dilation, /*transposed=*/false,
                                    /*output_padding=*/{0, 0}, groups);
  conv = in_layout(conv, layout);
  if (!has_residual && act == Activation::None) return {conv, preactivation};
  at::Tensor output = conv;  // in place, unless z must be kept
  if (keep_z) {
    preactivation = conv;
    output = at::empty(conv.sizes(), conv.options().memory_format(layout));
  }
  conv_forward_epilogue(conv, res, keep_z ? preactivation : at::Tensor(), output, act, negative_slope);
  return {output, preactivation};
}

// ------------------------------------------------------------------ 1x1 backward as GEMMs
// A 1x1 convolution's gradients are plain matrix products over the pixels (as its forward in
// conv_pointwise_gemm.cpp), with G = gz and X = the input pixels the forward read (every stride-th):
//   NCHW, per image:   grad_input[n] (C x PQ) = W^T (C x K) . G[n] (K x PQ)
//                      grad_weight (K x C)    = sum_n G[n] . X[n]^T
// run by ATen's BLAS-backed matmul/mm/bmm. Strided layers scatter grad_input into a zero tensor.
// Used where it measured faster than ATen's convolution_backward (oneDNN), side by side on the
// 2-core Xeon (fp32, 2 threads, bias + relu, whole fwd+bwd step): NCHW strided 1x1 layers, e.g.
// N=8 256->512 56x56 stride 2: 26.0 vs 50.7 ms (stock 55.9); N=1 same layer 2.9 vs 5.8 ms; N=4
// 512->1024 28x28 stride 2: 9.9 vs 11.7 ms; N=2 64->128 31x31 stride 2: 0.52 vs 0.65 ms. Not used for
// stride 1 (N=8 64->256 56x56: 31.6 vs 28.6 ms; N=1 256->64: 3.7 vs 1.8 ms) nor channels_last
// (within 1-5% of ATen's).
bool pointwise_backward_by_gemm(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, int64_t groups, at::MemoryFormat layout,
                                const at::Tensor& grad_z) {
  const auto dt = input.scalar_type();
  return (dt == at::kFloat || dt == at::kDouble) && groups == 1 && weight.size(2) == 1 && weight.size(3) == 1 &&
         padding[0] == 0 && padding[1] == 0 && (stride[0] != 1 || stride[1] != 1) &&
         layout == at::MemoryFormat::Contiguous && input.numel() > 0 && grad_z.numel() > 0;
}

// The input pixels a strided 1x1 convolution reads: x[:, :, ::sh, ::sw] cut to the output's size.
at::Tensor strided_pixels(const at::Tensor& t, at::IntArrayRef stride, int64_t out_h, int64_t out_w) {
  if (stride[0] == 1 && stride[1] == 1) return t;
  return t.slice(2, 0, (out_h - 1) * stride[0] + 1, stride[0]).slice(3, 0, (out_w - 1) * stride[1] + 1, stride[1]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pointwise_backward_gemm(const at::Tensor& grad_z, const at::Tensor& input,
                                                                       const at::Tensor& weight, at::IntArrayRef stride,
                                                                       std::array<bool, 3> mask) {
  const int64_t n = input.size(0), c = input.size(1), k = weight.size(0), p = grad_z.size(2), q = grad_z.size(3);
  const bool strided = stride[0] != 1 || stride[1] != 1;
  const at::Tensor w2 = weight.reshape({k, c});
  at::Tensor grad_input, grad_weight, grad_bias;
  const at::Tensor g3 = grad_z.reshape({n, k, p * q});
  if (mask[0]) {
    const at::Tensor gi = at::matmul(w2.t(), g3).view({n, c, p, q});
    if (strided) {
      grad_input = at::zeros(input.sizes(), input.options());
      strided_pixels(grad_input, stride, p, q).copy_(gi);
    } else {
      grad_input = gi;
    }
  }
  if (mask[1]) {
    const at::Tensor x3 = strided_pixels(input, stride, p, q).reshape({n, c, p * q});
    grad_weight = (n == 1 ? at::mm(g3[0], x3[0].t()) : at::bmm(g3, x3.transpose(1, 2)).sum(0)).view({k, c, 1, 1});
  }
  if (mask[2]) grad_bias = grad_z.sum({0, 2, 3});
  return {grad_input, grad_weight, grad_bias};
}

// ------------------------------------------------------------------ 3x3 input gradient by Winograd
// The input gradient of a 3x3 stride-1 convolution is itself a 3x3 stride-1 convolution of gz with
// the flipped, transposed weight (padding 2 - p), K -> C channels at the input's size: run it by
// the forward's Winograd core (conv_winograd_input_grad) where that convolution is one
// prefer_winograd routes there; ATen's convolution_backward then computes only the weight and
// bias gradients. Side by side (fp32, 2 threads, bigkernels.nn.Conv2d + residual + relu, whole
// fwd+bwd step; Winograd dx vs ATen's dx, both behind our Winograd forward; stock = nn.Conv2d + add +
// relu): N=1 128->128 28x28 2.22 vs 2.41 ms (stock 3.11); N=8 same 16.7 vs 19.1 (21.1); N=1 64->64
// 56x56 2.43 vs 2.63 (2.78); N=8 same 24.5 vs 25.2 (28.8); N=1 256->256 14x14 2.53 vs 2.72 (2.77).
bool input_grad_by_winograd(const at::Tensor& input, const at::Tensor& weight, const ConvGeometry& g,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            at::MemoryFormat layout, const at::Tensor& grad_z) {
  ConvGeometry grad_conv = g;
  grad_conv.channels = g.filters, grad_conv.filters = g.channels;
  grad_conv.height = g.out_h, grad_conv.width = g.out_w, grad_conv.out_h = g.height, grad_conv.out_w = g.width;
  return layout == at::MemoryFormat::Contiguous && grad_z.is_contiguous() && grad_z.numel() > 0 &&
         prefer_winograd(grad_conv) && conv_winograd_supports(input, weight, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& output, const at::Tensor& preactivation, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    double negative_slope, std::array<bool, 4> output_mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto g = check_conv_args(input, weight, std::nullopt, std::nullopt, stride, padding, dilation, groups);
  const Activation act = parse_activation(std::string(activation));
  const auto layout = layout_of(input);
  const std::vector<int64_t> out_shape_vec{g.batch, g.filters, g.out_h, g.out_w};
  const at::IntArrayRef out_shape(out_shape_vec);
  TORCH_CHECK_VALUE(grad_output.sizes() == out_shape, "bigkernels::conv_backward: grad_output must have the output's shape ",
                    out_shape, ", got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(),
                   "bigkernels::conv_backward: grad_output must have the dtype of input");
  const bool from_z = !activation_grad_from_output(act, negative_slope);
  const at::Tensor& source = from_z ? preactivation : output;
  if (act != Activation::None) {
    TORCH_CHECK_VALUE(source.sizes() == out_shape, "bigkernels::conv_backward: ",
                      from_z ? "preactivation (the forward's, with need_preactivation=True)" : "output",
                      " must have shape ", out_shape, " for activation '", std::string(activation), "', got ",
                      source.sizes());
    TORCH_CHECK_TYPE(source.scalar_type() == input.scalar_type(),
                     "bigkernels::conv_backward: output/preactivation must have the dtype of input");
  }

  // gz = dy * act'(.) in one pass, in the input's layout (grad_residual is gz itself).
  at::Tensor grad_z;
  if (act == Activation::None) {
    grad_z = in_layout(grad_output, layout);
    if (output_mask[3] && grad_z.is_same(grad_output)) grad_z = grad_z.clone(layout);  // never alias an input
  } else {
    const at::Tensor dy = grad_output.is_contiguous(layout) ? grad_output : grad_output.contiguous(layout);
    const at::Tensor src = source.is_contiguous(layout) ? source : source.contiguous(layout);
    grad_z = at::empty(out_shape, input.options().memory_format(layout));
    conv_backward_prologue(dy, src, from_z, grad_z, act, negative_slope);
  }

  at::Tensor grad_input, grad_weight, grad_bias;
  const bool any_conv_grad = output_mask[0] || output_mask[1] || output_mask[2];
  if (any_conv_grad && pointwise_backward_by_gemm(input, weight, stride, padding, groups, layout, grad_z)) {
    std::tie(grad_input, grad_weight, grad_bias) =
        pointwise_backward_gemm(grad_z, input, weight, stride, {output_mask[0], output_mask[1], output_mask[2]});
  } else if (any_conv_grad) {
    const bool winograd_dx =
        output_mask[0] && input_grad_by_winograd(input, weight, g, stride, padding, dilation, groups, layout, grad_z);
    if (winograd_dx) {
      grad_input = at::empty(input.sizes(), input.options());
      conv_winograd_input_grad(grad_z, weight, padding, grad_input);
    }
    if (output_mask[1] || output_mask[2] || (output_mask[0] && !winograd_dx)) {
      const std::vector<int64_t> bias_sizes{g.filters};
      const at::Tensor core_input = core_layout(input, layout);
      at::Tensor aten_grad_input;
      std::tie(aten_grad_input, grad_weight, grad_bias) = at::convolution_backward(
          core_input.is_same(input) ? grad_z : grad_z.contiguous(), core_input, weight, output_mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, stride,
          padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
          {output_mask[0] && !winograd_dx, output_mask[1], output_mask[2]});
      if (!winograd_dx) grad_input = aten_grad_input;
    }
  }
  const auto empty = [&] { return at::empty({0}, input.options()); };
  grad_input = output_mask[0] ? in_layout(grad_input, layout) : empty();
  // grad_weight in the weight's layout: a channels_last model (model.to(memory_format=...)) has
  // channels_last weights, and autograd would otherwise copy the gradient to match them.
  grad_weight = output_mask[1] ? in_layout(grad_weight, layout_of(weight)) : empty();
  grad_bias = output_mask[2] ? grad_bias.contiguous() : empty();
  at::Tensor grad_residual = output_mask[3] ? grad_z : empty();
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("conv", &conv_cpu);
  m.impl("conv_backward", &conv_backward_cpu);
}

}  // namespace bigkernels::cpu
