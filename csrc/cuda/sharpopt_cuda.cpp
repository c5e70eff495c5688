// Torch binding of the `cuda` backend: checks the lists, allocates the small reduction
// workspace through torch's caching allocator, and hands raw pointers and the current
// stream to the kernels in sharpopt_kernels.cu. The Python-visible signatures are those of
// the CPU extension, so sharpopt/backends/cuda.py reuses the CPU marshalling.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cuda/sharpopt_cuda.h"
#include "sharpopt_checks.h"
#include "sharpopt_lists.h"

namespace {

using at::Tensor;
using sharpopt::TensorList;
using OptTensor = std::optional<Tensor>;
namespace sc = sharpopt_cuda;

sc::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return sc::DType::kFloat32;
    case at::kDouble: return sc::DType::kFloat64;
    case at::kBFloat16: return sc::DType::kBFloat16;
    case at::kHalf: return sc::DType::kFloat16;
    default: TORCH_CHECK(false, "sharpopt cuda: unsupported dtype ", t.scalar_type());
  }
}

void check_list(const std::vector<Tensor>& ts, const std::vector<Tensor>& like, const char* what) {
  sharpopt::check_list(ts, like, "cuda", at::kCUDA, what);
}

// The launchers' host arrays are recycled buffers (sharpopt::Reused): the first large
// allocation after a backward pass is expensive (see sharpopt_lists.h).
template <class T>
using Host = sharpopt::Reused<T>;

Host<void*> ptrs(const std::vector<Tensor>& ts) {
  Host<void*> out;
  out.resize(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) out[i] = ts[i].data_ptr();
  return out;
}

// n null pointers: an absent operand list.
Host<void*> nulls(size_t n) {
  Host<void*> out;
  out.assign(n, nullptr);
  return out;
}

Host<int64_t> numels(const std::vector<Tensor>& ts) {
  Host<int64_t> out;
  out.resize(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) out[i] = ts[i].numel();
  return out;
}

// The row-mean buffer of tensor i (or null), checked against the gradient's first dim.
float* row_means_ptr(const std::vector<Tensor>& rm, size_t i, const Tensor& g) {
  if (rm.empty() || !rm[i].defined()) return nullptr;
  const Tensor& m = rm[i];
  TORCH_CHECK(g.dim() > 1, "sharpopt cuda: row_means[", i, "] given for a tensor with dim <= 1");
  sharpopt::check_rows(g, "cuda", i);
  TORCH_CHECK(m.device() == g.device() && m.scalar_type() == at::kFloat && m.is_contiguous() &&
                  m.numel() == g.size(0),
              "sharpopt cuda: row_means[", i, "] must be a contiguous fp32 tensor of ", g.size(0),
              " elements on ", g.device());
  return m.data_ptr<float>();
}

// A pass scalar; `keep` holds a converted copy alive until the kernels are enqueued (the
// caching allocator keeps it valid for work already queued on the stream).
sc::DevScalar dev_scalar(double value, const OptTensor& t, const at::Device& dev,
                         std::vector<Tensor>& keep) {
  sc::DevScalar s;
  s.value = value;
  if (!t.has_value() || !t->defined()) return s;
  TORCH_CHECK(t->numel() == 1, "sharpopt cuda: a tensor scalar must have one element");
  if (t->device().is_cpu()) {  // host memory: reading it does not synchronise
    s.value = t->to(at::kDouble).item<double>();
    return s;
  }
  TORCH_CHECK(t->device() == dev, "sharpopt cuda: a tensor scalar on ", t->device(),
              " used with tensors on ", dev);
  if (t->scalar_type() == at::kDouble) {
    keep.push_back(t->contiguous());
    s.f64 = keep.back().data_ptr<double>();
  } else {
    keep.push_back(t->to(at::kFloat).contiguous());
    s.f32 = keep.back().data_ptr<float>();
  }
  return s;
}

void check(cudaError_t err) { C10_CUDA_CHECK(err); }

Tensor sumsq(const TensorList& grads, const TensorList& params, bool adaptive,
             double eta, bool centralize, const sharpopt::OptionalTensorList& row_means) {
  if (grads.empty()) return at::zeros({}, at::kFloat);
  check_list(grads, grads, "grads");
  if (adaptive) check_list(params, grads, "params");
  TORCH_CHECK(row_means.empty() || row_means.size() == grads.size(),
              "sharpopt cuda: row_means must have one entry per tensor");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const int n = int(grads.size());
  const auto numel = numels(grads);
  Host<int64_t> row_len;
  row_len.assign(n, 0);
  Host<float*> means;
  means.assign(n, nullptr);
  for (int i = 0; i < n; ++i) {
    const Tensor& g = grads[i];
    means[i] = row_means_ptr(row_means, i, g);
    if (g.dim() > 1 && (centralize || means[i]) && g.numel() > 0) row_len[i] = g.numel() / g.size(0);
    if (means[i] && g.numel() == 0) row_means[i].fill_(std::numeric_limits<float>::quiet_NaN());
  }
  const auto g_ptrs = ptrs(grads);
  const auto w_ptrs = adaptive ? ptrs(params) : nulls(n);
  const bool f64 = grads[0].scalar_type() == at::kDouble;
  const auto opts = grads[0].options();
  const int64_t units = sc::reduction_units(n, numel.data(), row_len.data());
  Tensor ws = at::empty({std::max<int64_t>(units, 1)}, opts.dtype(at::kDouble));
  Tensor out = at::empty({}, opts.dtype(f64 ? at::kDouble : at::kFloat));
  check(sc::sumsq(dtype_of(grads[0]), n, g_ptrs.data(), w_ptrs.data(), numel.data(), row_len.data(),
                  means.data(), adaptive, eta, centralize, ws.data_ptr<double>(), out.data_ptr(),
                  c10::cuda::getCurrentCUDAStream()));
  return out;
}

Tensor dot(const TensorList& xs, const TensorList& ys) {
  if (xs.empty()) return at::zeros({}, at::kFloat);
  check_list(xs, xs, "xs");
  check_list(ys, xs, "ys");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const int n = int(xs.size());
  const auto numel = numels(xs);
  const auto x = ptrs(xs), y = ptrs(ys);
  const bool f64 = xs[0].scalar_type() == at::kDouble;
  const auto opts = xs[0].options();
  const int64_t units = sc::reduction_units(n, numel.data(), nullptr);
  Tensor ws = at::empty({std::max<int64_t>(units, 1)}, opts.dtype(at::kDouble));
  Tensor out = at::empty({}, opts.dtype(f64 ? at::kDouble : at::kFloat));
  check(sc::dot(dtype_of(xs[0]), n, x.data(), y.data(), numel.data(), ws.data_ptr<double>(),
                out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

// The non-finite guard's flag (see sharpopt_checks.h).
float* found_ptr(const OptTensor& found_inf, const Tensor& like) {
  return sharpopt::found_inf_ptr(found_inf, like, "cuda");
}

void perturb(const TensorList& params, const TensorList& grads,
             const TensorList& saved, double scale, const OptTensor& scale_t,
             bool adaptive, double eta, const sharpopt::OptionalTensorList& row_means, bool save,
             const OptTensor& found_inf) {
  if (params.empty()) return;
  check_list(params, params, "params");
  check_list(grads, params, "grads");
  check_list(saved, params, "saved");
  TORCH_CHECK(row_means.empty() || row_means.size() == params.size(),
              "sharpopt cuda: row_means must have one entry per tensor");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const int n = int(params.size());
  const auto numel = numels(params);
  Host<int64_t> row_len;
  row_len.assign(n, 0);
  Host<const float*> means;
  means.assign(n, nullptr);
  for (int i = 0; i < n; ++i) {
    means[i] = row_means_ptr(row_means, i, grads[i]);
    if (means[i] && grads[i].numel() > 0) row_len[i] = grads[i].numel() / grads[i].size(0);
  }
  std::vector<Tensor> keep;
  const auto s = dev_scalar(scale, scale_t, params[0].device(), keep);
  const auto w = ptrs(params), g = ptrs(grads), sv = ptrs(saved);
  check(sc::perturb(dtype_of(params[0]), n, w.data(), g.data(), sv.data(), numel.data(),
                    row_len.data(), means.data(), s, adaptive, eta, save,
                    found_ptr(found_inf, params[0]), c10::cuda::getCurrentCUDAStream()));
}

void restore(const TensorList& params, const TensorList& saved) {
  if (params.empty()) return;
  check_list(params, params, "params");
  check_list(saved, params, "saved");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto numel = numels(params);
  const auto w = ptrs(params), s = ptrs(saved);
  check(sc::restore(dtype_of(params[0]), int(params.size()), w.data(), s.data(), numel.data(),
                    c10::cuda::getCurrentCUDAStream()));
}

void lincomb(const TensorList& out, const std::vector<TensorList>& xs,
             const std::vector<double>& coefs, const std::vector<OptTensor>& coef_tensors) {
  const int K = int(xs.size());
  TORCH_CHECK(K >= 1 && K <= 3 && coefs.size() == size_t(K),
              "sharpopt cuda: lincomb takes 1 to 3 terms with one coefficient each");
  TORCH_CHECK(coef_tensors.empty() || coef_tensors.size() == size_t(K),
              "sharpopt cuda: coef_tensors must have one entry per term");
  if (out.empty()) return;
  check_list(out, out, "out");
  for (int k = 0; k < K; ++k) check_list(xs[k], out, "xs[k]");
  const c10::cuda::CUDAGuard guard(out[0].device());
  std::vector<Tensor> keep;
  sc::DevScalar c[3];
  for (int k = 0; k < K; ++k)
    c[k] = dev_scalar(coefs[k], coef_tensors.empty() ? OptTensor() : coef_tensors[k], out[0].device(), keep);
  const auto numel = numels(out);
  const auto o = ptrs(out);
  Host<void*> x[3];
  for (int k = 0; k < K; ++k) x[k] = ptrs(xs[k]);
  check(sc::lincomb(dtype_of(out[0]), int(out.size()), K, o.data(), x[0].data(),
                    K > 1 ? x[1].data() : nullptr, K > 2 ? x[2].data() : nullptr, numel.data(), c,
                    c10::cuda::getCurrentCUDAStream()));
}

void restore_sgd(const TensorList& params, const TensorList& saved, bool has_saved,
                 const TensorList& grads, const TensorList& bufs, double lr,
                 double weight_decay, double momentum, double dampening, bool nesterov,
                 bool maximize, bool init_buffers, const OptTensor& found_inf) {
  if (params.empty()) return;
  check_list(params, params, "params");
  check_list(grads, params, "grads");
  if (has_saved) check_list(saved, params, "saved");
  const bool has_mom = momentum != 0;
  if (has_mom) check_list(bufs, params, "momentum_buffers");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto args = sharpopt::math::make_sgd_args(lr, weight_decay, momentum, dampening, nesterov,
                                                   maximize, init_buffers);
  const auto numel = numels(params);
  const auto w = ptrs(params), g = ptrs(grads);
  const auto s = has_saved ? ptrs(saved) : Host<void*>();
  const auto b = has_mom ? ptrs(bufs) : Host<void*>();
  check(sc::restore_sgd(dtype_of(params[0]), int(params.size()), w.data(),
                        has_saved ? s.data() : nullptr, g.data(), has_mom ? b.data() : nullptr,
                        numel.data(), args, found_ptr(found_inf, params[0]),
                        c10::cuda::getCurrentCUDAStream()));
}

void restore_adam(const TensorList& params, const TensorList& saved, bool has_saved,
                  const TensorList& grads, const TensorList& exp_avgs,
                  const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs,
                  int64_t step, double lr, double beta1, double beta2, double eps,
                  double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                  const OptTensor& found_inf) {
  if (params.empty()) return;
  TORCH_CHECK(step >= 1, "sharpopt cuda: restore_adam needs step >= 1, got ", step);
  check_list(params, params, "params");
  check_list(grads, params, "grads");
  check_list(exp_avgs, params, "exp_avgs");
  check_list(exp_avg_sqs, params, "exp_avg_sqs");
  if (has_saved) check_list(saved, params, "saved");
  if (amsgrad) check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto args = sharpopt::math::make_adam_args(step, lr, beta1, beta2, eps, weight_decay,
                                                    decoupled, amsgrad, maximize);
  const auto numel = numels(params);
  const auto w = ptrs(params), g = ptrs(grads), m = ptrs(exp_avgs), v = ptrs(exp_avg_sqs);
  const auto s = has_saved ? ptrs(saved) : Host<void*>();
  const auto vm = amsgrad ? ptrs(max_exp_avg_sqs) : Host<void*>();
  check(sc::restore_adam(dtype_of(params[0]), int(params.size()), w.data(),
                         has_saved ? s.data() : nullptr, g.data(), m.data(), v.data(),
                         amsgrad ? vm.data() : nullptr, numel.data(), args,
                         found_ptr(found_inf, params[0]), c10::cuda::getCurrentCUDAStream()));
}

// The MSAM kernels read the move-back scale from device memory (their arguments have no
// room for a by-value copy): a Python float or a host tensor is copied to the device first.
sc::DevScalar msam_back_scalar(double back, const OptTensor& back_t, bool has_back,
                               const Tensor& like, std::vector<Tensor>& keep) {
  sc::DevScalar b = dev_scalar(back, back_t, like.device(), keep);
  if (has_back && !b.f32 && !b.f64) {
    keep.push_back(at::full({}, b.value, like.options().dtype(at::kDouble)));
    b.f64 = keep.back().data_ptr<double>();
  }
  return b;
}

// MSAM's fused step (see sharpopt.backends.base.Ops.msam_sgd / msam_adam); returns the
// sum of squares of the updated momentum as a 0-dim device tensor.
Tensor msam_sgd(const TensorList& params, const TensorList& grads,
                const TensorList& bufs, double back, const OptTensor& back_t,
                bool has_back, double lr, double weight_decay, double momentum, double dampening,
                bool nesterov, bool maximize, bool init_buffers) {
  if (params.empty()) return at::zeros({}, at::kFloat);
  TORCH_CHECK(momentum != 0, "sharpopt cuda: msam_sgd needs momentum != 0");
  TORCH_CHECK(!(has_back && init_buffers), "sharpopt cuda: msam_sgd cannot move back along "
              "buffers that do not exist yet (init_buffers)");
  check_list(params, params, "params");
  check_list(grads, params, "grads");
  check_list(bufs, params, "momentum_buffers");
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<Tensor> keep;
  const sc::DevScalar b = msam_back_scalar(back, back_t, has_back, params[0], keep);
  const auto args = sharpopt::math::make_sgd_args(lr, weight_decay, momentum, dampening, nesterov,
                                                   maximize, init_buffers);
  const int n = int(params.size());
  const auto numel = numels(params);
  const auto w = ptrs(params), g = ptrs(grads), m = ptrs(bufs);
  const auto opts = params[0].options();
  const bool f64 = params[0].scalar_type() == at::kDouble;
  Tensor ws = at::empty({std::max<int64_t>(sc::reduction_units(n, numel.data(), nullptr), 1)},
                        opts.dtype(at::kDouble));
  Tensor out = at::empty({}, opts.dtype(f64 ? at::kDouble : at::kFloat));
  check(sc::msam_sgd(dtype_of(params[0]), n, w.data(), g.data(), m.data(), numel.data(), args, b,
                     has_back, ws.data_ptr<double>(), out.data_ptr(),
                     c10::cuda::getCurrentCUDAStream()));
  return out;
}

Tensor msam_adam(const TensorList& params, const TensorList& grads,
                 const TensorList& exp_avgs, const TensorList& exp_avg_sqs,
                 const TensorList& max_exp_avg_sqs, double back, const OptTensor& back_t,
                 bool has_back, int64_t step, double lr, double beta1, double beta2, double eps,
                 double weight_decay, bool decoupled, bool amsgrad, bool maximize) {
  if (params.empty()) return at::zeros({}, at::kFloat);
  TORCH_CHECK(step >= 1, "sharpopt cuda: msam_adam needs step >= 1, got ", step);
  check_list(params, params, "params");
  check_list(grads, params, "grads");
  check_list(exp_avgs, params, "exp_avgs");
  check_list(exp_avg_sqs, params, "exp_avg_sqs");
  if (amsgrad) check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs");
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<Tensor> keep;
  const sc::DevScalar b = msam_back_scalar(back, back_t, has_back, params[0], keep);
  const auto args = sharpopt::math::make_adam_args(step, lr, beta1, beta2, eps, weight_decay,
                                                    decoupled, amsgrad, maximize);
  const int n = int(params.size());
  const auto numel = numels(params);
  const auto w = ptrs(params), g = ptrs(grads), m = ptrs(exp_avgs), v = ptrs(exp_avg_sqs);
  const auto vm = amsgrad ? ptrs(max_exp_avg_sqs) : Host<void*>();
  const auto opts = params[0].options();
  const bool f64 = params[0].scalar_type() == at::kDouble;
  Tensor ws = at::empty({std::max<int64_t>(sc::reduction_units(n, numel.data(), nullptr), 1)},
                        opts.dtype(at::kDouble));
  Tensor out = at::empty({}, opts.dtype(f64 ? at::kDouble : at::kFloat));
  check(sc::msam_adam(dtype_of(params[0]), n, w.data(), g.data(), m.data(), v.data(),
                      amsgrad ? vm.data() : nullptr, numel.data(), args, b, has_back,
                      ws.data_ptr<double>(), out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sharpopt fused CUDA passes (see sharpopt.backends.base for the contract)";
  m.def("sumsq", &sumsq);
  m.def("dot", &dot);
  m.def("perturb", &perturb);
  m.def("restore", &restore);
  m.def("lincomb", &lincomb);
  m.def("restore_sgd", &restore_sgd);
  m.def("restore_adam", &restore_adam);
  m.def("msam_sgd", &msam_sgd);
  m.def("msam_adam", &msam_adam);
}
