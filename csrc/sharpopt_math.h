// Per-element math of every sharpopt pass, shared by the CPU and the CUDA code.
//
// Each update is written once, as a template over the arithmetic type `T`. The CPU
// backend instantiates it with `float`/`double` (scalar tails) and with
// `at::vec::Vectorized<float|double>` (vector bodies); the CUDA kernels instantiate it
// with `float`/`double` in registers. bf16/fp16 values are widened to fp32 before they
// reach these functions and rounded once when stored, so the functions never see them.
//
// The helpers `sopt_abs`, `sopt_sqrt`, `sopt_max`, `sopt_keep` are called unqualified: a caller that
// instantiates the templates with its own vector type declares overloads for it in
// namespace `sharpopt::math` *before* including this header (see csrc/cpu/).
//
// This header must stay free of torch and of the CUDA runtime so that `nvcc -c` and a
// plain C++ compiler can both use it.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SOPT_HD __host__ __device__ __forceinline__
#else
#define SOPT_HD inline
#endif

namespace sharpopt {
namespace math {

SOPT_HD float sopt_abs(float x) { return fabsf(x); }
SOPT_HD double sopt_abs(double x) { return fabs(x); }
SOPT_HD float sopt_sqrt(float x) { return sqrtf(x); }
SOPT_HD double sopt_sqrt(double x) { return sqrt(x); }
// NaN-propagating like torch.maximum (fmax would drop a NaN).
SOPT_HD float sopt_max(float a, float b) { return (a != a || a > b) ? a : b; }
SOPT_HD double sopt_max(double a, double b) { return (a != a || a > b) ? a : b; }
// `old` where z is NaN, else `fresh` (the non-finite guard below).
SOPT_HD float sopt_keep(float z, float fresh, float old) { return z != z ? old : fresh; }
SOPT_HD double sopt_keep(double z, double fresh, double old) { return z != z ? old : fresh; }

// ---------------------------------------------------------------------------------
// perturb:  w <- s + scale * T^2 (g - mu),  T = |s| + eta  (T = 1 unless adaptive)
// `s` is the unperturbed weight; `mu` the row mean of g (0 when not centralising).
// The product is formed as ((d * T) * T) like the reference so fp32 results agree.
// ---------------------------------------------------------------------------------
template <class T>
struct PerturbArgs {
  T scale;
  T eta;
  bool adaptive;
};

template <class T>
SOPT_HD T perturb_elem(T s, T g, T mu, const PerturbArgs<T>& a) {
  T d = g - mu;
  if (a.adaptive) {
    T t = sopt_abs(s) + a.eta;
    d = d * t * t;
  }
  return s + a.scale * d;
}

// Term of the norm pass: (T (g - mu))^2 with T = |w| + eta when adaptive.
template <class T>
SOPT_HD T weighted_dev(T w, T g, T mu, T eta, bool adaptive) {
  T d = g - mu;
  return adaptive ? (sopt_abs(w) + eta) * d : d;
}

// ---------------------------------------------------------------------------------
// lincomb:  out <- c0 x0 + c1 x1 + c2 x2   (K = 1..3 terms, summed left to right)
// ---------------------------------------------------------------------------------
template <int K, class T>
SOPT_HD T lincomb_elem(const T (&x)[3], const T (&c)[3]) {
  T acc = c[0] * x[0];
  if (K > 1) acc = acc + c[1] * x[1];
  if (K > 2) acc = acc + c[2] * x[2];
  return acc;
}

// ---------------------------------------------------------------------------------
// torch.optim.SGD, one element (after w has been restored):
//   d   <- sign * g + wd * w                       (sign = -1 when maximize)
//   buf <- d                     if init
//   buf <- momentum * buf + (1 - dampening) * d    otherwise      (momentum != 0 only)
//   d   <- d + momentum * buf  if nesterov  else buf               (momentum != 0 only)
//   w   <- w - lr * d
// ---------------------------------------------------------------------------------
template <class T>
struct SgdArgs {
  T lr;
  T weight_decay;
  T momentum;
  T one_minus_dampening;
  T grad_sign;
  bool has_momentum;
  bool nesterov;
  bool init;
};

template <class T>
SOPT_HD void sgd_elem(T& w, T& buf, T g, const SgdArgs<T>& a) {
  T d = a.grad_sign * g + a.weight_decay * w;
  if (a.has_momentum) {
    buf = a.init ? d : a.momentum * buf + a.one_minus_dampening * d;
    d = a.nesterov ? d + a.momentum * buf : buf;
  }
  w = w - a.lr * d;
}

// ---------------------------------------------------------------------------------
// torch.optim.Adam / AdamW, one element (after w has been restored):
//   d    <- sign * g
//   w    <- w * (1 - lr wd)                 if decoupled      (AdamW)
//   d    <- d + wd * w                      otherwise         (Adam)
//   m    <- m + (1 - beta1) (d - m)
//   v    <- beta2 v + (1 - beta2) d^2
//   vmax <- max(vmax, v), used instead of v below             (amsgrad only)
//   w    <- w - (step_size * m) / (sqrt(v) / sqrt(1 - beta2^step) + eps)
// with step_size = lr / (1 - beta1^step), computed by the caller in double.
// ---------------------------------------------------------------------------------
template <class T>
struct AdamArgs {
  T grad_sign;
  T decay;          // 1 - lr * wd (decoupled) or 1
  T weight_decay;   // wd (coupled) or 0
  T one_minus_beta1;
  T beta2;
  T one_minus_beta2;
  T bc2_sqrt;
  T eps;
  T step_size;
  bool decoupled;
  bool amsgrad;
};

template <class T>
SOPT_HD void adam_elem(T& w, T& m, T& v, T& vmax, T g, const AdamArgs<T>& a) {
  T d = a.grad_sign * g;
  if (a.decoupled) {
    w = w * a.decay;
  } else {
    d = d + a.weight_decay * w;
  }
  m = m + a.one_minus_beta1 * (d - m);
  v = a.beta2 * v + a.one_minus_beta2 * d * d;
  T vv = v;
  if (a.amsgrad) {
    vmax = sopt_max(vmax, v);
    vv = vmax;
  }
  T denom = sopt_sqrt(vv) / a.bc2_sqrt + a.eps;
  w = w - (a.step_size * m) / denom;
}

// ---------------------------------------------------------------------------------
// The non-finite guard of the update passes (check_finite): an element whose gradient g
// is inf or NaN keeps its weight (the restored w) and its optimizer state; every other
// element takes the step. z = g - g is 0 for a finite g and NaN otherwise, and `seen`
// accumulates z, so it ends NaN when any element was skipped (the caller sets found_inf).
// A momentum buffer created by this step (init) starts at 0 where its element is skipped.
// ---------------------------------------------------------------------------------
template <class T>
SOPT_HD void sgd_elem_guarded(T& w, T& buf, T g, const SgdArgs<T>& a, T& seen) {
  const T w0 = w;
  const T b0 = a.init ? T(0.0) : buf;
  sgd_elem(w, buf, g, a);
  const T z = g - g;
  w = sopt_keep(z, w, w0);
  buf = sopt_keep(z, buf, b0);
  seen = seen + z;
}

template <class T>
SOPT_HD void adam_elem_guarded(T& w, T& m, T& v, T& vmax, T g, const AdamArgs<T>& a,
                               T& seen) {
  const T w0 = w, m0 = m, v0 = v, x0 = vmax;
  adam_elem(w, m, v, vmax, g, a);
  const T z = g - g;
  w = sopt_keep(z, w, w0);
  m = sopt_keep(z, m, m0);
  v = sopt_keep(z, v, v0);
  if (a.amsgrad) vmax = sopt_keep(z, vmax, x0);
  seen = seen + z;
}

// ---------------------------------------------------------------------------------
// Host side: the pass arguments from the Python-level hyper-parameters, in double; each
// backend casts them once to its arithmetic type.
// ---------------------------------------------------------------------------------
inline SgdArgs<double> make_sgd_args(double lr, double weight_decay, double momentum,
                                     double dampening, bool nesterov, bool maximize, bool init) {
  return {lr, weight_decay, momentum, 1.0 - dampening, maximize ? -1.0 : 1.0,
          momentum != 0.0, nesterov, init};
}

inline AdamArgs<double> make_adam_args(long long step, double lr, double beta1, double beta2,
                                       double eps, double weight_decay, bool decoupled,
                                       bool amsgrad, bool maximize) {
  const double bc1 = 1.0 - std::pow(beta1, double(step));
  const double bc2 = 1.0 - std::pow(beta2, double(step));
  return {maximize ? -1.0 : 1.0,
          decoupled ? 1.0 - lr * weight_decay : 1.0,
          decoupled ? 0.0 : weight_decay,
          1.0 - beta1, beta2, 1.0 - beta2, std::sqrt(bc2), eps, lr / bc1,
          decoupled, amsgrad};
}

// ---------------------------------------------------------------------------------
// MSAM's move back from w~ = w - s m to w, with the scale s kept from the last step:
//   w <- w~ + s * m        (m the momentum before this step's update)
// followed in the same pass by sgd_elem / adam_elem at w.
// ---------------------------------------------------------------------------------
template <class T>
SOPT_HD T msam_back_elem(T w_tilde, T m, T s) {
  return w_tilde + s * m;
}

}  // namespace math
}  // namespace sharpopt
