// The fused float32 CPU recurrence of bigkernels::lstm (declared in lstm_recurrent.h).
//
// Why: the generic path (csrc/common/lstm_layer.h) runs per step an MKL GEMM on a few rows, which
// repacks w_hh every time, plus several ATen calls; at small batch that overhead is most of the
// step. Here:
//  - w_hh is packed once per call into panels laid out for the micro-kernel. Forward: for each
//    panel of kUnits hidden units, K-major, the four gate rows (i, f, g, o) of those units side by
//    side, so one register tile holds all four gates of kUnits units for up to kMaxRows batch rows,
//    and the pointwise LSTM update runs on the tile right after the K loop (no [n, 4H] round trip).
//    Backward: panels of w_hh^T (kUnits columns of w_hh, K = 4H), and the pointwise backward runs
//    on dh_t's tile the same way.
//  - One OpenMP parallel region for the whole sequence; each thread owns a contiguous range of
//    panels (it packs them itself, so they start in its own cache) and the threads meet at one
//    barrier per step (step t + 1 reads all of step t's h, or dG in the backward). Where the batch
//    is large enough for the size of w_hh (kMinSplitBatch...), each thread instead runs a fixed
//    share of the batch rows through every panel, forward and backward: no barrier per step.
//  - The micro-kernels use GCC vector types (one 512-bit vector of kUnits floats per gate), so the
//    register tile is explicit; the epilogues are plain loops that GCC vectorises, with fast_math.h's
//    exp and division-free reciprocals (sigmoid_newton, tanh_newton); on AVX-512 CPUs the forward
//    epilogue of full panels is forward_epilogue_avx512 (vscalefps, vrcp14ps). Built for several
//    instruction sets like lstm_pointwise.cpp; lstm_recurrent_applies() enables it only where it was
//    measured.
// Packed and reversed sequences follow the schedule of lstm_layer.h (make_lstm_schedule,
// previous_state's rule for rows a step carries over and rows it starts from h0/c0).
#include "lstm_recurrent.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "../common/lstm_layer.h"
#include "fast_math.h"
#include "lstm_onednn_gemm.h"
#include "lstm_step_gemm.h"

namespace bigkernels::cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(__clang__)
#define BK_REC_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define BK_REC_HAVE_AVX512_CHECK 1
#else
#define BK_REC_MULTIVERSION
#endif

// Hidden units per panel: one 512-bit vector of floats per gate.
constexpr int kUnits = 16;
// Batch rows per register tile. Forward: kMaxRows x 4 gate accumulators + 4 weight vectors fit
// the 32 AVX-512 registers. Backward: kMaxRows x kBwdPanels accumulators + kBwdPanels weights.
constexpr int kMaxRows = 6;
constexpr int kBwdPanels = 4;
// K steps per block when several row tiles share a panel: 128 x 256 bytes of packed weights
// (32 KiB) stay in the 48 KiB L1 while every row tile passes over them.
constexpr int64_t kKBlock = 128;
// Where the fused kernels measured faster than the per-step GEMM path (2-core Sapphire Rapids,
// T = 64, hidden 128..1024, batch 1..256, forward and forward+backward, against the generic path
// with its MKL-packed w_hh, csrc/cpu/lstm_step_gemm.h): every batch at hidden 128, and batches up
// to 64 while w_hh fits the two L2s (hidden 512: fused 10.7 vs generic 10.2 ms forward at batch 8,
// even at batch 64). Beyond that MKL's packed GEMM is as fast or faster (hidden 1024, batch 8:
// fused 54 ms, generic 48 ms forward; batch 64: 274 vs 249 ms), and at batch 1 both stream w_hh.
constexpr int64_t kMaxFusedBatch = 64;
constexpr int64_t kMaxHiddenAnyBatch = 128;
constexpr int64_t kMaxFusedWhhBytes = 4 << 20;
// Batch split: each thread runs its own share of the batch rows through every panel, forward and
// backward, so the threads never wait for each other (no barrier per step, no h or dG rows
// crossing cores), at the price of every core reading all of w_hh each step. Panels split: each
// thread multiplies its own half of w_hh for every row, and the threads meet at a barrier per step.
// Measured (T = 64, 2 threads, interleaved with stock; batch split vs panels split, ms):
//  forward, from batch 8 while w_hh fits half an L2 (hidden <= 256): hidden 128 batch 8 0.65 vs
//    0.72, batch 16 1.19 vs 1.34, batch 64 3.73 vs 3.97, batch 256 14.7 vs 15.7 (batch 4 0.53 vs
//    0.49); hidden 256 batch 8 2.05 vs 2.10, batch 16 3.67 vs 3.83. Hidden 512 (4 MiB of w_hh
//    streamed by each core) slower: batch 32 29.8 vs 26.7, batch 64 54.1 vs 50.8.
//  backward (forward + backward times), where a thread's rows per step are enough to pay for
//    streaming all of w_hh: hidden 128 batch 8 2.24 vs 2.35, batch 64 13.5 vs 14.8-15.3, batch 256
//    76.5 vs 84.0; hidden 256 batch 8 6.60 vs 6.24 (slower), batch 16 11.35 vs 11.64; hidden 512
//    batch 8 28.6 vs 25.6 and batch 16 46.1 vs 45.0 (slower), batch 32 even, batch 64 186-190 vs
//    199-206. Hence a batch of at least max(8, 16 per MiB of w_hh).
// BIGKERNELS_LSTM_CPU_SPLIT=batch|panels overrides both choices (tests).
constexpr int64_t kMinSplitBatch = 8;
constexpr int64_t kMaxForwardSplitWhhBytes = 1 << 20;
constexpr int64_t kBackwardSplitRowsPerMiB = 16;
// The backward's chunks of gate gradients (see SequenceGradients in lstm_layer.h). Measured
// (T = 64, 2 threads, forward + backward ms at 4 / 8 / 16 MiB / one whole-sequence chunk): batch 64
// hidden 128 13.2 / 12.8 / 12.4 / 12.4; batch 64 hidden 512 186 / 181 / 185 / 192; batch 256
// hidden 128 73.6 / 71.7 / 81.4 / 81.6.
constexpr int64_t kBackwardChunkBytes = 8 << 20;

// 512-bit vectors in the baseline clone only warn about an ABI that never applies here: every
// function passing them is inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vec16 __attribute__((vector_size(kUnits * sizeof(float))));

BK_ALWAYS_INLINE vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
BK_ALWAYS_INLINE void store16(float* p, const vec16& v) { std::memcpy(p, &v, sizeof(v)); }

// Rows of a step's previous state: the first m from the previous processed step's buffer rows,
// the rest from the initial state (see previous_state in lstm_layer.h).
struct RowSource {
  const float* carried;
  int64_t m;
  const float* init;
  int64_t ld;
  BK_ALWAYS_INLINE const float* row(int64_t b) const {
    return b < m ? carried + b * ld : init + b * ld;
  }
  // The same rows numbered from row `lo` (a thread's share of the batch).
  RowSource from_row(int64_t lo) const { return {carried + lo * ld, m - lo, init + lo * ld, ld}; }
};

// A step's n rows cut into ceil(n / kMaxRows) register tiles of as even sizes as possible: 8 rows
// run as 4 + 4, not 6 + 2, because a 2-row tile keeps too few independent accumulators to hide the
// FMA latency (it measured at about half the FLOP rate of a 6-row one).
struct RowTiles {
  int64_t count, base, extra;
  explicit RowTiles(int64_t n)
      : count((n + kMaxRows - 1) / kMaxRows),
        base(count ? n / count : 0),
        extra(count ? n % count : 0) {}
  int64_t start(int64_t i) const { return i * base + std::min(i, extra); }
  int64_t size(int64_t i) const { return base + (i < extra ? 1 : 0); }
};

// ---------------------------------------------------------------------------------- forward
struct ForwardStep {
  const float* wp;   // packed w_hh: [panels][P][4][kUnits]
  const float* bias;  // [4H] b_ih + b_hh (zeros without biases), added in the epilogue
  const float* pre;  // [n, 4H] this step's input projection, no biases (may be `gates`: each
                     // element is read before the activated gate overwrites it)
  RowSource h_prev;  // [n, P]
  RowSource c_prev;  // [n, H]
  float* h_out;      // [n, H]
  float* c_out;      // [n, H] (may alias c_prev's rows: each element is read before it is written)
  float* gates;      // [n, 4H] activated gates, or null
  float* part;       // this thread's partial sums, [n][4][kUnits] (used when n > kMaxRows)
  int64_t n, H, P, p0, p1;
  bool avx512_epilogue;  // full panels take forward_epilogue_avx512 (the CPU has AVX-512)
};

#if defined(BK_REC_HAVE_AVX512_CHECK)
// The forward epilogue of full panels with AVX-512 instructions that the portable loop below cannot
// name: vscalefps for the 2^n of exp (instead of building the exponent bits) and vrcp14ps plus one
// Newton step for the reciprocals of sigmoid and tanh (3 instructions instead of reciprocal_newton's
// 7, 2^-28 before rounding). The same exp polynomial, range reduction and tanh series as
// fast_math.h. Why: the epilogue is the LSTM's pointwise work (5 exp and 5 reciprocals per unit) and
// measured a third of the fused step at batch 64, hidden 128; it runs on the same two vector ports
// as the GEMM. A real call (not inlined) from every clone of forward_step_f32, taken only when the
// CPU has AVX-512; once per register tile of R rows.
#define BK_AVX512_FN __attribute__((target("arch=x86-64-v4")))

BK_AVX512_FN inline __m512 exp512(__m512 x) {
  // _mm512_min/max_ps return their second operand when either is NaN: NaN passes through.
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 1/x for x >= 1.
BK_AVX512_FN inline __m512 reciprocal512(__m512 x) {
  const __m512 y = _mm512_rcp14_ps(x);
  return _mm512_fmadd_ps(y, _mm512_fnmadd_ps(x, y, _mm512_set1_ps(1.0f)), y);
}

BK_AVX512_FN inline __m512 sigmoid512(__m512 x) {
  return reciprocal512(_mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

BK_AVX512_FN inline __m512 tanh512(__m512 x) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 ax = _mm512_andnot_ps(sign, x);
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(-17.0f / 315.0f), _mm512_set1_ps(2.0f / 15.0f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.0f / 3.0f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(1.0f));
  const __m512 series = _mm512_mul_ps(x, q);
  const __m512 t = exp512(_mm512_mul_ps(_mm512_set1_ps(-2.0f), ax));
  const __m512 mag = _mm512_mul_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), t),
                                   reciprocal512(_mm512_add_ps(_mm512_set1_ps(1.0f), t)));
  const __m512 far = _mm512_or_ps(mag, _mm512_and_ps(sign, x));
  const __mmask16 small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.125f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(small, far, series);
}

// Rows b0 .. b0 + rows - 1 of full panel `panel`; tile = [rows][4][kUnits] gate sums.
BK_AVX512_FN __attribute__((noinline)) void forward_epilogue_avx512(const ForwardStep& s,
                                                                     const float* tile, int rows,
                                                                     int64_t b0, int64_t panel) {
  const int64_t H = s.H, j0 = panel * kUnits;
  const __m512 bi = _mm512_loadu_ps(s.bias + j0), bf = _mm512_loadu_ps(s.bias + H + j0),
               bg = _mm512_loadu_ps(s.bias + 2 * H + j0), bo = _mm512_loadu_ps(s.bias + 3 * H + j0);
  for (int r = 0; r < rows; ++r) {
    const int64_t b = b0 + r;
    const float* acc = tile + r * 4 * kUnits;
    const float* pre = s.pre + b * 4 * H + j0;
    const __m512 i = sigmoid512(_mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(acc), _mm512_loadu_ps(pre)), bi));
    const __m512 f = sigmoid512(
        _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(acc + kUnits), _mm512_loadu_ps(pre + H)), bf));
    const __m512 g = tanh512(
        _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(acc + 2 * kUnits), _mm512_loadu_ps(pre + 2 * H)), bg));
    const __m512 o = sigmoid512(
        _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(acc + 3 * kUnits), _mm512_loadu_ps(pre + 3 * H)), bo));
    const __m512 c = _mm512_fmadd_ps(f, _mm512_loadu_ps(s.c_prev.row(b) + j0), _mm512_mul_ps(i, g));
    _mm512_storeu_ps(s.c_out + b * H + j0, c);
    _mm512_storeu_ps(s.h_out + b * H + j0, _mm512_mul_ps(o, tanh512(c)));
    if (s.gates) {
      float* gw = s.gates + b * 4 * H + j0;
      _mm512_storeu_ps(gw, i);
      _mm512_storeu_ps(gw + H, f);
      _mm512_storeu_ps(gw + 2 * H, g);
      _mm512_storeu_ps(gw + 3 * H, o);
    }
  }
}
#endif

template <bool kWorkspace, bool kFull>
BK_ALWAYS_INLINE void forward_epilogue(const float (&acc)[4][kUnits], const float* pre,
                                       const float* bias, int64_t H,
                                       const float* cp, float* co, float* __restrict__ ho, float* gw,
                                       int nu) {
  const int count = kFull ? kUnits : nu;
#pragma omp simd
  for (int u = 0; u < count; ++u) {
    const float i = sigmoid_newton(acc[0][u] + pre[u] + bias[u]);
    const float f = sigmoid_newton(acc[1][u] + pre[H + u] + bias[H + u]);
    const float g = tanh_newton(acc[2][u] + pre[2 * H + u] + bias[2 * H + u]);
    const float o = sigmoid_newton(acc[3][u] + pre[3 * H + u] + bias[3 * H + u]);
    const float c = f * cp[u] + i * g;
    co[u] = c;
    ho[u] = o * tanh_newton(c);
    if constexpr (kWorkspace) {
      gw[u] = i;
      gw[H + u] = f;
      gw[2 * H + u] = g;
      gw[3 * H + u] = o;
    }
  }
}

// Rows b0 .. b0+R-1 of one panel: gates = h_prev @ w_hh^T over the panel's 4 x kUnits columns in
// registers, then the pointwise update.
// Over K range [k0, k1): starts from zero (first) or the partial sums in `part` ([R][4][kUnits]),
// and ends with the pointwise update (last) or by storing the partial sums back.
template <int R, bool kWorkspace>
BK_ALWAYS_INLINE void forward_tile(const ForwardStep& s, int64_t panel, int64_t b0, int64_t k0,
                                   int64_t k1, float* part, bool first, bool last) {
  const float* hrow[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) hrow[r] = s.h_prev.row(b0 + r);
  // One row alone would leave each gate's FMA chain latency-bound: split K in two there.
  constexpr int S = R == 1 ? 2 : 1;
  vec16 acc[S][R][4];
#pragma GCC unroll 8
  for (int q = 0; q < S * R; ++q) {
    acc[q / R][q % R][0] = acc[q / R][q % R][1] = acc[q / R][q % R][2] = acc[q / R][q % R][3] = vec16{};
  }
  if (!first) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      for (int g = 0; g < 4; ++g) acc[0][r][g] = load16(part + (r * 4 + g) * kUnits);
    }
  }
  const float* w = s.wp + panel * s.P * 4 * kUnits;
  int64_t k = k0;
  for (; k + S <= k1; k += S) {
#pragma GCC unroll 2
    for (int sp = 0; sp < S; ++sp) {
      const float* wk = w + (k + sp) * 4 * kUnits;
      const vec16 w0 = load16(wk), w1 = load16(wk + kUnits), w2 = load16(wk + 2 * kUnits),
                  w3 = load16(wk + 3 * kUnits);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float a = hrow[r][k + sp];
        acc[sp][r][0] += a * w0;
        acc[sp][r][1] += a * w1;
        acc[sp][r][2] += a * w2;
        acc[sp][r][3] += a * w3;
      }
    }
  }
  if constexpr (S > 1) {
    for (; k < k1; ++k) {
      const float* wk = w + k * 4 * kUnits;
      const float a = hrow[0][k];
      acc[0][0][0] += a * load16(wk);
      acc[0][0][1] += a * load16(wk + kUnits);
      acc[0][0][2] += a * load16(wk + 2 * kUnits);
      acc[0][0][3] += a * load16(wk + 3 * kUnits);
    }
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) acc[0][0][g] += acc[1][0][g];
  }
  if (!last) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      for (int g = 0; g < 4; ++g) store16(part + (r * 4 + g) * kUnits, acc[0][r][g]);
    }
    return;
  }
  const int64_t j0 = panel * kUnits;
  const int nu = static_cast<int>(std::min<int64_t>(kUnits, s.H - j0));
  const int64_t H = s.H;
  alignas(64) float tile[R][4][kUnits];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < 4; ++g) store16(tile[r][g], acc[0][r][g]);
  }
#if defined(BK_REC_HAVE_AVX512_CHECK)
  if (s.avx512_epilogue && nu == kUnits) {
    forward_epilogue_avx512(s, &tile[0][0][0], R, b0, panel);
    return;
  }
#endif
  for (int r = 0; r < R; ++r) {
    const int64_t b = b0 + r;
    const float* pre = s.pre + b * 4 * H + j0;
    const float* cp = s.c_prev.row(b) + j0;
    float* co = s.c_out + b * H + j0;
    float* ho = s.h_out + b * H + j0;
    float* gw = kWorkspace ? s.gates + b * 4 * H + j0 : nullptr;
    const float* bias = s.bias + j0;
    if (nu == kUnits) forward_epilogue<kWorkspace, true>(tile[r], pre, bias, H, cp, co, ho, gw, nu);
    else forward_epilogue<kWorkspace, false>(tile[r], pre, bias, H, cp, co, ho, gw, nu);
  }
}

template <bool kWorkspace>
BK_ALWAYS_INLINE void forward_step_impl(const ForwardStep& s) {
  // More rows than one tile: block K so that the panel's slice stays in L1 across row blocks.
  const int64_t kc = s.n > kMaxRows ? kKBlock : s.P;
  const RowTiles tiles(s.n);
  for (int64_t p = s.p0; p < s.p1; ++p) {
    for (int64_t k0 = 0; k0 < s.P; k0 += kc) {
      const int64_t k1 = std::min(s.P, k0 + kc);
      const bool first = k0 == 0, last = k1 == s.P;
      for (int64_t tile = 0; tile < tiles.count; ++tile) {
        const int64_t b = tiles.start(tile);
        float* part = s.part + b * 4 * kUnits;
        switch (tiles.size(tile)) {
          case 6: forward_tile<6, kWorkspace>(s, p, b, k0, k1, part, first, last); break;
          case 5: forward_tile<5, kWorkspace>(s, p, b, k0, k1, part, first, last); break;
          case 4: forward_tile<4, kWorkspace>(s, p, b, k0, k1, part, first, last); break;
          case 3: forward_tile<3, kWorkspace>(s, p, b, k0, k1, part, first, last); break;
          case 2: forward_tile<2, kWorkspace>(s, p, b, k0, k1, part, first, last); break;
          case 1: forward_tile<1, kWorkspace>(s, p, b, k0, k1, part, first, last); break;
          default: break;
        }
      }
    }
  }
}

BK_REC_MULTIVERSION void forward_step_f32(const ForwardStep& s) {
  if (s.gates) forward_step_impl<true>(s);
  else forward_step_impl<false>(s);
}

// wp[p][k][g][u] = w_hh[g*H + p*kUnits + u][k], zero for units past H. A transpose, done in
// blocks of kUnits k's so that both the rows read and the block written stay in L1.
void pack_forward_panels(const float* w, float* wp, int64_t H, int64_t P, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    float* dst = wp + p * P * 4 * kUnits;
    for (int64_t k0 = 0; k0 < P; k0 += kUnits) {
      const int64_t nk = std::min<int64_t>(kUnits, P - k0);
      for (int g = 0; g < 4; ++g) {
        for (int u = 0; u < kUnits; ++u) {
          const int64_t j = p * kUnits + u;
          float* d = dst + k0 * 4 * kUnits + g * kUnits + u;
          if (j < H) {
            const float* src = w + (g * H + j) * P + k0;
            for (int64_t k = 0; k < nk; ++k) d[k * 4 * kUnits] = src[k];
          } else {
            for (int64_t k = 0; k < nk; ++k) d[k * 4 * kUnits] = 0.0f;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------- backward
struct BackwardStep {
  const float* wt;       // packed w_hh^T: [panels][4H][kUnits]
  const float* dg_next;  // [n_next, 4H] gate gradients of the step after this one (forward order)
  int64_t n_next;
  float* dh;             // [B, P] gradient w.r.t. the running h (rows < n_next rewritten here)
  float* dc;             // [B, H] gradient w.r.t. the running c (updated in place)
  const float* dout;     // [n, P] this step's output gradient
  RowSource c_prev;      // [n, H]
  const float* c_t;      // [n, H]
  const float* ws;       // [n, 4H] activated gates
  float* dg;             // [n, 4H] out
  float* part;           // this thread's partial sums, [n_next][kBwdPanels][kUnits]
  int64_t n, H, P, p0, p1;

  // The same step restricted to batch rows [r0, r1) (a thread's share), numbered from r0.
  BackwardStep rows(int64_t r0, int64_t r1) const {
    BackwardStep b = *this;
    b.n = std::max<int64_t>(0, std::min(n, r1) - r0);
    b.n_next = std::max<int64_t>(0, std::min(n_next, r1) - r0);
    const int64_t K = 4 * H;
    if (b.n_next > 0) b.dg_next = dg_next + r0 * K;
    b.dh = dh + r0 * P;
    b.dc = dc + r0 * H;
    if (b.n > 0) {
      b.dout = dout + r0 * P;
      b.c_prev = c_prev.from_row(r0);
      b.c_t = c_t + r0 * H;
      b.ws = ws + r0 * K;
      b.dg = dg + r0 * K;
    }
    return b;
  }
};

// dh[b0 .. b0+R-1][panels q0 .. q0+NP-1] = dg_next rows @ w_hh over those columns, K range
// [k0, k1): from zero (first) or the partial sums in `part` ([R][NP][kUnits]), ending by storing
// into dh (last) or back into `part`.
template <int R, int NP>
BK_ALWAYS_INLINE void backward_gemm_tile(const BackwardStep& s, int64_t q0, int64_t b0, int64_t k0,
                                         int64_t k1, float* part, bool first, bool last) {
  const int64_t K = 4 * s.H;
  const float* arow[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) arow[r] = s.dg_next + (b0 + r) * K;
  constexpr int S = R == 1 ? 2 : 1;  // as in forward_tile
  vec16 acc[S][R][NP];
#pragma GCC unroll 8
  for (int r = 0; r < S * R; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) acc[r / R][r % R][q] = vec16{};
  }
  if (!first) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) acc[0][r][q] = load16(part + (r * NP + q) * kUnits);
    }
  }
  const float* w = s.wt + q0 * K * kUnits;
  int64_t k = k0;
  for (; k + S <= k1; k += S) {
#pragma GCC unroll 2
    for (int sp = 0; sp < S; ++sp) {
      vec16 wv[NP];
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) wv[q] = load16(w + (q * K + k + sp) * kUnits);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float a = arow[r][k + sp];
#pragma GCC unroll 4
        for (int q = 0; q < NP; ++q) acc[sp][r][q] += a * wv[q];
      }
    }
  }
  if constexpr (S > 1) {
    for (; k < k1; ++k) {
      const float a = arow[0][k];
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) acc[0][0][q] += a * load16(w + (q * K + k) * kUnits);
    }
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) acc[0][0][q] += acc[1][0][q];
  }
  if (!last) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) store16(part + (r * NP + q) * kUnits, acc[0][r][q]);
    }
    return;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* d = s.dh + (b0 + r) * s.P;
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      const int64_t j0 = (q0 + q) * kUnits;
      if (j0 + kUnits <= s.P) {
        store16(d + j0, acc[0][r][q]);
      } else {
        alignas(64) float tmp[kUnits];
        store16(tmp, acc[0][r][q]);
        for (int64_t u = 0; j0 + u < s.P; ++u) d[j0 + u] = tmp[u];
      }
    }
  }
}

template <int NP>
BK_ALWAYS_INLINE void backward_gemm_rows(const BackwardStep& s, int64_t q0, int64_t b0, int64_t rows,
                                         int64_t k0, int64_t k1, float* part, bool first, bool last) {
  switch (rows) {
    case 6: backward_gemm_tile<6, NP>(s, q0, b0, k0, k1, part, first, last); break;
    case 5: backward_gemm_tile<5, NP>(s, q0, b0, k0, k1, part, first, last); break;
    case 4: backward_gemm_tile<4, NP>(s, q0, b0, k0, k1, part, first, last); break;
    case 3: backward_gemm_tile<3, NP>(s, q0, b0, k0, k1, part, first, last); break;
    case 2: backward_gemm_tile<2, NP>(s, q0, b0, k0, k1, part, first, last); break;
    case 1: backward_gemm_tile<1, NP>(s, q0, b0, k0, k1, part, first, last); break;
    default: break;
  }
}
static_assert(kMaxRows == 6, "backward_gemm_rows covers 1..6 rows");

// The pointwise backward of row b over hidden units [j0, j1): dh_t = dout + dh (the recurrence's
// part, just computed) -> gate gradients and the c gradient (same maths as lstm_pointwise.cpp).
BK_ALWAYS_INLINE void backward_epilogue(const BackwardStep& s, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = s.H;
  const float* __restrict__ dout = s.dout + b * s.P;
  const float* __restrict__ dhr = s.dh + b * s.P;
  float* dc = s.dc + b * H;
  const float* __restrict__ cx = s.c_prev.row(b);
  const float* __restrict__ cy = s.c_t + b * H;
  const float* __restrict__ ws = s.ws + b * 4 * H;
  float* __restrict__ dg = s.dg + b * 4 * H;
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const float i = ws[j], f = ws[H + j], g = ws[2 * H + j], o = ws[3 * H + j];
    const float tc = tanh_newton(cy[j]);
    const float dh = dout[j] + dhr[j];
    const float dct = dc[j] + dh * o * (1.0f - tc * tc);
    dg[j] = dct * g * i * (1.0f - i);
    dg[H + j] = dct * cx[j] * f * (1.0f - f);
    dg[2 * H + j] = dct * i * (1.0f - g * g);
    dg[3 * H + j] = dh * tc * o * (1.0f - o);
    dc[j] = dct * f;
  }
}

template <int NP>
BK_ALWAYS_INLINE void backward_group(const BackwardStep& s, int64_t q0) {
  const int64_t K = 4 * s.H;
  const int64_t j0 = q0 * kUnits, j1 = std::min(s.P, (q0 + NP) * kUnits);
  if (s.n_next <= kMaxRows) {
    // One row tile: the GEMM and the pointwise pass of its rows back to back, dh still in L1.
    backward_gemm_rows<NP>(s, q0, 0, s.n_next, 0, K, nullptr, true, true);
  } else {
    // Several row tiles share the panels: block K so that their slice stays in L1.
    const RowTiles tiles(s.n_next);
    for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
      const int64_t k1 = std::min(K, k0 + kKBlock);
      for (int64_t tile = 0; tile < tiles.count; ++tile) {
        const int64_t b0 = tiles.start(tile);
        backward_gemm_rows<NP>(s, q0, b0, tiles.size(tile), k0, k1, s.part + b0 * NP * kUnits,
                               k0 == 0, k1 == K);
      }
    }
  }
  for (int64_t b = 0; b < s.n; ++b) backward_epilogue(s, b, j0, j1);
}

BK_REC_MULTIVERSION void backward_step_f32(const BackwardStep& s) {
  int64_t q = s.p0;
  for (; q + kBwdPanels <= s.p1; q += kBwdPanels) backward_group<kBwdPanels>(s, q);
  switch (s.p1 - q) {
    case 3: backward_group<3>(s, q); break;
    case 2: backward_group<2>(s, q); break;
    case 1: backward_group<1>(s, q); break;
    default: break;
  }
}
static_assert(kBwdPanels == 4, "backward_step_f32 covers 1..4 panels");

// wt[p][k][u] = w_hh[k][p*kUnits + u], zero for columns past P.
void pack_backward_panels(const float* w, float* wt, int64_t H, int64_t P, int64_t p0, int64_t p1) {
  const int64_t K = 4 * H;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t j0 = p * kUnits, nu = std::min<int64_t>(kUnits, P - j0);
    float* dst = wt + p * K * kUnits;
    for (int64_t k = 0; k < K; ++k) {
      const float* src = w + k * P + j0;
      float* d = dst + k * kUnits;
      for (int64_t u = 0; u < nu; ++u) d[u] = src[u];
      for (int64_t u = nu; u < kUnits; ++u) d[u] = 0.0f;
    }
  }
}

// ---------------------------------------------------------------------------------- helpers
bool cpu_has_avx512() {
#if defined(BK_REC_HAVE_AVX512_CHECK)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

// Threads for a call: torch's intra-op count, at most one per unit of work split among them
// (panels, or batch rows). (One thread measured slower than two even at batch 1, hidden 128: the
// per-step barrier costs less than half the GEMM.)
int threads_for(int64_t units) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units)));
}

// Whether a call gives each thread a share of the batch rather than of the panels (see
// kMinSplitBatch).
bool splits_batch(int64_t batch, int64_t H, int64_t P, bool backward) {
  if (const char* split = std::getenv("BIGKERNELS_LSTM_CPU_SPLIT")) {
    if (std::strcmp(split, "batch") == 0) return true;
    if (std::strcmp(split, "panels") == 0) return false;
  }
  const int64_t whh_bytes = 4 * H * P * static_cast<int64_t>(sizeof(float));
  if (batch < kMinSplitBatch) return false;
  if (!backward) return whh_bytes <= kMaxForwardSplitWhhBytes;
  return batch * (1 << 20) >= kBackwardSplitRowsPerMiB * whh_bytes;
}

}  // namespace

bool lstm_recurrent_supports(const at::Tensor& input, const at::Tensor& c0,
                             const std::optional<at::Tensor>& w_hr) {
  return input.scalar_type() == at::kFloat && !w_hr.has_value() && c0.dim() == 2 && c0.size(0) >= 1 &&
         c0.size(1) >= 1;
}

bool lstm_recurrent_applies(const at::Tensor& input, const at::Tensor& c0,
                            const std::optional<at::Tensor>& w_hr, bool backward) {
  if (!lstm_recurrent_supports(input, c0, w_hr)) return false;
  const int64_t batch = c0.size(0), hidden = c0.size(1);
  // BIGKERNELS_LSTM_CPU_PATH=fused|generic forces a path (tests, benchmarks); read per call so
  // that a process can switch.
  if (const char* path = std::getenv("BIGKERNELS_LSTM_CPU_PATH")) {
    if (std::strcmp(path, "fused") == 0) return true;
    if (std::strcmp(path, "generic") == 0) return false;
  }
  if (!cpu_has_avx512()) return false;
  (void)backward;  // the same sizes measured faster in both directions
  const int64_t whh_bytes = 4 * hidden * hidden * static_cast<int64_t>(sizeof(float));
  if (hidden <= kMaxHiddenAnyBatch) return true;
  return batch <= kMaxFusedBatch && whh_bytes <= kMaxFusedWhhBytes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrent_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool reverse,
    bool need_workspace, bool onednn_projection) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const LstmSizes s =
      check_lstm_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, std::nullopt);
  TORCH_CHECK(input.scalar_type() == at::kFloat, "lstm_recurrent_forward: float32 only");
  const LstmSchedule sched = make_lstm_schedule(input, batch_sizes, reverse, s);
  const auto opts = input.options();
  const int64_t H = s.hidden, P = s.proj;

  const at::Tensor x2d = input.reshape({s.rows, s.input_size});
  // b_ih + b_hh is added in the step's epilogue, not by the projection GEMM: at::addmm would first
  // copy the broadcast bias into every row of the chunk, one more pass over [rows, 4H].
  const at::Tensor bias = b_ih.has_value() ? (*b_ih + *b_hh).contiguous() : at::zeros({4 * H}, opts);
  const float* bias_p = bias.const_data_ptr<float>();
  // The input projection runs a chunk of steps at a time (see projection_chunks): with a
  // workspace, straight into the chunk's rows of it (the epilogue overwrites each pre-activation
  // with its activated gate); in inference into one small reused buffer.
  const std::vector<ProjectionChunk> chunks = projection_chunks(sched, 4 * H * sizeof(float));
  at::Tensor gates = need_workspace ? at::empty({s.rows, 4 * H}, opts) : at::empty({0}, opts);
  at::Tensor scratch = need_workspace ? at::Tensor() : at::empty({max_chunk_rows(chunks), 4 * H}, opts);
  at::Tensor output = at::empty({s.rows, P}, opts);
  at::Tensor cells = need_workspace ? at::empty({s.rows, H}, opts) : at::empty({0}, opts);
  const at::Tensor h_init = h0.contiguous(), c_init = c0.contiguous();
  at::Tensor c_run = need_workspace ? at::Tensor() : c_init.clone();
  const at::Tensor w = w_hh.contiguous();
  const int64_t panels = (H + kUnits - 1) / kUnits;
  at::Tensor wp = at::empty({panels * P * 4 * kUnits}, opts);

  const float* w_p = w.const_data_ptr<float>();
  float* wp_p = wp.mutable_data_ptr<float>();
  float* out_p = output.mutable_data_ptr<float>();
  float* gates_p = need_workspace ? gates.mutable_data_ptr<float>() : nullptr;
  float* cells_p = need_workspace ? cells.mutable_data_ptr<float>() : c_run.mutable_data_ptr<float>();
  const float* h0_p = h_init.const_data_ptr<float>();
  const float* c0_p = c_init.const_data_ptr<float>();
  const bool split_batch = splits_batch(s.batch, H, P, /*backward=*/false);
  const bool avx512 = cpu_has_avx512();
  const int nt = split_batch ? threads_for(s.batch) : threads_for(panels);
  const int64_t part_size = s.batch > kMaxRows ? s.batch * 4 * kUnits : 0;
  at::Tensor parts = at::empty({nt * part_size}, opts);
  float* parts_p = parts.mutable_data_ptr<float>();
  // w_ih packed once for MKL, or laid out once for oneDNN (every chunk but the last has
  // max_chunk_rows rows): see lstm_step_gemm.h and lstm_onednn_gemm.h for what each saves.
  std::optional<PackedStepGemm> mkl_gemm;
  std::optional<OneDnnStepGemm> onednn_gemm;
  if (onednn_projection) onednn_gemm.emplace(w_ih, max_chunk_rows(chunks), /*backward=*/false);
  else mkl_gemm.emplace(w_ih, max_chunk_rows(chunks), /*backward=*/false);

  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const ProjectionChunk& chunk = chunks[ci];
    const at::Tensor pre = need_workspace ? gates.narrow(0, chunk.row0, chunk.rows) : scratch;
    if (onednn_gemm) {
      onednn_gemm->project(pre.narrow(0, 0, chunk.rows), x2d.narrow(0, chunk.row0, chunk.rows), std::nullopt);
    } else {
      mkl_gemm->project(pre.narrow(0, 0, chunk.rows), x2d.narrow(0, chunk.row0, chunk.rows), std::nullopt);
    }
    const float* pre_p = pre.const_data_ptr<float>();
#pragma omp parallel num_threads(nt)
    {
      const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
      // Panels split: thread tid multiplies panels [p0, p1) of every row. Batch split: rows
      // [r0, r1) of every step through all panels.
      const int64_t p0 = split_batch ? 0 : panels * tid / nth;
      const int64_t p1 = split_batch ? panels : panels * (tid + 1) / nth;
      const int64_t r0 = split_batch ? s.batch * tid / nth : 0;
      const int64_t r1 = split_batch ? s.batch * (tid + 1) / nth : s.batch;
      if (ci == 0) {
        // Panels split: each thread packs (and so caches) the panels it multiplies; no other
        // thread reads them, and later chunks' regions give thread tid the same panels. Batch
        // split: the threads pack a share each, then every thread reads all of them.
        pack_forward_panels(w_p, wp_p, H, P, panels * tid / nth, panels * (tid + 1) / nth);
        if (split_batch) {
#pragma omp barrier
        }
      }
      for (size_t k = chunk.k0; k < chunk.k1; ++k) {
        const int64_t t = sched.order[k], n = sched.sizes[t], off = sched.offsets[t];
        if (n == 0) continue;
        const int64_t lo = std::min(r0, n), hi = std::min(r1, n);
        if (hi > lo) {
          ForwardStep st;
          st.wp = wp_p;
          st.bias = bias_p;
          st.pre = pre_p + (off + lo - chunk.row0) * 4 * H;
          if (k == 0) {
            st.h_prev = {h0_p, 0, h0_p, P};
            st.c_prev = need_workspace ? RowSource{c0_p, 0, c0_p, H} : RowSource{cells_p, n, c0_p, H};
          } else {
            const int64_t tp = sched.order[k - 1];
            const int64_t m = std::min(n, sched.sizes[tp]), offp = sched.offsets[tp];
            st.h_prev = {out_p + offp * P, m, h0_p, P};
            st.c_prev = need_workspace ? RowSource{cells_p + offp * H, m, c0_p, H}
                                       : RowSource{cells_p, n, c0_p, H};
          }
          st.h_prev = st.h_prev.from_row(lo);
          st.c_prev = st.c_prev.from_row(lo);
          st.h_out = out_p + (off + lo) * P;
          st.c_out = need_workspace ? cells_p + (off + lo) * H : cells_p + lo * H;
          st.gates = need_workspace ? gates_p + (off + lo) * 4 * H : nullptr;
          st.part = parts_p + tid * part_size;
          st.n = hi - lo;
          st.H = H;
          st.P = P;
          st.p0 = p0;
          st.p1 = p1;
          st.avx512_epilogue = avx512;
          forward_step_f32(st);
        }
        // Panels split: step k + 1 reads every unit of this step's h. A batch split thread
        // reads only its own rows.
        if (!split_batch) {
#pragma omp barrier
        }
      }
    }
  }

  at::Tensor h = final_state(output, h_init, sched);
  at::Tensor c = need_workspace ? final_state(cells, c_init, sched) : c_run;
  if (!s.packed) output = output.view({input.size(0), s.batch, P});
  return {output, h, c, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_recurrent_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& input,
                        const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                        const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        bool reverse, const at::Tensor& output, const at::Tensor& gates,
                        const at::Tensor& cells, std::array<bool, 3> output_mask) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const LstmSizes s = check_lstm_args(input, batch_sizes, h0, c0, w_ih, w_hh, std::nullopt,
                                      std::nullopt, std::nullopt);
  TORCH_CHECK(input.scalar_type() == at::kFloat, "lstm_recurrent_backward: float32 only");
  const int64_t H = s.hidden, P = s.proj;
  check_lstm_backward_args(grad_output, grad_h_n, grad_c_n, input, h0, c0, output, gates, cells, s);
  const LstmSchedule sched = make_lstm_schedule(input, batch_sizes, reverse, s);
  const auto opts = input.options();

  const at::Tensor dout = grad_output.reshape({s.rows, P}).contiguous();
  const at::Tensor out2d = output.reshape({s.rows, P}).contiguous();
  const at::Tensor ws = gates.contiguous(), cs = cells.contiguous();
  const at::Tensor h_init = h0.contiguous(), c_init = c0.contiguous();
  // Gate gradients a chunk of steps at a time (SequenceGradients in lstm_layer.h), in two reused
  // buffers taken in turn: a chunk's first step (in backward order) multiplies the gate gradients
  // of the step after it, the last one written in the other buffer.
  const std::vector<ProjectionChunk> chunks =
      projection_chunks(sched, 4 * H * sizeof(float), kBackwardChunkBytes);
  const int64_t chunk_rows = max_chunk_rows(chunks);
  at::Tensor grad_gates = at::empty({std::min<int64_t>(2, chunks.size()) * chunk_rows, 4 * H}, opts);
  SequenceGradients grads(s, sched, input.reshape({s.rows, s.input_size}), w_ih, out2d, h_init,
                          reverse, output_mask);
  at::Tensor dh = grad_h_n.contiguous().clone(), dc = grad_c_n.contiguous().clone();
  const at::Tensor w = w_hh.contiguous();
  const int64_t panels = (P + kUnits - 1) / kUnits;
  at::Tensor wt = at::empty({panels * 4 * H * kUnits}, opts);

  const float* w_p = w.const_data_ptr<float>();
  float* wt_p = wt.mutable_data_ptr<float>();
  const float* dout_p = dout.const_data_ptr<float>();
  const float* ws_p = ws.const_data_ptr<float>();
  const float* cs_p = cs.const_data_ptr<float>();
  const float* c0_p = c_init.const_data_ptr<float>();
  float* dg_p = grad_gates.mutable_data_ptr<float>();
  float* dh_p = dh.mutable_data_ptr<float>();
  float* dc_p = dc.mutable_data_ptr<float>();
  const bool split_batch = splits_batch(s.batch, H, P, /*backward=*/true);
  const int nt = split_batch ? threads_for(s.batch) : threads_for(panels);
  const int64_t steps = static_cast<int64_t>(sched.order.size());
  const int64_t part_size = s.batch > kMaxRows ? s.batch * kBwdPanels * kUnits : 0;
  at::Tensor parts = at::empty({nt * part_size}, opts);
  float* parts_p = parts.mutable_data_ptr<float>();
  // Where each processed step's gate gradients go: chunk ci in buffer ci % 2.
  std::vector<float*> dg_of(steps);
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    for (size_t k = chunks[ci].k0; k < chunks[ci].k1; ++k) {
      dg_of[k] = dg_p + ((ci % 2) * chunk_rows + sched.offsets[sched.order[k]] - chunks[ci].row0) * 4 * H;
    }
  }

  for (size_t ci = chunks.size(); ci-- > 0;) {
    const ProjectionChunk& chunk = chunks[ci];
    // The last chunk's region first packs w_hh; the first chunk's also runs k = -1: only the GEMM
    // of the first processed step's gate gradients (-> grad_h0).
    const int64_t k_hi = static_cast<int64_t>(chunk.k1) - 1;
    const int64_t k_lo = ci == 0 ? -1 : static_cast<int64_t>(chunk.k0);
#pragma omp parallel num_threads(nt)
    {
      const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
      // Panels split: thread tid computes columns [p0, p1) of dh for every row (and the pointwise
      // backward of those units). Batch split: every column of rows [r0, r1).
      const int64_t p0 = split_batch ? 0 : panels * tid / nth;
      const int64_t p1 = split_batch ? panels : panels * (tid + 1) / nth;
      const int64_t r0 = split_batch ? s.batch * tid / nth : 0;
      const int64_t r1 = split_batch ? s.batch * (tid + 1) / nth : s.batch;
      if (ci + 1 == chunks.size()) {
        pack_backward_panels(w_p, wt_p, H, P, panels * tid / nth, panels * (tid + 1) / nth);
        if (split_batch) {
#pragma omp barrier
        }
      }
      for (int64_t k = k_hi; k >= k_lo; --k) {
        BackwardStep st;
        st.wt = wt_p;
        if (k + 1 < steps) {
          const int64_t tn = sched.order[k + 1];
          st.n_next = sched.sizes[tn];
          st.dg_next = dg_of[k + 1];
        } else {
          st.n_next = 0;
          st.dg_next = nullptr;
        }
        st.dh = dh_p;
        st.dc = dc_p;
        st.part = parts_p + tid * part_size;
        st.H = H;
        st.P = P;
        st.p0 = p0;
        st.p1 = p1;
        if (k >= 0) {
          const int64_t t = sched.order[k], n = sched.sizes[t], off = sched.offsets[t];
          st.n = n;
          st.dout = dout_p + off * P;
          if (k == 0) {
            st.c_prev = {c0_p, 0, c0_p, H};
          } else {
            const int64_t tp = sched.order[k - 1];
            st.c_prev = {cs_p + sched.offsets[tp] * H, std::min(n, sched.sizes[tp]), c0_p, H};
          }
          st.c_t = cs_p + off * H;
          st.ws = ws_p + off * 4 * H;
          st.dg = dg_of[k];
        } else {
          st.n = 0;
          st.dout = nullptr;
          st.c_prev = {nullptr, 0, nullptr, H};
          st.c_t = nullptr;
          st.ws = nullptr;
          st.dg = nullptr;
        }
        st = st.rows(r0, r1);
        if (st.n > 0 || st.n_next > 0) backward_step_f32(st);
        // Panels split: the next iteration's GEMM reads every unit of this step's gate gradients.
        // A batch split thread reads only its own rows.
        if (k >= 0 && !split_batch) {
#pragma omp barrier
        }
      }
    }
    // The chunk's gate gradients are final: its share of the time-independent gradients (MKL's
    // threads, outside the region).
    grads.add(grad_gates.narrow(0, (ci % 2) * chunk_rows, chunk.rows), chunk);
  }
  auto empty = [&] { return at::empty({0}, opts); };
  at::Tensor grad_input = output_mask[0] ? grads.grad_input.view(input.sizes()) : empty();
  at::Tensor grad_w_ih = output_mask[1] ? grads.grad_w_ih : empty();
  at::Tensor grad_w_hh = output_mask[1] ? grads.grad_w_hh : empty();
  at::Tensor grad_bias = output_mask[2] ? grads.grad_bias : empty();
  return {grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, empty()};
}

}  // namespace bigkernels::cpu
