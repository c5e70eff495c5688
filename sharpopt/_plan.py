"""The step plan: which parameters a step runs on, grouped for the backends, and what the
passes share.

``_Core`` gathers the parameters that have a gradient into buckets (param group × device ×
dtype × sharding × backend), keeps the scratch buffers that live between the passes
(saved weights, kept gradients, row means), and reduces global norms and dot products
without leaving the device. The buckets and the lists derived from them are made once
and reused while the parameter set stays the same (see ``_Core._gather``).

Sharded parameters (DTensor, as FSDP2's ``fully_shard`` makes them) are keys for the
optimizer state and the scratch buffers; the passes run on their local shards, and every
global sum (norms, dot products, the non-finite check) is all-reduced over the mesh
dimensions the tensor is sharded on, so each rank computes the same scalars as one
process holding the whole model.
"""
from __future__ import annotations

import ctypes
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _host
from .backends import BackendUnavailable, is_forced, resolve
from ._naming import _Reporting, describe_param
from .backends.base import Ops, is_dense, layout_problem, same_layout

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support has no sharded tensors
    dist, DTensor = None, ()


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
    #: The gradients, read once for a pass that reads them several times (see ``grads``).
    pinned: Optional[List[Tensor]] = field(init=False, default=None)
    #: The list ``pin`` refills (one per bucket, so a pass allocates none).
    held: Optional[List[Optional[Tensor]]] = field(init=False, default=None)

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
        """``p.grad`` of every parameter (local shards), read now; or the list read at
        the start of the current pass, where the protocol pinned it (no user code runs
        inside a pass, so the gradient tensors cannot change there)."""
        if self.pinned is not None:
            return self.pinned
        return self.local(_host.grads(self.sources))

    def pin(self) -> None:
        """Read the gradients once for the pass that begins (``grads`` then returns them).
        An ordinary bucket refills the list it keeps for this, in place."""
        if self.sharded:
            self.pinned = self.grads
            return
        if self.held is None:
            self.held = [None] * len(self.sources)
        self.pinned = _host.grads_into(self.sources, self.held)

    def unpin(self) -> None:
        """End of the pass: let go of the gradients (``zero_grad(set_to_none=True)`` must
        free them) and read them afresh from now on."""
        if self.pinned is self.held and self.held is not None:
            _host.clear(self.held)
        self.pinned = None

    def local(self, tensors: List[Tensor]) -> List[Tensor]:
        """Local shards of per-parameter tensors (state shaped like the parameters)."""
        return [_local(t) for t in tensors] if self.sharded else tensors

    def subset(self, sources: List[Tensor]) -> "Bucket":
        return Bucket(self.ops, sources, self.group, self.reduce_over)


def _f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (inf beyond its range), as torch stores an
    fp32 result. An fp32 operation on fp32 inputs, computed in double and rounded so, gives
    the fp32 result exactly (double has more than twice fp32's precision)."""
    return ctypes.c_float(x).value


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
        self._fallbacks: Dict[torch.device, Ops] = {}    # foreach, for layouts ops refuses
        # Scratch buffers keyed by name, then by parameter. They hold values only between
        # the passes of one step, so they are not part of state_dict().
        self._scratch: Dict[str, Dict[Tensor, Tensor]] = {}
        self._warned_layout = False
        self._plan: Optional[tuple] = None     # (key, buckets): see _gather
        super().__init__(params, defaults)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        # Resolve now so a bad or unavailable backend fails at construction, not mid-training.
        self._primary = first.device if first is not None else torch.device("cpu")
        self._ops_for(self._primary, first)

    # -- backend -----------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the backend that runs this optimizer's passes (read-only)."""
        names = sorted({ops.name for ops in self._ops.values()})
        return names[0] if len(names) == 1 else "+".join(names)

    def _ops_for(self, device: torch.device, param: Optional[Tensor] = None) -> Ops:
        """The backend for tensors on ``device``; when it cannot run there, the error names
        ``param`` (the parameter that needs it)."""
        ops = self._ops.get(device)
        if ops is None:
            try:
                ops = resolve(self._requested_backend, device)
            except BackendUnavailable as exc:
                if param is None:
                    raise
                raise BackendUnavailable(f"{exc} (needed for {self._describe(param)})") from exc
            ops = self._ops[device] = _Reporting(ops, self)
        return ops

    def _param_of(self, t: Tensor) -> Optional[Tensor]:
        """The parameter that tensor ``t`` (a list entry of a pass) belongs to: the
        parameter, its gradient, its local shard, an optimizer state entry or a scratch
        buffer. Only called to explain an error."""
        states = [self.state, getattr(getattr(self, "base_optimizer", None), "state", {})]
        for group in self.param_groups:
            for p in group["params"]:
                owned = [p, _local(p), p.grad, _local(p.grad)]
                owned += [store.get(p) for store in self._scratch.values()]
                for state in states:
                    entries = state.get(p, {}) if hasattr(state, "get") else {}
                    owned += [_local(v) for v in entries.values() if isinstance(v, Tensor)]
                if any(x is t for x in owned):
                    return p
        return None

    def _describe(self, p: Tensor) -> str:
        return describe_param(self.param_groups, p)

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
                    f"({self._describe(p)}); use a dense embedding or "
                    "torch.optim.SparseAdam without SAM"
                )
            if torch.is_complex(p) or torch.is_complex(g):
                raise RuntimeError(
                    f"{type(self).__name__} does not support complex parameters or "
                    f"gradients ({self._describe(p)}); view them as real pairs first"
                )
            params.append(p)
        return params

    def _buckets(self, group: dict, params: Sequence[Tensor]) -> List[Bucket]:
        by_key: Dict[tuple, List[Tensor]] = {}
        rows = getattr(self, "_centralize_direction", False)
        for p in params:
            ops = self._ops_for(p.device, p)
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
        where = f"{self._describe(p)} with strides {tuple(_local(p).stride())}"
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
        fallback = self._fallbacks.get(p.device)
        if fallback is None:
            fallback = self._fallbacks[p.device] = _Reporting(
                resolve("foreach", p.device), self)
        return fallback

    def _gather(self) -> List[Bucket]:
        """Buckets of the parameters that have a gradient now, over all groups.

        The buckets, and the lists the passes derive from them, depend only on the parameter
        set, so they are made once and reused (the step plan) while the same parameters, in
        the same groups, have gradients and the parameters stay on their device and dtype.
        New gradient tensors (``zero_grad(set_to_none=True)``) keep the plan: torch gives a
        parameter's gradient its dtype, device and shape. ``add_param_group`` and
        ``load_state_dict`` drop it. Checking costs one look at every parameter.
        """
        groups = self._param_lists()
        plan = self._plan
        if plan is not None and _host.grad_key_is(groups, plan[0]) and \
                all(b.current() for b in plan[1]):
            return plan[1]
        key = _host.grad_key(groups)
        buckets: List[Bucket] = []
        for group in self.param_groups:
            buckets.extend(self._buckets(group, self._with_grad(group)))
        self._plan = (key, buckets)
        return buckets

    def _param_lists(self) -> List[list]:
        """The parameter list of every group, in order (what the plan's key describes)."""
        return [g["params"] for g in self.param_groups]

    def _grad_key_is(self, key) -> bool:
        """Whether the same parameters have a gradient now as when ``key`` (a plan's key)
        was made; checks each parameter once and allocates nothing."""
        return _host.grad_key_is(self._param_lists(), key)

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

    def _norm_value(self, buckets: Sequence[Bucket],
                    grads_of: Callable[[Bucket], Sequence[Tensor]], *, adaptive: bool = False,
                    centralize: bool = False, row_means: bool = False) -> Tuple[float, bool]:
        """:meth:`_norm` as ``(value, fp64)`` on the host (see ``_host_scalars``): each
        bucket's sum in its dtype (fp64 for fp64 tensors, else fp32), added in order as
        :meth:`_total` adds the 0-dim tensors (fp32 unless an fp64 one joins), then the
        square root."""
        total, wide = 0.0, False
        for i, b in enumerate(buckets):
            value = b.ops.sumsq_value(
                grads_of(b), b.params, adaptive=adaptive, eta=b.group.get("eta", 0.0),
                centralize=centralize,
                row_means=self._row_means(b.sources) if row_means else None)
            if i == 0:
                total, wide = value, b.dtype == torch.float64
            else:
                wide = wide or b.dtype == torch.float64
                total = total + value if wide else _f32(total + value)
        root = math.sqrt(total) if total >= 0 or math.isnan(total) else math.nan
        return (root if wide else _f32(root)), wide

    def _dot(self, buckets: Sequence[Bucket], xs_of, ys_of) -> Tensor:
        return self._reduce((b.reduce_over, b.ops.dot(xs_of(b), ys_of(b))) for b in buckets)

    @staticmethod
    def _on(value, device: torch.device):
        return _move(value, device) if isinstance(value, Tensor) else value

    def _lincomb(self, b: Bucket, out: Sequence[Tensor], terms) -> None:
        """``out ← Σ c · x`` for ``terms = [(c, xs), ...]`` on bucket ``b``."""
        b.ops.lincomb(out, [xs for _, xs in terms], [self._on(c, b.device) for c, _ in terms])
