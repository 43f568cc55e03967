// 3x3 stride-1 convolution by Winograd's minimal filtering algorithm F(2x2, 3x3) (Lavin & Gray,
// "Fast Algorithms for Convolutional Neural Networks", 2016), NCHW float32; declared in conv_winograd.h.
//
// Each 2x2 output tile is A^T [ (G g G^T) (.) (B^T d B) ] A, with d the 4x4 input patch that covers
// it and g the 3x3 filter:
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//   A^T = [1 1 1 0; 0 1 -1 -1]
// Summed over input channels, the 16 elementwise products become 16 GEMMs (one per position xi of
// the 4x4 transformed tile): M_xi (K x tiles) = U_xi (K x C) . V_xi (C x tiles). That is 16
// multiply-adds per 4 outputs per (k, c) instead of 36: 2.25x fewer, run by the BLAS at near peak.
//
// Work is cut into blocks of whole tile rows of one image. One task per block: input transform of
// the block into V (thread-local), the 16 GEMMs into M (thread-local), then the output transform
// row pair by row pair, each pair going through the epilogue (bias + residual + activation, z kept
// when asked) straight into the output: one write of the output, no extra pass. The filter
// transform U is cached across calls while the weight is unchanged (conv_weight_cache.h).
// conv_winograd_input_grad runs the backward's input gradient through the same core.
//
// Where the time goes (N=1 128->128 28x28, 2 threads, one 105-slot block per thread, per block):
// the 16 GEMMs ~370 us (~150 GFLOP/s a core), input transform ~70 us, output transform +
// epilogue ~55 us; the call ~0.51 ms.
//
// Numerics: the transforms add and subtract (B, A) and halve (G) only; on He-initialised ResNet
// layers the float32 max error measured 0.8-1.8x that of oneDNN's direct convolution at 32-128
// and 512 channels, 2.2-3.0x at 256 channels (N=1-8, 14x14 and 28x28): within the DESIGN rule
// (2x stock + eps; tests/test_conv_winograd.py). F(4x4, 3x3) would cut the multiplies further but its
// transforms' larger constants cost accuracy; not used.
#include "conv_winograd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "blas.h"
#include "conv_tile_epilogue.h"
#include "conv_weight_cache.h"
#include "thread_scratch.h"

namespace bigkernels::cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(__clang__)
#define BK_WINOGRAD_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BK_WINOGRAD_MULTIVERSION
#endif

constexpr int64_t kPositions = 16;  // 4x4 transformed tile
// Tiles per block, about. One core's BLAS on 128 x 128 x tiles (the GEMM of a ResNet layer2 block):
// 108 GFLOP/s at 49 tiles, 155 at 64, 165 at 96-128, and the 64-deep GEMMs of 64-channel layers
// gain up to ~256 (77 GFLOP/s at 64 columns, 104 at 256). Whole calls side by side (fp32, 2 threads,
// bias + residual + relu), 96 -> 192 tiles: 64 -> 64 at 56x56 0.61 -> 0.51 ms (N=1), 4.76 -> 4.26
// ms (N=8); 64 -> 64 at 112x112 2.25 -> 2.14 ms; 128 -> 128 at 28x28 N=8 4.02 -> 3.77 ms; 256- and
// 512-channel layers within 1-2% (better or equal). 288 measured no better than 192. V and M of a
// 192-tile block (16 x (C + K) x tiles floats) are 1.5 MB at 64 channels, more than the 2 MB L2
// holds beside the rest at 128 and up; the GEMMs stream them well enough.
constexpr int64_t kTargetTilesPerBlock = 192;

// Floats between consecutive positions xi of U (rows = K, ld = C), V (rows = C) or M (rows = K):
// rows * ld plus one cache line. The transforms touch all 16 positions of a slot (or a filter tap)
// at once; without the extra line the 16 streams sit a multiple of 4 KB apart (e.g. 128 * 112 floats)
// and fight over one L1 set: the input transform ran 4x slower, the whole call 2x (N=8 128->128 28x28).
constexpr int64_t kPositionSkew = 16;
int64_t position_stride(int64_t rows, int64_t ld) { return rows * ld + kPositionSkew; }

struct Geometry {
  int64_t batch, channels, height, width, filters, out_h, out_w, pad_h, pad_w;
  int64_t tile_rows, tile_cols;  // ceil(out / 2)
};

// U[xi][k][c] = (G g G^T)[xi] for filters/channels pairs [begin, end) (i = k * C + c). The loop runs
// over i, so each of the 16 outputs is a unit-stride store and the compiler vectorises across i.
BK_WINOGRAD_MULTIVERSION
void transform_weights_range(const float* __restrict__ w, float* __restrict__ u, int64_t u_stride, int64_t begin,
                             int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float* g = w + i * 9;
    float gg[4][3];  // G g: the filter's rows combined
    for (int col = 0; col < 3; ++col) {
      const float g0 = g[col], g1 = g[3 + col], g2 = g[6 + col];
      gg[0][col] = g0;
      gg[1][col] = 0.5f * (g0 + g1 + g2);
      gg[2][col] = 0.5f * (g0 - g1 + g2);
      gg[3][col] = g2;
    }
    for (int row = 0; row < 4; ++row) {  // (G g) G^T
      const float a = gg[row][0], b = gg[row][1], c = gg[row][2];
      u[(row * 4 + 0) * u_stride + i] = a;
      u[(row * 4 + 1) * u_stride + i] = 0.5f * (a + b + c);
      u[(row * 4 + 2) * u_stride + i] = 0.5f * (a - b + c);
      u[(row * 4 + 3) * u_stride + i] = c;
    }
  }
}

// U for every filter/channel pair, in a fresh tensor (cached across calls by the caller).
at::Tensor transform_weights(const at::Tensor& weight) {
  const at::Tensor w = weight.contiguous();
  const int64_t filters = w.size(0), channels = w.size(1);
  const int64_t kc = filters * channels, u_stride = position_stride(filters, channels);
  at::Tensor u = at::empty({kPositions * u_stride}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = u.data_ptr<float>();
  at::parallel_for(0, kc, 4096, [&](int64_t begin, int64_t end) { transform_weights_range(src, dst, u_stride, begin, end); });
  return u;
}

// Tile space of a block: tile rows [th0, th1) of one image, each of tile_cols + 1 slots (the last
// slot of a row is a junk tile, computed and never stored): slot f = (th - th0) * (tile_cols + 1) + tw.
// With it, the input value d[i][j] of every tile sits at a fixed offset of one of four "phase
// planes" P_ab[u][m] = x[2u + a - pad_h][2m + b - pad_w] (u = th - th0 + i / 2, m = tw + j / 2,
// a = i % 2, b = j % 2; zero outside the image), so the transforms run over long unit-stride loops
// (a ResNet layer's rows are 14-28 wide: too short to vectorise one by one). The junk slot costs
// the GEMMs 1 / (tile_cols + 1) of their work.
struct BlockSpace {
  int64_t th0, th1, row_slots, slots;  // slots = (th1 - th0) * row_slots
};

// The four phase planes of one channel for a block: phase[(2a + b) * plane + u * row_slots + m],
// u in [0, th1 - th0 + 1], m in [0, row_slots); plane = (th1 - th0 + 2) * row_slots (one spare row,
// read only by junk slots). padded: scratch of 2 * row_slots floats.
BK_WINOGRAD_MULTIVERSION
void load_phase_planes(const float* x_plane, const Geometry& g, const BlockSpace& s, float* phase, int64_t plane,
                       float* padded) {
  const int64_t rs = s.row_slots, rows = s.th1 - s.th0 + 1;
  std::fill(phase + rows * rs, phase + plane, 0.0f);  // the spare rows
  std::fill(phase + plane + rows * rs, phase + 2 * plane, 0.0f);
  std::fill(phase + 2 * plane + rows * rs, phase + 3 * plane, 0.0f);
  std::fill(phase + 3 * plane + rows * rs, phase + 4 * plane, 0.0f);
  for (int64_t u = 0; u < rows; ++u) {
    for (int a = 0; a < 2; ++a) {
      float* even = phase + (2 * a) * plane + u * rs;
      float* odd = phase + (2 * a + 1) * plane + u * rs;
      const int64_t ih = 2 * (s.th0 + u) + a - g.pad_h;
      if (ih < 0 || ih >= g.height) {
        std::fill(even, even + rs, 0.0f);
        std::fill(odd, odd + rs, 0.0f);
        continue;
      }
      // The row zero-padded to 2 * row_slots columns, then split into even and odd columns.
      std::fill(padded, padded + 2 * rs, 0.0f);
      std::memcpy(padded + g.pad_w, x_plane + ih * g.width, std::min(g.width, 2 * rs - g.pad_w) * sizeof(float));
#pragma omp simd
      for (int64_t m = 0; m < rs; ++m) {
        even[m] = padded[2 * m];
        odd[m] = padded[2 * m + 1];
      }
    }
  }
}

// V[xi][f] = (B^T d B)[xi] for every slot f of the block (v_c: this channel's row of V; position xi
// at v_c + xi * position_stride).
BK_WINOGRAD_MULTIVERSION
void transform_input_slots(const float* phase, int64_t plane, const BlockSpace& s, float* v_c,
                           int64_t position_stride) {
  const int64_t rs = s.row_slots;
  // d[i][j] at phase plane (i % 2, j % 2), offset (i / 2) * rs + j / 2.
  const float* p00 = phase;
  const float* p01 = phase + plane;
  const float* p10 = phase + 2 * plane;
  const float* p11 = phase + 3 * plane;
  float* v[16];
  for (int xi = 0; xi < 16; ++xi) v[xi] = v_c + xi * position_stride;
  // The 16 output streams never overlap the phase planes: omp simd says so (GCC otherwise keeps
  // this loop scalar for fear of aliasing).
#pragma omp simd
  for (int64_t f = 0; f < s.slots; ++f) {
    float d[4][4];
    for (int i = 0; i < 4; ++i) {
      const float* e = (i % 2 == 0 ? p00 : p10) + (i / 2) * rs + f;
      const float* o = (i % 2 == 0 ? p01 : p11) + (i / 2) * rs + f;
      d[i][0] = e[0], d[i][1] = o[0], d[i][2] = e[1], d[i][3] = o[1];
    }
    float t[4][4];  // B^T d
    for (int j = 0; j < 4; ++j) {
      t[0][j] = d[0][j] - d[2][j];
      t[1][j] = d[1][j] + d[2][j];
      t[2][j] = d[2][j] - d[1][j];
      t[3][j] = d[1][j] - d[3][j];
    }
    for (int i = 0; i < 4; ++i) {  // (B^T d) B
      v[4 * i + 0][f] = t[i][0] - t[i][2];
      v[4 * i + 1][f] = t[i][1] + t[i][2];
      v[4 * i + 2][f] = t[i][2] - t[i][1];
      v[4 * i + 3][f] = t[i][1] - t[i][3];
    }
  }
}

// A^T M A for one filter k over every slot of the block: the 2x2 outputs into four phase rows
// y[(2a + b) * slots + f] = output (2 th + a, 2 tw + b).
BK_WINOGRAD_MULTIVERSION
void transform_output_slots(const float* m_k, int64_t position_stride, int64_t slots, float* __restrict__ y) {
  const float* m[16];
  for (int xi = 0; xi < 16; ++xi) m[xi] = m_k + xi * position_stride;
#pragma omp simd
  for (int64_t f = 0; f < slots; ++f) {
    float s0[4], s1[4];
    for (int j = 0; j < 4; ++j) {  // A^T M: rows combined
      const float a = m[j][f], b = m[4 + j][f], c = m[8 + j][f], d = m[12 + j][f];
      s0[j] = a + b + c;
      s1[j] = b - c - d;
    }
    y[f] = s0[0] + s0[1] + s0[2];  // (A^T M) A: columns combined
    y[slots + f] = s0[1] - s0[2] - s0[3];
    y[2 * slots + f] = s1[0] + s1[1] + s1[2];
    y[3 * slots + f] = s1[1] - s1[2] - s1[3];
  }
}

// Output row 2 th + a of the block's tile row (th - th0), interleaved from the phase rows.
BK_WINOGRAD_MULTIVERSION
void interleave_output_row(const float* y, int64_t slots, int64_t slot0, int a, int64_t tile_cols, float* row) {
  const float* even = y + (2 * a) * slots + slot0;
  const float* odd = y + (2 * a + 1) * slots + slot0;
#pragma omp simd
  for (int64_t tw = 0; tw < tile_cols; ++tw) {
    row[2 * tw] = even[tw];
    row[2 * tw + 1] = odd[tw];
  }
}

struct Operands {
  const float* x;
  const float* u;
  const float* bias;
  const float* residual;
  float* y;
  float* z;
};

// The GEMM operands' leading dimension: the block's slot count rounded up to whole 64-byte lines.
// With ld = 49 the BLAS ran at 108 GFLOP/s on one core, with ld = 64 at 155 (128 x 128 x 64).
int64_t padded_ld(int64_t slots) { return (slots + 15) / 16 * 16; }


// Per-thread scratch (thread_scratch.h) for a task's block buffers.
constexpr int kBlockScratch = 0;

int64_t phase_plane_floats(int64_t block_rows, int64_t row_slots) { return (block_rows + 2) * row_slots; }

int64_t block_scratch_floats(const Geometry& g, int64_t max_block_rows) {
  const int64_t row_slots = g.tile_cols + 1, ld = padded_ld(max_block_rows * row_slots);
  return kPositions * (position_stride(g.channels, ld) + position_stride(g.filters, ld))  // V, M
         + 4 * phase_plane_floats(max_block_rows, row_slots) + 2 * row_slots  // phase planes, padded row
         + 4 * ld + 2 * row_slots;  // output phase rows, one interleaved output row
}

// Tile rows [th0, th1) of image n: input transform, 16 GEMMs, output transform + epilogue.
void run_block(const Operands& op, const Geometry& g, int64_t n, int64_t th0, int64_t th1, float* scratch,
               Activation act, float slope) {
  const BlockSpace s{th0, th1, g.tile_cols + 1, (th1 - th0) * (g.tile_cols + 1)};
  const int64_t ld = padded_ld(s.slots), hw = g.height * g.width, pq = g.out_h * g.out_w;
  const int64_t plane = phase_plane_floats(th1 - th0, s.row_slots);
  float* v = scratch;                            // V[xi][c][f], leading dimension ld
  const int64_t v_stride = position_stride(g.channels, ld), m_stride = position_stride(g.filters, ld);
  float* mbuf = v + kPositions * v_stride;  // M[xi][k][f]
  float* phase = mbuf + kPositions * m_stride;
  float* padded = phase + 4 * plane;
  float* y_phase = padded + 2 * s.row_slots;
  float* row = y_phase + 4 * ld;
  for (int64_t c = 0; c < g.channels; ++c) {
    load_phase_planes(op.x + (n * g.channels + c) * hw, g, s, phase, plane, padded);
    transform_input_slots(phase, plane, s, v + c * ld, v_stride);
    // The GEMMs run over all ld columns (below): zero the padding ones, so no stale NaN/denormal
    // scratch enters them (their results are never read).
    for (int64_t xi = 0; xi < kPositions; ++xi) std::fill(v + c * ld + xi * v_stride + s.slots, v + c * ld + xi * v_stride + ld, 0.0f);
  }
  // n = ld, not the slot count: MKL ran the 128 x n x 128 GEMM at 104 GFLOP/s per core for
  // n = 105 and 128 for n = 112 (whole 16-float vectors); the whole N=1 128->128 28x28 call went
  // 0.643 -> 0.581 ms (2 threads, side by side). The padding columns cost less than nothing.
  const int64_t u_stride = position_stride(g.filters, g.channels);
  for (int64_t xi = 0; xi < kPositions; ++xi) {
    blas::gemm<float>(false, false, g.filters, ld, g.channels, 1.0f, op.u + xi * u_stride, g.channels,
                      v + xi * v_stride, ld, 0.0f, mbuf + xi * m_stride, ld);
  }
  with_activation(act, [&](auto a_c) {
    for (int64_t k = 0; k < g.filters; ++k) {
      const float bias = op.bias != nullptr ? op.bias[k] : 0.0f;
      transform_output_slots(mbuf + k * ld, m_stride, s.slots, y_phase);
      for (int64_t th = th0; th < th1; ++th) {
        for (int a = 0; a < 2; ++a) {
          const int64_t oh = 2 * th + a;
          if (oh >= g.out_h) break;
          interleave_output_row(y_phase, s.slots, (th - th0) * s.row_slots, a, g.tile_cols, row);
          const int64_t at = (n * g.filters + k) * pq + oh * g.out_w;
          const EpilogueSegment<float> seg{row, op.y + at, op.z ? op.z + at : nullptr,
                                           op.residual ? op.residual + at : nullptr, nullptr, bias, g.out_w};
          epilogue_segment<decltype(a_c)::value, float>(seg, slope);
        }
      }
    }
  });
}

}  // namespace

bool conv_winograd_supports(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return input.scalar_type() == at::kFloat && input.is_contiguous() && groups == 1 && weight.size(2) == 3 &&
         weight.size(3) == 3 && stride[0] == 1 && stride[1] == 1 && dilation[0] == 1 && dilation[1] == 1 &&
         padding[0] <= 2 && padding[1] <= 2 && input.numel() > 0 && weight.size(0) > 0 && blas::blas_available() &&
         // The BLAS takes 32-bit sizes.
         weight.size(0) * weight.size(1) < (int64_t(1) << 27);
}

namespace {

// The convolution of input with the filters whose transform is u (output.size(1) of them).
void run_winograd(const at::Tensor& input, const at::Tensor& u, const at::Tensor& bias, const at::Tensor& residual,
                  at::IntArrayRef padding, const at::Tensor& output, const at::Tensor& preactivation, Activation act,
                  double negative_slope) {
  Geometry g{};
  g.batch = input.size(0), g.channels = input.size(1), g.height = input.size(2), g.width = input.size(3);
  g.filters = output.size(1), g.out_h = output.size(2), g.out_w = output.size(3);
  g.pad_h = padding[0], g.pad_w = padding[1];
  g.tile_rows = (g.out_h + 1) / 2, g.tile_cols = (g.out_w + 1) / 2;
  const Operands op{input.data_ptr<float>(),
                    u.data_ptr<float>(),
                    bias.defined() ? bias.data_ptr<float>() : nullptr,
                    residual.defined() ? residual.data_ptr<float>() : nullptr,
                    output.data_ptr<float>(),
                    preactivation.defined() ? preactivation.data_ptr<float>() : nullptr};

  // Blocks of whole tile rows of one image, split evenly (block b of B holds tile rows
  // [b * R / B, (b + 1) * R / B)); about kTargetTilesPerBlock tiles each, and with few blocks a
  // total that is a multiple of the thread count (no idle thread on the last round).
  const int64_t target_rows = std::max<int64_t>(1, (kTargetTilesPerBlock + g.tile_cols / 2) / (g.tile_cols + 1));
  int64_t blocks_per_image = std::max<int64_t>(1, (g.tile_rows + target_rows / 2) / target_rows);
  const int64_t threads = at::get_num_threads();
  while ((g.batch * blocks_per_image) % threads != 0 && blocks_per_image < g.tile_rows &&
         g.batch * blocks_per_image < 4 * threads) {
    ++blocks_per_image;
  }
  const int64_t max_block_rows = (g.tile_rows + blocks_per_image - 1) / blocks_per_image;
  const int64_t scratch_floats = block_scratch_floats(g, max_block_rows);
  const float slope = static_cast<float>(negative_slope);
  at::parallel_for(0, g.batch * blocks_per_image, 1, [&](int64_t begin, int64_t end) {
    float* scratch = thread_scratch<float, kBlockScratch>(scratch_floats);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks_per_image, b = task % blocks_per_image;
      const int64_t th0 = b * g.tile_rows / blocks_per_image, th1 = (b + 1) * g.tile_rows / blocks_per_image;
      if (th1 > th0) run_block(op, g, n, th0, th1, scratch, act, slope);
    }
  });
}

}  // namespace

void conv_winograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& residual, at::IntArrayRef padding, const at::Tensor& output,
                   const at::Tensor& preactivation, Activation act, double negative_slope) {
  // U = G g G^T: from the weight cache while this weight tensor is unchanged (conv_weight_cache.h).
  const at::Tensor u = cached_weight_transform(weight, WeightTransformKind::WinogradForward,
                                               [&] { return transform_weights(weight); });
  run_winograd(input, u, bias, residual, padding, output, preactivation, act, negative_slope);
}

void conv_winograd_input_grad(const at::Tensor& grad_z, const at::Tensor& weight, at::IntArrayRef padding,
                              const at::Tensor& grad_input) {
  // dx[c] = sum_k dz[k] (*) w[k][c] rotated by 180 degrees, padded by 2 - p: the transform of the
  // flipped, transposed weight, cached under its own kind (the forward's U stays cached too).
  const at::Tensor u = cached_weight_transform(weight, WeightTransformKind::WinogradInputGrad, [&] {
    return transform_weights(weight.flip({2, 3}).transpose(0, 1).contiguous());
  });
  const std::array<int64_t, 2> grad_padding{2 - padding[0], 2 - padding[1]};
  run_winograd(grad_z, u, at::Tensor(), at::Tensor(), grad_padding, grad_input, at::Tensor(), Activation::None, 0.0);
}

}  // namespace bigkernels::cpu
