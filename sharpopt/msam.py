"""MSAM (Momentum-SAM; Becker, Altrock & Risse, 2024): sharpness at one gradient per step.

SAM perturbs along the current gradient, which costs a second forward/backward. MSAM
perturbs along the negative of the base optimizer's momentum ``m`` instead, which is known
before the gradient is: the model *lives* at ``w~`` between steps and each step evaluates
its single gradient there::

    between steps the model holds   w~ = w − rho · m / (‖m‖ + eps)
    one step, with g = ∇L(w~):
        w ← w~ + rho · m / (‖m‖ + eps)      the move back, with the scale kept from the last step
        Base.step(g) at w                     updates m (SGD's momentum_buffer, Adam's exp_avg)
        w~ ← w − rho · m / (‖m‖ + eps)      the new m and a new global norm

``‖m‖`` is one norm over every parameter updated in the step (all groups, all ranks);
``rho`` is per param group. The first step has no ``m``: no move back before it.

Two conventions differ from the authors' code (MarlonBecker/MSAM, ``optimizer/msam.py`` and
``optimizer/adamW_msam.py``), on purpose, so that ``rho = 0`` is the base optimizer bit for
bit: SGD's weight decay is added at ``w`` (theirs at ``w~``), and AdamW decays ``w`` before
the Adam update, as ``torch.optim.AdamW`` does (theirs after). Each difference is of order
``wd · rho`` or ``lr² · wd`` per step.

Cost: with SGD-momentum the fused backends run one pass that reads ``w~, g, m`` and writes
``m, w`` and also sums ``‖m‖²`` (20 B per fp32 parameter), then the perturbation
``w~ ← w − s · m`` (read ``w, m``, write ``w``: 12 B), 32 B in all against plain SGD's 20 B;
the SPEC's "~24 B" would need the new norm before the update pass has produced the new
``m``, which exact arithmetic does not allow. There is no weight copy and no second
forward/backward.

The move back and forth is not bit-exact: ``(w − s·m) + s·m`` rounds, about one more
rounded add per step. ``python -m bench.msam_drift`` isolates it (gradients that do not
depend on ``w`` and no weight decay, so exact MSAM and SGD share ``w``): after 10,000 steps on
20,000 fp32 weights the round trip had moved ``w`` by 1.4e-7 of its rms, against 2.2e-6 for
plain fp32 SGD's own rounding (its distance to an fp64 run), and MSAM's distance to fp64 was
2.235e-6 against SGD's 2.233e-6; with bf16 weights, 0.12 against 0.32
(``bench/results/msam_drift.json``). The drift is far below the precision the run has anyway.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._core import SharpnessAware
from ._plan import Bucket, _relaid

__all__ = ["MSAM"]


class _MsamState:
    """Where the model stands between steps: ``back[id(p)] = (p, s)`` for the parameters
    that hold ``w~ = w − s · m`` (``s = rho / (‖m‖ + eps)``, a 0-dim tensor); ``at_w`` is true
    inside :meth:`MSAM.at_w`. Keyed by ``id``: a tensor's own hash is a Python call, and the
    step looks every parameter up. A plain object, for the reason given in
    ``_core._StepState``."""

    def __init__(self):
        self.back: Dict[int, Tuple[Tensor, Tensor]] = {}
        self.at_w = False


class MSAM(SharpnessAware):
    r"""Momentum-SAM: one gradient per step, perturbed along the momentum.

    .. code-block:: python

        opt = sharpopt.MSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()     # the gradient at w~ (where the model is)
            opt.step()                           # no closure needed (one is accepted)
        with opt.at_w():                         # evaluate and save at w, not w~
            evaluate(model); torch.save(model.state_dict(), path)

    Update (see the module docstring): ``w ← w~ + s·m``; ``Base.step(g)``;
    ``w~ ← w − s'·m'`` with ``s' = rho / (‖m'‖ + perturb_eps)``.

    Args:
        params: tensors, dicts (per-group ``rho`` allowed) or named parameters.
        base_optimizer: ``torch.optim.SGD`` (with ``momentum > 0``), ``Adam`` or ``AdamW``;
            their update is fused with the move back by the fused backends.
        rho: length of the step along ``−m / ‖m‖`` (per group), ``>= 0``; ``rho = 0`` is
            the base optimizer exactly. Default 0.3.
        perturb_eps: added to ``‖m‖`` before dividing.
        backend: as for :class:`sharpopt.SAM`.
        check_finite: raise ``FloatingPointError`` on an inf/NaN gradient before anything
            is written (one extra read of the gradients and one host read per step; pass
            False to drop them, or step through ``GradScaler.step(opt)``, which skips such
            steps itself).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, Adam's ``eps``...).
            ``max_grad_norm`` is refused: clip the gradients before ``step()``.

    Checkpoints: ``state_dict()`` records which parameters hold ``w~`` and the scale ``s``
    of each, so a checkpoint of the model (at ``w~``) with it resumes the run bit for bit.
    Saved inside :meth:`at_w`, the model holds ``w`` and the state says so: the resumed
    run's first step takes its gradient at ``w`` (no move back), then goes on as usual.

    Drift of the move back and forth: measured by ``python -m bench.msam_drift`` (see the
    module docstring): in fp32 about 1/15 of plain SGD's own rounding error over 10,000 steps.
    """

    #: GradScaler.step(opt) unscales the gradients through the shared param_groups and calls
    #: step() only when they are finite: a skipped step leaves the model at w~, as it should.
    _step_supports_amp_scaling = False

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.3, *, perturb_eps=1e-12,
                 backend="auto", check_finite=True, **base_kwargs):
        if base_optimizer not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
            raise TypeError(
                "MSAM perturbs along the base optimizer's momentum and supports "
                "torch.optim.SGD (momentum > 0), Adam and AdamW as base_optimizer, got "
                f"{base_optimizer!r}"
            )
        if base_kwargs.get("max_grad_norm") is not None:
            raise ValueError("MSAM does not clip its direction (max_grad_norm); clip the "
                             "gradients with torch.nn.utils.clip_grad_norm_ before step()")
        self._msam = _MsamState()
        self._key = "momentum_buffer" if base_optimizer is torch.optim.SGD else "exp_avg"
        super().__init__(params, base_optimizer, dict(rho=rho), backend=backend,
                         perturb_eps=perturb_eps, check_finite=check_finite, **base_kwargs)
        for group in self.param_groups:
            self._check_base_group(group)

    def _check_base_group(self, group: dict) -> None:
        if self._key == "momentum_buffer" and group.get("momentum", 0) == 0:
            raise ValueError(
                "MSAM with torch.optim.SGD needs momentum > 0 (it perturbs along the "
                "momentum buffer); got momentum=0"
            )

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "base_optimizer"):
            self._check_base_group(self.param_groups[-1])

    # -- the step ------------------------------------------------------------------------
    def first_step(self, *args, **kwargs):
        raise RuntimeError("MSAM takes one gradient per step: call step() after backward()")

    def second_step(self, *args, **kwargs):
        raise RuntimeError("MSAM takes one gradient per step: call step() after backward()")

    @torch.no_grad()
    def step(self, closure=None):
        """One MSAM step from the gradients in ``p.grad`` (taken at ``w~``, where the model
        is). ``closure`` (forward + backward, returns the loss), when given, replaces them:
        the gradients are zeroed, the closure runs at ``w~``, and its loss is returned (the
        same convention as :meth:`SharpnessAware.step`). ``GradScaler.step(opt)`` works as
        with any torch optimizer (it unscales through the shared ``param_groups``)."""
        if self._msam.at_w:
            raise RuntimeError("MSAM.step() called inside at_w(): the model holds w there, "
                               "but the gradient must be taken at w~; step after the block")
        loss = None
        if closure is not None:
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
        buckets = self._gather()
        if self.check_finite:
            self._gradients_ok(buckets, None, record=False, when="the step")
        self._opt_called = self.base_optimizer._opt_called = True
        self._move_back_without_grad(buckets)
        if all(b.group["rho"] == 0 for b in buckets) and not self._msam.back:
            # rho = 0: the base optimizer's step and nothing else (no norm, no perturbation).
            self._restore_and_update(buckets, restore=False)
            return loss
        kind = self._fusable()
        if kind is not None and all(b.ops.fuses_base_update for b in buckets):
            parts = [(b.reduce_over, s) for b in buckets for s in self._fused(b, kind)]
            norm = self._reduce(parts).sqrt()
        else:
            self._move_back(buckets)
            self.base_optimizer.step()
            norm = self._norm(buckets, self._momentum)
        self._msam.back = {}
        self._perturb(buckets, norm)
        return loss

    def _momentum(self, b: Bucket) -> List[Tensor]:
        """The (local shards of the) momentum ``m`` of bucket ``b``'s parameters."""
        state = self.base_optimizer.state
        return b.local([state[p][self._key] for p in b.sources])

    def _move_back_without_grad(self, buckets: List[Bucket]) -> None:
        """Parameters that hold ``w~`` but have no gradient in this step go back to ``w``
        and stay there (torch.optim skips them; the new norm is over the updated ones)."""
        if not self._msam.back:
            return
        stepped = {id(p) for b in buckets for p in b.sources}
        left = [p for k, (p, _) in self._msam.back.items() if k not in stepped]
        if not left:
            return
        for b in self._buckets_of(left):
            self._move(b, +1)
            for p in b.sources:
                del self._msam.back[id(p)]

    def _buckets_of(self, params: List[Tensor]) -> List[Bucket]:
        """Buckets (per group, device, dtype, sharding) of ``params``."""
        wanted = set(map(id, params))
        out: List[Bucket] = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in wanted]
            if ps:
                out.extend(self._buckets_unchecked(group, ps))
        return out

    def _buckets_unchecked(self, group: dict, params: List[Tensor]) -> List[Bucket]:
        # Parameters without a gradient: _buckets would look at their (absent) gradients.
        # Only the move along m runs on them; a parameter that is not contiguous takes the
        # foreach backend, which indexes any layout.
        from ._plan import DTensor, _local, _reduce_groups
        from .backends import resolve
        by_key: Dict[tuple, List[Tensor]] = {}
        for p in params:
            ops = self._ops_for(p.device)
            if not _local(p).is_contiguous():
                ops = resolve("foreach", p.device)
            key = (ops, p.device, p.dtype)
            if isinstance(p, DTensor):
                key += (_reduce_groups(p),)
            by_key.setdefault(key, []).append(p)
        return [Bucket(k[0], ps, group, *k[3:]) for k, ps in by_key.items()]

    def _move(self, b: Bucket, sign: int) -> None:
        """``w ← w + sign · s · m`` for the parameters of ``b`` that hold ``w~``, per scale."""
        by_scale: Dict[int, tuple] = {}
        for p in b.sources:
            entry = self._msam.back.get(id(p))
            if entry is not None:
                by_scale.setdefault(id(entry[1]), (entry[1], []))[1].append(p)
        state = self.base_optimizer.state
        for s, ps in by_scale.values():
            coef = self._on(s if sign > 0 else -s, b.device)
            m = b.local([state[p][self._key] for p in ps])
            b.ops.lincomb(b.local(ps), [b.local(ps), m], [1.0, coef])

    def _move_back(self, buckets: List[Bucket]) -> None:
        for b in buckets:
            self._move(b, +1)

    def _perturb(self, buckets: List[Bucket], norm: Tensor) -> None:
        """``w~ ← w − s · m`` with ``s = rho / (‖m‖ + eps)``, per group; records ``s``."""
        denom = norm + self.perturb_eps
        scales: Dict[int, Tensor] = {}
        for b in buckets:
            rho = b.group["rho"]
            if rho == 0:
                continue
            key = id(b.group)
            if key not in scales:
                scales[key] = self._on(rho, denom.device) / denom
            s = scales[key]
            coef = self._on(-s, b.device)
            b.ops.lincomb(b.params, [b.params, self._momentum(b)], [1.0, coef])
            self._msam.back.update({id(p): (p, s) for p in b.sources})

    # -- the fused pass --------------------------------------------------------------------
    def _split(self, b: Bucket, init: Optional[List[int]] = None):
        """Index lists of ``b``'s parameters that share a move back (a scale or None)."""
        get = self._msam.back.get
        entries = [get(id(p)) for p in b.sources]
        if entries and not init:
            # The common case: every parameter moved back by the same scale, or none is.
            s0 = None if entries[0] is None else entries[0][1]
            if (all(e is None for e in entries) if s0 is None
                    else all(e is not None and e[1] is s0 for e in entries)):
                return [(s0, list(range(len(entries))))]
        out: Dict[int, tuple] = {}
        for i, e in enumerate(entries):
            if init and i in init:
                continue
            s = None if e is None else e[1]
            out.setdefault(id(s) if s is not None else 0, (s, []))[1].append(i)
        return list(out.values())

    def _fused(self, b: Bucket, kind: str) -> List[Tensor]:
        """The move back and the base update of bucket ``b`` in one pass per sub-list;
        returns the partial sums of ``‖m‖²`` of the updated momentum."""
        return self._fused_sgd(b) if kind == "sgd" else self._fused_adam(b)

    def _fused_sgd(self, b: Bucket) -> List[Tensor]:
        group, state = b.group, self.base_optimizer.state
        kw = dict(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                  dampening=group["dampening"], nesterov=group["nesterov"],
                  maximize=group["maximize"])
        pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
        parts = []
        # Parameters without a momentum buffer (first step) take buf = d, as torch.optim.SGD
        # does; they were never perturbed, so there is nothing to move back.
        new = [i for i, p in enumerate(b.sources) if state[p].get("momentum_buffer") is None]
        for i in new:
            state[b.sources[i]]["momentum_buffer"] = torch.empty_like(b.sources[i])
        if len(new) < len(b.sources) and self._relayout_due(b, "momentum_buffer"):
            for p in b.sources:
                if state[p].get("momentum_buffer") is not None:
                    _relaid(state[p], ("momentum_buffer",), p)
        grads = b.grads
        if new:
            ps = pick(b.sources, new)
            parts.append(b.ops.msam_sgd(
                b.local(ps), pick(grads, new), b.local([state[p]["momentum_buffer"] for p in ps]),
                None, init_buffers=True, **kw))
        for s, idx in self._split(b, set(new)):
            ps = pick(b.sources, idx)
            parts.append(b.ops.msam_sgd(
                b.local(ps), pick(grads, idx), b.local([state[p]["momentum_buffer"] for p in ps]),
                None if s is None else self._on(s, b.device), init_buffers=False, **kw))
        return parts

    def _fused_adam(self, b: Bucket) -> List[Tensor]:
        group = b.group
        amsgrad = group["amsgrad"]
        (steps, *moments), _ = self._adam_state(b)
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay",
                              type(self.base_optimizer) is torch.optim.AdamW)
        grads = b.grads
        parts = []
        # One call per (step count, move back): step counts differ only when parameters
        # joined at different times; the counters live on the host, as torch.optim's do.
        for s, idx in self._split(b):
            by_step: Dict[float, List[int]] = {}
            for i in idx:
                by_step.setdefault(float(steps[i]), []).append(i)
            for step, ids in by_step.items():
                parts.append(b.ops.msam_adam(
                    b.local([b.sources[i] for i in ids]), [grads[i] for i in ids],
                    [moments[0][i] for i in ids], [moments[1][i] for i in ids],
                    [moments[2][i] for i in ids] if amsgrad else [],
                    None if s is None else self._on(s, b.device),
                    step=int(step), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], decoupled=decoupled, amsgrad=amsgrad,
                    maximize=group["maximize"]))
        return parts

    # -- evaluation at w ---------------------------------------------------------------------
    @contextlib.contextmanager
    def at_w(self):
        """Put the model at ``w`` (``w~ + s · m``) for the block and back at ``w~`` after it,
        bit for bit: a copy of the perturbed weights is held while the block runs (one
        tensor per perturbed parameter, freed at exit). Do not change the weights inside."""
        if self._msam.at_w:
            raise RuntimeError("MSAM.at_w() is already active (it does not nest)")
        params = [p for p, _ in self._msam.back.values()]
        buckets = self._buckets_of(params)
        with torch.no_grad():
            copies = {p: p.detach().clone(memory_format=torch.contiguous_format)
                      for p in params}
            for b in buckets:
                self._move(b, +1)
        self._msam.at_w = True
        try:
            yield self
        finally:
            self._msam.at_w = False
            with torch.no_grad():
                for p, c in copies.items():
                    p.copy_(c)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """As the other wrappers', plus ``sd["sharpopt"]["msam"]``: the parameters (by
        their index in ``state``'s numbering) that hold ``w~`` and the scale ``s`` of each.
        Inside :meth:`at_w` the model holds ``w``, and the entry says so (nothing perturbed)."""
        sd = super().state_dict()
        index = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(p, len(index))
        scales: List[Tensor] = []
        slot: Dict[int, int] = {}
        perturbed = {}
        if not self._msam.at_w:
            for p, s in self._msam.back.values():
                if id(s) not in slot:
                    slot[id(s)] = len(scales)
                    scales.append(s.detach().clone())
                perturbed[index[p]] = slot[id(s)]
        sd["sharpopt"]["msam"] = {"perturbed": perturbed, "scales": scales}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if self._msam.at_w:
            raise RuntimeError("MSAM.load_state_dict() called inside at_w()")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._check_base_group(group)
        entry = state_dict.get("sharpopt", {}).get("msam", {"perturbed": {}, "scales": []})
        params = [p for group in self.param_groups for p in group["params"]]
        scales = [self._on(s.detach().clone(), self._primary) for s in entry["scales"]]
        self._msam.back = {id(params[int(i)]): (params[int(i)], scales[int(k)])
                           for i, k in entry["perturbed"].items()}
