// Persistent recurrent LSTM forward: one cooperative launch runs every timestep of one layer and
// direction, with the recurrent weights held in registers across all SMs and a grid-wide barrier
// between timesteps. No torch headers here (see kernels.h).
//
// STATUS: EXPERIMENTAL, NEVER RUN ON A GPU. It compiles without spills (tools/check_cuda_build.py),
// and the kernel body, run on the CPU with pthreads standing in for CUDA threads and barriers,
// matched a float64 reference (float32 error ~1e-7) with no data race under ThreadSanitizer. The
// bigkernels::lstm CUDA binding calls it only when BIGKERNELS_EXPERIMENTAL_LSTM_PERSISTENT=1 is
// set. Before any default path uses it, validate on a GPU:
//   1. Numerics against the per-step path (csrc/cuda/lstm_binding.cpp) and the float64 reference,
//      by the DESIGN.md rule, for float32 / float16 / bfloat16, forward and reverse, H in
//      {1, 7, 8, 63, 129, 256, 512, 1000, 1024} and B in {1, 3, 8, 9, 16, 33}, T in {1, 2, 64};
//      outputs, h_n, c_n and the saved gates/cells (the per-step backward consumes them).
//      float16/bfloat16 will not match the per-step path bit for bit. Both round the input
//      projection `pre` (x_t @ w_ih^T + b_ih + b_hh, one GEMM whose output is in the storage type);
//      here the recurrent product h_{t-1} @ w_hh^T and its sum with `pre` stay float (the per-step
//      path rounds its GEMM's output), and c stays float across steps (stored rounded only in
//      c_n / cells).
//   2. No hang and no race: compute-sanitizer --tool racecheck / synccheck / memcheck / initcheck
//      on small and the largest fitting sizes; repeated runs give bit-identical results.
//   3. lstm_persistent_forward_supported agrees with what actually launches (co-residency,
//      opt-in shared memory) on each target (A100 108 SMs, H100 132 SMs); a refused size must
//      come back as cudaErrorNotSupported, never as a failed or hung launch.
//   4. It is faster than the per-step path where it says it fits (the issue's batch <= 16
//      regime); if not for some (B, H), narrow the fit test before enabling it there.
//   5. Behaviour under CUDA graphs / torch.compile capture (cooperative launches can be captured,
//      but check) and with other work on the stream (it needs every block resident at once).
//
// Work split. Block g owns kUnits consecutive hidden units j0 = g * kUnits ... and hence the 4 *
// kUnits gate rows of w_hh [4H, H] for them (lane l of every warp: gate l / kUnits, unit
// l % kUnits). Warp w owns the K slice k in [w * KPT, (w + 1) * KPT), so each thread keeps KPT
// weights of one row in registers for the whole sequence. Each step:
//   - the block copies h_{t-1} [B, H] (from global memory, written by every block in the previous
//     step) into shared memory as float;
//   - per batch tile of BT rows, each thread accumulates its row's dot products over its K slice
//     for the BT rows. All lanes of a warp read the same h element at the same time (a shared
//     memory broadcast), so the only per-step traffic is h itself;
//   - the 8 warps' partial sums meet in shared memory; kUnits * BT threads add them in a fixed
//     order, add the precomputed input projection (biases included), apply the gates and update
//     c (kept in shared memory as float for the whole sequence: a block owns its units' c) and h;
//   - grid-wide barrier (cooperative groups), so that the next step sees every block's h.
// Summation order is fixed (k ascending within a warp, then warps in order): deterministic.
//
// Fit: H <= kWarps * 128 (KPT <= 128 weights per thread), ceil(H / kUnits) blocks all resident at
// once (one per SM at this register count), and h [B, H] as float (at least the 33 KB start-up
// weight staging area) plus the partial sums and c in the opt-in shared memory of one block
// (B <= ~50 at H = 1024 on an H100). float64 is not supported (register file too small).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <set>
#include <type_traits>
#include <utility>

#include "kernels.h"

namespace bigkernels::cuda {
namespace {

namespace cg = cooperative_groups;

// ------------------------------------------------------------------------------ launch parameters
// 8 warps: enough to split K eight ways (so a thread holds at most 128 weights in registers at
// H = 1024) while one block per SM still has the whole register file to itself.
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Hidden units per block: one warp's 32 lanes cover the 4 gate rows of 8 units.
constexpr int kUnits = 8;
// Largest K slice per thread; KPT is 32, 64 or 128 (the smallest that covers H / kWarps).
constexpr int kMaxKpt = 128;
// Loads in flight per thread while copying h_{t-1} into shared memory: the copy is L2-latency
// bound (every block reads all of h each step), so many independent loads must be outstanding.
constexpr int kStageLoads = 16;
// Weight columns staged per round at start-up (a warp's 32 rows x 32 columns, one column per lane).
constexpr int kWeightChunk = 32;
// Row stride of the partial-sum buffer: 40 floats puts the 4 x 8 (batch, unit) readers of one
// warp on 32 distinct banks.
constexpr int kPartialStride = 40;

// ------------------------------------------------------------------------------ element types
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Same activations as csrc/cuda/lstm_cell.cu (accurate expf/tanhf, sigmoid through the hardware
// reciprocal plus one Newton step; see the comment there).
__device__ __forceinline__ float sigmoid(float x) {
  const float z = -x > 88.0f ? 88.0f : -x;
  const float d = 1.0f + expf(z);
  const float r = __fdividef(1.0f, d);
  return fmaf(r, fmaf(-d, r, 1.0f), r);
}

template <typename T>
struct Params {
  const T* pre;    // [steps * B, 4H]: x_t @ w_ih^T + b_ih + b_hh, row t * B + b
  const T* w_hh;   // [4H, H]
  const T* h0;     // [B, H]
  const T* c0;     // [B, H]
  T* output;       // [steps * B, H]: h of every step
  T* h_n;          // [B, H]
  T* c_n;          // [B, H]
  T* gates;        // [steps * B, 4H] activated i, f, g, o, or null
  T* cells;        // [steps * B, H] c of every step, or null
  int64_t steps, B, H;
  int64_t batch_stride;  // BS: rows of the shared h buffer, B rounded up to the batch tile
  bool reverse;
};

// Shared memory, in floats: h [BS][kWarps * KPT] (first the weight staging area, which it must
// hold), then partial sums [kWarps * BT][kPartialStride], then c [kUnits][BS].
__host__ __device__ constexpr int64_t h_region_floats(int64_t BS, int KPT) {
  return BS * kWarps * KPT > kWarps * 32 * (kWeightChunk + 1) ? BS * kWarps * KPT
                                                               : kWarps * 32 * (kWeightChunk + 1);
}

template <int KPT, int BT>
size_t shared_bytes(int64_t BS) {
  return sizeof(float) * static_cast<size_t>(h_region_floats(BS, KPT) +
                                             int64_t{kWarps} * BT * kPartialStride +
                                             int64_t{kUnits} * BS);
}

template <typename T, int KPT, int BT>
__global__ void __launch_bounds__(kThreads, 1) lstm_persistent_forward_kernel(const Params<T> p) {
  constexpr int HP = kWarps * KPT;  // padded K extent of the shared h rows
  constexpr int NK = HP / kThreads;  // columns of h each thread copies per row
  constexpr int kStageRows = kStageLoads / NK > 0 ? kStageLoads / NK : 1;
  static_assert(HP % kThreads == 0, "KPT must be a multiple of 32");
  extern __shared__ float4 shared_raw[];
  float* hs = reinterpret_cast<float*>(shared_raw);
  float* partial = hs + h_region_floats(p.batch_stride, KPT);
  float* cs = partial + kWarps * BT * kPartialStride;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t B = p.B, H = p.H, BS = p.batch_stride;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kUnits;

  // This thread's weights: row (gate lane / kUnits, unit j0 + lane % kUnits), K slice of its warp;
  // zeros past the last unit or column. Staged through shared memory (warp-private, hs reused)
  // kWeightChunk columns at a time: the global loads are coalesced, and ptxas never has more than
  // one chunk of loads in flight (128 direct 16-bit loads per thread made it run out of registers).
  float w[KPT];
  {
    float* stage = hs + warp * 32 * (kWeightChunk + 1);
#pragma unroll
    for (int c = 0; c < KPT; c += kWeightChunk) {
      const int64_t k = static_cast<int64_t>(warp) * KPT + c + lane;  // lane = column here
#pragma unroll 8
      for (int r = 0; r < 32; ++r) {
        const int64_t j = j0 + r % kUnits;
        const int64_t row = (r / kUnits) * H + j;
        stage[r * (kWeightChunk + 1) + lane] = (j < H && k < H) ? to_float(p.w_hh[row * H + k]) : 0.0f;
      }
      __syncwarp();
#pragma unroll
      for (int i = 0; i < kWeightChunk; ++i) w[c + i] = stage[lane * (kWeightChunk + 1) + i];
      __syncwarp();  // the next chunk overwrites stage
    }
  }
  __syncthreads();  // hs is h from here on

  // Padding (k >= H, b >= B) must hold finite values: zero weights times NaN would still be NaN.
  for (int64_t i = tid; i < BS * HP; i += kThreads) hs[i] = 0.0f;
  for (int64_t i = tid; i < kUnits * BS; i += kThreads) {
    const int64_t u = i / BS, b = i % BS, j = j0 + u;
    cs[i] = (b < B && j < H) ? to_float(p.c0[b * H + j]) : 0.0f;
  }
  __syncthreads();

  cg::grid_group grid = cg::this_grid();
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    const int64_t t_prev = p.reverse ? t + 1 : t - 1;
    // h_{t-1}: written by every block during the previous step, visible after the grid barrier.
    // __ldcg reads it from L2 (never a stale L1 line, never the read-only path).
    // Thread tid copies columns k = tid + n * kThreads (n < NK) of kStageRows rows per round,
    // writing zeros where k >= H (the padding stays zero).
    const T* h_src = s == 0 ? p.h0 : p.output + t_prev * B * H;
    for (int64_t r0 = 0; r0 < B; r0 += kStageRows) {
      float v[kStageRows][NK];
#pragma unroll
      for (int r = 0; r < kStageRows; ++r) {
#pragma unroll
        for (int n = 0; n < NK; ++n) {
          const int64_t b = r0 + r, k = tid + n * kThreads;
          v[r][n] = (b < B && k < H) ? to_float(__ldcg(h_src + b * H + k)) : 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < kStageRows; ++r) {
#pragma unroll
        for (int n = 0; n < NK; ++n) {
          if (r0 + r < B) hs[(r0 + r) * HP + tid + n * kThreads] = v[r][n];
        }
      }
    }
    __syncthreads();

    for (int64_t b0 = 0; b0 < B; b0 += BT) {
      // The pointwise threads (u, bb) fetch their input projections now, so that the global
      // load's latency hides behind the dot products.
      const bool pointwise = tid < kUnits * BT;
      const int u = tid % kUnits, bb_own = tid / kUnits;
      const int64_t b_own = b0 + bb_own, j_own = j0 + u;
      const bool owns = pointwise && b_own < B && j_own < H;
      const int64_t row = t * B + b_own;
      float pre[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) pre[q] = owns ? to_float(p.pre[row * 4 * H + q * H + j_own]) : 0.0f;

      float acc[BT];
#pragma unroll
      for (int bb = 0; bb < BT; ++bb) acc[bb] = 0.0f;
      const float* h_tile = hs + b0 * HP + warp * KPT;
#pragma unroll
      for (int i = 0; i < KPT; i += 4) {
#pragma unroll
        for (int bb = 0; bb < BT; ++bb) {
          // Same address in every lane of the warp: one broadcast per 4 k.
          const float4 h4 = *reinterpret_cast<const float4*>(h_tile + bb * HP + i);
          acc[bb] = fmaf(w[i], h4.x, acc[bb]);
          acc[bb] = fmaf(w[i + 1], h4.y, acc[bb]);
          acc[bb] = fmaf(w[i + 2], h4.z, acc[bb]);
          acc[bb] = fmaf(w[i + 3], h4.w, acc[bb]);
        }
      }
#pragma unroll
      for (int bb = 0; bb < BT; ++bb) partial[(warp * BT + bb) * kPartialStride + lane] = acc[bb];
      __syncthreads();

      if (owns) {
        const int64_t b = b_own, j = j_own;
        float act[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float rec = 0.0f;
#pragma unroll
          for (int ww = 0; ww < kWarps; ++ww) {
            rec += partial[(ww * BT + bb_own) * kPartialStride + q * kUnits + u];
          }
          const float sum = pre[q] + rec;
          act[q] = q == 2 ? tanhf(sum) : sigmoid(sum);
        }
        float& c = cs[u * BS + b];
        const float c1 = act[1] * c + act[0] * act[2];
        const float h1 = act[3] * tanhf(c1);
        c = c1;
        p.output[row * H + j] = from_float<T>(h1);
        if (p.cells != nullptr) p.cells[row * H + j] = from_float<T>(c1);
        if (p.gates != nullptr) {
#pragma unroll
          for (int q = 0; q < 4; ++q) p.gates[row * 4 * H + q * H + j] = from_float<T>(act[q]);
        }
        if (s == p.steps - 1) {
          p.h_n[b * H + j] = from_float<T>(h1);
          p.c_n[b * H + j] = from_float<T>(c1);
        }
      }
      __syncthreads();  // partial is rewritten by the next tile, hs by the next step
    }
    if (s + 1 < p.steps) grid.sync();
  }
}

// ------------------------------------------------------------------------------ launch planning
int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

int kpt_for(int64_t H) {
  const int64_t per_warp = (H + kWarps - 1) / kWarps;
  return per_warp <= 32 ? 32 : per_warp <= 64 ? 64 : per_warp <= kMaxKpt ? kMaxKpt : 0;
}

int batch_tile_for(int64_t B) { return B <= 1 ? 1 : B <= 2 ? 2 : B <= 4 ? 4 : 8; }

// Calls fn(kernel, shared_bytes) with the kernel instance for (T, KPT, BT) and its shared-memory
// size function (of BS).
template <typename T, typename Fn>
cudaError_t with_kernel(int kpt, int bt, Fn&& fn) {
  auto pick_bt = [&](auto kpt_tag) -> cudaError_t {
    constexpr int K = decltype(kpt_tag)::value;
    switch (bt) {
      case 1: return fn(lstm_persistent_forward_kernel<T, K, 1>, shared_bytes<K, 1>);
      case 2: return fn(lstm_persistent_forward_kernel<T, K, 2>, shared_bytes<K, 2>);
      case 4: return fn(lstm_persistent_forward_kernel<T, K, 4>, shared_bytes<K, 4>);
      case 8: return fn(lstm_persistent_forward_kernel<T, K, 8>, shared_bytes<K, 8>);
    }
    return cudaErrorNotSupported;
  };
  switch (kpt) {
    case 32: return pick_bt(std::integral_constant<int, 32>{});
    case 64: return pick_bt(std::integral_constant<int, 64>{});
    case kMaxKpt: return pick_bt(std::integral_constant<int, kMaxKpt>{});
  }
  return cudaErrorNotSupported;
}

// Opts `kernel` in to the device's whole opt-in shared memory, once per (kernel, device). Setting the
// limit per call to that call's size would race between host threads: another thread could lower
// it between this thread's set and its launch, which then fails. The maximum suits every launch.
template <typename Kernel>
cudaError_t allow_max_shared_memory(Kernel kernel, int device, int smem_optin) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key)) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin);
  if (err == cudaSuccess) done.insert(key);
  return err;
}

// cudaSuccess when (B, H) fits on the current device (and its kernel may use the shared memory it
// needs there), cudaErrorNotSupported when it does not, another error when a query fails.
template <typename T>
cudaError_t prepare(int64_t B, int64_t H, int* blocks_out, size_t* smem_out) {
  const int kpt = kpt_for(H);
  if (kpt == 0 || B < 1 || H < 1) return cudaErrorNotSupported;
  const int bt = batch_tile_for(B);
  const int64_t BS = round_up(B, bt);
  const int64_t blocks = (H + kUnits - 1) / kUnits;
  int device = 0, sms = 0, coop = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err != cudaSuccess) return err;
  if (!coop || blocks > sms) return cudaErrorNotSupported;
  return with_kernel<T>(kpt, bt, [&](auto kernel, auto bytes_for) -> cudaError_t {
    const size_t smem = bytes_for(BS);
    if (smem > static_cast<size_t>(smem_optin)) return cudaErrorNotSupported;
    cudaError_t e = allow_max_shared_memory(kernel, device, smem_optin);
    if (e != cudaSuccess) return e;
    int per_sm = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
    if (e != cudaSuccess) return e;
    if (static_cast<int64_t>(per_sm) * sms < blocks) return cudaErrorNotSupported;
    *blocks_out = static_cast<int>(blocks);
    *smem_out = smem;
    return cudaSuccess;
  });
}

// After prepare<T>(p.B, p.H, &blocks, &smem) succeeded on the current device.
template <typename T>
cudaError_t launch(const Params<T>& p, int blocks, size_t smem, cudaStream_t stream) {
  Params<T> params = p;
  params.batch_stride = round_up(p.B, batch_tile_for(p.B));
  void* args[] = {&params};
  return with_kernel<T>(kpt_for(p.H), batch_tile_for(p.B), [&](auto kernel, auto) {
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(blocks),
                                       dim3(kThreads), args, smem, stream);
  });
}

// Calls fn with a null pointer of the storage type for `dtype`; float64 is not supported.
template <typename Fn>
cudaError_t dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16: return fn(static_cast<__half*>(nullptr));
    case DType::kBFloat16: return fn(static_cast<__nv_bfloat16*>(nullptr));
    case DType::kFloat32: return fn(static_cast<float*>(nullptr));
    case DType::kFloat64: return cudaErrorNotSupported;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// ------------------------------------------------------------------------------ public launchers
cudaError_t lstm_persistent_forward_supported(DType dtype, int64_t B, int64_t H) {
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    int blocks = 0;
    size_t smem = 0;
    return prepare<T>(B, H, &blocks, &smem);
  });
}

cudaError_t lstm_persistent_forward(DType dtype, const void* pre, const void* w_hh, const void* h0,
                                    const void* c0, void* output, void* h_n, void* c_n,
                                    void* gates, void* cells, int64_t steps, int64_t B, int64_t H,
                                    bool reverse, cudaStream_t stream) {
  return dispatch(dtype, [&](auto* tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    // Refuse before the empty cases so that the answer depends on (dtype, B, H) only.
    int blocks = 0;
    size_t smem = 0;
    cudaError_t err = prepare<T>(B, H, &blocks, &smem);
    if (err != cudaSuccess) return err;
    if (steps == 0) {
      const size_t bytes = static_cast<size_t>(B * H) * sizeof(T);
      err = cudaMemcpyAsync(h_n, h0, bytes, cudaMemcpyDeviceToDevice, stream);
      if (err == cudaSuccess) err = cudaMemcpyAsync(c_n, c0, bytes, cudaMemcpyDeviceToDevice, stream);
      return err;
    }
    Params<T> p{static_cast<const T*>(pre), static_cast<const T*>(w_hh), static_cast<const T*>(h0),
                static_cast<const T*>(c0), static_cast<T*>(output), static_cast<T*>(h_n),
                static_cast<T*>(c_n), static_cast<T*>(gates), static_cast<T*>(cells),
                steps, B, H, /*batch_stride=*/0, reverse};
    return launch<T>(p, blocks, smem, stream);
  });
}

}  // namespace bigkernels::cuda
