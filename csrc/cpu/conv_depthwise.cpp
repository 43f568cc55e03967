// Direct depthwise convolution on the CPU: bigkernels::conv_depthwise and
// bigkernels::conv_depthwise_backward (declared in conv_depthwise.h).
//
// Depthwise convolution does R*S multiply-adds per output element and no reduction over channels,
// so it is bound by how well the inner loop uses the vector units, not by a GEMM: ATen/oneDNN run
// it as a grouped convolution followed by separate bias, residual and activation passes. Here:
//
// Forward, NCHW: one task per (n, c) plane. The plane is copied once into a zero-bordered float
//   buffer (converting bfloat16 and removing every bounds check from the inner loop), then each
//   tile of output rows is accumulated in vector registers (a 64-byte GCC vector per lane group:
//   one AVX-512 register, two AVX2 ones) and the epilogue (residual, activation, optional
//   preactivation) runs on the tile while it is in L1. The bias is the accumulators' initial value.
// Forward, channels_last: one task per output row (n, p); vectors run along C (the contiguous
//   dimension) with the filter transposed to (R*S, C).
// Backward: one pass turns grad_output into gz = grad_output * act'(z) (float buffer; it is also
//   grad_residual), then grad_input is the transposed direct loop (NCHW: scatter of each gz row
//   into a zero-bordered plane; channels_last: gather per input row), and grad_weight is a set of
//   per-task partial sums over a shape-determined (never thread-count-determined) split of the
//   batch, reduced in a fixed order: deterministic. grad_bias is the sum of gz.
//
// The hot functions are compiled for several instruction sets (target_clones) and picked at load
// time, like the LSTM pointwise kernels. Accumulation is in float for float32/bfloat16 and in double
// for float64.
#include "conv_depthwise.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/conv_depthwise.h"
#include "fast_math.h"

namespace bigkernels::cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(__clang__)
#define BK_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BK_MULTIVERSION
#endif

// Largest kernel side the CPU kernels take (RepLKNet's 31x31).
constexpr int64_t kMaxKernel = 31;
// Tasks the weight gradient is split into, at least (when the shape allows): enough to keep a
// many-core machine busy, few enough that the partial sums stay small. Depends on the shape only,
// so results do not depend on the thread count.
constexpr int64_t kWeightGradTasks = 64;
// Upper bound on the channels_last weight-gradient partial sums (bytes).
constexpr int64_t kMaxPartialBytes = int64_t(64) << 20;
// Elements per task of the elementwise gz pass: below this, waking threads costs more than it saves.
constexpr int64_t kPointwiseGrain = 32768;

// Storage types the kernels see: float, double, or uint16_t holding bfloat16 bits (fast_math.h).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename scalar_t>
using storage_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, uint16_t, scalar_t>;

// 64-byte vectors (GCC vector extensions): the compiler maps them onto whatever registers the
// instruction set of each clone has. They never cross a call boundary (all helpers are
// always-inline), so the ABI note GCC gives for the baseline clone does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vfloat __attribute__((vector_size(64)));
typedef double vdouble __attribute__((vector_size(64)));
template <typename A>
using vec_t = std::conditional_t<std::is_same_v<A, double>, vdouble, vfloat>;
template <typename A>
constexpr int kLanes = 64 / sizeof(A);

template <typename A>
BK_ALWAYS_INLINE vec_t<A> vload(const A* p) {
  vec_t<A> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename A>
BK_ALWAYS_INLINE void vstore(A* p, vec_t<A> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename A>
BK_ALWAYS_INLINE vec_t<A> vsplat(A x) {
  return vec_t<A>{} + x;
}

// --------------------------------------------------------------------------------- activations
// Float sigmoid/SiLU use fast_math.h's exp (vectorisable); the rest is activation.h.
template <Activation kAct, typename A>
BK_ALWAYS_INLINE A act_forward(A z, A slope) {
  if constexpr (kAct == Activation::Sigmoid) return sigmoid_fast(z);
  else if constexpr (kAct == Activation::SiLU) return z * sigmoid_fast(z);
  else return activation_forward(kAct, z, slope);
}

template <Activation kAct, typename A>
BK_ALWAYS_INLINE A act_grad(A z, A slope) {
  if constexpr (kAct == Activation::Sigmoid) {
    const A s = sigmoid_fast(z);
    return s * (A(1) - s);
  } else if constexpr (kAct == Activation::SiLU) {
    const A s = sigmoid_fast(z);
    return s * (A(1) + z * (A(1) - s));
  } else {
    return activation_grad(kAct, z, slope);
  }
}

// Calls BODY(kAct) with kAct a compile-time constant, so each activation gets its own loop.
#define BK_SWITCH_ACTIVATION(act, BODY)                      \
  switch (act) {                                             \
    case Activation::None: BODY(Activation::None); break;    \
    case Activation::ReLU: BODY(Activation::ReLU); break;    \
    case Activation::GELU: BODY(Activation::GELU); break;    \
    case Activation::GELUTanh: BODY(Activation::GELUTanh); break; \
    case Activation::SiLU: BODY(Activation::SiLU); break;    \
    case Activation::Sigmoid: BODY(Activation::Sigmoid); break; \
    case Activation::LeakyReLU: BODY(Activation::LeakyReLU); break; \
  }

// y = act(acc + residual) over n elements; also z when zout is given. acc already holds the bias.
template <Activation kAct, typename T, typename A>
BK_ALWAYS_INLINE void epilogue(const A* __restrict__ acc, const T* __restrict__ res,
                               T* __restrict__ out, T* __restrict__ zout, A slope, int64_t n) {
  if (res == nullptr && zout == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = store_as<T>(act_forward<kAct>(acc[j], slope));
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const A z = acc[j] + (res ? load_acc(res[j]) : A(0));
    if (zout) zout[j] = store_as<T>(z);
    out[j] = store_as<T>(act_forward<kAct>(z, slope));
  }
}

template <typename T, typename A>
BK_ALWAYS_INLINE void epilogue_any(Activation act, const A* acc, const T* res, T* out, T* zout,
                                   A slope, int64_t n) {
#define BK_EPILOGUE(K) epilogue<K>(acc, res, out, zout, slope, n)
  BK_SWITCH_ACTIVATION(act, BK_EPILOGUE)
#undef BK_EPILOGUE
}

// ----------------------------------------------------------------------------- forward, NCHW
// How one (n, c) plane is tiled. Unit horizontal stride: tiles of kRows output rows x kVecs vectors
// of columns, 4 accumulators in all (enough independent FMA chains to hide their latency). The
// zero-bordered buffer is large enough that whole tiles never need a bounds check; the columns and
// rows computed past the output's edge are discarded.
struct NchwPlan {
  bool unit_stride;
  int64_t vecs, rows;     // tile shape (unit stride only)
  int64_t q_alloc;        // columns per accumulator row (Q rounded up to whole tiles)
  int64_t ld, h_alloc;    // padded plane: row length and number of rows
};

// Vector accumulators per NCHW tile: enough independent FMA chains to cover the FMA latency (4
// cycles, 2 units: 8 chains). With AVX-512's 32 registers 8 fit. Measured on the 2-core Xeon of
// bench/conv.py (fp32, bias + relu inference, 2 threads; 4 then 8 accumulators in one script run):
// 7x7 96x56x56 0.62 -> 0.37 ms at N=1, 4.74 -> 2.53 ms at N=8; 3x3 128x56x56 N=8 3.98 -> 1.50 ms.
// (The bench suite's own run, separate: 7x7 N=1 0.365 -> 0.333 ms, N=8 2.60 -> 2.17 ms.) The
// AVX2/SSE clones hold each 64-byte vector in 2/4 registers, so 4 accumulators there.
int64_t nchw_accumulators() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 ? 8 : 4;
#else
  return 4;
#endif
}

template <typename A>
NchwPlan make_nchw_plan(const DepthwiseGeometry& g) {
  NchwPlan plan;
  plan.unit_stride = g.stride_w == 1;
  const int64_t L = kLanes<A>;
  plan.vecs = plan.unit_stride ? std::min<int64_t>(4, (g.Q + L - 1) / L) : 1;
  plan.rows = plan.unit_stride ? std::max<int64_t>(1, nchw_accumulators() / plan.vecs) : 1;
  const int64_t tile_q = plan.vecs * L;
  plan.q_alloc = plan.unit_stride ? (g.Q + tile_q - 1) / tile_q * tile_q : g.Q;
  const int64_t p_alloc = (g.P + plan.rows - 1) / plan.rows * plan.rows;
  plan.ld = std::max(g.W + 2 * g.pad_w,
                     plan.unit_stride ? plan.q_alloc + (g.S - 1) * g.dil_w : int64_t(0));
  plan.h_alloc = std::max(g.H + 2 * g.pad_h, (p_alloc - 1) * g.stride_h + (g.R - 1) * g.dil_h + 1);
  return plan;
}

template <int kRows, int kVecs, typename A>
BK_ALWAYS_INLINE void nchw_tile(const A* __restrict__ pad, int64_t ld, const A* __restrict__ w,
                               const DepthwiseGeometry& g, int64_t p0, int64_t q0, A bias,
                               A* __restrict__ acc_rows, int64_t ld_acc) {
  constexpr int L = kLanes<A>;
  using V = vec_t<A>;
  V acc[kRows][kVecs];
#pragma GCC unroll 4
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[i][v] = vsplat(bias);
  for (int64_t r = 0; r < g.R; ++r) {
    const A* rows[kRows];
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) rows[i] = pad + ((p0 + i) * g.stride_h + r * g.dil_h) * ld + q0;
    const A* wr = w + r * g.S;
    for (int64_t s = 0; s < g.S; ++s) {
      const V wv = vsplat(wr[s]);
      const int64_t off = s * g.dil_w;
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < kVecs; ++v) acc[i][v] += wv * vload(rows[i] + off + v * L);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) vstore(acc_rows + i * ld_acc + q0 + v * L, acc[i][v]);
}

template <int kRows, int kVecs, typename A>
BK_ALWAYS_INLINE void nchw_tile_row(const A* pad, int64_t ld, const A* w, const DepthwiseGeometry& g,
                                   int64_t p0, int64_t q_alloc, A bias, A* acc_rows) {
  for (int64_t q0 = 0; q0 < q_alloc; q0 += kVecs * kLanes<A>)
    nchw_tile<kRows, kVecs>(pad, ld, w, g, p0, q0, bias, acc_rows, q_alloc);
}

// Any horizontal stride: one output row at a time, vectorised by the compiler as it can.
template <typename A>
BK_ALWAYS_INLINE void nchw_strided_row(const A* __restrict__ pad, int64_t ld, const A* __restrict__ w,
                                       const DepthwiseGeometry& g, int64_t p, A bias,
                                       A* __restrict__ acc) {
  for (int64_t q = 0; q < g.Q; ++q) acc[q] = bias;
  for (int64_t r = 0; r < g.R; ++r) {
    const A* row = pad + (p * g.stride_h + r * g.dil_h) * ld;
    for (int64_t s = 0; s < g.S; ++s) {
      const A wv = w[r * g.S + s];
      const A* base = row + s * g.dil_w;
#pragma omp simd
      for (int64_t q = 0; q < g.Q; ++q) acc[q] += wv * base[q * g.stride_w];
    }
  }
}

// Copies an H x W plane into the interior of the zero-bordered buffer (borders are zeroed once
// per task by the caller and never written).
template <typename T, typename A>
BK_ALWAYS_INLINE void fill_padded(const T* __restrict__ in, const DepthwiseGeometry& g, int64_t ld,
                                  A* __restrict__ pad) {
  for (int64_t h = 0; h < g.H; ++h) {
    const T* src = in + h * g.W;
    A* dst = pad + (h + g.pad_h) * ld + g.pad_w;
#pragma omp simd
    for (int64_t x = 0; x < g.W; ++x) dst[x] = load_acc(src[x]);
  }
}

template <typename T>
BK_ALWAYS_INLINE void forward_plane_nchw(const T* in, const acc_t<T>* w, acc_t<T> bias, const T* res,
                                         T* out, T* zout, Activation act, acc_t<T> slope,
                                         const DepthwiseGeometry& g, const NchwPlan& plan,
                                         acc_t<T>* pad, acc_t<T>* acc) {
  fill_padded(in, g, plan.ld, pad);
  for (int64_t p0 = 0; p0 < g.P; p0 += plan.rows) {
    if (!plan.unit_stride) {
      nchw_strided_row(pad, plan.ld, w, g, p0, bias, acc);
    } else if (plan.rows * plan.vecs >= 6) {  // 8 accumulators (AVX-512)
      if (plan.vecs == 1) nchw_tile_row<8, 1>(pad, plan.ld, w, g, p0, plan.q_alloc, bias, acc);
      else if (plan.vecs == 2) nchw_tile_row<4, 2>(pad, plan.ld, w, g, p0, plan.q_alloc, bias, acc);
      else if (plan.vecs == 3) nchw_tile_row<2, 3>(pad, plan.ld, w, g, p0, plan.q_alloc, bias, acc);
      else nchw_tile_row<2, 4>(pad, plan.ld, w, g, p0, plan.q_alloc, bias, acc);
    } else if (plan.vecs == 1) {
      nchw_tile_row<4, 1>(pad, plan.ld, w, g, p0, plan.q_alloc, bias, acc);
    } else if (plan.vecs == 2) {
      nchw_tile_row<2, 2>(pad, plan.ld, w, g, p0, plan.q_alloc, bias, acc);
    } else if (plan.vecs == 3) {
      nchw_tile_row<1, 3>(pad, plan.ld, w, g, p0, plan.q_alloc, bias, acc);
    } else {
      nchw_tile_row<1, 4>(pad, plan.ld, w, g, p0, plan.q_alloc, bias, acc);
    }
    const int64_t rows = std::min(plan.rows, g.P - p0);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t o = (p0 + i) * g.Q;
      epilogue_any(act, acc + i * plan.q_alloc, res ? res + o : nullptr, out + o,
                   zout ? zout + o : nullptr, slope, g.Q);
    }
  }
}

// ---------------------------------------------------------------------- forward, channels_last
// kVecs vectors of channels [c0, c0 + kVecs * lanes) at output (p, q); wt is the filter as (R*S, C).
template <int kVecs, typename A>
BK_ALWAYS_INLINE void nhwc_block(const A* __restrict__ in, const A* __restrict__ wt,
                                 const A* __restrict__ bias, const DepthwiseGeometry& g, int64_t p,
                                 int64_t q, int64_t c0, A* __restrict__ acc_out) {
  constexpr int L = kLanes<A>;
  using V = vec_t<A>;
  V acc[kVecs];
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) acc[v] = bias ? vload(bias + c0 + v * L) : vsplat(A(0));
  for (int64_t r = 0; r < g.R; ++r) {
    const int64_t ih = p * g.stride_h - g.pad_h + r * g.dil_h;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t s = 0; s < g.S; ++s) {
      const int64_t iw = q * g.stride_w - g.pad_w + s * g.dil_w;
      if (iw < 0 || iw >= g.W) continue;
      const A* x = in + (ih * g.W + iw) * g.C + c0;
      const A* wr = wt + (r * g.S + s) * g.C + c0;
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[v] += vload(wr + v * L) * vload(x + v * L);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) vstore(acc_out + c0 + v * L, acc[v]);
}

// kPos horizontally adjacent outputs q0 .. q0 + kPos - 1 at once, all of whose input columns lie
// inside the image (no column checks): each filter tap's weights are loaded once for kPos outputs,
// which takes the loop from two loads per FMA to about one.
template <int kPos, int kVecs, typename A>
BK_ALWAYS_INLINE void nhwc_block_interior(const A* __restrict__ in, const A* __restrict__ wt,
                                          const A* __restrict__ bias, const DepthwiseGeometry& g,
                                          int64_t p, int64_t q0, int64_t c0, A* __restrict__ acc_out) {
  constexpr int L = kLanes<A>;
  using V = vec_t<A>;
  V acc[kPos][kVecs];
#pragma GCC unroll 4
  for (int j = 0; j < kPos; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[j][v] = bias ? vload(bias + c0 + v * L) : vsplat(A(0));
  const int64_t step = g.stride_w * g.C;  // between adjacent outputs' inputs
  for (int64_t r = 0; r < g.R; ++r) {
    const int64_t ih = p * g.stride_h - g.pad_h + r * g.dil_h;
    if (ih < 0 || ih >= g.H) continue;
    const A* row = in + (ih * g.W + q0 * g.stride_w - g.pad_w) * g.C + c0;
    for (int64_t s = 0; s < g.S; ++s) {
      const A* x = row + s * g.dil_w * g.C;
      const A* wr = wt + (r * g.S + s) * g.C + c0;
      V wv[kVecs];
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) wv[v] = vload(wr + v * L);
#pragma GCC unroll 4
      for (int j = 0; j < kPos; ++j)
#pragma GCC unroll 4
        for (int v = 0; v < kVecs; ++v) acc[j][v] += wv[v] * vload(x + j * step + v * L);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < kPos; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) vstore(acc_out + j * g.C + c0 + v * L, acc[j][v]);
}

template <typename A>
BK_ALWAYS_INLINE void nhwc_tail(const A* __restrict__ in, const A* __restrict__ wt,
                                const A* __restrict__ bias, const DepthwiseGeometry& g, int64_t p,
                                int64_t q, int64_t c0, A* __restrict__ acc_out) {
  for (int64_t c = c0; c < g.C; ++c) acc_out[c] = bias ? bias[c] : A(0);
  for (int64_t r = 0; r < g.R; ++r) {
    const int64_t ih = p * g.stride_h - g.pad_h + r * g.dil_h;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t s = 0; s < g.S; ++s) {
      const int64_t iw = q * g.stride_w - g.pad_w + s * g.dil_w;
      if (iw < 0 || iw >= g.W) continue;
      const A* x = in + (ih * g.W + iw) * g.C;
      const A* wr = wt + (r * g.S + s) * g.C;
      for (int64_t c = c0; c < g.C; ++c) acc_out[c] += wr[c] * x[c];
    }
  }
}

// One output row (n, p): in is image n as (H, W, C) in the accumulation type.
template <typename T>
BK_ALWAYS_INLINE void forward_row_nhwc(const acc_t<T>* in, const acc_t<T>* wt, const acc_t<T>* bias,
                                       const T* res, T* out, T* zout, Activation act,
                                       acc_t<T> slope, const DepthwiseGeometry& g, int64_t p,
                                       acc_t<T>* acc) {
  using A = acc_t<T>;
  constexpr int64_t L = kLanes<A>;
  constexpr int64_t kPos = 4;  // outputs per interior block: 4 x 2 vectors = 8 accumulators
  // Outputs whose input columns are all inside the image: q in [q_lo, q_hi].
  const int64_t q_lo = (g.pad_w + g.stride_w - 1) / g.stride_w;
  const int64_t q_hi = g.W - 1 - (g.S - 1) * g.dil_w + g.pad_w >= 0
                           ? (g.W - 1 - (g.S - 1) * g.dil_w + g.pad_w) / g.stride_w
                           : int64_t(-1);
  for (int64_t q = 0; q < g.Q;) {
    if (q >= q_lo && q + kPos - 1 <= q_hi && q + kPos <= g.Q) {
      A* acc_q = acc + q * g.C;
      int64_t c0 = 0;
      for (; c0 + 2 * L <= g.C; c0 += 2 * L) nhwc_block_interior<kPos, 2>(in, wt, bias, g, p, q, c0, acc_q);
      if (c0 + L <= g.C) {
        nhwc_block_interior<kPos, 1>(in, wt, bias, g, p, q, c0, acc_q);
        c0 += L;
      }
      if (c0 < g.C)
        for (int64_t j = 0; j < kPos; ++j) nhwc_tail(in, wt, bias, g, p, q + j, c0, acc_q + j * g.C);
      q += kPos;
      continue;
    }
    A* acc_q = acc + q * g.C;
    int64_t c0 = 0;
    for (; c0 + 4 * L <= g.C; c0 += 4 * L) nhwc_block<4>(in, wt, bias, g, p, q, c0, acc_q);
    const int64_t rest = (g.C - c0) / L;
    if (rest == 3) nhwc_block<3>(in, wt, bias, g, p, q, c0, acc_q);
    else if (rest == 2) nhwc_block<2>(in, wt, bias, g, p, q, c0, acc_q);
    else if (rest == 1) nhwc_block<1>(in, wt, bias, g, p, q, c0, acc_q);
    c0 += rest * L;
    if (c0 < g.C) nhwc_tail(in, wt, bias, g, p, q, c0, acc_q);
    ++q;
  }
  epilogue_any(act, acc, res, out, zout, slope, g.Q * g.C);
}

// ------------------------------------------------------------------------------------ backward
// gz = dy * act'(src), src being z or (from_output) y. Also writes grad_residual = gz when asked.
template <Activation kAct, bool kFromOutput, typename T>
BK_ALWAYS_INLINE void grad_z_loop(const T* __restrict__ dy, const T* __restrict__ src,
                                  acc_t<T>* __restrict__ gz, T* __restrict__ gres, acc_t<T> slope,
                                  int64_t n) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const A s = load_acc(src[j]);
    A d;
    if constexpr (kAct == Activation::None) d = A(1);
    else if constexpr (kFromOutput) d = activation_grad_of_output(kAct, s, slope);
    else d = act_grad<kAct>(s, slope);
    gz[j] = load_acc(dy[j]) * d;
  }
  if (gres) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gres[j] = store_as<T>(gz[j]);
  }
}

template <typename T>
BK_ALWAYS_INLINE void grad_z(const T* dy, const T* src, acc_t<T>* gz, T* gres, Activation act,
                             bool from_output, acc_t<T> slope, int64_t n) {
#define BK_GRAD_Z(K)                                                \
  if (from_output) grad_z_loop<K, true>(dy, src, gz, gres, slope, n); \
  else grad_z_loop<K, false>(dy, src, gz, gres, slope, n)
  BK_SWITCH_ACTIVATION(act, BK_GRAD_Z)
#undef BK_GRAD_Z
}

// One (n, c) plane: accumulates the weight gradient into dw (R*S) when given, writes the input
// gradient plane when gin is given. pad and gpad are (H + 2 pad_h) x (W + 2 pad_w) buffers; pad's
// border is zero (zeroed by the caller), gpad is zeroed here.
template <typename T>
BK_ALWAYS_INLINE void backward_plane_nchw(const T* in, const acc_t<T>* __restrict__ gz,
                                          const acc_t<T>* __restrict__ w, T* gin,
                                          acc_t<T>* __restrict__ dw, const DepthwiseGeometry& g,
                                          acc_t<T>* __restrict__ pad, acc_t<T>* __restrict__ gpad,
                                          acc_t<T>* __restrict__ tap_acc) {
  using A = acc_t<T>;
  const int64_t ld = g.W + 2 * g.pad_w, hp = g.H + 2 * g.pad_h;
  if (dw) {
    // Per tap, a row of Q partial sums accumulated over the output rows (vector FMAs only), then
    // one reduction per tap and plane: a horizontal reduction per (row, tap) would cost more than
    // the multiply-adds for short rows.
    fill_padded(in, g, ld, pad);
    std::fill(tap_acc, tap_acc + g.R * g.S * g.Q, A(0));
    for (int64_t p = 0; p < g.P; ++p) {
      const A* gzr = gz + p * g.Q;
      for (int64_t r = 0; r < g.R; ++r) {
        const A* row = pad + (p * g.stride_h + r * g.dil_h) * ld;
        for (int64_t s = 0; s < g.S; ++s) {
          const A* base = row + s * g.dil_w;
          A* ta = tap_acc + (r * g.S + s) * g.Q;
#pragma omp simd
          for (int64_t q = 0; q < g.Q; ++q) ta[q] += gzr[q] * base[q * g.stride_w];
        }
      }
    }
    for (int64_t t = 0; t < g.R * g.S; ++t) {
      const A* ta = tap_acc + t * g.Q;
      A sum = 0;
      for (int64_t q = 0; q < g.Q; ++q) sum += ta[q];
      dw[t] += sum;
    }
  }
  if (gin) {
    std::fill(gpad, gpad + hp * ld, A(0));
    for (int64_t p = 0; p < g.P; ++p) {
      const A* gzr = gz + p * g.Q;
      for (int64_t r = 0; r < g.R; ++r) {
        A* row = gpad + (p * g.stride_h + r * g.dil_h) * ld;
        for (int64_t s = 0; s < g.S; ++s) {
          const A wv = w[r * g.S + s];
          A* base = row + s * g.dil_w;
          // Distinct q write distinct elements (stride >= 1), so the loop is safe to vectorise.
#pragma omp simd
          for (int64_t q = 0; q < g.Q; ++q) base[q * g.stride_w] += wv * gzr[q];
        }
      }
    }
    for (int64_t h = 0; h < g.H; ++h) {
      const A* src = gpad + (h + g.pad_h) * ld + g.pad_w;
      T* dst = gin + h * g.W;
#pragma omp simd
      for (int64_t x = 0; x < g.W; ++x) dst[x] = store_as<T>(src[x]);
    }
  }
}

// Input gradient of row ih of image n, channels_last, by gathering the gz entries each input
// element fed: gz_n is image n's gz as (P, Q, C), wt the filter as (R*S, C).
template <typename T>
BK_ALWAYS_INLINE void grad_input_row_nhwc(const acc_t<T>* __restrict__ gz_n,
                                          const acc_t<T>* __restrict__ wt, T* __restrict__ gin_row,
                                          const DepthwiseGeometry& g, int64_t ih,
                                          acc_t<T>* __restrict__ acc) {
  using A = acc_t<T>;
  for (int64_t iw = 0; iw < g.W; ++iw) {
    A* a = acc + iw * g.C;
    for (int64_t c = 0; c < g.C; ++c) a[c] = A(0);
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t t = ih + g.pad_h - r * g.dil_h;
      if (t < 0 || t % g.stride_h != 0 || t / g.stride_h >= g.P) continue;
      const int64_t p = t / g.stride_h;
      for (int64_t s = 0; s < g.S; ++s) {
        const int64_t u = iw + g.pad_w - s * g.dil_w;
        if (u < 0 || u % g.stride_w != 0 || u / g.stride_w >= g.Q) continue;
        const A* gzp = gz_n + (p * g.Q + u / g.stride_w) * g.C;
        const A* wr = wt + (r * g.S + s) * g.C;
#pragma omp simd
        for (int64_t c = 0; c < g.C; ++c) a[c] += gzp[c] * wr[c];
      }
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < g.W * g.C; ++j) gin_row[j] = store_as<T>(acc[j]);
}

// Weight gradient partial sum over output rows [row0, row1) of the flattened (n, p), channels_last:
// partial is (R*S, C). in is the input as (N, H, W, C), gz as (N, P, Q, C), both accumulation type.
template <typename A>
BK_ALWAYS_INLINE void grad_weight_rows_nhwc(const A* __restrict__ in, const A* __restrict__ gz,
                                            A* __restrict__ partial, const DepthwiseGeometry& g,
                                            int64_t row0, int64_t row1) {
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t n = row / g.P, p = row % g.P;
    const A* in_n = in + n * g.H * g.W * g.C;
    for (int64_t q = 0; q < g.Q; ++q) {
      const A* gzq = gz + (row * g.Q + q) * g.C;
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t ih = p * g.stride_h - g.pad_h + r * g.dil_h;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t s = 0; s < g.S; ++s) {
          const int64_t iw = q * g.stride_w - g.pad_w + s * g.dil_w;
          if (iw < 0 || iw >= g.W) continue;
          const A* x = in_n + (ih * g.W + iw) * g.C;
          A* part = partial + (r * g.S + s) * g.C;
#pragma omp simd
          for (int64_t c = 0; c < g.C; ++c) part[c] += gzq[c] * x[c];
        }
      }
    }
  }
}

// ------------------------------------------------------------------ per-instruction-set entries
// Non-template functions, so that target_clones applies (it takes no templates); one overload per
// storage type. double is the reference/gradcheck dtype and gets no clones.
#define BK_DEFINE_ENTRIES(T, ATTR)                                                                \
  ATTR void forward_plane_nchw_entry(const T* in, const acc_t<T>* w, acc_t<T> bias, const T* res,  \
                                     T* out, T* zout, Activation act, acc_t<T> slope,              \
                                     const DepthwiseGeometry& g, const NchwPlan& plan,             \
                                     acc_t<T>* pad, acc_t<T>* acc) {                               \
    forward_plane_nchw<T>(in, w, bias, res, out, zout, act, slope, g, plan, pad, acc);            \
  }                                                                                               \
  ATTR void forward_row_nhwc_entry(const acc_t<T>* in, const acc_t<T>* wt, const acc_t<T>* bias,   \
                                   const T* res, T* out, T* zout, Activation act, acc_t<T> slope,  \
                                   const DepthwiseGeometry& g, int64_t p, acc_t<T>* acc) {         \
    forward_row_nhwc<T>(in, wt, bias, res, out, zout, act, slope, g, p, acc);                     \
  }                                                                                               \
  ATTR void grad_z_entry(const T* dy, const T* src, acc_t<T>* gz, T* gres, Activation act,        \
                         bool from_output, acc_t<T> slope, int64_t n) {                            \
    grad_z<T>(dy, src, gz, gres, act, from_output, slope, n);                                     \
  }                                                                                               \
  ATTR void backward_plane_nchw_entry(const T* in, const acc_t<T>* gz, const acc_t<T>* w, T* gin,  \
                                      acc_t<T>* dw, const DepthwiseGeometry& g, acc_t<T>* pad,    \
                                      acc_t<T>* gpad, acc_t<T>* tap_acc) {                        \
    backward_plane_nchw<T>(in, gz, w, gin, dw, g, pad, gpad, tap_acc);                            \
  }                                                                                               \
  ATTR void grad_input_row_nhwc_entry(const acc_t<T>* gz_n, const acc_t<T>* wt, T* gin_row,        \
                                      const DepthwiseGeometry& g, int64_t ih, acc_t<T>* acc) {    \
    grad_input_row_nhwc<T>(gz_n, wt, gin_row, g, ih, acc);                                        \
  }
BK_DEFINE_ENTRIES(float, BK_MULTIVERSION)
BK_DEFINE_ENTRIES(uint16_t, BK_MULTIVERSION)
BK_DEFINE_ENTRIES(double, )
#undef BK_DEFINE_ENTRIES

BK_MULTIVERSION void grad_weight_rows_nhwc_entry(const float* in, const float* gz, float* partial,
                                                 const DepthwiseGeometry& g, int64_t row0,
                                                 int64_t row1) {
  grad_weight_rows_nhwc(in, gz, partial, g, row0, row1);
}
void grad_weight_rows_nhwc_entry(const double* in, const double* gz, double* partial,
                                 const DepthwiseGeometry& g, int64_t row0, int64_t row1) {
  grad_weight_rows_nhwc(in, gz, partial, g, row0, row1);
}

// --------------------------------------------------------------------------------- the op
void check_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "bigkernels::conv_depthwise CPU kernel got a tensor on ",
              input.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
                   "bigkernels::conv_depthwise on CPU supports float32, float64 and bfloat16, got ", dt);
}

at::ScalarType acc_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

template <typename scalar_t>
storage_t<scalar_t>* raw(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<storage_t<scalar_t>*>(t.data_ptr<scalar_t>())
                                      : nullptr;
}

// Sum of partial [chunks, ...] over the chunks, in chunk order (deterministic, whatever the
// thread count).
template <typename A>
at::Tensor sum_chunks(const at::Tensor& partial) {
  const int64_t chunks = partial.size(0), n = partial.numel() / chunks;
  at::Tensor total = partial[0].clone();
  A* t = total.data_ptr<A>();
  const A* p = partial.data_ptr<A>();
  for (int64_t k = 1; k < chunks; ++k)
    for (int64_t j = 0; j < n; ++j) t[j] += p[k * n + j];
  return total;
}

// Equal-size chunks of [0, n) by index: chunk k is [n * k / chunks, n * (k + 1) / chunks).
inline int64_t chunk_begin(int64_t n, int64_t chunks, int64_t k) { return n * k / chunks; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv_depthwise_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, c10::string_view activation, double negative_slope,
    bool need_preactivation) {
  const Activation act = parse_activation(activation);
  const DepthwiseGeometry g = check_depthwise_args(input, weight, stride, padding, dilation, kMaxKernel);
  check_depthwise_epilogue_args(input, bias, residual, g);
  check_cpu(input);
  const at::MemoryFormat fmt = depthwise_memory_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const auto options = input.options();
  at::Tensor out = at::empty({g.N, g.C, g.P, g.Q}, options.memory_format(fmt));
  const bool need_z = need_preactivation && !activation_grad_from_output(act, negative_slope);
  at::Tensor z = need_z ? at::empty({g.N, g.C, g.P, g.Q}, options.memory_format(fmt))
                        : at::empty({0}, options);
  if (out.numel() == 0) return {out, z};

  const at::ScalarType acc_type = acc_dtype(input.scalar_type());
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor res = residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  const at::Tensor w = weight.to(acc_type).contiguous().view({g.C, g.R * g.S});
  const at::Tensor b = bias.has_value() ? bias->to(acc_type).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "conv_depthwise_cpu", [&] {
    using T = storage_t<scalar_t>;
    using A = acc_t<T>;
    const A slope = static_cast<A>(negative_slope);
    T* y = raw<scalar_t>(out);
    T* zp = need_z ? raw<scalar_t>(z) : nullptr;
    const T* rp = raw<scalar_t>(res);
    const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
    const int64_t plane_out = g.P * g.Q;
    if (!channels_last) {
      const T* xp = raw<scalar_t>(x);
      const A* wp = w.data_ptr<A>();
      const NchwPlan plan = make_nchw_plan<A>(g);
      at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
        std::vector<A> pad(plan.h_alloc * plan.ld, A(0));
        std::vector<A> acc(plan.rows * plan.q_alloc);
        for (int64_t nc = begin; nc < end; ++nc) {
          const int64_t c = nc % g.C;
          forward_plane_nchw_entry(xp + nc * g.H * g.W, wp + c * g.R * g.S, bp ? bp[c] : A(0),
                                   rp ? rp + nc * plane_out : nullptr, y + nc * plane_out,
                                   zp ? zp + nc * plane_out : nullptr, act, slope, g, plan,
                                   pad.data(), acc.data());
        }
      });
    } else {
      // Vectors run along C, in the accumulation type: bfloat16 input is widened once here.
      const at::Tensor xa = x.to(acc_type);  // still channels_last
      const A* xp = xa.data_ptr<A>();
      const at::Tensor wt = w.t().contiguous();  // (R*S, C)
      const A* wtp = wt.data_ptr<A>();
      const int64_t row_out = g.Q * g.C;
      at::parallel_for(0, g.N * g.P, 1, [&](int64_t begin, int64_t end) {
        std::vector<A> acc(row_out);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t n = row / g.P, p = row % g.P;
          forward_row_nhwc_entry(xp + n * g.H * g.W * g.C, wtp, bp, rp ? rp + row * row_out : nullptr,
                                 y + row * row_out, zp ? zp + row * row_out : nullptr, act, slope, g,
                                 p, acc.data());
        }
      });
    }
  });
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_depthwise_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& output, const at::Tensor& preactivation, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation,
    double negative_slope, std::array<bool, 4> output_mask) {
  const Activation act = parse_activation(activation);
  const DepthwiseGeometry g = check_depthwise_args(input, weight, stride, padding, dilation, kMaxKernel);
  const at::Tensor& src =
      check_depthwise_backward_args(grad_output, input, output, preactivation, act, negative_slope, g);
  check_cpu(input);
  const bool from_output = activation_grad_from_output(act, negative_slope);
  const bool need_input = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2],
             need_residual = output_mask[3];
  const at::MemoryFormat fmt = depthwise_memory_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const auto options = input.options();
  const at::ScalarType acc_type = acc_dtype(input.scalar_type());

  at::Tensor grad_input = need_input ? at::empty(input.sizes(), options.memory_format(fmt)) : at::empty({0}, options);
  at::Tensor grad_weight = need_weight ? at::zeros(weight.sizes(), options) : at::empty({0}, options);
  at::Tensor grad_bias = need_bias ? at::zeros({g.C}, options) : at::empty({0}, options);
  at::Tensor grad_residual =
      need_residual ? at::empty({g.N, g.C, g.P, g.Q}, options.memory_format(fmt)) : at::empty({0}, options);
  if (!(need_input || need_weight || need_bias || need_residual)) {
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }
  if (grad_output.numel() == 0) {
    if (need_input) grad_input.zero_();  // an empty output (N == 0 or C == 0) fed nothing back
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }

  const at::Tensor dy = grad_output.contiguous(fmt);
  const at::Tensor s = src.contiguous(fmt);
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor w = weight.to(acc_type).contiguous().view({g.C, g.R * g.S});
  at::Tensor gz = at::empty({g.N, g.C, g.P, g.Q}, options.dtype(acc_type).memory_format(fmt));

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "conv_depthwise_backward_cpu", [&] {
    using T = storage_t<scalar_t>;
    using A = acc_t<T>;
    const A slope = static_cast<A>(negative_slope);
    const T* dyp = raw<scalar_t>(dy);
    const T* sp = raw<scalar_t>(s);
    A* gzp = gz.data_ptr<A>();
    T* grp = need_residual ? raw<scalar_t>(grad_residual) : nullptr;
    at::parallel_for(0, gz.numel(), kPointwiseGrain, [&](int64_t begin, int64_t end) {
      grad_z_entry(dyp + begin, sp + begin, gzp + begin, grp ? grp + begin : nullptr, act,
                   from_output, slope, end - begin);
    });
    if (need_bias) grad_bias.copy_(gz.sum({0, 2, 3}));
    if (!need_input && !need_weight) return;

    const A* wp = w.data_ptr<A>();
    T* gip = need_input ? raw<scalar_t>(grad_input) : nullptr;
    const int64_t RS = g.R * g.S;
    at::Tensor dw;  // the weight gradient in the accumulation type, (C, R*S)
    if (!channels_last) {
      const T* xp = raw<scalar_t>(x);
      // Tasks (c, chunk of the batch); chunk partials reduced in chunk order.
      const int64_t chunks = std::clamp<int64_t>((kWeightGradTasks + g.C - 1) / g.C, 1, std::max<int64_t>(g.N, 1));
      at::Tensor partial = need_weight ? at::zeros({chunks, g.C, RS}, options.dtype(acc_type)) : at::Tensor();
      A* pp = need_weight ? partial.data_ptr<A>() : nullptr;
      const int64_t hw = g.H * g.W, pq = g.P * g.Q;
      const int64_t plane_pad = (g.H + 2 * g.pad_h) * (g.W + 2 * g.pad_w);
      at::parallel_for(0, g.C * chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<A> pad(need_weight ? plane_pad : 0, A(0));
        std::vector<A> gpad(need_input ? plane_pad : 0);
        std::vector<A> tap_acc(need_weight ? RS * g.Q : 0);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t c = task / chunks, k = task % chunks;
          A* dwp = pp ? pp + (k * g.C + c) * RS : nullptr;
          for (int64_t n = chunk_begin(g.N, chunks, k); n < chunk_begin(g.N, chunks, k + 1); ++n) {
            const int64_t nc = n * g.C + c;
            backward_plane_nchw_entry(xp + nc * hw, gzp + nc * pq, wp + c * RS,
                                      gip ? gip + nc * hw : nullptr, dwp, g, pad.data(), gpad.data(),
                                      tap_acc.data());
          }
        }
      });
      if (need_weight) dw = sum_chunks<A>(partial);  // (C, R*S)
    } else {
      if (need_input) {
        const at::Tensor wt = w.t().contiguous();  // (R*S, C)
        const A* wtp = wt.data_ptr<A>();
        const int64_t row_in = g.W * g.C;
        at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
          std::vector<A> acc(row_in);
          for (int64_t row = begin; row < end; ++row) {
            const int64_t n = row / g.H, ih = row % g.H;
            grad_input_row_nhwc_entry(gzp + n * g.P * g.Q * g.C, wtp, gip + row * row_in, g, ih,
                                      acc.data());
          }
        });
      }
      if (need_weight) {
        const at::Tensor xa = x.to(acc_type);
        const A* xp = xa.data_ptr<A>();
        const int64_t rows = g.N * g.P;
        const int64_t budget = std::max<int64_t>(1, kMaxPartialBytes / (RS * g.C * int64_t(sizeof(A))));
        const int64_t chunks = std::clamp<int64_t>(std::min(kWeightGradTasks, budget), 1, rows);
        at::Tensor partial = at::zeros({chunks, RS, g.C}, options.dtype(acc_type));
        A* pp = partial.data_ptr<A>();
        at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            grad_weight_rows_nhwc_entry(xp, gzp, pp + k * RS * g.C, g, chunk_begin(rows, chunks, k),
                                        chunk_begin(rows, chunks, k + 1));
          }
        });
        dw = sum_chunks<A>(partial).t();  // (C, R*S)
      }
    }
    if (need_weight) grad_weight.view({g.C, RS}).copy_(dw);
  });
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("conv_depthwise", &conv_depthwise_cpu);
  m.impl("conv_depthwise_backward", &conv_depthwise_backward_cpu);
}

}  // namespace bigkernels::cpu
