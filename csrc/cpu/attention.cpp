// Flash attention on the CPU: bigkernels::attention, attention_backward, attention_dropout_mask.
//
// The maths is bigkernels.reference.attention; the algorithm is flash-attention-2 (Dao, 2023)
// tiled for caches: the L x S score matrix never exists, only one query-block x key-block tile per
// thread, so the extra memory is O(L + S) per head.
//
// Forward: one task per (sequence, query head, query block), tasks shared out dynamically over
//   at::parallel_for's threads. Per task: for each visible key block, S = scale Q K^T (BLAS), add the mask,
//   apply the window, online softmax (running row max m and sum l, the output accumulator rescaled
//   by exp(m_old - m_new)), O += P V (BLAS). At the end O /= l and lse = m + log(l).
// Backward: one task per (sequence, KEY/VALUE head): it owns the dK/dV rows of that head and the
//   dQ rows of every query head of its group, so no two threads ever write the same gradient
//   element and there are no atomics (deterministic). With fewer such tasks than threads, each
//   is split over its key blocks, with private dQ partial sums added in a fixed order. Per
//   key block (dK, dV accumulated in a tile), per query head of the group and query block:
//   recompute P = exp(S - lse), dV += P_dropped^T dO, dP = dO V^T, dS = P (dP keep/(1-p) - D) with
//   D = rowsum(dO * O) from a pre-pass, dK += scale dS^T Q, dQ += scale dS K (dQ accumulated for
//   the whole head in an O(L) buffer). This is 5 block GEMMs per tile pair, where splitting dK/dV and
//   dQ into two passes (what a GPU does for parallelism) needs 7; a CPU has few threads and enough
//   (sequence, head) pairs to keep them busy.
// Precision: float32, bfloat16 and float16 inputs are converted to float32 tiles (fp32 accumulation
//   and softmax); float64 stays float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "aligned_vector.h"
#include "attention_blas.h"
#include "attention_dropout.h"
#include "attention_pointwise.h"

namespace bigkernels::cpu {
namespace {

using namespace attention_detail;

// Tile sizes (query rows x key columns), measured on a 2-core Sapphire Rapids (AVX-512, MKL
// sgemm), float32, 2 threads, against torch's CPU flash kernel side by side on an idle machine.
// Forward: 256 x 512 score tiles (512 KiB in float, inside the 2 MiB L2): against 128 x 512, each
// key block is re-packed by sgemm for half as many query rows, and B=4 H=16 L=4096 D=64 causal went
// 0.97x -> 1.05-1.07x torch, B=1 H=16 L=4096 D=128 1.00x -> 1.02-1.05x. 128 x 1024, 128 x 256,
// 256 x 256, 256 x 1024 and 512 x 512 measured no better, 64 x 512 worse. Short causal rows keep
// 128 query rows: a 256-row block wastes more of the diagonal tile (B=8 H=8 L=512 causal 1.53x
// torch with 128 rows, 1.41x with 256).
// Backward: five GEMMs per tile pair, and their inner dimension is the query block for two of them
// (dV += P^T dO, dK += dS^T Q), so 256 query rows instead of 64 let sgemm run longer per call:
// non-causal B=1 H=8 L=4096 D=64 backward 0.98x -> 1.05x torch with 256 x 512; with a window
// (causal) 256 x 256, which wastes less of the diagonal (B=1 H=32 L=4096 causal 1.09x -> 1.19x;
// 256 x 512 gave 1.05x). 128 x 256 and 128 x 512 sat in between.
// Tried and dropped (idle machine, 2 threads, float32, vs torch side by side): packing each key
// block's K^T and V once per head with MKL's cblas_sgemm_pack and multiplying every query block by
// them with cblas_sgemm_compute (sgemm's own per-call packing is ~20% of its time in a profile)
// was slower, not faster: B=8 H=8 L=512 D=64 forward 0.93x torch against 1.05x with sgemm, B=1 H=8
// L=4096 D=64 0.69x against 1.02x; packing K only: 1.01x and 0.83x (128-row query blocks then).
constexpr int64_t kFwdBlockQ = 256;
constexpr int64_t kFwdBlockQShortCausal = 128;
constexpr int64_t kShortCausalKeys = 512;  // longest key range that takes kFwdBlockQShortCausal
constexpr int64_t kFwdBlockK = 512;
constexpr int64_t kBwdBlockQ = 256;
constexpr int64_t kBwdBlockK = 512;
constexpr int64_t kBwdBlockKWindowed = 256;


struct Strides4 {
  int64_t b, h, r, c;  // batch, head, row (sequence position), column (feature)
};

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// One independent attention problem: query rows [q_start, q_start + q_len) of batch b against key
// rows [k_start, k_start + k_len). Padded calls have one per batch element, varlen one per sequence.
struct Problem {
  int64_t b, q_start, q_len, k_start, k_len;
};

struct Shape {
  int64_t B, Hq, Hk, L, S, E, Ev;
};

struct Window {
  int64_t left, right;  // -1 = unbounded
  // First and one-past-last local key index visible from local query rows [i0, i1).
  int64_t key_begin(int64_t i0) const { return left >= 0 ? std::max<int64_t>(0, i0 - left) : 0; }
  int64_t key_end(int64_t i1, int64_t k_len) const {
    return right >= 0 ? std::min<int64_t>(k_len, i1 - 1 + right + 1) : k_len;
  }
  // First and one-past-last local query index that sees some key of [j0, j1).
  int64_t query_begin(int64_t j0) const { return right >= 0 ? std::max<int64_t>(0, j0 - right) : 0; }
  int64_t query_end(int64_t j1, int64_t q_len) const {
    return left >= 0 ? std::min<int64_t>(q_len, j1 - 1 + left + 1) : q_len;
  }
};

template <typename scalar_t, typename acc_t>
constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;

// Rows [0, n_rows) x cols [0, n_cols) of a strided matrix as a row-major acc_t matrix: the memory
// itself when it already is one (BLAS reads it in place), else a converted copy in `buffer`.
template <typename scalar_t, typename acc_t>
const acc_t* as_rows(const scalar_t* base, int64_t row_stride, int64_t col_stride, int64_t n_rows,
                     int64_t n_cols, acc_t* buffer, int64_t* ld) {
  if constexpr (kDirect<scalar_t, acc_t>) {
    if (col_stride == 1 && row_stride >= n_cols) {
      *ld = row_stride;
      return base;
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    const scalar_t* src = base + r * row_stride;
    acc_t* dst = buffer + r * n_cols;
    if (col_stride == 1) {
      for (int64_t c = 0; c < n_cols; ++c) dst[c] = static_cast<acc_t>(src[c]);
    } else {
      for (int64_t c = 0; c < n_cols; ++c) dst[c] = static_cast<acc_t>(src[c * col_stride]);
    }
  }
  *ld = n_cols;
  return buffer;
}

// Everything the forward and backward kernels read, resolved once per call.
template <typename scalar_t>
struct Inputs {
  const scalar_t *q, *k, *v, *mask;
  Strides4 sq, sk, sv, sm;
  Shape n;
  double scale;
  Window window;
  DropoutRng rng;
  double keep_scale;  // 1 / (1 - p)
  std::vector<Problem> problems;
  int64_t fwd_block_q;  // forward query rows per task (kFwdBlockQ or kFwdBlockQShortCausal)
  int64_t longest_q, longest_k;  // longest problem: tile buffers are no larger than it needs

  // Rows x leading dimension of a score tile of at most block_q x block_k for these problems.
  int64_t tile_rows(int64_t block_q) const { return std::min(block_q, longest_q); }
  int64_t tile_ld(int64_t block_k) const { return std::max<int64_t>(1, std::min(block_k, longest_k)); }

  uint64_t element_index(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return ((static_cast<uint64_t>(b) * n.Hq + h) * n.L + i) * n.S + j;
  }
};

// Adds the mask and applies the window to one score row (in score units: the mask is converted
// from natural units, see kScoreUnit); i, j0 are local, gi, gj0 global indices.
template <typename scalar_t, typename acc_t>
void mask_row(const Inputs<scalar_t>& in, acc_t* s, int64_t nk, int64_t b, int64_t h, int64_t i,
              int64_t gi, int64_t j0, int64_t gj0) {
  if (in.mask != nullptr) {
    const scalar_t* m = in.mask + b * in.sm.b + h * in.sm.h + gi * in.sm.r + gj0 * in.sm.c;
    const acc_t unit = kScoreUnit<acc_t>;
    if (in.sm.c == 1) {
      for (int64_t j = 0; j < nk; ++j) s[j] += unit * static_cast<acc_t>(m[j]);
    } else {
      for (int64_t j = 0; j < nk; ++j) s[j] += unit * static_cast<acc_t>(m[j * in.sm.c]);
    }
  }
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (in.window.left >= 0) {
    const int64_t visible_from = std::min<int64_t>(nk, std::max<int64_t>(0, i - in.window.left - j0));
    for (int64_t j = 0; j < visible_from; ++j) s[j] = neg_inf;
  }
  if (in.window.right >= 0) {
    const int64_t visible_to = std::max<int64_t>(0, std::min<int64_t>(nk, i + in.window.right + 1 - j0));
    for (int64_t j = visible_to; j < nk; ++j) s[j] = neg_inf;
  }
}

// ------------------------------------------------------------------------------ work sharing
// The kernels run at::parallel_for over one index per worker thread, and each worker takes the
// next task from a shared atomic counter until none is left (dynamic scheduling). A static split
// of the tasks would leave one thread idle when tasks differ in cost (causal or windowed rows,
// varlen sequences) or when another process slows one core down. Each task writes its own outputs
// only, so which thread runs it changes nothing in the result.
int64_t task_workers(int64_t tasks) { return std::max<int64_t>(1, std::min<int64_t>(tasks, at::get_num_threads())); }

// ------------------------------------------------------------------------------------ forward
struct ForwardTask {
  int64_t problem, head, q0;
};

// Keys a forward task visits (its cost, up to a constant).
template <typename scalar_t>
int64_t key_count(const Inputs<scalar_t>& in, const ForwardTask& t) {
  const Problem& pr = in.problems[t.problem];
  const int64_t nq = std::min(in.fwd_block_q, pr.q_len - t.q0);
  return std::max<int64_t>(0, in.window.key_end(t.q0 + nq, pr.k_len) - in.window.key_begin(t.q0));
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const Inputs<scalar_t>& in, scalar_t* out, Strides4 so, float* lse) {
  const Shape& n = in.n;
  const int64_t group = n.Hq / n.Hk;
  std::vector<ForwardTask> tasks;
  for (int64_t p = 0; p < static_cast<int64_t>(in.problems.size()); ++p) {
    for (int64_t h = 0; h < n.Hq; ++h) {
      for (int64_t q0 = 0; q0 < in.problems[p].q_len; q0 += in.fwd_block_q) tasks.push_back({p, h, q0});
    }
  }
  const acc_t score_scale = static_cast<acc_t>(in.scale) * kScoreUnit<acc_t>;  // scores in score units
  const acc_t keep_scale = static_cast<acc_t>(in.keep_scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  // Longest first (windows make tasks unequal), then handed out dynamically: see task_workers.
  std::stable_sort(tasks.begin(), tasks.end(), [&](const ForwardTask& a, const ForwardTask& b) {
    return key_count(in, a) > key_count(in, b);
  });
  const int64_t count = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next_task{0};

  at::parallel_for(0, task_workers(count), 1, [&](int64_t, int64_t) {
    const int64_t block_q = in.fwd_block_q, rows = in.tile_rows(block_q), ld_s = in.tile_ld(kFwdBlockK);
    AlignedVector<acc_t> q_buf(rows * n.E), k_buf(ld_s * n.E), v_buf(ld_s * n.Ev);
    AlignedVector<acc_t> scores(rows * ld_s), acc(rows * n.Ev);
    AlignedVector<acc_t> row_max_(rows), row_sum(rows);
    for (int64_t t = next_task++; t < count; t = next_task++) {
      const ForwardTask task = tasks[t];
      const Problem& pr = in.problems[task.problem];
      const int64_t b = pr.b, h = task.head, hk = h / group, i0 = task.q0;
      const int64_t nq = std::min(block_q, pr.q_len - i0);
      int64_t ldq;
      const acc_t* Q = as_rows<scalar_t, acc_t>(
          in.q + b * in.sq.b + h * in.sq.h + (pr.q_start + i0) * in.sq.r, in.sq.r, in.sq.c, nq, n.E,
          q_buf.data(), &ldq);
      std::fill(row_max_.begin(), row_max_.begin() + nq, neg_inf);
      std::fill(row_sum.begin(), row_sum.begin() + nq, acc_t(0));

      const int64_t j_begin = in.window.key_begin(i0), j_end = in.window.key_end(i0 + nq, pr.k_len);
      if (j_begin >= j_end) std::fill(acc.begin(), acc.begin() + nq * n.Ev, acc_t(0));
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kFwdBlockK) {
        const bool first_block = j0 == j_begin;  // its P V product initialises the accumulator
        const int64_t nk = std::min(kFwdBlockK, j_end - j0);
        int64_t ldk, ldv;
        const acc_t* K = as_rows<scalar_t, acc_t>(
            in.k + b * in.sk.b + hk * in.sk.h + (pr.k_start + j0) * in.sk.r, in.sk.r, in.sk.c, nk,
            n.E, k_buf.data(), &ldk);
        const acc_t* V = as_rows<scalar_t, acc_t>(
            in.v + b * in.sv.b + hk * in.sv.h + (pr.k_start + j0) * in.sv.r, in.sv.r, in.sv.c, nk,
            n.Ev, v_buf.data(), &ldv);
        gemm<acc_t>(false, true, nq, nk, n.E, score_scale, Q, ldq, K, ldk, acc_t(0), scores.data(), ld_s);
        for (int64_t r = 0; r < nq; ++r) {
          acc_t* s = scores.data() + r * ld_s;
          const int64_t i = i0 + r, gi = pr.q_start + i;
          mask_row(in, s, nk, b, h, i, gi, j0, pr.k_start + j0);
          const acc_t block_max = row_max(s, nk);
          const acc_t new_max = std::max(row_max_[r], block_max);
          if (new_max == neg_inf) {  // nothing visible in this row yet: P = 0
            std::fill(s, s + nk, acc_t(0));
            continue;
          }
          const acc_t block_sum = exp_shift_sum(s, nk, new_max);
          if (row_max_[r] == neg_inf) {  // first visible keys of this row: its accumulator is 0
            row_sum[r] = block_sum;
          } else {
            const acc_t rescale = unit_exp(row_max_[r] - new_max);
            row_sum[r] = row_sum[r] * rescale + block_sum;
            if (rescale != acc_t(1) && !first_block) scale_row(acc.data() + r * n.Ev, n.Ev, rescale);
          }
          row_max_[r] = new_max;
          if (in.rng.active) {
            const uint64_t base = in.element_index(b, h, gi, pr.k_start + j0);
            for (int64_t j = 0; j < nk; ++j) s[j] = in.rng.keep(base + j) ? s[j] * keep_scale : acc_t(0);
          }
        }
        gemm<acc_t>(false, false, nq, n.Ev, nk, acc_t(1), scores.data(), ld_s, V, ldv,
                    first_block ? acc_t(0) : acc_t(1), acc.data(), n.Ev);
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t gi = pr.q_start + i0 + r;
        scalar_t* o = out + b * so.b + h * so.h + gi * so.r;
        const acc_t* a = acc.data() + r * n.Ev;
        float* lse_out = lse + (b * n.Hq + h) * n.L + gi;
        if (row_sum[r] == acc_t(0)) {  // no visible key: output 0, lse -inf
          for (int64_t c = 0; c < n.Ev; ++c) o[c * so.c] = scalar_t(0);
          *lse_out = -std::numeric_limits<float>::infinity();
          continue;
        }
        const acc_t inv = acc_t(1) / row_sum[r];
        if (so.c == 1) {  // always, for the output this op allocates; the loop then vectorises
          for (int64_t c = 0; c < n.Ev; ++c) o[c] = static_cast<scalar_t>(a[c] * inv);
        } else {
          for (int64_t c = 0; c < n.Ev; ++c) o[c * so.c] = static_cast<scalar_t>(a[c] * inv);
        }
        *lse_out = static_cast<float>((row_max_[r] + unit_log(row_sum[r])) / kScoreUnit<acc_t>);
      }
    }
  });
}

// ----------------------------------------------------------------------------------- backward
// The log-sum-exp of every row of one (problem, query head), in acc_t: the forward's score pass
// without the P V product. Q holds the problem's query rows (row-major, leading dim ldq).
template <typename scalar_t, typename acc_t>
void recompute_lse(const Inputs<scalar_t>& in, const Problem& pr, int64_t h, int64_t hk, const acc_t* Q,
                   int64_t ldq, acc_t* lse_out) {
  const Shape& n = in.n;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t block_q = in.fwd_block_q, rows = in.tile_rows(block_q), ld_s = in.tile_ld(kFwdBlockK);
  AlignedVector<acc_t> k_buf(ld_s * n.E), scores(rows * ld_s), mx(rows), sum(rows);
  for (int64_t i0 = 0; i0 < pr.q_len; i0 += block_q) {
    const int64_t nq = std::min(block_q, pr.q_len - i0);
    std::fill(mx.begin(), mx.end(), neg_inf);
    std::fill(sum.begin(), sum.end(), acc_t(0));
    const int64_t j_begin = in.window.key_begin(i0), j_end = in.window.key_end(i0 + nq, pr.k_len);
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kFwdBlockK) {
      const int64_t nk = std::min(kFwdBlockK, j_end - j0);
      int64_t ldk;
      const acc_t* K = as_rows<scalar_t, acc_t>(in.k + pr.b * in.sk.b + hk * in.sk.h + (pr.k_start + j0) * in.sk.r,
                                                in.sk.r, in.sk.c, nk, n.E, k_buf.data(), &ldk);
      gemm<acc_t>(false, true, nq, nk, n.E, static_cast<acc_t>(in.scale) * kScoreUnit<acc_t>, Q + i0 * ldq, ldq, K, ldk, acc_t(0),
                  scores.data(), ld_s);
      for (int64_t r = 0; r < nq; ++r) {
        acc_t* s = scores.data() + r * ld_s;
        mask_row(in, s, nk, pr.b, h, i0 + r, pr.q_start + i0 + r, j0, pr.k_start + j0);
        const acc_t new_max = std::max(mx[r], row_max(s, nk));
        if (new_max == neg_inf) continue;
        const acc_t rescale = mx[r] == neg_inf ? acc_t(0) : unit_exp(mx[r] - new_max);
        sum[r] = sum[r] * rescale + exp_shift_sum(s, nk, new_max);
        mx[r] = new_max;
      }
    }
    for (int64_t r = 0; r < nq; ++r) {
      lse_out[i0 + r] = sum[r] == acc_t(0) ? neg_inf : (mx[r] + unit_log(sum[r])) / kScoreUnit<acc_t>;
    }
  }
}

template <typename scalar_t>
struct BackwardOutputs {
  scalar_t *grad_q, *grad_k, *grad_v, *grad_mask;  // contiguous; grad_mask may be null
};

template <typename scalar_t, typename acc_t>
void backward_kernel(const Inputs<scalar_t>& in, const scalar_t* grad_out, Strides4 sdo,
                     const scalar_t* out, Strides4 so, const float* lse, BackwardOutputs<scalar_t> g) {
  const Shape& n = in.n;
  const int64_t group = n.Hq / n.Hk;
  const int64_t units = static_cast<int64_t>(in.problems.size()) * n.Hk;
  const acc_t scale = static_cast<acc_t>(in.scale);
  const acc_t score_scale = scale * kScoreUnit<acc_t>;  // P is recomputed in score units
  const acc_t keep_scale = static_cast<acc_t>(in.keep_scale);
  // Contiguous gradient layouts: (B, H, rows, cols).
  const Strides4 sgq{n.Hq * n.L * n.E, n.L * n.E, n.E, 1};
  const Strides4 sgk{n.Hk * n.S * n.E, n.S * n.E, n.E, 1};
  const Strides4 sgv{n.Hk * n.S * n.Ev, n.S * n.Ev, n.Ev, 1};
  // Fewer (sequence, kv head) units than threads (one long head, say): each unit's key blocks are
  // dealt out to `parts` work items. A part owns the dK/dV rows of
  // its keys and a private dQ partial sum; the partial sums are added afterwards in part order, so
  // the result is still reproducible (for a given thread count) and nothing is written twice.
  const int64_t threads = at::get_num_threads();
  const int64_t parts = units > 0 && units < threads ? (threads + units - 1) / units : 1;
  const int64_t items = units * parts;
  std::vector<AlignedVector<acc_t>> dq_parts(parts > 1 ? items : 0);
  // Longer key blocks only where nothing is wasted on a window's edge, and where a unit is not
  // split into parts (a part needs key blocks of its own).
  const bool unbounded = in.window.left < 0 && in.window.right < 0;
  const int64_t block_k = unbounded && parts == 1 ? kBwdBlockK : kBwdBlockKWindowed;
  constexpr int64_t kExactSoftmaxMaxKeys = 128;
  const int64_t rows = in.tile_rows(kBwdBlockQ), ld_s = in.tile_ld(block_k);

  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, task_workers(items), 1, [&](int64_t, int64_t) {
    AlignedVector<acc_t> k_buf(ld_s * n.E), v_buf(ld_s * n.Ev);
    AlignedVector<acc_t> probs(rows * ld_s), dropped(in.rng.active ? rows * ld_s : 0);
    AlignedVector<acc_t> dscores(rows * ld_s);
    AlignedVector<acc_t> dk(ld_s * n.E), dv(ld_s * n.Ev);
    AlignedVector<acc_t> q_buf, do_buf, dq, delta, row_lse;
    for (int64_t w = next_item++; w < items; w = next_item++) {
      const int64_t u = w / parts, part = w % parts;
      const Problem& pr = in.problems[u / n.Hk];
      const int64_t b = pr.b, hk = u % n.Hk, h0 = hk * group, ql = pr.q_len;
      // The group's queries and output gradients for the whole sequence (converted once), the
      // D = rowsum(dO * O) pre-pass, and the dQ accumulator: all O(L) per head.
      q_buf.resize(group * ql * n.E);
      do_buf.resize(group * ql * n.Ev);
      AlignedVector<acc_t>& dq_acc = parts > 1 ? dq_parts[w] : dq;
      dq_acc.assign(group * ql * n.E, acc_t(0));
      delta.resize(group * ql);
      std::vector<const acc_t*> Q(group), dO(group);
      std::vector<int64_t> ldq(group), lddo(group);
      for (int64_t gh = 0; gh < group; ++gh) {
        const int64_t h = h0 + gh;
        Q[gh] = as_rows<scalar_t, acc_t>(in.q + b * in.sq.b + h * in.sq.h + pr.q_start * in.sq.r,
                                         in.sq.r, in.sq.c, ql, n.E, q_buf.data() + gh * ql * n.E,
                                         &ldq[gh]);
        dO[gh] = as_rows<scalar_t, acc_t>(grad_out + b * sdo.b + h * sdo.h + pr.q_start * sdo.r,
                                          sdo.r, sdo.c, ql, n.Ev, do_buf.data() + gh * ql * n.Ev,
                                          &lddo[gh]);
        for (int64_t i = 0; i < ql; ++i) {
          const scalar_t* o = out + b * so.b + h * so.h + (pr.q_start + i) * so.r;
          const acc_t* d = dO[gh] + i * lddo[gh];
          acc_t sum = 0;
          for (int64_t c = 0; c < n.Ev; ++c) sum += d[c] * static_cast<acc_t>(o[c * so.c]);
          delta[gh * ql + i] = sum;
        }
      }

      // The log-sum-exp each row's probabilities are recomputed from. float32 (what the forward
      // stores) is exact enough for float32/bfloat16 tiles; a float64 call, the precision reference
      // and gradcheck dtype, recomputes it in float64 (one extra Q K^T pass).
      row_lse.resize(group * ql);
      for (int64_t gh = 0; gh < group; ++gh) {
        const int64_t h = h0 + gh;
        if constexpr (std::is_same_v<acc_t, double>) {
          recompute_lse(in, pr, h, hk, Q[gh], ldq[gh], row_lse.data() + gh * ql);
        } else {
          for (int64_t i = 0; i < ql; ++i) row_lse[gh * ql + i] = lse[(b * n.Hq + h) * n.L + pr.q_start + i];
        }
      }

      // Part p takes key blocks p, p + parts, ...: interleaved, so that a causal mask (early keys
      // seen by more queries) does not load one part more than another.
      // Short rows whose keys all sit in one block: P and D are then formed from the block alone,
      // as stock's softmax backward forms them (see D below). Only for short rows: there the
      // rounding of the lse-based P and the pre-pass D is a visible share of the gradients (one
      // key: exactly zero in stock, ~1e-6 otherwise), and the extra row passes cost little; at
      // 512 keys they cost ~10% of the backward (B=8 H=8 L=512 D=64, 2 threads).
      const bool single_key_block = pr.k_len <= std::min(block_k, kExactSoftmaxMaxKeys);
      for (int64_t j0 = part * block_k; j0 < pr.k_len; j0 += parts * block_k) {
        const int64_t nk = std::min(block_k, pr.k_len - j0), gj0 = pr.k_start + j0;
        int64_t ldk, ldv;
        const acc_t* K = as_rows<scalar_t, acc_t>(in.k + b * in.sk.b + hk * in.sk.h + gj0 * in.sk.r,
                                                  in.sk.r, in.sk.c, nk, n.E, k_buf.data(), &ldk);
        const acc_t* V = as_rows<scalar_t, acc_t>(in.v + b * in.sv.b + hk * in.sv.h + gj0 * in.sv.r,
                                                  in.sv.r, in.sv.c, nk, n.Ev, v_buf.data(), &ldv);
        std::fill(dk.begin(), dk.begin() + nk * n.E, acc_t(0));
        std::fill(dv.begin(), dv.begin() + nk * n.Ev, acc_t(0));
        const int64_t i_begin = in.window.query_begin(j0), i_end = in.window.query_end(j0 + nk, ql);
        for (int64_t gh = 0; gh < group; ++gh) {
          const int64_t h = h0 + gh;
          for (int64_t i0 = i_begin; i0 < i_end; i0 += kBwdBlockQ) {
            const int64_t nq = std::min(kBwdBlockQ, i_end - i0);
            const acc_t* Qb = Q[gh] + i0 * ldq[gh];
            const acc_t* dOb = dO[gh] + i0 * lddo[gh];
            gemm<acc_t>(false, true, nq, nk, n.E, score_scale, Qb, ldq[gh], K, ldk, acc_t(0), probs.data(), ld_s);
            for (int64_t r = 0; r < nq; ++r) {
              acc_t* p = probs.data() + r * ld_s;
              const int64_t i = i0 + r, gi = pr.q_start + i;
              mask_row(in, p, nk, b, h, i, gi, j0, gj0);
              const acc_t this_lse = row_lse[gh * ql + i];
              if (this_lse == -std::numeric_limits<acc_t>::infinity()) {
                std::fill(p, p + nk, acc_t(0));
              } else if (single_key_block) {
                // All of the row's keys are here: its softmax as stock computes it (max, exp, sum,
                // normalise), so P, dP and D below round together (see D).
                const acc_t row_sum = exp_shift_sum(p, nk, row_max(p, nk));
                scale_row(p, nk, acc_t(1) / row_sum);
              } else {
                exp_shift(p, nk, this_lse * kScoreUnit<acc_t>);
              }
              if (in.rng.active) {
                acc_t* pd = dropped.data() + r * ld_s;
                const uint64_t base = in.element_index(b, h, gi, gj0);
                for (int64_t j = 0; j < nk; ++j) pd[j] = in.rng.keep(base + j) ? p[j] * keep_scale : acc_t(0);
              }
            }
            const acc_t* P_dropped = in.rng.active ? dropped.data() : probs.data();
            // dV += P_dropped^T dO ; dP = dO V^T
            gemm<acc_t>(true, false, nk, n.Ev, nq, acc_t(1), P_dropped, ld_s, dOb, lddo[gh],
                        acc_t(1), dv.data(), n.Ev);
            gemm<acc_t>(false, true, nq, nk, n.Ev, acc_t(1), dOb, lddo[gh], V, ldv, acc_t(0),
                        dscores.data(), ld_s);
            for (int64_t r = 0; r < nq; ++r) {
              acc_t* ds = dscores.data() + r * ld_s;
              // D = rowsum(dO * O) equals sum_j P_dropped dP over the row's keys. When this block
              // holds all of them, take that form: dS then rounds consistently with dP, so it is
              // exactly zero where it should be (one key: P = 1, dP = D), as in stock's softmax
              // backward; the pre-pass's D, rounded differently, left dQ/dK off by an ulp of
              // |dO| |v| there (hypothesis sweep, S = 1: dK 3e-6 where stock's is 0).
              acc_t d = delta[gh * ql + i0 + r];
              if (single_key_block) d = row_dot(P_dropped + r * ld_s, ds, nk);
              softmax_grad(probs.data() + r * ld_s, P_dropped + r * ld_s, ds, nk, d);
              if (g.grad_mask != nullptr) {
                scalar_t* gm = g.grad_mask + ((b * n.Hq + h) * n.L + pr.q_start + i0 + r) * n.S + gj0;
                for (int64_t j = 0; j < nk; ++j) gm[j] = static_cast<scalar_t>(ds[j]);
              }
            }
            // dK += scale dS^T Q ; dQ += scale dS K
            gemm<acc_t>(true, false, nk, n.E, nq, scale, dscores.data(), ld_s, Qb, ldq[gh],
                        acc_t(1), dk.data(), n.E);
            gemm<acc_t>(false, false, nq, n.E, nk, scale, dscores.data(), ld_s, K, ldk,
                        acc_t(1), dq_acc.data() + (gh * ql + i0) * n.E, n.E);
          }
        }
        for (int64_t r = 0; r < nk; ++r) {
          scalar_t* gk = g.grad_k + b * sgk.b + hk * sgk.h + (gj0 + r) * sgk.r;
          scalar_t* gv = g.grad_v + b * sgv.b + hk * sgv.h + (gj0 + r) * sgv.r;
          for (int64_t c = 0; c < n.E; ++c) gk[c] = static_cast<scalar_t>(dk[r * n.E + c]);
          for (int64_t c = 0; c < n.Ev; ++c) gv[c] = static_cast<scalar_t>(dv[r * n.Ev + c]);
        }
      }
      if (parts > 1) continue;  // summed below
      for (int64_t gh = 0; gh < group; ++gh) {
        for (int64_t i = 0; i < ql; ++i) {
          scalar_t* gq = g.grad_q + b * sgq.b + (h0 + gh) * sgq.h + (pr.q_start + i) * sgq.r;
          const acc_t* src = dq.data() + (gh * ql + i) * n.E;
          for (int64_t c = 0; c < n.E; ++c) gq[c] = static_cast<scalar_t>(src[c]);
        }
      }
    }
  });
  if (parts == 1) return;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const Problem& pr = in.problems[u / n.Hk];
      const int64_t b = pr.b, h0 = (u % n.Hk) * group, ql = pr.q_len;
      AlignedVector<acc_t>& total = dq_parts[u * parts];
      for (int64_t part = 1; part < parts; ++part) {
        const AlignedVector<acc_t>& partial = dq_parts[u * parts + part];
        for (size_t x = 0; x < total.size(); ++x) total[x] += partial[x];
      }
      for (int64_t gh = 0; gh < group; ++gh) {
        for (int64_t i = 0; i < ql; ++i) {
          scalar_t* gq = g.grad_q + b * sgq.b + (h0 + gh) * sgq.h + (pr.q_start + i) * sgq.r;
          const acc_t* src = total.data() + (gh * ql + i) * n.E;
          for (int64_t c = 0; c < n.E; ++c) gq[c] = static_cast<scalar_t>(src[c]);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------- argument handling
void check_dtype(const at::Tensor& t, const char* name, const at::Tensor& query) {
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), "bigkernels::attention: ", name,
              " must have the dtype of query (", query.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "bigkernels::attention CPU kernel: ", name,
              " must be a CPU tensor, got one on ", t.device());
}

std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total) {
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "bigkernels::attention: ", name,
              " must be a 1-D tensor of length num_sequences + 1, got shape ", cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, "bigkernels::attention: ",
              name, " must be int32 (or int64), got ", cu.scalar_type());
  const at::Tensor c = cu.to(at::kLong).contiguous();
  std::vector<int64_t> v(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  TORCH_CHECK(v.front() == 0, "bigkernels::attention: ", name, "[0] must be 0, got ", v.front());
  for (size_t i = 1; i < v.size(); ++i) {
    TORCH_CHECK(v[i] >= v[i - 1], "bigkernels::attention: ", name, " must be non-decreasing");
  }
  TORCH_CHECK(v.back() == total, "bigkernels::attention: ", name,
              "[-1] must equal the packed length ", total, ", got ", v.back());
  return v;
}

// Validates the arguments shared by forward and backward and fills everything but the pointers.
template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask,
                             const std::optional<at::Tensor>& cu_q,
                             const std::optional<at::Tensor>& cu_k, double scale, int64_t left,
                             int64_t right, double dropout_p, const std::optional<at::Tensor>& seed) {
  Inputs<scalar_t> in;
  in.n = {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  in.q = q.const_data_ptr<scalar_t>();
  in.k = k.const_data_ptr<scalar_t>();
  in.v = v.const_data_ptr<scalar_t>();
  in.sq = strides_of(q);
  in.sk = strides_of(k);
  in.sv = strides_of(v);
  in.mask = nullptr;
  in.sm = {0, 0, 0, 0};
  if (mask.has_value()) {
    in.mask = mask->const_data_ptr<scalar_t>();
    in.sm = strides_of(*mask);
  }
  in.scale = scale;
  in.window = {left, right};
  if (dropout_p > 0.0) {
    const at::Tensor s = seed->to(at::kLong).contiguous();
    in.rng = DropoutRng(s.data_ptr<int64_t>()[0], s.data_ptr<int64_t>()[1], dropout_p);
    in.keep_scale = 1.0 / (1.0 - dropout_p);
  } else {
    in.keep_scale = 1.0;
  }
  if (cu_q.has_value()) {
    const auto sq = read_cu_seqlens(*cu_q, "cu_seqlens_q", in.n.L);
    const auto sk = read_cu_seqlens(*cu_k, "cu_seqlens_k", in.n.S);
    TORCH_CHECK(sq.size() == sk.size(), "bigkernels::attention: cu_seqlens_q and cu_seqlens_k must have the same length, got ",
                sq.size(), " and ", sk.size());
    for (size_t s = 0; s + 1 < sq.size(); ++s) {
      in.problems.push_back({0, sq[s], sq[s + 1] - sq[s], sk[s], sk[s + 1] - sk[s]});
    }
  } else {
    for (int64_t b = 0; b < in.n.B; ++b) in.problems.push_back({b, 0, in.n.L, 0, in.n.S});
  }
  in.longest_q = in.longest_k = 0;
  for (const Problem& pr : in.problems) {
    in.longest_q = std::max(in.longest_q, pr.q_len);
    in.longest_k = std::max(in.longest_k, pr.k_len);
  }
  const bool windowed = left >= 0 || right >= 0;
  in.fwd_block_q = windowed && in.longest_k <= kShortCausalKeys ? kFwdBlockQShortCausal : kFwdBlockQ;
  return in;
}

void check_arguments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                     const std::optional<at::Tensor>& cu_k, int64_t left, int64_t right,
                     double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(q.dim() == 4, "bigkernels::attention: query must be 4-D (B, Hq, L, E), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 4, "bigkernels::attention: key must be 4-D (B, Hk, S, E), got ", k.dim(), "-D");
  TORCH_CHECK(v.dim() == 4, "bigkernels::attention: value must be 4-D (B, Hk, S, Ev), got ", v.dim(), "-D");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "bigkernels::attention on CPU supports float32, float64, bfloat16 and float16, got ", dt);
  check_dtype(q, "query", q);
  check_dtype(k, "key", q);
  check_dtype(v, "value", q);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              "bigkernels::attention: query, key and value must have the same batch size, got ",
              q.size(0), ", ", k.size(0), ", ", v.size(0));
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "bigkernels::attention: key and value must have the same number of heads Hk, dividing "
              "the query's Hq; got Hq = ", q.size(1), ", key heads ", k.size(1), ", value heads ", v.size(1));
  TORCH_CHECK(k.size(2) == v.size(2), "bigkernels::attention: key and value must have the same length S, got ",
              k.size(2), " and ", v.size(2));
  TORCH_CHECK(k.size(3) == q.size(3), "bigkernels::attention: key must have the query's head dim E = ",
              q.size(3), ", got ", k.size(3));
  TORCH_CHECK(q.size(3) >= 1 && v.size(3) >= 1, "bigkernels::attention: head dims must be >= 1, got E = ",
              q.size(3), ", Ev = ", v.size(3));
  TORCH_CHECK(left >= -1 && right >= -1, "bigkernels::attention: window bounds must be >= -1 (-1 = unbounded), got (",
              left, ", ", right, ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "bigkernels::attention: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->numel() == 2 && seed->device().is_cpu(),
                "bigkernels::attention: dropout_p > 0 needs dropout_seed, a CPU int64 tensor of shape (2,)");
  }
  if (mask.has_value()) {
    check_dtype(*mask, "attn_mask", q);
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == q.size(0) && mask->size(1) == q.size(1) &&
                    mask->size(2) == q.size(2) && mask->size(3) == k.size(2),
                "bigkernels::attention: attn_mask must have shape (B, Hq, L, S) = (", q.size(0), ", ",
                q.size(1), ", ", q.size(2), ", ", k.size(2), "), got ", mask->sizes());
  }
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(),
              "bigkernels::attention: cu_seqlens_q and cu_seqlens_k must be given together");
  if (cu_q.has_value()) {
    TORCH_CHECK(q.size(0) == 1, "bigkernels::attention: varlen (cu_seqlens) needs batch size 1, got ", q.size(0));
    TORCH_CHECK(!mask.has_value(), "bigkernels::attention: attn_mask is not supported with cu_seqlens");
  }
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t /*max_seqlen_q*/, int64_t /*max_seqlen_k*/,
    double scale, int64_t window_left, int64_t window_right, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  check_arguments(query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k, window_left,
                  window_right, dropout_p, dropout_seed);
  const int64_t B = query.size(0), Hq = query.size(1), L = query.size(2), Ev = value.size(3);
  // (B, L, Hq, Ev) memory seen as (B, Hq, L, Ev): merging the heads afterwards is a free view.
  at::Tensor output = at::empty({B, L, Hq, Ev}, query.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, Hq, L}, query.options().dtype(at::kFloat));
  if (output.numel() == 0) return {output, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "bigkernels_attention", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto in = make_inputs<scalar_t>(query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                          scale, window_left, window_right, dropout_p, dropout_seed);
    forward_kernel<scalar_t, acc_t>(in, output.mutable_data_ptr<scalar_t>(), strides_of(output),
                                    lse.mutable_data_ptr<float>());
  });
  return {output, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& lse,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t /*max_seqlen_q*/,
    int64_t /*max_seqlen_k*/, double scale, int64_t window_left, int64_t window_right,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, bool need_grad_mask) {
  check_arguments(query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k, window_left,
                  window_right, dropout_p, dropout_seed);
  const int64_t B = query.size(0), Hq = query.size(1), L = query.size(2), S = key.size(2);
  const int64_t Ev = value.size(3);
  check_dtype(grad_output, "grad_output", query);
  check_dtype(output, "output", query);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == B && grad_output.size(1) == Hq &&
                  grad_output.size(2) == L && grad_output.size(3) == Ev,
              "bigkernels::attention_backward: grad_output must have the output's shape (B, Hq, L, Ev), got ",
              grad_output.sizes());
  TORCH_CHECK(output.sizes() == grad_output.sizes(),
              "bigkernels::attention_backward: output must have shape (B, Hq, L, Ev), got ", output.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == B &&
                  lse.size(1) == Hq && lse.size(2) == L,
              "bigkernels::attention_backward: lse must be float32 of shape (B, Hq, L), got ",
              lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(!need_grad_mask || attn_mask.has_value(),
              "bigkernels::attention_backward: need_grad_mask without an attn_mask");
  at::Tensor grad_query = at::empty(query.sizes(), query.options());
  at::Tensor grad_key = at::empty(key.sizes(), key.options());
  at::Tensor grad_value = at::empty(value.sizes(), value.options());
  // Zeros: blocks outside the window are never visited, and their gradient is 0.
  at::Tensor grad_mask = need_grad_mask ? at::zeros({B, Hq, L, S}, query.options())
                                        : at::empty({0}, query.options());
  if (grad_query.numel() == 0 && grad_key.numel() == 0 && grad_value.numel() == 0) {
    return {grad_query, grad_key, grad_value, grad_mask};
  }
  const at::Tensor lse_c = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "bigkernels_attention_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto in = make_inputs<scalar_t>(query, key, value, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                          scale, window_left, window_right, dropout_p, dropout_seed);
    BackwardOutputs<scalar_t> g{grad_query.mutable_data_ptr<scalar_t>(), grad_key.mutable_data_ptr<scalar_t>(),
                                grad_value.mutable_data_ptr<scalar_t>(),
                                need_grad_mask ? grad_mask.mutable_data_ptr<scalar_t>() : nullptr};
    backward_kernel<scalar_t, acc_t>(in, grad_output.const_data_ptr<scalar_t>(), strides_of(grad_output),
                                     output.const_data_ptr<scalar_t>(), strides_of(output),
                                     lse_c.const_data_ptr<float>(), g);
  });
  return {grad_query, grad_key, grad_value, grad_mask};
}

at::Tensor attention_dropout_mask_cpu(const at::Tensor& seed, int64_t B, int64_t H, int64_t L,
                                      int64_t S, double p) {
  TORCH_CHECK(seed.numel() == 2, "bigkernels::attention_dropout_mask: seed must have 2 elements, got ", seed.numel());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "bigkernels::attention_dropout_mask: p must be in [0, 1), got ", p);
  at::Tensor keep = at::empty({B, H, L, S}, seed.options().dtype(at::kBool));
  const at::Tensor s = seed.to(at::kLong).contiguous();
  const DropoutRng rng(s.data_ptr<int64_t>()[0], s.data_ptr<int64_t>()[1], p);
  bool* dst = keep.mutable_data_ptr<bool>();
  at::parallel_for(0, B * H * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t j = 0; j < S; ++j) {
        const uint64_t idx = static_cast<uint64_t>(row) * S + j;
        dst[idx] = rng.keep(idx);
      }
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_dropout_mask", &attention_dropout_mask_cpu);
}

}  // namespace bigkernels::cpu
