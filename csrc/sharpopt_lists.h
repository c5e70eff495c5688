// Tensor-list arguments of the cpu and cuda bindings, taken from Python without copying a
// tensor handle.
//
// Why: on small tensors a step's cost is the host's, and most of it was the list
// arguments. pybind11's list conversion copies every at::Tensor, and a copy of a tensor
// that has a Python object is not a plain reference-count increment: the copy and its
// release keep the Python object alive, about 45 ns per entry (torch 2.13, measured). A
// SAM+SGD step hands eight lists to the passes, so that was ~0.4 us per parameter, more
// than the passes themselves on small tensors. Here each entry of the Python list or tuple
// is borrowed (c10::MaybeOwnedTraits' borrow: no count taken, none given back), 2-3 ns.
//
// Borrowing is safe because the Python list holds its entries for the whole call (pybind11
// holds the argument, and nothing in a pass runs Python code or releases the GIL). A
// TensorList is never copied (the copy constructor is deleted); a tensor copied out of one
// takes its own reference as usual. Only the binding's argument type changes (a TensorList
// is a std::vector<at::Tensor> whose buffer is recycled, see Reused), so the passes and
// the shared checks read it as before.
// Anything that is not a list or tuple of tensors is refused by pybind11's TypeError.
#pragma once

#include <torch/extension.h>

#include <c10/util/MaybeOwned.h>

#include <utility>
#include <vector>

namespace sharpopt {

// A std::vector whose buffer is recycled: taken from a per-thread free list when made,
// handed back (emptied, capacity kept) when destroyed. Why: right after a backward pass the
// C allocator holds thousands of freed small blocks (old gradients, autograd nodes), and
// glibc merges them all on the first request of 1 KiB or more - 0.2-0.3 ms at a thousand
// parameters, measured, landing on whatever asks first. A pass's lists and work units are
// such requests (8 bytes per tensor and more), so a step allocated them anew every pass;
// recycled, a step in steady state asks the allocator for no large block at all. Passes
// run with the GIL held and never re-enter, so a handful of buffers per thread suffices.
template <class T>
class Reused : public std::vector<T> {
 public:
  Reused() {
    auto& spare = free_list();
    if (!spare.empty()) {
      std::vector<T>::swap(spare.back());
      spare.pop_back();
    }
  }
  Reused(const Reused&) = delete;
  Reused& operator=(const Reused&) = delete;
  Reused(Reused&& other) noexcept : std::vector<T>(std::move(other)) {}
  Reused& operator=(Reused&& other) noexcept {
    std::vector<T>::operator=(std::move(other));
    return *this;
  }
  ~Reused() {
    if (this->capacity() == 0) return;
    this->clear();
    auto& spare = free_list();
    if (spare.size() < kKept) {
      spare.emplace_back();
      spare.back().swap(*this);
    }
  }

 private:
  static constexpr size_t kKept = 16;   // more lists than any pass holds at once
  static std::vector<std::vector<T>>& free_list() {
    thread_local std::vector<std::vector<T>> spare;
    return spare;
  }
};

struct TensorList : Reused<at::Tensor> {
  TensorList() = default;
  TensorList(const TensorList&) = delete;
  TensorList& operator=(const TensorList&) = delete;
  TensorList(TensorList&&) noexcept = default;      // moves the borrowed handles
  TensorList& operator=(TensorList&& other) noexcept {
    release();
    Reused<at::Tensor>::operator=(std::move(other));
    return *this;
  }
  ~TensorList() { release(); }   // then ~Reused keeps the buffer

  // Entry i borrowed from the Python tensor `obj` (which must outlive this list).
  void borrow(PyObject* obj) {
    push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(obj)));
  }
  // Ask the memory for every tensor's metadata, which a pass reads next (checks, sizes,
  // the storage pointer) one tensor at a time between its other work: in a step that
  // starts with cold caches (after a backward pass) each miss would then wait alone; this
  // tight loop lets them overlap (~15 % of the passes' host time on one-element tensors
  // after other code has run; prefetching the storage records too measured no better).
  // A TensorImpl is 176 bytes in torch 2.13, so it spans up to four cache lines (a
  // prefetch past its end is harmless: it never faults).
  void prefetch() const {
    for (const at::Tensor& t : *this) {
      const char* impl = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
      for (int line = 0; line < 4; ++line) __builtin_prefetch(impl + 64 * line);
    }
  }
  // Hand every borrowed handle back without touching a reference count.
  void release() {
    for (at::Tensor& t : *this) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    clear();
  }
};

// A list whose entries may also be None (an undefined tensor), such as the row means of
// gradient centralisation (None for a tensor with dim <= 1).
struct OptionalTensorList : TensorList {};

}  // namespace sharpopt

namespace pybind11 {
namespace detail {

// Reads a Python list or tuple in place into a borrowing list (see TensorList).
template <class List, bool kNone>
struct borrowing_list_caster {
  PYBIND11_TYPE_CASTER(List, const_name<kNone>("List[Optional[torch.Tensor]]",
                                               "List[torch.Tensor]"));

  bool load(handle src, bool /*convert*/) {
    PyObject* obj = src.ptr();
    const bool is_list = PyList_Check(obj);
    if (!is_list && !PyTuple_Check(obj)) return false;
    const Py_ssize_t n = is_list ? PyList_GET_SIZE(obj) : PyTuple_GET_SIZE(obj);
    value.release();
    value.reserve(size_t(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = is_list ? PyList_GET_ITEM(obj, i) : PyTuple_GET_ITEM(obj, i);
      if (kNone && item == Py_None) {
        value.emplace_back();
        continue;
      }
      if (!THPVariable_Check(item)) return false;
      value.borrow(item);
    }
    value.prefetch();
    return true;
  }
  // Never returned to Python: a TensorList only borrows.
};

template <>
struct type_caster<sharpopt::TensorList> : borrowing_list_caster<sharpopt::TensorList, false> {};

template <>
struct type_caster<sharpopt::OptionalTensorList>
    : borrowing_list_caster<sharpopt::OptionalTensorList, true> {};

}  // namespace detail
}  // namespace pybind11
