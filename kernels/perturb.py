"""The ascent step: ``saved <- w`` (when saving), ``w <- saved + scale * T^2 * C(g)``.

``T = |saved| + eta`` when adaptive (else 1); ``C`` subtracts the fp32 row means that
``sumsq`` wrote, for the tensors that have a means buffer. ``scale`` may live in device
memory (``rho / (norm + eps)`` computed on the device), so no host sync is needed.
With SGD-momentum SAM this pass is 16 bytes per fp32 parameter (read w, g; write saved, w).
"""
from __future__ import annotations

from typing import Optional, Sequence

import triton
import triton.language as tl
from torch import Tensor

from . import tables as tb
from .tables import device_fn, address, block_of, load, pointer, scalar_value, store

@device_fn
def _perturb_block(w_ptr, g_ptr, s_ptr, means, off, stop, ncols, scale, eta,
                   SAVE: tl.constexpr, ADAPTIVE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr, MASKED: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    offs = off + lanes
    if SAVE:
        s = load(w_ptr, offs, stop, MASKED)
        store(s_ptr, offs, s, stop, MASKED)
    else:
        s = load(s_ptr, offs, stop, MASKED)
    s = s.to(ACC)
    d = load(g_ptr, offs, stop, MASKED).to(ACC)
    if means != 0:
        # Row of each element: one 64-bit division per vector, 32-bit ones per lane
        # (a 64-bit division per element would make this pass compute bound).
        r0 = off // ncols
        row = r0 + ((off - r0 * ncols).to(tl.int32) + lanes) // ncols.to(tl.int32)
        mp = means.to(tl.pointer_type(tl.float32))
        if MASKED:
            mu = tl.load(mp + row, mask=offs < stop, other=0.0)
        else:
            mu = tl.load(mp + row)
        d = d - mu.to(ACC)
    if ADAPTIVE:
        t = tl.abs(s) + eta
        d = d * t * t
    store(w_ptr, offs, s + scale * d, stop, MASKED)


@triton.jit(do_not_specialize=["ntensors"])
def _perturb_kernel(table, ntensors, scale_ptr, scale_val: tl.float64, eta: tl.float64,
                    SAVE: tl.constexpr, ADAPTIVE: tl.constexpr, DT: tl.constexpr,
                    ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                    CHUNK: tl.constexpr):
    # Operand lists of the table: 0 params, 1 grads, 2 saved, 3 row means (0 = none).
    t, start, n, ncols, _ = block_of(table, ntensors, 4)
    start = tl.multiple_of(start, CHUNK)
    w_ptr = pointer(table, ntensors, t, 0, DT, ALIGNED)
    g_ptr = pointer(table, ntensors, t, 1, DT, ALIGNED)
    s_ptr = pointer(table, ntensors, t, 2, DT, ALIGNED)
    means = address(table, ntensors, t, 3)
    scale = scalar_value(scale_ptr, scale_val, ACC)
    e = tl.full([], eta, ACC)
    stop = tl.minimum(start + CHUNK, n)
    full = start + (stop - start) // BLOCK * BLOCK
    for off in range(start, full, BLOCK):
        _perturb_block(w_ptr, g_ptr, s_ptr, means, off, stop, ncols, scale, e,
                       SAVE, ADAPTIVE, ACC, BLOCK, False)
    if full < stop:
        _perturb_block(w_ptr, g_ptr, s_ptr, means, full, stop, ncols, scale, e,
                       SAVE, ADAPTIVE, ACC, BLOCK, True)


def perturb(params: Sequence[Tensor], grads: Sequence[Tensor], saved: Sequence[Tensor],
            scale, *, adaptive: bool, eta: float,
            row_means: Optional[Sequence[Optional[Tensor]]] = None, save: bool = True) -> None:
    """See ``Ops.perturb``."""
    if len(params) == 0:
        return
    dt, acc = tb.dtypes(params[0])
    means = list(row_means) if row_means is not None else [None] * len(params)
    for g, m in zip(grads, means):
        if m is not None and g.dim() <= 1:
            raise ValueError("row_means[i] must be None for a tensor with dim <= 1")
    pl = tb.plan("flat", [list(params), list(grads), list(saved), means],
                 rows_view=row_means is not None)
    scale_ptr, scale_val = tb.scalar(scale, params[0].device)
    for ln in pl.launches:
        _perturb_kernel[(ln.nblocks,)](
            ln.table, ln.ntensors, scale_ptr, scale_val, float(eta), SAVE=save, ADAPTIVE=adaptive,
            DT=dt, ACC=acc, ALIGNED=ln.aligned, BLOCK=tb.BLOCK, CHUNK=tb.CHUNK,
            **tb.launch_options())
