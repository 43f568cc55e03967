// Fused LSTM cell pointwise kernels on CUDA: the work of bigkernels::lstm_cell and its backward
// that follows the gate GEMMs (the GEMMs themselves run in cuBLAS, see lstm_cell_binding.cpp).
// No torch headers here (see kernels.h); the semantics are those of csrc/cpu/lstm_cell.cpp.
//
// Forward:  one pass adds both biases, applies sigmoid/tanh, updates c and h and (for training)
//           stores the activated gates.
// Backward: one pass turns (grad_hy, grad_cy) into the pre-activation gate gradients and grad_cx,
//           and sums the gate gradients over the batch for the bias gradient on the way, so the
//           [B, 4H] gradient is never read again. That sum is deterministic without atomics: each
//           thread adds its rows in order, each block reduces its threads in a fixed tree into one
//           row of partial sums, and a small second kernel adds those rows in order. The order
//           depends only on (B, H, dtype), never on timing or pointer alignment.
//
// Thread layout (both passes): a 2-D block, x across hidden units (VEC consecutive units per thread,
// one 16-byte load per tensor when sizes and pointers allow), y across batch rows. Each thread owns
// its hidden units for rows row0, row0 + blockDim.y, ..., rows_per_thread of them, so for the
// forward the four gate biases are loaded once per thread and kept in registers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels.h"

namespace bigkernels::cuda {
namespace {

// ------------------------------------------------------------------------------ launch parameters
// A multiple of the warp size small enough that several blocks fit per SM at the register counts
// these kernels need (see tools/check_cuda_build.py); also the size of the bias-reduction tree.
constexpr int kThreadsPerBlock = 256;
// At most one warp across the hidden units: a warp then reads 32 consecutive 16-byte vectors of a
// row (fully coalesced), and every block keeps >= 8 threads along the batch to reduce in-block.
constexpr int kMaxColumnThreads = 32;
// About one wave of resident threads on an H100 (132 SMs x 2048): beyond that, threads walk more
// rows rather than the grid growing, which also amortises the per-thread bias loads.
constexpr int64_t kTargetThreads = int64_t{1} << 18;
// With the bias gradient, each block writes one row of 4H partial sums that the second kernel reads
// back; covering >= 32 batch rows per block keeps that traffic under ~4% of the pass's own.
constexpr int64_t kMinRowsPerPartial = 32;
// Widest vector load/store (LDG.128 / STG.128).
constexpr int kVectorBytes = 16;
// Bias-gradient finalize kernel: a warp reads 32 consecutive partial sums (one 128-byte line), and
// 8 warps per block split the partial rows so that narrow layers (small 4H) still get parallelism.
constexpr int kFinalizeColumns = 32;
constexpr int kFinalizeSlices = 8;

// ------------------------------------------------------------------------------ element types
// Arithmetic type: float for float/half/bfloat16 storage, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Units per 16-byte vector: float 4, double 2, half/bfloat16 8.
template <typename T>
constexpr int kMaxVec = kVectorBytes / static_cast<int>(sizeof(T));

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even conversions, as torch's own casts.
__device__ __forceinline__ void store_acc(float& dst, float x) { dst = x; }
__device__ __forceinline__ void store_acc(double& dst, double x) { dst = x; }
__device__ __forceinline__ void store_acc(__half& dst, float x) { dst = __float2half_rn(x); }
__device__ __forceinline__ void store_acc(__nv_bfloat16& dst, float x) { dst = __float2bfloat16_rn(x); }

// Accurate libm-style functions (the build uses no --use_fast_math): results are compared against
// stock torch's CUDA cell, which also uses exp and tanh in the arithmetic type.
//
// float sigmoid: 1 / d with d = 1 + e^-x, as the hardware reciprocal refined by one Newton step
// (within 1 ulp of the IEEE quotient). The IEEE division itself calls an out-of-line slow path
// whose saved registers ptxas reports as spills. e^-x is capped at e^88 so that d stays finite
// (1/inf would make the Newton step 0 * inf = NaN); the true sigmoid there is < 1e-38 anyway, and
// NaN still propagates because the comparison is false for it.
__device__ __forceinline__ float sigmoid(float x) {
  const float z = -x > 88.0f ? 88.0f : -x;
  const float d = 1.0f + expf(z);
  const float r = __fdividef(1.0f, d);
  return fmaf(r, fmaf(-d, r, 1.0f), r);
}
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

// Plain rounded add: keeps the compiler from fusing a gradient's last multiply into the bias sum,
// so the bias gradient is exactly the sum of the gate gradients as computed.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// N consecutive elements moved as one aligned access (the caller guarantees the alignment).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, acc_t<T> (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_acc(pack.v[k]);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const acc_t<T> (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) store_acc(pack.v[k], in[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// ------------------------------------------------------------------------------ kernels
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    lstm_cell_forward_kernel(const T* __restrict__ gates, const T* __restrict__ b_ih,
                             const T* __restrict__ b_hh, const T* __restrict__ cx,
                             T* __restrict__ hy, T* __restrict__ cy, T* __restrict__ workspace,
                             int64_t B, int64_t H, int rows_per_thread) {
  using A = acc_t<T>;
  const int64_t j = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (j >= H) return;  // no block-wide synchronisation in this kernel, so leaving early is safe

  // Both biases summed once in the arithmetic type (as the CPU kernel does), zeros without biases.
  A bias[4][VEC];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (b_ih != nullptr) {
      A bi[VEC], bh[VEC];
      load_vec<VEC>(b_ih + q * H + j, bi);
      load_vec<VEC>(b_hh + q * H + j, bh);
#pragma unroll
      for (int k = 0; k < VEC; ++k) bias[q][k] = bi[k] + bh[k];
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) bias[q][k] = A(0);
    }
  }

  int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y * rows_per_thread + threadIdx.y;
  for (int r = 0; r < rows_per_thread && row < B; ++r, row += blockDim.y) {
    const int64_t g0 = row * 4 * H + j;  // gate block q of this row starts at g0 + q * H
    const int64_t s0 = row * H + j;
    A pre[4][VEC], c0[VEC];
#pragma unroll
    for (int q = 0; q < 4; ++q) load_vec<VEC>(gates + g0 + q * H, pre[q]);
    load_vec<VEC>(cx + s0, c0);

    A act[4][VEC], h1[VEC], c1[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      act[0][k] = sigmoid(pre[0][k] + bias[0][k]);
      act[1][k] = sigmoid(pre[1][k] + bias[1][k]);
      act[2][k] = tanh_acc(pre[2][k] + bias[2][k]);
      act[3][k] = sigmoid(pre[3][k] + bias[3][k]);
      c1[k] = act[1][k] * c0[k] + act[0][k] * act[2][k];
      h1[k] = act[3][k] * tanh_acc(c1[k]);
    }
    store_vec<VEC>(cy + s0, c1);
    store_vec<VEC>(hy + s0, h1);
    if (workspace != nullptr) {
#pragma unroll
      for (int q = 0; q < 4; ++q) store_vec<VEC>(workspace + g0 + q * H, act[q]);
    }
  }
}

// bias_partials, when not null, is [gridDim.x, 4H]: row blockIdx.x receives this block's sums.
// minBlocksPerSM = 1: without it ptxas for sm_100 squeezed the float VEC=4 instance into 64
// registers and spilled (tools/check_cuda_build.py); its natural ~80 still fits several blocks an SM.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    lstm_cell_backward_kernel(const T* __restrict__ grad_hy, const T* __restrict__ grad_cy,
                              const T* __restrict__ cx, const T* __restrict__ cy,
                              const T* __restrict__ workspace, T* __restrict__ grad_gates,
                              T* __restrict__ grad_cx, acc_t<T>* __restrict__ bias_partials,
                              int64_t B, int64_t H, int rows_per_thread) {
  using A = acc_t<T>;
  const int64_t j = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  // Threads past the last hidden unit stay alive: they take part in the block reduction below.
  const bool owns_columns = j < H;

  A bias_sum[4][VEC];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) bias_sum[q][k] = A(0);
  }

  int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y * rows_per_thread + threadIdx.y;
  for (int r = 0; owns_columns && r < rows_per_thread && row < B; ++r, row += blockDim.y) {
    const int64_t g0 = row * 4 * H + j;
    const int64_t s0 = row * H + j;
    A gate[4][VEC], dh[VEC], dc[VEC], c0[VEC], c1[VEC];
#pragma unroll
    for (int q = 0; q < 4; ++q) load_vec<VEC>(workspace + g0 + q * H, gate[q]);
    load_vec<VEC>(grad_hy + s0, dh);
    load_vec<VEC>(grad_cy + s0, dc);
    load_vec<VEC>(cx + s0, c0);
    load_vec<VEC>(cy + s0, c1);

    A grad[4][VEC], dcx[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A i = gate[0][k], f = gate[1][k], g = gate[2][k], o = gate[3][k];
      const A tc = tanh_acc(c1[k]);
      const A dcell = dc[k] + dh[k] * o * (A(1) - tc * tc);
      grad[0][k] = dcell * g * i * (A(1) - i);
      grad[1][k] = dcell * c0[k] * f * (A(1) - f);
      grad[2][k] = dcell * i * (A(1) - g * g);
      grad[3][k] = dh[k] * tc * o * (A(1) - o);
      dcx[k] = dcell * f;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) store_vec<VEC>(grad_gates + g0 + q * H, grad[q]);
    store_vec<VEC>(grad_cx + s0, dcx);
    if (bias_partials != nullptr) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) bias_sum[q][k] = add_rn(bias_sum[q][k], grad[q][k]);
      }
    }
  }

  if (bias_partials == nullptr) return;  // uniform over the grid: no thread waits at a barrier
  // Fixed-order tree over threadIdx.y (blockDim.y is a power of two), one gate block at a time.
  // Layout [k][thread] so that consecutive threads touch consecutive words (no bank conflicts).
  __shared__ A column_sums[VEC][kThreadsPerBlock];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) column_sums[k][tid] = bias_sum[q][k];
    __syncthreads();
    for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
      if (threadIdx.y < stride) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          column_sums[k][tid] += column_sums[k][tid + stride * blockDim.x];
        }
      }
      __syncthreads();
    }
    if (threadIdx.y == 0 && owns_columns) {
      A* out = bias_partials + static_cast<int64_t>(blockIdx.x) * 4 * H + q * H + j;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = column_sums[k][tid];
    }
    __syncthreads();  // the next gate block overwrites column_sums
  }
}

// grad_bias[c] = sum over p of partials[p, c]; zeros when num_partials == 0 (B == 0). A block takes
// kFinalizeColumns columns; its threadIdx.y-th slice adds rows p = y, y + kFinalizeSlices, ... in
// order, then thread y == 0 adds the slices in order: fixed order, several loads in flight per column.
template <typename T>
__global__ void __launch_bounds__(kFinalizeColumns * kFinalizeSlices)
    lstm_cell_bias_grad_kernel(const acc_t<T>* __restrict__ partials, int64_t num_partials,
                               int64_t n, T* __restrict__ grad_bias) {
  using A = acc_t<T>;
  __shared__ A slice_sums[kFinalizeSlices][kFinalizeColumns];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalizeColumns + threadIdx.x;
  A sum = A(0);
  if (c < n) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < num_partials; p += kFinalizeSlices) sum += partials[p * n + c];
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    A total = A(0);
#pragma unroll
    for (int y = 0; y < kFinalizeSlices; ++y) total += slice_sums[y][threadIdx.x];
    store_acc(grad_bias[c], total);
  }
}

// ------------------------------------------------------------------------------ launch planning
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int next_pow2(int64_t x) {
  int p = 1;
  while (p < x && p < kThreadsPerBlock) p *= 2;
  return p;
}

// Block shape and row split for a [B, H] problem. Computed from (B, H, dtype) only, not from the
// vector width actually used, so the bias-gradient summation order never depends on alignment.
struct Plan {
  int column_threads;   // blockDim.x
  int row_threads;      // blockDim.y
  int rows_per_thread;  // rows each thread walks
  int64_t row_blocks;   // gridDim.x; also the number of bias partial rows
};

template <typename T>
Plan make_plan(int64_t B, int64_t H, bool reduce_bias) {
  Plan p;
  const int64_t units = ceil_div(H, kMaxVec<T>);  // vector units per row at full width
  p.column_threads = std::min(kMaxColumnThreads, next_pow2(units));
  p.row_threads = kThreadsPerBlock / p.column_threads;
  int64_t rows = std::max<int64_t>(1, ceil_div(B * units, kTargetThreads));
  if (reduce_bias) rows = std::max(rows, ceil_div(kMinRowsPerPartial, p.row_threads));
  rows = std::min<int64_t>(rows, std::max<int64_t>(B, 1));  // more than B rows is pointless
  p.rows_per_thread = static_cast<int>(std::min<int64_t>(rows, INT_MAX));
  p.row_blocks = ceil_div(B, static_cast<int64_t>(p.row_threads) * p.rows_per_thread);
  return p;
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; }

// Full-width vectors need H to be a multiple of the vector and every base pointer 16-byte aligned
// (then every row and gate block is too); otherwise one element per access.
template <typename T>
bool use_full_vectors(int64_t H, std::initializer_list<const void*> pointers) {
  if (H % kMaxVec<T> != 0) return false;
  for (const void* p : pointers) {
    if (p != nullptr && !aligned(p)) return false;
  }
  return true;
}

// Grid for a plan and vector width; false when the problem exceeds CUDA's grid limits.
bool make_grid(const Plan& p, int64_t H, int vec, dim3& grid, dim3& block) {
  const int64_t column_blocks = ceil_div(ceil_div(H, vec), p.column_threads);
  if (p.row_blocks > INT_MAX || column_blocks > 65535) return false;
  grid = dim3(static_cast<unsigned>(p.row_blocks), static_cast<unsigned>(column_blocks));
  block = dim3(p.column_threads, p.row_threads);
  return true;
}

template <typename T>
cudaError_t forward(const T* gates, const T* b_ih, const T* b_hh, const T* cx, T* hy, T* cy,
                    T* workspace, int64_t B, int64_t H, cudaStream_t stream) {
  if (B == 0 || H == 0) return cudaSuccess;
  if ((b_ih == nullptr) != (b_hh == nullptr)) return cudaErrorInvalidValue;
  const Plan plan = make_plan<T>(B, H, /*reduce_bias=*/false);
  const bool full = use_full_vectors<T>(H, {gates, b_ih, b_hh, cx, hy, cy, workspace});
  dim3 grid, block;
  if (!make_grid(plan, H, full ? kMaxVec<T> : 1, grid, block)) return cudaErrorInvalidConfiguration;
  if (full) {
    lstm_cell_forward_kernel<T, kMaxVec<T>><<<grid, block, 0, stream>>>(
        gates, b_ih, b_hh, cx, hy, cy, workspace, B, H, plan.rows_per_thread);
  } else {
    lstm_cell_forward_kernel<T, 1><<<grid, block, 0, stream>>>(
        gates, b_ih, b_hh, cx, hy, cy, workspace, B, H, plan.rows_per_thread);
  }
  return cudaGetLastError();
}

template <typename T>
size_t backward_scratch_bytes(int64_t B, int64_t H, bool need_bias_grad) {
  if (!need_bias_grad || B == 0 || H == 0) return 0;
  const Plan plan = make_plan<T>(B, H, /*reduce_bias=*/true);
  return static_cast<size_t>(plan.row_blocks) * 4 * H * sizeof(acc_t<T>);
}

template <typename T>
cudaError_t backward(const T* grad_hy, const T* grad_cy, const T* cx, const T* cy,
                     const T* workspace, T* grad_gates, T* grad_cx, T* grad_bias, void* scratch,
                     int64_t B, int64_t H, cudaStream_t stream) {
  using A = acc_t<T>;
  if (H == 0) return cudaSuccess;
  const bool need_bias = grad_bias != nullptr;
  if (need_bias && scratch == nullptr && backward_scratch_bytes<T>(B, H, true) > 0) {
    return cudaErrorInvalidValue;
  }
  const Plan plan = make_plan<T>(B, H, need_bias);
  A* partials = need_bias ? static_cast<A*>(scratch) : nullptr;
  if (B > 0) {
    const bool full =
        use_full_vectors<T>(H, {grad_hy, grad_cy, cx, cy, workspace, grad_gates, grad_cx});
    dim3 grid, block;
    if (!make_grid(plan, H, full ? kMaxVec<T> : 1, grid, block)) {
      return cudaErrorInvalidConfiguration;
    }
    if (full) {
      lstm_cell_backward_kernel<T, kMaxVec<T>><<<grid, block, 0, stream>>>(
          grad_hy, grad_cy, cx, cy, workspace, grad_gates, grad_cx, partials, B, H,
          plan.rows_per_thread);
    } else {
      lstm_cell_backward_kernel<T, 1><<<grid, block, 0, stream>>>(
          grad_hy, grad_cy, cx, cy, workspace, grad_gates, grad_cx, partials, B, H,
          plan.rows_per_thread);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (need_bias) {
    const int64_t n = 4 * H;
    const int64_t num_partials = B > 0 ? plan.row_blocks : 0;
    const dim3 grid(static_cast<unsigned>(ceil_div(n, kFinalizeColumns)));
    const dim3 block(kFinalizeColumns, kFinalizeSlices);
    lstm_cell_bias_grad_kernel<T><<<grid, block, 0, stream>>>(partials, num_partials, n, grad_bias);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

// Calls fn with a null pointer of the storage type for `dtype` (a type tag), or returns `invalid`.
template <typename R, typename Fn>
R dispatch(DType dtype, R invalid, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16: return fn(static_cast<__half*>(nullptr));
    case DType::kBFloat16: return fn(static_cast<__nv_bfloat16*>(nullptr));
    case DType::kFloat32: return fn(static_cast<float*>(nullptr));
    case DType::kFloat64: return fn(static_cast<double*>(nullptr));
  }
  return invalid;
}

}  // namespace

// ------------------------------------------------------------------------------ public launchers
cudaError_t lstm_cell_forward(DType dtype, const void* gates, const void* b_ih, const void* b_hh,
                              const void* cx, void* hy, void* cy, void* workspace, int64_t B,
                              int64_t H, cudaStream_t stream) {
  return dispatch(dtype, cudaErrorInvalidValue, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return forward<T>(static_cast<const T*>(gates), static_cast<const T*>(b_ih),
                      static_cast<const T*>(b_hh), static_cast<const T*>(cx),
                      static_cast<T*>(hy), static_cast<T*>(cy), static_cast<T*>(workspace), B, H,
                      stream);
  });
}

size_t lstm_cell_backward_scratch_bytes(DType dtype, int64_t B, int64_t H, bool need_bias_grad) {
  return dispatch(dtype, size_t{0}, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return backward_scratch_bytes<T>(B, H, need_bias_grad);
  });
}

cudaError_t lstm_cell_backward(DType dtype, const void* grad_hy, const void* grad_cy,
                               const void* cx, const void* cy, const void* workspace,
                               void* grad_gates, void* grad_cx, void* grad_bias, void* scratch,
                               int64_t B, int64_t H, cudaStream_t stream) {
  return dispatch(dtype, cudaErrorInvalidValue, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return backward<T>(static_cast<const T*>(grad_hy), static_cast<const T*>(grad_cy),
                       static_cast<const T*>(cx), static_cast<const T*>(cy),
                       static_cast<const T*>(workspace), static_cast<T*>(grad_gates),
                       static_cast<T*>(grad_cx), static_cast<T*>(grad_bias), scratch, B, H, stream);
  });
}

}  // namespace bigkernels::cuda
