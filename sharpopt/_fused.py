"""The restore merged with a recognised base update (SGD, Adam, AdamW), or the generic
"restore, then ``base.step()``" path; and ``max_grad_norm`` clipping before it.

A mixin of :class:`sharpopt._core.SharpnessAware`: it reads ``self.base_optimizer``, the
buckets of the step plan and the protocol's record of late gradients (``self._run``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _plan
from ._host import advance_steps
from ._plan import Bucket, _relaid


#: The base optimizers whose update the fused backends merge with the restore.
_FUSED_KIND = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}


class _FusedUpdate:
    """``_restore_and_update`` and the fused SGD / Adam paths behind it."""

    def _fusable(self) -> Optional[str]:
        """'sgd' or 'adam' when the base optimizer's update can be merged, else None. The
        base optimizer's class is looked up once; the groups' options (which a user or a
        scheduler may change between steps) are read every step, a few per group."""
        kind = self.__dict__.get("_fused_kind", False)
        if kind is False:
            kind = self._fused_kind = _FUSED_KIND.get(type(self.base_optimizer))
        if kind is None:
            return None
        for group in self.param_groups:
            if group.get("differentiable") or group.get("capturable") or group.get("fused"):
                return None
            for key in ("lr", "betas", "weight_decay", "momentum"):
                value = group.get(key)
                values = value if isinstance(value, tuple) else (value,)
                if any(isinstance(v, Tensor) for v in values):
                    return None
        return kind

    def _restore_and_update(self, buckets: List[Bucket], *, restore: bool = True,
                            directions: Optional[Callable[[Bucket], List[Tensor]]] = None
                            ) -> None:
        """``w ← saved`` (when ``restore``) and ``Base.step(d)``; ``d`` is ``p.grad``
        unless ``directions`` gives other tensors; clipped first with ``max_grad_norm``."""
        # An LR scheduler on either object warns unless it sees an optimizer step; the
        # fused path never calls step(), so say that one happened.
        self._opt_called = self.base_optimizer._opt_called = True
        # Parameters whose gradient appeared only in the second pass take a plain step on
        # it (see _late); base.step() below covers them by itself.
        late, self._run.late = self._run.late, []
        if self.max_grad_norm is not None:
            # One global norm over every direction handed to the base optimizer, the late
            # parameters' own gradients included (clip_grad_norm_ over all of them).
            d_of = directions or (lambda b: b.grads)
            late_ids = {id(b) for b in late}
            self._clip(buckets + late, lambda b: b.grads if id(b) in late_ids else d_of(b))
            directions = None      # the clipped direction is in p.grad now
        kind = self._fusable()
        if kind is None or not all(b.ops.fuses_base_update for b in buckets + late):
            for b in buckets:
                if restore:
                    self._restore(b)
                if directions is not None:
                    for g, d in zip(b.grads, directions(b)):
                        if d is not g:
                            g.copy_(d)
            self._base_step()
            return
        if kind == "adam" and _plan._capturing():
            # The fused Adam reads the step count on the host and bakes the bias
            # corrections into the launch: a replayed graph would repeat step t forever.
            if restore:
                for b in buckets:
                    self._restore(b)
            raise RuntimeError(
                f"{type(self).__name__}: the fused Adam/AdamW update cannot be captured in a "
                "CUDA graph with capturable=False (its step count lives on the host, so every "
                "replay would repeat the same bias correction). Pass capturable=True to the "
                "base optimizer for CUDA-graph capture; the weights were restored to w."
            )
        for b in buckets:
            saved = self._buffers("saved", b.sources) if restore else None
            d = directions(b) if directions is not None else b.grads
            if kind == "sgd":
                self._sgd(b, saved, d)
            else:
                self._adam(b, saved, d)
        for b in late:
            (self._sgd if kind == "sgd" else self._adam)(b, None, b.grads)

    def _base_step(self) -> None:
        """``base_optimizer.step()``; under the device check, ``capturable=True`` Adam/AdamW
        groups run it as ``fused=True`` for this call (see ``_fused_capturable``), so that
        the check's ``found_inf`` is honoured."""
        groups = [(g, g.get("fused")) for g in self.param_groups
                  if self._fused_capturable(g)] if self._run.base_checked else []
        for g, _ in groups:
            g["fused"] = True
        try:
            self.base_optimizer.step()
        finally:
            for g, fused in groups:
                g["fused"] = fused

    def _clip(self, buckets: List[Bucket], directions: Callable[[Bucket], List[Tensor]]) -> None:
        """``p.grad ← d · min(1, max_grad_norm / (‖d‖ + 1e-6))``, ``‖d‖`` global, as
        ``torch.nn.utils.clip_grad_norm_`` (which also multiplies when the factor is 1).
        ``d`` itself is left alone when it is another buffer (WSAM reads its ``g`` again).

        One norm pass (read ``d``) and one scaling pass (read ``d``, write ``p.grad``), the
        factor kept on the device. The scaling is not merged into the base update because
        the unmerged path (``reference``, or any base optimizer other than SGD/Adam/AdamW)
        hands ``p.grad`` to ``Base.step``, which must then see the clipped values.
        """
        norm = self._norm(buckets, directions)
        coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for b in buckets:
            self._lincomb(b, b.grads, [(coef, directions(b))])

    def _guard_kw(self, b: Bucket) -> dict:
        """``found_inf=`` for the update of bucket ``b`` when the step is guarded (see
        ``SharpnessAware._guard_flags``), else nothing."""
        guard = self._run.guard
        return {} if guard is None else {"found_inf": guard[b.device]}

    def _state_lists(self, b: Bucket, keys: Sequence[str]) -> Optional[List[list]]:
        """The base optimizer's state entries ``keys`` of bucket ``b``'s parameters, one list
        per key (local shards), or None while some entry is missing.

        Kept with the plan, so a step does not look every parameter up again, while the
        state dict is the same object of the same size (``load_state_dict``,
        ``add_param_group`` and a new plan drop it; ``state.clear()`` or a replaced state
        dict are seen). State tensors are updated in place, never replaced, by the fused
        passes and by torch.optim; code that swaps one by hand must drop the plan
        (``opt._plan = None``)."""
        state = self.base_optimizer.state
        derived = b.sources.derived
        hit = derived.pop(("state", *keys), None)
        # The dict itself is held (not its id, which a new dict could reuse), with its size
        # and the first entry: a cleared, replaced or refilled state is seen.
        if hit is not None and hit[0] is state and hit[1] == len(state) and \
                state.get(b.sources[0], {}).get(keys[0]) is hit[3]:
            derived[("state", *keys)] = hit
            return hit[2]
        lists = []
        for key in keys:
            values = []
            for p in b.sources:
                st = state.get(p)
                value = None if st is None else st.get(key)
                if value is None:
                    return None
                values.append(value)
            lists.append(b.local(values))
        derived[("state", *keys)] = (state, len(state), lists, state[b.sources[0]][keys[0]])
        return lists

    def _sgd(self, b: Bucket, saved, d) -> None:
        group, state = b.group, self.base_optimizer.state
        kw = dict(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                  dampening=group["dampening"], nesterov=group["nesterov"],
                  maximize=group["maximize"], **self._guard_kw(b))
        if group["momentum"] == 0:
            b.ops.restore_sgd(b.params, saved, d, [], init_buffers=False, **kw)
            return
        if self._laid_out(b, "momentum_buffer"):
            cached = self._state_lists(b, ("momentum_buffer",))
            if cached is not None:                     # every step after the first
                b.ops.restore_sgd(b.params, saved, d, cached[0], init_buffers=False, **kw)
                return
        # Parameters that have no momentum buffer yet (first step, or a group added
        # later) take buf = d, as torch.optim.SGD does; the others the running average.
        states = [state[p] for p in b.sources]
        bufs = [st.get("momentum_buffer") for st in states]
        fresh = [i for i, m in enumerate(bufs) if m is None]
        if not fresh:                                  # every step after the first
            if self._relayout_due(b, "momentum_buffer"):
                for st, p in zip(states, b.sources):
                    _relaid(st, ("momentum_buffer",), p)
                bufs = [st["momentum_buffer"] for st in states]
            b.ops.restore_sgd(b.params, saved, d, b.local(bufs), init_buffers=False, **kw)
            return
        for init in (False, True):
            idx = [i for i, m in enumerate(bufs) if (m is None) == init]
            if not idx:
                continue
            ps = [b.sources[i] for i in idx]
            if init:
                for p in ps:
                    state[p]["momentum_buffer"] = torch.empty_like(p)
            elif b.ops.requires_dense and not b.sharded:
                for p in ps:
                    _relaid(state[p], ("momentum_buffer",), p)
            b.ops.restore_sgd(
                b.local(ps), None if saved is None else [saved[i] for i in idx],
                [d[i] for i in idx], b.local([state[p]["momentum_buffer"] for p in ps]),
                init_buffers=init, **kw,
            )

    @staticmethod
    def _laid_out(b: Bucket, key: str) -> bool:
        """Whether state ``key`` of bucket ``b`` needs no layout check (any more) in this
        plan: done already, or a backend that does not walk memory, or shards."""
        return key in b.laid_out or not b.ops.requires_dense or b.sharded

    @classmethod
    def _relayout_due(cls, b: Bucket, key: str) -> bool:
        """Whether state ``key`` of bucket ``b`` must still be checked against the
        parameters' layout (:func:`_relaid`), and marks it done: once per plan, for the
        backends that walk memory; state made later is made in the parameter's layout."""
        if cls._laid_out(b, key):
            return False
        b.laid_out.add(key)
        return True

    def _adam_state(self, b: Bucket) -> Tuple[List[list], Optional[Tuple[float, float]]]:
        """Bucket ``b``'s Adam state as lists ``[step, exp_avg, exp_avg_sq(, max_exp_avg_sq)]``
        with the step counters advanced by one, after creating the state where it is
        missing (zeros, as torch.optim.Adam does) and giving the moments the parameters'
        layout once per plan (see :func:`_relaid`); and the lowest and highest new count
        where :func:`advance_steps` knows them."""
        state, amsgrad = self.base_optimizer.state, b.group["amsgrad"]
        moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
        lists = self._state_lists(b, ("step", *moments)) if self._laid_out(b, "adam") else None
        if lists is None:
            for p in b.sources:
                st = state[p]
                if len(st) == 0:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for key in moments:
                        st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self._relayout_due(b, "adam"):
                for p in b.sources:
                    _relaid(state[p], moments, p)
            lists = self._state_lists(b, ("step", *moments))
        span = advance_steps(lists[0], 1)
        if self._run.guard is not None:
            self._run.advanced.append(lists[0])   # taken back if the guard kept an element
        return lists, span

    def _adam(self, b: Bucket, saved, d) -> None:
        group = b.group
        amsgrad = group["amsgrad"]
        (steps, *lists), span = self._adam_state(b)
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", type(self.base_optimizer) is torch.optim.AdamW)
        kw = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                  weight_decay=group["weight_decay"], decoupled=decoupled, amsgrad=amsgrad,
                  maximize=group["maximize"], **self._guard_kw(b))
        if span is not None and span[0] == span[1]:   # one count for all: the common case
            b.ops.restore_adam(b.params, saved, d, lists[0], lists[1],
                               lists[2] if amsgrad else [], step=int(span[0]), **kw)
            return
        # Step counts differ only when parameters joined at different times; the counters
        # live on the host (as torch.optim keeps them), so reading them costs no sync.
        by_step: Dict[float, List[int]] = {}
        for i, s in enumerate(steps):
            by_step.setdefault(float(s), []).append(i)
        for step, idx in by_step.items():
            b.ops.restore_adam(
                b.local([b.sources[i] for i in idx]),
                None if saved is None else [saved[i] for i in idx], [d[i] for i in idx],
                [lists[0][i] for i in idx], [lists[1][i] for i in idx],
                [lists[2][i] for i in idx] if amsgrad else [], step=int(step), **kw)
