// Torch-side argument checks shared by the cpu and cuda bindings (the kernels themselves
// include no torch header). The fused passes walk every operand of a parameter (gradient,
// saved copy, optimizer state) as one flat array in memory order. That is right for any
// dense layout - contiguous, channels_last, a transpose - as long as all operands share
// it; these checks refuse anything else instead of letting a kernel read wrong elements.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace sharpopt {

// Same shape and memory order. A size-1 dimension's stride moves no element, so it may
// differ (torch gives such dimensions arbitrary strides).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// Operand i of list `what` is dense and laid out like the parameter `like` (flat views of
// contiguous tensors, whose shapes may differ, are accepted as before).
inline void check_layout(const at::Tensor& t, const at::Tensor& like, const char* backend,
                         const char* what, size_t i) {
  TORCH_CHECK(t.is_non_overlapping_and_dense() &&
                  (same_layout(t, like) || (t.is_contiguous() && like.is_contiguous())),
              "sharpopt ", backend, ": ", what, "[", i, "] must be dense and laid out like the ",
              "parameter (strides ", t.strides(), " against ", like.strides(), ")");
}

// Gradient centralisation reduces each row g[r, ...] as one block of memory: dim 0 must be
// the outermost (true of contiguous and channels_last tensors).
inline void check_rows(const at::Tensor& g, const char* backend, size_t i) {
  TORCH_CHECK(g.size(0) <= 1 || g.numel() == 0 || g.stride(0) * g.size(0) == g.numel(),
              "sharpopt ", backend,
              ": row centralisation of tensor ", i, " needs each row in one block of memory ",
              "(strides ", g.strides(), ")");
}

}  // namespace sharpopt
