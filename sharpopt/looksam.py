"""LookSAM (Liu et al., 2022): the full SAM step every ``k`` calls, a cheap reuse between.

On every k-th call (the first, k+1-th, ...): SAM's two passes, and the component of the
adversarial gradient orthogonal to ``g`` is kept::

    g_v = g_adv − ‖g_adv‖ · cos(g, g_adv) · ĝ  =  g_adv − (⟨g, g_adv⟩ / ‖g‖²) · g
    restore w;  Base.step(g_adv)

On the other calls (one pass; ``first_step`` applies the update and returns False)::

    d = g + alpha · (‖g‖ / ‖g_v‖) · g_v;   Base.step(d)

``g_v`` is optimizer state (saved in ``state_dict`` as ``"g_v"``). Defaults ``k = 5``,
``alpha = 0.7``.
"""
from __future__ import annotations

from typing import List

import torch

from ._plan import Bucket, _check_positive, _relaid
from .sam import SAM

__all__ = ["LookSAM"]


class LookSAM(SAM):
    """LookSAM; see the module docstring for the update rule."""

    _keeps_gradient = True
    _keyword_meanings = {
        "alpha": "weight of the reused component g_v on the cheap steps",
        "k": "period of the full SAM step",
    }

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, k=5, alpha=0.7, *,
                 adaptive=False, eta=0.0, perturb_eps=1e-12, backend="auto", **base_kwargs):
        _check_positive("alpha", alpha)
        self.alpha = float(alpha)
        super().__init__(params, base_optimizer, rho, adaptive, eta=eta,
                         perturb_eps=perturb_eps, k=k, backend=backend, **base_kwargs)

    def _g_v(self, b: Bucket) -> List[torch.Tensor]:
        """The (local shards of the) ``g_v`` state of bucket ``b``'s parameters."""
        out = []
        due = self._relayout_due(b, "g_v")
        for p in b.sources:
            st = self.state[p]
            if "g_v" not in st:
                st["g_v"] = torch.zeros_like(p)
            elif due:
                _relaid(st, ("g_v",), p)
            out.append(st["g_v"])
        return b.local(out)

    def _will_perturb(self) -> bool:
        """Every k-th call, and whenever a parameter has no ``g_v`` yet."""
        return super()._will_perturb() or any(
            "g_v" not in self.state[p]
            for group in self.param_groups for p in group["params"] if p.grad is not None)

    def _ascent(self, buckets: List[Bucket]) -> bool:
        if self._will_perturb():
            return super()._ascent(buckets)
        g_norm = self._norm(buckets, lambda b: b.grads)
        gv_norm = self._norm(buckets, self._g_v)
        coef = self.alpha * g_norm / (gv_norm + self.perturb_eps)
        for b in buckets:
            self._lincomb(b, b.grads, [(1.0, b.grads), (coef, self._g_v(b))])
        self._restore_and_update(buckets, restore=False)
        return False

    def _descent(self, buckets: List[Bucket]) -> None:
        g0 = lambda b: self._buffers("g0", b.sources)
        dot = self._dot(buckets, g0, lambda b: b.grads)
        g_sq = self._norm(buckets, g0).square()
        coef = -dot / (g_sq + self.perturb_eps)
        for b in buckets:
            self._lincomb(b, self._g_v(b), [(1.0, b.grads), (coef, g0(b))])
        self._restore_and_update(buckets)
