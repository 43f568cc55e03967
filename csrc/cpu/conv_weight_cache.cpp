// The conv weight-transform cache; the contract is in conv_weight_cache.h.
//
// Why: Winograd's filter transform (16 x K x C floats written per call, plus a pass over the
// weight) is a fixed cost of every forward call; in inference, and in the many forwards a training
// step's weight serves (gradient accumulation, evaluation), the weight does not change between calls.
#include "conv_weight_cache.h"

#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace bigkernels::cpu {
namespace {

// An LRU smaller than the cycle of layers of one forward misses on every call, so the bound holds a
// whole network's worth: the 3x3 stride-1 layers of a ResNet-50 that Winograd serves (64-256
// channels) hold ~29 MB of transformed filters (16 x K x C floats each).
constexpr size_t kWeightCacheMaxEntries = 64;
constexpr int64_t kWeightCacheMaxBytes = int64_t(96) << 20;

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Entry {
  WeakImpl impl;
  int64_t version;
  const void* data;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  WeightTransformKind kind;
  at::Tensor derived;
  uint64_t last_use;
};

struct Cache {
  std::mutex mutex;
  std::vector<Entry> entries;
  uint64_t clock = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: no destructor ordering issue at process exit
  return *c;
}

bool cache_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("BIGKERNELS_CONV_WEIGHT_CACHE");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

bool same_key(const Entry& e, const at::Tensor& w, int64_t version, WeightTransformKind kind) {
  // expired() first: a live weak reference keeps the TensorImpl's memory allocated, so while the
  // entry lives no other tensor can have this address; once expired it never matches.
  return !e.impl.expired() && e.impl._unsafe_get_target() == w.unsafeGetTensorImpl() && e.kind == kind &&
         e.version == version && e.data == w.data_ptr() && e.dtype == w.scalar_type() && w.sizes() == e.sizes &&
         w.strides() == e.strides;
}

int64_t bytes_of(const at::Tensor& t) { return static_cast<int64_t>(t.numel()) * t.element_size(); }

}  // namespace

at::Tensor cached_weight_transform(const at::Tensor& weight, WeightTransformKind kind,
                                   const std::function<at::Tensor()>& make) {
  if (!cache_enabled() || weight.is_inference() || !weight.defined()) return make();
  const int64_t version = static_cast<int64_t>(weight.unsafeGetTensorImpl()->version_counter().current_version());
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    // Entries of freed weights go now, not at the next insertion: a deleted model's transformed
    // filters (up to the byte bound) would otherwise stay until another weight is transformed.
    c.entries.erase(std::remove_if(c.entries.begin(), c.entries.end(), [](const Entry& e) { return e.impl.expired(); }),
                    c.entries.end());
    for (Entry& e : c.entries) {
      if (same_key(e, weight, version, kind)) {
        e.last_use = ++c.clock;
        return e.derived;
      }
    }
  }
  at::Tensor derived = make();  // outside the lock: other layers' lookups go on meanwhile
  if (bytes_of(derived) > kWeightCacheMaxBytes / 4) return derived;  // too big to be worth holding

  std::lock_guard<std::mutex> lock(c.mutex);
  auto& es = c.entries;
  // Drop entries of freed weights and older versions of this one (same impl and kind).
  std::vector<Entry> kept;
  kept.reserve(es.size() + 1);
  int64_t total = 0;
  for (Entry& e : es) {
    const bool stale = e.impl.expired() || (e.impl._unsafe_get_target() == weight.unsafeGetTensorImpl() && e.kind == kind);
    if (!stale) {
      total += bytes_of(e.derived);
      kept.push_back(std::move(e));
    }
  }
  // Least recently used out until the new entry fits.
  while (!kept.empty() && (kept.size() + 1 > kWeightCacheMaxEntries || total + bytes_of(derived) > kWeightCacheMaxBytes)) {
    size_t oldest = 0;
    for (size_t i = 1; i < kept.size(); ++i) {
      if (kept[i].last_use < kept[oldest].last_use) oldest = i;
    }
    total -= bytes_of(kept[oldest].derived);
    kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(oldest));
  }
  kept.push_back(Entry{WeakImpl(weight.getIntrusivePtr()), version, weight.data_ptr(), weight.sizes().vec(),
                       weight.strides().vec(), weight.scalar_type(), kind, derived, ++c.clock});
  es = std::move(kept);
  return derived;
}

}  // namespace bigkernels::cpu
