// bigkernels::lstm on the CPU: the device-independent recurrence of csrc/common/lstm_layer.h with
// the CPU's fused pointwise passes (lstm_pointwise.cpp), run step by step from C++ (no Python per
// time step); float32 calls where it measured faster take the fused recurrence of
// lstm_recurrent.cpp instead (packed weights, GEMM + pointwise per step in one kernel). Either
// path's GEMMs run on MKL (PackedStepGemm) or, where the chooser measured it faster (AMD CPUs,
// where MKL's sgemm takes a slow path), on oneDNN (OneDnnStepGemm, lstm_onednn_gemm.h).
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../common/lstm_layer.h"
#include "lstm_pointwise.h"
#include "lstm_onednn_gemm.h"
#include "lstm_recurrent.h"
#include "lstm_step_gemm.h"

namespace bigkernels::cpu {
namespace {

struct CpuPointwise {
  // The pass adds b_ih + b_hh itself (two loads per gate element), so that the input projection
  // is a plain GEMM on MKL's packed w_ih (see PackedStepGemm::project) with no bias broadcast.
  static constexpr bool kAddsBias = true;
  static void forward_with_bias(const at::Tensor& gates, const at::Tensor& b_ih,
                                const at::Tensor& b_hh, const at::Tensor& cx, const at::Tensor& hy,
                                const at::Tensor& cy, const at::Tensor& workspace) {
    lstm_pointwise_forward(gates, b_ih, b_hh, cx, hy, cy, workspace);
  }
  static void forward(const at::Tensor& gates, const at::Tensor& cx, const at::Tensor& hy,
                      const at::Tensor& cy, const at::Tensor& workspace) {
    lstm_pointwise_forward(gates, at::Tensor(), at::Tensor(), cx, hy, cy, workspace);
  }
  static void backward(const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& cx,
                       const at::Tensor& cy, const at::Tensor& workspace,
                       const at::Tensor& grad_gates, const at::Tensor& grad_cx) {
    lstm_pointwise_backward(grad_hy, grad_cy, cx, cy, workspace, grad_gates, grad_cx, at::Tensor());
  }
};

void check_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "bigkernels::lstm CPU kernel got a tensor on ", input.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
              "bigkernels::lstm on CPU supports float32, float64 and bfloat16, got ", dt);
}

// The schema's path argument (csrc/ops.cpp): the Python chooser names a path, 0 leaves it to the
// static heuristic. Bits 1/2 pick the recurrence (1 fused, 2 generic), bit 4 the GEMM provider
// (set: oneDNN, clear: MKL): 1, 2, 5 = fused + oneDNN input projection, 6 = generic with oneDNN for
// the input projection and the per-step recurrent GEMMs. A forced path on a call it cannot run is
// an error, not a silent switch: the chooser only offers it where it holds.
constexpr int64_t kFusedBit = 1, kGenericBit = 2, kOneDnnBit = 4;

struct CpuPath {
  bool fused;
  bool onednn;
};

// BIGKERNELS_LSTM_CPU_PATH=fused+onednn|generic+onednn (tests, benchmarks) for path 0, as
// lstm_recurrent_applies reads fused|generic; read per call so that a process can switch.
int64_t forced_onednn_path() {
  const char* env = std::getenv("BIGKERNELS_LSTM_CPU_PATH");
  if (env == nullptr) return 0;
  if (std::strcmp(env, "fused+onednn") == 0) return kFusedBit | kOneDnnBit;
  if (std::strcmp(env, "generic+onednn") == 0) return kGenericBit | kOneDnnBit;
  return 0;
}

CpuPath cpu_path(int64_t path, const at::Tensor& input, const at::Tensor& c0,
                 const std::optional<at::Tensor>& w_hr, bool backward) {
  TORCH_CHECK_VALUE(path == 0 || path == 1 || path == 2 || path == 5 || path == 6,
                    "bigkernels::lstm: path must be 0 (heuristic), 1 (fused), 2 (generic), 5 (fused, oneDNN "
                    "input projection) or 6 (generic, oneDNN GEMMs), got ", path);
  if (path == 0) {
    const int64_t forced = forced_onednn_path();
    const bool fused_ok = lstm_recurrent_supports(input, c0, w_hr);
    if (forced != 0 && input.scalar_type() == at::kFloat && onednn_gemm_available() &&
        (forced == kGenericBit + kOneDnnBit || fused_ok)) {
      return {forced == kFusedBit + kOneDnnBit, true};
    }
    return {lstm_recurrent_applies(input, c0, w_hr, backward), false};
  }
  const bool onednn = (path & kOneDnnBit) != 0;
  if (onednn) {
    TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat,
                      "bigkernels::lstm: path ", path, " (oneDNN GEMMs) takes float32 input, got ",
                      input.scalar_type());
    TORCH_CHECK_VALUE(onednn_gemm_available(), "bigkernels::lstm: path ", path,
                      " (oneDNN GEMMs) needs a torch built with oneDNN (torch.backends.mkldnn.is_available())");
  }
  if (path & kGenericBit) return {false, onednn};
  TORCH_CHECK_VALUE(lstm_recurrent_supports(input, c0, w_hr),
                    "bigkernels::lstm: path ", path, " (fused) needs float32 input without projection, got ",
                    input.scalar_type(), w_hr.has_value() ? " with a projection" : "");
  return {true, onednn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool need_workspace, int64_t path) {
  check_cpu(input);
  const CpuPath p = cpu_path(path, input, c0, w_hr, /*backward=*/false);
  if (p.fused) {
    return lstm_recurrent_forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
                                  need_workspace, p.onednn);
  }
  if (p.onednn) {
    return lstm_layer_forward<CpuPointwise, OneDnnStepGemm>(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                            w_hr, reverse, need_workspace);
  }
  return lstm_layer_forward<CpuPointwise, PackedStepGemm>(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                          reverse, need_workspace);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                  const at::Tensor& grad_c_n, const at::Tensor& input,
                  const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                  const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const std::optional<at::Tensor>& w_hr, bool reverse, const at::Tensor& output,
                  const at::Tensor& gates, const at::Tensor& cells,
                  std::array<bool, 3> output_mask, int64_t path) {
  check_cpu(input);
  // The backward's GEMMs outside the recurrence (grad_input, grad_w_ih, grad_w_hh: SequenceGradients
  // in lstm_layer.h) stay on ATen (MKL) on every path; path 5's fused backward has no other GEMM, so
  // it is path 1's. Path 6 runs the per-step dh = dG @ w_hh on oneDNN.
  const CpuPath p = cpu_path(path, input, c0, w_hr, /*backward=*/true);
  if (p.fused) {
    return lstm_recurrent_backward(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0,
                                   w_ih, w_hh, reverse, output, gates, cells, output_mask);
  }
  if (p.onednn) {
    return lstm_layer_backward<CpuPointwise, OneDnnStepGemm>(grad_output, grad_h_n, grad_c_n, input, batch_sizes,
                                                             h0, c0, w_ih, w_hh, w_hr, reverse, output, gates,
                                                             cells, output_mask);
  }
  return lstm_layer_backward<CpuPointwise, PackedStepGemm>(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0,
                                           c0, w_ih, w_hh, w_hr, reverse, output, gates, cells,
                                           output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("lstm", &lstm_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace bigkernels::cpu
