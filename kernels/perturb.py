"""The ascent step: ``saved <- w`` (when saving), ``w <- saved + scale * T^2 * C(g)``.

``T = |saved| + eta`` when adaptive (else 1); ``C`` subtracts the fp32 row means that
``sumsq`` wrote, for the tensors that have a means buffer. ``scale`` may live in device
memory (``rho / (norm + eps)`` computed on the device), so no host sync is needed.
With the non-finite guard's flag (``found_inf``), ``flag[0] != 0`` makes ``e = 0``: the
step is skipped without a host read of the norm.
With SGD-momentum SAM this pass is 16 bytes per fp32 parameter (read w, g; write saved, w).
"""
from __future__ import annotations

from typing import Optional, Sequence

import triton
import triton.language as tl
from torch import Tensor

from . import tables as tb
from .elementwise import perturb_elem
from .tables import device_fn, address, block_of, load, pointer, scalar_value, store


@device_fn
def _perturb_block(w_ptr, g_ptr, s_ptr, means, off, stop, ncols, scale, eta, skip,
                   SAVE: tl.constexpr, ADAPTIVE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr, MASKED: tl.constexpr):
    lanes, left = tl.arange(0, BLOCK), (stop - off).to(tl.int32)
    w_ptr, g_ptr, s_ptr = w_ptr + off, g_ptr + off, s_ptr + off
    if SAVE:
        s = load(w_ptr, lanes, left, MASKED)
        store(s_ptr, lanes, s, left, MASKED)
    else:
        s = load(s_ptr, lanes, left, MASKED)
    s = s.to(ACC)
    d = load(g_ptr, lanes, left, MASKED).to(ACC)
    if means != 0:
        # Row of each element, exact for any int64 size: one 64-bit division per vector,
        # none in 64 bits per lane (that would make this pass compute bound). With
        # rem = off - r0 ncols in [0, ncols), lane j is rem + j past the start of row r0.
        # Rows shorter than a vector: rem and ncols fit in 32 bits, a 32-bit division per
        # lane. Rows at least a vector long: the vector crosses at most one row end, a
        # comparison per lane.
        r0 = off // ncols
        rem = off - r0 * ncols
        if ncols < BLOCK:
            q = (rem.to(tl.int32) + lanes) // ncols.to(tl.int32)
        else:
            q = (rem + lanes >= ncols).to(tl.int32)
        mp = means.to(tl.pointer_type(tl.float32)) + r0
        if MASKED:
            mu = tl.load(mp + q, mask=lanes < left, other=0.0)
        else:
            mu = tl.load(mp + q)
        d = d - mu.to(ACC)
    # The row mean is subtracted above, where the tensor has one (a runtime choice), so
    # perturb_elem's own mu is 0 (g - 0 is g, bit for bit).
    w = perturb_elem(s, d, 0.0, scale, eta, ADAPTIVE)
    if skip is not None:
        w = tl.where(skip != 0, s, w)     # e = 0 exactly (not 0 * d: d may be inf)
    store(w_ptr, lanes, w, left, MASKED)


@triton.jit(do_not_specialize=["ntensors"])
def _perturb_kernel(table, ntensors, scale_ptr, scale_val: tl.float64, eta: tl.float64, flag,
                    SAVE: tl.constexpr, ADAPTIVE: tl.constexpr, DT: tl.constexpr,
                    ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                    CHUNK: tl.constexpr):
    # Operand lists of the table: 0 params, 1 grads, 2 saved, 3 row means (0 = none).
    t, chunk, n, ncols, _ = block_of(table, ntensors, 4)
    start = chunk * CHUNK  # a multiple of CHUNK the compiler can see
    w_ptr = pointer(table, ntensors, t, 0, DT, ALIGNED)
    g_ptr = pointer(table, ntensors, t, 1, DT, ALIGNED)
    s_ptr = pointer(table, ntensors, t, 2, DT, ALIGNED)
    means = address(table, ntensors, t, 3)
    scale = scalar_value(scale_ptr, scale_val, ACC)
    e = tl.full([], eta, ACC)
    if flag is None:
        skip = None
    else:
        skip = tl.load(flag)
    stop = tl.minimum(start + CHUNK, n)
    full = start + (stop - start) // BLOCK * BLOCK
    for off in range(start, full, BLOCK):
        _perturb_block(w_ptr, g_ptr, s_ptr, means, off, stop, ncols, scale, e, skip,
                       SAVE, ADAPTIVE, ACC, BLOCK, False)
    # The masked tail in half vectors: with 8 elements per thread the 8 live
    # per-element predicates exceed the 7 predicate registers and spill.
    for off in range(full, stop, BLOCK // 2):
        _perturb_block(w_ptr, g_ptr, s_ptr, means, off, stop, ncols, scale, e, skip,
                       SAVE, ADAPTIVE, ACC, BLOCK // 2, True)


def perturb(params: Sequence[Tensor], grads: Sequence[Tensor], saved: Sequence[Tensor],
            scale, *, adaptive: bool, eta: float,
            row_means: Optional[Sequence[Optional[Tensor]]] = None, save: bool = True,
            found_inf: Optional[Tensor] = None) -> None:
    """See ``Ops.perturb``."""
    if len(params) == 0:
        return
    dt, acc = tb.dtypes(params[0])
    means = None                     # no row means: an absent list (a column of zeros)
    if row_means is not None:
        means = list(row_means)
        for g, m in zip(grads, means):
            if m is not None and g.dim() <= 1:
                raise ValueError("row_means[i] must be None for a tensor with dim <= 1")
    pl = tb.plan("flat", [list(params), list(grads), list(saved), means],
                 rows_view=row_means is not None)
    scale_ptr, scale_val = tb.scalar(scale, params[0].device)
    for ln in pl.launches:
        _perturb_kernel[(ln.nblocks,)](
            ln.table, ln.ntensors, scale_ptr, scale_val, float(eta),
            tb.flag(found_inf, params[0].device), SAVE=save, ADAPTIVE=adaptive,
            DT=dt, ACC=acc, ALIGNED=ln.aligned, BLOCK=tb.BLOCK, CHUNK=tb.CHUNK,
            **tb.launch_options())
