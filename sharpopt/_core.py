"""The two-pass protocol shared by every sharpopt optimizer.

``SharpnessAware`` adds the base optimizer to the step plan (``_plan._Core``): the shared
``param_groups``, ``state_dict`` with the base state, the protocol (``first_step`` /
``second_step`` / ``step(closure)`` / a closure-less ``step()``), loss scaling and the
inf/NaN checks. The restore merged with the base update is ``_fused._FusedUpdate``.

Each algorithm module (``sam.py``, ``gsam.py``, ...) only says which passes to run.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from . import _plan
from ._fused import _FusedUpdate
from ._keywords import SortKeywords
from ._plan import Bucket, _check_positive, _Core

__all__ = ["SharpnessAware"]


class _StepState:
    """What the two-pass protocol carries from one call to the next.

    It lives in its own plain object rather than in attributes of the optimizer because
    ``torch.compile`` (torch 2.13) silently drops attribute writes made inside a compiled
    method of a ``torch.optim.Optimizer`` subclass, but keeps writes to a plain object's:
    a compiled ``first_step`` would otherwise leave no record of the perturbation.
    """

    def __init__(self):
        self.perturbed: Optional[List[Bucket]] = None   # buckets holding w + e, if any
        self.calls = 0                                    # completed first steps (every-k)
        self.inv_scale: Optional[Tensor] = None         # 1/loss scale folded into an ascent
        self.begun = 0              # first steps entered (step(closure) sees its closure's)
        self.done_early = False     # the last first step finished (or skipped) the update
        self.late: List[Bucket] = []                      # grads that appeared in pass 2


class _SkipStep(Exception):
    """Raised by an ascent that found the (scaled) gradient norm not finite, before it
    wrote anything: the step is skipped as a loss scaler expects."""


class SharpnessAware(_FusedUpdate, _Core, metaclass=SortKeywords):
    """Base class of the wrappers around a ``torch.optim`` base optimizer.

    Subclasses implement ``_ascent(buckets)`` (perturb the weights from the current
    gradients and say whether a second pass is needed) and may override
    ``_descent(buckets)`` (turn the gradients of the second pass into the base
    optimizer's direction) — see :class:`sharpopt.SAM` for the protocol.

    Keywords: the wrapper's own (``rho``, ``perturb_eps``, ``max_grad_norm``, ...) and the
    base optimizer's (``lr``, ``eps``, ...) are sorted by name; one that both take is
    refused until ``sam_kwargs=`` or ``base_kwargs=`` says whose it is (see
    ``sharpopt._keywords``).

    ``max_grad_norm``: the direction handed to the base optimizer, ``d``, is scaled by
    ``min(1, max_grad_norm / (‖d‖ + 1e-6))`` first, ``‖d‖`` one global norm over every
    parameter in the update (``torch.nn.utils.clip_grad_norm_``'s rule), after any loss
    scale is removed.
    """

    #: ``GradScaler.step(opt)`` calls ``step()`` itself even when it found inf/NaN, handing
    #: over ``grad_scale`` and ``found_inf``: a skipped step must still put ``w`` back.
    _step_supports_amp_scaling = True
    _keyword_meanings = {
        "rho": "perturbation radius", "perturb_eps": "epsilon of the perturbation norm",
        "backend": "backend name", "check_finite": "inf/NaN check switch",
        "max_grad_norm": "clipping norm of the descent direction",
    }

    #: Algorithms that need more than two gradient evaluations set this.
    closure_only = False
    #: True where the ascent reads the gradients only through ``g / ‖g‖``-like terms, so a
    #: loss scale can be folded into it (see ``_first``); the ascent must then honour
    #: ``self._run.inv_scale`` and raise ``_SkipStep`` on a non-finite norm.
    _scale_free_ascent = False

    def __init__(self, params, base_optimizer, defaults: dict, *, backend="auto",
                 perturb_eps=1e-12, check_finite=True, max_grad_norm=None, base_kwargs=None,
                 **kwargs):
        if isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be an optimizer class (e.g. torch.optim.SGD), not an "
                "instance; its keyword arguments go to the wrapper: "
                "SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)"
            )
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim class, got {base_optimizer!r}")
        if "rho" in defaults:
            _check_positive("rho", defaults["rho"])
        if max_grad_norm is not None:
            _check_positive("max_grad_norm", max_grad_norm, allow_zero=False)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._algo_defaults = dict(defaults)
        self._run = _StepState()
        self.check_finite = bool(check_finite)
        super().__init__(params, defaults, backend=backend, perturb_eps=perturb_eps)
        for group in self.param_groups:
            self._check_group(group)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs, **(base_kwargs or {}))
        # Share one list of groups so that LR schedulers on either object see the same lr.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _check_group(self, group: dict) -> None:
        if "rho" in group:
            _check_positive("rho", group["rho"])

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):
            return super().add_param_group(param_group)
        self._plan = None
        group = dict(param_group)
        for key, value in self._algo_defaults.items():
            group.setdefault(key, value)
        self._check_group(group)
        self.base_optimizer.add_param_group(group)
        for p in self.param_groups[-1]["params"]:
            self._ops_for(p.device)

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Wrapper state, the base optimizer's state (under ``"base_optimizer"``), counters.

        Refused between ``first_step`` and ``second_step``: the model then holds the
        perturbed weights ``w + e``, and a checkpoint of it would silently resume from them.
        """
        if self._run.perturbed is not None:
            raise RuntimeError(
                f"{type(self).__name__}.state_dict() called between first_step() and "
                "second_step(): the parameters are perturbed (w + e) right now. Save the "
                "checkpoint after second_step()."
            )
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd["sharpopt"] = {"calls": self._run.calls}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if "base_optimizer" not in state_dict:
            raise ValueError(
                "this state_dict has no 'base_optimizer' entry; it was not saved by a "
                "sharpopt optimizer (load the base optimizer's own state into .base_optimizer)"
            )
        if self._run.perturbed is not None:
            raise RuntimeError("load_state_dict() called between first_step() and second_step()")
        self._plan = None
        own = {k: v for k, v in state_dict.items() if k in ("state", "param_groups")}
        super().load_state_dict(own)
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups
        self._run.calls = int(state_dict.get("sharpopt", {}).get("calls", 0))

    # -- the two-pass protocol -----------------------------------------------------------
    @property
    def perturbed(self) -> bool:
        """True between a ``first_step`` that perturbed and the step's end: the model holds
        ``w + e`` (a closure uses it to freeze BatchNorm statistics on its second call)."""
        return self._run.perturbed is not None

    def _ascent(self, buckets: List[Bucket]) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _descent(self, buckets: List[Bucket]) -> None:
        """Turn the second pass's gradients into the direction and update. Default: SAM's
        ``Base.step(g_adv)`` after restoring ``w``."""
        self._restore_and_update(buckets)

    def _will_perturb(self) -> bool:
        """Whether this call's first step perturbs (False on the cheap steps of a variant)."""
        return True

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler=None) -> bool:
        """Ascent: perturb ``w`` from the current gradients (saving ``w``).

        Returns True when the caller must run a second forward/backward at the perturbed
        weights and then call :meth:`second_step`. Variants that skip the ascent on some
        steps (``k > 1``, LookSAM) finish the whole update here and return False, and so
        does a step skipped because a ``grad_scaler`` found inf/NaN gradients.

        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled the loss; the scale is
        removed here (inside the norm pass for SAM/ASAM/GCSAM, by unscaling the gradients
        for the others). Finish with :meth:`second_step` given the same scaler, or with
        ``grad_scaler.step(opt)``; then call ``grad_scaler.update()`` as usual.
        """
        if self.closure_only:
            raise RuntimeError(
                f"{type(self).__name__} needs more than two gradient evaluations per step: "
                "call step(closure) with a closure that runs forward and backward"
            )
        return self._first(zero_grad, grad_scaler)

    def _first(self, zero_grad: bool, grad_scaler=None) -> bool:
        if self._run.perturbed is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(): the weights are already "
                "perturbed"
            )
        if grad_scaler is not None and grad_scaler.is_enabled() \
                and self._unscaled_by_caller(grad_scaler) is not None:
            raise RuntimeError(
                "scaler.unscale_() was called on this optimizer before first_step(); the "
                "second pass could then not be unscaled. Unscale (and clip) between the "
                "passes, before second_step() or scaler.step(opt): that is the descent "
                "direction"
            )
        self._run.begun += 1
        self._run.done_early = False
        buckets = self._gather()
        # With a loss scaler, an ascent that is homogeneous in g (SAM, ASAM, GCSAM) takes
        # the scaled gradients as they are: its norm pass finds inf/NaN from the norm
        # itself and 1/scale joins the perturbation's scale, so the separate unscale pass
        # over every gradient (a read and a write) is not needed.
        fold = (grad_scaler is not None and grad_scaler.is_enabled()
                and self._scale_free_ascent and self._will_perturb())
        if fold:
            self._run.inv_scale = self._inv_scale(grad_scaler)
        elif not self._gradients_ok(buckets, grad_scaler, record=not self._will_perturb(),
                                    when="the first pass"):
            self._run.done_early = True
            if zero_grad:
                self.zero_grad()
            return False
        try:
            perturbed = self._ascent(buckets)
        except _SkipStep:
            grad_scaler.unscale_(self.base_optimizer)   # records the inf: update() backs off
            self._run.done_early = True
            if zero_grad:
                self.zero_grad()
            return False
        finally:
            self._run.inv_scale = None
        self._run.calls += 1
        if perturbed:
            self._run.perturbed = buckets
        else:
            self._run.done_early = True
        if zero_grad:
            self.zero_grad()
        return perturbed

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, grad_scaler=None) -> None:
        """Restore ``w`` exactly and apply the base optimizer's update.

        With ``grad_scaler``, an inf/NaN in this pass restores ``w`` and skips the update
        (the optimizer state is untouched); ``grad_scaler.update()`` then lowers the scale.
        """
        if self.closure_only:
            raise RuntimeError(
                f"{type(self).__name__} needs step(closure); first_step/second_step are "
                "not available for it"
            )
        self._second(zero_grad, grad_scaler)

    def _second(self, zero_grad: bool, grad_scaler=None, amp: Optional[tuple] = None) -> None:
        """``amp = (grad_scale, found_inf)`` when ``GradScaler.step`` called us: it has
        checked the gradients already, and ``grad_scale`` is None when they are unscaled."""
        if self._run.perturbed is None:
            raise RuntimeError(
                "second_step() called without a matching first_step() (or first_step() "
                "returned False: the update was already applied on that step)"
            )
        buckets = self._run.perturbed
        if any(p.grad is None for b in buckets for p in b.sources):
            buckets = self._restore_missing(buckets)
        try:
            late = self._late(buckets)
            if amp is not None:
                ok = self._amp_ok(buckets + late, *amp)
            else:
                ok = self._gradients_ok(buckets + late, grad_scaler, record=True,
                                        when="the second pass")
        except BaseException:
            self._abort()
            raise
        if not ok:
            self._abort()
        else:
            self._run.perturbed, self._run.late = None, late
            try:
                self._descent(buckets)
            finally:
                self._run.late = []
        if zero_grad:
            self.zero_grad()

    def _late(self, buckets: List[Bucket]) -> List[Bucket]:
        """Buckets of the parameters that have a gradient in the second pass but had none in
        the first (stochastic depth, a conditional branch, MoE routing). They were never
        perturbed; like torch.optim, the update steps them on their own gradient."""
        count = sum(len(b.sources) for b in buckets)
        if count == sum(p.grad is not None for g in self.param_groups for p in g["params"]):
            return []                                  # the common case: the same set
        seen = {id(p) for b in buckets for p in b.sources}
        late: List[Bucket] = []
        for group in self.param_groups:
            new = [p for p in self._with_grad(group) if id(p) not in seen]
            if new:
                late.extend(self._buckets(group, new))
        return late

    def _restore_missing(self, buckets: List[Bucket]) -> List[Bucket]:
        """Parameters perturbed in the first pass but without a gradient in the second are
        restored and left out of the update, as torch.optim skips ``grad is None``."""
        kept: List[Bucket] = []
        for b in buckets:
            lost = [p for p in b.sources if p.grad is None]
            if lost:
                self._restore(b, lost)
            have = [p for p in b.sources if p.grad is not None]
            if have:
                kept.append(b.subset(have))
        return kept

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
            raise RuntimeError(
                f"{type(self).__name__}: check_finite=True reads a flag back to the host in "
                "each pass, which a CUDA graph capture cannot do; build the optimizer with "
                "check_finite=False to capture its step (and check the loss yourself)"
            )
        if self.check_finite and bool(self._nonfinite(buckets, None).item()):
            raise FloatingPointError(
                f"{type(self).__name__}: a gradient in {when} contains inf or NaN; the "
                "weights and optimizer state were left as they were. Use a "
                "torch.amp.GradScaler (grad_scaler=) to skip such steps, or fix the loss."
            )
        return True

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

    def step(self, closure: Optional[Callable[[], Tensor]] = None, **options):
        """One whole step, or the end of one begun by :meth:`first_step`.

        ``step(closure)``: ``closure`` (forward + backward, returns the loss) is evaluated
        at ``w`` and, when the algorithm perturbs, again at the perturbed weights. Its
        first backward adds to the gradients already there (micro-batches a trainer
        accumulated belong to the first pass); the second pass starts from zero. If the
        closure calls :meth:`first_step` itself (a trainer integration whose closure runs
        both passes), ``step`` only finishes that step. Returns the loss at ``w``; the
        gradients are cleared (None) on return.

        ``step()`` with no closure after :meth:`first_step` finishes the pending step
        exactly as :meth:`second_step` does (nothing to do when ``first_step`` returned
        False: it applied or skipped the update itself). ``GradScaler.step(opt)`` calls it
        so, after its inf check: a step it skips restores ``w`` (nothing is lost), and
        ``grad_scaler.update()`` then lowers the scale. With nothing begun it raises.

        ``grad_scaler=`` (keyword): the ``torch.amp.GradScaler`` whose ``scale(loss)`` the
        closure's backward used. (It is read from ``**options`` so that
        ``GradScaler.step`` uses its attribute protocol, not the deprecated keyword one.)
        """
        grad_scaler = options.pop("grad_scaler", None)
        if options:
            raise TypeError(f"{type(self).__name__}.step() got unexpected keyword arguments "
                            f"{sorted(options)}")
        if closure is None:
            with torch.no_grad():
                self._complete(grad_scaler)
            return None
        try:
            return self._step_with(torch.enable_grad()(closure), grad_scaler)
        except BaseException:
            with torch.no_grad():
                self._abort()      # a closure that began the step itself may have failed
            self.zero_grad()       # the failed step's gradients must not leak into the next
            raise
        finally:
            self._run.done_early = False

    def _step_with(self, closure: Callable[[], Tensor], grad_scaler) -> Tensor:
        begun = self._run.begun
        loss = closure()
        if self._run.begun != begun:   # the closure ran first_step and the second backward
            with torch.no_grad():
                self._complete(grad_scaler)
            self.zero_grad()
            return loss
        with torch.no_grad():
            perturbed = self._first(True, grad_scaler)
        if perturbed:
            try:
                closure()
            except BaseException:
                with torch.no_grad():
                    self._abort()
                raise
            with torch.no_grad():
                self._second(True, grad_scaler)
        return loss

    def _complete(self, grad_scaler) -> None:
        """Finish the step begun by ``first_step`` (closure-less ``step()``)."""
        amp = None
        if "found_inf" in self.__dict__:   # set by GradScaler.step for this call only
            amp = (self.__dict__.get("grad_scale"), self.__dict__["found_inf"])
        if self._run.perturbed is None:
            if self._run.done_early:
                self._run.done_early = False
                return
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that runs forward and "
                "backward and returns the loss, or a step begun by first_step() to finish "
                "(without a closure it completes that step), and none is pending"
            )
        self._second(False, grad_scaler, amp)

    def _abort(self) -> None:
        """Put the weights back when a step cannot finish (the training state is unchanged)."""
        if self._run.perturbed is not None:
            buckets, self._run.perturbed = self._run.perturbed, None
            for b in buckets:
                self._restore(b)
