// The engine under the `cpu` passes (sharpopt_cpu.cpp): the vector overloads the shared
// math needs, the elementwise and reduction engines over N streams, and the work units
// the passes are cut into, which depend only on the tensor shapes (kChunk elements, or
// whole rows for gradient centralisation), never on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

// Vector overloads of the helpers the shared math calls; they must be declared before the
// header's templates are defined (see sharpopt_math.h).
namespace sharpopt {
namespace math {
template <class S>
inline at::vec::Vectorized<S> sopt_abs(const at::vec::Vectorized<S>& x) { return x.abs(); }
template <class S>
inline at::vec::Vectorized<S> sopt_sqrt(const at::vec::Vectorized<S>& x) { return x.sqrt(); }
template <class S>
inline at::vec::Vectorized<S> sopt_max(const at::vec::Vectorized<S>& a,
                                       const at::vec::Vectorized<S>& b) {
  return at::vec::maximum(a, b);
}
template <class S>
inline at::vec::Vectorized<S> sopt_keep(const at::vec::Vectorized<S>& z,
                                        const at::vec::Vectorized<S>& fresh,
                                        const at::vec::Vectorized<S>& old) {
  return at::vec::Vectorized<S>::blendv(fresh, old, z.isnan());
}
}  // namespace math
}  // namespace sharpopt

#include "sharpopt_math.h"

namespace sharpopt {
namespace cpu {

using namespace sharpopt::math;
template <class S>
using Vec = at::vec::Vectorized<S>;

// Elements per work unit. 64 Ki fp32 elements = 256 KiB per stream: large enough that the
// per-unit overhead (argument broadcast, partial write) is invisible, small enough that
// a ResNet-50 step has ~400 units to balance over the threads.
constexpr int64_t kChunk = int64_t(1) << 16;
// Inner reduction block: fp32 vector accumulators are flushed to double every kBlock
// elements, so no fp32 accumulator sums more than kBlock / (4 * lanes) terms (64 with
// AVX-512, 256 with AVX2). A flush every 1 Ki elements cost the norm pass ~10 % of its
// read bandwidth on an AVX-512 EPYC; every 4 Ki it is below the noise.
constexpr int64_t kBlock = 4096;
// MSAM's fused update writes a block of momentum and sums its squares while it is still
// in L1: 1 Ki elements x up to 5 streams x 4 B = 20 KiB.
constexpr int64_t kFuseBlock = 1024;
// bf16/fp16 are widened into fp32 tiles of this many elements (on the stack, in L1).
constexpr int64_t kTile = 512;

template <class S> struct OpMathT { using type = S; };
template <> struct OpMathT<c10::BFloat16> { using type = float; };
template <> struct OpMathT<c10::Half> { using type = float; };
template <class S> using OpMath = typename OpMathT<S>::type;

// Per-pass arguments in both the scalar and the vector type of opmath `S`.
template <template <class> class A, class S>
struct Both {
  A<S> s;
  A<Vec<S>> v;
  template <class T>
  const A<T>& get() const {
    if constexpr (std::is_same_v<T, S>) return s; else return v;
  }
};

template <class T, class S>
PerturbArgs<T> cast(const PerturbArgs<double>& a) {
  return {T(S(a.scale)), T(S(a.eta)), a.adaptive};
}
template <class T, class S>
SgdArgs<T> cast(const SgdArgs<double>& a) {
  return {T(S(a.lr)), T(S(a.weight_decay)), T(S(a.momentum)), T(S(a.one_minus_dampening)),
          T(S(a.grad_sign)), a.has_momentum, a.nesterov, a.init};
}
template <class T, class S>
AdamArgs<T> cast(const AdamArgs<double>& a) {
  return {T(S(a.grad_sign)), T(S(a.decay)), T(S(a.weight_decay)), T(S(a.one_minus_beta1)),
          T(S(a.beta2)), T(S(a.one_minus_beta2)), T(S(a.bc2_sqrt)), T(S(a.eps)),
          T(S(a.step_size)), a.decoupled, a.amsgrad};
}
template <template <class> class A, class S>
Both<A, S> both(const A<double>& a) {
  return {cast<S, S>(a), cast<Vec<S>, S>(a)};
}

// ---------------------------------------------------------------------------------
// Elementwise engine. N streams of n elements: stream k starts as in[k][i] (0 when
// in[k] is null), f rewrites the N values, and stream k is stored to out[k][i] when
// out[k] is not null. Every input of an element is loaded before any output is stored,
// so an output may alias an input.
// f is a generic callable invoked with `T (&)[N]`, T = S or Vec<S>.
// ---------------------------------------------------------------------------------
template <int N, class S, class F>
void span_native(const S* const (&in)[N], S* const (&out)[N], int64_t n, const F& f) {
  using V = Vec<S>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V x[N];
    for (int k = 0; k < N; ++k) x[k] = in[k] ? V::loadu(in[k] + i) : V(S(0));
    f(x);
    for (int k = 0; k < N; ++k) if (out[k]) x[k].store(out[k] + i);
  }
  for (; i < n; ++i) {
    S x[N];
    for (int k = 0; k < N; ++k) x[k] = in[k] ? in[k][i] : S(0);
    f(x);
    for (int k = 0; k < N; ++k) if (out[k]) out[k][i] = x[k];
  }
}

template <int N, class R, class F>
void span(const R* const (&in)[N], R* const (&out)[N], int64_t n, const F& f) {
  if constexpr (std::is_same_v<R, OpMath<R>>) {
    span_native<N, R>(in, out, n, f);
  } else {
    float tile[N][kTile];
    for (int64_t t0 = 0; t0 < n; t0 += kTile) {
      const int64_t m = std::min(kTile, n - t0);
      const float* fin[N];
      float* fout[N];
      for (int k = 0; k < N; ++k) {
        fin[k] = nullptr;
        fout[k] = out[k] ? tile[k] : nullptr;
        if (in[k]) {
          const R* src = in[k] + t0;
          for (int64_t j = 0; j < m; ++j) tile[k][j] = static_cast<float>(src[j]);
          fin[k] = tile[k];
        }
      }
      span_native<N, float>(fin, fout, m, f);
      for (int k = 0; k < N; ++k) {
        if (!out[k]) continue;
        R* dst = out[k] + t0;
        for (int64_t j = 0; j < m; ++j) dst[j] = static_cast<R>(tile[k][j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Reduction engine: sum over i of f(x_0[i], ..., x_{N-1}[i]) in double. Four vector
// accumulators (for instruction-level parallelism) are combined and flushed to double
// every kBlock elements in a fixed order.
// ---------------------------------------------------------------------------------
template <class S>
double hsum(const Vec<S>& v) {
  alignas(64) S lanes[Vec<S>::size()];
  v.store(lanes);
  double acc = 0;
  for (int j = 0; j < Vec<S>::size(); ++j) acc += double(lanes[j]);
  return acc;
}

template <int N, class S, class F>
double reduce_native(const S* const (&in)[N], int64_t n, const F& f) {
  using V = Vec<S>;
  constexpr int64_t W = V::size();
  auto at = [&](int64_t i) {
    V x[N];
    for (int k = 0; k < N; ++k) x[k] = V::loadu(in[k] + i);
    return f(x);
  };
  double total = 0;
  int64_t i = 0;
  while (i + W <= n) {
    const int64_t stop = std::min(n, i + kBlock);
    // Four named accumulators, not an array: GCC keeps an array of Vectorized on the
    // stack, which puts a store and a reload on every add's dependency chain (-25 % of
    // the read bandwidth of the norm pass on an AVX-512 EPYC).
    V a0(S(0)), a1(S(0)), a2(S(0)), a3(S(0));
    for (; i + 4 * W <= stop; i += 4 * W) {
      a0 = a0 + at(i);
      a1 = a1 + at(i + W);
      a2 = a2 + at(i + 2 * W);
      a3 = a3 + at(i + 3 * W);
    }
    for (; i + W <= stop; i += W) a0 = a0 + at(i);
    total += hsum<S>((a0 + a1) + (a2 + a3));
  }
  for (; i < n; ++i) {
    S x[N];
    for (int k = 0; k < N; ++k) x[k] = in[k][i];
    total += double(f(x));
  }
  return total;
}

template <int N, class R, class F>
double reduce(const R* const (&in)[N], int64_t n, const F& f) {
  if constexpr (std::is_same_v<R, OpMath<R>>) {
    return reduce_native<N, R>(in, n, f);
  } else {
    float tile[N][kTile];
    double total = 0;
    for (int64_t t0 = 0; t0 < n; t0 += kTile) {
      const int64_t m = std::min(kTile, n - t0);
      const float* fin[N];
      for (int k = 0; k < N; ++k) {
        const R* src = in[k] + t0;
        for (int64_t j = 0; j < m; ++j) tile[k][j] = static_cast<float>(src[j]);
        fin[k] = tile[k];
      }
      total += reduce_native<N, float>(fin, m, f);
    }
    return total;
  }
}

// The scalar or the vector copy of a value, whichever matches T.
template <class T, class S>
const T& pick(const S& s, const Vec<S>& v) {
  if constexpr (std::is_same_v<T, S>) return s; else return v;
}

template <class X>
using Elem = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<X&>()[0])>>;

// ---------------------------------------------------------------------------------
// Work units.
// ---------------------------------------------------------------------------------
struct Unit {
  int32_t t;        // tensor index
  int64_t begin;    // first element, or first row when row_len > 0
  int64_t end;      // one past the last element / row
  int64_t row_len;  // 0: plain element range; > 0: whole rows of this length
};

inline void add_element_units(std::vector<Unit>& units, int32_t t, int64_t numel) {
  for (int64_t b = 0; b < numel; b += kChunk) units.push_back({t, b, std::min(numel, b + kChunk), 0});
}

inline void add_row_units(std::vector<Unit>& units, int32_t t, int64_t rows, int64_t row_len) {
  const int64_t per = std::max<int64_t>(1, kChunk / row_len);
  for (int64_t r = 0; r < rows; r += per) units.push_back({t, r, std::min(rows, r + per), row_len});
}

// Runs fn(unit, index) over every unit, the threads taking contiguous runs of units with
// about the same number of elements each (the passes are memory bound, so a unit costs
// its size). Splitting the unit count evenly instead left one thread with the big layers
// of a network and the other with its many small tensors. Which thread runs a unit never
// changes a result: reductions add the per-unit partials in unit order.
template <class Fn>
void for_units(const std::vector<Unit>& units, const Fn& fn) {
  const int64_t n = int64_t(units.size());
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  if (nt <= 1) {
    for (int64_t u = 0; u < n; ++u) fn(units[u], u);
    return;
  }
  auto size = [](const Unit& u) { return (u.end - u.begin) * std::max<int64_t>(1, u.row_len); };
  int64_t total = 0;
  for (const Unit& u : units) total += size(u);
  // bounds[r] = first unit of run r: the first unit at or past r/nt of the elements.
  std::vector<int64_t> bounds(nt + 1, n);
  bounds[0] = 0;
  int64_t seen = 0, r = 1;
  for (int64_t u = 0; u < n && r < nt; ++u) {
    while (r < nt && seen * nt >= total * r) bounds[r++] = u;
    seen += size(units[u]);
  }
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t run = b; run < e; ++run)
      for (int64_t u = bounds[run]; u < bounds[run + 1]; ++u) fn(units[u], u);
  });
}

}  // namespace cpu
}  // namespace sharpopt
