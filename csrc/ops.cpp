// Every bigkernels operator schema, declared once, plus the Python module init.
//
// Kernels register themselves per dispatch key elsewhere: csrc/cpu/<op>.cpp (CPU) and
// csrc/cuda/<op>_binding.cpp (CUDA). Fake (meta) implementations, autograd and backend choice
// live in bigkernels/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(bigkernels, m) {
  // Fused LSTM cell, torch.nn.LSTMCell semantics (gate order i, f, g, o).
  //   input [B, I], hx/cx [B, H], w_ih [4H, I], w_hh [4H, H], b_ih/b_hh [4H] (both or neither).
  //   Returns hy [B, H], cy [B, H] and workspace: the activated gates [B, 4H] kept for the
  //   backward when need_workspace, else an empty tensor (inference writes no gates at all).
  m.def(
      "lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, bool need_workspace) -> (Tensor hy, Tensor cy, Tensor workspace)");
  // Backward of lstm_cell. output_mask says which of (input, hx, weights, bias) need a gradient;
  // a gradient that is not needed comes back as an empty tensor and costs nothing. grad_cx is
  // always computed (it is a by-product of the fused pointwise pass).
  m.def(
      "lstm_cell_backward(Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor hx, Tensor cx, "
      "Tensor w_ih, Tensor w_hh, Tensor cy, Tensor workspace, bool[4] output_mask) -> "
      "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias)");

  // One LSTM layer in one direction over a whole sequence, torch.nn.LSTM semantics.
  //   Padded: input [T, B, I] -> output [T, B, P]. Packed (batch_sizes given: int64 CPU [T],
  //   non-increasing, as PackedSequence.batch_sizes): input [N, I] -> output [N, P], step t runs
  //   the first batch_sizes[t] rows. h0 [B, P], c0 [B, H] -> h_n [B, P], c_n [B, H] (each row's
  //   state after its last step). P = w_hr.size(0) with a projection (w_hr [P, H]), else H;
  //   w_hh is [4H, P]. reverse runs the steps last to first.
  //   gates [rows, 4H] (activated i, f, g, o) and cells [rows, H] (c after each step) are the
  //   workspace the backward needs, rows = T*B or N; both empty when not need_workspace.
  m.def(
      "lstm(Tensor input, Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, bool need_workspace) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  // Backward of lstm (BPTT). output_mask says which of (input, weights, bias) need a gradient;
  // unneeded ones come back empty. grad_h0 and grad_c0 are always computed (by-products of the
  // recurrence). grad_w_hr is empty without a projection.
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "bool reverse, Tensor output, Tensor gates, Tensor cells, bool[3] output_mask) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");

  // ---- conv_depthwise (depthwise convolution with the fused epilogue) ----
  // y = act(conv2d(input, weight, groups=C) + bias + residual); input (N, C, H, W) NCHW or
  // channels_last, weight (C, 1, R, S), bias (C,), residual (N, C, P, Q); the output takes the
  // input's memory format. activation: none, relu, gelu, gelu_tanh, silu, sigmoid, leaky_relu
  // (negative_slope). preactivation is z (before the activation) when need_preactivation and the
  // activation's derivative needs z (gelu, gelu_tanh, silu, leaky_relu with slope <= 0), else an
  // empty (0,) tensor. Same schema as conv without groups (helper-notes/conv.md).
  m.def(
      "conv_depthwise(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, str activation, float negative_slope, "
      "bool need_preactivation) -> (Tensor output, Tensor preactivation)");
  // Backward of conv_depthwise. output_mask = (input, weight, bias, residual) gradients wanted;
  // unwanted ones come back as empty (0,) tensors. act'(z) comes from output for the activations
  // whose derivative is a function of y, else from preactivation (which must then be z).
  m.def(
      "conv_depthwise_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor output, "
      "Tensor preactivation, int[2] stride, int[2] padding, int[2] dilation, str activation, "
      "float negative_slope, bool[4] output_mask) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_bias, Tensor grad_residual)");
  // ---- end conv_depthwise ----
}

// `import bigkernels._C` loads this library, which runs the registrations above. No Python API
// is exported: everything is reached through torch.ops.bigkernels.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
