// The CPU attention kernels' dropout: a counter-based RNG, so that the keep decision of element
// (b, h, i, j) is a pure function of its coordinates. The forward, the backward and the mask
// materialiser (bigkernels::attention_dropout_mask) all call keep() and agree whatever the tiling
// or the thread that visits the element.
//
// Definition (this is the contract the tests rely on): with n = ((b * H + h) * L + i) * S + j the
// element's index in the (B, H, L, S) grid and (seed, offset) the two int64 of dropout_seed,
//   z = mix64(mix64(seed) + (offset + n) * 0x9E3779B97F4A7C15)      (mod 2^64)
// i.e. element offset + n of the SplitMix64 stream keyed by the mixed seed, and the element is kept
// iff the high 32 bits of z are >= floor(p * 2^32): probability 1 - p to within 2^-32. Kept
// probabilities are scaled by 1 / (1 - p).
#pragma once
#include <cstdint>

namespace bigkernels::cpu::attention_detail {

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct DropoutRng {
  uint64_t key = 0;        // mix64(seed)
  uint64_t offset = 0;
  uint32_t threshold = 0;  // floor(p * 2^32)
  bool active = false;

  DropoutRng() = default;
  DropoutRng(int64_t seed, int64_t off, double p)
      : key(mix64(static_cast<uint64_t>(seed))),
        offset(static_cast<uint64_t>(off)),
        threshold(static_cast<uint32_t>(p * 4294967296.0 >= 4294967295.0 ? 4294967295.0
                                                                         : p * 4294967296.0)),
        active(p > 0.0) {}

  // Is element n (the linear index above) kept?
  inline bool keep(uint64_t n) const {
    const uint64_t z = mix64(key + (offset + n) * 0x9E3779B97F4A7C15ull);
    return static_cast<uint32_t>(z >> 32) >= threshold;
  }
};

}  // namespace bigkernels::cpu::attention_detail
