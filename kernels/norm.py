"""Reductions: ``sumsq`` (with the gradient-centralisation row means) and ``dot``.

Every program writes one partial sum to a buffer and a single-program kernel adds the
partials in a fixed order, so the same inputs give the same bits run to run (no atomics).
Accumulation is fp32 (fp64 for fp64 tensors). The result stays on the device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tables as tb
from .elementwise import weighted_dev
from .tables import device_fn, address, block_of, div, load, pointer

# Modes of the flat reduction: what one element contributes.
SUMSQ = 0    # g^2
ASUMSQ = 1   # ((|w| + eta) g)^2, ASAM's norm
DOT = 2      # x y
# Vector of the final sum: the partials of 100 M parameters are ~6000 numbers, a few
# iterations of one program.
FINISH_BLOCK = 32 if tb.INTERPRET else 1024


@device_fn
def _flat_terms(x_ptr, y_ptr, off, stop, eta, MODE: tl.constexpr, ACC: tl.constexpr,
                BLOCK: tl.constexpr, MASKED: tl.constexpr):
    lanes, left = tl.arange(0, BLOCK), (stop - off).to(tl.int32)
    x_ptr, y_ptr = x_ptr + off, y_ptr + off
    x = load(x_ptr, lanes, left, MASKED).to(ACC)
    if MODE == 2:
        v = x * load(y_ptr, lanes, left, MASKED).to(ACC)
    else:
        if MODE == 1:
            x = weighted_dev(load(y_ptr, lanes, left, MASKED).to(ACC), x, 0.0, eta, True)
        v = x * x
    return v


@triton.jit(do_not_specialize=["ntensors", "first"])
def _flat_kernel(table, ntensors, partials, first, eta: tl.float64, MODE: tl.constexpr,
                 DT: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """partials[first + p] = sum over this program's chunk of the MODE term."""
    t, chunk, n, _, _ = block_of(table, ntensors, 2)
    start = chunk * CHUNK  # a multiple of CHUNK the compiler can see
    x_ptr = pointer(table, ntensors, t, 0, DT, ALIGNED)
    y_ptr = pointer(table, ntensors, t, 1, DT, ALIGNED)
    e = tl.full([], eta, ACC)
    stop = tl.minimum(start + CHUNK, n)
    full = start + (stop - start) // BLOCK * BLOCK
    acc = tl.zeros([BLOCK], ACC)
    for off in range(start, full, BLOCK):
        acc += _flat_terms(x_ptr, y_ptr, off, stop, e, MODE, ACC, BLOCK, False)
    # The masked tail in half vectors: with 8 elements per thread the 8 live
    # per-element predicates exceed the 7 predicate registers and spill.
    tail = tl.zeros([BLOCK // 2], ACC)
    for off in range(full, stop, BLOCK // 2):
        tail += _flat_terms(x_ptr, y_ptr, off, stop, e, MODE, ACC, BLOCK // 2, True)
    tl.store(partials + first + tl.program_id(0), tl.sum(acc, 0) + tl.sum(tail, 0))


@device_fn
def _row_tile(g_ptr, w_ptr, rows, rmask, ncols, c0, eta, ADAPTIVE: tl.constexpr,
              ACC: tl.constexpr, COLS: tl.constexpr):
    """(g, T, mask) of one (rows x COLS) tile; T is 1 when not ADAPTIVE."""
    cols = c0 + tl.arange(0, COLS)
    mask = rmask[:, None] & (cols < ncols)[None, :]
    offs = rows[:, None] * ncols + cols[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    if ADAPTIVE:
        t = tl.abs(tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)) + eta
    else:
        t = tl.full([1, 1], 1.0, ACC)
    return g, t, mask


@triton.jit(do_not_specialize=["ntensors", "first"])
def _rows_kernel(table, ntensors, partials, first, eta: tl.float64,
                 ADAPTIVE: tl.constexpr, CENTRALIZE: tl.constexpr, DT: tl.constexpr,
                 ACC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Whole rows ``[r0, r0 + ROWS)`` of one tensor viewed as (nrows, ncols): writes the row
    means of g where a means buffer is given, and partials[first + p] = sum of
    (T * C(g))^2 over the band (C only when CENTRALIZE). Centring is two-pass over the
    band (the second read hits L2) to avoid the cancellation of sum(g^2) - n mean^2.

    Each column tile is summed along its columns as soon as it is loaded, so the loop
    carries [ROWS] accumulators and not [ROWS, COLS] tiles (which spilled registers)."""
    t, r0, _, ncols, nrows = block_of(table, ntensors, 3)
    g_ptr = pointer(table, ntensors, t, 0, DT, False)
    w_ptr = pointer(table, ntensors, t, 1, DT, False)
    means = address(table, ntensors, t, 2)
    e = tl.full([], eta, ACC)
    rows = r0 + tl.arange(0, ROWS)
    rmask = rows < nrows
    sums = tl.zeros([ROWS], ACC)
    sq = tl.zeros([ROWS], ACC)
    for c0 in range(0, ncols, COLS):
        g, tt, mask = _row_tile(g_ptr, w_ptr, rows, rmask, ncols, c0, e, ADAPTIVE, ACC, COLS)
        sums += tl.sum(g, 1)
        if not CENTRALIZE:
            v = tt * g
            sq += tl.sum(v * v, 1)
    # An empty row gives 0/0 = nan, as torch's mean of nothing.
    mean = div(sums, tl.zeros([ROWS], ACC) + ncols.to(ACC), ACC)
    if means != 0:
        tl.store(means.to(tl.pointer_type(tl.float32)) + rows, mean.to(tl.float32), mask=rmask)
    if CENTRALIZE:
        for c0 in range(0, ncols, COLS):
            g, tt, mask = _row_tile(g_ptr, w_ptr, rows, rmask, ncols, c0, e, ADAPTIVE, ACC, COLS)
            v = tl.where(mask, tt * (g - mean[:, None]), 0.0)
            sq += tl.sum(v * v, 1)
    tl.store(partials + first + tl.program_id(0), tl.sum(sq, 0))


@triton.jit
def _finish_kernel(partials, out, n, BLOCK: tl.constexpr):
    """out = sum of partials[0:n], always in the same order."""
    acc = tl.zeros([BLOCK], partials.dtype.element_ty)
    for off in range(0, n, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sum(acc, 0).to(out.dtype.element_ty))


def _flat(launch_plan, partials, eta, mode, dt, acc):
    for ln in launch_plan.launches:
        _flat_kernel[(ln.nblocks,)](
            ln.table, ln.ntensors, partials, ln.first, eta, MODE=mode, DT=dt,
            ACC=acc, ALIGNED=ln.aligned, BLOCK=tb.BLOCK, CHUNK=tb.CHUNK,
            **tb.launch_options())


def _finish(partials: Tensor) -> Tensor:
    out = torch.empty((), dtype=partials.dtype, device=partials.device)
    _finish_kernel[(1,)](partials, out, partials.numel(), BLOCK=FINISH_BLOCK,
                         **tb.launch_options())
    return out


def sumsq(grads: Sequence[Tensor], params: Sequence[Tensor], *, adaptive: bool, eta: float,
          centralize: bool, row_means: Optional[Sequence[Optional[Tensor]]] = None) -> Tensor:
    """``sum_i ||T_i * C_i(g_i)||^2`` as a 0-dim fp32 tensor (fp64 for fp64 inputs); the
    row means of g go to ``row_means[i]`` where given (see ``Ops.sumsq``)."""
    if len(grads) == 0:
        return torch.zeros((), dtype=torch.float32)
    dt, acc = tb.dtypes(grads[0])
    p = list(params) if adaptive else None
    if not centralize and row_means is None:     # SAM, ASAM: every tensor is flat
        flat, rows = None, []
    else:
        flat, rows = [], []
        for i, g in enumerate(grads):
            want_mean = row_means is not None and row_means[i] is not None
            if want_mean and g.dim() <= 1:
                raise ValueError("row_means[i] must be None for a tensor with dim <= 1")
            (rows if g.dim() > 1 and (centralize or want_mean) else flat).append(i)

    def pick(lst, idx):
        """Entries ``idx`` of ``lst`` (all of them for ``idx`` None); None for no list."""
        if lst is None:
            return None
        return list(lst) if idx is None else [lst[i] for i in idx]

    flat_plan = tb.plan("flat", [pick(grads, flat), pick(p, flat)])
    row_plan = tb.plan("rows", [pick(grads, rows), pick(p, rows),
                                pick(row_means, rows) if row_means is not None
                                else [None] * len(rows)])
    partials = torch.empty(flat_plan.nblocks + row_plan.nblocks,
                           dtype=tb.acc_torch_dtype(grads[0]), device=grads[0].device)
    _flat(flat_plan, partials, float(eta), ASUMSQ if adaptive else SUMSQ, dt, acc)
    for ln in row_plan.launches:
        _rows_kernel[(ln.nblocks,)](
            ln.table, ln.ntensors, partials, flat_plan.nblocks + ln.first, float(eta),
            ADAPTIVE=adaptive, CENTRALIZE=centralize, DT=dt, ACC=acc,
            ROWS=tb.rows_per_tile(ln.cols), COLS=ln.cols, **tb.launch_options())
    return _finish(partials)


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """``sum_i <x_i, y_i>`` as a 0-dim fp32 tensor (fp64 for fp64 inputs)."""
    if len(xs) == 0:
        return torch.zeros((), dtype=torch.float32)
    dt, acc = tb.dtypes(xs[0])
    pl = tb.plan("flat", [list(xs), list(ys)])
    partials = torch.empty(pl.nblocks, dtype=tb.acc_torch_dtype(xs[0]), device=xs[0].device)
    _flat(pl, partials, 0.0, DOT, dt, acc)
    return _finish(partials)
