// Launchers for the CUDA kernels in csrc/cuda/*.cu, declared with plain C++ types only.
//
// No torch header may appear here or in the .cu files: CMakeLists.txt compiles the kernels with nvcc
// alone (CI has no GPU and a CPU-only torch). The torch-facing bindings (csrc/cuda/*_binding.cpp)
// check tensors, make them contiguous, allocate outputs and call these launchers on the current
// stream. Every launcher returns the launch status (cudaSuccess or the first error) and never
// synchronises.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace bigkernels::cuda {

// Element types the kernels are built for. Storage only: float16/bfloat16 are computed in float,
// float32 in float, float64 in double.
enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

// ------------------------------------------------------------------------------------ lstm_cell
// All tensors are dense row-major with the given sizes, all of `dtype`; B = batch, H = hidden size.
// Gate blocks inside a [B, 4H] row are ordered i, f, g, o (torch.nn.LSTMCell).

// Forward pointwise pass. gates [B, 4H] holds input @ w_ih^T + hx @ w_hh^T (no bias yet).
// b_ih and b_hh [4H] are both given or both null. Writes hy, cy [B, H] and, when `workspace` is not
// null, the activated gates [B, 4H] (sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)) for the backward.
cudaError_t lstm_cell_forward(DType dtype, const void* gates, const void* b_ih, const void* b_hh,
                              const void* cx, void* hy, void* cy, void* workspace, int64_t B,
                              int64_t H, cudaStream_t stream);

// Bytes of scratch memory lstm_cell_backward needs (0 when need_bias_grad is false). The caller
// allocates it (torch's caching allocator) and passes it in; its contents need no initialisation.
size_t lstm_cell_backward_scratch_bytes(DType dtype, int64_t B, int64_t H, bool need_bias_grad);

// Backward pointwise pass. Reads grad_hy, grad_cy, cx, cy [B, H] and the forward's workspace
// [B, 4H]; writes grad_gates [B, 4H] (gradients of the pre-activation gates) and grad_cx [B, H].
// When grad_bias [4H] is not null it also writes the bias gradient (grad_gates summed over the
// batch; deterministic: fixed summation order, no atomics; zeros when B == 0), using `scratch`
// of lstm_cell_backward_scratch_bytes(dtype, B, H, true) bytes.
cudaError_t lstm_cell_backward(DType dtype, const void* grad_hy, const void* grad_cy,
                               const void* cx, const void* cy, const void* workspace,
                               void* grad_gates, void* grad_cx, void* grad_bias, void* scratch,
                               int64_t B, int64_t H, cudaStream_t stream);

// ------------------------------------------------------------------------------ lstm (persistent)
// EXPERIMENTAL, never run on a GPU (see csrc/cuda/lstm_persistent.cu for what to validate first);
// no binding uses it by default.
//
// Forward of one LSTM layer and direction over a whole unpacked sequence in one cooperative launch,
// the recurrent weights kept on chip. No projection (w_hh is [4H, H]); float16, bfloat16 and
// float32 only. pre [steps * B, 4H] holds x_t @ w_ih^T + b_ih + b_hh (row t * B + b, gates i, f, g,
// o); h0, c0 [B, H]. Writes output [steps * B, H] (h of every step), h_n and c_n [B, H] (state
// after the last processed step) and, when not null, gates [steps * B, 4H] (activated, as
// lstm_cell_forward's workspace) and cells [steps * B, H] (c of every step). reverse runs the steps
// last to first. No output may alias an input. Runs on the current device.

// cudaSuccess when (dtype, B, H) fits the current device, cudaErrorNotSupported when it does not
// (then use the per-step path), another error when a device query fails. Launches nothing.
cudaError_t lstm_persistent_forward_supported(DType dtype, int64_t B, int64_t H);

// Returns cudaErrorNotSupported, having launched nothing, exactly when
// lstm_persistent_forward_supported does.
cudaError_t lstm_persistent_forward(DType dtype, const void* pre, const void* w_hh, const void* h0,
                                    const void* c0, void* output, void* h_n, void* c_n,
                                    void* gates, void* cells, int64_t steps, int64_t B, int64_t H,
                                    bool reverse, cudaStream_t stream);

// ------------------------------------------------------------------------------- conv_depthwise
// Direct depthwise convolution (groups == C), y = act(conv(x, w) + bias + residual), see
// csrc/cuda/conv_depthwise.cu. input (N, C, H, W), weight (C, 1, R, S), output (N, C, P, Q); all
// activation tensors are dense in one memory format: NCHW, or NHWC when channels_last (the
// output takes the input's). Storage dtype float16, bfloat16 or float32 (float accumulation);
// weight and bias are passed as float32 (C, R*S) and (C,) (the binding converts them: they are tiny).
// activation is the integer value of bigkernels::Activation (csrc/common/activation.h).
struct DepthwiseConvShape {
  int64_t N, C, H, W, R, S, P, Q;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool channels_last;
};

// Writes output and, when not null, preactivation (z, before the activation). residual and bias
// may be null.
cudaError_t conv_depthwise_forward(DType dtype, const DepthwiseConvShape& shape, const void* input,
                                   const float* weight, const float* bias, const void* residual,
                                   void* output, void* preactivation, int activation,
                                   float negative_slope, cudaStream_t stream);

// Bytes of scratch memory conv_depthwise_backward needs (the float gz buffer and the weight
// gradient's per-block partial sums). The caller allocates it; no initialisation needed.
size_t conv_depthwise_backward_scratch_bytes(const DepthwiseConvShape& shape, bool need_weight_grad);

// gz = grad_output * act'(src), src being the output y when act_from_output, else the
// preactivation z; then grad_input (transposed direct conv of gz), grad_weight (C, R*S) and
// grad_bias (C,) in the storage dtype, and grad_residual = gz. Each output pointer may be null
// (not wanted). The weight and bias gradients are deterministic (fixed-order reductions, no
// atomics).
cudaError_t conv_depthwise_backward(DType dtype, const DepthwiseConvShape& shape, const void* grad_output,
                                    const void* input, const float* weight, const void* act_src,
                                    bool act_from_output, int activation, float negative_slope,
                                    void* grad_input, void* grad_weight, void* grad_bias,
                                    void* grad_residual, void* scratch, cudaStream_t stream);

}  // namespace bigkernels::cuda
