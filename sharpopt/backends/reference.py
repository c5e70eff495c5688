"""Backend ``reference``: one tensor at a time, in plain eager PyTorch.

This is the definition of the numbers. Each pass is written to be read next to
``docs/algorithms.md`` and ``base.py``, not to be fast: arithmetic on low-precision tensors
is done in fp32 (fp64 stays fp64) and rounded once when stored. The base optimizer's update is not
re-implemented here: the wrappers restore the weights and then call ``torch.optim``'s own
``step()`` (``fuses_base_update = False``), so every fused backend is checked against
torch.optim itself.
"""
from __future__ import annotations


import torch
from torch import Tensor

from .base import Ops, Scalar, centralize_dims


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _up(t: Tensor) -> Tensor:
    """The tensor in its accumulation dtype (fp32 for fp32/bf16/fp16, fp64 for fp64)."""
    return t.to(_acc_dtype(t))


def _scalar(s: Scalar, like: Tensor):
    return s.to(device=like.device, dtype=like.dtype) if isinstance(s, Tensor) else s


def _weighted(g: Tensor, w: Tensor, adaptive: bool, eta: float, centralize: bool) -> Tensor:
    """``T ⊙ C(g)`` in the accumulation dtype (the vector whose norm ``sumsq`` takes)."""
    d = _up(g)
    if centralize and g.dim() > 1:
        d = d - d.mean(dim=centralize_dims(g), keepdim=True)
    if adaptive:
        t = _up(w).abs() + eta
        d = d * t
    return d


class ReferenceOps(Ops):
    name = "reference"
    fuses_base_update = False

    def supports(self, device: torch.device) -> bool:
        return True

    def sumsq(self, grads, params, *, adaptive, eta, centralize, row_means=None) -> Tensor:
        total = None
        for i, (g, w) in enumerate(zip(grads, params)):
            v = _weighted(g, w, adaptive, eta, centralize)
            s = (v * v).sum()
            total = s if total is None else total + s
            if row_means is not None and row_means[i] is not None:
                row_means[i].copy_(_up(g).mean(dim=centralize_dims(g)))
        if total is None:
            device = grads[0].device if grads else torch.device("cpu")
            return torch.zeros((), dtype=torch.float32, device=device)
        return total if total.dtype == torch.float64 else total.float()

    def dot(self, xs, ys) -> Tensor:
        total = None
        for x, y in zip(xs, ys):
            s = (_up(x) * _up(y)).sum()
            total = s if total is None else total + s
        if total is None:
            device = xs[0].device if xs else torch.device("cpu")
            return torch.zeros((), dtype=torch.float32, device=device)
        return total

    def perturb(self, params, grads, saved, scale, *, adaptive, eta,
                row_means=None, save=True) -> None:
        for i, (w, g, s) in enumerate(zip(params, grads, saved)):
            if save:
                s.copy_(w)
            d = _up(g)
            if row_means is not None and row_means[i] is not None:
                shape = (-1,) + (1,) * (g.dim() - 1)
                d = d - row_means[i].to(d.dtype).view(shape)
            if adaptive:
                t = _up(s).abs() + eta
                d = d * t * t
            w.copy_(_up(s) + _scalar(scale, d) * d)

    def restore(self, params, saved) -> None:
        for w, s in zip(params, saved):
            w.copy_(s)

    def lincomb(self, out, xs, coefs) -> None:
        if not 1 <= len(xs) <= 3 or len(xs) != len(coefs):
            raise ValueError("lincomb takes 1 to 3 terms with one coefficient each")
        for i, o in enumerate(out):
            acc = None
            for x, c in zip(xs, coefs):
                term = _scalar(c, _up(x[i])) * _up(x[i])
                acc = term if acc is None else acc + term
            o.copy_(acc)

    def restore_sgd(self, params, saved, grads, momentum_buffers, *, lr, weight_decay,
                    momentum, dampening, nesterov, maximize, init_buffers) -> None:
        # Written out for completeness (and for tests of the fused backends' contract);
        # the wrappers call torch.optim.SGD.step() instead when this backend is chosen.
        if saved is not None:
            self.restore(params, saved)
        for i, (w, g) in enumerate(zip(params, grads)):
            d = -_up(g) if maximize else _up(g)
            d = d + weight_decay * _up(w)
            if momentum != 0:
                buf = momentum_buffers[i]
                b = d if init_buffers else momentum * _up(buf) + (1 - dampening) * d
                buf.copy_(b)
                d = d + momentum * b if nesterov else b
            w.copy_(_up(w) - lr * d)

    def restore_adam(self, params, saved, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *,
                     step, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                     maximize) -> None:
        if saved is not None:
            self.restore(params, saved)
        bc1 = 1 - beta1 ** step
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
        for i, (w, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            d = -_up(g) if maximize else _up(g)
            p = _up(w)
            if decoupled:
                p = p * (1 - lr * weight_decay)
            else:
                d = d + weight_decay * p
            m_new = _up(m) + (1 - beta1) * (d - _up(m))
            v_new = beta2 * _up(v) + (1 - beta2) * d * d
            m.copy_(m_new)
            v.copy_(v_new)
            if amsgrad:
                v_new = torch.maximum(_up(max_exp_avg_sqs[i]), v_new)
                max_exp_avg_sqs[i].copy_(v_new)
            w.copy_(p - (lr / bc1) * m_new / (v_new.sqrt() / bc2_sqrt + eps))


def load() -> Ops:
    return ReferenceOps()
