"""MSAM's step: the move back from ``w~``, the base update and the momentum's norm, one pass.

Each element: ``w = w~ + back · m`` (the old momentum; skipped when ``HAS_BACK`` is off),
then the SGD or Adam/AdamW update of ``restore_update.py`` at ``w``, written out in the
same order (so a step without a move back gives the same bits as ``restore_sgd`` /
``restore_adam``). Every program also sums the squares of the momentum it stored into
``partials[first + program]``, and ``norm._finish`` adds the partials in a fixed order.
With SGD-momentum that is 20 bytes per fp32 parameter (read w~, g, m; write m, w), the
norm riding on the same pass.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tables as tb
from .elementwise import adam_elem, msam_back_elem, sgd_elem
from .norm import _finish
from .tables import (ROUND_BF16, _bf16_rne, block_of, device_fn, load, pointer,
                     scalar_value, store)


@device_fn
def _stored_square(x, lanes, left, DT: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
    """x² of the value ``store`` writes for ``x`` (rounded to DT the way it rounds), in
    registers: reading the stored vector back would cost a load, and in the 16-bit masked
    tail the compiler pairs such reloads under one predicate."""
    if DT == ACC:
        r = x
    elif ROUND_BF16 and DT == tl.bfloat16:
        r = _bf16_rne(x).to(ACC)
    else:
        r = x.to(DT).to(ACC)
    if MASKED:
        r = tl.where(lanes < left, r, 0.0)
    return r * r


@device_fn
def _msam_sgd_block(w_ptr, g_ptr, b_ptr, off, stop, back, lr, wd, mom, damp1,
                    HAS_BACK: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                    INIT: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr, MASKED: tl.constexpr):
    # As the other flat passes: pointers advanced to the vector, int32 lanes, and the
    # number of elements left for the mask (see tables.load).
    lanes, left = tl.arange(0, BLOCK), (stop - off).to(tl.int32)
    w_ptr, g_ptr, b_ptr = w_ptr + off, g_ptr + off, b_ptr + off
    w = load(w_ptr, lanes, left, MASKED).to(ACC)
    g = load(g_ptr, lanes, left, MASKED).to(ACC)
    if INIT:
        b = tl.zeros([BLOCK], ACC)
    else:
        b = load(b_ptr, lanes, left, MASKED).to(ACC)
    if HAS_BACK:
        w = msam_back_elem(w, b, back)
    w, b = sgd_elem(w, b, g, lr, wd, mom, damp1, INIT, True, NESTEROV, MAXIMIZE)
    store(b_ptr, lanes, b, left, MASKED)
    store(w_ptr, lanes, w, left, MASKED)
    # The norm is of the stored (rounded) momentum, as the reference computes it.
    return _stored_square(b, lanes, left, DT, ACC, MASKED)


@triton.jit(do_not_specialize=["ntensors", "first"])
def _msam_sgd_kernel(table, ntensors, partials, first, back_ptr, back_val: tl.float64,
                     lr: tl.float64, wd: tl.float64, mom: tl.float64, damp1: tl.float64,
                     HAS_BACK: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                     INIT: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr,
                     ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # Operand lists of the table: 0 params, 1 grads, 2 momentum buffers.
    t, chunk, n, _, _ = block_of(table, ntensors, 3)
    start = chunk * CHUNK  # a multiple of CHUNK the compiler can see
    w_ptr = pointer(table, ntensors, t, 0, DT, ALIGNED)
    g_ptr = pointer(table, ntensors, t, 1, DT, ALIGNED)
    b_ptr = pointer(table, ntensors, t, 2, DT, ALIGNED)
    back = scalar_value(back_ptr, back_val, ACC)
    lr_ = tl.full([], lr, ACC)
    wd_ = tl.full([], wd, ACC)
    mom_ = tl.full([], mom, ACC)
    damp1_ = tl.full([], damp1, ACC)
    stop = tl.minimum(start + CHUNK, n)
    full = start + (stop - start) // BLOCK * BLOCK
    acc = tl.zeros([BLOCK], ACC)
    for off in range(start, full, BLOCK):
        acc += _msam_sgd_block(w_ptr, g_ptr, b_ptr, off, stop, back, lr_, wd_, mom_, damp1_,
                               HAS_BACK, NESTEROV, MAXIMIZE, INIT, DT, ACC, BLOCK, False)
    total = tl.sum(acc, 0)
    # The masked tail in half vectors, as restore_update's (fewer live predicates).
    for off in range(full, stop, BLOCK // 2):
        total += tl.sum(_msam_sgd_block(w_ptr, g_ptr, b_ptr, off, stop, back, lr_, wd_, mom_,
                                        damp1_, HAS_BACK, NESTEROV, MAXIMIZE, INIT, DT, ACC,
                                        BLOCK // 2, True), 0)
    tl.store(partials + first + tl.program_id(0), total)


@device_fn
def _msam_adam_block(w_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, off, stop, back, wd, decay, beta1c,
                     beta2, beta2c, step_size, bc2_sqrt, eps, HAS_BACK: tl.constexpr,
                     DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                     DT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                     MASKED: tl.constexpr):
    lanes, left = tl.arange(0, BLOCK), (stop - off).to(tl.int32)
    w_ptr, g_ptr, m_ptr = w_ptr + off, g_ptr + off, m_ptr + off
    v_ptr, vmax_ptr = v_ptr + off, vmax_ptr + off
    w = load(w_ptr, lanes, left, MASKED).to(ACC)
    g = load(g_ptr, lanes, left, MASKED).to(ACC)
    m = load(m_ptr, lanes, left, MASKED).to(ACC)
    v = load(v_ptr, lanes, left, MASKED).to(ACC)
    if AMSGRAD:
        vmax = load(vmax_ptr, lanes, left, MASKED).to(ACC)
    else:
        vmax = v
    if HAS_BACK:
        w = msam_back_elem(w, m, back)
    w, m, v, vmax = adam_elem(w, m, v, vmax, g, wd, decay, beta1c, beta2, beta2c, step_size,
                              bc2_sqrt, eps, DECOUPLED, AMSGRAD, MAXIMIZE, ACC)
    store(m_ptr, lanes, m, left, MASKED)
    store(v_ptr, lanes, v, left, MASKED)
    if AMSGRAD:
        store(vmax_ptr, lanes, vmax, left, MASKED)
    store(w_ptr, lanes, w, left, MASKED)
    return _stored_square(m, lanes, left, DT, ACC, MASKED)


@triton.jit(do_not_specialize=["ntensors", "first"])
def _msam_adam_kernel(table, ntensors, partials, first, back_ptr, back_val: tl.float64,
                      wd: tl.float64, decay: tl.float64, beta1c: tl.float64, beta2: tl.float64,
                      beta2c: tl.float64, step_size: tl.float64, bc2_sqrt: tl.float64,
                      eps: tl.float64, HAS_BACK: tl.constexpr, DECOUPLED: tl.constexpr,
                      AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DT: tl.constexpr,
                      ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                      CHUNK: tl.constexpr):
    # Operand lists of the table: 0 params, 1 grads, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq.
    t, chunk, n, _, _ = block_of(table, ntensors, 5)
    start = chunk * CHUNK  # a multiple of CHUNK the compiler can see
    w_ptr = pointer(table, ntensors, t, 0, DT, ALIGNED)
    g_ptr = pointer(table, ntensors, t, 1, DT, ALIGNED)
    m_ptr = pointer(table, ntensors, t, 2, DT, ALIGNED)
    v_ptr = pointer(table, ntensors, t, 3, DT, ALIGNED)
    vmax_ptr = pointer(table, ntensors, t, 4, DT, ALIGNED)
    back = scalar_value(back_ptr, back_val, ACC)
    wd_ = tl.full([], wd, ACC)
    decay_ = tl.full([], decay, ACC)
    beta1c_ = tl.full([], beta1c, ACC)
    beta2_ = tl.full([], beta2, ACC)
    beta2c_ = tl.full([], beta2c, ACC)
    step_size_ = tl.full([], step_size, ACC)
    bc2_sqrt_ = tl.full([], bc2_sqrt, ACC)
    eps_ = tl.full([], eps, ACC)
    stop = tl.minimum(start + CHUNK, n)
    full = start + (stop - start) // BLOCK * BLOCK
    acc = tl.zeros([BLOCK], ACC)
    for off in range(start, full, BLOCK):
        acc += _msam_adam_block(w_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, off, stop, back, wd_,
                                decay_, beta1c_, beta2_, beta2c_, step_size_, bc2_sqrt_, eps_,
                                HAS_BACK, DECOUPLED, AMSGRAD, MAXIMIZE, DT, ACC, BLOCK, False)
    total = tl.sum(acc, 0)
    for off in range(full, stop, BLOCK // 2):
        total += tl.sum(_msam_adam_block(w_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, off, stop, back,
                                         wd_, decay_, beta1c_, beta2_, beta2c_, step_size_,
                                         bc2_sqrt_, eps_, HAS_BACK, DECOUPLED, AMSGRAD,
                                         MAXIMIZE, DT, ACC, BLOCK // 2, True), 0)
    tl.store(partials + first + tl.program_id(0), total)


def _partials(plan, like: Tensor) -> Tensor:
    return torch.empty(plan.nblocks, dtype=tb.acc_torch_dtype(like), device=like.device)


def msam_sgd(params: Sequence[Tensor], grads: Sequence[Tensor],
             momentum_buffers: Sequence[Tensor], back, *, lr: float, weight_decay: float,
             momentum: float, dampening: float, nesterov: bool, maximize: bool,
             init_buffers: bool) -> Tensor:
    """See ``Ops.msam_sgd``."""
    if len(params) == 0:
        return torch.zeros((), dtype=torch.float32)
    if momentum == 0:
        raise ValueError("msam_sgd needs momentum != 0")
    if back is not None and init_buffers:
        raise ValueError("msam_sgd cannot move back along buffers that do not exist yet")
    dt, acc = tb.dtypes(params[0])
    pl = tb.plan("flat", [list(params), list(grads), list(momentum_buffers)])
    partials = _partials(pl, params[0])
    back_ptr, back_val = tb.scalar(0.0 if back is None else back, params[0].device)
    for ln in pl.launches:
        _msam_sgd_kernel[(ln.nblocks,)](
            ln.table, ln.ntensors, partials, ln.first, back_ptr, back_val, float(lr),
            float(weight_decay), float(momentum), float(1 - dampening),
            HAS_BACK=back is not None, NESTEROV=nesterov, MAXIMIZE=maximize,
            INIT=init_buffers, DT=dt, ACC=acc, ALIGNED=ln.aligned, BLOCK=tb.BLOCK,
            CHUNK=tb.CHUNK, **tb.launch_options())
    return _finish(partials)


def msam_adam(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], back, *,
              step: int, lr: float, beta1: float, beta2: float, eps: float,
              weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool) -> Tensor:
    """See ``Ops.msam_adam``; ``step`` is the already incremented step count."""
    if len(params) == 0:
        return torch.zeros((), dtype=torch.float32)
    dt, acc = tb.dtypes(params[0])
    pl = tb.plan("flat", [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                          list(max_exp_avg_sqs) if amsgrad else None])
    partials = _partials(pl, params[0])
    back_ptr, back_val = tb.scalar(0.0 if back is None else back, params[0].device)
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    for ln in pl.launches:
        _msam_adam_kernel[(ln.nblocks,)](
            ln.table, ln.ntensors, partials, ln.first, back_ptr, back_val,
            float(weight_decay), float(1 - lr * weight_decay), float(1 - beta1), float(beta2),
            float(1 - beta2), float(step_size), float(bc2_sqrt), float(eps),
            HAS_BACK=back is not None, DECOUPLED=decoupled, AMSGRAD=amsgrad, MAXIMIZE=maximize,
            DT=dt, ACC=acc, ALIGNED=ln.aligned, BLOCK=tb.BLOCK, CHUNK=tb.CHUNK,
            **tb.launch_options())
    return _finish(partials)
