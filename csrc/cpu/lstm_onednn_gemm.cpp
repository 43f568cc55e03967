// OneDnnStepGemm (lstm_onednn_gemm.h): torch's oneDNN linear ops called through the dispatcher.
// Boxed calls: they depend only on the ops' schemas, not on the C++ signature torch registers
// their kernels with (which has changed between releases); boxing costs about 1 us of the op's 15.
#include "lstm_onednn_gemm.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace bigkernels::cpu {
namespace {

// Looked up on first use: the mkldnn ops are registered when libtorch_cpu loads, before any call.
const std::optional<c10::OperatorHandle>& linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}
const std::optional<c10::OperatorHandle>& reorder_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""});
  return op;
}

}  // namespace

bool onednn_gemm_available() {
  return at::hasMKLDNN() && linear_op().has_value() && reorder_op().has_value();
}

OneDnnStepGemm::OneDnnStepGemm(const at::Tensor& w, int64_t rows, bool backward) : backward_(backward) {
  TORCH_CHECK(onednn_gemm_available(),
              "bigkernels::lstm: the oneDNN GEMM provider needs a torch built with oneDNN (mkldnn)");
  TORCH_CHECK(w.scalar_type() == at::kFloat, "bigkernels::lstm: the oneDNN GEMM provider takes float32, got ",
              w.scalar_type());
  // linear's W is [out, in]: forward w_hh [4H, P] as it is; backward dh = dG @ w_hh, so W = w_hh^T.
  const at::Tensor plain = backward ? w.t().contiguous() : w.contiguous();
  torch::jit::Stack stack{plain, rows > 0 ? c10::IValue(rows) : c10::IValue()};
  reorder_op()->callBoxed(stack);
  weight_ = stack.at(0).toTensor();
}

at::Tensor OneDnnStepGemm::linear(const at::Tensor& a, const std::optional<at::Tensor>& bias) const {
  torch::jit::Stack stack{a.contiguous(),
                          weight_,
                          bias.has_value() ? c10::IValue(bias->contiguous()) : c10::IValue(),
                          c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()),
                          c10::IValue(std::string(""))};
  linear_op()->callBoxed(stack);
  return stack.at(0).toTensor();
}

void OneDnnStepGemm::operator()(const at::Tensor& a, const at::Tensor& c) const {
  if (a.size(0) == 0) return;
  at::Tensor out = c;
  if (backward_) out.copy_(linear(a, std::nullopt));
  else out.add_(linear(a, std::nullopt));
}

void OneDnnStepGemm::project(const at::Tensor& out, const at::Tensor& x,
                             const std::optional<at::Tensor>& bias) const {
  if (x.size(0) == 0) return;
  at::Tensor dst = out;
  dst.copy_(linear(x, bias));
}

}  // namespace bigkernels::cpu
