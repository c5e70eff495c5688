// CUDA kernels of the `cuda` backend. Plain CUDA C++: no torch header, so `nvcc -c`
// compiles this file on a machine without a GPU or a CUDA build of torch.
//
// Multi-tensor apply: the host cuts every tensor into units (kChunk elements, or groups of
// whole rows for the row-wise norm) and fills a table of tensors that travels as the
// kernel argument: per tensor its pointers, sizes and the index of its first block; a
// block finds its tensor by a binary search over those indices. Nothing is stored per
// block, so one launch takes as many blocks as its tensors need and a list is cut into
// several launches only when its tensors do not fit one table (Table::kWords words).
// Reductions write one fp64 partial per unit (global unit index), then a single block adds
// the partials in a fixed order: the result does not depend on scheduling.
//
// Rounding: built with --fmad=false (sharpopt/_build.py nvcc_flags(), checked by
// .ci/nvcc_check.sh), so a*b+c is a rounded product then a rounded sum, like the
// reference's separate tensor ops and the CPU code; no fma is written explicitly either.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
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
// Rows up to this length are reduced by teams of 1..32 lanes (several rows per warp for
// short rows); longer rows by the whole block, one row at a time. At this length a unit
// (kChunk / L rows) still has a row for each of the block's 16 warps.
constexpr int64_t kTeamRowMax = 4096;
// Kernel arguments must stay within 4096 bytes, the limit of every CUDA version before
// 12.1 (and of any driver older than that, whatever the toolkit).
constexpr size_t kMaxParamBytes = 4096;

// --- the launch table --------------------------------------------------------------------
// `w` holds rows of `stride` words, one word per tensor slot: first the pointer of every
// operand list the pass uses (in stream order, absent lists take no row), then numel, then
// for row plans the row length and the row-means pointer; after the rows (at `start_off`)
// the first block of every tensor as int32, two to a word. Tensor slots fill 0..n-1; the
// host sets stride to table_capacity(rows), so the layout never moves while it fills.
// Bytes per tensor: 8 per row + 4 (Adam with a saved copy: 52, 76 tensors per launch).
struct Table {
  static constexpr int kWords = 496;  // 3992 B: the largest argument list (Adam) is 4096 B
  int64_t unit_base;  // global index of this launch's first unit (for partials)
  int32_t n;          // tensors in this table
  int32_t stride;     // words per row
  int32_t start_off;  // word index of the packed first-block indices
  int32_t pad_;
  int64_t w[kWords];
};

// Slots a table with `rows` rows per tensor holds: n * rows + ceil(n / 2) <= kWords.
constexpr int table_capacity(int rows) { return (2 * Table::kWords) / (2 * rows + 1); }

// Bytes of a kernel's parameter list as the ABI lays it out (each parameter aligned).
template <class... Ts>
constexpr size_t param_bytes() {
  size_t off = 0;
  ((off = (off + alignof(Ts) - 1) / alignof(Ts) * alignof(Ts) + sizeof(Ts)), ...);
  return off;
}

// The same for a kernel, from its type: KernelArgs<decltype(kernel)>::bytes.
template <class F> struct KernelArgs;
template <class... Ts> struct KernelArgs<void(Ts...)> {
  static constexpr size_t bytes = param_bytes<Ts...>();
};

__host__ __device__ __forceinline__ int64_t table_word(const Table& tab, int row, int t) {
  return tab.w[row * tab.stride + t];
}

template <class T>
__host__ __device__ __forceinline__ T* table_ptr(const Table& tab, int row, int t) {
  return reinterpret_cast<T*>(table_word(tab, row, t));
}

__host__ __device__ __forceinline__ int table_first_block(const Table& tab, int t) {
  const uint64_t x = uint64_t(tab.w[tab.start_off + (t >> 1)]);
  return int(uint32_t(x >> ((t & 1) * 32)));
}

// Block b's tensor slot and its unit index within that tensor: the last slot whose
// first block is <= b (first blocks increase with the slot; slot 0 starts at 0).
struct Slot {
  int t;
  int64_t unit;
};
__host__ __device__ __forceinline__ Slot find_slot(const Table& tab, int b) {
  int lo = 0, hi = tab.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table_first_block(tab, mid) <= b) lo = mid; else hi = mid - 1;
  }
  return {lo, int64_t(b - table_first_block(tab, lo))};
}

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

// Row index and column of a flat element index, advanced by a fixed stride without a
// division per element: one division when a thread starts, then compare-and-subtract.
struct RowCursor {
  int64_t r, c, len, step_r, step_c;
  __host__ __device__ __forceinline__ void init(int64_t i, int64_t row_len, int64_t step) {
    len = row_len;
    r = i / len;
    c = i - r * len;
    step_r = step / len;
    step_c = step - step_r * len;
  }
  __host__ __device__ __forceinline__ void advance() {
    r += step_r;
    c += step_c;
    if (c >= len) {
      c -= len;
      ++r;
    }
  }
};

// --- the passes as element operations ---------------------------------------------------
// Each op names its streams; the kernel loads the streams in `load_mask` (others start at
// 0), calls apply(), and stores the streams in `store_mask`. kRowMeans: the op subtracts a
// per-row mean (the table then carries row lengths and row-means pointers).
// found_inf of the non-finite guard (null: no guard): [0] read, non-zero when the step is
// skipped; [1] set by an update that kept an element for a non-finite gradient.
__device__ __forceinline__ bool skipped(const float* flag) { return flag && flag[0] != 0.f; }

struct PerturbOp {  // streams: 0 w, 1 saved, 2 g
  static constexpr int D = 3;
  static constexpr bool kRowMeans = true;
  static constexpr bool kGuard = false;
  DevScalar scale;
  double eta;
  bool adaptive, save;
  bool rows;  // the table has the row-length and row-means rows
  const float* flag;  // a skipped step perturbs by e = 0
  template <class A> struct Ready { PerturbArgs<A> a; bool save, skip; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{read_scalar<A>(scale), A(eta), adaptive}, save, skipped(flag)};
  }
  template <class A> __device__ static void apply(const Ready<A>& r, A (&x)[D], A mu) {
    const A s = r.save ? x[0] : x[1];
    x[1] = s;
    x[0] = r.skip ? s : perturb_elem(s, x[2], mu, r.a);
  }
};

struct LincombOp {  // streams: 0..2 x_k, 3 out
  static constexpr int D = 4;
  static constexpr bool kRowMeans = false;
  static constexpr bool kGuard = false;
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

// The update ops take the guard's `seen` (see sgd_elem_guarded); with a skipped step every
// element keeps its weight (restored) and state (a buffer created now starts at 0: it was
// not loaded, so x[3] is 0).
struct SgdOp {  // streams: 0 w, 1 saved, 2 g, 3 buf
  static constexpr int D = 4;
  static constexpr bool kRowMeans = false;
  static constexpr bool kGuard = true;
  SgdArgs<double> a;
  bool has_saved;
  float* flag;
  template <class A> struct Ready { SgdArgs<A> a; bool has_saved, guard, skip; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{A(a.lr), A(a.weight_decay), A(a.momentum), A(a.one_minus_dampening), A(a.grad_sign),
             a.has_momentum, a.nesterov, a.init},
            has_saved, flag != nullptr, skipped(flag)};
  }
  template <class A> __device__ static void apply(const Ready<A>& r, A (&x)[D], A, A& seen) {
    A w = r.has_saved ? x[1] : x[0];
    if (r.skip) {
    } else if (r.guard) {
      sgd_elem_guarded(w, x[3], x[2], r.a, seen);
    } else {
      sgd_elem(w, x[3], x[2], r.a);
    }
    x[0] = w;
  }
};

struct AdamOp {  // streams: 0 w, 1 saved, 2 g, 3 m, 4 v, 5 vmax
  static constexpr int D = 6;
  static constexpr bool kRowMeans = false;
  static constexpr bool kGuard = true;
  AdamArgs<double> a;
  bool has_saved;
  float* flag;
  template <class A> struct Ready { AdamArgs<A> a; bool has_saved, guard, skip; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{A(a.grad_sign), A(a.decay), A(a.weight_decay), A(a.one_minus_beta1), A(a.beta2),
             A(a.one_minus_beta2), A(a.bc2_sqrt), A(a.eps), A(a.step_size), a.decoupled, a.amsgrad},
            has_saved, flag != nullptr, skipped(flag)};
  }
  template <class A> __device__ static void apply(const Ready<A>& r, A (&x)[D], A, A& seen) {
    A w = r.has_saved ? x[1] : x[0];
    if (r.skip) {
    } else if (r.guard) {
      adam_elem_guarded(w, x[3], x[4], x[5], x[2], r.a, seen);
    } else {
      adam_elem(w, x[3], x[4], x[5], x[2], r.a);
    }
    x[0] = w;
  }
};

// Plain reduction over element units: streams 0 and 1 (x, y), term chosen by `kind`.
enum class Term : int { kSquare = 0, kWeightedSquare = 1, kProduct = 2 };

// The most rows per tensor a plan uses: Adam's six operand lists + numel; a perturb with row
// means: three lists + numel + row length + means.
constexpr bool table_fits(int rows) {
  return table_capacity(rows) >= 1 &&
         table_capacity(rows) * rows + (table_capacity(rows) + 1) / 2 <= Table::kWords &&
         (table_capacity(rows) + 1) * rows + (table_capacity(rows) + 2) / 2 > Table::kWords;
}
static_assert(table_fits(2) && table_fits(3) && table_fits(4) && table_fits(5) &&
                  table_fits(6) && table_fits(7),
              "table_capacity must be the largest slot count whose rows and first-block "
              "indices fit Table::kWords");

// --- reductions inside a block -----------------------------------------------------------
// Fixed trees (shuffle-down within a warp, then warp results in order): the same inputs
// give the same bits on every run.
__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;  // valid in lane 0
}

// Sum over the aligned group of `width` lanes (a power of two <= 32) holding this lane,
// returned to every lane of the group. Butterfly: at each level both partners add the same
// two values (a + b == b + a exactly), so all lanes get the same bits. Every lane of the
// warp must call it.
__device__ __forceinline__ double team_allsum(double v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
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

// block_sum, returned to every thread.
__device__ double block_allsum(double v) {
  __shared__ double total;
  v = block_sum(v);
  if (threadIdx.x == 0) total = v;
  __syncthreads();
  v = total;
  __syncthreads();  // `total` may be rewritten by a later call
  return v;
}

// --- kernels -----------------------------------------------------------------------------
// Table rows of an elementwise launch: the pointer of every stream in load_mask|store_mask
// (in stream order), numel, then (op.rows) row length and row-means pointer.
template <class R, class Op>
__global__ void __launch_bounds__(kThreads)
elementwise_kernel(Table tab, int load_mask, int store_mask, Op op) {
  constexpr int D = Op::D;
  constexpr int V = 16 / sizeof(R);
  using A = acc_t<R>;
  const Slot slot = find_slot(tab, int(blockIdx.x));
  const int t = slot.t;
  const int used = load_mask | store_mask;
  const int nptr = __popc(used);
  const int64_t begin = slot.unit * kChunk;
  const int64_t end = min(table_word(tab, nptr, t), begin + kChunk);
  const auto ready = op.template prepare<A>();

  R* p[D];
  bool vec = true;
#pragma unroll
  for (int k = 0; k < D; ++k) {
    p[k] = nullptr;
    if ((used >> k) & 1) {
      p[k] = table_ptr<R>(tab, __popc(used & ((1 << k) - 1)), t);
      vec = vec && aligned16(p[k]);
    }
  }
  // Row means (perturb with gradient centralisation): element i belongs to row i / L,
  // tracked by a RowCursor instead of a division per element. The vector loop then needs
  // L % V == 0 so that no pack straddles two rows (packs start at multiples of V); other
  // row lengths (rare: L = 9, 27, ... of small convolutions) take the element loop.
  const float* means = nullptr;
  int64_t L = 1;
  if constexpr (Op::kRowMeans) {
    if (op.rows) {
      L = table_word(tab, nptr + 1, t);
      means = table_ptr<const float>(tab, nptr + 2, t);
      if (means && L % V != 0) vec = false;
    }
  }

  // The guard's record of this thread's elements (NaN once one was kept), see kGuard ops.
  A seen = A(0);
  int64_t tail = begin;
  if (vec) {
    const int64_t nvec = (end - begin) / V;
    RowCursor cur;
    if (Op::kRowMeans && means) cur.init(begin + int64_t(threadIdx.x) * V, L, int64_t(blockDim.x) * V);
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t i = begin + j * V;
      Pack<R, V> pk[D];
#pragma unroll
      for (int k = 0; k < D; ++k)
        if ((load_mask >> k) & 1) pk[k] = *reinterpret_cast<const Pack<R, V>*>(p[k] + i);
      // With row means, vec implies L % V == 0: the pack lies in one row.
      A mu = A(0);
      if (Op::kRowMeans && means) {
        mu = A(means[cur.r]);
        cur.advance();
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A x[D];
#pragma unroll
        for (int k = 0; k < D; ++k) x[k] = ((load_mask >> k) & 1) ? to_acc(pk[k].v[e]) : A(0);
        if constexpr (Op::kGuard) Op::apply(ready, x, mu, seen); else Op::apply(ready, x, mu);
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
  RowCursor cur;
  if (Op::kRowMeans && means) cur.init(tail + threadIdx.x, L, blockDim.x);
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
    A mu = A(0);
    if (Op::kRowMeans && means) {
      mu = A(means[cur.r]);
      cur.advance();
    }
    A x[D];
#pragma unroll
    for (int k = 0; k < D; ++k) x[k] = ((load_mask >> k) & 1) ? to_acc(p[k][i]) : A(0);
    if constexpr (Op::kGuard) Op::apply(ready, x, mu, seen); else Op::apply(ready, x, mu);
#pragma unroll
    for (int k = 0; k < D; ++k)
      if ((store_mask >> k) & 1) p[k][i] = from_acc<R>(x[k]);
  }
  if constexpr (Op::kGuard) {
    // Every thread of the block gets here; one store of 1 per block that kept an element.
    if (ready.guard && !ready.skip && __syncthreads_or(seen != seen) && threadIdx.x == 0)
      op.flag[1] = 1.f;
  }
}

// Bitwise copy (restore): moves raw words, never converts. Table rows: dst, src, numel.
template <class W>
__global__ void __launch_bounds__(kThreads) copy_kernel(Table tab) {
  constexpr int V = 16 / sizeof(W);
  const Slot slot = find_slot(tab, int(blockIdx.x));
  const int t = slot.t;
  const int64_t begin = slot.unit * kChunk;
  const int64_t end = min(table_word(tab, 2, t), begin + kChunk);
  W* dst = table_ptr<W>(tab, 0, t);
  const W* src = table_ptr<const W>(tab, 1, t);
  int64_t tail = begin;
  if (aligned16(dst) && aligned16(src)) {
    const int64_t nvec = (end - begin) / V;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x)
      reinterpret_cast<Pack<W, V>*>(dst + begin)[j] = reinterpret_cast<const Pack<W, V>*>(src + begin)[j];
    tail = begin + nvec * V;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) dst[i] = src[i];
}

// Table rows: x, y (not for kSquare), numel.
template <class R>
__global__ void __launch_bounds__(kThreads)
reduce_kernel(Table tab, Term kind, double eta, double* partials) {
  constexpr int V = 16 / sizeof(R);
  using A = acc_t<R>;
  const bool two = kind != Term::kSquare;
  const Slot slot = find_slot(tab, int(blockIdx.x));
  const int t = slot.t;
  const int64_t begin = slot.unit * kChunk;
  const int64_t end = min(table_word(tab, two ? 2 : 1, t), begin + kChunk);
  const R* x = table_ptr<const R>(tab, 0, t);
  const R* y = two ? table_ptr<const R>(tab, 1, t) : nullptr;
  const A e = A(eta);
  auto term = [&](A a, A b) -> A {
    if (kind == Term::kProduct) return a * b;
    const A d = weighted_dev(b, a, A(0), e, kind == Term::kWeightedSquare);
    return d * d;
  };
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

// One thread's share of a row: items j0, j0 + step, ... (packs of V elements when `vec`),
// summed in the accumulation type, in order.
// I: the index type (int for team rows, which are short; int64_t for block rows).
template <class R, int V, class A, class I>
__device__ __forceinline__ A row_sum(const R* gr, I items, bool vec, I j0, I step) {
  A s = A(0);
  if (vec) {
    for (I j = j0; j < items; j += step) {
      const Pack<R, V> pg = reinterpret_cast<const Pack<R, V>*>(gr)[j];
#pragma unroll
      for (int k = 0; k < V; ++k) s += to_acc(pg.v[k]);
    }
  } else {
    for (I j = j0; j < items; j += step) s += to_acc(gr[j]);
  }
  return s;
}

// The same share of sum (T (g - mu))^2, T = |w| + eta when adaptive (wr is then the row of w).
template <class R, int V, class A, class I>
__device__ __forceinline__ A row_sq(const R* gr, const R* wr, I items, bool vec, I j0, I step,
                                    A mu, A eta, bool adaptive) {
  A q = A(0);
  if (vec) {
    for (I j = j0; j < items; j += step) {
      const Pack<R, V> pg = reinterpret_cast<const Pack<R, V>*>(gr)[j];
      Pack<R, V> pw;
      if (adaptive) pw = reinterpret_cast<const Pack<R, V>*>(wr)[j];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A d = weighted_dev(adaptive ? to_acc(pw.v[k]) : A(0), to_acc(pg.v[k]), mu, eta, adaptive);
        q += d * d;
      }
    }
  } else {
    for (I j = j0; j < items; j += step) {
      const A d = weighted_dev(adaptive ? to_acc(wr[j]) : A(0), to_acc(gr[j]), mu, eta, adaptive);
      q += d * d;
    }
  }
  return q;
}

// Row-wise norm (gradient centralisation): one unit = a group of whole rows (kChunk / L of
// them, at least one). Two passes per row: the exact mean (written to the row-means buffer
// as fp32), then the sum of (T (g - mean))^2 (the second pass mostly hits L2). Each thread
// accumulates its share in the accumulation type (fp32, fp64 for double); shares are added
// in fp64 by fixed trees. Rows of up to kTeamRowMax elements are reduced by teams of `tw`
// lanes (a power of two, about a quarter of the row's items, at most 32), so a warp takes
// 32 / tw rows at a time and short rows leave few lanes idle; longer rows by the whole
// block. Every row's team and tree depend only on the shapes: the result is deterministic.
// Table rows: g, w (when adaptive), numel, row length, row-means pointer (0: none).
template <class R>
__global__ void __launch_bounds__(kThreads)
rows_kernel(Table tab, bool adaptive, double eta, bool centralize, double* partials) {
  constexpr int V = 16 / sizeof(R);
  using A = acc_t<R>;
  const Slot slot = find_slot(tab, int(blockIdx.x));
  const int t = slot.t;
  const int nptr = adaptive ? 2 : 1;
  const R* g = table_ptr<const R>(tab, 0, t);
  const R* w = adaptive ? table_ptr<const R>(tab, 1, t) : nullptr;
  const int64_t L = table_word(tab, nptr + 1, t);
  float* means = table_ptr<float>(tab, nptr + 2, t);
  const int64_t rows = table_word(tab, nptr, t) / L;
  const int64_t per = kChunk / L > 0 ? kChunk / L : 1;
  const int64_t r0 = slot.unit * per;
  const int64_t r1 = min(rows, r0 + per);
  const A e = A(eta);
  // Every row starts 16-byte aligned when the base is and L is a multiple of V.
  const bool vec = L % V == 0 && aligned16(g) && (!adaptive || aligned16(w));
  const int64_t items = vec ? L / V : L;
  double mine = 0;  // this team's (or the block's, in thread 0) rows, in row order
  if (L <= kTeamRowMax) {
    int lg = 0;  // tw = 1 << lg lanes per row
    while (lg < 5 && (int64_t(4) << lg) < items) ++lg;
    const int tw = 1 << lg;
    const int team = int(threadIdx.x) >> lg, lane = int(threadIdx.x) & (tw - 1);
    const int nteams = int(blockDim.x) >> lg;
    // rb is the same in every thread, so all lanes of a warp reach the shuffles together.
    for (int64_t rb = r0; rb < r1; rb += nteams) {
      const int64_t r = rb + team;
      const bool live = r < r1;
      const int ni = int(items);  // <= kTeamRowMax
      const A s = live ? row_sum<R, V, A, int>(g + r * L, ni, vec, lane, tw) : A(0);
      const double mean = team_allsum(double(s), tw) / double(L);
      if (live && lane == 0 && means) means[r] = float(mean);
      const A mu = centralize ? A(mean) : A(0);
      const A q = live ? row_sq<R, V, A, int>(g + r * L, adaptive ? w + r * L : nullptr, ni, vec,
                                              lane, tw, mu, e, adaptive)
                       : A(0);
      const double qs = team_allsum(double(q), tw);
      if (live && lane == 0) mine += qs;
    }
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      const A s = row_sum<R, V, A, int64_t>(g + r * L, items, vec, threadIdx.x, blockDim.x);
      const double mean = block_allsum(double(s)) / double(L);
      if (threadIdx.x == 0 && means) means[r] = float(mean);
      const A mu = centralize ? A(mean) : A(0);
      const A q = row_sq<R, V, A, int64_t>(g + r * L, adaptive ? w + r * L : nullptr, items, vec,
                                           threadIdx.x, blockDim.x, mu, e, adaptive);
      const double qs = block_sum(double(q));
      if (threadIdx.x == 0) mine += qs;
    }
  }
  const double total = block_sum(mine);
  if (threadIdx.x == 0) partials[tab.unit_base + blockIdx.x] = total;
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

// Every kernel's by-value arguments against the 4096-byte limit, from the kernels' own
// signatures (.ci/nvcc_check.sh measures the same from the PTX). The argument types do not
// depend on the element type, so one instantiation per kernel and op covers them all.
#define SOPT_ARGS_FIT(...)                                                                 \
  static_assert(KernelArgs<decltype(__VA_ARGS__)>::bytes <= kMaxParamBytes,                \
                #__VA_ARGS__ ": kernel arguments exceed 4096 bytes, the limit before CUDA " \
                "12.1; lower Table::kWords")
SOPT_ARGS_FIT(elementwise_kernel<double, PerturbOp>);
SOPT_ARGS_FIT(elementwise_kernel<double, LincombOp>);
SOPT_ARGS_FIT(elementwise_kernel<double, SgdOp>);
SOPT_ARGS_FIT(elementwise_kernel<double, AdamOp>);
SOPT_ARGS_FIT(copy_kernel<uint64_t>);
SOPT_ARGS_FIT(reduce_kernel<double>);
SOPT_ARGS_FIT(rows_kernel<double>);
SOPT_ARGS_FIT(finish_kernel);
#undef SOPT_ARGS_FIT

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

int64_t word_of(const void* p) { return int64_t(reinterpret_cast<uintptr_t>(p)); }

// What a launch table holds per tensor: the pointers of `nptr` operand lists (in row
// order), numel, and with `rows` the row length and row-means pointer. `row_units`: units
// are groups of whole rows (the rows kernel) instead of kChunk elements.
struct TablePlan {
  int nptr = 0;
  const void* const* lists[6] = {};
  bool rows = false;
  bool row_units = false;
};

// Calls launch(table, blocks) for every full table and the last one. `take(i)` says
// whether tensor i belongs to this plan. Units are numbered globally in tensor order from
// `base`; returns the number after the last. A table is closed when it holds
// table_capacity() tensors (or its blocks would pass INT_MAX: the grid's x limit; one
// tensor has far fewer units than that, at most numel / 2^16).
template <class Take, class Launch>
int64_t for_tables(const TablePlan& pl, int n, const int64_t* numel, const int64_t* row_len,
                   const float* const* means, int64_t base, const Take& take,
                   const Launch& launch) {
  const int nrows = pl.nptr + 1 + (pl.rows ? 2 : 0);
  const int cap = table_capacity(nrows);
  Table tab{};
  tab.unit_base = base;
  tab.stride = cap;
  tab.start_off = nrows * cap;
  int64_t nb = 0;
  auto flush = [&] {
    if (tab.n == 0) return;
    launch(tab, int(nb));
    tab.unit_base += nb;
    tab.n = 0;
    nb = 0;
  };
  for (int i = 0; i < n; ++i) {
    if (!take(i) || numel[i] == 0) continue;
    const int64_t L = row_len ? row_len[i] : 0;
    const int64_t units = units_of(numel[i], pl.row_units ? L : 0);
    if (tab.n == cap || nb + units > INT_MAX) flush();
    const int t = tab.n++;
    for (int k = 0; k < pl.nptr; ++k) tab.w[k * cap + t] = word_of(pl.lists[k][i]);
    tab.w[pl.nptr * cap + t] = numel[i];
    if (pl.rows) {
      tab.w[(pl.nptr + 1) * cap + t] = L > 0 ? L : 1;
      tab.w[(pl.nptr + 2) * cap + t] = L > 0 && means ? word_of(means[i]) : 0;
    }
    int64_t& starts = tab.w[tab.start_off + (t >> 1)];
    starts = (t & 1) ? int64_t(uint64_t(uint32_t(starts)) | (uint64_t(uint32_t(nb)) << 32))
                     : int64_t(uint32_t(nb));
    nb += units;
  }
  flush();
  return tab.unit_base;
}

// The dtype switch; `fn(R())` returns cudaSuccess or the error of a bad argument.
template <class Fn>
cudaError_t dispatch(DType dt, const Fn& fn) {
  cudaError_t err = cudaErrorInvalidValue;
  switch (dt) {
    case DType::kFloat32: err = fn(float()); break;
    case DType::kFloat64: err = fn(double()); break;
    case DType::kBFloat16: err = fn(__nv_bfloat16()); break;
    case DType::kFloat16: err = fn(__half()); break;
    default: return cudaErrorInvalidValue;
  }
  return err != cudaSuccess ? err : cudaGetLastError();
}

auto all = [](int) { return true; };

// Streams in load_mask | store_mask get a table row each; the others take no room.
template <class R, class Op>
cudaError_t run_elementwise(int n, const void* const* const (&lists)[Op::D], const int64_t* numel,
                            const int64_t* row_len, const float* const* means, int load_mask,
                            int store_mask, const Op& op, cudaStream_t stream) {
  TablePlan pl;
  for (int k = 0; k < Op::D; ++k) {
    if (!(((load_mask | store_mask) >> k) & 1)) continue;
    if (lists[k] == nullptr) return cudaErrorInvalidValue;  // a stream the pass reads or writes
    pl.lists[pl.nptr++] = lists[k];
  }
  pl.rows = Op::kRowMeans && means != nullptr;
  for_tables(pl, n, numel, row_len, means, 0, all, [&](const Table& tab, int nb) {
    elementwise_kernel<R, Op><<<nb, kThreads, 0, stream>>>(tab, load_mask, store_mask, op);
  });
  return cudaSuccess;
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
  if (adaptive && params == nullptr) return cudaErrorInvalidValue;
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    TablePlan flat;
    flat.nptr = adaptive ? 2 : 1;
    flat.lists[0] = grads;
    flat.lists[1] = params;
    TablePlan rowwise = flat;
    rowwise.rows = true;
    rowwise.row_units = true;
    const Term kind = adaptive ? Term::kWeightedSquare : Term::kSquare;
    auto plain = [&](int i) { return !row_len || row_len[i] == 0; };
    auto by_rows = [&](int i) { return row_len && row_len[i] > 0; };
    int64_t next = for_tables(flat, n, numel, row_len, nullptr, 0, plain,
                              [&](const Table& tab, int nb) {
                                reduce_kernel<R><<<nb, kThreads, 0, stream>>>(tab, kind, eta, workspace);
                              });
    next = for_tables(rowwise, n, numel, row_len, row_means, next, by_rows,
                      [&](const Table& tab, int nb) {
                        rows_kernel<R><<<nb, kThreads, 0, stream>>>(tab, adaptive, eta, centralize, workspace);
                      });
    const bool f64 = dt == DType::kFloat64;
    finish_kernel<<<1, kThreads, 0, stream>>>(workspace, next, f64 ? nullptr : static_cast<float*>(out),
                                              f64 ? static_cast<double*>(out) : nullptr);
    return cudaSuccess;
  });
}

cudaError_t dot(DType dt, int n, const void* const* xs, const void* const* ys,
                const int64_t* numel, double* workspace, void* out, cudaStream_t stream) {
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    TablePlan pl;
    pl.nptr = 2;
    pl.lists[0] = xs;
    pl.lists[1] = ys;
    const int64_t units = for_tables(pl, n, numel, nullptr, nullptr, 0, all,
                                     [&](const Table& tab, int nb) {
                                       reduce_kernel<R><<<nb, kThreads, 0, stream>>>(tab, Term::kProduct, 0.0, workspace);
                                     });
    const bool f64 = dt == DType::kFloat64;
    finish_kernel<<<1, kThreads, 0, stream>>>(workspace, units, f64 ? nullptr : static_cast<float*>(out),
                                              f64 ? static_cast<double*>(out) : nullptr);
    return cudaSuccess;
  });
}

cudaError_t perturb(DType dt, int n, void* const* params, const void* const* grads,
                    void* const* saved, const int64_t* numel, const int64_t* row_len,
                    const float* const* row_means, DevScalar scale, bool adaptive, double eta,
                    bool save, const float* found_inf, cudaStream_t stream) {
  // Row lengths and means ride in the table only when some tensor is centralised.
  bool any_means = false;
  for (int i = 0; i < n && row_means && row_len && !any_means; ++i)
    any_means = row_means[i] != nullptr && row_len[i] > 0;
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const void* const* lists[3] = {params, saved, grads};
    const PerturbOp op{scale, eta, adaptive, save, any_means, found_inf};
    return run_elementwise<R>(n, lists, numel, row_len, any_means ? row_means : nullptr,
                              save ? 0b101 : 0b110, save ? 0b011 : 0b001, op, stream);
  });
}

cudaError_t restore(DType dt, int n, void* const* params, const void* const* saved,
                    const int64_t* numel, cudaStream_t stream) {
  TablePlan pl;
  pl.nptr = 2;
  pl.lists[0] = params;
  pl.lists[1] = saved;
  auto go = [&](auto word) {
    using W = decltype(word);
    for_tables(pl, n, numel, nullptr, nullptr, 0, all, [&](const Table& tab, int nb) {
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
    return run_elementwise<R>(n, lists, numel, nullptr, nullptr, (1 << K) - 1, 0b1000, op, stream);
  });
}

cudaError_t restore_sgd(DType dt, int n, void* const* params, const void* const* saved,
                        const void* const* grads, void* const* bufs, const int64_t* numel,
                        const SgdArgs<double>& args, float* found_inf, cudaStream_t stream) {
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const bool has_saved = saved != nullptr;
    const bool mom = args.has_momentum;
    const void* const* lists[4] = {params, saved, grads, mom ? bufs : nullptr};
    const int load = (has_saved ? 0b0010 : 0b0001) | 0b0100 | (mom && !args.init ? 0b1000 : 0);
    const int store = 0b0001 | (mom ? 0b1000 : 0);
    return run_elementwise<R>(n, lists, numel, nullptr, nullptr, load, store, SgdOp{args, has_saved, found_inf}, stream);
  });
}

cudaError_t restore_adam(DType dt, int n, void* const* params, const void* const* saved,
                         const void* const* grads, void* const* exp_avgs,
                         void* const* exp_avg_sqs, void* const* vmax, const int64_t* numel,
                         const AdamArgs<double>& args, float* found_inf, cudaStream_t stream) {
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const bool has_saved = saved != nullptr;
    const bool ams = args.amsgrad;
    const void* const* lists[6] = {params, saved, grads, exp_avgs, exp_avg_sqs, ams ? vmax : nullptr};
    const int load = (has_saved ? 0b000010 : 0b000001) | 0b011100 | (ams ? 0b100000 : 0);
    const int store = 0b011001 | (ams ? 0b100000 : 0);
    return run_elementwise<R>(n, lists, numel, nullptr, nullptr, load, store, AdamOp{args, has_saved, found_inf}, stream);
  });
}

// --- MSAM: move back from w~, base update, and the momentum's sum of squares ------------
// One pass: each element is moved back (w = w~ + back * m, with the old m), updated by
// sgd_elem / adam_elem, stored, and the square of the stored momentum is added to this
// block's partial; finish_kernel adds the partials in order, as for sumsq. The streams a
// pass loads and stores are template arguments, and the move-back scale travels as a
// device pointer: with the partials pointer, the Adam kernel's arguments are exactly
// 4096 bytes (static_assert below).
namespace {

struct MsamBack {     // the move-back scale, read on the device
  const void* ptr;    // float, or double when f64; unused when !on
  bool f64;
  bool on;
  template <class A> __device__ A read() const {
    if (!on) return A(0);
    return f64 ? A(*static_cast<const double*>(ptr)) : A(*static_cast<const float*>(ptr));
  }
};

struct MsamSgdOp {  // streams: 0 w, 1 g, 2 buf; the norm is of stream 2
  static constexpr int D = 3;
  static constexpr int kNorm = 2;
  SgdArgs<double> a;
  MsamBack back;
  template <class A> struct Ready { SgdArgs<A> a; A back; bool has_back; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{A(a.lr), A(a.weight_decay), A(a.momentum), A(a.one_minus_dampening), A(a.grad_sign),
             a.has_momentum, a.nesterov, a.init},
            back.template read<A>(), back.on};
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
  MsamBack back;
  template <class A> struct Ready { AdamArgs<A> a; A back; bool has_back; };
  template <class A> __device__ Ready<A> prepare() const {
    return {{A(a.grad_sign), A(a.decay), A(a.weight_decay), A(a.one_minus_beta1), A(a.beta2),
             A(a.one_minus_beta2), A(a.bc2_sqrt), A(a.eps), A(a.step_size), a.decoupled, a.amsgrad},
            back.template read<A>(), back.on};
  }
  template <class A> __device__ static void apply(const Ready<A>& r, A (&x)[D]) {
    A w = x[0];
    if (r.has_back) w = msam_back_elem(w, x[2], r.back);
    adam_elem(w, x[2], x[3], x[4], x[1], r.a);
    x[0] = w;
  }
};

// Table rows: the pointer of every stream in LOAD | STORE (in stream order), numel.
template <class R, class Op, int LOAD, int STORE>
__global__ void __launch_bounds__(kThreads)
update_sumsq_kernel(Table tab, Op op, double* partials) {
  constexpr int D = Op::D;
  constexpr int V = 16 / sizeof(R);
  constexpr int used = LOAD | STORE;
  static_assert((STORE >> Op::kNorm) & 1, "the momentum stream must be stored");
  using A = acc_t<R>;
  const Slot slot = find_slot(tab, int(blockIdx.x));
  const int t = slot.t;
  const int nptr = __popc(used);
  const int64_t begin = slot.unit * kChunk;
  const int64_t end = min(table_word(tab, nptr, t), begin + kChunk);
  const auto ready = op.template prepare<A>();

  R* p[D];
  bool vec = true;
#pragma unroll
  for (int k = 0; k < D; ++k) {
    p[k] = nullptr;
    if ((used >> k) & 1) {
      p[k] = table_ptr<R>(tab, __popc(used & ((1 << k) - 1)), t);
      vec = vec && aligned16(p[k]);
    }
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
        if ((LOAD >> k) & 1) pk[k] = *reinterpret_cast<const Pack<R, V>*>(p[k] + i);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A x[D];
#pragma unroll
        for (int k = 0; k < D; ++k) x[k] = ((LOAD >> k) & 1) ? to_acc(pk[k].v[e]) : A(0);
        Op::apply(ready, x);
#pragma unroll
        for (int k = 0; k < D; ++k)
          if ((STORE >> k) & 1) pk[k].v[e] = from_acc<R>(x[k]);
        const A m = to_acc(pk[Op::kNorm].v[e]);  // the stored (rounded) momentum
        acc += m * m;
      }
#pragma unroll
      for (int k = 0; k < D; ++k)
        if ((STORE >> k) & 1) *reinterpret_cast<Pack<R, V>*>(p[k] + i) = pk[k];
    }
    tail = begin + nvec * V;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
    A x[D];
#pragma unroll
    for (int k = 0; k < D; ++k) x[k] = ((LOAD >> k) & 1) ? to_acc(p[k][i]) : A(0);
    Op::apply(ready, x);
#pragma unroll
    for (int k = 0; k < D; ++k)
      if ((STORE >> k) & 1) p[k][i] = from_acc<R>(x[k]);
    const A m = to_acc(from_acc<R>(x[Op::kNorm]));
    acc += m * m;
  }
  const double total = block_sum(double(acc));
  if (threadIdx.x == 0) partials[tab.unit_base + blockIdx.x] = total;
}

static_assert(KernelArgs<decltype(update_sumsq_kernel<double, MsamSgdOp, 0b111, 0b101>)>::bytes
                  <= kMaxParamBytes, "MSAM SGD kernel arguments exceed 4096 bytes");
static_assert(KernelArgs<decltype(update_sumsq_kernel<double, MsamAdamOp, 0b11111, 0b11101>)>::bytes
                  <= kMaxParamBytes, "MSAM Adam kernel arguments exceed 4096 bytes");

template <class R, class Op, int LOAD, int STORE>
cudaError_t run_update_sumsq(DType dt, int n, const void* const* const (&lists)[Op::D],
                             const int64_t* numel, const Op& op, double* workspace, void* out,
                             cudaStream_t stream) {
  TablePlan pl;
  for (int k = 0; k < Op::D; ++k) {
    if (!(((LOAD | STORE) >> k) & 1)) continue;
    if (lists[k] == nullptr) return cudaErrorInvalidValue;
    pl.lists[pl.nptr++] = lists[k];
  }
  const int64_t units = for_tables(pl, n, numel, nullptr, nullptr, 0, all,
                                   [&](const Table& tab, int nb) {
                                     update_sumsq_kernel<R, Op, LOAD, STORE>
                                         <<<nb, kThreads, 0, stream>>>(tab, op, workspace);
                                   });
  const bool f64 = dt == DType::kFloat64;
  finish_kernel<<<1, kThreads, 0, stream>>>(workspace, units, f64 ? nullptr : static_cast<float*>(out),
                                            f64 ? static_cast<double*>(out) : nullptr);
  return cudaSuccess;
}

MsamBack msam_back(const DevScalar& s, bool has_back) {
  return {s.f64 ? static_cast<const void*>(s.f64) : static_cast<const void*>(s.f32),
          s.f64 != nullptr, has_back};
}

}  // namespace

cudaError_t msam_sgd(DType dt, int n, void* const* params, const void* const* grads,
                     void* const* bufs, const int64_t* numel, const SgdArgs<double>& args,
                     DevScalar back, bool has_back, double* workspace, void* out,
                     cudaStream_t stream) {
  if (!args.has_momentum || (has_back && args.init)) return cudaErrorInvalidValue;
  if (has_back && !back.f32 && !back.f64) return cudaErrorInvalidValue;  // needs device memory
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const void* const* lists[3] = {params, grads, bufs};
    const MsamSgdOp op{args, msam_back(back, has_back)};
    if (args.init)
      return run_update_sumsq<R, MsamSgdOp, 0b011, 0b101>(dt, n, lists, numel, op, workspace, out, stream);
    return run_update_sumsq<R, MsamSgdOp, 0b111, 0b101>(dt, n, lists, numel, op, workspace, out, stream);
  });
}

cudaError_t msam_adam(DType dt, int n, void* const* params, const void* const* grads,
                      void* const* exp_avgs, void* const* exp_avg_sqs, void* const* vmax,
                      const int64_t* numel, const AdamArgs<double>& args, DevScalar back,
                      bool has_back, double* workspace, void* out, cudaStream_t stream) {
  if (has_back && !back.f32 && !back.f64) return cudaErrorInvalidValue;  // needs device memory
  return dispatch(dt, [&](auto zero) {
    using R = decltype(zero);
    const void* const* lists[5] = {params, grads, exp_avgs, exp_avg_sqs, vmax};
    const MsamAdamOp op{args, msam_back(back, has_back)};
    if (args.amsgrad)
      return run_update_sumsq<R, MsamAdamOp, 0b11111, 0b11101>(dt, n, lists, numel, op, workspace, out, stream);
    return run_update_sumsq<R, MsamAdamOp, 0b01111, 0b01101>(dt, n, lists, numel, op, workspace, out, stream);
  });
}

}  // namespace sharpopt_cuda
