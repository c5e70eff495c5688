"""Machinery shared by every sharpopt optimizer.

``_Core`` knows how to gather the parameters that have a gradient, split them into
(device, dtype) buckets with the backend chosen for each device, keep the scratch buffers
(saved weights, stored gradients) that live between the two passes, and reduce global
norms without leaving the device. ``SharpnessAware`` adds the base optimizer: the shared
``param_groups``, the restore merged with a recognised base update (SGD, Adam, AdamW) or
the generic "restore, then ``base.step()``" path, ``state_dict`` with the base state, and
the two-pass protocol (``first_step`` / ``second_step`` / ``step(closure)``).

Each algorithm module (``sam.py``, ``gsam.py``, ...) only says which passes to run.

Sharded parameters (DTensor, as FSDP2's ``fully_shard`` makes them) are keys for the
optimizer state and the scratch buffers; the passes run on their local shards, and every
global sum (norms, dot products, the non-finite check) is all-reduced over the mesh
dimensions the tensor is sharded on, so each rank computes the same scalars as one
process holding the whole model.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from ._keywords import SortKeywords
from .backends import is_forced, resolve
from .backends.base import Ops, is_dense, layout_problem, same_layout

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support has no sharded tensors
    dist, DTensor = None, ()

__all__ = ["SharpnessAware"]


def _local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The shard of ``t`` held by this rank (``t`` itself for an ordinary tensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _move(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without waiting where that is safe. A copy to the host must
    wait: a non-blocking device-to-host copy returns before the data has arrived, and
    host code reading it would see garbage."""
    return t.to(device, non_blocking=device.type != "cpu")


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _relaid(st: dict, keys: Sequence[str], p: Tensor) -> None:
    """Give the state tensors ``st[k]`` the memory layout of ``p`` where they lost it (a
    checkpoint of a contiguous model loaded into a channels_last one, or the model moved to
    another memory format): the fused passes walk a parameter and its state in memory order.
    The values are kept; only the strides change."""
    for k in keys:
        t = st[k]
        if t.stride() != p.stride() and not same_layout(t, p):
            st[k] = torch.empty_like(p).copy_(t)


def _reduce_groups(p: Tensor) -> tuple:
    """Process groups over which a sum of ``p``'s local elements must be all-reduced: one
    per mesh dimension ``p`` is sharded on (replicated dimensions hold equal copies)."""
    if not isinstance(p, DTensor):
        return ()
    groups = []
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            groups.append(p.device_mesh.get_group(dim))
        elif not placement.is_replicate():
            raise ValueError(
                f"sharded parameter of shape {tuple(p.shape)} has placement {placement}; "
                "only Shard and Replicate placements are supported (a Partial parameter "
                "has no well-defined value to perturb)"
            )
    return tuple(groups)


class _Sources(list):
    """A bucket's parameters. It also keeps the lists made from them (scratch buffers by
    name, row means), so a step reuses them instead of looking each parameter up again:
    they are valid as long as the plan that made the bucket (see ``_Core._gather``)."""

    __slots__ = ("derived",)

    def __init__(self, items=()):
        super().__init__(items)
        self.derived: Dict[str, list] = {}


@dataclass
class Bucket:
    """Parameters of one param group that share a device, a dtype and a sharding.

    ``sources`` are the parameters as the user holds them (keys for the optimizer state and
    scratch buffers); ``params`` are the tensors the passes read and write: the same
    objects, or the local shards of DTensor parameters. ``reduce_over`` lists the process
    groups a sum over this bucket is all-reduced over (empty when nothing is sharded).
    """

    ops: Ops
    sources: List[Tensor]
    group: dict
    reduce_over: tuple = ()
    params: List[Tensor] = field(init=False)
    device: torch.device = field(init=False)
    dtype: torch.dtype = field(init=False)
    sharded: bool = field(init=False)
    #: State entries already given the parameters' layout for this plan (see _relaid).
    laid_out: set = field(init=False, default_factory=set)

    def __post_init__(self):
        if not isinstance(self.sources, _Sources):
            self.sources = _Sources(self.sources)
        self.sharded = isinstance(self.sources[0], DTensor)
        self.params = [_local(p) for p in self.sources] if self.sharded else self.sources
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype

    def current(self) -> bool:
        """Whether the parameters are still where the bucket was made for (a model moved
        with ``.to(device/dtype)`` keeps its Parameter objects but not their storage)."""
        p = self.params[0]
        return p.device == self.device and p.dtype == self.dtype

    @property
    def grads(self) -> List[Tensor]:
        return self.local([p.grad for p in self.sources])

    def local(self, tensors: List[Tensor]) -> List[Tensor]:
        """Local shards of per-parameter tensors (state shaped like the parameters)."""
        return [_local(t) for t in tensors] if self.sharded else tensors

    def subset(self, sources: List[Tensor]) -> "Bucket":
        return Bucket(self.ops, sources, self.group, self.reduce_over)


def _check_positive(name: str, value, allow_zero: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero) or math.isinf(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


class _Core(Optimizer):
    """Backend selection, bucketing, scratch buffers and global reductions."""

    def __init__(self, params, defaults: dict, *, backend: str = "auto",
                 perturb_eps: float = 1e-12):
        _check_positive("perturb_eps", perturb_eps, allow_zero=False)
        self.perturb_eps = float(perturb_eps)
        self._requested_backend = backend
        self._ops: Dict[torch.device, Ops] = {}
        # Scratch buffers keyed by name, then by parameter. They hold values only between
        # the passes of one step, so they are not part of state_dict().
        self._scratch: Dict[str, Dict[Tensor, Tensor]] = {}
        self._warned_layout = False
        self._plan: Optional[tuple] = None     # (key, buckets): see _gather
        super().__init__(params, defaults)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        # Resolve now so a bad or unavailable backend fails at construction, not mid-training.
        self._primary = first.device if first is not None else torch.device("cpu")
        self._ops_for(self._primary)

    # -- backend -----------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the backend that runs this optimizer's passes (read-only)."""
        names = sorted({ops.name for ops in self._ops.values()})
        return names[0] if len(names) == 1 else "+".join(names)

    def _ops_for(self, device: torch.device) -> Ops:
        ops = self._ops.get(device)
        if ops is None:
            ops = self._ops[device] = resolve(self._requested_backend, device)
        return ops

    # -- gathering -----------------------------------------------------------------------
    def _with_grad(self, group: dict) -> List[Tensor]:
        params = []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or g.layout != torch.strided:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"(parameter of shape {tuple(p.shape)}); use a dense embedding or "
                    "torch.optim.SparseAdam without SAM"
                )
            if torch.is_complex(p) or torch.is_complex(g):
                raise RuntimeError(
                    f"{type(self).__name__} does not support complex parameters or "
                    f"gradients (shape {tuple(p.shape)}); view them as real pairs first"
                )
            params.append(p)
        return params

    def _buckets(self, group: dict, params: Sequence[Tensor]) -> List[Bucket]:
        by_key: Dict[tuple, List[Tensor]] = {}
        rows = getattr(self, "_centralize_direction", False)
        for p in params:
            ops = self._ops_for(p.device)
            if ops.requires_dense:
                problem = layout_problem(_local(p), _local(p.grad), rows=rows)
                if problem is not None:
                    ops = self._layout_fallback(ops, p, problem)
            key = (ops, p.device, p.dtype)
            if isinstance(p, DTensor):
                key += (_reduce_groups(p),)
            by_key.setdefault(key, []).append(p)
        return [Bucket(key[0], ps, group, *key[3:]) for key, ps in by_key.items()]

    def _layout_fallback(self, ops: Ops, p: Tensor, problem: str) -> Ops:
        """The backend for a parameter whose memory layout ``ops`` cannot index: an error
        when the backend was asked for by name, else ``foreach`` (said once)."""
        where = f"a parameter of shape {tuple(p.shape)} and strides {tuple(_local(p).stride())}"
        if is_forced(self._requested_backend):
            raise ValueError(
                f"backend {ops.name!r} cannot run {where}: {problem}. Make it dense "
                "(.contiguous() or .to(memory_format=torch.channels_last)) before building "
                "the optimizer, or use backend='foreach'"
            )
        if not self._warned_layout:
            self._warned_layout = True
            warnings.warn(
                f"sharpopt: {where} is stepped by the 'foreach' backend instead of "
                f"{ops.name!r} ({problem}); the other parameters keep {ops.name!r}",
                RuntimeWarning, stacklevel=4,
            )
        return resolve("foreach", p.device)

    def _gather(self) -> List[Bucket]:
        """Buckets of the parameters that have a gradient now, over all groups.

        The buckets, and the lists the passes derive from them, depend only on the parameter
        set, so they are made once and reused (the step plan) while the same parameters, in
        the same groups, have gradients and the parameters stay on their device and dtype.
        New gradient tensors (``zero_grad(set_to_none=True)``) keep the plan: torch gives a
        parameter's gradient its dtype, device and shape. ``add_param_group`` and
        ``load_state_dict`` drop it. Checking costs one look at every parameter.
        """
        key = [id(p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        plan = self._plan
        if plan is not None and plan[0] == key and all(b.current() for b in plan[1]):
            return plan[1]
        buckets: List[Bucket] = []
        for group in self.param_groups:
            buckets.extend(self._buckets(group, self._with_grad(group)))
        self._plan = (key, buckets)
        return buckets

    def _buffers(self, name: str, sources: Sequence[Tensor]) -> List[Tensor]:
        """Scratch tensors named ``name`` for the parameters ``sources`` (local shards for
        sharded ones), allocated once and then reused."""
        derived = getattr(sources, "derived", None)
        if derived is not None and name in derived:
            return derived[name]
        store = self._scratch.setdefault(name, {})
        out = []
        for p in sources:
            buf = store.get(p)
            local = _local(p)
            if buf is None or buf.shape != local.shape or buf.dtype != local.dtype or (
                    buf.device != local.device) or (
                    buf.stride() != local.stride() and is_dense(local)):
                # Laid out like the parameter (channels_last stays channels_last), so the
                # fused passes can walk both in memory order; re-made if the layout changed.
                buf = store[p] = torch.empty_like(local)
            out.append(buf)
        if derived is not None:
            derived[name] = out
        return out

    def _restore(self, b: Bucket, sources: Optional[Sequence[Tensor]] = None) -> None:
        """``w ← saved`` for ``sources`` (default: all of bucket ``b``), bit for bit."""
        if sources is None:
            sources, params = b.sources, b.params
        else:
            params = b.local(sources)
        b.ops.restore(params, self._buffers("saved", sources))

    def _keep_grads(self, buckets: Sequence[Bucket], name: str) -> None:
        """Copy the current gradients into the scratch buffers ``name`` (kept for the next
        pass, which overwrites ``p.grad``)."""
        for b in buckets:
            self._lincomb(b, self._buffers(name, b.sources), [(1.0, b.grads)])

    def _row_means(self, sources: Sequence[Tensor]) -> List[Optional[Tensor]]:
        """fp32 per-row-mean buffers for gradient centralisation (None for dim <= 1)."""
        derived = getattr(sources, "derived", None)
        if derived is not None and "row_means" in derived:
            return derived["row_means"]
        store = self._scratch.setdefault("row_means", {})
        out: List[Optional[Tensor]] = []
        for p in sources:
            if p.dim() <= 1:
                out.append(None)
                continue
            buf = store.get(p)
            if buf is None or buf.device != p.device or buf.numel() != _local(p).shape[0]:
                if isinstance(p, DTensor) and any(
                        pl.is_shard() and pl.dim != 0 for pl in p.placements):
                    raise ValueError(
                        f"gradient centralisation needs whole rows, but a parameter of shape "
                        f"{tuple(p.shape)} is sharded as {p.placements}; shard it on dim 0 "
                        "(as FSDP2 does) or use a variant without centralisation"
                    )
                local = _local(p)
                buf = store[p] = torch.empty(local.shape[0], dtype=torch.float32,
                                             device=local.device)
            out.append(buf)
        if derived is not None:
            derived["row_means"] = out
        return out

    # -- global reductions (no host synchronisation) ------------------------------------
    def _reduce(self, parts: Iterable[tuple]) -> Tensor:
        """``Σ s`` over ``parts = [(reduce_over, s), ...]`` (partial sums, e.g. one per
        bucket), each ``s`` summed over the ranks in its ``reduce_over`` groups (the ranks
        holding the other shards), as a 0-dim tensor on the primary device.

        Every rank has the same buckets in the same order (the same parameters have
        gradients), so the all-reduces below are issued identically on each of them.
        """
        local, shared = [], {}
        for reduce_over, s in parts:
            if reduce_over:
                s = _move(s, self._primary)
                prev = shared.get(reduce_over)
                shared[reduce_over] = s if prev is None else prev + s
            else:
                local.append(s)
        for groups, s in shared.items():
            s = s.clone()
            for pg in groups:
                dist.all_reduce(s, group=pg)
            local.append(s)
        return self._total(local)

    def _total(self, parts: Iterable[Tensor]) -> Tensor:
        total = None
        for s in parts:
            s = _move(s, self._primary)
            total = s if total is None else total + s
        if total is None:
            return torch.zeros((), dtype=torch.float32, device=self._primary)
        return total

    def _norm(self, buckets: Sequence[Bucket], grads_of: Callable[[Bucket], Sequence[Tensor]],
              *, adaptive: bool = False, centralize: bool = False,
              row_means: bool = False) -> Tensor:
        """``‖T ⊙ C(v)‖`` over every bucket, as a 0-dim tensor on the primary device."""
        return self._reduce(
            (b.reduce_over, b.ops.sumsq(
                grads_of(b), b.params, adaptive=adaptive, eta=b.group.get("eta", 0.0),
                centralize=centralize,
                row_means=self._row_means(b.sources) if row_means else None,
            ))
            for b in buckets
        ).sqrt()

    def _dot(self, buckets: Sequence[Bucket], xs_of, ys_of) -> Tensor:
        return self._reduce((b.reduce_over, b.ops.dot(xs_of(b), ys_of(b))) for b in buckets)

    @staticmethod
    def _on(value, device: torch.device):
        return _move(value, device) if isinstance(value, Tensor) else value

    def _lincomb(self, b: Bucket, out: Sequence[Tensor], terms) -> None:
        """``out ← Σ c · x`` for ``terms = [(c, xs), ...]`` on bucket ``b``."""
        b.ops.lincomb(out, [xs for _, xs in terms], [self._on(c, b.device) for c, _ in terms])


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


class SharpnessAware(_Core, metaclass=SortKeywords):
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
        if self.check_finite and _capturing():
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

    # -- restore merged with the base update --------------------------------------------
    def _fusable(self) -> Optional[str]:
        """'sgd' or 'adam' when the base optimizer's update can be merged, else None."""
        base = self.base_optimizer
        kind = None
        if type(base) is torch.optim.SGD:
            kind = "sgd"
        elif type(base) in (torch.optim.Adam, torch.optim.AdamW):
            kind = "adam"
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
            self.base_optimizer.step()
            return
        if kind == "adam" and _capturing():
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

    def _sgd(self, b: Bucket, saved, d) -> None:
        group, state = b.group, self.base_optimizer.state
        kw = dict(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                  dampening=group["dampening"], nesterov=group["nesterov"],
                  maximize=group["maximize"])
        if group["momentum"] == 0:
            b.ops.restore_sgd(b.params, saved, d, [], init_buffers=False, **kw)
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
    def _relayout_due(b: Bucket, key: str) -> bool:
        """Whether state ``key`` of bucket ``b`` must still be checked against the
        parameters' layout (:func:`_relaid`): once per plan, for the backends that walk
        memory; state made later is made in the parameter's layout."""
        if not b.ops.requires_dense or b.sharded or key in b.laid_out:
            return False
        b.laid_out.add(key)
        return True

    def _adam_steps(self, b: Bucket) -> List[Tensor]:
        """The step counters of bucket ``b``'s parameters, advanced by one, after creating
        the Adam state where it is missing (zeros, as torch.optim.Adam does) and giving the
        moments the parameters' layout once per plan (see :func:`_relaid`)."""
        state, amsgrad = self.base_optimizer.state, b.group["amsgrad"]
        for p in b.sources:
            st = state[p]
            if len(st) == 0:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self._relayout_due(b, "adam"):
            keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
            for p in b.sources:
                _relaid(state[p], keys, p)
        steps = [state[p]["step"] for p in b.sources]
        torch._foreach_add_(steps, 1)
        return steps

    def _adam(self, b: Bucket, saved, d) -> None:
        group, state = b.group, self.base_optimizer.state
        amsgrad = group["amsgrad"]
        steps = self._adam_steps(b)
        # Step counts differ only when parameters joined at different times; the counters
        # live on the host (as torch.optim keeps them), so reading them costs no sync.
        by_step: Dict[float, List[int]] = {}
        for i, s in enumerate(steps):
            by_step.setdefault(float(s), []).append(i)
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", type(self.base_optimizer) is torch.optim.AdamW)
        for step, idx in by_step.items():
            ps = [b.sources[i] for i in idx]
            b.ops.restore_adam(
                b.local(ps), None if saved is None else [saved[i] for i in idx],
                [d[i] for i in idx], b.local([state[p]["exp_avg"] for p in ps]),
                b.local([state[p]["exp_avg_sq"] for p in ps]),
                b.local([state[p]["max_exp_avg_sq"] for p in ps]) if amsgrad else [],
                step=int(step), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], decoupled=decoupled, amsgrad=amsgrad,
                maximize=group["maximize"],
            )
