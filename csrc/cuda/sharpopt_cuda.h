// Host interface between the CUDA kernels (sharpopt_kernels.cu, no torch) and the torch
// binding (sharpopt_cuda.cpp). Lists are arrays of n raw device pointers with the element
// counts in `numel`; a list that a pass does not use may be null. Every function enqueues
// its kernels on `stream` and returns cudaGetLastError() (cudaSuccess when all launched).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "sharpopt_math.h"

namespace sharpopt_cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// A pass scalar: read on the device from `f64` or `f32` when one is set (a 0-dim tensor),
// otherwise `value` (a Python float). No host synchronisation either way.
struct DevScalar {
  const float* f32 = nullptr;
  const double* f64 = nullptr;
  double value = 0.0;
};

// Partials the workspace of sumsq/dot must hold. `row_len[i] > 0` marks tensor i as
// reduced row by row (rows of that length); `row_len` may be null (no such tensor).
int64_t reduction_units(int n, const int64_t* numel, const int64_t* row_len);

// sum_i ||T_i * C_i(g_i)||^2 into `out` (float, or double for kFloat64). Tensors with
// row_len[i] > 0 are reduced per row: their row means go to row_means[i] (when not null)
// and, when `centralize`, the rows are centred before squaring.
cudaError_t sumsq(DType dt, int n, const void* const* grads, const void* const* params,
                  const int64_t* numel, const int64_t* row_len, float* const* row_means,
                  bool adaptive, double eta, bool centralize, double* workspace, void* out,
                  cudaStream_t stream);

cudaError_t dot(DType dt, int n, const void* const* xs, const void* const* ys,
                const int64_t* numel, double* workspace, void* out, cudaStream_t stream);

// saved <- w (when save); w <- saved + scale * T^2 (g - mean of the row), the mean taken
// from row_means[i] (rows of row_len[i]) for the tensors where it is not null. With
// found_inf (2 floats, may be null) and found_inf[0] != 0 the perturbation is e = 0.
cudaError_t perturb(DType dt, int n, void* const* params, const void* const* grads,
                    void* const* saved, const int64_t* numel, const int64_t* row_len,
                    const float* const* row_means, DevScalar scale, bool adaptive, double eta,
                    bool save, const float* found_inf, cudaStream_t stream);

// w <- saved, bit for bit.
cudaError_t restore(DType dt, int n, void* const* params, const void* const* saved,
                    const int64_t* numel, cudaStream_t stream);

// out <- sum_{k<K} c[k] * x_k, K = 1..3; out may alias any x_k.
cudaError_t lincomb(DType dt, int n, int K, void* const* out, const void* const* x0,
                    const void* const* x1, const void* const* x2, const int64_t* numel,
                    const DevScalar* coefs, cudaStream_t stream);

// w <- saved (when saved is not null), then sharpopt::math::sgd_elem. `bufs` may be null
// when args.has_momentum is false; with args.init the buffers are written, not read.
// found_inf (2 floats on the device, may be null: no guard): [0] != 0 skips the step (w
// restored, state kept); otherwise sgd_elem_guarded, and [1] <- 1 when an element was kept.
cudaError_t restore_sgd(DType dt, int n, void* const* params, const void* const* saved,
                        const void* const* grads, void* const* bufs, const int64_t* numel,
                        const sharpopt::math::SgdArgs<double>& args, float* found_inf,
                        cudaStream_t stream);

// w <- saved (when saved is not null), then sharpopt::math::adam_elem. `vmax` may be null
// when args.amsgrad is false. found_inf: as restore_sgd's (adam_elem_guarded).
cudaError_t restore_adam(DType dt, int n, void* const* params, const void* const* saved,
                         const void* const* grads, void* const* exp_avgs,
                         void* const* exp_avg_sqs, void* const* vmax, const int64_t* numel,
                         const sharpopt::math::AdamArgs<double>& args, float* found_inf,
                         cudaStream_t stream);

// MSAM: w <- w~ + back * buf (when has_back; the old buffer), then sgd_elem; the sum of
// squares of the updated buffers goes to `out` (float, or double for kFloat64) through
// `workspace` (reduction_units(n, numel, nullptr) doubles). Needs args.has_momentum.
cudaError_t msam_sgd(DType dt, int n, void* const* params, const void* const* grads,
                     void* const* bufs, const int64_t* numel,
                     const sharpopt::math::SgdArgs<double>& args, DevScalar back, bool has_back,
                     double* workspace, void* out, cudaStream_t stream);

// MSAM with Adam/AdamW: w <- w~ + back * exp_avg (when has_back), then adam_elem; the sum
// of squares of the updated exp_avg goes to `out`. `vmax` may be null without amsgrad.
cudaError_t msam_adam(DType dt, int n, void* const* params, const void* const* grads,
                      void* const* exp_avgs, void* const* exp_avg_sqs, void* const* vmax,
                      const int64_t* numel, const sharpopt::math::AdamArgs<double>& args,
                      DevScalar back, bool has_back, double* workspace, void* out,
                      cudaStream_t stream);

}  // namespace sharpopt_cuda
