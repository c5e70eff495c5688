"""Friendly-SAM (Li et al., 2024): perturb along the gradient minus its running mean.

::

    d = g − sigma · m          (m from the previous steps)
    m ← lam · m + (1 − lam) · g
    e = rho · d / (‖d‖ + eps);   w ← w + e;   g_adv = ∇L(w + e);   restore w;  Base.step(g_adv)

On the very first step there is no ``m``: ``m = g`` and the ascent follows the raw ``g``.
``m`` is optimizer state (``"momentum"`` in ``state_dict``). Defaults ``sigma = 1``,
``lam = 0.95``.
"""
from __future__ import annotations

from typing import List

import torch

from ._plan import Bucket, _check_positive, _local, _relaid
from .sam import SAM

__all__ = ["FriendlySAM"]


class FriendlySAM(SAM):
    """Friendly-SAM; see the module docstring for the update rule."""

    _scale_free_ascent = False   # the running mean m must see unscaled gradients
    _keyword_meanings = {"sigma": "weight of the subtracted running mean",
                         "lam": "decay of the running mean of g"}

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, sigma=1.0, lam=0.95, *,
                 adaptive=False, eta=0.0, perturb_eps=1e-12, backend="auto", **base_kwargs):
        _check_positive("sigma", sigma)
        if not (isinstance(lam, (int, float)) and 0 <= lam <= 1):
            raise ValueError(f"lam must be in [0, 1], got {lam!r}")
        self.sigma, self.lam = float(sigma), float(lam)
        super().__init__(params, base_optimizer, rho, adaptive, eta=eta, perturb_eps=perturb_eps,
                         backend=backend, **base_kwargs)

    def _ascent(self, buckets: List[Bucket]) -> bool:
        for b in buckets:
            d = self._buffers("d", b.sources)
            old = [i for i, p in enumerate(b.sources) if "momentum" in self.state[p]]
            new = [i for i, p in enumerate(b.sources) if "momentum" not in self.state[p]]
            pick = lambda xs, idx: [xs[i] for i in idx]
            g = b.grads
            if old:
                if self._relayout_due(b, "momentum"):
                    for i in old:
                        _relaid(self.state[b.sources[i]], ("momentum",), b.sources[i])
                m = b.local([self.state[b.sources[i]]["momentum"] for i in old])
                b.ops.lincomb(pick(d, old), [pick(g, old), m], [1.0, -self.sigma])
                b.ops.lincomb(m, [m, pick(g, old)], [self.lam, 1.0 - self.lam])
            if new:
                b.ops.lincomb(pick(d, new), [pick(g, new)], [1.0])
                for i in new:
                    # Shaped like the parameter (a DTensor for a sharded one), so that the
                    # state checkpoints the way the base optimizer's does.
                    m = torch.empty_like(b.sources[i])
                    _local(m).copy_(g[i])
                    self.state[b.sources[i]]["momentum"] = m
        self._perturb(buckets, grads_of=lambda b: self._buffers("d", b.sources))
        return True
