"""GSAM: surrogate-gap guided SAM (Zhuang et al., 2022).

::

    e = rho_t · g / (‖g‖ + eps);   g_p = ∇L(w + e)
    g_perp = g − (⟨g, g_p⟩ / ‖g_p‖²) · g_p        the part of g orthogonal to g_p
    d = g_p − alpha · g_perp  =  (1 + alpha · ⟨g, g_p⟩ / ‖g_p‖²) · g_p − alpha · g
    restore w;  Base.step(d)

``rho_t`` is ``rho`` (constant, the default) or, when ``rho_max`` and ``rho_min`` are
given, follows the group's learning rate linearly: ``rho_max`` at ``lr_max`` (default: the
group's lr at construction) and ``rho_min`` at ``lr_min`` (default 0), clamped to
``[rho_min, rho_max]``. ``d`` is written into ``p.grad`` before the base step.
"""
from __future__ import annotations

from typing import List

import torch

from ._plan import Bucket, _check_positive
from .sam import SAM

__all__ = ["GSAM"]


class GSAM(SAM):
    """GSAM; see the module docstring for the update rule. ``alpha`` default 0.4."""

    _keeps_gradient = True
    _keyword_meanings = {
        "alpha": "weight of the surrogate-gap term (alpha · g_perp)",
        "rho_min": "smallest scheduled radius", "rho_max": "largest scheduled radius",
        "lr_min": "lr at which rho_min applies", "lr_max": "lr at which rho_max applies",
    }

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, alpha=0.4, *,
                 rho_min=None, rho_max=None, lr_min=0.0, lr_max=None, adaptive=False,
                 eta=0.0, perturb_eps=1e-12, schedule=None, backend="auto", **base_kwargs):
        _check_positive("alpha", alpha)
        if (rho_min is None) != (rho_max is None):
            raise ValueError("give both rho_min and rho_max to schedule rho with the lr, or neither")
        if rho_max is not None:
            _check_positive("rho_min", rho_min)
            _check_positive("rho_max", rho_max)
            if rho_min > rho_max:
                raise ValueError(f"rho_min ({rho_min}) must be <= rho_max ({rho_max})")
        self.alpha = float(alpha)
        self._schedule = None if rho_max is None else (float(rho_min), float(rho_max),
                                                       float(lr_min), lr_max)
        super().__init__(params, base_optimizer, rho, adaptive, eta=eta, perturb_eps=perturb_eps,
                         schedule=schedule, backend=backend, **base_kwargs)
        if self._schedule is not None:
            for group in self.param_groups:
                group.setdefault("lr_max", group["lr"] if lr_max is None else lr_max)
                if float(group["lr_max"]) <= lr_min:
                    raise ValueError(f"lr_max ({group['lr_max']}) must be > lr_min ({lr_min})")

    def _rho(self, group: dict):
        if self._schedule is None:
            return group["rho"]
        rho_min, rho_max, lr_min, _ = self._schedule
        frac = (float(group["lr"]) - lr_min) / (float(group["lr_max"]) - lr_min)
        return min(max(rho_min + (rho_max - rho_min) * frac, rho_min), rho_max)

    def _descent(self, buckets: List[Bucket]) -> None:
        g0 = lambda b: self._buffers("g0", b.sources)
        dot = self._dot(buckets, g0, lambda b: b.grads)
        gp_sq = self._norm(buckets, lambda b: b.grads).square()
        coef_gp = 1.0 + self.alpha * dot / (gp_sq + self.perturb_eps)
        for b in buckets:
            self._lincomb(b, b.grads, [(coef_gp, b.grads), (-self.alpha, g0(b))])
        self._restore_and_update(buckets)
