// The `cpu` backend: every pass of sharpopt.backends.base.Ops as one C++ call over whole
// tensor lists, multi-threaded with at::parallel_for and vectorised with at::vec.
//
// Work is cut into units that depend only on the tensor shapes (kChunk elements, or whole
// rows for gradient centralisation), never on the thread count, and every reduction sums
// per-unit partials in unit order: results are bit-identical from run to run and for any
// number of threads.
#include <torch/extension.h>

#include "engine.h"
#include "host.h"
#include "sharpopt_checks.h"
#include "sharpopt_lists.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using sharpopt::TensorList;
using namespace sharpopt::cpu;

// ---------------------------------------------------------------------------------
// Argument checks. Lists hold dense, non-overlapping CPU tensors of one dtype; entry i of
// every list has the numel of params[i] and its memory order: the passes walk all operands
// of a parameter as one flat array, which is right for contiguous and channels_last alike
// as long as they are laid out the same way.
// ---------------------------------------------------------------------------------
void check_list(const std::vector<Tensor>& ts, const std::vector<Tensor>& like, const char* what) {
  sharpopt::check_list(ts, like, "cpu", at::kCPU, what);
}

void check_dtype(const std::vector<Tensor>& ts) {
  if (ts.empty()) return;
  const auto dt = ts[0].scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "sharpopt cpu: unsupported dtype ", dt);
}

using OptTensor = std::optional<Tensor>;

// The data of an operand that check_list has accepted (its dtype is the dispatched R's, it
// is a dense CPU tensor): data_ptr<R>() would test the dtype again, out of line, once per
// tensor and list, a visible share of a pass's host time on small tensors. The storage
// checks (present, allocated) stay.
template <class R>
inline R* data_of(const Tensor& t) {
  return t.unsafeGetTensorImpl()->mutable_data_ptr_impl<R>();
}

// The row-mean buffer of tensor i, or null when it has none.
float* row_means_ptr(const std::vector<Tensor>& rm, size_t i, const Tensor& g) {
  if (rm.empty() || !rm[i].defined()) return nullptr;
  const Tensor& m = rm[i];
  TORCH_CHECK(g.dim() > 1, "sharpopt cpu: row_means[", i, "] given for a tensor with dim <= 1");
  sharpopt::check_rows(g, "cpu", i);
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.is_contiguous() &&
                  m.numel() == g.size(0),
              "sharpopt cpu: row_means[", i, "] must be a contiguous fp32 CPU tensor of ",
              g.size(0), " elements");
  return m.data_ptr<float>();
}

Tensor scalar_out(double value, bool fp64) {
  return fp64 ? at::scalar_tensor(value, at::kDouble) : at::scalar_tensor(float(value), at::kFloat);
}

double sum_partials(const std::vector<double>& p) {
  double acc = 0;
  for (double x : p) acc += x;
  return acc;
}

// ---------------------------------------------------------------------------------
// sumsq: sum_i ||T_i * C_i(g_i)||^2, and the per-row means of g_i into row_means[i].
// A tensor that needs its row means (centralised, or a buffer given) is reduced row by
// row with two passes over each row: the exact mean first, then the centred sum of
// squares (no cancellation, and a row is small enough to be read again from cache).
// ---------------------------------------------------------------------------------
double sumsq_sum(const TensorList& grads, const TensorList& params, bool adaptive,
                 double eta, bool centralize, const sharpopt::OptionalTensorList& row_means) {
  if (grads.empty()) return 0.0;
  check_dtype(grads);
  check_list(grads, grads, "grads");
  if (adaptive) check_list(params, grads, "params");
  TORCH_CHECK(row_means.empty() || row_means.size() == grads.size(),
              "sharpopt cpu: row_means must have one entry per tensor");

  sharpopt::Reused<float*> means;
  means.assign(grads.size(), nullptr);
  sharpopt::Reused<Unit> units;
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    means[i] = row_means_ptr(row_means, i, g);
    const bool rows = g.dim() > 1 && (centralize || means[i]);
    if (rows && g.size(0) > 0 && g.numel() == 0 && means[i]) {
      // Mean of an empty row: NaN, as torch.mean says.
      std::fill(means[i], means[i] + g.size(0), std::numeric_limits<float>::quiet_NaN());
    }
    if (g.numel() == 0) continue;
    if (rows) add_row_units(units, int32_t(i), g.size(0), g.numel() / g.size(0));
    else add_element_units(units, int32_t(i), g.numel());
  }
  sharpopt::Reused<double> partial;
  partial.assign(units.size(), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads[0].scalar_type(), "sharpopt_sumsq", [&] {
    using R = scalar_t;
    using S = OpMath<R>;
    const S s_eta = S(eta);
    const Vec<S> v_eta = Vec<S>(s_eta);
    for_units(units, [&](const Unit& u, int64_t idx) {
      const R* g = data_of<R>(grads[u.t]);
      const R* w = adaptive ? data_of<R>(params[u.t]) : nullptr;
      auto sq = [&](const R* gp, const R* wp, int64_t n, double mu) {
        const S s_mu = S(mu);
        const Vec<S> v_mu = Vec<S>(s_mu);
        auto term = [&](auto& x) {
          using T = Elem<decltype(x)>;
          T d = weighted_dev(adaptive ? x[1] : x[0], x[0], pick<T, S>(s_mu, v_mu),
                             pick<T, S>(s_eta, v_eta), adaptive);
          return d * d;
        };
        if (adaptive) {
          const R* in[2] = {gp, wp};
          return reduce<2, R>(in, n, term);
        }
        const R* in[1] = {gp};
        return reduce<1, R>(in, n, term);
      };
      if (u.row_len == 0) {
        partial[idx] = sq(g + u.begin, w ? w + u.begin : nullptr, u.end - u.begin, 0.0);
        return;
      }
      double acc = 0;
      for (int64_t r = u.begin; r < u.end; ++r) {
        const int64_t off = r * u.row_len;
        const R* in[1] = {g + off};
        const double mean =
            reduce<1, R>(in, u.row_len, [](auto& x) { return x[0]; }) / double(u.row_len);
        if (means[u.t]) means[u.t][r] = float(mean);
        acc += sq(g + off, w ? w + off : nullptr, u.row_len, centralize ? mean : 0.0);
      }
      partial[idx] = acc;
    });
  });
  return sum_partials(partial);
}

// The sum as a 0-dim tensor of the accumulation dtype (fp32, or fp64 for fp64 gradients).
Tensor sumsq(const TensorList& grads, const TensorList& params, bool adaptive,
             double eta, bool centralize, const sharpopt::OptionalTensorList& row_means) {
  const double sum = sumsq_sum(grads, params, adaptive, eta, centralize, row_means);
  return scalar_out(sum, !grads.empty() && grads[0].scalar_type() == at::kDouble);
}

// The same value as a Python float, rounded to the tensor's dtype as `sumsq` stores it:
// where the step's scalars are read on the host anyway (CPU), no tensor is made.
double sumsq_value(const TensorList& grads, const TensorList& params, bool adaptive,
                   double eta, bool centralize, const sharpopt::OptionalTensorList& row_means) {
  const double sum = sumsq_sum(grads, params, adaptive, eta, centralize, row_means);
  return !grads.empty() && grads[0].scalar_type() == at::kDouble ? sum : double(float(sum));
}

Tensor dot(const TensorList& xs, const TensorList& ys) {
  if (xs.empty()) return scalar_out(0, false);
  check_dtype(xs);
  check_list(xs, xs, "xs");
  check_list(ys, xs, "ys");
  sharpopt::Reused<Unit> units;
  for (size_t i = 0; i < xs.size(); ++i) add_element_units(units, int32_t(i), xs[i].numel());
  sharpopt::Reused<double> partial;
  partial.assign(units.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xs[0].scalar_type(), "sharpopt_dot", [&] {
    using R = scalar_t;
    for_units(units, [&](const Unit& u, int64_t idx) {
      const R* in[2] = {data_of<R>(xs[u.t]) + u.begin, data_of<R>(ys[u.t]) + u.begin};
      partial[idx] = reduce<2, R>(in, u.end - u.begin, [](auto& x) { return x[0] * x[1]; });
    });
  });
  return scalar_out(sum_partials(partial), xs[0].scalar_type() == at::kDouble);
}

// A pass scalar: a Python float, or a 0-dim tensor (read in place: it lives on the CPU).
double scalar_value(double value, const OptTensor& t) {
  if (!t.has_value() || !t->defined()) return value;
  TORCH_CHECK(t->numel() == 1 && t->device().is_cpu(), "sharpopt cpu: a tensor scalar must be a one-element CPU tensor");
  return t->to(at::kDouble).data_ptr<double>()[0];
}

// The `found_inf` flag of the guarded passes (see sharpopt_checks.h).
float* found_ptr(const OptTensor& found_inf, const Tensor& like) {
  return sharpopt::found_inf_ptr(found_inf, like, "cpu");
}

// The guard's record of one work unit: the sum of z = g - g in both arithmetic types
// (see sgd_elem_guarded); NaN in any lane means an element was skipped.
template <class S>
struct Seen {
  S s = S(0);
  Vec<S> v = Vec<S>(S(0));
  template <class T>
  T& get() {
    if constexpr (std::is_same_v<T, S>) return s; else return v;
  }
  // Once per unit: with one-element tensors a unit per tensor, so no store and lane loop
  // (zero_mask has bit i set where lane i is 0, which isnan() leaves all but NaN lanes).
  bool any() const {
    constexpr int kAll = int((1u << Vec<S>::size()) - 1u);
    return s != s || v.isnan().zero_mask() != kAll;
  }
};

void restore(const TensorList& params, const TensorList& saved);

// ---------------------------------------------------------------------------------
// perturb: saved <- w (when save); w <- saved + scale * T^2 * C(g), T from saved.
// With found_inf[0] set (the step is skipped) e = 0: w is saved and left, or restored.
// ---------------------------------------------------------------------------------
void perturb(const TensorList& params, const TensorList& grads,
             const TensorList& saved, double scale, const OptTensor& scale_t,
             bool adaptive, double eta, const sharpopt::OptionalTensorList& row_means, bool save,
             const OptTensor& found_inf) {
  if (params.empty()) return;
  check_dtype(params);
  check_list(params, params, "params");
  check_list(grads, params, "grads");
  check_list(saved, params, "saved");
  const float* flag = found_ptr(found_inf, params[0]);
  if (flag && flag[0] != 0) {
    if (save) restore(saved, params); else restore(params, saved);
    return;
  }
  TORCH_CHECK(row_means.empty() || row_means.size() == params.size(),
              "sharpopt cpu: row_means must have one entry per tensor");
  const PerturbArgs<double> args{scalar_value(scale, scale_t), eta, adaptive};
  sharpopt::Reused<float*> means;
  means.assign(params.size(), nullptr);
  sharpopt::Reused<Unit> units;
  for (size_t i = 0; i < params.size(); ++i) {
    means[i] = row_means_ptr(row_means, i, grads[i]);
    if (params[i].numel() == 0) continue;
    if (means[i]) add_row_units(units, int32_t(i), grads[i].size(0), grads[i].numel() / grads[i].size(0));
    else add_element_units(units, int32_t(i), params[i].numel());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "sharpopt_perturb", [&] {
    using R = scalar_t;
    using S = OpMath<R>;
    const auto a = both<PerturbArgs, S>(args);
    for_units(units, [&](const Unit& u, int64_t) {
      R* w = data_of<R>(params[u.t]);
      R* s = data_of<R>(saved[u.t]);
      const R* g = data_of<R>(grads[u.t]);
      // stream 0: the unperturbed weight (read from w and saved when save, else from saved),
      // stream 1: the gradient, stream 2: the new w.
      auto run = [&](int64_t b, int64_t e, float mu) {
        const S s_mu = S(mu);
        const Vec<S> v_mu = Vec<S>(s_mu);
        auto f = [&](auto& x) {
          using T = Elem<decltype(x)>;
          x[2] = perturb_elem(x[0], x[1], pick<T, S>(s_mu, v_mu), a.template get<T>());
        };
        const R* in[3] = {save ? w + b : s + b, g + b, nullptr};
        R* out[3] = {save ? s + b : nullptr, nullptr, w + b};
        span<3, R>(in, out, e - b, f);
      };
      if (u.row_len == 0) {
        run(u.begin, u.end, 0.f);
      } else {
        for (int64_t r = u.begin; r < u.end; ++r) run(r * u.row_len, (r + 1) * u.row_len, means[u.t][r]);
      }
    });
  });
}

void restore(const TensorList& params, const TensorList& saved) {
  if (params.empty()) return;
  check_list(params, params, "params");
  check_list(saved, params, "saved");
  sharpopt::Reused<Unit> units;
  for (size_t i = 0; i < params.size(); ++i) add_element_units(units, int32_t(i), params[i].numel());
  const int64_t es = params[0].element_size();
  for_units(units, [&](const Unit& u, int64_t) {
    auto* dst = static_cast<char*>(params[u.t].data_ptr());
    const auto* src = static_cast<const char*>(saved[u.t].data_ptr());
    std::memcpy(dst + u.begin * es, src + u.begin * es, size_t((u.end - u.begin) * es));
  });
}

// ---------------------------------------------------------------------------------
// lincomb: out_i <- sum_k coefs[k] * xs[k][i], k < K <= 3.
// ---------------------------------------------------------------------------------
void lincomb(const TensorList& out, const std::vector<TensorList>& xs,
             const std::vector<double>& coefs, const std::vector<OptTensor>& coef_tensors) {
  const int K = int(xs.size());
  TORCH_CHECK(K >= 1 && K <= 3 && coefs.size() == size_t(K),
              "sharpopt cpu: lincomb takes 1 to 3 terms with one coefficient each");
  TORCH_CHECK(coef_tensors.empty() || coef_tensors.size() == size_t(K),
              "sharpopt cpu: coef_tensors must have one entry per term");
  if (out.empty()) return;
  check_dtype(out);
  check_list(out, out, "out");
  for (int k = 0; k < K; ++k) check_list(xs[k], out, "xs[k]");
  double c[3] = {0, 0, 0};
  for (int k = 0; k < K; ++k) c[k] = scalar_value(coefs[k], coef_tensors.empty() ? OptTensor() : coef_tensors[k]);
  sharpopt::Reused<Unit> units;
  for (size_t i = 0; i < out.size(); ++i) add_element_units(units, int32_t(i), out[i].numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out[0].scalar_type(), "sharpopt_lincomb", [&] {
    using R = scalar_t;
    using S = OpMath<R>;
    const S sc[3] = {S(c[0]), S(c[1]), S(c[2])};
    const Vec<S> vc[3] = {Vec<S>(sc[0]), Vec<S>(sc[1]), Vec<S>(sc[2])};
    auto go = [&](auto kconst) {
      constexpr int KK = decltype(kconst)::value;
      for_units(units, [&](const Unit& u, int64_t) {
        const R* in[4] = {nullptr, nullptr, nullptr, nullptr};
        R* o[4] = {nullptr, nullptr, nullptr, data_of<R>(out[u.t]) + u.begin};
        for (int k = 0; k < KK; ++k) in[k] = data_of<R>(xs[k][u.t]) + u.begin;
        auto f = [&](auto& x) {
          using T = Elem<decltype(x)>;
          const T terms[3] = {x[0], x[1], x[2]};
          const T cs[3] = {pick<T, S>(sc[0], vc[0]), pick<T, S>(sc[1], vc[1]), pick<T, S>(sc[2], vc[2])};
          x[3] = lincomb_elem<KK>(terms, cs);
        };
        span<4, R>(in, o, u.end - u.begin, f);
      });
    };
    if (K == 1) go(std::integral_constant<int, 1>());
    else if (K == 2) go(std::integral_constant<int, 2>());
    else go(std::integral_constant<int, 3>());
  });
}

// ---------------------------------------------------------------------------------
// restore + torch.optim.SGD step (see sgd_elem).
// ---------------------------------------------------------------------------------
void restore_sgd(const TensorList& params, const TensorList& saved, bool has_saved,
                 const TensorList& grads, const TensorList& bufs, double lr,
                 double weight_decay, double momentum, double dampening, bool nesterov,
                 bool maximize, bool init_buffers, const OptTensor& found_inf) {
  if (params.empty()) return;
  check_dtype(params);
  check_list(params, params, "params");
  check_list(grads, params, "grads");
  if (has_saved) check_list(saved, params, "saved");
  const bool has_mom = momentum != 0;
  if (has_mom) check_list(bufs, params, "momentum_buffers");
  float* flag = found_ptr(found_inf, params[0]);
  if (flag && flag[0] != 0) {            // a skipped step: put w back, leave the state
    if (has_saved) restore(params, saved);
    if (has_mom && init_buffers) for (const auto& b : bufs) b.zero_();   // new: start at 0
    return;
  }
  const auto args = make_sgd_args(lr, weight_decay, momentum, dampening, nesterov, maximize, init_buffers);
  sharpopt::Reused<Unit> units;
  for (size_t i = 0; i < params.size(); ++i) add_element_units(units, int32_t(i), params[i].numel());
  sharpopt::Reused<char> skipped;
  skipped.assign(flag ? units.size() : 0, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "sharpopt_restore_sgd", [&] {
    using R = scalar_t;
    using S = OpMath<R>;
    const auto a = both<SgdArgs, S>(args);
    for_units(units, [&](const Unit& u, int64_t idx) {
      const int64_t b = u.begin;
      R* w = data_of<R>(params[u.t]) + b;
      R* buf = has_mom ? data_of<R>(bufs[u.t]) + b : nullptr;
      // A first step overwrites the buffer without reading it.
      const R* in[3] = {has_saved ? data_of<R>(saved[u.t]) + b : w, data_of<R>(grads[u.t]) + b,
                        init_buffers ? nullptr : buf};
      R* out[3] = {w, nullptr, buf};
      if (!flag) {
        span<3, R>(in, out, u.end - b, [&](auto& x) {
          using T = Elem<decltype(x)>;
          sgd_elem(x[0], x[2], x[1], a.template get<T>());
        });
        return;
      }
      Seen<S> seen;
      span<3, R>(in, out, u.end - b, [&](auto& x) {
        using T = Elem<decltype(x)>;
        sgd_elem_guarded(x[0], x[2], x[1], a.template get<T>(), seen.template get<T>());
      });
      skipped[idx] = seen.any();
    });
  });
  if (std::any_of(skipped.begin(), skipped.end(), [](char c) { return c != 0; })) flag[1] = 1.f;
}

// ---------------------------------------------------------------------------------
// restore + torch.optim.Adam/AdamW step (see adam_elem).
// ---------------------------------------------------------------------------------
void restore_adam(const TensorList& params, const TensorList& saved, bool has_saved,
                  const TensorList& grads, const TensorList& exp_avgs,
                  const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs,
                  int64_t step, double lr, double beta1, double beta2, double eps,
                  double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                  const OptTensor& found_inf) {
  if (params.empty()) return;
  TORCH_CHECK(step >= 1, "sharpopt cpu: restore_adam needs step >= 1, got ", step);
  check_dtype(params);
  check_list(params, params, "params");
  check_list(grads, params, "grads");
  check_list(exp_avgs, params, "exp_avgs");
  check_list(exp_avg_sqs, params, "exp_avg_sqs");
  if (has_saved) check_list(saved, params, "saved");
  if (amsgrad) check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs");
  float* flag = found_ptr(found_inf, params[0]);
  if (flag && flag[0] != 0) {            // a skipped step: put w back, leave the state
    if (has_saved) restore(params, saved);
    return;
  }
  const auto args = make_adam_args(step, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize);
  sharpopt::Reused<Unit> units;
  for (size_t i = 0; i < params.size(); ++i) add_element_units(units, int32_t(i), params[i].numel());
  sharpopt::Reused<char> skipped;
  skipped.assign(flag ? units.size() : 0, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "sharpopt_restore_adam", [&] {
    using R = scalar_t;
    using S = OpMath<R>;
    const auto a = both<AdamArgs, S>(args);
    for_units(units, [&](const Unit& u, int64_t idx) {
      const int64_t b = u.begin;
      R* w = data_of<R>(params[u.t]) + b;
      R* m = data_of<R>(exp_avgs[u.t]) + b;
      R* v = data_of<R>(exp_avg_sqs[u.t]) + b;
      R* vmax = amsgrad ? data_of<R>(max_exp_avg_sqs[u.t]) + b : nullptr;
      const R* in[5] = {has_saved ? data_of<R>(saved[u.t]) + b : w, data_of<R>(grads[u.t]) + b, m, v, vmax};
      R* out[5] = {w, nullptr, m, v, vmax};
      if (!flag) {
        span<5, R>(in, out, u.end - b, [&](auto& x) {
          using T = Elem<decltype(x)>;
          adam_elem(x[0], x[2], x[3], x[4], x[1], a.template get<T>());
        });
        return;
      }
      Seen<S> seen;
      span<5, R>(in, out, u.end - b, [&](auto& x) {
        using T = Elem<decltype(x)>;
        adam_elem_guarded(x[0], x[2], x[3], x[4], x[1], a.template get<T>(), seen.template get<T>());
      });
      skipped[idx] = seen.any();
    });
  });
  if (std::any_of(skipped.begin(), skipped.end(), [](char c) { return c != 0; })) flag[1] = 1.f;
}

// ---------------------------------------------------------------------------------
// MSAM: move back from w~ (w <- w~ + back * m, when has_back), the base update at w, and
// the sum of squares of the updated momentum, in one pass. Each unit updates kFuseBlock
// elements, then sums the squares of the block's new momentum while it is in L1; the
// unit partials are added in unit order (bit-reproducible, as sumsq).
// ---------------------------------------------------------------------------------
template <int N, class R, class F>
double update_and_sumsq(const R* const (&in)[N], R* const (&out)[N], int m_stream, int64_t n,
                        const F& f) {
  double acc = 0;
  for (int64_t b = 0; b < n; b += kFuseBlock) {
    const int64_t len = std::min(kFuseBlock, n - b);
    const R* bin[N];
    R* bout[N];
    for (int k = 0; k < N; ++k) {
      bin[k] = in[k] ? in[k] + b : nullptr;
      bout[k] = out[k] ? out[k] + b : nullptr;
    }
    span<N, R>(bin, bout, len, f);
    const R* m[1] = {out[m_stream] + b};
    acc += reduce<1, R>(m, len, [](auto& x) { return x[0] * x[0]; });
  }
  return acc;
}

Tensor msam_sgd(const TensorList& params, const TensorList& grads,
                const TensorList& bufs, double back, const OptTensor& back_t,
                bool has_back, double lr, double weight_decay, double momentum, double dampening,
                bool nesterov, bool maximize, bool init_buffers) {
  if (params.empty()) return scalar_out(0, false);
  TORCH_CHECK(momentum != 0, "sharpopt cpu: msam_sgd needs momentum != 0");
  TORCH_CHECK(!(has_back && init_buffers), "sharpopt cpu: msam_sgd cannot move back along "
              "buffers that do not exist yet (init_buffers)");
  check_dtype(params);
  check_list(params, params, "params");
  check_list(grads, params, "grads");
  check_list(bufs, params, "momentum_buffers");
  const auto args = make_sgd_args(lr, weight_decay, momentum, dampening, nesterov, maximize, init_buffers);
  const double back_v = has_back ? scalar_value(back, back_t) : 0.0;
  sharpopt::Reused<Unit> units;
  for (size_t i = 0; i < params.size(); ++i) add_element_units(units, int32_t(i), params[i].numel());
  sharpopt::Reused<double> partial;
  partial.assign(units.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "sharpopt_msam_sgd", [&] {
    using R = scalar_t;
    using S = OpMath<R>;
    const auto a = both<SgdArgs, S>(args);
    const S s_back = S(back_v);
    const Vec<S> v_back = Vec<S>(s_back);
    auto f = [&](auto& x) {
      using T = Elem<decltype(x)>;
      if (has_back) x[0] = msam_back_elem(x[0], x[2], pick<T, S>(s_back, v_back));
      sgd_elem(x[0], x[2], x[1], a.template get<T>());
    };
    for_units(units, [&](const Unit& u, int64_t idx) {
      const int64_t b = u.begin;
      R* w = data_of<R>(params[u.t]) + b;
      R* buf = data_of<R>(bufs[u.t]) + b;
      const R* in[3] = {w, data_of<R>(grads[u.t]) + b, init_buffers ? nullptr : buf};
      R* out[3] = {w, nullptr, buf};
      partial[idx] = update_and_sumsq<3, R>(in, out, 2, u.end - b, f);
    });
  });
  return scalar_out(sum_partials(partial), params[0].scalar_type() == at::kDouble);
}

Tensor msam_adam(const TensorList& params, const TensorList& grads,
                 const TensorList& exp_avgs, const TensorList& exp_avg_sqs,
                 const TensorList& max_exp_avg_sqs, double back, const OptTensor& back_t,
                 bool has_back, int64_t step, double lr, double beta1, double beta2, double eps,
                 double weight_decay, bool decoupled, bool amsgrad, bool maximize) {
  if (params.empty()) return scalar_out(0, false);
  TORCH_CHECK(step >= 1, "sharpopt cpu: msam_adam needs step >= 1, got ", step);
  check_dtype(params);
  check_list(params, params, "params");
  check_list(grads, params, "grads");
  check_list(exp_avgs, params, "exp_avgs");
  check_list(exp_avg_sqs, params, "exp_avg_sqs");
  if (amsgrad) check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs");
  const auto args = make_adam_args(step, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize);
  const double back_v = has_back ? scalar_value(back, back_t) : 0.0;
  sharpopt::Reused<Unit> units;
  for (size_t i = 0; i < params.size(); ++i) add_element_units(units, int32_t(i), params[i].numel());
  sharpopt::Reused<double> partial;
  partial.assign(units.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "sharpopt_msam_adam", [&] {
    using R = scalar_t;
    using S = OpMath<R>;
    const auto a = both<AdamArgs, S>(args);
    const S s_back = S(back_v);
    const Vec<S> v_back = Vec<S>(s_back);
    auto f = [&](auto& x) {
      using T = Elem<decltype(x)>;
      if (has_back) x[0] = msam_back_elem(x[0], x[2], pick<T, S>(s_back, v_back));
      adam_elem(x[0], x[2], x[3], x[4], x[1], a.template get<T>());
    };
    for_units(units, [&](const Unit& u, int64_t idx) {
      const int64_t b = u.begin;
      R* w = data_of<R>(params[u.t]) + b;
      R* m = data_of<R>(exp_avgs[u.t]) + b;
      R* v = data_of<R>(exp_avg_sqs[u.t]) + b;
      R* vmax = amsgrad ? data_of<R>(max_exp_avg_sqs[u.t]) + b : nullptr;
      const R* in[5] = {w, data_of<R>(grads[u.t]) + b, m, v, vmax};
      R* out[5] = {w, nullptr, m, v, vmax};
      partial[idx] = update_and_sumsq<5, R>(in, out, 2, u.end - b, f);
    });
  });
  return scalar_out(sum_partials(partial), params[0].scalar_type() == at::kDouble);
}

// a <- b + s * c over fp32 arrays: the STREAM triad, for benchmarks to measure the
// memory bandwidth with the same threading and vector code as the passes.
void triad(const Tensor& a, const Tensor& b, const Tensor& c, double s) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                  c.scalar_type() == at::kFloat && a.is_contiguous() && b.is_contiguous() &&
                  c.is_contiguous() && a.numel() == b.numel() && a.numel() == c.numel(),
              "sharpopt cpu: triad takes three contiguous fp32 tensors of one size");
  float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  const float* pc = c.data_ptr<float>();
  const float sf = float(s);
  const Vec<float> sv(sf);
  at::parallel_for(0, a.numel(), kChunk, [&](int64_t lo, int64_t hi) {
    const float* in[2] = {pb + lo, pc + lo};
    float* out[2] = {pa + lo, nullptr};
    span<2, float>(in, out, hi - lo, [&](auto& x) {
      using T = Elem<decltype(x)>;
      x[0] = x[0] + pick<T, float>(sf, sv) * x[1];
    });
  });
}

// Adam's step counters (one-element fp32 CPU tensors, as torch.optim keeps them) advanced
// by `delta` in one call instead of one op per tensor; returns (lowest, highest) new count,
// so that the caller reads no counter when they agree (the common case).
std::tuple<double, double> advance_steps(const TensorList& steps, double delta) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& t : steps) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1,
                "sharpopt cpu: advance_steps takes one-element fp32 CPU tensors");
  }
  for (const auto& t : steps) {
    float* p = t.data_ptr<float>();
    *p = *p + float(delta);
    lo = std::min(lo, double(*p));
    hi = std::max(hi, double(*p));
  }
  return {lo, hi};
}

std::string isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sharpopt fused CPU passes (see sharpopt.backends.base for the contract)";
  m.def("isa", &isa, "vector instruction set this module was compiled for");
  m.def("triad", &triad, "a <- b + s * c (fp32), for bandwidth measurements");
  m.def("advance_steps", &advance_steps, "Adam step counters += delta; (lowest, highest)");
  sharpopt::cpu::bind_host(m);
  m.def("sumsq", &sumsq);
  m.def("sumsq_value", &sumsq_value);
  m.def("dot", &dot);
  m.def("perturb", &perturb);
  m.def("restore", &restore);
  m.def("lincomb", &lincomb);
  m.def("restore_sgd", &restore_sgd);
  m.def("restore_adam", &restore_adam);
  m.def("msam_sgd", &msam_sgd);
  m.def("msam_adam", &msam_adam);
}
