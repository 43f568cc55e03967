// 1x1 convolution as GEMMs, the epilogue fused into each output tile (declared in conv_pointwise_gemm.h).
//
// A 1x1 convolution is a matrix product per image: NCHW, Y[n] (K x PQ) = W (K x C) . X[n] (C x PQ);
// channels_last, the pixels of all images are rows, Y (NPQ x K) = X (NPQ x C) . W^T. The output is
// cut into tiles (columns of one image / rows of pixels); each at::parallel_for task runs one BLAS
// GEMM for its tile (single-threaded inside the parallel region) and then the epilogue
// (bias + residual + activation, z kept when asked) on that tile while it is still in L2: one pass
// over the output in all. A stride > 1 gathers the tile's input pixels into a packed buffer first.
//
// Why: on the 2-core Xeon of bench/conv.py, oneDNN's NCHW 1x1 convolution runs at 40-190 GFLOP/s
// (N=1, 64 -> 256, 56x56: 2.5 ms) where MKL's sgemm on the same product runs at ~300 (0.34 ms).
#include "conv_pointwise_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "blas.h"
#include "thread_scratch.h"
#include "conv_tile_epilogue.h"

namespace bigkernels::cpu {
namespace {

// Output elements per tile (K x columns, or rows x K): ~256 KB of float32, so the tile the GEMM
// writes is still in the core's L2 (2 MB here) when the epilogue reads it back.
constexpr int64_t kTileElements = 65536;
// Tile extent bounds (columns or rows): below 32 the GEMM's per-call cost shows; above 512 a tile
// adds little GEMM efficiency.
constexpr int64_t kMinTileExtent = 32;
constexpr int64_t kMaxTileExtent = 512;
// With few tiles, their count is rounded up to a multiple of the thread count (no idle thread on
// the last round), as long as that leaves this many tiles per thread or fewer.
constexpr int64_t kBalanceTilesPerThread = 8;

struct Geometry {
  int64_t batch, channels, height, width, filters, out_h, out_w, stride_h, stride_w;
};

// Tiles of one extent (columns of an image, or pixel rows): count and size.
struct Tiling {
  int64_t count, size;
};
Tiling make_tiling(int64_t extent, int64_t filters, int64_t independent_units) {
  const int64_t target = std::clamp<int64_t>(kTileElements / std::max<int64_t>(filters, 1), kMinTileExtent, kMaxTileExtent);
  int64_t count = std::max<int64_t>(1, (extent + target - 1) / target);
  const int64_t threads = at::get_num_threads();
  const int64_t tasks = independent_units * count;
  if (threads > 1 && tasks < threads * kBalanceTilesPerThread && tasks % threads != 0) {
    // Smallest count >= count giving a task total that is a multiple of the thread count.
    while ((independent_units * count) % threads != 0 && count < extent) ++count;
  }
  const int64_t size = (extent + count - 1) / count;
  return {(extent + size - 1) / size, size};
}

template <typename T>
struct Operands {
  const T* x;
  const T* w;     // K x C row-major
  const T* bias;  // nullptr: none
  const T* residual;
  T* y;
  T* z;
};

template <typename T>
void forward_nchw(const Operands<T>& o, const Geometry& g, Activation act, T slope) {
  const int64_t pq = g.out_h * g.out_w, hw = g.height * g.width;
  const bool strided = g.stride_h != 1 || g.stride_w != 1;
  const Tiling tiles = make_tiling(pq, g.filters, g.batch);
  at::parallel_for(0, g.batch * tiles.count, 1, [&](int64_t begin, int64_t end) {
    T* packed = strided ? thread_scratch<T>(g.channels * tiles.size) : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles.count;
      const int64_t j0 = (task % tiles.count) * tiles.size, len = std::min(tiles.size, pq - j0);
      const T* x_n = o.x + n * g.channels * hw;
      const T* b = x_n + j0;
      int64_t ldb = hw;
      if (strided) {  // gather the tile's input pixels: packed[c][j - j0] = x[c][oh * sh][ow * sw]
        for (int64_t c = 0; c < g.channels; ++c) {
          const T* plane = x_n + c * hw;
          T* dst = packed + c * len;
          for (int64_t j = j0; j < j0 + len;) {
            const int64_t oh = j / g.out_w, ow = j % g.out_w, run = std::min(j0 + len - j, g.out_w - ow);
            const T* src = plane + oh * g.stride_h * g.width + ow * g.stride_w;
            for (int64_t i = 0; i < run; ++i) dst[j - j0 + i] = src[i * g.stride_w];
            j += run;
          }
        }
        b = packed;
        ldb = len;
      }
      const int64_t out_offset = n * g.filters * pq + j0;
      T* y = o.y + out_offset;
      blas::gemm<T>(false, false, g.filters, len, g.channels, T(1), o.w, g.channels, b, ldb, T(0), y, pq);
      with_activation(act, [&](auto a) {
        for (int64_t k = 0; k < g.filters; ++k) {
          const int64_t at = k * pq;
          const EpilogueSegment<T> s{y + at, y + at, o.z ? o.z + out_offset + at : nullptr,
                                     o.residual ? o.residual + out_offset + at : nullptr, nullptr,
                                     o.bias ? o.bias[k] : T(0), len};
          epilogue_segment<decltype(a)::value, T>(s, slope);
        }
      });
    }
  });
}

template <typename T>
void forward_channels_last(const Operands<T>& o, const Geometry& g, Activation act, T slope) {
  const int64_t pq = g.out_h * g.out_w, rows = g.batch * pq;
  const bool strided = g.stride_h != 1 || g.stride_w != 1;
  const Tiling tiles = make_tiling(rows, g.filters, 1);
  at::parallel_for(0, tiles.count, 1, [&](int64_t begin, int64_t end) {
    T* packed = strided ? thread_scratch<T>(tiles.size * g.channels) : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = task * tiles.size, len = std::min(tiles.size, rows - r0);
      const T* a = o.x + r0 * g.channels;  // stride 1: output pixel r reads input pixel r
      if (strided) {  // gather the tile's input pixels (C contiguous values each)
        for (int64_t r = r0; r < r0 + len; ++r) {
          const int64_t n = r / pq, oh = (r % pq) / g.out_w, ow = r % g.out_w;
          const T* src = o.x + ((n * g.height + oh * g.stride_h) * g.width + ow * g.stride_w) * g.channels;
          std::memcpy(packed + (r - r0) * g.channels, src, g.channels * sizeof(T));
        }
        a = packed;
      }
      T* y = o.y + r0 * g.filters;
      blas::gemm<T>(false, true, len, g.filters, g.channels, T(1), a, g.channels, o.w, g.channels, T(0), y, g.filters);
      with_activation(act, [&](auto act_c) {
        for (int64_t r = 0; r < len; ++r) {
          const int64_t at = (r0 + r) * g.filters;
          const EpilogueSegment<T> s{o.y + at, o.y + at, o.z ? o.z + at : nullptr,
                                     o.residual ? o.residual + at : nullptr, o.bias, T(0), g.filters};
          epilogue_segment<decltype(act_c)::value, T>(s, slope);
        }
      });
    }
  });
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

bool conv_pointwise_gemm_supports(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef padding,
                                  int64_t groups) {
  const auto dt = input.scalar_type();
  return (dt == at::kFloat || dt == at::kDouble) && groups == 1 && weight.size(2) == 1 && weight.size(3) == 1 &&
         padding[0] == 0 && padding[1] == 0 && blas::blas_available() && input.numel() > 0 &&
         weight.size(0) > 0 &&
         // The BLAS takes 32-bit sizes and leading dimensions.
         input.size(1) * input.size(2) * input.size(3) < (int64_t(1) << 31) &&
         weight.size(0) * input.size(2) * input.size(3) < (int64_t(1) << 31);
}

void conv_pointwise_gemm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& residual, at::IntArrayRef stride, bool channels_last,
                         const at::Tensor& output, const at::Tensor& preactivation, Activation act,
                         double negative_slope) {
  const Geometry g{input.size(0),  input.size(1),  input.size(2), input.size(3), weight.size(0),
                   output.size(2), output.size(3), stride[0],     stride[1]};
  const at::Tensor w = weight.contiguous();  // (K, C, 1, 1): K x C row-major
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_pointwise_gemm", [&] {
    const Operands<scalar_t> o{input.data_ptr<scalar_t>(),  w.data_ptr<scalar_t>(),
                               ptr_or_null<scalar_t>(bias), ptr_or_null<scalar_t>(residual),
                               output.data_ptr<scalar_t>(), preactivation.defined() ? preactivation.data_ptr<scalar_t>() : nullptr};
    if (channels_last) forward_channels_last<scalar_t>(o, g, act, static_cast<scalar_t>(negative_slope));
    else forward_nchw<scalar_t>(o, g, act, static_cast<scalar_t>(negative_slope));
  });
}

}  // namespace bigkernels::cpu
