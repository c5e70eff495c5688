// Torch-side argument checks shared by the cpu and cuda bindings (the kernels themselves
// include no torch header). The fused passes walk every operand of a parameter (gradient,
// saved copy, optimizer state) as one flat array in memory order. That is right for any
// dense layout - contiguous, channels_last, a transpose - as long as all operands share
// it; these checks refuse anything else instead of letting a kernel read wrong elements.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <limits>
#include <optional>
#include <vector>

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
  // Contiguous pairs first: two flag reads, where same_layout compares shapes and strides.
  TORCH_CHECK(t.is_non_overlapping_and_dense() &&
                  ((t.is_contiguous() && like.is_contiguous()) || same_layout(t, like)),
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

// One operand list of a pass: as many tensors as `like` (the parameters), each on the
// parameters' device (of type `type`), of their dtype, dense and laid out like its
// parameter, with its number of elements. Messages name the list and the entry index,
// which the Python side turns into the user's parameter.
inline void check_list(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& like,
                       const char* backend, at::DeviceType type, const char* what) {
  TORCH_CHECK(ts.size() == like.size(), "sharpopt ", backend, ": ", what, " has ", ts.size(),
              " tensors, expected ", like.size());
  TORCH_CHECK(ts.size() < size_t(std::numeric_limits<int>::max()), "sharpopt ", backend,
              ": list too long");
  if (ts.empty()) return;
  // Read once per list: on small tensors these checks are a good part of a pass's cost.
  const at::Device device = like[0].device();
  const at::ScalarType dtype = like[0].scalar_type();
  const bool on_type = device.type() == type;
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK(t.defined() && on_type && t.device() == device, "sharpopt ", backend, ": ",
                what, "[", i, "] must be on ", on_type ? device : at::Device(type),
                t.defined() ? "" : " (got an undefined tensor)");
    TORCH_CHECK(t.scalar_type() == dtype, "sharpopt ", backend, ": ", what, "[", i,
                "] has dtype ", t.scalar_type(), ", expected ", dtype);
    if (t.unsafeGetTensorImpl() == like[i].unsafeGetTensorImpl()) {   // the parameter itself
      TORCH_CHECK(t.is_non_overlapping_and_dense(), "sharpopt ", backend, ": ", what, "[", i,
                  "] must be dense (strides ", t.strides(), ")");
      continue;
    }
    check_layout(t, like[i], backend, what, i);
    TORCH_CHECK(t.numel() == like[i].numel(), "sharpopt ", backend, ": ", what, "[", i,
                "] has ", t.numel(), " elements, expected ", like[i].numel());
  }
}

// The non-finite guard's flag (Ops.restore_sgd's found_inf): two contiguous fp32 values on
// the parameters' device, or null when the pass is not guarded.
inline float* found_inf_ptr(const std::optional<at::Tensor>& found_inf, const at::Tensor& like,
                            const char* backend) {
  if (!found_inf.has_value() || !found_inf->defined()) return nullptr;
  const at::Tensor& f = *found_inf;
  TORCH_CHECK(f.device() == like.device() && f.scalar_type() == at::kFloat && f.numel() == 2 &&
                  f.is_contiguous(),
              "sharpopt ", backend, ": found_inf must be a contiguous fp32 tensor of 2 ",
              "elements on ", like.device());
  return f.data_ptr<float>();
}

}  // namespace sharpopt
