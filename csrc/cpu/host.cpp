// Host helpers of the step plan (sharpopt/_host.py); they read parameters of any device
// and take Python lists as they are, so a step pays one C++ call per walk instead of one
// Python operation per tensor.
#include "host.h"

#include "sharpopt_checks.h"

#include <cstdint>
#include <cstring>
#include <string>

namespace {

namespace py = pybind11;

// The tensor at `item` of a list, refused with a TypeError when not a tensor.
const at::Tensor& tensor_at(PyObject* item) {
  if (!THPVariable_Check(item)) throw py::type_error("sharpopt: a tensor list holds a non-tensor");
  return THPVariable_Unpack(item);
}

// Calls visit(param) for every parameter of the lists `groups` (one per param group) that
// has a gradient now, in order, until visit returns false; false when it stopped early.
template <class Visit>
bool for_each_with_grad(const py::list& groups, const Visit& visit) {
  for (const py::handle& group : groups) {
    PyObject* ps = group.ptr();
    if (!PyList_Check(ps)) throw py::type_error("sharpopt: grad_key takes lists of parameters");
    const Py_ssize_t n = PyList_GET_SIZE(ps);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyList_GET_ITEM(ps, i);
      // The TensorImpl's own slot: Tensor::grad() would also warn for non-leaf tensors.
      if (tensor_at(item).unsafeGetTensorImpl()->grad().defined() && !visit(item)) return false;
    }
  }
  return true;
}

// Those parameters' addresses in order, as bytes. Equal bytes mean the same parameters, in
// the same order, have gradients (the caller's plan holds them, so no address is reused
// meanwhile).
py::bytes grad_key(const py::list& groups) {
  std::string out;
  for_each_with_grad(groups, [&](PyObject* item) {
    out.append(reinterpret_cast<const char*>(&item), sizeof(item));
    return true;
  });
  return py::bytes(out);
}

// Whether `key` (bytes from grad_key) still says which parameters of `groups` have a
// gradient: the same comparison as grad_key(groups) == key, without making the new key
// (no allocation, so no call into the C allocator in a step; see Reused).
bool grad_key_is(const py::list& groups, const py::bytes& key) {
  const char* want = PyBytes_AS_STRING(key.ptr());
  const size_t size = size_t(PyBytes_GET_SIZE(key.ptr()));
  size_t at = 0;
  const bool prefix = for_each_with_grad(groups, [&](PyObject* item) {
    if (at + sizeof(item) > size || std::memcmp(want + at, &item, sizeof(item)) != 0)
      return false;
    at += sizeof(item);
    return true;
  });
  return prefix && at == size;
}

// The gradient of `param` as a new reference (None where it has none).
PyObject* grad_of(PyObject* param) {
  const at::Tensor& g = tensor_at(param).unsafeGetTensorImpl()->grad();
  if (!g.defined()) {
    Py_INCREF(Py_None);
    return Py_None;
  }
  PyObject* obj = THPVariable_Wrap(g);
  if (obj == nullptr) throw py::error_already_set();
  return obj;
}

// [p.grad for p in params] (None where a parameter has none), without Python attribute
// look-ups.
py::list grads(const py::list& params) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  py::list out(n);
  for (Py_ssize_t i = 0; i < n; ++i)
    PyList_SET_ITEM(out.ptr(), i, grad_of(PyList_GET_ITEM(params.ptr(), i)));  // steals
  return out;
}

// out[i] = params[i].grad in place (out as long as params): a list kept for the purpose is
// refilled each pass without allocating one (see Reused for why that matters).
void grads_into(const py::list& params, const py::list& out) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  if (PyList_GET_SIZE(out.ptr()) != n) throw py::value_error("sharpopt: grads_into lists differ in length");
  // The sizes are read again each time: releasing a tensor may run Python code.
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(out.ptr()) && i < PyList_GET_SIZE(params.ptr()); ++i) {
    PyObject* old = PyList_GET_ITEM(out.ptr(), i);
    PyList_SET_ITEM(out.ptr(), i, grad_of(PyList_GET_ITEM(params.ptr(), i)));
    Py_DECREF(old);
  }
}

// Every entry of `xs` set to None in place (lets go of the tensors, keeps the list's size).
void clear_list(const py::list& xs) {
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(xs.ptr()); ++i) {   // see grads_into
    PyObject* old = PyList_GET_ITEM(xs.ptr(), i);
    Py_INCREF(Py_None);
    PyList_SET_ITEM(xs.ptr(), i, Py_None);
    Py_DECREF(old);
  }
}

// Whether t's dimensions longer than one, taken in order of stride, fill one block of
// memory exactly once (contiguous, channels_last, a transpose of either...): the rule of
// sharpopt.backends.base.is_dense.
bool fills_one_block(const at::Tensor& t) {
  c10::SmallVector<std::pair<int64_t, int64_t>, 8> dims;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

// The index of the first entry of `xs` (tensors or None) that a triton pass cannot walk as
// one flat array beside its parameter like[i], or -1: it must be on like[0]'s device, and
// contiguous (where the parameter is, or has another shape: a flat view) or dense and laid
// out like the parameter. The rule of kernels/tables.py, read here for a thousand tensors
// in microseconds (the launch tables are rebuilt whenever the gradients are new tensors).
int64_t first_unlike(const py::list& xs, const py::list& like) {
  const Py_ssize_t n = PyList_GET_SIZE(xs.ptr());
  if (n == 0) return -1;
  if (PyList_GET_SIZE(like.ptr()) < n) throw py::index_error("sharpopt: first_unlike: like is shorter");
  const at::Device device = tensor_at(PyList_GET_ITEM(like.ptr(), 0)).device();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(xs.ptr(), i);
    if (item == Py_None) continue;
    const at::Tensor& t = tensor_at(item);
    const at::Tensor& p = tensor_at(PyList_GET_ITEM(like.ptr(), i));
    const bool ok = t.device() == device &&
                    ((t.is_contiguous() && (p.is_contiguous() || t.sizes() != p.sizes())) ||
                     (fills_one_block(t) && sharpopt::same_layout(t, p)));
    if (!ok) return int64_t(i);
  }
  return -1;
}

// Bytes of one 8-byte value per entry of the list `xs` (tensors or None): the tensor's data
// address (0 for None), or its element count. Keys of the triton backend's launch tables.
template <class F>
py::bytes per_entry(const py::list& xs, const F& value) {
  const Py_ssize_t n = PyList_GET_SIZE(xs.ptr());
  std::string out(size_t(n) * sizeof(int64_t), '\0');
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(xs.ptr(), i);
    const int64_t v = item == Py_None ? 0 : value(tensor_at(item));
    std::memcpy(&out[size_t(i) * sizeof(int64_t)], &v, sizeof(v));
  }
  return py::bytes(out);
}

// data_ptr() as Tensor.data_ptr() gives it (a copy-on-write tensor gets its own memory).
py::bytes data_ptrs(const py::list& xs) {
  return per_entry(xs, [](const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); });
}

py::bytes numels(const py::list& xs) {
  return per_entry(xs, [](const at::Tensor& t) { return t.numel(); });
}

}  // namespace

namespace sharpopt {
namespace cpu {

void bind_host(py::module_& m) {
  m.def("grad_key", &grad_key, "addresses of the parameters that have a gradient (bytes)");
  m.def("grad_key_is", &grad_key_is, "grad_key(groups) == key, without making the key");
  m.def("grads", &grads, "[p.grad for p in params]");
  m.def("grads_into", &grads_into, "out[i] = params[i].grad, in place");
  m.def("clear_list", &clear_list, "every entry set to None, in place");
  m.def("first_unlike", &first_unlike, "first entry a triton pass cannot walk beside its parameter");
  m.def("data_ptrs", &data_ptrs, "data addresses of a tensor list (bytes, 0 for None)");
  m.def("numels", &numels, "element counts of a tensor list (bytes)");
}

}  // namespace cpu
}  // namespace sharpopt
