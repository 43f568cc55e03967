// std::vector whose storage starts on a 64-byte boundary (a cache line, one AVX-512 vector).
//
// Why: a large std::vector<float> comes from malloc's mmap path at 16 bytes past a page start, so
// every 64-byte row of a GEMM tile built in it straddles two cache lines; MKL's kernels then store
// C and load their packed operands split, and the AVX-512 softmax loads split too. Attention tiles
// (csrc/cpu/attention.cpp) use this instead, like the buffers torch's own kernels get from its
// 64-byte aligned CPU allocator.
#pragma once
#include <cstddef>
#include <new>
#include <vector>

namespace bigkernels::cpu {

constexpr std::size_t kCacheLineBytes = 64;

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLineBytes)));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(kCacheLineBytes)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept { return true; }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace bigkernels::cpu
