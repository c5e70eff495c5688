// Host helpers of the step plan (sharpopt/_host.py), bound into the cpu extension: walks
// over parameter lists that Python would make one tensor at a time.
#pragma once

#include <torch/extension.h>

namespace sharpopt {
namespace cpu {

// Adds grad_key, grad_key_is, grads, grads_into, clear_list, first_unlike, data_ptrs and
// numels to module `m`.
void bind_host(pybind11::module_& m);

}  // namespace cpu
}  // namespace sharpopt
