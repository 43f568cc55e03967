// bigkernels::lstm (one LSTM layer, one direction, whole sequence) written once for every device.
//
// The recurrence is the same sequence of ATen calls on the CPU and on CUDA; only the fused
// pointwise passes differ. So the algorithm is a template over a `Pointwise` policy:
//   Pointwise::forward(gates [n,4H] pre-activations with biases, cx [n,H], hy, cy [n,H] out,
//                      workspace [n,4H] activated gates out, or undefined)
//   Pointwise::backward(grad_hy, grad_cy, cx, cy [n,H], workspace [n,4H],
//                       grad_gates [n,4H] out, grad_cx [n,H] out)
// (all dense row-major), instantiated in csrc/cpu/lstm.cpp and csrc/cuda/lstm_binding.cpp.
//
// Forward: the input projection of ALL steps is one GEMM (biases folded in as its beta term, or
// added by the pointwise pass where the policy does that: pointwise_adds_bias);
// each step adds h_{t-1} @ w_hh^T into its slice of that buffer (one GEMM) and runs one fused
// pointwise pass that writes h (or, with a projection, o*tanh(c), then one more GEMM), c and the
// activated gates straight into the outputs and workspace. Packed sequences shrink (or, reversed,
// grow) the active batch: step t touches only its first batch_sizes[t] rows, no padding.
// Backward (BPTT): per step one fused pointwise pass and one GEMM (dh_{t-1} = dG_t @ w_hh);
// everything that does not depend on time (grad_input and the weight and bias gradients) is a few
// GEMMs and a reduction per chunk of steps (SequenceGradients), one chunk of all rows on a GPU.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lstm_cell.h"

namespace bigkernels {

struct LstmSizes {
  int64_t batch, input_size, hidden, proj, rows;
  bool packed;
};

// Which rows each step runs, where they sit in the [rows, *] buffers, and in which order.
struct LstmSchedule {
  std::vector<int64_t> sizes;    // active rows of step t
  std::vector<int64_t> offsets;  // first row of step t in the [rows, *] buffers
  std::vector<int64_t> order;    // processing order of the steps (reversed for reverse=true)
};

inline LstmSizes check_lstm_args(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                                 const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                 const std::optional<at::Tensor>& b_hh,
                                 const std::optional<at::Tensor>& w_hr) {
  const bool packed = batch_sizes.has_value();
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "bigkernels::lstm: input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK(input.dim() == (packed ? 2 : 3), "bigkernels::lstm: input must be ",
              packed ? "2-D [total_steps, input_size] (packed)" : "3-D [seq_len, batch, input_size]",
              ", got ", input.dim(), "-D");
  TORCH_CHECK(c0.dim() == 2, "bigkernels::lstm: c0 must be 2-D [batch, hidden_size], got ", c0.sizes());
  const int64_t batch = c0.size(0), hidden = c0.size(1), input_size = input.size(-1);
  int64_t proj = hidden;
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == hidden && w_hr->size(0) > 0 &&
                    w_hr->size(0) < hidden,
                "bigkernels::lstm: w_hr must be [proj_size, hidden_size] with 0 < proj_size < ",
                hidden, ", got ", w_hr->sizes());
    proj = w_hr->size(0);
    check_same(*w_hr, input, "w_hr");
  }
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == batch && h0.size(1) == proj,
              "bigkernels::lstm: h0 must be [batch, proj_size or hidden_size] = [", batch, ", ",
              proj, "], got ", h0.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == 4 * hidden && w_ih.size(1) == input_size,
              "bigkernels::lstm: w_ih must be [4*hidden_size, input_size] = [", 4 * hidden, ", ",
              input_size, "], got ", w_ih.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * hidden && w_hh.size(1) == proj,
              "bigkernels::lstm: w_hh must be [4*hidden_size, proj_size or hidden_size] = [",
              4 * hidden, ", ", proj, "], got ", w_hh.sizes());
  check_same(h0, input, "h0");
  check_same(c0, input, "c0");
  check_same(w_ih, input, "w_ih");
  check_same(w_hh, input, "w_hh");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "bigkernels::lstm: b_ih and b_hh must both be given or both be None");
  if (b_ih.has_value()) {
    for (const auto* b : {&*b_ih, &*b_hh}) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == 4 * hidden,
                  "bigkernels::lstm: biases must be [4*hidden_size] = [", 4 * hidden, "], got ",
                  b->sizes());
      check_same(*b, input, b == &*b_ih ? "b_ih" : "b_hh");
    }
  }
  int64_t rows = 0;
  if (packed) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "bigkernels::lstm: batch_sizes must be a 1-D int64 CPU tensor, got ", bs.sizes(), " ",
                bs.scalar_type(), " on ", bs.device());
    const at::Tensor bsc = bs.contiguous();
    const int64_t* p = bsc.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < bs.numel(); ++t) {
      TORCH_CHECK(p[t] >= 0 && p[t] <= (t == 0 ? batch : p[t - 1]),
                  "bigkernels::lstm: batch_sizes must be non-increasing and at most the batch (",
                  batch, "), got ", bs);
      rows += p[t];
    }
    TORCH_CHECK(bs.numel() == 0 || p[0] == batch, "bigkernels::lstm: h0/c0 must have batch_sizes[0] = ",
                bs.numel() ? p[0] : 0, " rows, got ", batch);
    TORCH_CHECK(rows == input.size(0), "bigkernels::lstm: batch_sizes sum to ", rows,
                " but the packed input has ", input.size(0), " rows");
  } else {
    TORCH_CHECK(input.size(1) == batch, "bigkernels::lstm: h0/c0 must have the input's batch ",
                input.size(1), ", got ", batch);
    rows = input.size(0) * batch;
  }
  return {batch, input_size, hidden, proj, rows, packed};
}

// The backward's own arguments: the forward's output, the incoming gradients and the workspace.
inline void check_lstm_backward_args(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                     const at::Tensor& grad_c_n, const at::Tensor& input,
                                     const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& output, const at::Tensor& gates,
                                     const at::Tensor& cells, const LstmSizes& s) {
  const int64_t H = s.hidden, P = s.proj;
  TORCH_CHECK(output.numel() == s.rows * P && grad_output.sizes() == output.sizes(),
              "bigkernels::lstm_backward: output and grad_output must be the forward's output, ",
              "got ", output.sizes(), " and ", grad_output.sizes());
  TORCH_CHECK(grad_h_n.sizes() == h0.sizes() && grad_c_n.sizes() == c0.sizes(),
              "bigkernels::lstm_backward: grad_h_n/grad_c_n must be shaped like h0/c0");
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == s.rows && gates.size(1) == 4 * H &&
                  cells.dim() == 2 && cells.size(0) == s.rows && cells.size(1) == H,
              "bigkernels::lstm_backward: gates/cells must be the workspace saved by "
              "lstm(need_workspace=True), got ", gates.sizes(), " and ", cells.sizes());
  for (const auto* t : {&grad_output, &grad_h_n, &grad_c_n, &output, &gates, &cells}) {
    check_same(*t, input, "grad/workspace tensors");
  }
}

inline LstmSchedule make_lstm_schedule(const at::Tensor& input,
                                       const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                       const LstmSizes& s) {
  LstmSchedule sched;
  if (s.packed) {
    const at::Tensor bsc = batch_sizes->contiguous();
    sched.sizes.assign(bsc.const_data_ptr<int64_t>(), bsc.const_data_ptr<int64_t>() + bsc.numel());
  } else {
    sched.sizes.assign(input.size(0), s.batch);
  }
  const int64_t steps = static_cast<int64_t>(sched.sizes.size());
  sched.offsets.resize(steps);
  for (int64_t t = 0, off = 0; t < steps; off += sched.sizes[t], ++t) sched.offsets[t] = off;
  sched.order.resize(steps);
  for (int64_t k = 0; k < steps; ++k) sched.order[k] = reverse ? steps - 1 - k : k;
  return sched;
}

// The state [n, D] that the k-th processed step starts from, for its n rows: the rows of the
// previous processed step (stored in `all`, [rows, D]) and, where that step had fewer rows (a
// reversed packed sequence whose shorter sequences start later), the initial state `init` [B, D].
inline at::Tensor previous_state(const at::Tensor& all, const at::Tensor& init,
                                 const LstmSchedule& sched, size_t k, int64_t n) {
  if (k == 0) return init.narrow(0, 0, n);
  const int64_t t_prev = sched.order[k - 1];
  const int64_t m = std::min(n, sched.sizes[t_prev]);
  const at::Tensor carried = all.narrow(0, sched.offsets[t_prev], m);
  return m == n ? carried : at::cat({carried, init.narrow(0, m, n - m)});
}

// Each sequence's state after its last step ([B, D]): `all` ([rows, D]) holds every step's
// state; sequences that run no step keep `init`. Walking the steps from the last processed one,
// a step's rows beyond those already filled are sequences whose last step it was.
inline at::Tensor final_state(const at::Tensor& all, const at::Tensor& init,
                              const LstmSchedule& sched) {
  at::Tensor out = at::empty_like(init);
  int64_t filled = 0;
  for (size_t k = sched.order.size(); k-- > 0;) {
    const int64_t t = sched.order[k], n = sched.sizes[t];
    if (n > filled) {
      out.narrow(0, filled, n - filled).copy_(all.narrow(0, sched.offsets[t] + filled, n - filled));
      filled = n;
    }
  }
  if (filled < init.size(0)) out.narrow(0, filled, init.size(0) - filled).copy_(init.narrow(0, filled, init.size(0) - filled));
  return out;
}

// The input projection x @ w_ih^T + biases is computed a chunk of steps at a time into one reused
// buffer, in processing order: one whole-sequence [rows, 4H] buffer would be fresh memory on every
// call (page faults, then the bias broadcast as an extra pass over it), written long before each
// step reads it back. A chunk of about kProjectionChunkBytes stays in the cache between its GEMM
// and its steps, and still has enough rows (>= 256 at hidden <= 1024) for an efficient GEMM.
// Measured on the 2-core Sapphire Rapids (fp32, T = 64, batch 256, hidden 128, inference): the
// whole-sequence addmm took 15 ms of a 32 ms call, about half of it the bias pass and the faults.
// CPU only (lstm_layer_forward passes no limit for other devices).
constexpr int64_t kProjectionChunkBytes = 4 << 20;

// Steps [k0, k1) of the processing order, whose input rows are [row0, row0 + rows) (a step's rows
// are contiguous and so are consecutive steps', in either direction).
struct ProjectionChunk {
  size_t k0, k1;
  int64_t row0, rows;
};

inline std::vector<ProjectionChunk> projection_chunks(const LstmSchedule& sched, int64_t row_bytes,
                                                      int64_t max_bytes = kProjectionChunkBytes) {
  std::vector<ProjectionChunk> chunks;
  const size_t steps = sched.order.size();
  for (size_t k0 = 0; k0 < steps;) {
    size_t k1 = k0;
    int64_t rows = 0, lo = INT64_MAX, hi = 0;
    // At least one step; then as many as fit.
    while (k1 < steps && (k1 == k0 || (rows + sched.sizes[sched.order[k1]]) * row_bytes <= max_bytes)) {
      const int64_t t = sched.order[k1];
      rows += sched.sizes[t];
      lo = std::min(lo, sched.offsets[t]);
      hi = std::max(hi, sched.offsets[t] + sched.sizes[t]);
      ++k1;
    }
    chunks.push_back({k0, k1, lo, hi - lo});
    k0 = k1;
  }
  return chunks;
}

inline int64_t max_chunk_rows(const std::vector<ProjectionChunk>& chunks) {
  int64_t rows = 0;
  for (const auto& c : chunks) rows = std::max(rows, c.rows);
  return rows;
}

// The backward's gradients that do not depend on time (grad_input, grad_w_ih, grad_w_hh,
// grad_bias), accumulated one chunk of steps at a time (the forward's projection_chunks, in
// reverse) from a reused [chunk rows, 4H] buffer of gate gradients, right after the chunk's steps.
// Why: a whole-sequence [rows, 4H] gate-gradient buffer is fresh memory on every call, and the
// pointwise pass that first writes it pays its page faults; a chunk is reused, and still in cache
// when its GEMMs read it. Measured on the CPU (T = 64, batch 256, hidden 512, fp32, 2 threads;
// 128 MiB of gate gradients): the per-step pointwise passes took 61 ms of the 540 ms backward.
// A GPU, and dtypes other than float32, pass one chunk of all rows (the same GEMMs as one
// whole-sequence buffer).
struct SequenceGradients {
  SequenceGradients(const LstmSizes& s, const LstmSchedule& sched, const at::Tensor& x2d,
                    const at::Tensor& w_ih, const at::Tensor& out2d, const at::Tensor& h_init,
                    bool reverse, std::array<bool, 3> output_mask)
      : s(s), sched(sched), x2d(x2d), w_ih(w_ih), out2d(out2d), h_init(h_init), reverse(reverse),
        mask(output_mask) {
    const auto opts = x2d.options();
    if (mask[0]) grad_input = at::empty({s.rows, s.input_size}, opts);
    if (mask[1]) {
      grad_w_ih = at::zeros({4 * s.hidden, s.input_size}, opts);
      grad_w_hh = at::zeros({4 * s.hidden, s.proj}, opts);
    }
    if (mask[2]) grad_bias = at::zeros({4 * s.hidden}, opts);
  }

  // dg [chunk.rows, 4H]: the final gate gradients of the chunk's rows.
  void add(const at::Tensor& dg, const ProjectionChunk& chunk) {
    if (chunk.rows == 0) return;
    if (mask[0]) {
      at::Tensor out = grad_input.narrow(0, chunk.row0, chunk.rows);
      at::mm_out(out, dg, w_ih);
    }
    if (mask[1]) {
      grad_w_ih.addmm_(dg.t(), x2d.narrow(0, chunk.row0, chunk.rows));
      add_recurrent(dg, chunk);
    }
    if (mask[2]) grad_bias.add_(dg.sum(0));
  }

  // grad_w_hh += sum over the chunk's steps of dG_t^T @ h_prev_t. Unpacked, the previous states
  // are the output shifted by one step (h0 for the first processed step): GEMMs on views, no
  // copy. Packed sequences (rows carried over differ per step) gather the chunk's previous states.
  void add_recurrent(const at::Tensor& dg, const ProjectionChunk& chunk) {
    const int64_t B = s.batch;
    if (!s.packed) {
      at::Tensor rest = dg;
      int64_t lo = chunk.row0, n = chunk.rows;
      if (chunk.k0 == 0) {
        // The first processed step: the chunk's first B rows (forward) or last B rows (reversed).
        grad_w_hh.addmm_(dg.narrow(0, reverse ? n - B : 0, B).t(), h_init);
        rest = dg.narrow(0, reverse ? 0 : B, n - B);
        lo += reverse ? 0 : B;
        n -= B;
      }
      // Forward order: rows [lo, lo + n) read output rows [lo - B, ...); reversed: [lo + B, ...).
      if (n > 0) grad_w_hh.addmm_(rest.t(), out2d.narrow(0, reverse ? lo + B : lo - B, n));
      return;
    }
    at::Tensor h_prev = at::empty({chunk.rows, s.proj}, dg.options());
    for (size_t k = chunk.k0; k < chunk.k1; ++k) {
      const int64_t t = sched.order[k], n = sched.sizes[t];
      if (n > 0) {
        h_prev.narrow(0, sched.offsets[t] - chunk.row0, n)
            .copy_(previous_state(out2d, h_init, sched, k, n));
      }
    }
    grad_w_hh.addmm_(dg.t(), h_prev);
  }

  const LstmSizes& s;
  const LstmSchedule& sched;
  const at::Tensor x2d, w_ih, out2d, h_init;
  bool reverse;
  std::array<bool, 3> mask;
  at::Tensor grad_input, grad_w_ih, grad_w_hh, grad_bias;
};

// The per-step recurrent GEMM, a policy so that a device can multiply against a w_hh it prepared
// once per call (the CPU packs it for MKL: csrc/cpu/lstm_step_gemm.h). Constructed once per call
// with the row count most steps run; then per step
//   backward = false:  gates [n, 4H] += h [n, P] @ w_hh^T
//   backward = true:   dh [n, P] = dG [n, 4H] @ w_hh
struct AtenStepGemm {
  AtenStepGemm(const at::Tensor& w_hh, int64_t /*rows*/, bool backward)
      : w(w_hh), backward(backward) {}
  void operator()(const at::Tensor& a, const at::Tensor& c) const {
    at::Tensor out = c;
    if (backward) at::mm_out(out, a, w);
    else out.addmm_(a, w.t());
  }
  // Built on w_ih: the input projection of a chunk, out = x @ w_ih^T (+ bias).
  void project(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& bias) const {
    at::Tensor dst = out;
    if (bias.has_value()) at::addmm_out(dst, *bias, x, w.t());
    else at::mm_out(dst, x, w.t());
  }
  at::Tensor w;
  bool backward;
};

// Whether a Pointwise policy adds the biases itself (static constexpr bool kAddsBias = true, with
// forward_with_bias(gates, b_ih, b_hh, cx, hy, cy, workspace)): the input projection then runs
// without them, a plain GEMM. Otherwise the biases are the projection's beta term.
template <class Pointwise, class = void>
struct pointwise_adds_bias : std::false_type {};
template <class Pointwise>
struct pointwise_adds_bias<Pointwise, std::void_t<decltype(Pointwise::kAddsBias)>>
    : std::bool_constant<Pointwise::kAddsBias> {};

template <class Pointwise, class StepGemm = AtenStepGemm>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool need_workspace) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const LstmSizes s = check_lstm_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  const LstmSchedule sched = make_lstm_schedule(input, batch_sizes, reverse, s);
  const auto opts = input.options();
  const int64_t H = s.hidden, P = s.proj;
  const bool proj = w_hr.has_value();

  const at::Tensor x2d = input.reshape({s.rows, s.input_size});
  constexpr bool kBiasInPointwise = pointwise_adds_bias<Pointwise>::value;
  const std::optional<at::Tensor> bias = b_ih.has_value() && !kBiasInPointwise
                                             ? std::optional<at::Tensor>(*b_ih + *b_hh)
                                             : std::nullopt;
  // Chunked on the CPU only: a GPU wants the one large GEMM (and has no page faults to save).
  const std::vector<ProjectionChunk> chunks =
      projection_chunks(sched, 4 * H * static_cast<int64_t>(input.element_size()),
                        input.is_cpu() ? kProjectionChunkBytes : INT64_MAX);
  at::Tensor pre = at::empty({max_chunk_rows(chunks), 4 * H}, opts);
  size_t chunk = 0;
  at::Tensor output = at::empty({s.rows, P}, opts);
  at::Tensor gates = need_workspace ? at::empty({s.rows, 4 * H}, opts) : at::empty({0}, opts);
  at::Tensor cells = need_workspace ? at::empty({s.rows, H}, opts) : at::empty({0}, opts);
  const at::Tensor h_init = h0.contiguous(), c_init = c0.contiguous();
  // Each step reads the previous step's h (and, when stored, c) straight from the output (and
  // cells) buffer: no per-step copies. Inference stores no cells, so it carries c in c_run, one
  // row per sequence (rows a step does not run keep their state).
  at::Tensor c_run = need_workspace ? at::Tensor() : c_init.clone();
  at::Tensor c_step = need_workspace ? at::Tensor() : at::empty({s.batch, H}, opts);
  at::Tensor r = proj ? at::empty({s.batch, H}, opts) : at::Tensor();
  const StepGemm recurrent_gemm(w_hh, s.batch, /*backward=*/false);
  // The chunks' projections multiply against w_ih like the steps against w_hh (the CPU packs it
  // once per call); every chunk but the last has max_chunk_rows rows.
  const StepGemm input_gemm(w_ih, max_chunk_rows(chunks), /*backward=*/false);

  for (size_t k = 0; k < sched.order.size(); ++k) {
    const int64_t t = sched.order[k], n = sched.sizes[t], off = sched.offsets[t];
    if (chunk < chunks.size() && chunks[chunk].k0 == k) {
      const ProjectionChunk& c = chunks[chunk];
      input_gemm.project(pre.narrow(0, 0, c.rows), x2d.narrow(0, c.row0, c.rows), bias);
      ++chunk;
    }
    if (n == 0) continue;
    at::Tensor g = pre.narrow(0, off - chunks[chunk - 1].row0, n);
    recurrent_gemm(previous_state(output, h_init, sched, k, n), g);
    const at::Tensor c_prev =
        need_workspace ? previous_state(cells, c_init, sched, k, n) : c_run.narrow(0, 0, n);
    at::Tensor out_t = output.narrow(0, off, n);
    at::Tensor c_new = need_workspace ? cells.narrow(0, off, n) : c_step.narrow(0, 0, n);
    at::Tensor h_new = proj ? r.narrow(0, 0, n) : out_t;
    const at::Tensor ws_t = need_workspace ? gates.narrow(0, off, n) : at::Tensor();
    if constexpr (kBiasInPointwise) {
      Pointwise::forward_with_bias(g, b_ih.value_or(at::Tensor()), b_hh.value_or(at::Tensor()),
                                   c_prev, h_new, c_new, ws_t);
    } else {
      Pointwise::forward(g, c_prev, h_new, c_new, ws_t);
    }
    if (proj) at::mm_out(out_t, h_new, w_hr->t());
    if (!need_workspace) c_run.narrow(0, 0, n).copy_(c_new);
  }
  at::Tensor h = final_state(output, h_init, sched);
  at::Tensor c = need_workspace ? final_state(cells, c_init, sched) : c_run;
  if (!s.packed) output = output.view({input.size(0), s.batch, P});
  return {output, h, c, gates, cells};
}

template <class Pointwise, class StepGemm = AtenStepGemm>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                    const at::Tensor& grad_c_n, const at::Tensor& input,
                    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& w_hr, bool reverse, const at::Tensor& output,
                    const at::Tensor& gates, const at::Tensor& cells,
                    std::array<bool, 3> output_mask) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const LstmSizes s = check_lstm_args(input, batch_sizes, h0, c0, w_ih, w_hh, std::nullopt,
                                      std::nullopt, w_hr);
  const int64_t H = s.hidden, P = s.proj;
  check_lstm_backward_args(grad_output, grad_h_n, grad_c_n, input, h0, c0, output, gates, cells, s);
  const LstmSchedule sched = make_lstm_schedule(input, batch_sizes, reverse, s);
  const auto opts = input.options();
  const bool proj = w_hr.has_value();

  const at::Tensor dout = grad_output.reshape({s.rows, P}).contiguous();
  const at::Tensor out2d = output.reshape({s.rows, P}).contiguous();
  const at::Tensor ws = gates.contiguous(), cs = cells.contiguous();
  const at::Tensor h_init = h0.contiguous(), c_init = c0.contiguous();
  // Gate gradients, a chunk of steps at a time (see SequenceGradients): in float32 on the CPU
  // chunks of about kProjectionChunkBytes; elsewhere one chunk of every row (bfloat16 would round
  // the weight gradients accumulated over the chunks once per chunk).
  const bool chunked = input.is_cpu() && input.scalar_type() == at::kFloat;
  const std::vector<ProjectionChunk> chunks =
      projection_chunks(sched, 4 * H * static_cast<int64_t>(input.element_size()),
                        chunked ? kProjectionChunkBytes : INT64_MAX);
  at::Tensor grad_gates = at::empty({max_chunk_rows(chunks), 4 * H}, opts);
  SequenceGradients grads(s, sched, input.reshape({s.rows, s.input_size}), w_ih, out2d, h_init,
                          reverse, output_mask);
  // Gradients with respect to the running state, one row per sequence (see the forward).
  at::Tensor dh = grad_h_n.contiguous().clone(), dc = grad_c_n.contiguous().clone();
  at::Tensor dcx = at::empty({s.batch, H}, opts);
  at::Tensor dh_all = proj && output_mask[1] ? at::empty({s.rows, P}, opts) : at::Tensor();
  at::Tensor dr = proj ? at::empty({s.batch, H}, opts) : at::Tensor();
  const StepGemm recurrent_gemm(w_hh, s.batch, /*backward=*/true);

  for (size_t ci = chunks.size(); ci-- > 0;) {
    const ProjectionChunk& chunk = chunks[ci];
    for (size_t k = chunk.k1; k-- > chunk.k0;) {
      const int64_t t = sched.order[k], n = sched.sizes[t], off = sched.offsets[t];
      if (n == 0) continue;
      // Everything that reaches h_t: the output's own gradient and the recurrence's.
      const at::Tensor dh_t = dout.narrow(0, off, n) + dh.narrow(0, 0, n);
      at::Tensor grad_hy = dh_t;
      if (proj) {
        if (dh_all.defined()) dh_all.narrow(0, off, n).copy_(dh_t);
        grad_hy = dr.narrow(0, 0, n);
        at::mm_out(grad_hy, dh_t, *w_hr);
      }
      at::Tensor grad_g = grad_gates.narrow(0, off - chunk.row0, n);
      Pointwise::backward(grad_hy, dc.narrow(0, 0, n), previous_state(cs, c_init, sched, k, n),
                          cs.narrow(0, off, n), ws.narrow(0, off, n), grad_g, dcx.narrow(0, 0, n));
      dc.narrow(0, 0, n).copy_(dcx.narrow(0, 0, n));
      recurrent_gemm(grad_g, dh.narrow(0, 0, n));
    }
    grads.add(grad_gates.narrow(0, 0, chunk.rows), chunk);
  }

  auto empty = [&] { return at::empty({0}, opts); };
  at::Tensor grad_input = output_mask[0] ? grads.grad_input.view(input.sizes()) : empty();
  at::Tensor grad_w_ih = empty(), grad_w_hh = empty(), grad_w_hr = empty();
  if (output_mask[1]) {
    grad_w_ih = grads.grad_w_ih;
    grad_w_hh = grads.grad_w_hh;
    if (proj) {
      // r_t = o_t * tanh(c_t), recomputed from the workspace rather than stored.
      const at::Tensor r_all = ws.narrow(1, 3 * H, H) * at::tanh(cs);
      grad_w_hr = at::mm(dh_all.t(), r_all);
    }
  }
  at::Tensor grad_bias = output_mask[2] ? grads.grad_bias : empty();
  return {grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace bigkernels
