"""CR-SAM: curvature-regularized SAM (Wu et al., 2024). Closure only (three passes).

With ``e`` as SAM's, three gradients of the same batch::

    g0 = ∇L(w),   g+ = ∇L(w + e),   g− = ∇L(w − e)
    d  = g+ + gamma · (g+ + g− − 2·g0) + beta · (g+ − g−)
       = (1 + gamma + beta) · g+ + (gamma − beta) · g− − 2·gamma · g0
    restore w;  Base.step(d)

Defaults ``gamma = 0.1``, ``beta = 0.1``.
"""
from __future__ import annotations

from typing import List

import torch

from ._plan import Bucket, _check_positive
from .sam import SAM

__all__ = ["CRSAM"]


class CRSAM(SAM):
    """CR-SAM; see the module docstring. Use ``step(closure)``."""

    closure_only = True
    _keyword_meanings = {"gamma": "curvature weight gamma",
                         "beta": "gradient-difference weight beta"}

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, gamma=0.1, beta=0.1, *,
                 adaptive=False, eta=0.0, perturb_eps=1e-12, backend="auto", **base_kwargs):
        _check_positive("gamma", gamma)
        _check_positive("beta", beta)
        self.gamma, self.beta = float(gamma), float(beta)
        super().__init__(params, base_optimizer, rho, adaptive, eta=eta, perturb_eps=perturb_eps,
                         backend=backend, **base_kwargs)

    def step(self, closure=None, *, grad_scaler=None):
        """``closure`` runs forward + backward on one batch and returns the loss; it is
        evaluated at ``w``, ``w + e`` and ``w − e``. Returns the loss at ``w``. The first
        backward adds to gradients already there (as ``SAM.step(closure)``); the gradients
        are cleared on return."""
        if grad_scaler is not None:
            raise NotImplementedError("CRSAM does not take a GradScaler; use bf16 autocast, "
                                      "which needs no loss scaling")
        if closure is None:
            raise RuntimeError("CRSAM.step() needs a closure: it evaluates the gradient at "
                               "w, w + e and w - e")
        closure = torch.enable_grad()(closure)
        loss = closure()   # adds to gradients already accumulated, as SAM's step(closure)
        with torch.no_grad():
            buckets = self._gather()
            self._gradients_ok(buckets, None, record=False, when="the pass at w")
            self._keep_grads(buckets, "g0")
            self._perturb(buckets)
            self._run.perturbed = buckets
        try:
            self.zero_grad()
            closure()
            with torch.no_grad():
                self._require_grads(buckets)
                self._gradients_ok(buckets, None, record=False, when="the pass at w + e")
                self._keep_grads(buckets, "gplus")
                # w - e: the first ascent mirrored, e still from g0
                self._perturb(buckets, lambda b: self._buffers("g0", b.sources),
                              sign=-1.0, save=False)
            self.zero_grad()
            closure()
            self._require_grads(buckets)
            with torch.no_grad():
                self._gradients_ok(buckets, None, record=False, when="the pass at w - e")
        except BaseException:
            with torch.no_grad():
                self._abort()
            raise
        with torch.no_grad():
            self._run.perturbed = None
            g, bt = self.gamma, self.beta
            for b in buckets:
                self._lincomb(b, b.grads, [(1 + g + bt, self._buffers("gplus", b.sources)),
                                           (g - bt, b.grads),
                                           (-2 * g, self._buffers("g0", b.sources))])
            self._restore_and_update(buckets)
            self._run.calls += 1
        self.zero_grad()
        return loss

    @staticmethod
    def _require_grads(buckets: List[Bucket]) -> None:
        if any(p.grad is None for b in buckets for p in b.sources):
            raise RuntimeError("CRSAM: a parameter that had a gradient at w has none at a "
                               "perturbed point; the closure must use the same parameters")
