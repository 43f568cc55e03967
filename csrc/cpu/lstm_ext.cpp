// bigkernels::lstm_ext on the CPU: one LSTM layer and direction with a layer-normalised cell
// (Ba et al. 2016) and/or zoneout (Krueger et al. 2016). The maths is
// bigkernels.reference.lstm_layer_ext; the schema and workspace layout are in csrc/ops.cpp.
//
// Same structure as the generic recurrence of csrc/common/lstm_layer.h (and its schedule helpers:
// packed sequences shrink or grow the active batch, no padding), with its own fused passes:
//  - forward: x @ w_ih^T for ALL steps is one GEMM, LN_ih over all those rows at once (it does not
//    depend on time), all constant terms (b_ih + b_hh + LN betas) folded in once. Per step: one
//    GEMM h_{t-1} @ w_hh^T into a scratch, then ONE pointwise pass per row that computes the LN_hh
//    statistics, the gates, c~, the LN_c statistics, h~ and the zoneout blends of c and h.
//  - backward: per step one pointwise pass per row (zoneout split, LN_c backward, gate backward,
//    LN_hh backward) and one GEMM dh_{t-1} = dG_rec @ w_hh (+ the zoneout carry k_h * dh_t); the
//    input/weight/LN-gain gradients are whole-sequence GEMMs and reductions after the loop.
// A projection (w_hr) is one more GEMM per step; its hidden-state zoneout blend is then one ATen
// lerp after that GEMM (the blend needs the projected h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/lstm_layer.h"
#include "fast_math.h"

namespace bigkernels::cpu {
namespace {

// torch.nn.LayerNorm's default epsilon; bigkernels.reference.LAYER_NORM_EPS is the same number.
constexpr double kLayerNormEps = 1e-5;
// Row elements per parallel task: below this, waking threads costs more than it saves.
constexpr int64_t kRowGrain = 16384;

// Arithmetic type of the pointwise passes: float for bfloat16, double for float64, and for float32
// double with layer norm, float without. LayerNorm's row sums, normalisation and backward
// combination (x - mean, dn - mean(dn) - n * mean(dn * n)) cancel, and the result is multiplied by
// 1/std: in float arithmetic that measured several times the error of the same maths in float32
// torch ops, in double it adds nothing beyond storing the results. Without layer norm float is as
// accurate, and the pass ran about 2x faster than in double (T=64, B=8, H=256, one thread).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// What each step's pointwise passes read and write. All row-major with row strides 4H (pre, rec,
// gates, grad_pre, grad_rec), H (c/h states, masks, dl) or E (norms); pointers at the step's row 0.
template <typename T>
struct StepArgs {
  const T* pre;      // [n, 4H] LN_ih(x w_ih^T) + every constant term
  T* rec;            // [n, 4H] h_{t-1} @ w_hh^T (forward) / grad_rec out (backward, with LN)
  const T* c_prev;   // [n, H]
  const T* h_prev;   // [n, H] (forward, hidden zoneout inside the pass only)
  const T* mask_c;   // [n, H] keep mask or null (then keep_c)
  const T* mask_h;   // [n, H] keep mask or null (then keep_h)
  double keep_c, keep_h;
  bool zone_c, zone_h;  // blend c / h at all (a mask, or a non-zero constant)
  const T* g_hh;     // LN gains (null without layer norm)
  const T* g_c;
  const T* b_c;
  T* c_out;          // forward [n, H]
  T* h_out;          // forward [n, H]: h, or r = o * tanh(.) with a projection
  T* gates;          // [n, 4H] activated i, f, g, o (workspace) or null
  T* norms;          // [n, E] workspace or null
  // backward
  const T* dh;       // [n, H] gradient of h (no projection) or of r (projection)
  T* dc;             // [n, H] in: gradient of c_t, out: gradient of c_{t-1}
  T* dh_carry;       // [n, H] out: k_h * dh (the zoneout path to h_{t-1})
  T* grad_pre;       // [n, 4H] out: gradient of the gate pre-activations
  T* dl;             // [n, H] out: gradient of LN_c's output (with layer norm)
  int64_t n, H, E;
};

// The activations: fast_math.h's float versions (vectorisable, ~1e-7 absolute, below the rounding
// of the stored result) for float32 and bfloat16 storage; libm for float64, the gradcheck dtype.
template <typename T, typename A>
inline A sigmoid_of(A x) {
  if constexpr (std::is_same_v<T, double>) return sigmoid_fast(x);
  else return A(sigmoid_fast(float(x)));
}
template <typename T, typename A>
inline A tanh_of(A x) {
  if constexpr (std::is_same_v<T, double>) return tanh_fast(x);
  else return A(tanh_fast(float(x)));
}

template <typename A, typename T>
inline A ld(const T* p, int64_t i) { return static_cast<A>(p[i]); }

// Mean and 1/sqrt(var + eps) of v[0..m), two passes.
template <typename A>
inline void row_stats(const A* v, int64_t m, A& mean, A& rstd) {
  A s = 0;
  for (int64_t j = 0; j < m; ++j) s += v[j];
  mean = s / A(m);
  A q = 0;
  for (int64_t j = 0; j < m; ++j) q += (v[j] - mean) * (v[j] - mean);
  rstd = A(1) / std::sqrt(q / A(m) + A(kLayerNormEps));
}

template <typename T, typename A>
void forward_rows(const StepArgs<T>& s, int64_t r0, int64_t r1) {
  const int64_t H = s.H, G = 4 * H;
  std::vector<A> a(G), cc(H);
  for (int64_t b = r0; b < r1; ++b) {
    const T* pre = s.pre + b * G;
    const T* rec = s.rec + b * G;
    T* nrm = s.norms ? s.norms + b * s.E : nullptr;
    for (int64_t j = 0; j < G; ++j) a[j] = ld<A>(rec, j);
    A rstd_h = 0, rstd_c = 0;
    if (s.g_hh) {
      A mean;
      row_stats(a.data(), G, mean, rstd_h);
      for (int64_t j = 0; j < G; ++j) {
        const A nh = (a[j] - mean) * rstd_h;
        if (nrm) nrm[j] = T(nh);
        a[j] = ld<A>(s.g_hh, j) * nh;
      }
    }
    const T* cp = s.c_prev + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const A i = sigmoid_of<T>(a[j] + ld<A>(pre, j)), f = sigmoid_of<T>(a[H + j] + ld<A>(pre, H + j)),
              g = tanh_of<T>(a[2 * H + j] + ld<A>(pre, 2 * H + j)),
              o = sigmoid_of<T>(a[3 * H + j] + ld<A>(pre, 3 * H + j));
      if (s.gates) {
        T* gw = s.gates + b * G;
        gw[j] = T(i), gw[H + j] = T(f), gw[2 * H + j] = T(g), gw[3 * H + j] = T(o);
      }
      cc[j] = f * ld<A>(cp, j) + i * g;
      a[3 * H + j] = o;
    }
    A mean_c = 0;
    if (s.g_hh) row_stats(cc.data(), H, mean_c, rstd_c);
    for (int64_t j = 0; j < H; ++j) {
      A l = cc[j];
      if (s.g_hh) {
        const A nc = (cc[j] - mean_c) * rstd_c;
        if (nrm) nrm[G + j] = T(nc);
        l = ld<A>(s.g_c, j) * nc + ld<A>(s.b_c, j);
      } else if (nrm) {
        nrm[j] = T(cc[j]);
      }
      A h = a[3 * H + j] * tanh_of<T>(l), c = cc[j];
      if (s.zone_c) {
        const A k = s.mask_c ? ld<A>(s.mask_c, b * H + j) : s.keep_c;
        c = (A(1) - k) * c + k * ld<A>(cp, j);  // exactly c_{t-1} where the mask keeps it
      }
      if (s.zone_h) {
        const A k = s.mask_h ? ld<A>(s.mask_h, b * H + j) : s.keep_h;
        h = (A(1) - k) * h + k * ld<A>(s.h_prev, b * H + j);
      }
      s.c_out[b * H + j] = T(c);
      s.h_out[b * H + j] = T(h);
    }
    if (nrm && s.g_hh) nrm[G + H] = T(rstd_h), nrm[G + H + 1] = T(rstd_c);
  }
}

template <typename T, typename A>
void backward_rows(const StepArgs<T>& s, int64_t r0, int64_t r1) {
  const int64_t H = s.H, G = 4 * H;
  std::vector<A> d_o(H), d_l(H), d_cc(H), dn(s.g_hh ? G : 0);
  for (int64_t b = r0; b < r1; ++b) {
    const T* gw = s.gates + b * G;
    const T* nrm = s.norms + b * s.E;
    const T* cp = s.c_prev + b * H;
    T* dc = s.dc + b * H;
    for (int64_t j = 0; j < H; ++j) {
      A dh = ld<A>(s.dh, b * H + j);
      if (s.zone_h) {
        const A k = s.mask_h ? ld<A>(s.mask_h, b * H + j) : s.keep_h;
        s.dh_carry[b * H + j] = T(k * dh);
        dh *= A(1) - k;
      }
      const A l = s.g_hh ? ld<A>(s.g_c, j) * ld<A>(nrm, G + j) + ld<A>(s.b_c, j) : ld<A>(nrm, j);
      const A tl = tanh_of<T>(l), o = ld<A>(gw, 3 * H + j);
      d_o[j] = dh * tl;
      d_l[j] = dh * o * (A(1) - tl * tl);
      A dct = ld<A>(dc, j);
      if (s.zone_c) dct *= A(1) - (s.mask_c ? ld<A>(s.mask_c, b * H + j) : s.keep_c);
      d_cc[j] = dct;
    }
    if (s.g_hh) {
      // LN backward: dx = rstd * (dn - mean(dn) - n * mean(dn * n)), dn = dy * gain.
      const A rstd_c = ld<A>(nrm, G + H + 1);
      A m1 = 0, m2 = 0;
      for (int64_t j = 0; j < H; ++j) {
        const A dnj = d_l[j] * ld<A>(s.g_c, j);
        m1 += dnj;
        m2 += dnj * ld<A>(nrm, G + j);
        s.dl[b * H + j] = T(d_l[j]);
      }
      m1 /= A(H), m2 /= A(H);
      for (int64_t j = 0; j < H; ++j) {
        d_cc[j] += rstd_c * (d_l[j] * ld<A>(s.g_c, j) - m1 - ld<A>(nrm, G + j) * m2);
      }
    } else {
      for (int64_t j = 0; j < H; ++j) d_cc[j] += d_l[j];
    }
    T* dp = s.grad_pre + b * G;
    for (int64_t j = 0; j < H; ++j) {
      const A i = ld<A>(gw, j), f = ld<A>(gw, H + j), g = ld<A>(gw, 2 * H + j), o = ld<A>(gw, 3 * H + j);
      const A dcc = d_cc[j];
      A carry = 0;  // zoneout's direct path c_{t-1} -> c_t
      if (s.zone_c) carry = (s.mask_c ? ld<A>(s.mask_c, b * H + j) : s.keep_c) * ld<A>(dc, j);
      const A da[4] = {dcc * g * i * (A(1) - i), dcc * ld<A>(cp, j) * f * (A(1) - f),
                       dcc * i * (A(1) - g * g), d_o[j] * o * (A(1) - o)};
      for (int q = 0; q < 4; ++q) {
        dp[q * H + j] = T(da[q]);
        if (s.g_hh) dn[q * H + j] = da[q] * ld<A>(s.g_hh, q * H + j);
      }
      dc[j] = T(dcc * f + carry);
    }
    if (s.g_hh) {
      const A rstd_h = ld<A>(nrm, G + H);
      A m1 = 0, m2 = 0;
      for (int64_t j = 0; j < G; ++j) m1 += dn[j], m2 += dn[j] * ld<A>(nrm, j);
      m1 /= A(G), m2 /= A(G);
      T* dr = s.rec + b * G;
      for (int64_t j = 0; j < G; ++j) dr[j] = T(rstd_h * (dn[j] - m1 - ld<A>(nrm, j) * m2));
    }
  }
}

// Rows per parallel task: a row's pass touches ~5H elements.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, kRowGrain / std::max<int64_t>(5 * H, 1)); }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }
template <typename T>
T* mut_or_null(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<T>() : nullptr; }

struct ExtOptions {
  at::Tensor g_ih, b_ih_ln, g_hh, b_hh_ln, g_c, b_c;  // undefined without layer norm
  at::Tensor mask_c, mask_h;                        // contiguous [rows, H] / [rows, P] or undefined
  double keep_c, keep_h;
  bool layer_norm() const { return g_hh.defined(); }
  bool zone_c() const { return mask_c.defined() || keep_c != 0; }
  bool zone_h() const { return mask_h.defined() || keep_h != 0; }
  int64_t norms_width(int64_t H) const { return layer_norm() ? 5 * H + 2 : H; }
};

ExtOptions check_ext_args(const LstmSizes& s, const at::Tensor& input,
                          const std::array<std::optional<at::Tensor>, 6>& ln,
                          const std::optional<at::Tensor>& cell_mask,
                          const std::optional<at::Tensor>& hidden_mask, double zoneout_cell,
                          double zoneout_hidden, bool need_ln_betas) {
  static const char* names[6] = {"ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b"};
  const int64_t sizes[6] = {4 * s.hidden, 4 * s.hidden, 4 * s.hidden, 4 * s.hidden, s.hidden, s.hidden};
  ExtOptions o;
  const bool any_ln = ln[0].has_value();
  for (int q = 0; q < 6; ++q) {
    if (q == 1 || q == 3) {
      if (!need_ln_betas) continue;
    }
    TORCH_CHECK(ln[q].has_value() == any_ln,
                "bigkernels::lstm_ext: the layer-norm parameters must all be given or all be None (",
                names[q], ")");
    if (!any_ln) continue;
    TORCH_CHECK(ln[q]->dim() == 1 && ln[q]->size(0) == sizes[q], "bigkernels::lstm_ext: ", names[q],
                " must be [", sizes[q], "], got ", ln[q]->sizes());
    check_same(*ln[q], input, names[q]);
  }
  if (any_ln) {
    o.g_ih = ln[0]->contiguous();
    o.g_hh = ln[2]->contiguous();
    o.g_c = ln[4]->contiguous();
    o.b_c = ln[5]->contiguous();
    if (need_ln_betas) o.b_ih_ln = *ln[1], o.b_hh_ln = *ln[3];
  }
  TORCH_CHECK(zoneout_cell >= 0 && zoneout_cell < 1 && zoneout_hidden >= 0 && zoneout_hidden < 1,
              "bigkernels::lstm_ext: zoneout probabilities must be in [0, 1), got ", zoneout_cell,
              " and ", zoneout_hidden);
  o.keep_c = zoneout_cell, o.keep_h = zoneout_hidden;
  const std::pair<const std::optional<at::Tensor>*, int64_t> masks[2] = {{&cell_mask, s.hidden},
                                                                          {&hidden_mask, s.proj}};
  for (int q = 0; q < 2; ++q) {
    const auto& m = *masks[q].first;
    if (!m.has_value()) continue;
    const char* name = q == 0 ? "cell_mask" : "hidden_mask";
    TORCH_CHECK(m->dim() == 2 && m->size(0) == s.rows && m->size(1) == masks[q].second,
                "bigkernels::lstm_ext: ", name, " must be [rows, ", masks[q].second, "] = [", s.rows,
                ", ", masks[q].second, "], got ", m->sizes());
    check_same(*m, input, name);
    (q == 0 ? o.mask_c : o.mask_h) = m->contiguous();
  }
  return o;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_ext_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& ln_ih_w,
    const std::optional<at::Tensor>& ln_ih_b, const std::optional<at::Tensor>& ln_hh_w,
    const std::optional<at::Tensor>& ln_hh_b, const std::optional<at::Tensor>& ln_c_w,
    const std::optional<at::Tensor>& ln_c_b, const std::optional<at::Tensor>& cell_mask,
    const std::optional<at::Tensor>& hidden_mask, double zoneout_cell, double zoneout_hidden,
    bool reverse, bool need_workspace) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(input.device().is_cpu(), "bigkernels::lstm_ext CPU kernel got a tensor on ", input.device());
  const LstmSizes s = check_lstm_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  const ExtOptions o = check_ext_args(s, input, {ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b},
                                      cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, true);
  const LstmSchedule sched = make_lstm_schedule(input, batch_sizes, reverse, s);
  const auto opts = input.options();
  const int64_t H = s.hidden, P = s.proj, E = o.norms_width(H);
  const bool proj = w_hr.has_value();

  const at::Tensor x2d = input.reshape({s.rows, s.input_size});
  at::Tensor pre = at::mm(x2d, w_ih.t());
  if (o.layer_norm()) {
    // LN_ih over every step at once; LN_hh's beta is a constant too: folded in here.
    pre = std::get<0>(at::native_layer_norm(pre, {4 * H}, o.g_ih, o.b_ih_ln, kLayerNormEps));
    pre.add_(o.b_hh_ln);
  }
  if (b_ih.has_value()) pre.add_(*b_ih + *b_hh);
  pre = pre.contiguous();
  at::Tensor output = at::empty({s.rows, P}, opts);
  at::Tensor cells = at::empty({s.rows, H}, opts);  // every step's c: the next step's c_{t-1}
  at::Tensor gates = need_workspace ? at::empty({s.rows, 4 * H}, opts) : at::empty({0}, opts);
  at::Tensor norms = need_workspace ? at::empty({s.rows, E}, opts) : at::empty({0}, opts);
  const at::Tensor h_init = h0.contiguous(), c_init = c0.contiguous();
  at::Tensor rec = at::empty({s.batch, 4 * H}, opts);
  at::Tensor r = proj ? at::empty({s.batch, H}, opts) : at::Tensor();
  const bool zone_h_inside = o.zone_h() && !proj;

  for (size_t k = 0; k < sched.order.size(); ++k) {
    const int64_t t = sched.order[k], n = sched.sizes[t], off = sched.offsets[t];
    if (n == 0) continue;
    const at::Tensor h_prev = previous_state(output, h_init, sched, k, n);
    const at::Tensor c_prev = previous_state(cells, c_init, sched, k, n);
    at::Tensor rec_n = rec.narrow(0, 0, n);
    at::mm_out(rec_n, h_prev, w_hh.t());
    at::Tensor out_t = output.narrow(0, off, n);
    at::Tensor h_new = proj ? r.narrow(0, 0, n) : out_t;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "lstm_ext_forward", [&] {
      using T = scalar_t;
      StepArgs<T> a{};
      a.pre = pre.const_data_ptr<T>() + off * 4 * H;
      a.rec = rec_n.mutable_data_ptr<T>();
      a.c_prev = c_prev.const_data_ptr<T>();
      a.h_prev = zone_h_inside ? h_prev.const_data_ptr<T>() : nullptr;
      a.mask_c = o.mask_c.defined() ? o.mask_c.const_data_ptr<T>() + off * H : nullptr;
      a.mask_h = zone_h_inside && o.mask_h.defined() ? o.mask_h.const_data_ptr<T>() + off * H : nullptr;
      a.keep_c = o.keep_c, a.keep_h = o.keep_h;
      a.zone_c = o.zone_c(), a.zone_h = zone_h_inside;
      a.g_hh = ptr_or_null<T>(o.g_hh), a.g_c = ptr_or_null<T>(o.g_c), a.b_c = ptr_or_null<T>(o.b_c);
      a.c_out = cells.mutable_data_ptr<T>() + off * H;
      a.h_out = h_new.mutable_data_ptr<T>();
      a.gates = need_workspace ? gates.mutable_data_ptr<T>() + off * 4 * H : nullptr;
      a.norms = need_workspace ? norms.mutable_data_ptr<T>() + off * E : nullptr;
      a.n = n, a.H = H, a.E = E;
      const bool wide = std::is_same_v<T, float> && o.layer_norm();  // see acc_t
      at::parallel_for(0, n, row_grain(H), [&](int64_t r0, int64_t r1) {
        if (wide) forward_rows<T, double>(a, r0, r1);
        else forward_rows<T, acc_t<T>>(a, r0, r1);
      });
    });
    if (proj) {
      at::mm_out(out_t, h_new, w_hr->t());
      if (o.zone_h()) {
        if (o.mask_h.defined()) out_t.lerp_(h_prev, o.mask_h.narrow(0, off, n));
        else out_t.lerp_(h_prev, o.keep_h);
      }
    }
  }
  at::Tensor h = final_state(output, h_init, sched);
  at::Tensor c = final_state(cells, c_init, sched);
  if (!s.packed) output = output.view({input.size(0), s.batch, P});
  if (!need_workspace) cells = at::empty({0}, opts);
  return {output, h, c, gates, cells, norms};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_ext_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                      const at::Tensor& grad_c_n, const at::Tensor& input,
                      const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                      const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& ln_ih_w,
                      const std::optional<at::Tensor>& ln_hh_w, const std::optional<at::Tensor>& ln_c_w,
                      const std::optional<at::Tensor>& ln_c_b, const std::optional<at::Tensor>& cell_mask,
                      const std::optional<at::Tensor>& hidden_mask, double zoneout_cell,
                      double zoneout_hidden, bool reverse, const at::Tensor& output,
                      const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& norms) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(input.device().is_cpu(), "bigkernels::lstm_ext_backward CPU kernel got a tensor on ",
              input.device());
  const LstmSizes s = check_lstm_args(input, batch_sizes, h0, c0, w_ih, w_hh, std::nullopt,
                                      std::nullopt, w_hr);
  check_lstm_backward_args(grad_output, grad_h_n, grad_c_n, input, h0, c0, output, gates, cells, s);
  const ExtOptions o = check_ext_args(s, input, {ln_ih_w, std::nullopt, ln_hh_w, std::nullopt, ln_c_w, ln_c_b},
                                      cell_mask, hidden_mask, zoneout_cell, zoneout_hidden, false);
  const int64_t H = s.hidden, P = s.proj, E = o.norms_width(H);
  TORCH_CHECK(norms.dim() == 2 && norms.size(0) == s.rows && norms.size(1) == E,
              "bigkernels::lstm_ext_backward: norms must be the workspace saved by the forward, [",
              s.rows, ", ", E, "], got ", norms.sizes());
  check_same(norms, input, "norms");
  const LstmSchedule sched = make_lstm_schedule(input, batch_sizes, reverse, s);
  const auto opts = input.options();
  const bool proj = w_hr.has_value(), ln = o.layer_norm();

  const at::Tensor dout = grad_output.reshape({s.rows, P}).contiguous();
  const at::Tensor out2d = output.reshape({s.rows, P}).contiguous();
  const at::Tensor ws = gates.contiguous(), cs = cells.contiguous(), nm = norms.contiguous();
  const at::Tensor h_init = h0.contiguous(), c_init = c0.contiguous();
  at::Tensor grad_pre = at::empty({s.rows, 4 * H}, opts);
  // With LN_hh the recurrent GEMM's gradient differs from the gates': its own buffer.
  at::Tensor grad_rec = ln ? at::empty({s.rows, 4 * H}, opts) : grad_pre;
  at::Tensor dl_all = ln ? at::empty({s.rows, H}, opts) : at::Tensor();
  at::Tensor dh = grad_h_n.contiguous().clone(), dc = grad_c_n.contiguous().clone();
  at::Tensor carry = o.zone_h() ? at::empty({s.batch, P}, opts) : at::Tensor();
  at::Tensor dh_tilde_all = proj ? at::empty({s.rows, P}, opts) : at::Tensor();
  at::Tensor dr = proj ? at::empty({s.batch, H}, opts) : at::Tensor();

  for (size_t k = sched.order.size(); k-- > 0;) {
    const int64_t t = sched.order[k], n = sched.sizes[t], off = sched.offsets[t];
    if (n == 0) continue;
    at::Tensor dh_t = dout.narrow(0, off, n) + dh.narrow(0, 0, n);
    at::Tensor grad_hy = dh_t;
    if (proj) {
      if (o.zone_h()) {
        const at::Tensor keep = o.mask_h.defined() ? o.mask_h.narrow(0, off, n)
                                                   : at::full({1}, o.keep_h, opts);
        at::Tensor carry_n = carry.narrow(0, 0, n);
        at::mul_out(carry_n, dh_t, keep);
        dh_t = dh_t - carry_n;  // (1 - k) * dh_t
      }
      dh_tilde_all.narrow(0, off, n).copy_(dh_t);
      grad_hy = dr.narrow(0, 0, n);
      at::mm_out(grad_hy, dh_t, *w_hr);
    }
    const at::Tensor c_prev = previous_state(cs, c_init, sched, k, n);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "lstm_ext_backward", [&] {
      using T = scalar_t;
      StepArgs<T> a{};
      a.rec = ln ? grad_rec.mutable_data_ptr<T>() + off * 4 * H : nullptr;
      a.c_prev = c_prev.const_data_ptr<T>();
      a.mask_c = o.mask_c.defined() ? o.mask_c.const_data_ptr<T>() + off * H : nullptr;
      a.mask_h = !proj && o.mask_h.defined() ? o.mask_h.const_data_ptr<T>() + off * H : nullptr;
      a.keep_c = o.keep_c, a.keep_h = o.keep_h;
      a.zone_c = o.zone_c(), a.zone_h = o.zone_h() && !proj;
      a.g_hh = ptr_or_null<T>(o.g_hh), a.g_c = ptr_or_null<T>(o.g_c), a.b_c = ptr_or_null<T>(o.b_c);
      a.gates = const_cast<T*>(ws.const_data_ptr<T>()) + off * 4 * H;
      a.norms = const_cast<T*>(nm.const_data_ptr<T>()) + off * E;
      a.dh = grad_hy.const_data_ptr<T>();
      a.dc = dc.mutable_data_ptr<T>();
      a.dh_carry = a.zone_h ? carry.mutable_data_ptr<T>() : nullptr;
      a.grad_pre = grad_pre.mutable_data_ptr<T>() + off * 4 * H;
      a.dl = ln ? dl_all.mutable_data_ptr<T>() + off * H : nullptr;
      a.n = n, a.H = H, a.E = E;
      const bool wide = std::is_same_v<T, float> && ln;  // see acc_t
      at::parallel_for(0, n, row_grain(H), [&](int64_t r0, int64_t r1) {
        if (wide) backward_rows<T, double>(a, r0, r1);
        else backward_rows<T, acc_t<T>>(a, r0, r1);
      });
    });
    at::Tensor dh_prev = dh.narrow(0, 0, n);
    const at::Tensor dg = grad_rec.narrow(0, off, n);
    if (o.zone_h()) at::addmm_out(dh_prev, carry.narrow(0, 0, n), dg, w_hh);
    else at::mm_out(dh_prev, dg, w_hh);
  }

  auto empty = [&] { return at::empty({0}, opts); };
  const at::Tensor x2d = input.reshape({s.rows, s.input_size});
  at::Tensor grad_gx = grad_pre, grad_ln_ih_w = empty(), grad_ln_hh_w = empty(),
             grad_ln_c_w = empty(), grad_ln_c_b = empty();
  if (ln) {
    const at::Tensor gx = at::mm(x2d, w_ih.t());  // recomputed: cheaper to keep than [rows, 4H]
    auto [unused, mean, rstd] = at::native_layer_norm(gx, {4 * H}, o.g_ih, at::Tensor(), kLayerNormEps);
    std::tie(grad_gx, grad_ln_ih_w, std::ignore) = at::native_layer_norm_backward(
        grad_pre, gx, {4 * H}, mean, rstd, o.g_ih, at::Tensor(), {true, true, false});
    grad_ln_hh_w = (grad_pre * nm.narrow(1, 0, 4 * H)).sum(0);
    grad_ln_c_w = (dl_all * nm.narrow(1, 4 * H, H)).sum(0);
    grad_ln_c_b = dl_all.sum(0);
  }
  at::Tensor grad_input = at::mm(grad_gx, w_ih).view(input.sizes());
  at::Tensor h_prev = at::empty({s.rows, P}, opts);
  for (size_t k = 0; k < sched.order.size(); ++k) {
    const int64_t t = sched.order[k], n = sched.sizes[t];
    if (n > 0) h_prev.narrow(0, sched.offsets[t], n).copy_(previous_state(out2d, h_init, sched, k, n));
  }
  at::Tensor grad_w_ih = at::mm(grad_gx.t(), x2d);
  at::Tensor grad_w_hh = at::mm(grad_rec.t(), h_prev);
  at::Tensor grad_w_hr = empty();
  if (proj) {
    // r_t = o_t * tanh(l_t), l = LN_c(c~) or c~, recomputed from the workspace.
    const at::Tensor l = ln ? nm.narrow(1, 4 * H, H) * o.g_c + o.b_c : nm.narrow(1, 0, H);
    grad_w_hr = at::mm(dh_tilde_all.t(), ws.narrow(1, 3 * H, H) * at::tanh(l));
  }
  at::Tensor grad_bias = grad_pre.sum(0);
  return {grad_input,   dh,           dc,          grad_w_ih,   grad_w_hh,  grad_bias,
          grad_w_hr,    grad_ln_ih_w, grad_ln_hh_w, grad_ln_c_w, grad_ln_c_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("lstm_ext", &lstm_ext_cpu);
  m.impl("lstm_ext_backward", &lstm_ext_backward_cpu);
}

}  // namespace bigkernels::cpu
