// Per-thread scratch buffers that outlive a call.
//
// Why: the tile buffers of the conv cores are above malloc's mmap threshold, so a fresh buffer per
// call would be page-faulted in on every call. Each (T, Slot) pair is one buffer per thread; it grows
// and never shrinks. Use a different Slot for buffers that are alive at the same time on one thread.
#pragma once
#include <cstdint>
#include <vector>

namespace bigkernels::cpu {

template <typename T, int Slot = 0>
T* thread_scratch(int64_t elements) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < elements) buffer.resize(elements);
  return buffer.data();
}

}  // namespace bigkernels::cpu
