"""RBO: the Rolling Ball Optimizer (Belgoumri et al., 2025). Its own optimizer, closure only.

A ball of radius ``rho`` rolls on the graph of the loss. With ``g = ∇L(w)``,
``s = √(1 + ‖g‖²)`` and the unit normal ``n = (−g, 1) / s``, one step on one batch::

    c  = (w, L(w)) + rho · n                     the ball's centre
    c' = c − lr · (g, ‖g‖²)                      roll along the tangent of the graph
       = (w − (rho / s + lr) · g,   L(w) + rho / s − lr · ‖g‖²)
    w' = argmin_x ½‖x − c'_w‖² + ½(L(x) − c'_L)²  (back onto the graph), by K steps from x = w:
         x ← x − beta · [(x − c'_w) + (L(x) − c'_L) · ∇L(x)]
           = (1 − beta) · x + beta · c'_w − beta · (L(x) − c'_L) · ∇L(x)

Each inner step evaluates the closure at ``x``: ``K + 1`` forward/backward passes a step.
``rho → 0`` recovers gradient descent (when the inner solve converges). Hyperparameters,
per group: ``lr``, ``rho``, ``inner_steps`` (K, default 10), ``inner_lr`` (beta, default
0.2; the solve contracts by about ``1 − beta`` per inner step near a flat point, and needs
``beta < 2 / (1 + ‖∇L‖²)`` to converge).
"""
from __future__ import annotations

from typing import Callable

import torch

from ._plan import _check_positive, _Core

__all__ = ["RBO"]


class RBO(_Core):
    """Rolling Ball Optimizer; see the module docstring for the update rule.

    ``closure`` must run forward and backward (it is called with grad enabled, after the
    gradients were zeroed) and return the loss tensor. Under data parallelism (DDP,
    FSDP2) it must return the same global-batch loss on every rank (all-reduce it): the
    update reads the loss value, and ranks that saw different values would drift apart.
    """

    def __init__(self, params, lr=0.01, rho=0.05, inner_steps=10, inner_lr=0.2, *,
                 backend="auto"):
        _check_positive("lr", lr)
        _check_positive("rho", rho)
        _check_positive("inner_lr", inner_lr, allow_zero=False)
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        super().__init__(params, dict(lr=lr, rho=rho, inner_steps=inner_steps, inner_lr=inner_lr),
                         backend=backend)

    def first_step(self, *args, **kwargs):
        raise RuntimeError("RBO needs step(closure): each inner step re-evaluates the loss")

    second_step = first_step

    def step(self, closure: Callable[[], torch.Tensor] = None):
        if closure is None:
            raise RuntimeError("RBO.step() needs a closure that runs forward and backward "
                               "and returns the loss (it is evaluated K + 1 times)")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        with torch.no_grad():
            buckets = self._gather()
            if not buckets:
                return loss
            self._check_loss(loss)
            g_sq = self._norm(buckets, lambda b: b.grads).square()
            s = (1.0 + g_sq).sqrt()
            loss0 = self._as_scalar(loss)
            centre_l = {}
            for b in buckets:
                lr, rho = b.group["lr"], b.group["rho"]
                centre = self._buffers("centre", b.sources)
                self._lincomb(b, centre, [(1.0, b.params), (-(rho / s + lr), b.grads)])
                self._lincomb(b, self._buffers("saved", b.sources), [(1.0, b.params)])
                centre_l[id(b)] = loss0 + rho / s - lr * g_sq
        try:
            inner = max(g["inner_steps"] for g in self.param_groups)
            for k in range(inner):
                if k:   # x = w for k = 0: the gradient at w is the one we have
                    self.zero_grad()
                    lx = closure()
                    self._check_loss(lx)
                    lx = self._as_scalar(lx)
                else:
                    lx = loss0
                with torch.no_grad():
                    for b in buckets:
                        if k >= b.group["inner_steps"]:
                            continue
                        if any(p.grad is None for p in b.sources):
                            raise RuntimeError("RBO: the closure stopped producing a gradient "
                                               "for a parameter")
                        beta = b.group["inner_lr"]
                        self._lincomb(b, b.params, [
                            (1.0 - beta, b.params),
                            (beta, self._buffers("centre", b.sources)),
                            (-beta * (lx - centre_l[id(b)]), b.grads),
                        ])
        except BaseException:
            with torch.no_grad():
                for b in buckets:
                    self._restore(b)
            raise
        return loss

    def _as_scalar(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as a 0-dim tensor on the primary device, in fp32 at least."""
        dtype = torch.float64 if loss.dtype == torch.float64 else torch.float32
        return loss.detach().reshape(()).to(self._primary, dtype)

    @staticmethod
    def _check_loss(loss) -> None:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("RBO's closure must return the loss as a one-element tensor")
