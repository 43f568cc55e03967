// Direct depthwise convolution on CUDA with the fused epilogue: the kernels behind
// bigkernels::conv_depthwise and its backward on CUDA tensors (binding: conv_depthwise_binding.cpp).
// No torch headers here (see kernels.h); the semantics are those of csrc/cpu/conv_depthwise.cpp.
//
// Depthwise convolution has no reduction over channels, so cuDNN's implicit-GEMM machinery does
// little for it, and large kernels (7x7 .. 31x31, RepLKNet/ConvNeXt) are where stock is slow. Here:
//
// Forward, NCHW: one block per (n, c, output tile). The block stages the tile's input halo and the
//   channel's filter in shared memory once, then each thread computes its outputs from shared
//   memory and applies the epilogue (bias, residual, activation, optional z) before its one store.
// Forward, channels_last: one thread per output element with C fastest, so a warp's loads of each
//   filter tap are consecutive channels (coalesced); neighbouring taps hit L1.
// Backward: an elementwise pass gz = grad_output * act'(z or y) (float, also grad_residual); the
//   input gradient is the transposed direct conv, one thread per input element gathering the gz
//   entries it fed (flipped filter); the bias gradient is one block per channel with a fixed
//   reduction tree; the weight gradient stages (halo, gz tile) pairs in shared memory, each block
//   accumulates a fixed subset of tiles into per-thread tap sums, writes one partial row, and a
//   second kernel adds the partial rows in order. No atomics: every reduction order depends on the
//   shape only, so results are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common/activation.h"
#include "kernels.h"

namespace bigkernels::cuda {
namespace {

// ------------------------------------------------------------------------------ launch parameters
// Threads per block for every kernel: 8 warps, a whole number of warps per output-tile row, and the
// size of the bias/weight reduction trees.
constexpr int kThreads = 256;
// Output tile of the NCHW forward and weight-gradient kernels, and smaller fallbacks for large
// dilated kernels: the first whose shared memory fits kMaxSharedBytes is used. 16 x 32 gives each
// thread two outputs and makes the halo overhead (R - 1 rows and S - 1 columns) small next to the
// tile even for 7x7.
constexpr int kTiles[][2] = {{16, 32}, {8, 32}, {4, 16}, {2, 8}, {1, 1}};
// Shared memory a block may use without opting in (every target architecture).
constexpr size_t kMaxSharedBytes = 48 * 1024;
// Weight gradient: up to this many blocks per channel (each sums a fixed range of tiles); enough
// to fill an H100 at C >= 16, few enough that the partial rows stay small.
constexpr int64_t kWeightGradChunks = 64;
// Taps a thread can own in the weight gradient: kThreads * 4 >= 31 * 31.
constexpr int kMaxTapsPerThread = 4;
// Grid cap for the grid-stride elementwise kernels (about 8 waves of an H100's resident threads).
constexpr int64_t kMaxElementwiseBlocks = int64_t{1} << 16;

static_assert(kThreads * kMaxTapsPerThread >= 31 * 31, "a block must cover a 31x31 filter's taps");

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
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Offset of element (n, c, h, w) of an (N, C, H, W) tensor dense in NCHW or NHWC.
template <bool kChannelsLast>
__device__ __forceinline__ int64_t offset_of(int64_t n, int64_t c, int64_t h, int64_t w, int64_t C, int64_t H,
                                             int64_t W) {
  return kChannelsLast ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

// (n, c, h, w) of the element at linear memory position i. 32-bit arithmetic (64-bit division
// is a software routine that costs registers and time): the launchers refuse tensors of 2^31
// elements or more.
template <bool kChannelsLast>
__device__ __forceinline__ void decode(int64_t i64, int64_t C64, int64_t H64, int64_t W64, int64_t& n, int64_t& c,
                                       int64_t& h, int64_t& w) {
  uint32_t i = static_cast<uint32_t>(i64);
  const uint32_t C = static_cast<uint32_t>(C64), H = static_cast<uint32_t>(H64), W = static_cast<uint32_t>(W64);
  if (kChannelsLast) {
    c = i % C;
    i /= C;
    w = i % W;
    i /= W;
    h = i % H;
    n = i / H;
  } else {
    w = i % W;
    i /= W;
    h = i % H;
    i /= H;
    c = i % C;
    n = i / C;
  }
}

template <typename T>
__device__ __forceinline__ void epilogue_store(float acc, int64_t o, const T* residual, T* out, T* zout,
                                               Activation act, float slope) {
  const float z = acc + (residual ? to_float(residual[o]) : 0.0f);
  if (zout) zout[o] = from_float<T>(z);
  out[o] = from_float<T>(activation_forward(act, z, slope));
}

int64_t elementwise_blocks(int64_t n) { return std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, kMaxElementwiseBlocks)); }

// The elementwise kernels index in 32 bits (decode above).
constexpr int64_t kMaxElements = int64_t{1} << 31;

// Input rows/columns a tile of `tile` outputs reads.
__host__ __device__ __forceinline__ int64_t halo(int64_t tile, int64_t stride, int64_t kernel, int64_t dilation) {
  return (tile - 1) * stride + (kernel - 1) * dilation + 1;
}

// ------------------------------------------------------------------------------------- forward
// NCHW, one block per (plane n*C + c, tile). Shared memory: the filter (R*S), then the halo.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_nchw_tiled_kernel(const T* __restrict__ input, const float* __restrict__ weight,
                              const float* __restrict__ bias, const T* __restrict__ residual,
                              T* __restrict__ output, T* __restrict__ zout, DepthwiseConvShape s,
                              int tile_h, int tile_w, int64_t tiles_w, int64_t tiles_per_plane,
                              int activation, float slope) {
  extern __shared__ float smem[];
  const int64_t plane = blockIdx.x / tiles_per_plane;
  const int64_t tile = blockIdx.x % tiles_per_plane;
  const int64_t c = plane % s.C;
  const int64_t p0 = tile / tiles_w * tile_h, q0 = tile % tiles_w * tile_w;
  const int64_t in_h = halo(tile_h, s.stride_h, s.R, s.dil_h), in_w = halo(tile_w, s.stride_w, s.S, s.dil_w);
  const int64_t taps = s.R * s.S;
  float* w_s = smem;
  float* x_s = smem + taps;
  for (int64_t i = threadIdx.x; i < taps; i += blockDim.x) w_s[i] = weight[c * taps + i];
  const int64_t h0 = p0 * s.stride_h - s.pad_h, w0 = q0 * s.stride_w - s.pad_w;
  const T* in_plane = input + plane * s.H * s.W;
  for (int64_t i = threadIdx.x; i < in_h * in_w; i += blockDim.x) {
    const int64_t h = h0 + i / in_w, w = w0 + i % in_w;
    x_s[i] = (h >= 0 && h < s.H && w >= 0 && w < s.W) ? to_float(in_plane[h * s.W + w]) : 0.0f;
  }
  __syncthreads();
  const float b = bias ? bias[c] : 0.0f;
  for (int64_t i = threadIdx.x; i < int64_t{tile_h} * tile_w; i += blockDim.x) {
    const int64_t tp = i / tile_w, tq = i % tile_w;
    const int64_t p = p0 + tp, q = q0 + tq;
    if (p >= s.P || q >= s.Q) continue;
    const float* x = x_s + tp * s.stride_h * in_w + tq * s.stride_w;
    float acc = b;
    for (int64_t r = 0; r < s.R; ++r) {
      const float* xr = x + r * s.dil_h * in_w;
      const float* wr = w_s + r * s.S;
      for (int64_t k = 0; k < s.S; ++k) acc += wr[k] * xr[k * s.dil_w];
    }
    epilogue_store(acc, (plane * s.P + p) * s.Q + q, residual, output, zout, static_cast<Activation>(activation),
                   slope);
  }
}

// Any layout, one thread per output element in memory order (channels_last: C fastest, coalesced).
template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    forward_direct_kernel(const T* __restrict__ input, const float* __restrict__ weight,
                          const float* __restrict__ bias, const T* __restrict__ residual,
                          T* __restrict__ output, T* __restrict__ zout, DepthwiseConvShape s, int activation,
                          float slope) {
  const int64_t total = s.N * s.C * s.P * s.Q;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    int64_t n, c, p, q;
    decode<kChannelsLast>(i, s.C, s.P, s.Q, n, c, p, q);
    float acc = bias ? bias[c] : 0.0f;
    const float* w = weight + c * s.R * s.S;
    for (int64_t r = 0; r < s.R; ++r) {
      const int64_t h = p * s.stride_h - s.pad_h + r * s.dil_h;
      if (h < 0 || h >= s.H) continue;
      for (int64_t k = 0; k < s.S; ++k) {
        const int64_t x = q * s.stride_w - s.pad_w + k * s.dil_w;
        if (x < 0 || x >= s.W) continue;
        acc += w[r * s.S + k] * to_float(input[offset_of<kChannelsLast>(n, c, h, x, s.C, s.H, s.W)]);
      }
    }
    epilogue_store(acc, i, residual, output, zout, static_cast<Activation>(activation), slope);
  }
}

// ------------------------------------------------------------------------------------ backward
// gz = dy * act'(src) over every element (all tensors share one layout); grad_residual = gz.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_z_kernel(const T* __restrict__ dy, const T* __restrict__ src, float* __restrict__ gz,
                  T* __restrict__ grad_residual, int64_t total, bool from_output, int activation, float slope) {
  const Activation act = static_cast<Activation>(activation);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const float v = to_float(src[i]);
    const float d = from_output ? activation_grad_of_output(act, v, slope) : activation_grad(act, v, slope);
    const float g = to_float(dy[i]) * d;
    gz[i] = g;
    if (grad_residual) grad_residual[i] = from_float<T>(g);
  }
}

// One thread per input element: the sum of gz over the outputs it fed, times the filter taps.
template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    grad_input_kernel(const float* __restrict__ gz, const float* __restrict__ weight, T* __restrict__ grad_input,
                      DepthwiseConvShape s) {
  const int64_t total = s.N * s.C * s.H * s.W;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    int64_t n, c, h64, x64;
    decode<kChannelsLast>(i, s.C, s.H, s.W, n, c, h64, x64);
    // 32-bit index arithmetic in the tap loops: 64-bit division is a slow software routine.
    const int h = static_cast<int>(h64), x = static_cast<int>(x64);
    const int R = static_cast<int>(s.R), S = static_cast<int>(s.S), P = static_cast<int>(s.P),
              Q = static_cast<int>(s.Q);
    const int sh = static_cast<int>(s.stride_h), sw = static_cast<int>(s.stride_w);
    const int dh = static_cast<int>(s.dil_h), dw = static_cast<int>(s.dil_w);
    const int ph = static_cast<int>(s.pad_h), pw = static_cast<int>(s.pad_w);
    const float* w = weight + c * R * S;
    // gz of image n, channel c: element (p, q) at p * p_stride + q * q_stride.
    const float* gz_nc = gz + (kChannelsLast ? n * s.P * s.Q * s.C + c : (n * s.C + c) * s.P * s.Q);
    const int64_t q_stride = kChannelsLast ? s.C : 1, p_stride = s.Q * q_stride;
    float acc = 0.0f;
    for (int r = 0; r < R; ++r) {
      const int t = h + ph - r * dh;
      const int p = t / sh;
      if (t < 0 || p * sh != t || p >= P) continue;
      for (int k = 0; k < S; ++k) {
        const int u = x + pw - k * dw;
        const int q = u / sw;
        if (u < 0 || q * sw != u || q >= Q) continue;
        acc += w[r * S + k] * gz_nc[p * p_stride + q * q_stride];
      }
    }
    grad_input[i] = from_float<T>(acc);
  }
}

// Fixed-order tree sum of kThreads values in shared memory; the total ends in buf[0].
__device__ __forceinline__ void block_tree_sum(float* buf) {
  for (int width = kThreads / 2; width > 0; width /= 2) {
    __syncthreads();
    if (threadIdx.x < width) buf[threadIdx.x] += buf[threadIdx.x + width];
  }
  __syncthreads();
}

// One block per channel: grad_bias[c] = sum of gz over (n, p, q).
template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    grad_bias_kernel(const float* __restrict__ gz, T* __restrict__ grad_bias, DepthwiseConvShape s) {
  __shared__ float buf[kThreads];
  const int64_t c = blockIdx.x, pq = s.P * s.Q, count = s.N * pq;
  float acc = 0.0f;
  for (int64_t j = threadIdx.x; j < count; j += kThreads) {
    const int64_t n = j / pq, p = j % pq / s.Q, q = j % s.Q;
    acc += gz[offset_of<kChannelsLast>(n, c, p, q, s.C, s.P, s.Q)];
  }
  buf[threadIdx.x] = acc;
  block_tree_sum(buf);
  if (threadIdx.x == 0) grad_bias[c] = from_float<T>(buf[0]);
}

// Weight gradient, pass 1. Block (c, chunk) sums, over the tiles items [item0, item1) of channel c
// (item = n * tiles + tile), gz(p, q) * x(p * stride - pad + r * dil, ...) for every tap (r, s).
// Taps >= kThreads: thread t owns taps t, t + kThreads, ... (lanes = 1). Fewer taps: `lanes`
// threads share a tap, splitting the tile's positions, and are added in lane order at the end.
// Shared memory: gz tile, input halo (when kHaloInShared), kThreads floats for the lane sums.
template <typename T, bool kChannelsLast, bool kHaloInShared>
__global__ void __launch_bounds__(kThreads)
    grad_weight_partial_kernel(const T* __restrict__ input, const float* __restrict__ gz,
                               float* __restrict__ partial, DepthwiseConvShape s, int tile_h, int tile_w,
                               int64_t tiles_w, int64_t tiles, int64_t chunks) {
  extern __shared__ float smem[];
  const int64_t c = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t items = s.N * tiles;
  const int64_t item0 = items * chunk / chunks, item1 = items * (chunk + 1) / chunks;
  // 32-bit index arithmetic in the hot loops: 64-bit division is a slow software routine.
  const int S = static_cast<int>(s.S), sh = static_cast<int>(s.stride_h), sw = static_cast<int>(s.stride_w);
  const int dh = static_cast<int>(s.dil_h), dw = static_cast<int>(s.dil_w);
  const int taps = static_cast<int>(s.R * s.S);
  const int lanes = taps >= kThreads ? 1 : kThreads / taps;
  const int lane = taps >= kThreads ? 0 : threadIdx.x / taps;
  const int tile_size = tile_h * tile_w;
  const int64_t in_h = halo(tile_h, s.stride_h, s.R, s.dil_h), in_w = halo(tile_w, s.stride_w, s.S, s.dil_w);
  float* gz_s = smem;
  float* lane_s = smem + tile_size;
  float* x_s = lane_s + kThreads;

  float acc[kMaxTapsPerThread];
  int tap_of[kMaxTapsPerThread];
#pragma unroll
  for (int k = 0; k < kMaxTapsPerThread; ++k) {
    acc[k] = 0.0f;
    const int tap = taps >= kThreads ? static_cast<int>(threadIdx.x) + k * kThreads
                                     : (k == 0 && lane < lanes ? static_cast<int>(threadIdx.x % taps) : taps);
    tap_of[k] = tap;  // == taps (or more): this slot is unused
  }

  for (int64_t item = item0; item < item1; ++item) {
    const int64_t n = item / tiles, tile = item % tiles;
    const int p0 = static_cast<int>(tile / tiles_w) * tile_h, q0 = static_cast<int>(tile % tiles_w) * tile_w;
    const int h0 = p0 * sh - static_cast<int>(s.pad_h), w0 = q0 * sw - static_cast<int>(s.pad_w);
    const int in_h32 = static_cast<int>(in_h), in_w32 = static_cast<int>(in_w);
    __syncthreads();  // the previous item's shared data is no longer read
    for (int i = threadIdx.x; i < tile_size; i += kThreads) {
      const int p = p0 + i / tile_w, q = q0 + i % tile_w;
      gz_s[i] = (p < s.P && q < s.Q) ? gz[offset_of<kChannelsLast>(n, c, p, q, s.C, s.P, s.Q)] : 0.0f;
    }
    if (kHaloInShared) {
      for (int i = threadIdx.x; i < in_h32 * in_w32; i += kThreads) {
        const int h = h0 + i / in_w32, w = w0 + i % in_w32;
        x_s[i] = (h >= 0 && h < s.H && w >= 0 && w < s.W)
                     ? to_float(input[offset_of<kChannelsLast>(n, c, h, w, s.C, s.H, s.W)])
                     : 0.0f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMaxTapsPerThread; ++k) {
      const int tap = tap_of[k];
      if (tap >= taps) continue;
      const int r = tap / S, t = tap % S;
      float sum = 0.0f;
      for (int i = lane; i < tile_size; i += lanes) {
        const int tp = i / tile_w, tq = i % tile_w;
        const int y = tp * sh + r * dh, x = tq * sw + t * dw;
        float xv;
        if (kHaloInShared) {
          xv = x_s[y * in_w32 + x];
        } else {
          const int h = h0 + y, w = w0 + x;
          xv = (h >= 0 && h < s.H && w >= 0 && w < s.W)
                   ? to_float(input[offset_of<kChannelsLast>(n, c, h, w, s.C, s.H, s.W)])
                   : 0.0f;
        }
        sum += gz_s[i] * xv;  // gz_s is 0 past the output's edge
      }
      acc[k] += sum;
    }
  }

  float* out = partial + (chunk * s.C + c) * taps;
  if (taps >= kThreads) {
#pragma unroll
    for (int k = 0; k < kMaxTapsPerThread; ++k)
      if (tap_of[k] < taps) out[tap_of[k]] = acc[k];
    return;
  }
  __syncthreads();
  lane_s[threadIdx.x] = acc[0];
  __syncthreads();
  if (threadIdx.x < taps) {
    float total = 0.0f;
    for (int l = 0; l < lanes; ++l) total += lane_s[l * taps + threadIdx.x];
    out[threadIdx.x] = total;
  }
}

// Weight gradient, pass 2: grad_weight[c, tap] = sum over chunks, in chunk order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_weight_finalize_kernel(const float* __restrict__ partial, T* __restrict__ grad_weight, int64_t C,
                                int64_t taps, int64_t chunks) {
  const int64_t total = C * taps;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    float sum = 0.0f;
    for (int64_t k = 0; k < chunks; ++k) sum += partial[k * total + i];
    grad_weight[i] = from_float<T>(sum);
  }
}

// ------------------------------------------------------------------------------------ planning
struct TilePlan {
  int tile_h, tile_w;
  int64_t tiles_w, tiles;
  size_t shared_bytes;
  bool fits;
};

// The largest tile of kTiles whose shared memory (extra_floats + halo) fits; `fits` is false when
// even the smallest does not (a very large dilated kernel).
TilePlan plan_tiles(const DepthwiseConvShape& s, int64_t extra_floats) {
  TilePlan plan{};
  for (const auto& t : kTiles) {
    const int64_t floats = extra_floats + halo(t[0], s.stride_h, s.R, s.dil_h) * halo(t[1], s.stride_w, s.S, s.dil_w);
    plan.tile_h = t[0];
    plan.tile_w = t[1];
    plan.shared_bytes = static_cast<size_t>(floats) * sizeof(float);
    plan.fits = plan.shared_bytes <= kMaxSharedBytes;
    if (plan.fits) break;
  }
  plan.tiles_w = (s.Q + plan.tile_w - 1) / plan.tile_w;
  plan.tiles = (s.P + plan.tile_h - 1) / plan.tile_h * plan.tiles_w;
  return plan;
}

// Weight gradient: shared memory holds the gz tile and the lane sums besides the halo.
TilePlan plan_weight_grad(const DepthwiseConvShape& s) {
  TilePlan plan{};
  for (const auto& t : kTiles) {
    const int64_t floats = int64_t{t[0]} * t[1] + kThreads +
                           halo(t[0], s.stride_h, s.R, s.dil_h) * halo(t[1], s.stride_w, s.S, s.dil_w);
    plan.tile_h = t[0];
    plan.tile_w = t[1];
    plan.shared_bytes = static_cast<size_t>(floats) * sizeof(float);
    plan.fits = plan.shared_bytes <= kMaxSharedBytes;
    if (plan.fits) break;
  }
  if (!plan.fits) {
    // Even the smallest halo does not fit: the kernel reads the input from global memory instead.
    plan.tile_h = kTiles[0][0];
    plan.tile_w = kTiles[0][1];
    plan.shared_bytes = static_cast<size_t>(plan.tile_h * plan.tile_w + kThreads) * sizeof(float);
  }
  plan.tiles_w = (s.Q + plan.tile_w - 1) / plan.tile_w;
  plan.tiles = (s.P + plan.tile_h - 1) / plan.tile_h * plan.tiles_w;
  return plan;
}

int64_t weight_grad_chunks(const DepthwiseConvShape& s, const TilePlan& plan) {
  return std::max<int64_t>(1, std::min(kWeightGradChunks, s.N * plan.tiles));
}

constexpr size_t kScratchAlign = 256;
size_t align_up(size_t bytes) { return (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign; }

template <typename T>
cudaError_t launch_forward(const DepthwiseConvShape& s, const void* input, const float* weight, const float* bias,
                           const void* residual, void* output, void* zout, int activation, float slope,
                           cudaStream_t stream) {
  const T* x = static_cast<const T*>(input);
  const T* res = static_cast<const T*>(residual);
  T* y = static_cast<T*>(output);
  T* z = static_cast<T*>(zout);
  const TilePlan plan = plan_tiles(s, s.R * s.S);
  if (!s.channels_last && plan.fits) {
    const int64_t blocks = s.N * s.C * plan.tiles;
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    forward_nchw_tiled_kernel<T><<<static_cast<unsigned>(blocks), kThreads, plan.shared_bytes, stream>>>(
        x, weight, bias, res, y, z, s, plan.tile_h, plan.tile_w, plan.tiles_w, plan.tiles, activation, slope);
  } else {
    const unsigned blocks = static_cast<unsigned>(elementwise_blocks(s.N * s.C * s.P * s.Q));
    if (s.channels_last)
      forward_direct_kernel<T, true><<<blocks, kThreads, 0, stream>>>(x, weight, bias, res, y, z, s, activation, slope);
    else
      forward_direct_kernel<T, false><<<blocks, kThreads, 0, stream>>>(x, weight, bias, res, y, z, s, activation, slope);
  }
  return cudaGetLastError();
}

template <typename T, bool kChannelsLast>
cudaError_t launch_backward(const DepthwiseConvShape& s, const void* grad_output, const void* input,
                            const float* weight, const void* act_src, bool from_output, int activation,
                            float slope, void* grad_input, void* grad_weight, void* grad_bias,
                            void* grad_residual, void* scratch, cudaStream_t stream) {
  const int64_t out_total = s.N * s.C * s.P * s.Q;
  float* gz = static_cast<float*>(scratch);
  grad_z_kernel<T><<<static_cast<unsigned>(elementwise_blocks(out_total)), kThreads, 0, stream>>>(
      static_cast<const T*>(grad_output), static_cast<const T*>(act_src), gz, static_cast<T*>(grad_residual),
      out_total, from_output, activation, slope);
  if (grad_bias) {
    grad_bias_kernel<T, kChannelsLast><<<static_cast<unsigned>(s.C), kThreads, 0, stream>>>(
        gz, static_cast<T*>(grad_bias), s);
  }
  if (grad_input) {
    grad_input_kernel<T, kChannelsLast>
        <<<static_cast<unsigned>(elementwise_blocks(s.N * s.C * s.H * s.W)), kThreads, 0, stream>>>(
            gz, weight, static_cast<T*>(grad_input), s);
  }
  if (grad_weight) {
    const TilePlan plan = plan_weight_grad(s);
    const int64_t chunks = weight_grad_chunks(s, plan);
    const int64_t blocks = s.C * chunks;
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    float* partial = reinterpret_cast<float*>(static_cast<char*>(scratch) + align_up(out_total * sizeof(float)));
    const T* x = static_cast<const T*>(input);
    if (plan.fits)
      grad_weight_partial_kernel<T, kChannelsLast, true><<<static_cast<unsigned>(blocks), kThreads, plan.shared_bytes, stream>>>(
          x, gz, partial, s, plan.tile_h, plan.tile_w, plan.tiles_w, plan.tiles, chunks);
    else
      grad_weight_partial_kernel<T, kChannelsLast, false><<<static_cast<unsigned>(blocks), kThreads, plan.shared_bytes, stream>>>(
          x, gz, partial, s, plan.tile_h, plan.tile_w, plan.tiles_w, plan.tiles, chunks);
    const int64_t taps = s.R * s.S;
    grad_weight_finalize_kernel<T><<<static_cast<unsigned>(elementwise_blocks(s.C * taps)), kThreads, 0, stream>>>(
        partial, static_cast<T*>(grad_weight), s.C, taps, chunks);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t conv_depthwise_forward(DType dtype, const DepthwiseConvShape& shape, const void* input,
                                   const float* weight, const float* bias, const void* residual, void* output,
                                   void* preactivation, int activation, float negative_slope, cudaStream_t stream) {
  if (shape.N * shape.C * shape.P * shape.Q == 0) return cudaSuccess;
  if (shape.N * shape.C * shape.P * shape.Q >= kMaxElements || shape.N * shape.C * shape.H * shape.W >= kMaxElements)
    return cudaErrorNotSupported;
  switch (dtype) {
    case DType::kFloat16:
      return launch_forward<__half>(shape, input, weight, bias, residual, output, preactivation, activation,
                                    negative_slope, stream);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(shape, input, weight, bias, residual, output, preactivation, activation,
                                           negative_slope, stream);
    case DType::kFloat32:
      return launch_forward<float>(shape, input, weight, bias, residual, output, preactivation, activation,
                                   negative_slope, stream);
    default: return cudaErrorNotSupported;
  }
}

size_t conv_depthwise_backward_scratch_bytes(const DepthwiseConvShape& shape, bool need_weight_grad) {
  size_t bytes = align_up(static_cast<size_t>(shape.N * shape.C * shape.P * shape.Q) * sizeof(float));
  if (need_weight_grad) {
    const int64_t chunks = weight_grad_chunks(shape, plan_weight_grad(shape));
    bytes += static_cast<size_t>(chunks * shape.C * shape.R * shape.S) * sizeof(float);
  }
  return bytes;
}

cudaError_t conv_depthwise_backward(DType dtype, const DepthwiseConvShape& shape, const void* grad_output,
                                    const void* input, const float* weight, const void* act_src,
                                    bool act_from_output, int activation, float negative_slope, void* grad_input,
                                    void* grad_weight, void* grad_bias, void* grad_residual, void* scratch,
                                    cudaStream_t stream) {
  // An empty output feeds nothing back: the binding zero-fills the gradients in that case.
  if (shape.N * shape.C * shape.P * shape.Q == 0) return cudaSuccess;
  if (shape.N * shape.C * shape.P * shape.Q >= kMaxElements || shape.N * shape.C * shape.H * shape.W >= kMaxElements)
    return cudaErrorNotSupported;
#define BK_LAUNCH_BACKWARD(T)                                                                          \
  return shape.channels_last                                                                          \
             ? launch_backward<T, true>(shape, grad_output, input, weight, act_src, act_from_output,   \
                                        activation, negative_slope, grad_input, grad_weight, grad_bias, \
                                        grad_residual, scratch, stream)                               \
             : launch_backward<T, false>(shape, grad_output, input, weight, act_src, act_from_output,  \
                                         activation, negative_slope, grad_input, grad_weight, grad_bias, \
                                         grad_residual, scratch, stream)
  switch (dtype) {
    case DType::kFloat16: BK_LAUNCH_BACKWARD(__half);
    case DType::kBFloat16: BK_LAUNCH_BACKWARD(__nv_bfloat16);
    case DType::kFloat32: BK_LAUNCH_BACKWARD(float);
    default: return cudaErrorNotSupported;
  }
#undef BK_LAUNCH_BACKWARD
}

}  // namespace bigkernels::cuda
