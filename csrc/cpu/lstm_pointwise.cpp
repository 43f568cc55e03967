// The fused pointwise passes of the LSTM on the CPU (declared in lstm_pointwise.h).
//
// One pass over [n, 4H] gates replaces the ~10 separate elementwise ATen ops that the stock cell
// runs after its GEMMs. The loops are vectorised (fast_math.h) and built for several instruction
// sets; work is split with at::parallel_for only when it is large enough to pay for the threads.
#include "lstm_pointwise.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "fast_math.h"

namespace bigkernels::cpu {
namespace {

// Build each hot loop for several instruction sets and pick at load time (GCC/Clang on x86-64 ELF):
// the wheel stays runnable on any x86-64 CPU and still uses AVX2/AVX-512 where present.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(__clang__)
#define BK_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BK_MULTIVERSION
#endif

// Kernels see storage types: float, double, or uint16_t holding bfloat16 bits (see fast_math.h).
// Arithmetic type: float for float/bfloat16 storage, double for double.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename scalar_t>
using storage_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, uint16_t, scalar_t>;

template <typename scalar_t>
storage_t<scalar_t>* raw(scalar_t* p) {
  return reinterpret_cast<storage_t<scalar_t>*>(p);
}
template <typename scalar_t>
const storage_t<scalar_t>* raw(const scalar_t* p) {
  return reinterpret_cast<const storage_t<scalar_t>*>(p);
}

// Elements per parallel task: below this, waking threads costs more than it saves.
constexpr int64_t kPointwiseGrain = 16384;

// The activations: division-free for float (sigmoid_newton, tanh_newton: a 512-bit vdivps has a
// throughput of one per ~10 cycles on Sapphire Rapids' one divider port, and the forward divides
// five times per unit), libm for double.
// Measured on the generic layer path (T = 64, hidden 1024, 2 threads, fp32 inference): the
// pointwise passes took 42 ms of a 760 ms call at batch 256 with sigmoid_fast/tanh_fast.
BK_ALWAYS_INLINE float sigmoid_act(float x) { return sigmoid_newton(x); }
BK_ALWAYS_INLINE float tanh_act(float x) { return tanh_newton(x); }
BK_ALWAYS_INLINE double sigmoid_act(double x) { return sigmoid_fast(x); }
BK_ALWAYS_INLINE double tanh_act(double x) { return tanh_fast(x); }

template <bool kHasBias, bool kWriteWorkspace, typename T>
BK_ALWAYS_INLINE void forward_segment(const T* __restrict__ gates, const T* __restrict__ b_ih,
                                      const T* __restrict__ b_hh, const T* __restrict__ cx,
                                      T* __restrict__ hy, T* __restrict__ cy,
                                      T* __restrict__ workspace, int64_t H, int64_t j0, int64_t j1) {
  using A = acc_t<T>;
  // Bias and workspace are template flags so that no condition sits inside the vectorised loop.
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    A pi = load_acc(gates[j]), pf = load_acc(gates[H + j]), pg = load_acc(gates[2 * H + j]),
      po = load_acc(gates[3 * H + j]);
    if constexpr (kHasBias) {
      pi += load_acc(b_ih[j]) + load_acc(b_hh[j]);
      pf += load_acc(b_ih[H + j]) + load_acc(b_hh[H + j]);
      pg += load_acc(b_ih[2 * H + j]) + load_acc(b_hh[2 * H + j]);
      po += load_acc(b_ih[3 * H + j]) + load_acc(b_hh[3 * H + j]);
    }
    const A i = sigmoid_act(pi), f = sigmoid_act(pf), g = tanh_act(pg), o = sigmoid_act(po);
    const A c = f * load_acc(cx[j]) + i * g;
    cy[j] = store_as<T>(c);
    hy[j] = store_as<T>(o * tanh_act(c));
    if constexpr (kWriteWorkspace) {
      workspace[j] = store_as<T>(i);
      workspace[H + j] = store_as<T>(f);
      workspace[2 * H + j] = store_as<T>(g);
      workspace[3 * H + j] = store_as<T>(o);
    }
  }
}

// The four instantiations of forward_segment, chosen by the (loop-invariant) null pointers.
template <typename T>
BK_ALWAYS_INLINE void forward_segment_dispatch(const T* g, const T* b_ih, const T* b_hh,
                                               const T* cx, T* hy, T* cy, T* ws, int64_t H,
                                               int64_t j0, int64_t j1) {
  if (b_ih && ws) forward_segment<true, true, T>(g, b_ih, b_hh, cx, hy, cy, ws, H, j0, j1);
  else if (b_ih) forward_segment<true, false, T>(g, b_ih, b_hh, cx, hy, cy, ws, H, j0, j1);
  else if (ws) forward_segment<false, true, T>(g, b_ih, b_hh, cx, hy, cy, ws, H, j0, j1);
  else forward_segment<false, false, T>(g, b_ih, b_hh, cx, hy, cy, ws, H, j0, j1);
}

template <bool kBiasGrad, typename T>
BK_ALWAYS_INLINE void backward_segment(const T* __restrict__ grad_hy, const T* __restrict__ grad_cy,
                             const T* __restrict__ cx, const T* __restrict__ cy,
                             const T* __restrict__ workspace, T* __restrict__ grad_gates,
                             T* __restrict__ grad_cx, acc_t<T>* __restrict__ bias_acc, int64_t H,
                             int64_t j0, int64_t j1) {
  using A = acc_t<T>;
  const int64_t n = j1 - j0;
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const A i = load_acc(workspace[j]), f = load_acc(workspace[H + j]), g = load_acc(workspace[2 * H + j]),
            o = load_acc(workspace[3 * H + j]);
    const A tc = tanh_act(load_acc(cy[j]));
    const A dh = load_acc(grad_hy[j]);
    const A dc = load_acc(grad_cy[j]) + dh * o * (A(1) - tc * tc);
    const A di = dc * g * i * (A(1) - i);
    const A df = dc * load_acc(cx[j]) * f * (A(1) - f);
    const A dg = dc * i * (A(1) - g * g);
    const A dout = dh * tc * o * (A(1) - o);
    grad_gates[j] = store_as<T>(di);
    grad_gates[H + j] = store_as<T>(df);
    grad_gates[2 * H + j] = store_as<T>(dg);
    grad_gates[3 * H + j] = store_as<T>(dout);
    grad_cx[j] = store_as<T>(dc * f);
    if constexpr (kBiasGrad) {
      const int64_t k = j - j0;
      bias_acc[k] += di;
      bias_acc[n + k] += df;
      bias_acc[2 * n + k] += dg;
      bias_acc[3 * n + k] += dout;
    }
  }
}

// Non-template entry points, so that target_clones applies (it does not take templates).
#define BK_DEFINE_SEGMENT_KERNELS(T, suffix)                                                     \
  BK_MULTIVERSION void forward_segment_##suffix(const T* g, const T* b_ih, const T* b_hh,       \
                                                const T* cx, T* hy, T* cy, T* ws, int64_t H,    \
                                                int64_t j0, int64_t j1) {                        \
    forward_segment_dispatch<T>(g, b_ih, b_hh, cx, hy, cy, ws, H, j0, j1);                      \
  }                                                                                              \
  BK_MULTIVERSION void backward_segment_##suffix(const T* dh, const T* dc, const T* cx,         \
                                                 const T* cy, const T* ws, T* dg, T* dcx,       \
                                                 acc_t<T>* db, int64_t H, int64_t j0,           \
                                                 int64_t j1) {                                   \
    if (db) backward_segment<true, T>(dh, dc, cx, cy, ws, dg, dcx, db, H, j0, j1);               \
    else backward_segment<false, T>(dh, dc, cx, cy, ws, dg, dcx, db, H, j0, j1);                 \
  }
BK_DEFINE_SEGMENT_KERNELS(float, f32)
BK_DEFINE_SEGMENT_KERNELS(uint16_t, bf16)
#undef BK_DEFINE_SEGMENT_KERNELS

// double is the reference/gradcheck dtype: libm math, no need for several ISAs.
void forward_segment_f64(const double* g, const double* b_ih, const double* b_hh,
                         const double* cx, double* hy, double* cy, double* ws, int64_t H,
                         int64_t j0, int64_t j1) {
  forward_segment_dispatch<double>(g, b_ih, b_hh, cx, hy, cy, ws, H, j0, j1);
}
void backward_segment_f64(const double* dh, const double* dc, const double* cx, const double* cy,
                          const double* ws, double* dg, double* dcx, double* db, int64_t H,
                          int64_t j0, int64_t j1) {
  if (db) backward_segment<true, double>(dh, dc, cx, cy, ws, dg, dcx, db, H, j0, j1);
  else backward_segment<false, double>(dh, dc, cx, cy, ws, dg, dcx, db, H, j0, j1);
}

inline void forward_segment_any(const float* g, const float* b_ih, const float* b_hh,
                                const float* cx, float* hy, float* cy, float* ws, int64_t H,
                                int64_t j0, int64_t j1) {
  forward_segment_f32(g, b_ih, b_hh, cx, hy, cy, ws, H, j0, j1);
}
inline void forward_segment_any(const uint16_t* g, const uint16_t* b_ih, const uint16_t* b_hh,
                                const uint16_t* cx, uint16_t* hy, uint16_t* cy, uint16_t* ws,
                                int64_t H, int64_t j0, int64_t j1) {
  forward_segment_bf16(g, b_ih, b_hh, cx, hy, cy, ws, H, j0, j1);
}
inline void forward_segment_any(const double* g, const double* b_ih, const double* b_hh,
                                const double* cx, double* hy, double* cy, double* ws, int64_t H,
                                int64_t j0, int64_t j1) {
  forward_segment_f64(g, b_ih, b_hh, cx, hy, cy, ws, H, j0, j1);
}
inline void backward_segment_any(const float* dh, const float* dc, const float* cx,
                                 const float* cy, const float* ws, float* dg, float* dcx,
                                 float* db, int64_t H, int64_t j0, int64_t j1) {
  backward_segment_f32(dh, dc, cx, cy, ws, dg, dcx, db, H, j0, j1);
}
inline void backward_segment_any(const uint16_t* dh, const uint16_t* dc, const uint16_t* cx,
                                 const uint16_t* cy, const uint16_t* ws, uint16_t* dg,
                                 uint16_t* dcx, float* db, int64_t H, int64_t j0, int64_t j1) {
  backward_segment_bf16(dh, dc, cx, cy, ws, dg, dcx, db, H, j0, j1);
}
inline void backward_segment_any(const double* dh, const double* dc, const double* cx,
                                 const double* cy, const double* ws, double* dg, double* dcx,
                                 double* db, int64_t H, int64_t j0, int64_t j1) {
  backward_segment_f64(dh, dc, cx, cy, ws, dg, dcx, db, H, j0, j1);
}

}  // namespace

void lstm_pointwise_forward(const at::Tensor& gates, const at::Tensor& b_ih, const at::Tensor& b_hh,
                            const at::Tensor& cx, const at::Tensor& hy, const at::Tensor& cy,
                            const at::Tensor& workspace) {
  const int64_t B = cx.size(0), H = cx.size(1);
  for (const at::Tensor* t : {&gates, &cx, &hy, &cy}) TORCH_INTERNAL_ASSERT(t->is_contiguous());
  TORCH_INTERNAL_ASSERT(!workspace.defined() || workspace.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gates.scalar_type(), "lstm_pointwise_forward", [&] {
    // Both biases are read in the hot loop (two loads per gate element): cheaper at small batch
    // than a separate pass that sums them, and free at large batch where the GEMM dominates.
    const scalar_t* bi = b_ih.defined() ? b_ih.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bh = b_hh.defined() ? b_hh.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = gates.const_data_ptr<scalar_t>();
    const scalar_t* c0 = cx.const_data_ptr<scalar_t>();
    scalar_t* h1 = hy.mutable_data_ptr<scalar_t>();
    scalar_t* c1 = cy.mutable_data_ptr<scalar_t>();
    scalar_t* ws = workspace.defined() ? workspace.mutable_data_ptr<scalar_t>() : nullptr;
    // Flat range over [B, H]; each task walks the row segments it covers.
    at::parallel_for(0, B * H, kPointwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end;) {
        const int64_t b = idx / H, j0 = idx % H, j1 = std::min(H, j0 + (end - idx));
        forward_segment_any(raw(g + b * 4 * H), bi ? raw(bi) : nullptr, bh ? raw(bh) : nullptr,
                            raw(c0 + b * H), raw(h1 + b * H),
                            raw(c1 + b * H), ws ? raw(ws + b * 4 * H) : nullptr, H, j0, j1);
        idx += j1 - j0;
      }
    });
  });
}

void lstm_pointwise_backward(const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                             const at::Tensor& cx, const at::Tensor& cy,
                             const at::Tensor& workspace, const at::Tensor& grad_gates,
                             const at::Tensor& grad_cx, const at::Tensor& grad_bias) {
  const int64_t B = cx.size(0), H = cx.size(1);
  const bool need_bias = grad_bias.defined();
  for (const at::Tensor* t : {&grad_hy, &grad_cy, &cx, &cy, &workspace, &grad_gates, &grad_cx}) {
    TORCH_INTERNAL_ASSERT(t->is_contiguous());
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_gates.scalar_type(), "lstm_pointwise_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* dh_p = grad_hy.const_data_ptr<scalar_t>();
    const scalar_t* dc_p = grad_cy.const_data_ptr<scalar_t>();
    const scalar_t* c0_p = cx.const_data_ptr<scalar_t>();
    const scalar_t* c1_p = cy.const_data_ptr<scalar_t>();
    const scalar_t* ws_p = workspace.const_data_ptr<scalar_t>();
    scalar_t* dg_p = grad_gates.mutable_data_ptr<scalar_t>();
    scalar_t* dcx_p = grad_cx.mutable_data_ptr<scalar_t>();
    scalar_t* db_p = need_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
    // Parallel over hidden columns, all rows per task: each task owns its columns' bias sums, so
    // the reduction over the batch needs no atomics and is deterministic.
    const int64_t grain = std::max<int64_t>(1, kPointwiseGrain / std::max<int64_t>(B, 1));
    at::parallel_for(0, H, grain, [&](int64_t j0, int64_t j1) {
      const int64_t n = j1 - j0;
      std::vector<A> bias_acc(need_bias ? 4 * n : 0, A(0));
      A* acc = need_bias ? bias_acc.data() : nullptr;
      for (int64_t b = 0; b < B; ++b) {
        backward_segment_any(raw(dh_p + b * H), raw(dc_p + b * H), raw(c0_p + b * H),
                             raw(c1_p + b * H), raw(ws_p + b * 4 * H), raw(dg_p + b * 4 * H),
                             raw(dcx_p + b * H), acc, H, j0, j1);
      }
      if (need_bias) {
        for (int64_t q = 0; q < 4; ++q) {
          for (int64_t k = 0; k < n; ++k) db_p[q * H + j0 + k] = scalar_t(acc[q * n + k]);
        }
      }
    });
  });

}

}  // namespace bigkernels::cpu
