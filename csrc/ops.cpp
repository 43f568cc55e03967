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
  //   path picks the CPU recurrence and its GEMM provider (bigkernels/ops/lstm.py's chooser decides,
  //   csrc/cpu/lstm.cpp runs it): 0 = the static heuristic, 1 = the fused float32 kernel, 2 = the
  //   generic per-step GEMMs, both on MKL; + 4 = oneDNN GEMMs (float32, a torch with oneDNN):
  //   5 = fused with a oneDNN input projection, 6 = generic with oneDNN input projection and
  //   per-step recurrent GEMMs. Any other value is refused. The CUDA kernel has one path and
  //   ignores it.
  m.def(
      "lstm(Tensor input, Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, bool need_workspace, int path=0) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  // Backward of lstm (BPTT). output_mask says which of (input, weights, bias) need a gradient;
  // unneeded ones come back empty. grad_h0 and grad_c0 are always computed (by-products of the
  // recurrence). grad_w_hr is empty without a projection.
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "bool reverse, Tensor output, Tensor gates, Tensor cells, bool[3] output_mask, int path=0) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");

  // ---- attention (flash attention; bigkernels/ops/attention.py, csrc/cpu/attention.cpp) ----
  // query (B, Hq, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev), any strides; Hq % Hk == 0
  // (query head h reads kv head h / (Hq / Hk)). attn_mask: additive, (B, Hq, L, S), any strides.
  // Query i sees key j iff (window_left < 0 or j >= i - window_left) and (window_right < 0 or
  // j <= i + window_right). Varlen: cu_seqlens_q/k (N + 1,) int32 with B == 1, sequence n is rows
  // cu[n]:cu[n+1]; max_seqlen_* size GPU grids. Dropout: dropout_seed = int64 (2,) [seed, offset].
  // Returns output (B, Hq, L, Ev) stored as (B, L, Hq, Ev), lse (B, Hq, L) float32 (-inf: no key).
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, "
      "int window_right, float dropout_p, Tensor? dropout_seed) -> (Tensor output, Tensor lse)");
  // Backward of attention. grad_attn_mask is (B, Hq, L, S) when need_grad_mask, else shape (0,).
  m.def(
      "attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, "
      "Tensor output, Tensor lse, Tensor? attn_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, "
      "float dropout_p, Tensor? dropout_seed, bool need_grad_mask) -> (Tensor grad_query, "
      "Tensor grad_key, Tensor grad_value, Tensor grad_attn_mask)");
  // The CPU kernels' dropout keep mask (B, H, L, S) bool for a seed: what tests compare against.
  m.def("attention_dropout_mask(Tensor seed, int B, int H, int L, int S, float p) -> Tensor");
  // ---- conv (issue 5) ----
  // Fused convolution: output = act(conv2d(input, weight, stride, padding, dilation, groups) + bias
  // + residual), act one of none, relu, gelu, gelu_tanh, silu, sigmoid, leaky_relu(negative_slope).
  //   input (N, C, H, W) NCHW or channels_last; weight (K, C/groups, R, S); bias (K,); residual
  //   (N, K, P, Q). output (N, K, P, Q) in the input's layout. Symmetric padding only.
  //   preactivation: z (before act) when need_preactivation and act' needs z (gelu, gelu_tanh,
  //   silu, leaky_relu with slope <= 0), else an empty (0,) tensor.
  m.def(
      "conv(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, str activation, float negative_slope, bool need_preactivation) -> "
      "(Tensor output, Tensor preactivation)");
  // Backward of conv. output_mask = gradients wanted for (input, weight, bias, residual); unwanted
  // ones come back as empty (0,) tensors.
  m.def(
      "conv_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor output, Tensor preactivation, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, str activation, float negative_slope, "
      "bool[4] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // ---- end conv ----
  // ---- lstm_ext (bigkernels/ops/lstm_ext.py): lstm with a layer-normalised cell and/or zoneout.
  // Its own op so that the default lstm path and schema stay as they are. Maths:
  // bigkernels.reference.lstm_layer_ext. Arguments as lstm, plus: ln_* the LayerNorm gains/biases
  // ([4H] ih, [4H] hh, [H] cell; all six or none); cell_mask [rows, H] / hidden_mask [rows, P] the
  // zoneout keep masks (training), else the constant keep weights zoneout_cell / zoneout_hidden
  // (evaluation; 0 = no zoneout). Workspace: gates [rows, 4H], cells [rows, H] (c_t after zoneout),
  // norms [rows, 5H + 2] (LN_hh's normalised input [4H], LN_c's [H], their two 1/std) with layer
  // norm, else [rows, H] (the candidate cell c~); all empty when not need_workspace.
  m.def(
      "lstm_ext(Tensor input, Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? ln_ih_w, Tensor? ln_ih_b, Tensor? ln_hh_w, "
      "Tensor? ln_hh_b, Tensor? ln_c_w, Tensor? ln_c_b, Tensor? cell_mask, Tensor? hidden_mask, "
      "float zoneout_cell, float zoneout_hidden, bool reverse, bool need_workspace) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor norms)");
  // Backward of lstm_ext: every gradient is computed. grad_bias is also the gradient of b_hh and
  // of the two LN betas ln_ih_b and ln_hh_b (all are added to the gate pre-activations); the LN
  // gradients are empty without layer norm, grad_w_hr without a projection.
  m.def(
      "lstm_ext_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "Tensor? ln_ih_w, Tensor? ln_hh_w, Tensor? ln_c_w, Tensor? ln_c_b, Tensor? cell_mask, "
      "Tensor? hidden_mask, float zoneout_cell, float zoneout_hidden, bool reverse, Tensor output, "
      "Tensor gates, Tensor cells, Tensor norms) -> (Tensor grad_input, Tensor grad_h0, "
      "Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr, "
      "Tensor grad_ln_ih_w, Tensor grad_ln_hh_w, Tensor grad_ln_c_w, Tensor grad_ln_c_b)");
  // ---- end lstm_ext
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

// `import bigkernels._C` loads this library, which runs the registrations above. Everything is
// reached through torch.ops.bigkernels, except the conv fast-path entries added below.
// ---- conv: direct Python entry points (csrc/autograd/conv_call.cpp) ----
namespace bigkernels::python {
extern PyMethodDef conv_python_methods[];
}  // namespace bigkernels::python
// ---- end conv ----

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  // ---- conv ----
  if (module != nullptr && PyModule_AddFunctions(module, bigkernels::python::conv_python_methods) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  // ---- end conv ----
  return module;
}
