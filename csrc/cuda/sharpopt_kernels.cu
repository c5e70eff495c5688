// CUDA kernels of the `cuda` backend. Plain CUDA C++: no torch header, so `nvcc -c`
// compiles this file on a machine without a GPU or a CUDA build of torch.
//
// Multi-tensor apply: the host cuts every tensor into units (kChunk elements, or groups of
// whole rows for the row-wise norm), fills a table of (tensor, unit) blocks that travels as
// the kernel argument, and launches one block per table entry; a list that does not fit
// one table (kMaxBlocks blocks, Table<D>::kTensors tensors) takes several launches.
// Reductions write one fp64 partial per unit (global unit index), then a single block adds
// the partials in a fixed order: the result does not depend on scheduling.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sharpopt_cuda.h"
#include "sharpopt_math.h"

namespace sharpopt_cuda {
namespace {

using namespace sharpopt::math;

// 512 threads x 16-byte loads keep enough bytes in flight per SM on A100/H100 for these
// bandwidth-bound passes (the same shape as PyTorch's and apex's multi-tensor kernels).
constexpr int kThreads = 512;
// Elements per unit: 64 Ki, so one block streams 256 KiB of fp32 per list.
constexpr int64_t kChunk = int64_t(1) << 16;
// Blocks per launch table; with the per-tensor part below the table stays < 4 KiB, the
// kernel-argument limit of every CUDA version and architecture.
constexpr int kMaxBlocks = 320;
constexpr int kTableTensorBytes = 2400;

template <int D>
struct Table {
  static constexpr int kTensors = kTableTensorBytes / (8 * D + 24);
  void* ptr[D][kTensors];
  int64_t numel[kTensors];
  int64_t row_len[kTensors];  // > 0: rows of this length (row units, or row-mean lookup)
  float* means[kTensors];     // row means: read by perturb, written by sumsq
  int32_t unit[kMaxBlocks];   // unit index within its tensor
  uint8_t tensor[kMaxBlocks];
  int64_t unit_base;          // global index of this launch's first unit (for partials)
};
static_assert(sizeof(Table<6>) <= 4000, "launch table must fit the kernel-argument space");
static_assert(Table<6>::kTensors < 256, "tensor slot index is a uint8_t");

// --- element types -------------------------------------------------------------------
template <class R> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <class R> using acc_t = typename Acc<R>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <class R> __device__ __forceinline__ R from_acc(acc_t<R> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half(x); }

template <class R, int V>
struct alignas(sizeof(R) * V) Pack {
  R v[V];
};

template <class A>
__device__ __forceinline__ A read_scalar(const DevScalar& s) {
  return s.f64 ? A(*s.f64) : (s.f32 ? A(*s.f32) : A(s.value));
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// --- the passes as element operations ---------------------------------------------------
// Each op names its streams; the kernel loads the streams in `load_mask` (others start at
// 0), calls apply(), and stores the streams in `store_mask`.
struct PerturbOp {  // streams: 0 w, 1 saved, 2 g
  static constexpr int D = 3;
  DevScalar scale;
  double eta;
  bool adaptive, save;
  template <class A> struct Ready { PerturbArgs<A> a; bool save; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{read_scalar<A>(scale), A(eta), adaptive}, save};
  }
  template <class A> __device__ static void apply(const Ready<A>& r, A (&x)[D], A mu) {
    const A s = r.save ? x[0] : x[1];
    x[1] = s;
    x[0] = perturb_elem(s, x[2], mu, r.a);
  }
};

struct LincombOp {  // streams: 0..2 x_k, 3 out
  static constexpr int D = 4;
  DevScalar c[3];
  int K;
  template <class A> struct Ready { A c[3]; int K; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{read_scalar<A>(c[0]), read_scalar<A>(c[1]), read_scalar<A>(c[2])}, K};
  }
  template <class A> __device__ static void apply(const Ready<A>& r, A (&x)[D], A) {
    const A t[3] = {x[0], x[1], x[2]};
    x[3] = r.K == 1 ? lincomb_elem<1>(t, r.c) : r.K == 2 ? lincomb_elem<2>(t, r.c) : lincomb_elem<3>(t, r.c);
  }
};

struct SgdOp {  // streams: 0 w, 1 saved, 2 g, 3 buf
  static constexpr int D = 4;
  SgdArgs<double> a;
  bool has_saved;
  template <class A> struct Ready { SgdArgs<A> a; bool has_saved; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{A(a.lr), A(a.weight_decay), A(a.momentum), A(a.one_minus_dampening), A(a.grad_sign),
             a.has_momentum, a.nesterov, a.init},
            has_saved};
  }
  template <class A> __device__ static void apply(const Ready<A>& r, A (&x)[D], A) {
    A w = r.has_saved ? x[1] : x[0];
    sgd_elem(w, x[3], x[2], r.a);
    x[0] = w;
  }
};

struct AdamOp {  // streams: 0 w, 1 saved, 2 g, 3 m, 4 v, 5 vmax
  static constexpr int D = 6;
  AdamArgs<double> a;
  bool has_saved;
  template <class A> struct Ready { AdamArgs<A> a; bool has_saved; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{A(a.grad_sign), A(a.decay), A(a.weight_decay), A(a.one_minus_beta1), A(a.beta2),
             A(a.one_minus_beta2), A(a.bc2_sqrt), A(a.eps), A(a.step_size), a.decoupled, a.amsgrad},
            has_saved};
  }
  template <class A> __device__ static void apply(const Ready<A>& r, A (&x)[D], A) {
    A w = r.has_saved ? x[1] : x[0];
    adam_elem(w, x[3], x[4], x[5], x[2], r.a);
    x[0] = w;
  }
};

// --- reductions inside a block -----------------------------------------------------------
// Fixed trees (shuffle-down within a warp, then warp results in order): the same inputs
// give the same bits on every run.
__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;  // valid in lane 0
}

__device__ double block_sum(double v) {
  __shared__ double warp_part[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < int(blockDim.x >> 5); ++w) total += warp_part[w];
  }
  __syncthreads();  // warp_part may be reused by a later call
  return total;     // valid in thread 0
}

// --- kernels -----------------------------------------------------------------------------
template <class R, class Op>
__global__ void __launch_bounds__(kThreads)
elementwise_kernel(Table<Op::D> tab, int load_mask, int store_mask, Op op) {
  constexpr int D = Op::D;
  constexpr int V = 16 / sizeof(R);
  using A = acc_t<R>;
  const int t = tab.tensor[blockIdx.x];
  const int64_t begin = int64_t(tab.unit[blockIdx.x]) * kChunk;
  const int64_t end = min(tab.numel[t], begin + kChunk);
  const int64_t L = tab.row_len[t];
  const float* means = tab.means[t];
  const auto ready = op.template prepare<A>();

  R* p[D];
  bool vec = true;
  for (int k = 0; k < D; ++k) {
    p[k] = static_cast<R*>(tab.ptr[k][t]);
    if (((load_mask | store_mask) >> k) & 1) vec = vec && aligned16(p[k]);
  }
  auto mean_at = [&](int64_t i) { return means ? A(means[i / L]) : A(0); };

  int64_t tail = begin;
  if (vec) {
    const int64_t nvec = (end - begin) / V;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t i = begin + j * V;
      Pack<R, V> pk[D];
#pragma unroll
      for (int k = 0; k < D; ++k)
        if ((load_mask >> k) & 1) pk[k] = *reinterpret_cast<const Pack<R, V>*>(p[k] + i);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A x[D];
#pragma unroll
        for (int k = 0; k < D; ++k) x[k] = ((load_mask >> k) & 1) ? to_acc(pk[k].v[e]) : A(0);
        Op::apply(ready, x, mean_at(i + e));
#pragma unroll
        for (int k = 0; k < D; ++k)
          if ((store_mask >> k) & 1) pk[k].v[e] = from_acc<R>(x[k]);
      }
#pragma unroll
      for (int k = 0; k < D; ++k)
        if ((store_mask >> k) & 1) *reinterpret_cast<Pack<R, V>*>(p[k] + i) = pk[k];
    }
    tail = begin + nvec * V;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
    A x[D];
#pragma unroll
    for (int k = 0; k < D; ++k) x[k] = ((load_mask >> k) & 1) ? to_acc(p[k][i]) : A(0);
    Op::apply(ready, x, mean_at(i));
#pragma unroll
    for (int k = 0; k < D; ++k)
      if ((store_mask >> k) & 1) p[k][i] = from_acc<R>(x[k]);
  }
}

// Bitwise copy (restore): moves raw words, never converts.
template <class W>
__global__ void __launch_bounds__(kThreads) copy_kernel(Table<2> tab) {
  constexpr int V = 16 / sizeof(W);
  const int t = tab.tensor[blockIdx.x];
  const int64_t begin = int64_t(tab.unit[blockIdx.x]) * kChunk;
  const int64_t end = min(tab.numel[t], begin + kChunk);
  W* dst = static_cast<W*>(tab.ptr[0][t]);
  const W* src = static_cast<const W*>(tab.ptr[1][t]);
  int64_t tail = begin;
  if (aligned16(dst) && aligned16(src)) {
    const int64_t nvec = (end - begin) / V;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x)
      reinterpret_cast<Pack<W, V>*>(dst + begin)[j] = reinterpret_cast<const Pack<W, V>*>(src + begin)[j];
    tail = begin + nvec * V;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) dst[i] = src[i];
}

// Plain reduction over element units: streams 0 and 1 (x, y), term chosen by `kind`.
enum class Term : int { kSquare = 0, kWeightedSquare = 1, kProduct = 2 };

template <class R>
__global__ void __launch_bounds__(kThreads)
reduce_kernel(Table<2> tab, Term kind, double eta, double* partials) {
  constexpr int V = 16 / sizeof(R);
  using A = acc_t<R>;
  const int t = tab.tensor[blockIdx.x];
  const int64_t begin = int64_t(tab.unit[blockIdx.x]) * kChunk;
  const int64_t end = min(tab.numel[t], begin + kChunk);
  const R* x = static_cast<const R*>(tab.ptr[0][t]);
  const R* y = static_cast<const R*>(tab.ptr[1][t]);
  const A e = A(eta);
  auto term = [&](A a, A b) -> A {
    if (kind == Term::kProduct) return a * b;
    const A d = weighted_dev(b, a, A(0), e, kind == Term::kWeightedSquare);
    return d * d;
  };
  const bool two = kind != Term::kSquare;
  A acc = A(0);
  int64_t tail = begin;
  if (aligned16(x) && (!two || aligned16(y))) {
    const int64_t nvec = (end - begin) / V;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t i = begin + j * V;
      const Pack<R, V> px = *reinterpret_cast<const Pack<R, V>*>(x + i);
      Pack<R, V> py;
      if (two) py = *reinterpret_cast<const Pack<R, V>*>(y + i);
#pragma unroll
      for (int k = 0; k < V; ++k) acc += term(to_acc(px.v[k]), two ? to_acc(py.v[k]) : A(0));
    }
    tail = begin + nvec * V;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x)
    acc += term(to_acc(x[i]), two ? to_acc(y[i]) : A(0));
  const double total = block_sum(double(acc));
  if (threadIdx.x == 0) partials[tab.unit_base + blockIdx.x] = total;
}

// Row-wise norm: one unit = a group of whole rows, one warp per row, two passes per row
// (exact mean, then the centred sum of squares; the second pass mostly hits L2).
template <class R>
__global__ void __launch_bounds__(kThreads)
rows_kernel(Table<2> tab, bool adaptive, double eta, bool centralize, double* partials) {
  using A = acc_t<R>;
  const int t = tab.tensor[blockIdx.x];
  const int64_t L = tab.row_len[t];
  const int64_t rows = tab.numel[t] / L;
  const int64_t per = kChunk / L > 0 ? kChunk / L : 1;
  const int64_t r0 = int64_t(tab.unit[blockIdx.x]) * per;
  const int64_t r1 = min(rows, r0 + per);
  const R* g = static_cast<const R*>(tab.ptr[0][t]);
  const R* w = static_cast<const R*>(tab.ptr[1][t]);
  float* means = tab.means[t];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const A e = A(eta);
  double mine = 0;  // this warp's rows, in row order (lane 0)
  for (int64_t r = r0 + warp; r < r1; r += nwarps) {
    const R* gr = g + r * L;
    A s = A(0);
    for (int64_t j = lane; j < L; j += 32) s += to_acc(gr[j]);
    const double mean = __shfl_sync(0xffffffffu, warp_sum(double(s)), 0) / double(L);
    if (lane == 0 && means) means[r] = float(mean);
    const A mu = centralize ? A(mean) : A(0);
    A q = A(0);
    for (int64_t j = lane; j < L; j += 32) {
      const A d = weighted_dev(adaptive ? to_acc(w[r * L + j]) : A(0), to_acc(gr[j]), mu, e, adaptive);
      q += d * d;
    }
    const double qs = warp_sum(double(q));
    if (lane == 0) mine += qs;
  }
  __shared__ double warp_part[kThreads / 32];
  if (lane == 0) warp_part[warp] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int k = 0; k < nwarps; ++k) total += warp_part[k];
    partials[tab.unit_base + blockIdx.x] = total;
  }
}

// One block adds the partials in a fixed order and writes the 0-dim result.
__global__ void __launch_bounds__(kThreads)
finish_kernel(const double* partials, int64_t n, float* out32, double* out64) {
  double v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += partials[i];
  const double total = block_sum(v);
  if (threadIdx.x == 0) {
    if (out64) *out64 = total; else *out32 = float(total);
  }
}

// --- host: tables and launches -----------------------------------------------------------
int64_t units_of(int64_t numel, int64_t rows_len) {
  if (numel == 0) return 0;
  if (rows_len > 0) {
    const int64_t per = kChunk / rows_len > 0 ? kChunk / rows_len : 1;
    const int64_t rows = numel / rows_len;
    return (rows + per - 1) / per;
  }
  return (numel + kChunk - 1) / kChunk;
}

// Calls launch(table, blocks) for every full table and the last partial one. `take(i)`
// says whether tensor i belongs to this plan; `unit_len(i)` is 0 for element units or the
// row length for row units. Units are numbered globally in tensor order from `base`.
template <int D, class Take, class Launch>
int64_t for_tables(int n, const void* const* const (&lists)[D], const int64_t* numel,
                   const int64_t* row_len, float* const* means, bool row_units, int64_t base,
                   const Take& take, const Launch& launch) {
  Table<D> tab;
  int nt = 0, nb = 0;
  tab.unit_base = base;
  for (int i = 0; i < n; ++i) {
    if (!take(i) || numel[i] == 0) continue;
    const int64_t L = row_len ? row_len[i] : 0;
    const int64_t units = units_of(numel[i], row_units ? L : 0);
    for (int k = 0; k < D; ++k) tab.ptr[k][nt] = lists[k] ? const_cast<void*>(lists[k][i]) : nullptr;
    tab.numel[nt] = numel[i];
    tab.row_len[nt] = L;
    tab.means[nt] = means ? means[i] : nullptr;
    ++nt;
    for (int64_t u = 0; u < units; ++u) {
      tab.tensor[nb] = uint8_t(nt - 1);
      tab.unit[nb] = int32_t(u);
      ++nb;
      const bool last_unit = u == units - 1;
      if (nb == kMaxBlocks || (nt == Table<D>::kTensors && last_unit)) {
        launch(tab, nb);
        tab.unit_base += nb;
        nb = 0;
        if (last_unit) {
          nt = 0;
        } else {  // the tensor continues in the next table, in slot 0
          for (int k = 0; k < D; ++k) tab.ptr[k][0] = tab.ptr[k][nt - 1];
          tab.numel[0] = tab.numel[nt - 1];
          tab.row_len[0] = tab.row_len[nt - 1];
          tab.means[0] = tab.means[nt - 1];
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) {
    launch(tab, nb);
    tab.unit_base += nb;
  }
  return tab.unit_base;
}

template <class Fn>
cudaError_t dispatch(DType dt, const Fn& fn) {
  switch (dt) {
    case DType::kFloat32: fn(float()); break;
    case DType::kFloat64: fn(double()); break;
    case DType::kBFloat16: fn(__nv_bfloat16()); break;
    case DType::kFloat16: fn(__half()); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

auto all = [](int) { return true; };

template <class R, class Op>
void run_elementwise(int n, const void* const* const (&lists)[Op::D], const int64_t* numel,
                     const int64_t* row_len, const float* const* means, int load_mask,
                     int store_mask, const Op& op, cudaStream_t stream) {
  for_tables<Op::D>(n, lists, numel, row_len, const_cast<float* const*>(means), false, 0, all,
                    [&](const Table<Op::D>& tab, int nb) {
                      elementwise_kernel<R, Op><<<nb, kThreads, 0, stream>>>(tab, load_mask, store_mask, op);
                    });
}

}  // namespace

int64_t reduction_units(int n, const int64_t* numel, const int64_t* row_len) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += units_of(numel[i], row_len ? row_len[i] : 0);
  return total;
}

cudaError_t sumsq(DType dt, int n, const void* const* grads, const void* const* params,
                  const int64_t* numel, const int64_t* row_len, float* const* row_means,
                  bool adaptive, double eta, bool centralize, double* workspace, void* out,
                  cudaStream_t stream) {
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const void* const* lists[2] = {grads, adaptive ? params : nullptr};
    const Term kind = adaptive ? Term::kWeightedSquare : Term::kSquare;
    auto plain = [&](int i) { return !row_len || row_len[i] == 0; };
    auto rowwise = [&](int i) { return row_len && row_len[i] > 0; };
    int64_t next = for_tables<2>(n, lists, numel, row_len, row_means, false, 0, plain,
                                 [&](const Table<2>& tab, int nb) {
                                   reduce_kernel<R><<<nb, kThreads, 0, stream>>>(tab, kind, eta, workspace);
                                 });
    next = for_tables<2>(n, lists, numel, row_len, row_means, true, next, rowwise,
                         [&](const Table<2>& tab, int nb) {
                           rows_kernel<R><<<nb, kThreads, 0, stream>>>(tab, adaptive, eta, centralize, workspace);
                         });
    const bool f64 = dt == DType::kFloat64;
    finish_kernel<<<1, kThreads, 0, stream>>>(workspace, next, f64 ? nullptr : static_cast<float*>(out),
                                              f64 ? static_cast<double*>(out) : nullptr);
  });
}

cudaError_t dot(DType dt, int n, const void* const* xs, const void* const* ys,
                const int64_t* numel, double* workspace, void* out, cudaStream_t stream) {
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const void* const* lists[2] = {xs, ys};
    const int64_t units = for_tables<2>(n, lists, numel, nullptr, nullptr, false, 0, all,
                                        [&](const Table<2>& tab, int nb) {
                                          reduce_kernel<R><<<nb, kThreads, 0, stream>>>(tab, Term::kProduct, 0.0, workspace);
                                        });
    const bool f64 = dt == DType::kFloat64;
    finish_kernel<<<1, kThreads, 0, stream>>>(workspace, units, f64 ? nullptr : static_cast<float*>(out),
                                              f64 ? static_cast<double*>(out) : nullptr);
  });
}

cudaError_t perturb(DType dt, int n, void* const* params, const void* const* grads,
                    void* const* saved, const int64_t* numel, const int64_t* row_len,
                    const float* const* row_means, DevScalar scale, bool adaptive, double eta,
                    bool save, cudaStream_t stream) {
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const void* const* lists[3] = {params, saved, grads};
    const PerturbOp op{scale, eta, adaptive, save};
    run_elementwise<R>(n, lists, numel, row_len, row_means, save ? 0b101 : 0b110,
                       save ? 0b011 : 0b001, op, stream);
  });
}

cudaError_t restore(DType dt, int n, void* const* params, const void* const* saved,
                    const int64_t* numel, cudaStream_t stream) {
  const void* const* lists[2] = {params, saved};
  auto go = [&](auto word) {
    using W = decltype(word);
    for_tables<2>(n, lists, numel, nullptr, nullptr, false, 0, all, [&](const Table<2>& tab, int nb) {
      copy_kernel<W><<<nb, kThreads, 0, stream>>>(tab);
    });
  };
  switch (dt) {
    case DType::kFloat32: go(uint32_t()); break;
    case DType::kFloat64: go(uint64_t()); break;
    case DType::kBFloat16:
    case DType::kFloat16: go(uint16_t()); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t lincomb(DType dt, int n, int K, void* const* out, const void* const* x0,
                    const void* const* x1, const void* const* x2, const int64_t* numel,
                    const DevScalar* coefs, cudaStream_t stream) {
  if (K < 1 || K > 3) return cudaErrorInvalidValue;
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const void* const* lists[4] = {x0, K > 1 ? x1 : nullptr, K > 2 ? x2 : nullptr, out};
    LincombOp op{{coefs[0], K > 1 ? coefs[1] : DevScalar{}, K > 2 ? coefs[2] : DevScalar{}}, K};
    run_elementwise<R>(n, lists, numel, nullptr, nullptr, (1 << K) - 1, 0b1000, op, stream);
  });
}

cudaError_t restore_sgd(DType dt, int n, void* const* params, const void* const* saved,
                        const void* const* grads, void* const* bufs, const int64_t* numel,
                        const SgdArgs<double>& args, cudaStream_t stream) {
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const bool has_saved = saved != nullptr;
    const bool mom = args.has_momentum;
    const void* const* lists[4] = {params, saved, grads, mom ? bufs : nullptr};
    const int load = (has_saved ? 0b0010 : 0b0001) | 0b0100 | (mom && !args.init ? 0b1000 : 0);
    const int store = 0b0001 | (mom ? 0b1000 : 0);
    run_elementwise<R>(n, lists, numel, nullptr, nullptr, load, store, SgdOp{args, has_saved}, stream);
  });
}

cudaError_t restore_adam(DType dt, int n, void* const* params, const void* const* saved,
                         const void* const* grads, void* const* exp_avgs,
                         void* const* exp_avg_sqs, void* const* vmax, const int64_t* numel,
                         const AdamArgs<double>& args, cudaStream_t stream) {
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const bool has_saved = saved != nullptr;
    const bool ams = args.amsgrad;
    const void* const* lists[6] = {params, saved, grads, exp_avgs, exp_avg_sqs, ams ? vmax : nullptr};
    const int load = (has_saved ? 0b000010 : 0b000001) | 0b011100 | (ams ? 0b100000 : 0);
    const int store = 0b011001 | (ams ? 0b100000 : 0);
    run_elementwise<R>(n, lists, numel, nullptr, nullptr, load, store, AdamOp{args, has_saved}, stream);
  });
}

// --- MSAM: move back from w~, base update, and the momentum's sum of squares ------------
// One pass: each element is moved back (w = w~ + back * m, with the old m), updated by
// sgd_elem / adam_elem, stored, and the square of the stored momentum is added to this
// block's partial; finish_kernel adds the partials in order, as for sumsq.
namespace {

struct MsamSgdOp {  // streams: 0 w, 1 g, 2 buf; the norm is of stream 2
  static constexpr int D = 3;
  static constexpr int kNorm = 2;
  SgdArgs<double> a;
  DevScalar back;
  bool has_back;
  template <class A> struct Ready { SgdArgs<A> a; A back; bool has_back; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{A(a.lr), A(a.weight_decay), A(a.momentum), A(a.one_minus_dampening), A(a.grad_sign),
             a.has_momentum, a.nesterov, a.init},
            has_back ? read_scalar<A>(back) : A(0), has_back};
  }
  template <class A> __device__ static void apply(const Ready<A>& r, A (&x)[D]) {
    A w = x[0];
    if (r.has_back) w = msam_back_elem(w, x[2], r.back);
    sgd_elem(w, x[2], x[1], r.a);
    x[0] = w;
  }
};

struct MsamAdamOp {  // streams: 0 w, 1 g, 2 m, 3 v, 4 vmax; the norm is of stream 2
  static constexpr int D = 5;
  static constexpr int kNorm = 2;
  AdamArgs<double> a;
  DevScalar back;
  bool has_back;
  template <class A> struct Ready { AdamArgs<A> a; A back; bool has_back; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{A(a.grad_sign), A(a.decay), A(a.weight_decay), A(a.one_minus_beta1), A(a.beta2),
             A(a.one_minus_beta2), A(a.bc2_sqrt), A(a.eps), A(a.step_size), a.decoupled, a.amsgrad},
            has_back ? read_scalar<A>(back) : A(0), has_back};
  }
  template <class A> __device__ static void apply(const Ready<A>& r, A (&x)[D]) {
    A w = x[0];
    if (r.has_back) w = msam_back_elem(w, x[2], r.back);
    adam_elem(w, x[2], x[3], x[4], x[1], r.a);
    x[0] = w;
  }
};

template <class R, class Op>
__global__ void __launch_bounds__(kThreads)
update_sumsq_kernel(Table<Op::D> tab, int load_mask, int store_mask, Op op, double* partials) {
  constexpr int D = Op::D;
  constexpr int V = 16 / sizeof(R);
  using A = acc_t<R>;
  const int t = tab.tensor[blockIdx.x];
  const int64_t begin = int64_t(tab.unit[blockIdx.x]) * kChunk;
  const int64_t end = min(tab.numel[t], begin + kChunk);
  const auto ready = op.template prepare<A>();

  R* p[D];
  bool vec = true;
  for (int k = 0; k < D; ++k) {
    p[k] = static_cast<R*>(tab.ptr[k][t]);
    if (((load_mask | store_mask) >> k) & 1) vec = vec && aligned16(p[k]);
  }
  A acc = A(0);
  int64_t tail = begin;
  if (vec) {
    const int64_t nvec = (end - begin) / V;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t i = begin + j * V;
      Pack<R, V> pk[D];
#pragma unroll
      for (int k = 0; k < D; ++k)
        if ((load_mask >> k) & 1) pk[k] = *reinterpret_cast<const Pack<R, V>*>(p[k] + i);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A x[D];
#pragma unroll
        for (int k = 0; k < D; ++k) x[k] = ((load_mask >> k) & 1) ? to_acc(pk[k].v[e]) : A(0);
        Op::apply(ready, x);
#pragma unroll
        for (int k = 0; k < D; ++k)
          if ((store_mask >> k) & 1) pk[k].v[e] = from_acc<R>(x[k]);
        const A m = to_acc(pk[Op::kNorm].v[e]);  // the stored (rounded) momentum
        acc += m * m;
      }
#pragma unroll
      for (int k = 0; k < D; ++k)
        if ((store_mask >> k) & 1) *reinterpret_cast<Pack<R, V>*>(p[k] + i) = pk[k];
    }
    tail = begin + nvec * V;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
    A x[D];
#pragma unroll
    for (int k = 0; k < D; ++k) x[k] = ((load_mask >> k) & 1) ? to_acc(p[k][i]) : A(0);
    Op::apply(ready, x);
#pragma unroll
    for (int k = 0; k < D; ++k)
      if ((store_mask >> k) & 1) p[k][i] = from_acc<R>(x[k]);
    const A m = to_acc(from_acc<R>(x[Op::kNorm]));
    acc += m * m;
  }
  const double total = block_sum(double(acc));
  if (threadIdx.x == 0) partials[tab.unit_base + blockIdx.x] = total;
}

template <class R, class Op>
void run_update_sumsq(DType dt, int n, const void* const* const (&lists)[Op::D],
                      const int64_t* numel, int load_mask, int store_mask, const Op& op,
                      double* workspace, void* out, cudaStream_t stream) {
  const int64_t units = for_tables<Op::D>(
      n, lists, numel, nullptr, nullptr, false, 0, all, [&](const Table<Op::D>& tab, int nb) {
        update_sumsq_kernel<R, Op><<<nb, kThreads, 0, stream>>>(tab, load_mask, store_mask, op, workspace);
      });
  const bool f64 = dt == DType::kFloat64;
  finish_kernel<<<1, kThreads, 0, stream>>>(workspace, units, f64 ? nullptr : static_cast<float*>(out),
                                            f64 ? static_cast<double*>(out) : nullptr);
}

}  // namespace

cudaError_t msam_sgd(DType dt, int n, void* const* params, const void* const* grads,
                     void* const* bufs, const int64_t* numel, const SgdArgs<double>& args,
                     DevScalar back, bool has_back, double* workspace, void* out,
                     cudaStream_t stream) {
  if (!args.has_momentum || (has_back && args.init)) return cudaErrorInvalidValue;
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const void* const* lists[3] = {params, grads, bufs};
    const int load = 0b011 | (args.init ? 0 : 0b100);
    run_update_sumsq<R>(dt, n, lists, numel, load, 0b101, MsamSgdOp{args, back, has_back},
                        workspace, out, stream);
  });
}

cudaError_t msam_adam(DType dt, int n, void* const* params, const void* const* grads,
                      void* const* exp_avgs, void* const* exp_avg_sqs, void* const* vmax,
                      const int64_t* numel, const AdamArgs<double>& args, DevScalar back,
                      bool has_back, double* workspace, void* out, cudaStream_t stream) {
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const bool ams = args.amsgrad;
    const void* const* lists[5] = {params, grads, exp_avgs, exp_avg_sqs, ams ? vmax : nullptr};
    const int load = 0b01111 | (ams ? 0b10000 : 0);
    const int store = 0b01101 | (ams ? 0b10000 : 0);
    run_update_sumsq<R>(dt, n, lists, numel, load, store, MsamAdamOp{args, back, has_back},
                        workspace, out, stream);
  });
}

}  // namespace sharpopt_cuda
