"""Inf/NaN gradients and loss scaling, for :class:`sharpopt._core.SharpnessAware`.

Two ways to keep an inf/NaN out of the weights and the optimizer state:

* **The separate check** (``_gradients_ok``): one pass over the gradients per step pass
  (``torch._amp_foreach_non_finite_check_and_unscale_``, which also unscales with a
  ``GradScaler``) and one host read; a non-finite gradient skips the step with a scaler
  and raises ``FloatingPointError`` without one, before anything is written.
* **The guard** (``_guard_*``), the default where it applies (``check_finite`` without a
  scaler; SAM/ASAM/GCSAM's first pass, whose norm says it; the fused SGD/Adam update of
  any algorithm whose descent is plain, on a backend with ``Ops.guards_nonfinite``): no
  pass of its own. The first pass reads the verdict from the norm the ascent computes
  anyway; the update keeps each element whose gradient is not finite as it was and sets
  a device flag (``Ops.restore_sgd``). On the CPU the flags are read at once and the call
  raises; on a GPU nothing waits for them: each step's copy is queued, and a later
  ``first_step`` raises once it has arrived (none is lost while the host runs ahead);
  ``nonfinite_steps`` counts them (a step replayed from a CUDA graph too).
* **The device check** (``_guards_base``), for a base optimizer sharpopt does not merge
  but torch runs fused (``fused=True`` SGD/Adam/AdamW, and ``capturable=True`` Adam/AdamW,
  which then runs torch's fused kernel): one device pass over the second pass's gradients
  into the skip flag, handed to torch's step as its ``found_inf`` (the GradScaler
  protocol), which skips the whole step; reported as the guard's.

The mixin reads the protocol's record ``self._run`` (``_core._StepState``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from . import _plan
from ._host import advance_steps
from ._plan import Bucket

#: Base optimizers whose ``fused=True`` step honours ``found_inf`` (see ``_guards_base``).
_TORCH_FUSED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
#: Base optimizers whose ``capturable=True`` groups are stepped by their fused kernel under
#: the device check (see ``_fused_capturable``).
_TORCH_CAPTURABLE = (torch.optim.Adam, torch.optim.AdamW)


def _reads_now(devices) -> bool:
    """Whether the guard's flags on ``devices`` are read at once: on the CPU a read costs
    no synchronisation; a GPU's are copied out and read by a later call."""
    return all(torch.device(d).type == "cpu" for d in devices)


class _Arrived:
    """The event of a copy that was made synchronously (CPU flags)."""

    @staticmethod
    def query() -> bool:
        return True


def _copy_to_host(flags: List[Tensor]):
    """(host copy, event): the flags copied without waiting for them, and an event whose
    ``query()`` says when the copy has arrived."""
    cuda = any(f.is_cuda for f in flags)
    host = torch.empty((len(flags), 2), dtype=torch.float32, pin_memory=cuda)
    for i, f in enumerate(flags):
        host[i].copy_(f, non_blocking=cuda)
    if not cuda:
        return host, _Arrived()
    event = torch.cuda.Event()
    event.record()
    return host, event


class _FiniteChecks:
    """The separate inf/NaN check, the guard, and the loss scaler's side of the protocol."""

    # -- non-finite gradients and loss scaling -------------------------------------------
    def _gradients_ok(self, buckets: List[Bucket], grad_scaler, *, record: bool,
                      when: str) -> bool:
        """Unscale the gradients (with a scaler) and look for inf/NaN.

        With an enabled ``grad_scaler``: returns False when a gradient is not finite (the
        caller skips the step). ``record`` means this is the pass whose check the scaler
        must see: it goes through ``grad_scaler.unscale_``, which may be called once per
        step; the other pass unscales with the same kernel on its own.
        Without a scaler and with ``check_finite``: raises ``FloatingPointError`` (the
        weights and state are left as they were). Both cost one read of the gradients and
        one host synchronisation; ``check_finite=False`` removes them.
        """
        if grad_scaler is not None and grad_scaler.is_enabled():
            if record:
                # A caller that unscaled already (to clip between the passes) must not see
                # the gradients divided twice: its unscale_ recorded the inf check.
                state = self._unscaled_by_caller(grad_scaler)
                if state is None:
                    grad_scaler.unscale_(self.base_optimizer)
                    state = grad_scaler._per_optimizer_states[id(self.base_optimizer)]
                found = self._total(v.reshape(()) for v in state["found_inf_per_device"].values())
                return not bool(found.item())
            if bool(self._nonfinite(buckets, self._inv_scale(grad_scaler)).item()):
                # The step is skipped: let the scaler see the inf so update() backs off.
                grad_scaler.unscale_(self.base_optimizer)
                return False
            return True
        if self.check_finite and _plan._capturing():
            raise RuntimeError(self._capture_message())
        if self.check_finite and bool(self._nonfinite(buckets, None).item()):
            raise FloatingPointError(self._nonfinite_message(when))
        return True

    # -- the non-finite guard and the device check (see the module docstring) -------------
    def _guard_flags(self, buckets: List[Bucket]) -> Dict[torch.device, Tensor]:
        """The per-device flags ``[skip, found]`` of this step, zeroed at its first use
        (unless the last step read them on the host and found them zero)."""
        flags = self._run.flags
        fresh = self._run.flags_fresh
        self._run.reported = False
        for b in buckets:
            if b.device not in flags:
                flags[b.device] = torch.zeros(2, dtype=torch.float32, device=b.device)
        if not fresh:
            if not self._run.clean:
                for f in flags.values():
                    f.zero_()
            self._run.clean = False
        self._run.flags_fresh = True
        return flags

    def _host_scalars(self, buckets: List[Bucket]) -> bool:
        """Whether this step's scalars (a norm, the perturbation's scale) are worked out as
        Python floats: every bucket on the CPU, where reading a value costs no
        synchronisation, none sharded, and not while torch.compile traces or a CUDA graph
        captures (where the tensor path refuses a host read). Each torch
        operation on a 0-dim tensor costs microseconds, tens of them with the caches a
        backward pass or a pass over a thousand tensors leaves, and a step made about ten.
        The values are torch's: each operation is rounded to the dtype torch computes it in
        (see ``_plan._f32``); the square root is correctly rounded (torch's is on most CPUs,
        see ``backends.reference.sqrt_rn``)."""
        return not torch.compiler.is_compiling() and not _plan._capturing() and \
            _reads_now([b.device for b in buckets]) and not any(b.sharded for b in buckets)

    def _guard_norm(self, norm: Tensor, buckets: List[Bucket]
                    ) -> Optional[Dict[torch.device, Tensor]]:
        """The first pass's verdict from the ascent's norm (``self._run.by_norm``): raises
        FloatingPointError before anything is written where reading the norm costs no
        synchronisation (CPU) or the backend has no guard; otherwise marks the step skipped
        on the device (``flags[0]``) and returns the flags for ``perturb``."""
        if not self._run.by_norm:
            return None
        if _reads_now([norm.device]) or not all(b.ops.guards_nonfinite for b in buckets):
            if _plan._capturing():
                raise RuntimeError(self._capture_message())
            if not math.isfinite(norm.item()):
                raise FloatingPointError(self._nonfinite_message("the first pass"))
            return None
        flags = self._guard_flags(buckets)
        bad = torch.isfinite(norm).logical_not().to(torch.float32).reshape(1)
        for device, f in flags.items():
            f[:1].copy_(bad.to(device, non_blocking=True))
        self._run.armed = True       # the update must honour the skip (see _second)
        return flags

    def _may_guard_second(self, grad_scaler) -> bool:
        """Whether the second pass's check may leave the separate pass at all: the default
        check without a scaler (whose own unscale is the check), a descent that only feeds
        the update, and no clipping (whose norm would spread one inf over every element)."""
        if not self.check_finite or (grad_scaler is not None and grad_scaler.is_enabled()):
            return False
        return self._guarded_descent and self.max_grad_norm is None

    def _guards_update(self, buckets: List[Bucket], grad_scaler) -> bool:
        """Whether the second pass's inf/NaN check can be left to the fused update."""
        return self._may_guard_second(grad_scaler) and self._fusable() is not None and all(
            b.ops.guards_nonfinite and not b.sharded for b in buckets)

    def _guards_base(self, buckets: List[Bucket], grad_scaler) -> bool:
        """Whether the second pass's check can run on the device and be handed to the base
        optimizer's own step: torch's ``fused=True`` SGD/Adam/AdamW, which skip a whole
        step on a ``found_inf`` flag (as a GradScaler hands it) and take their step counts
        back on the device, so no host read is needed (and the step can be captured).
        Adam/AdamW groups with ``capturable=True`` qualify too (see ``_fused_capturable``)."""
        return self._may_guard_second(grad_scaler) and \
            type(self.base_optimizer) in _TORCH_FUSED and \
            all(g.get("fused") or self._fused_capturable(g) for g in self.param_groups) and \
            not any(b.sharded for b in buckets)

    def _fused_capturable(self, group: dict) -> bool:
        """Whether a ``capturable=True`` Adam/AdamW group (not fused) takes its guarded step
        from torch's fused Adam kernel. torch's capturable step, the one that can be
        captured in a CUDA graph, takes no ``found_inf``, so the default check would need a
        host read; the fused kernel is the same Adam update (its roundings may differ from
        the capturable one's in the last bit), keeps the step count on the device as
        well, and skips on the flag. Its step counters must then be float32, which is what
        torch makes them unless float64 is the default dtype."""
        return type(self.base_optimizer) in _TORCH_CAPTURABLE and \
            bool(group.get("capturable")) and not group.get("fused") and \
            not group.get("differentiable") and torch.get_default_dtype() != torch.float64

    def _check_on_device(self, buckets: List[Bucket]) -> Tensor:
        """The second pass's inf/NaN check as one device pass per device, into the skip
        flag (``flags[0]``, where the first pass's verdict may already be); returns the
        flag for the base optimizer's ``found_inf``."""
        flags = self._guard_flags(buckets)
        by_device: Dict[torch.device, List[Tensor]] = {}
        for b in buckets:
            by_device.setdefault(b.device, []).extend(b.grads)
        for device, grads in by_device.items():
            one = self._run.ones.get(device)
            if one is None:
                one = self._run.ones[device] = torch.ones(1, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, flags[device][0], one)
        views = [f[0] for f in flags.values()]     # 0-dim, as a GradScaler's found_inf
        if len(views) == 1:
            return views[0]
        first = views[0].device
        return torch.stack([v.to(first) for v in views]).amax(0)

    def _guard_report(self) -> None:
        """After a guarded step: raise now (CPU) or queue a copy of the flags for a later
        ``first_step`` to read (GPU)."""
        flags, self._run.flags_fresh, self._run.armed = self._run.flags, False, False
        if self._run.reported:
            return
        self._run.reported = True
        advanced, self._run.advanced = self._run.advanced, []
        if _reads_now(list(flags)):
            rows = [f.tolist() for f in flags.values()]
            self._run.clean = not any(x != 0 for row in rows for x in row)
            if not self._run.clean:
                self._nonfinite_steps += 1
            self._guard_raise(rows, advanced, "this step")
            return
        for device, f in flags.items():   # device ops only: a captured step counts too
            count = self._run.counts.get(device)
            if count is None:
                count = self._run.counts[device] = torch.zeros((), dtype=torch.float32,
                                                              device=device)
            count.add_(f.amax().clamp(max=1.0))
        if not _plan._capturing():
            self._run.pending.append((*_copy_to_host(list(flags.values())), advanced,
                                      self._run.calls))

    @property
    def nonfinite_steps(self) -> int:
        """Steps in which the non-finite guard found an inf/NaN gradient (on the CPU each
        also raised FloatingPointError; on a GPU the count includes steps replayed from a
        CUDA graph, where nothing can raise). Reading it synchronises with the device."""
        return self._nonfinite_steps + int(sum(float(c) for c in self._run.counts.values()))

    def _guard_pending(self) -> None:
        """Read the guarded GPU steps whose flags have arrived (no wait), oldest first, and
        raise for the first that found inf/NaN. A step whose copy has not arrived yet stays
        queued (the host may run several steps ahead of the device), so none is lost."""
        pending = self._run.pending
        while pending and not _plan._capturing() and pending[0][1].query():
            host, _, advanced, step = pending.pop(0)
            self._guard_raise(host.tolist(), advanced, f"step {step} (a previous step)")

    def _guard_raise(self, rows: List[List[float]], advanced: List[List[Tensor]],
                     which: str) -> None:
        """FloatingPointError when the flags ``rows`` (``[skip, found]`` per device) say so.
        A step that kept any element does not count for Adam: its step counters go back by
        one (a step whose every gradient was inf/NaN thus leaves the state as it was)."""
        skipped = any(row[0] != 0 for row in rows)
        kept = any(row[1] != 0 for row in rows)
        if skipped or kept:
            for steps in advanced:
                advance_steps(steps, -1)
        if skipped:
            raise FloatingPointError(
                f"{type(self).__name__}: a gradient of {which} contained inf or NaN; that "
                "step was skipped (the weights and optimizer state are as they were before "
                "it). Use a torch.amp.GradScaler (grad_scaler=) to skip such steps quietly, "
                "or fix the loss.")
        if kept:
            raise FloatingPointError(
                f"{type(self).__name__}: a gradient in the second pass of {which} contained "
                "inf or NaN; the elements of the weights and optimizer state whose gradient "
                "was not finite were left as they were, the others took the step (Adam's step "
                "count did not advance). Use a torch.amp.GradScaler (grad_scaler=) to skip "
                "such steps whole, or fix the loss.")

    def _capture_message(self) -> str:
        return (f"{type(self).__name__}: this step's inf/NaN check reads a flag back to the "
                "host, which a CUDA graph capture cannot do. The check runs inside the "
                "kernels (no host read) for SAM/ASAM/GCSAM with an SGD base (or an "
                "Adam/AdamW one with fused=True or capturable=True) on the cuda and triton "
                "backends; elsewhere build the "
                "optimizer with check_finite=False to capture its step (and check the loss "
                "yourself)")

    def _nonfinite_message(self, when: str) -> str:
        return (f"{type(self).__name__}: a gradient in {when} contains inf or NaN; the "
                "weights and optimizer state were left as they were. Use a "
                "torch.amp.GradScaler (grad_scaler=) to skip such steps, or fix the loss.")

    def _unscaled_by_caller(self, grad_scaler) -> Optional[dict]:
        """The scaler's record for this optimizer (or its base) when ``unscale_`` was
        already called on it in this iteration, else None."""
        for opt in (self, self.base_optimizer):
            state = grad_scaler._per_optimizer_states.get(id(opt))
            if state is not None and state["stage"] is OptState.UNSCALED:
                return state
        return None

    def _amp_ok(self, buckets: List[Bucket], grad_scale, found_inf) -> bool:
        """``GradScaler.step``'s verdict: False (skip) when it found inf/NaN; otherwise
        the gradients are unscaled by ``1 / grad_scale`` here unless the caller already did
        (``grad_scale`` None). One host read, as the scaler's own skip decision."""
        if bool(torch.as_tensor(found_inf).sum().item()):
            return False
        if grad_scale is not None:
            inv = grad_scale.double().reciprocal().float()
            for b in buckets:
                self._lincomb(b, b.grads, [(inv, b.grads)])
        return True

    @staticmethod
    def _inv_scale(grad_scaler) -> Tensor:
        """``1 / scale`` of a ``GradScaler`` as an fp32 device tensor (computed in fp64, as
        the scaler's own unscale does)."""
        return grad_scaler._scale.double().reciprocal().float()

    def _nonfinite(self, buckets: List[Bucket], inv_scale: Optional[Tensor]) -> Tensor:
        """Count of devices with a non-finite gradient, over every rank that holds a shard
        of them (so all ranks skip or raise together); multiplies grads by ``inv_scale``."""
        by_key: Dict[tuple, List[Tensor]] = {}
        for b in buckets:
            by_key.setdefault((b.device, b.reduce_over), []).extend(b.grads)
        parts = []
        for (device, reduce_over), grads in by_key.items():
            found = torch.zeros(1, dtype=torch.float32, device=device)
            inv = torch.ones(1, dtype=torch.float32, device=device) if inv_scale is None \
                else inv_scale.to(device).reshape(1)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
            parts.append((reduce_over, found.reshape(())))
        return self._reduce(parts)
