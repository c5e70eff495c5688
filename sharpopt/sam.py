"""SAM, ASAM and GCSAM (and SAM every ``k`` steps): one ascent, one restore + update.

All three perturb along the same family of directions::

    v = C(g)          C = gradient centralisation (GCSAM) or the identity
    T = |w| + eta     (adaptive) or 1
    e = rho · T² ⊙ v / (‖T ⊙ u‖ + eps)       u = v, or u = g for GCSAM's norm="raw"
    w ← w + e;   g_adv = ∇L(w + e);   restore w;   Base.step(g_adv)

``rho`` is per param group; the norm is one global norm over every parameter that has a
gradient. With ``k > 1`` the two-pass step runs on every k-th call (the 1st, k+1-th, ...)
and the other calls are a plain ``Base.step(g)``: ``first_step`` then applies the update
itself and returns False. ``schedule=`` generalises ``k`` (random, adaptive, late phase:
see :mod:`sharpopt.schedules`).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from ._core import SharpnessAware, _SkipStep
from ._plan import Bucket, _check_positive, _f32
from .schedules import EveryK, Schedule

__all__ = ["SAM", "ASAM", "GCSAM"]


class SAM(SharpnessAware):
    r"""Sharpness-Aware Minimization (Foret et al., 2020), a drop-in for the common wrapper.

    .. code-block:: python

        opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)
        # or: opt.step(closure)   # closure: zero-free forward + backward, returns the loss

    Update: ``e = rho · g / (‖g‖ + eps)``; ``w ← w + e``; ``g_adv = ∇L(w + e)``;
    restore ``w`` bit for bit; ``Base.step(g_adv)``. With ``adaptive=True`` (ASAM),
    ``e = rho · T² ⊙ g / (‖T ⊙ g‖ + eps)`` with ``T = |w| + eta``.

    Args:
        params: tensors, dicts (per-group ``rho`` allowed) or named parameters.
        base_optimizer: a ``torch.optim`` class; ``SGD``, ``Adam`` and ``AdamW`` are
            merged with the restore by the fused backends, any other class is stepped as is.
        rho: radius of the ascent (per group), ``>= 0``. ``rho=0`` is the base optimizer.
        adaptive: scale the ascent by ``T² = (|w| + eta)²`` (ASAM).
        eta: ASAM's offset (``0`` = the common PyTorch variant, ``0.01`` = the paper).
        perturb_eps: added to the norm before dividing (``eps`` is the base optimizer's).
        k: run the two-pass step every ``k`` calls, a plain base step otherwise.
        schedule: a :class:`sharpopt.schedules.Schedule` deciding which steps perturb
            (``EveryK``, ``Random``, ``Adaptive``, ``LatePhase``); default every ``k``.
            ``Adaptive`` reads the ascent's norm on the host once per step and does not
            take a ``grad_scaler``.
        backend: ``"auto"``, ``"reference"``, ``"foreach"``, ``"cpu"``, ``"cuda"`` or
            ``"triton"`` (``$SHARPOPT_BACKEND`` replaces ``"auto"``).
        max_grad_norm: clip the direction handed to the base optimizer to this global norm
            (``clip_grad_norm_``'s rule); None (default) does not clip.
        check_finite: raise ``FloatingPointError`` on an inf/NaN gradient (no scaler).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``eps``, ...).
            A keyword both take is refused; ``sam_kwargs={...}`` / ``base_kwargs={...}``
            say whose it is.
    """

    _centralize_direction = False
    _centralize_norm = False
    _keyword_meanings = {
        "adaptive": "switch to ASAM's adaptive perturbation", "eta": "ASAM's offset eta",
        "k": "period of the two-pass step", "schedule": "which steps perturb (sharpopt.schedules)",
    }
    #: Variants whose descent needs the first pass's gradient keep it as scratch "g0".
    _keeps_gradient = False

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, adaptive=False, *,
                 eta=0.0, perturb_eps=1e-12, k=1, schedule=None, backend="auto", **base_kwargs):
        _check_positive("eta", eta)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if schedule is None:
            schedule = EveryK(k)
        elif not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a sharpopt.schedules.Schedule, got {schedule!r}")
        elif k != 1:
            raise ValueError("give k or schedule, not both (schedule=EveryK(k) is k)")
        self.k = k
        self.schedule = schedule
        self._decision = _Decision()
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=bool(adaptive), eta=eta),
                         backend=backend, perturb_eps=perturb_eps, **base_kwargs)

    def _check_group(self, group):
        super()._check_group(group)
        _check_positive("eta", group.get("eta", 0.0))

    @property
    def _scale_free_ascent(self) -> bool:
        # e depends on g only through g / ‖g‖ unless g is also kept for the descent.
        return not self._keeps_gradient

    def _will_perturb(self) -> bool:
        """Whether this call perturbs, as the schedule decides for step ``t`` (the count of
        completed first steps); decided once per call and remembered for the call."""
        t = self._run.calls
        d = self._decision
        if d.t != t:
            d.norm = None
            if self.schedule.needs_norm:
                d.norm = self._ascent_norm(self._gather())
                d.perturb = self.schedule.decide(t, float(d.norm.square()))  # the host read
            else:
                d.perturb = self.schedule.decide(t)
            d.t = t
        return d.perturb

    def _first(self, zero_grad: bool, grad_scaler=None) -> bool:
        if (self.schedule.needs_norm and grad_scaler is not None
                and grad_scaler.is_enabled()):
            raise ValueError(f"{type(self.schedule).__name__} reads the gradient norm to "
                             "decide and does not take a grad_scaler yet; use another "
                             "schedule with loss scaling")
        self._decision.t = None   # new gradients: decide again
        return super()._first(zero_grad, grad_scaler)

    def _ascent_norm(self, buckets: List[Bucket]) -> Tensor:
        """The norm :meth:`_perturb` divides by, for the current gradients."""
        adaptive = any(b.group["adaptive"] for b in buckets)
        if adaptive and not all(b.group["adaptive"] for b in buckets):
            raise ValueError("adaptive must be the same in every param group (the norm is global)")
        return self._norm(buckets, lambda b: b.grads, adaptive=adaptive,
                          centralize=self._centralize_norm, row_means=self._centralize_direction)

    def _take_norm(self) -> Optional[Tensor]:
        """The norm computed for this call's decision, once (None when there is none)."""
        d = self._decision
        if d.t != self._run.calls or d.norm is None:
            return None
        norm, d.norm = d.norm, None
        return norm

    def state_dict(self) -> dict:
        """As :class:`SharpnessAware`'s, plus the schedule's state (``["sharpopt"]["schedule"]``)."""
        sd = super().state_dict()
        sd["sharpopt"]["schedule"] = {"type": type(self.schedule).__name__,
                                      "state": self.schedule.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        entry = state_dict.get("sharpopt", {}).get("schedule")
        if entry is not None and entry["type"] != type(self.schedule).__name__:
            raise ValueError(f"this state_dict was saved with schedule {entry['type']}, this "
                             f"optimizer has {type(self.schedule).__name__}")
        super().load_state_dict(state_dict)
        if entry is not None:
            self.schedule.load_state_dict(entry["state"])
        self._decision.t = None

    def _rho(self, group: dict):
        return group["rho"]

    def _perturb(self, buckets: List[Bucket], grads_of=None, *,
                 sign: float = 1.0, save: bool = True) -> None:
        """``saved ← w`` (when ``save``);  ``w ← saved + sign · rho · T² ⊙ C(v) / (‖T ⊙ u‖ +
        eps)`` for ``v = grads_of`` (default the gradients; ``sign = −1, save = False`` gives
        CR-SAM's ``w − e``). The norm of the gradients is reused when the schedule's
        decision already computed it."""
        adaptive = any(b.group["adaptive"] for b in buckets)
        if adaptive and not all(b.group["adaptive"] for b in buckets):
            raise ValueError("adaptive must be the same in every param group (the norm is global)")
        centralize = self._centralize_direction
        norm = self._take_norm() if grads_of is None else None
        if grads_of is None:
            grads_of = _grads
        rhos = [self._rho(b.group) for b in buckets]
        flags = None
        if norm is None and self._run.inv_scale is None and self._host_scalars(buckets) \
                and not any(isinstance(rho, Tensor) for rho in rhos):
            scales = self._host_scales(buckets, grads_of, rhos, sign, adaptive)
        else:
            if norm is None:
                norm = self._norm(buckets, grads_of, adaptive=adaptive,
                                  centralize=self._centralize_norm, row_means=centralize)
            inv = self._run.inv_scale
            if inv is not None:   # the gradients still carry a loss scale s: ‖g‖ = ‖s·g‖ / s
                norm = norm * inv.to(norm.device)
                if not bool(torch.isfinite(norm)):   # the one host sync, as the unscale's
                    raise _SkipStep
            flags = self._guard_norm(norm, buckets)
            denom = norm + self.perturb_eps
            scales = [sign * self._on(rho, b.device) / denom.to(b.device)
                      for b, rho in zip(buckets, rhos)]
            if inv is not None:
                scales = [scale * inv.to(b.device) for b, scale in zip(buckets, scales)]
        for b, scale in zip(buckets, scales):
            b.ops.perturb(
                b.params, grads_of(b), self._buffers("saved", b.sources), scale,
                adaptive=adaptive, eta=b.group["eta"],
                row_means=self._row_means(b.sources) if centralize else None, save=save,
                **({} if flags is None else {"found_inf": flags[b.device]}),
            )

    def _host_scales(self, buckets: List[Bucket], grads_of, rhos: List[float], sign: float,
                     adaptive: bool) -> List[float]:
        """The perturbation's scale of each bucket as a Python float (see
        ``_host_scalars``): the same operations in the same dtype as the tensor path,
        ``scale = (sign · rho) · (1 / (‖u‖ + eps))`` as torch evaluates ``sign * rho /
        denom``; raises FloatingPointError on a non-finite norm under the guard (CPU)."""
        norm, wide = self._norm_value(buckets, grads_of, adaptive=adaptive,
                                      centralize=self._centralize_norm,
                                      row_means=self._centralize_direction)
        if self._run.by_norm and not math.isfinite(norm):   # the guard's verdict (CPU)
            raise FloatingPointError(self._nonfinite_message("the first pass"))
        rnd = (lambda x: x) if wide else _f32
        denom = rnd(norm + rnd(self.perturb_eps))
        inv = rnd(1.0 / denom) if denom != 0 else math.copysign(math.inf, denom)
        return [rnd(inv * rnd(sign * rho)) for rho in rhos]

    def _ascent(self, buckets: List[Bucket]) -> bool:
        if not self._will_perturb():
            self._restore_and_update(buckets, restore=False)
            return False
        if self._keeps_gradient:
            self._keep_grads(buckets, "g0")
        self._perturb(buckets)
        return True


def _grads(b: Bucket) -> List[Tensor]:
    return b.grads


class _Decision:
    """The schedule's decision for step ``t`` (and the norm it read, kept for the ascent);
    a plain object, for the reason given in ``_core._StepState``."""

    def __init__(self):
        self.t: Optional[int] = None
        self.perturb = True
        self.norm: Optional[Tensor] = None


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021): :class:`SAM` with ``adaptive=True``.

    ``e = rho · T² ⊙ g / (‖T ⊙ g‖ + eps)``, ``T = |w| + eta``; defaults ``rho=0.5`` and
    ``eta=0.01`` as in the paper (``eta=0`` gives the common wrapper's ``adaptive=True``).
    """

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.5, *, eta=0.01,
                 perturb_eps=1e-12, k=1, schedule=None, backend="auto", **base_kwargs):
        super().__init__(params, base_optimizer, rho, True, eta=eta, perturb_eps=perturb_eps, k=k,
                         schedule=schedule, backend=backend, **base_kwargs)


class GCSAM(SAM):
    """Gradient-Centralized SAM (Hassan et al., 2025): the ascent uses ``g_c = GC(g)``.

    ``GC(g)[i, ...] = g[i, ...] − mean(g[i, ...])`` for tensors with ``dim > 1`` (one mean per
    output row), identity for biases and norm weights. GC applies to the ascent only; the
    base optimizer steps with the raw ``g_adv``.

    * ``norm="centralized"`` (default, the paper): ``e = rho · g_c / (‖g_c‖ + eps)``, so
      ``‖e‖ = rho``.
    * ``norm="raw"`` (the authors' released code): ``e = rho · g_c / (‖g‖ + eps)``, so
      ``‖e‖ <= rho``.

    With ``adaptive=True`` the direction is multiplied by ``T²`` and the norm by ``T`` as in
    ASAM.
    """

    _centralize_direction = True
    _keyword_meanings = {"norm": "choice of the ascent norm ('centralized' or 'raw')"}

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, adaptive=False, *,
                 norm="centralized", eta=0.0, perturb_eps=1e-12, k=1, schedule=None,
                 backend="auto",
                 **base_kwargs):
        if norm not in ("centralized", "raw"):
            raise ValueError(f"norm must be 'centralized' (the paper) or 'raw' (the authors' "
                             f"code), got {norm!r}")
        self.norm = norm
        self._centralize_norm = norm == "centralized"
        super().__init__(params, base_optimizer, rho, adaptive, eta=eta,
                         perturb_eps=perturb_eps, k=k, schedule=schedule, backend=backend,
                         **base_kwargs)
