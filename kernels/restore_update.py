"""The descent step: restore ``w`` from ``saved`` and apply the base optimizer in one pass.

The weights are read from ``saved`` (or from ``w`` when nothing was saved) and written
once, so SAM + SGD-momentum costs 20 bytes per fp32 parameter (read saved, g, buf; write
buf, w) and SAM + Adam(W) 28 (read saved, g, m, v; write m, v, w). The arithmetic follows
the reference (``torch.optim``'s update, written out in ``Ops.restore_sgd`` /
``Ops.restore_adam``) operation by operation; scalars derived from the hyper-parameters
(``1 - dampening``, ``lr / (1 - beta1^step)``, ...) are computed on the host in double,
as torch does, and rounded to the accumulation type in the kernel.

With the non-finite guard's flag (``found_inf``, see ``Ops.restore_sgd``) each element
whose gradient ``d`` is inf or NaN (``d - d != 0``) keeps its weight and state, and the
kernel sets ``flag[1]``; ``flag[0] != 0`` keeps every element (the step is skipped). The
guard is a compile-time variant (``flag`` None or not), so the unguarded kernel is unchanged.

The arithmetic is ``sgd_elem`` / ``adam_elem`` of ``kernels/elementwise.py`` (the names of
``csrc/sharpopt_math.h``), written out here operation by operation so that each result is
stored before the next operand is loaded: calling them, which loads every operand first,
raised the registers of the Adam kernel by a quarter to a half (fp64 to 244) and made a
guarded fp64 SGD variant spill (``python -m bench.ptx_check``). A test holds the two
forms to the same bits (the MSAM kernels call the functions).
"""
from __future__ import annotations

from typing import Optional, Sequence

import triton
import triton.language as tl
from torch import Tensor

from . import tables as tb
from .tables import device_fn, block_of, div, load, pointer, sqrt, store


@device_fn
def _report(flag, seen, skip):
    # flag[1] <- 1 when this program kept an element for a non-finite gradient (not on a
    # skipped step, where every element is kept). Every writer stores the same 1.0.
    tl.store(flag + 1, 1.0, mask=(seen != 0) & (skip == 0))


@device_fn
def _sgd_block(w_ptr, s_ptr, g_ptr, b_ptr, off, stop, lr, wd, mom, damp1, init, skip,
               HAS_SAVED: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
               MASKED: tl.constexpr):
    lanes, left = tl.arange(0, BLOCK), (stop - off).to(tl.int32)
    w_ptr, s_ptr, g_ptr, b_ptr = w_ptr + off, s_ptr + off, g_ptr + off, b_ptr + off
    if HAS_SAVED:
        w = load(s_ptr, lanes, left, MASKED).to(ACC)
    else:
        w = load(w_ptr, lanes, left, MASKED).to(ACC)
    g = load(g_ptr, lanes, left, MASKED).to(ACC)
    d = g
    if MAXIMIZE:
        d = -d
    d = d + wd * w
    seen = 0
    if skip is not None:
        bad = (g - g) != 0               # inf or NaN: d - d is NaN
        keep = (bad.to(tl.int32) | (skip != 0).to(tl.int32)) != 0
        seen = tl.max(bad.to(tl.int32), axis=0)
    if MOMENTUM:
        if init != 0:
            b = d
            b0 = tl.zeros([BLOCK], ACC)      # a new buffer starts at 0 where kept
        else:
            b0 = load(b_ptr, lanes, left, MASKED).to(ACC)
            b = mom * b0 + damp1 * d
        if skip is not None:
            b = tl.where(keep, b0, b)
        store(b_ptr, lanes, b, left, MASKED)
        if NESTEROV:
            d = d + mom * b
        else:
            d = b
    w_new = w - lr * d
    if skip is not None:
        w_new = tl.where(keep, w, w_new)
    store(w_ptr, lanes, w_new, left, MASKED)
    return seen


# ``init`` (the first step: the buffer becomes d) is a runtime argument, not a switch, and
# is not specialised on its value: the second step must not compile a new variant, since
# it may be the one captured in a CUDA graph, where loading a module is refused.
@triton.jit(do_not_specialize=["ntensors", "init"])
def _sgd_kernel(table, ntensors, lr: tl.float64, wd: tl.float64, mom: tl.float64,
                damp1: tl.float64, init, flag, HAS_SAVED: tl.constexpr, MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, DT: tl.constexpr,
                ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                CHUNK: tl.constexpr):
    # Operand lists of the table: 0 params, 1 saved, 2 grads, 3 momentum buffers.
    t, chunk, n, _, _ = block_of(table, ntensors, 4)
    start = chunk * CHUNK  # a multiple of CHUNK the compiler can see
    w_ptr = pointer(table, ntensors, t, 0, DT, ALIGNED)
    s_ptr = pointer(table, ntensors, t, 1, DT, ALIGNED)
    g_ptr = pointer(table, ntensors, t, 2, DT, ALIGNED)
    b_ptr = pointer(table, ntensors, t, 3, DT, ALIGNED)
    lr_ = tl.full([], lr, ACC)
    wd_ = tl.full([], wd, ACC)
    mom_ = tl.full([], mom, ACC)
    damp1_ = tl.full([], damp1, ACC)
    if flag is None:
        skip = None
    else:
        skip = tl.load(flag)
    stop = tl.minimum(start + CHUNK, n)
    full = start + (stop - start) // BLOCK * BLOCK
    seen = 0
    for off in range(start, full, BLOCK):
        seen = seen | _sgd_block(w_ptr, s_ptr, g_ptr, b_ptr, off, stop, lr_, wd_, mom_,
                                 damp1_, init, skip, HAS_SAVED, MOMENTUM, NESTEROV, MAXIMIZE,
                                 ACC, BLOCK, False)
    # The masked tail in half vectors: with 8 elements per thread the 8 live
    # per-element predicates exceed the 7 predicate registers and spill.
    for off in range(full, stop, BLOCK // 2):
        seen = seen | _sgd_block(w_ptr, s_ptr, g_ptr, b_ptr, off, stop, lr_, wd_, mom_,
                                 damp1_, init, skip, HAS_SAVED, MOMENTUM, NESTEROV, MAXIMIZE,
                                 ACC, BLOCK // 2, True)
    if flag is not None:
        _report(flag, seen, skip)


@device_fn
def _adam_block(w_ptr, s_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, off, stop, wd, decay, beta1c,
                beta2, beta2c, step_size, bc2_sqrt, eps, skip, HAS_SAVED: tl.constexpr,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                ACC: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    lanes, left = tl.arange(0, BLOCK), (stop - off).to(tl.int32)
    w_ptr, s_ptr, g_ptr = w_ptr + off, s_ptr + off, g_ptr + off
    m_ptr, v_ptr, vmax_ptr = m_ptr + off, v_ptr + off, vmax_ptr + off
    if HAS_SAVED:
        w = load(s_ptr, lanes, left, MASKED).to(ACC)
    else:
        w = load(w_ptr, lanes, left, MASKED).to(ACC)
    g = load(g_ptr, lanes, left, MASKED).to(ACC)
    w0 = w
    d = g
    if MAXIMIZE:
        d = -d
    if DECOUPLED:
        w = w * decay
    else:
        d = d + wd * w
    seen = 0
    if skip is not None:
        bad = (g - g) != 0               # inf or NaN: d - d is NaN
        keep = (bad.to(tl.int32) | (skip != 0).to(tl.int32)) != 0
        seen = tl.max(bad.to(tl.int32), axis=0)
    m0 = load(m_ptr, lanes, left, MASKED).to(ACC)
    m = m0 + beta1c * (d - m0)
    v0 = load(v_ptr, lanes, left, MASKED).to(ACC)
    v = beta2 * v0 + beta2c * d * d
    if skip is not None:
        m = tl.where(keep, m0, m)
        v = tl.where(keep, v0, v)
    store(m_ptr, lanes, m, left, MASKED)
    store(v_ptr, lanes, v, left, MASKED)
    if AMSGRAD:
        x0 = load(vmax_ptr, lanes, left, MASKED).to(ACC)
        v = tl.maximum(x0, v, propagate_nan=tl.PropagateNan.ALL)
        if skip is not None:
            v = tl.where(keep, x0, v)
        store(vmax_ptr, lanes, v, left, MASKED)
    denom = div(sqrt(v, ACC), bc2_sqrt, ACC) + eps
    w_new = w - div(step_size * m, denom, ACC)
    if skip is not None:
        w_new = tl.where(keep, w0, w_new)
    store(w_ptr, lanes, w_new, left, MASKED)
    return seen


@triton.jit(do_not_specialize=["ntensors"])
def _adam_kernel(table, ntensors, wd: tl.float64, decay: tl.float64, beta1c: tl.float64,
                 beta2: tl.float64, beta2c: tl.float64, step_size: tl.float64,
                 bc2_sqrt: tl.float64, eps: tl.float64, flag, HAS_SAVED: tl.constexpr,
                 DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                 DT: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # Operand lists of the table: 0 params, 1 saved, 2 grads, 3 exp_avg, 4 exp_avg_sq,
    # 5 max_exp_avg_sq.
    t, chunk, n, _, _ = block_of(table, ntensors, 6)
    start = chunk * CHUNK  # a multiple of CHUNK the compiler can see
    w_ptr = pointer(table, ntensors, t, 0, DT, ALIGNED)
    s_ptr = pointer(table, ntensors, t, 1, DT, ALIGNED)
    g_ptr = pointer(table, ntensors, t, 2, DT, ALIGNED)
    m_ptr = pointer(table, ntensors, t, 3, DT, ALIGNED)
    v_ptr = pointer(table, ntensors, t, 4, DT, ALIGNED)
    vmax_ptr = pointer(table, ntensors, t, 5, DT, ALIGNED)
    wd_ = tl.full([], wd, ACC)
    decay_ = tl.full([], decay, ACC)
    beta1c_ = tl.full([], beta1c, ACC)
    beta2_ = tl.full([], beta2, ACC)
    beta2c_ = tl.full([], beta2c, ACC)
    step_size_ = tl.full([], step_size, ACC)
    bc2_sqrt_ = tl.full([], bc2_sqrt, ACC)
    eps_ = tl.full([], eps, ACC)
    if flag is None:
        skip = None
    else:
        skip = tl.load(flag)
    stop = tl.minimum(start + CHUNK, n)
    full = start + (stop - start) // BLOCK * BLOCK
    seen = 0
    for off in range(start, full, BLOCK):
        seen = seen | _adam_block(w_ptr, s_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, off, stop, wd_,
                                  decay_, beta1c_, beta2_, beta2c_, step_size_, bc2_sqrt_,
                                  eps_, skip, HAS_SAVED, DECOUPLED, AMSGRAD, MAXIMIZE, ACC,
                                  BLOCK, False)
    # The masked tail in half vectors: with 8 elements per thread the 8 live
    # per-element predicates exceed the 7 predicate registers and spill.
    for off in range(full, stop, BLOCK // 2):
        seen = seen | _adam_block(w_ptr, s_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, off, stop, wd_,
                                  decay_, beta1c_, beta2_, beta2c_, step_size_, bc2_sqrt_,
                                  eps_, skip, HAS_SAVED, DECOUPLED, AMSGRAD, MAXIMIZE, ACC,
                                  BLOCK // 2, True)
    if flag is not None:
        _report(flag, seen, skip)


def restore_sgd(params: Sequence[Tensor], saved: Optional[Sequence[Tensor]],
                grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *, lr: float,
                weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                maximize: bool, init_buffers: bool, found_inf: Optional[Tensor] = None) -> None:
    """See ``Ops.restore_sgd``."""
    if len(params) == 0:
        return
    dt, acc = tb.dtypes(params[0])
    has_momentum = momentum != 0
    pl = tb.plan("flat", [list(params), None if saved is None else list(saved), list(grads),
                          list(momentum_buffers) if has_momentum else None])
    for ln in pl.launches:
        _sgd_kernel[(ln.nblocks,)](
            ln.table, ln.ntensors, float(lr), float(weight_decay), float(momentum),
            float(1 - dampening), int(init_buffers), tb.flag(found_inf, params[0].device),
            HAS_SAVED=saved is not None, MOMENTUM=has_momentum, NESTEROV=nesterov,
            MAXIMIZE=maximize, DT=dt, ACC=acc, ALIGNED=ln.aligned,
            BLOCK=tb.BLOCK, CHUNK=tb.CHUNK, **tb.launch_options())


def restore_adam(params: Sequence[Tensor], saved: Optional[Sequence[Tensor]],
                 grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], *,
                 step: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
                 found_inf: Optional[Tensor] = None) -> None:
    """See ``Ops.restore_adam``; ``step`` is the already incremented step count."""
    if len(params) == 0:
        return
    dt, acc = tb.dtypes(params[0])
    pl = tb.plan("flat", [list(params), None if saved is None else list(saved), list(grads),
                          list(exp_avgs), list(exp_avg_sqs),
                          list(max_exp_avg_sqs) if amsgrad else None])
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    for ln in pl.launches:
        _adam_kernel[(ln.nblocks,)](
            ln.table, ln.ntensors, float(weight_decay), float(1 - lr * weight_decay),
            float(1 - beta1), float(beta2), float(1 - beta2), float(step_size),
            float(bc2_sqrt), float(eps), tb.flag(found_inf, params[0].device),
            HAS_SAVED=saved is not None,
            DECOUPLED=decoupled, AMSGRAD=amsgrad, MAXIMIZE=maximize, DT=dt, ACC=acc,
            ALIGNED=ln.aligned, BLOCK=tb.BLOCK, CHUNK=tb.CHUNK, **tb.launch_options())
