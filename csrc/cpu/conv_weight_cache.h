// A small process-wide cache of tensors derived from a conv weight (e.g. Winograd's transformed
// filters), reused while the weight has not changed (conv_weight_cache.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>

namespace bigkernels::cpu {

// Which derived tensor: one cache serves several transforms of the same weight.
enum class WeightTransformKind : int { WinogradForward = 0, WinogradInputGrad = 1 };

// make() applied to `weight`, from the cache when the same weight tensor, unchanged, was seen
// before. "Same and unchanged" means: the same TensorImpl (held by a weak reference, so a freed
// tensor's reused address never matches), the same version counter value (every in-place op on
// the weight or on a view of it bumps it: w.add_(1), optimizer steps, load_state_dict's copy_),
// and the same data pointer, sizes, strides and dtype. Inference tensors have no version counter:
// they are never cached, make() runs on every call.
//
// Known hole, the same as autograd's saved-tensor check: writing through `weight.data` (a new
// TensorImpl with its own version counter) is not seen. Set BIGKERNELS_CONV_WEIGHT_CACHE=0 to turn
// the cache off.
//
// Bounded (LRU): at most kWeightCacheMaxEntries entries and kWeightCacheMaxBytes bytes of derived
// tensors; entries whose weight was freed are dropped on the next insertion. Thread-safe.
at::Tensor cached_weight_transform(const at::Tensor& weight, WeightTransformKind kind,
                                   const std::function<at::Tensor()>& make);

}  // namespace bigkernels::cpu
