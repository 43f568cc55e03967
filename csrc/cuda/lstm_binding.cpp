// bigkernels::lstm and lstm_backward on CUDA tensors: the device-independent recurrence of
// csrc/common/lstm_layer.h with the fused pointwise kernels of csrc/cuda/lstm_cell.cu as its policy.
// Same checks, outputs and semantics as csrc/cpu/lstm.cpp.
//
// This is the per-step path: per timestep one cuBLAS GEMM (at::addmm_ on the current stream) and one
// fused pointwise kernel; the input projection and the weight gradients are one GEMM each over the
// whole sequence.
//
// The persistent recurrent kernel (csrc/cuda/lstm_persistent.cu, weights on chip, forward only) has
// never run on a GPU; it is used only when BIGKERNELS_EXPERIMENTAL_LSTM_PERSISTENT=1 is set (for
// validating it against this path), for the sizes it accepts, and never by default.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "../common/lstm_layer.h"
#include "kernels.h"

namespace bigkernels::cuda {
namespace {

DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK(false, "bigkernels::lstm on CUDA supports float16, bfloat16, float32 and float64, "
                         "got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "bigkernels::lstm CUDA kernel got a tensor on ", input.device());
  kernel_dtype(input);
}

// The launchers take raw pointers to dense row-major [n, *] buffers. The recurrence hands over
// row ranges (narrow along dim 0) of larger row-major buffers, which are dense; anything else is a
// bug in lstm_layer.h, not bad user input.
const void* dense_ptr(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous(), "bigkernels::lstm: pointwise buffer is not dense");
  return t.const_data_ptr();
}
void* dense_mutable_ptr(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous(), "bigkernels::lstm: pointwise buffer is not dense");
  return t.mutable_data_ptr();
}

// The gates handed over already hold both biases (folded into the input projection), so the
// forward gets null bias pointers; the bias gradient is one reduction after the loop, so the
// backward gets no grad_bias and hence needs no scratch (lstm_cell_backward_scratch_bytes is 0).
// The entry points hold a CUDAGuard for the input's device; the stream is that device's current one,
// the one at::addmm_ runs the step's GEMM on.
struct CudaPointwise {
  static void forward(const at::Tensor& gates, const at::Tensor& cx, const at::Tensor& hy,
                      const at::Tensor& cy, const at::Tensor& workspace) {
    const int64_t n = cx.size(0), H = cx.size(1);
    C10_CUDA_CHECK(lstm_cell_forward(
        kernel_dtype(gates), dense_ptr(gates), /*b_ih=*/nullptr, /*b_hh=*/nullptr, dense_ptr(cx),
        dense_mutable_ptr(hy), dense_mutable_ptr(cy),
        workspace.defined() ? dense_mutable_ptr(workspace) : nullptr, n, H,
        at::cuda::getCurrentCUDAStream(gates.device().index()).stream()));
  }
  static void backward(const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& cx,
                       const at::Tensor& cy, const at::Tensor& workspace,
                       const at::Tensor& grad_gates, const at::Tensor& grad_cx) {
    const int64_t n = cx.size(0), H = cx.size(1);
    const DType dtype = kernel_dtype(grad_gates);
    TORCH_INTERNAL_ASSERT(lstm_cell_backward_scratch_bytes(dtype, n, H, false) == 0);
    C10_CUDA_CHECK(lstm_cell_backward(
        dtype, dense_ptr(grad_hy), dense_ptr(grad_cy), dense_ptr(cx), dense_ptr(cy),
        dense_ptr(workspace), dense_mutable_ptr(grad_gates), dense_mutable_ptr(grad_cx),
        /*grad_bias=*/nullptr, /*scratch=*/nullptr, n, H,
        at::cuda::getCurrentCUDAStream(grad_gates.device().index()).stream()));
  }
};

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

bool persistent_requested() {
  const char* v = std::getenv("BIGKERNELS_EXPERIMENTAL_LSTM_PERSISTENT");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// The experimental persistent forward, or nullopt where it does not apply (packed input,
// projection, float64, empty sequence or batch, or a size the kernel refuses); same outputs as
// lstm_layer_forward. Only called when persistent_requested().
std::optional<ForwardResult> persistent_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool need_workspace) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const LstmSizes s = check_lstm_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  const DType dtype = kernel_dtype(input);
  if (s.packed || w_hr.has_value() || dtype == DType::kFloat64 || input.size(0) == 0 ||
      s.batch == 0) {
    return std::nullopt;
  }
  const cudaError_t fits = lstm_persistent_forward_supported(dtype, s.batch, s.hidden);
  if (fits == cudaErrorNotSupported) return std::nullopt;
  C10_CUDA_CHECK(fits);

  const auto opts = input.options();
  const int64_t T = input.size(0), H = s.hidden;
  const at::Tensor x2d = input.reshape({s.rows, s.input_size});
  const at::Tensor pre =
      b_ih.has_value() ? at::addmm(*b_ih + *b_hh, x2d, w_ih.t()) : at::mm(x2d, w_ih.t());
  const at::Tensor w = w_hh.contiguous(), h_init = h0.contiguous(), c_init = c0.contiguous();
  at::Tensor output = at::empty({s.rows, H}, opts);
  at::Tensor h_n = at::empty({s.batch, H}, opts), c_n = at::empty({s.batch, H}, opts);
  at::Tensor gates = need_workspace ? at::empty({s.rows, 4 * H}, opts) : at::empty({0}, opts);
  at::Tensor cells = need_workspace ? at::empty({s.rows, H}, opts) : at::empty({0}, opts);
  const cudaError_t err = lstm_persistent_forward(
      dtype, dense_ptr(pre), dense_ptr(w), dense_ptr(h_init), dense_ptr(c_init),
      dense_mutable_ptr(output), dense_mutable_ptr(h_n), dense_mutable_ptr(c_n),
      need_workspace ? dense_mutable_ptr(gates) : nullptr,
      need_workspace ? dense_mutable_ptr(cells) : nullptr, T, s.batch, H, reverse,
      at::cuda::getCurrentCUDAStream(input.device().index()).stream());
  if (err == cudaErrorNotSupported) return std::nullopt;
  C10_CUDA_CHECK(err);
  return ForwardResult{output.view({T, s.batch, H}), h_n, c_n, gates, cells};
}

ForwardResult lstm_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool need_workspace,
    int64_t /*path: the CPU recurrence's choice; CUDA has one path*/) {
  check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  if (persistent_requested()) {
    if (auto result = persistent_forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                         reverse, need_workspace)) {
      return *std::move(result);
    }
  }
  return lstm_layer_forward<CudaPointwise>(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                           w_hr, reverse, need_workspace);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                   const at::Tensor& grad_c_n, const at::Tensor& input,
                   const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                   const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const std::optional<at::Tensor>& w_hr, bool reverse, const at::Tensor& output,
                   const at::Tensor& gates, const at::Tensor& cells,
                   std::array<bool, 3> output_mask, int64_t /*path*/) {
  check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  return lstm_layer_backward<CudaPointwise>(grad_output, grad_h_n, grad_c_n, input, batch_sizes,
                                            h0, c0, w_ih, w_hh, w_hr, reverse, output, gates,
                                            cells, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("lstm", &lstm_cuda);
  m.impl("lstm_backward", &lstm_backward_cuda);
}

}  // namespace bigkernels::cuda
