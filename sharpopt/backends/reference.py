"""Backend ``reference``: one tensor at a time, in plain eager PyTorch.

This is the definition of the numbers. Each pass is written to be read next to
``docs/algorithms.md`` and ``base.py``, not to be fast: arithmetic on low-precision tensors
is done in fp32 (fp64 stays fp64) and rounded once when stored. The base optimizer's update is not
re-implemented here: the wrappers restore the weights and then call ``torch.optim``'s own
``step()`` (``fuses_base_update = False``), so every fused backend is checked against
torch.optim itself.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
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


def sqrt_rn(x: Tensor) -> Tensor:
    """``sqrt(x)`` correctly rounded, so that the numbers do not depend on the CPU: torch's
    CPU square root is not correctly rounded on every machine (seen: torch 2.13 on an AMD
    EPYC with AVX-512, where about one fp32 result in five and one fp64 result in seventy
    was one ulp off), while the fused backends' kernels round correctly (a hardware square
    root, Triton's ``sqrt_rn``). NumPy's square root is the hardware instruction; on a GPU
    torch's is IEEE-correct already."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return x.sqrt()
    a = x.detach().contiguous().numpy()
    out = np.empty_like(a)            # a 0-dim input would give a NumPy scalar otherwise
    np.sqrt(a, out=out)
    return torch.from_numpy(out)


# -- the per-element math, under the names of csrc/sharpopt_math.h and kernels/elementwise.py
# (torch tensors in the accumulation dtype in, new values out; the same operation order).
def weighted_dev(w: Tensor, g: Tensor, mu, eta: float, adaptive: bool) -> Tensor:
    """``T (g - mu)``, ``T = |w| + eta`` when ``adaptive`` (else 1): the norm's term."""
    d = g - mu
    return d * (w.abs() + eta) if adaptive else d


def perturb_elem(s: Tensor, g: Tensor, mu, scale, eta: float, adaptive: bool) -> Tensor:
    """``s + scale T² (g - mu)``, ``T = |s| + eta`` when ``adaptive``."""
    d = g - mu
    if adaptive:
        t = s.abs() + eta
        d = d * t * t
    return s + scale * d


def lincomb_elem(xs: Sequence[Tensor], cs: Sequence) -> Tensor:
    """``c0 x0 + c1 x1 + c2 x2`` (1 to 3 terms, left to right)."""
    acc = cs[0] * xs[0]
    for x, c in zip(xs[1:], cs[1:]):
        acc = acc + c * x
    return acc


def sgd_elem(w: Tensor, buf: Optional[Tensor], g: Tensor, *, lr, weight_decay, momentum,
             dampening, nesterov, maximize, init):
    """(new w, new buf) of one ``torch.optim.SGD`` step (buf None without momentum)."""
    d = -g if maximize else g
    d = d + weight_decay * w
    if momentum != 0:
        buf = d if init else momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return w - lr * d, buf


def adam_elem(w: Tensor, m: Tensor, v: Tensor, vmax: Optional[Tensor], g: Tensor, *, lr, beta1,
              beta2, eps, weight_decay, decoupled, amsgrad, maximize, bc1, bc2_sqrt):
    """(new w, m, v, vmax) of one ``torch.optim.Adam``/``AdamW`` step; ``bc1 = 1 -
    beta1^step`` and ``bc2_sqrt = sqrt(1 - beta2^step)``."""
    d = -g if maximize else g
    if decoupled:
        w = w * (1 - lr * weight_decay)
    else:
        d = d + weight_decay * w
    m = m + (1 - beta1) * (d - m)
    v = beta2 * v + (1 - beta2) * d * d
    vv = v
    if amsgrad:
        vmax = vv = torch.maximum(vmax, v)
    return w - (lr / bc1) * m / (sqrt_rn(vv) / bc2_sqrt + eps), m, v, vmax


def _weighted(g: Tensor, w: Tensor, adaptive: bool, eta: float, centralize: bool) -> Tensor:
    """``T ⊙ C(g)`` in the accumulation dtype (the vector whose norm ``sumsq`` takes)."""
    d = _up(g)
    mu = d.mean(dim=centralize_dims(g), keepdim=True) if centralize and g.dim() > 1 else 0.0
    return weighted_dev(_up(w) if adaptive else w, d, mu, eta, adaptive)


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
            mu = 0.0
            if row_means is not None and row_means[i] is not None:
                mu = row_means[i].to(d.dtype).view((-1,) + (1,) * (g.dim() - 1))
            w.copy_(perturb_elem(_up(s), d, mu, _scalar(scale, d), eta, adaptive))

    def restore(self, params, saved) -> None:
        for w, s in zip(params, saved):
            w.copy_(s)

    def lincomb(self, out, xs, coefs) -> None:
        if not 1 <= len(xs) <= 3 or len(xs) != len(coefs):
            raise ValueError("lincomb takes 1 to 3 terms with one coefficient each")
        for i, o in enumerate(out):
            terms = [_up(x[i]) for x in xs]
            o.copy_(lincomb_elem(terms, [_scalar(c, t) for c, t in zip(coefs, terms)]))

    def restore_sgd(self, params, saved, grads, momentum_buffers, *, lr, weight_decay,
                    momentum, dampening, nesterov, maximize, init_buffers) -> None:
        # Written out for completeness (and for tests of the fused backends' contract);
        # the wrappers call torch.optim.SGD.step() instead when this backend is chosen.
        if saved is not None:
            self.restore(params, saved)
        for i, (w, g) in enumerate(zip(params, grads)):
            buf = momentum_buffers[i] if momentum != 0 else None
            new_w, new_buf = sgd_elem(
                _up(w), None if buf is None or init_buffers else _up(buf), _up(g), lr=lr,
                weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                nesterov=nesterov, maximize=maximize, init=init_buffers)
            if buf is not None:
                buf.copy_(new_buf)
            w.copy_(new_w)

    def restore_adam(self, params, saved, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *,
                     step, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                     maximize) -> None:
        if saved is not None:
            self.restore(params, saved)
        bc1 = 1 - beta1 ** step
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
        for i, (w, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            vmax = max_exp_avg_sqs[i] if amsgrad else None
            new_w, new_m, new_v, new_vmax = adam_elem(
                _up(w), _up(m), _up(v), None if vmax is None else _up(vmax), _up(g), lr=lr,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                decoupled=decoupled, amsgrad=amsgrad, maximize=maximize, bc1=bc1,
                bc2_sqrt=bc2_sqrt)
            m.copy_(new_m)
            v.copy_(new_v)
            if amsgrad:
                vmax.copy_(new_vmax)
            w.copy_(new_w)


def load() -> Ops:
    return ReferenceOps()
