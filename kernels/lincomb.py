"""``out <- sum_k c_k x_k`` over 1 to 3 terms, and the bit-exact copy behind ``restore``.

The combines GSAM, WSAM, CR-SAM, LookSAM and Friendly-SAM need between their passes.
Coefficients are Python floats or 0-dim device tensors (e.g. ``-<g, g_p> / ||g_p||^2``);
``out`` may alias any ``x_k``: each element is read before it is written, by the same
program.
"""
from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

from . import tables as tb
from .elementwise import lincomb_elem
from .tables import device_fn, block_of, load, pointer, scalar_value, store


@device_fn
def _lincomb_block(o_ptr, x0, x1, x2, c0, c1, c2, off, stop, NTERMS: tl.constexpr,
                   COPY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                   MASKED: tl.constexpr):
    lanes, left = tl.arange(0, BLOCK), (stop - off).to(tl.int32)
    o_ptr, x0, x1, x2 = o_ptr + off, x0 + off, x1 + off, x2 + off
    if COPY:
        # No arithmetic: the stored bits are the loaded bits (restore must be exact).
        store(o_ptr, lanes, load(x0, lanes, left, MASKED), left, MASKED)
    else:
        v0 = load(x0, lanes, left, MASKED).to(ACC)
        v1 = v0
        v2 = v0
        if NTERMS > 1:
            v1 = load(x1, lanes, left, MASKED).to(ACC)
        if NTERMS > 2:
            v2 = load(x2, lanes, left, MASKED).to(ACC)
        store(o_ptr, lanes, lincomb_elem(v0, v1, v2, c0, c1, c2, NTERMS), left, MASKED)


@triton.jit(do_not_specialize=["ntensors"])
def _lincomb_kernel(table, ntensors, c0_ptr, c0_val: tl.float64, c1_ptr, c1_val: tl.float64,
                    c2_ptr, c2_val: tl.float64, NTERMS: tl.constexpr, COPY: tl.constexpr,
                    DT: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # Operand lists of the table: 0 out, 1..3 the terms (absent ones are 0).
    t, chunk, n, _, _ = block_of(table, ntensors, 4)
    start = chunk * CHUNK  # a multiple of CHUNK the compiler can see
    o_ptr = pointer(table, ntensors, t, 0, DT, ALIGNED)
    x0 = pointer(table, ntensors, t, 1, DT, ALIGNED)
    x1 = pointer(table, ntensors, t, 2, DT, ALIGNED)
    x2 = pointer(table, ntensors, t, 3, DT, ALIGNED)
    c0 = scalar_value(c0_ptr, c0_val, ACC)
    c1 = scalar_value(c1_ptr, c1_val, ACC)
    c2 = scalar_value(c2_ptr, c2_val, ACC)
    stop = tl.minimum(start + CHUNK, n)
    full = start + (stop - start) // BLOCK * BLOCK
    for off in range(start, full, BLOCK):
        _lincomb_block(o_ptr, x0, x1, x2, c0, c1, c2, off, stop, NTERMS, COPY, ACC, BLOCK,
                       False)
    # The masked tail in half vectors: with 8 elements per thread the 8 live
    # per-element predicates exceed the 7 predicate registers and spill.
    for off in range(full, stop, BLOCK // 2):
        _lincomb_block(o_ptr, x0, x1, x2, c0, c1, c2, off, stop, NTERMS, COPY, ACC,
                       BLOCK // 2, True)


def _launch(out, xs, coefs, copy: bool) -> None:
    if len(out) == 0:
        return
    dt, acc = tb.dtypes(out[0])
    lists = [list(out)] + [list(x) for x in xs] + [None] * (3 - len(xs))
    pl = tb.plan("flat", lists)
    device = out[0].device
    scalars = [tb.scalar(c, device) for c in coefs] + [(None, 0.0)] * (3 - len(coefs))
    args = [a for pair in scalars for a in pair]
    for ln in pl.launches:
        _lincomb_kernel[(ln.nblocks,)](
            ln.table, ln.ntensors, *args, NTERMS=len(xs), COPY=copy, DT=dt, ACC=acc,
            ALIGNED=ln.aligned, BLOCK=tb.BLOCK, CHUNK=tb.CHUNK, **tb.launch_options())


def lincomb(out: Sequence[Tensor], xs: Sequence[Sequence[Tensor]], coefs) -> None:
    """``out_i <- sum_k coefs[k] * xs[k][i]``, 1 to 3 terms, evaluated left to right."""
    if not 1 <= len(xs) <= 3 or len(xs) != len(coefs):
        raise ValueError("lincomb takes 1 to 3 terms with one coefficient each")
    _launch(out, xs, coefs, copy=False)


def restore(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    """``w <- saved``, bit for bit."""
    _launch(params, [saved], [1.0], copy=True)
