"""The two-pass protocol shared by every sharpopt optimizer.

``SharpnessAware`` adds the base optimizer to the step plan (``_plan._Core``): the shared
``param_groups``, ``state_dict`` with the base state, the protocol (``first_step`` /
``second_step`` / ``step(closure)`` / a closure-less ``step()``). The inf/NaN checks and
the loss scaler's side are ``_finite._FiniteChecks``; the restore merged with the base
update is ``_fused._FusedUpdate``.

Each algorithm module (``sam.py``, ``gsam.py``, ...) only says which passes to run.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._finite import _FiniteChecks
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
        self.key: Optional[List[int]] = None              # the plan key of `perturbed`
        # The non-finite guard (see SharpnessAware._guard_*): per-device flags, whether
        # this step's ascent reads the verdict from its norm, the flags handed to the
        # update, the Adam step counters advanced under a possible skip, and the report
        # of a guarded CUDA step not read yet (host copy, event, counters).
        self.flags: Dict[torch.device, Tensor] = {}
        self.flags_fresh = False    # zeroed for this step already
        self.clean = False          # the flags were read on the host and found zero
        self.reported = True        # this step's flags were read or handed on
        self.by_norm = False
        self.armed = False          # flags[0] may say "skip" (set on the device in pass 1)
        self.guard: Optional[Dict[torch.device, Tensor]] = None
        self.base_checked = False   # the base's own step takes the device check's flag
        # Lists of counters, each held as it is (not copied entry by entry: a copy touches
        # every counter object, a cache miss each after a backward pass).
        self.advanced: List[List[Tensor]] = []
        self.pending: List[tuple] = []   # (host copy, event, counters, step) per GPU step
        self.counts: Dict[torch.device, Tensor] = {}  # guarded GPU steps that found inf/NaN
        self.ones: Dict[torch.device, Tensor] = {}    # the unscale factor 1 of a device check


class _SkipStep(Exception):
    """Raised by an ascent that found the (scaled) gradient norm not finite, before it
    wrote anything: the step is skipped as a loss scaler expects."""


class SharpnessAware(_FusedUpdate, _FiniteChecks, _Core, metaclass=SortKeywords):
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
    #: True where ``_descent`` only turns the second pass's gradients into ``p.grad`` and
    #: ends in ``_restore_and_update`` (no other state or weight written from them), so the
    #: fused update's in-kernel inf/NaN guard covers the whole second pass. A subclass that
    #: overrides ``_descent`` is False unless it says otherwise (``__init_subclass__``).
    _guarded_descent = True
    #: True where the ascent reads the gradients only through ``g / ‖g‖``-like terms, so a
    #: loss scale can be folded into it (see ``_first``); the ascent must then honour
    #: ``self._run.inv_scale`` and raise ``_SkipStep`` on a non-finite norm.
    _scale_free_ascent = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_descent" in cls.__dict__ and "_guarded_descent" not in cls.__dict__:
            cls._guarded_descent = False

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
        self._nonfinite_steps = 0
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
        self._guard_pending()
        self._run.begun += 1
        self._run.done_early = False
        buckets = self._gather()
        # With a loss scaler, an ascent that is homogeneous in g (SAM, ASAM, GCSAM) takes
        # the scaled gradients as they are: its norm pass finds inf/NaN from the norm
        # itself and 1/scale joins the perturbation's scale, so the separate unscale pass
        # over every gradient (a read and a write) is not needed.
        scaled = grad_scaler is not None and grad_scaler.is_enabled()
        fold = scaled and self._scale_free_ascent and self._will_perturb()
        # Without a scaler, the same ascents learn of inf/NaN from that norm too (see
        # _guard_norm): the default check then costs no pass of its own.
        self._run.by_norm = (not scaled and self.check_finite and self._scale_free_ascent
                             and self._will_perturb())
        self._run.flags_fresh = False
        if fold:
            self._run.inv_scale = self._inv_scale(grad_scaler)
        elif not self._run.by_norm and not self._gradients_ok(
                buckets, grad_scaler, record=not self._will_perturb(), when="the first pass"):
            self._run.done_early = True
            if zero_grad:
                self.zero_grad()
            return False
        for b in buckets:           # the ascent reads them twice (norm, perturbation)
            b.pin()
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
            self._run.by_norm = False
            for b in buckets:
                b.unpin()
        self._run.calls += 1
        if perturbed:
            self._run.perturbed, self._run.key = buckets, self._plan[0]
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
        # The same parameters have gradients as in the first pass (one look at each): no
        # gradient went missing and none appeared.
        same = self._grad_key_is(self._run.key)
        if not same and any(p.grad is None for b in buckets for p in b.sources):
            buckets = self._restore_missing(buckets)
        pinned: List[Bucket] = []
        try:
            self._second_pass(buckets, same, grad_scaler, amp, pinned)
        finally:
            for b in pinned:     # let go of the gradients before zero_grad frees them
                b.unpin()
        if zero_grad:
            self.zero_grad()
        self._guard_report()

    def _second_pass(self, buckets: List[Bucket], same: bool, grad_scaler,
                     amp: Optional[tuple], pinned: List[Bucket]) -> None:
        """The checks and the descent of ``_second``, with the gradients of every bucket
        read once: the buckets it pins go into ``pinned``, which the caller unpins (the
        late ones are found here, and a failed check may leave the pass at any point)."""
        guard = base_flag = None
        try:
            late = [] if same else self._late(buckets)
            for b in buckets + late:
                b.pin()
                pinned.append(b)
            if amp is not None:
                ok = self._amp_ok(buckets + late, *amp)
            elif self._guards_update(buckets + late, grad_scaler):
                ok, guard = True, self._guard_flags(buckets + late)
            elif self._guards_base(buckets + late, grad_scaler):
                ok, base_flag = True, self._check_on_device(buckets + late)
            else:
                ok = self._gradients_ok(buckets + late, grad_scaler, record=True,
                                        when="the second pass")
                if self._run.armed:   # that check synchronised already: read the skip
                    self._run.armed, self._run.reported = False, True
                    if bool(torch.stack([f[0].cpu() for f in self._run.flags.values()]).any()):
                        raise FloatingPointError(self._nonfinite_message("the first pass"))
        except BaseException:
            self._abort()
            raise
        if not ok:
            self._abort()
        else:
            self._run.perturbed, self._run.late = None, late
            self._run.guard = guard
            if base_flag is not None:      # torch's fused step skips itself on this flag
                self.base_optimizer.found_inf = base_flag
                self._run.base_checked = True
            try:
                self._descent(buckets)
            finally:
                self._run.late, self._run.guard = [], None
                if base_flag is not None:
                    del self.base_optimizer.found_inf
                    self._run.base_checked = False

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
        self._run.armed, self._run.reported, self._run.flags_fresh = False, True, False
        self._run.clean = False     # a pass that stopped part-way may have set a flag
        if self._run.perturbed is not None:
            buckets, self._run.perturbed = self._run.perturbed, None
            for b in buckets:
                self._restore(b)
