// The fused CPU recurrence of bigkernels::lstm for float32: one OpenMP parallel region for the whole
// sequence, the recurrent weights packed once per call, and per step one register-tiled GEMM whose
// epilogue applies the LSTM pointwise maths in registers (see lstm_recurrent.cpp).
//
// Same contract, outputs and workspace format ([rows, 4H] activated gates i, f, g, o; [rows, H]
// cells) as lstm_layer_forward / lstm_layer_backward in csrc/common/lstm_layer.h, so either path's
// workspace feeds either backward. csrc/cpu/lstm.cpp asks lstm_recurrent_applies() first and keeps
// the generic per-step GEMM path for everything else.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace bigkernels::cpu {

// Whether the fused kernels can run this call at all (float32, no projection, a 2-D c0 with at least
// one row and unit); the measured chooser (bigkernels/ops/lstm.py) offers them only then.
// Whether the static heuristic gives them this call (BIGKERNELS_TUNE=off, or untuned under torch.compile): float32, no projection, a CPU with AVX-512 (the only
// one they were measured on), and sizes where they measured faster than the per-step GEMM path
// (hidden <= 128, or batch <= 64 with a w_hh of at most 4 MiB). BIGKERNELS_LSTM_CPU_PATH=fused|generic overrides the choice
// for any float32 call without projection (tests, benchmarks). Cheap; arguments are validated by
// the kernels themselves.
bool lstm_recurrent_supports(const at::Tensor& input, const at::Tensor& c0,
                             const std::optional<at::Tensor>& w_hr);
bool lstm_recurrent_applies(const at::Tensor& input, const at::Tensor& c0,
                            const std::optional<at::Tensor>& w_hr, bool backward);

// onednn_projection: the input projection's GEMM on oneDNN (OneDnnStepGemm) instead of MKL.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrent_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool reverse,
    bool need_workspace, bool onednn_projection = false);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_recurrent_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& input,
                        const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                        const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        bool reverse, const at::Tensor& output, const at::Tensor& gates,
                        const at::Tensor& cells, std::array<bool, 3> output_mask);

}  // namespace bigkernels::cpu
