"""WSAM: weighted SAM (Yue et al., 2023).

``alpha = gamma / (1 − gamma)`` (``gamma`` default 0.9). The ascent is SAM's; ``g`` is kept;
``g_p = ∇L(w + e)``, optionally clipped to ``‖g_p‖ <= max_norm``; restore ``w``; then

* ``decouple=True`` (default): ``Base.step(g)``, then ``w ← w − lr · alpha · (g_p − g)``;
* ``decouple=False``: ``Base.step(alpha · g_p + (1 − alpha) · g)``.
"""
from __future__ import annotations

from typing import List

import torch

from ._plan import Bucket, _check_positive
from .sam import SAM

__all__ = ["WSAM"]


class WSAM(SAM):
    """WSAM; see the module docstring for the update rule."""

    _keeps_gradient = True
    _keyword_meanings = {
        "gamma": "sharpness weight gamma", "decouple": "decoupled-update switch",
        "max_norm": "clipping norm of g_p",
    }

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, gamma=0.9, *,
                 decouple=True, max_norm=None, adaptive=False, eta=0.0, perturb_eps=1e-12,
                 schedule=None, backend="auto", **base_kwargs):
        if not (isinstance(gamma, (int, float)) and 0 <= gamma < 1):
            raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
        if max_norm is not None:
            _check_positive("max_norm", max_norm, allow_zero=False)
        self.gamma = float(gamma)
        self.alpha = self.gamma / (1.0 - self.gamma)
        self.decouple = bool(decouple)
        self.max_norm = max_norm
        super().__init__(params, base_optimizer, rho, adaptive, eta=eta, perturb_eps=perturb_eps,
                         schedule=schedule, backend=backend, **base_kwargs)

    def _descent(self, buckets: List[Bucket]) -> None:
        g0 = lambda b: self._buffers("g0", b.sources)
        clip = 1.0
        if self.max_norm is not None:
            gp_norm = self._norm(buckets, lambda b: b.grads)
            clip = (self.max_norm / (gp_norm + 1e-6)).clamp(max=1.0)
        a = self.alpha
        if not self.decouple:
            for b in buckets:
                self._lincomb(b, b.grads, [(a * clip, b.grads), (1.0 - a, g0(b))])
            self._restore_and_update(buckets)
            return
        for b in buckets:   # keep g_p (clipped), step with g
            self._lincomb(b, self._buffers("gp", b.sources), [(clip, b.grads)])
        self._restore_and_update(buckets, directions=g0)
        for b in buckets:
            c = a * float(b.group["lr"])
            w = b.params
            self._lincomb(b, w, [(1.0, w), (-c, self._buffers("gp", b.sources)), (c, g0(b))])
