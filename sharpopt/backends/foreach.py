"""Backend ``foreach``: the reference math with ``torch._foreach_*`` multi-tensor ops.

Runs wherever PyTorch runs. It launches one op per list instead of one per tensor, but
each op still reads and writes whole tensors, so a step moves roughly the byte count of
the "torch _foreach ops" row of docs/byte-model.md and allocates temporaries. Only
gradient centralisation needs a per-tensor op (the row means), and only for tensors with
``dim > 1``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .base import Ops, Scalar, centralize_dims


def _scaled(xs: Sequence[Tensor], c: Scalar) -> List[Tensor]:
    return list(torch._foreach_mul(list(xs), c))


def _add_scaled_(acc: List[Tensor], xs: Sequence[Tensor], c: Scalar) -> None:
    if isinstance(c, Tensor):
        torch._foreach_add_(acc, torch._foreach_mul(list(xs), c))
    else:
        torch._foreach_add_(acc, list(xs), alpha=c)


def _centered(grads: Sequence[Tensor], row_means: Sequence[Optional[Tensor]]) -> List[Tensor]:
    return [
        g if m is None else g - m.to(g.dtype).view((-1,) + (1,) * (g.dim() - 1))
        for g, m in zip(grads, row_means)
    ]


_LOW = (torch.bfloat16, torch.float16)


def _low(xs: Sequence[Tensor]) -> bool:
    return len(xs) > 0 and xs[0].dtype in _LOW


def _via_fp32(fn, lists: dict, outputs: tuple, **rest) -> None:
    """Run pass ``fn`` on fp32 copies of low-precision ``lists`` and store ``outputs`` back,
    so bf16/fp16 values are rounded once per pass (the backend contract), not per op."""
    up = {k: None if v is None else [t.float() for t in v] for k, v in lists.items()}
    fn(**up, **rest)
    for k in outputs:
        if lists[k] is not None and len(lists[k]):
            torch._foreach_copy_(list(lists[k]), up[k])


def _norms_sq_sum(xs: Sequence[Tensor]) -> Tensor:
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    norms = torch._foreach_norm(list(xs), 2, dtype=acc)
    return torch.stack(norms).square().sum()


class ForeachOps(Ops):
    name = "foreach"
    fuses_base_update = True

    def supports(self, device: torch.device) -> bool:
        return True

    def sumsq(self, grads, params, *, adaptive, eta, centralize, row_means=None) -> Tensor:
        if len(grads) == 0:
            return torch.zeros((), dtype=torch.float32)
        grads = list(grads)
        if _low(grads) and (adaptive or centralize or row_means is not None):
            grads, params = [g.float() for g in grads], [w.float() for w in params]
        # grads are fp32 or fp64 here whenever means are needed (low precision was upcast)
        need_means = centralize or row_means is not None
        means = [g.mean(dim=centralize_dims(g)) if need_means and g.dim() > 1
                 else None for g in grads]
        if row_means is not None:
            for m_out, m in zip(row_means, means):
                if m_out is not None and m is not None:
                    m_out.copy_(m)
        v = _centered(grads, means) if centralize else grads
        if adaptive:
            t = torch._foreach_abs(list(params))
            torch._foreach_add_(t, eta)
            v = torch._foreach_mul(t, v)
        return _norms_sq_sum(v)

    def dot(self, xs, ys) -> Tensor:
        if len(xs) == 0:
            return torch.zeros((), dtype=torch.float32)
        acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
        parts = [torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)) for x, y in zip(xs, ys)]
        return torch.stack(parts).sum()

    def perturb(self, params, grads, saved, scale, *, adaptive, eta,
                row_means=None, save=True) -> None:
        if len(params) == 0:
            return
        if _low(params):
            return _via_fp32(self.perturb, dict(params=params, grads=grads, saved=saved),
                             ("params", "saved"), scale=scale, adaptive=adaptive, eta=eta,
                             row_means=row_means, save=save)
        params, saved = list(params), list(saved)
        if save:
            torch._foreach_copy_(saved, params)
        else:
            torch._foreach_copy_(params, saved)
        d = _centered(grads, row_means) if row_means is not None else list(grads)
        if adaptive:
            t = torch._foreach_abs(saved)
            torch._foreach_add_(t, eta)
            torch._foreach_mul_(t, t)
            d = torch._foreach_mul(t, d)
        _add_scaled_(params, d, scale)

    def restore(self, params, saved) -> None:
        if len(params):
            torch._foreach_copy_(list(params), list(saved))

    def lincomb(self, out, xs, coefs) -> None:
        if not 1 <= len(xs) <= 3 or len(xs) != len(coefs):
            raise ValueError("lincomb takes 1 to 3 terms with one coefficient each")
        if len(out) == 0:
            return
        if _low(out) or any(_low(x) for x in xs):
            up_out = [t.float() for t in out]
            self.lincomb(up_out, [[t.float() for t in x] for x in xs], coefs)
            torch._foreach_copy_(list(out), up_out)
            return
        acc = _scaled(xs[0], coefs[0])
        for x, c in zip(xs[1:], coefs[1:]):
            _add_scaled_(acc, x, c)
        torch._foreach_copy_(list(out), acc)

    def restore_sgd(self, params, saved, grads, momentum_buffers, *, lr, weight_decay,
                    momentum, dampening, nesterov, maximize, init_buffers) -> None:
        if len(params) == 0:
            return
        if _low(params):
            return _via_fp32(self.restore_sgd, dict(params=params, saved=saved, grads=grads,
                                                    momentum_buffers=momentum_buffers),
                             ("params", "momentum_buffers"), lr=lr, weight_decay=weight_decay,
                             momentum=momentum, dampening=dampening, nesterov=nesterov,
                             maximize=maximize, init_buffers=init_buffers)
        params = list(params)
        if saved is not None:
            torch._foreach_copy_(params, list(saved))
        d = list(torch._foreach_neg(list(grads))) if maximize else list(grads)
        if weight_decay != 0:
            d = list(torch._foreach_add(d, params, alpha=weight_decay))
        if momentum != 0:
            bufs = list(momentum_buffers)
            if init_buffers:
                torch._foreach_copy_(bufs, d)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d, alpha=1 - dampening)
            d = list(torch._foreach_add(d, bufs, alpha=momentum)) if nesterov else bufs
        torch._foreach_add_(params, d, alpha=-lr)

    def restore_adam(self, params, saved, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *,
                     step, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                     maximize) -> None:
        if len(params) == 0:
            return
        if _low(params):
            return _via_fp32(
                self.restore_adam,
                dict(params=params, saved=saved, grads=grads, exp_avgs=exp_avgs,
                     exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs),
                ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), step=step, lr=lr,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)
        params, exp_avgs, exp_avg_sqs = list(params), list(exp_avgs), list(exp_avg_sqs)
        if saved is not None:
            torch._foreach_copy_(params, list(saved))
        d = list(torch._foreach_neg(list(grads))) if maximize else list(grads)
        if weight_decay != 0:
            if decoupled:
                torch._foreach_mul_(params, 1 - lr * weight_decay)
            else:
                d = list(torch._foreach_add(d, params, alpha=weight_decay))
        torch._foreach_lerp_(exp_avgs, d, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, d, d, 1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
        if amsgrad:
            torch._foreach_maximum_(list(max_exp_avg_sqs), exp_avg_sqs)
            denom = torch._foreach_sqrt(list(max_exp_avg_sqs))
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)


def load() -> Ops:
    return ForeachOps()
