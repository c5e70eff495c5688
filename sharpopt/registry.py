"""One registry of sharpopt's algorithms, read by the tests and the benchmark.

Each :class:`Algorithm` says how the algorithm is built and driven (its class, whether it
needs a closure, the backend passes it uses, which base optimizers the fused backends merge
with the restore) and how the suites exercise it: a list of :class:`Case` s, each a set of
constructor keywords and the suites (:data:`SUITES`) that run it. The backend-equivalence
suite (``tests/test_backends.py``), the API and training suites and the benchmark's
providers (``bench/providers.py``) all iterate this registry instead of keeping lists of
their own.

Adding an algorithm (see also ``docs/checklists.md``):

1. write its module (``sharpopt/<name>.py``) with the update rule in its docstring;
2. add one :func:`register` call below (or, in a test, use :func:`registered`)::

       register(Algorithm(
           "MySAM", MySAM, TWO_PASS, passes=("sumsq", "perturb", *RESTORE_UPDATE),
           defaults=dict(rho=0.05),            # the equivalence suite's case "MySAM"
           cases=(Case("MySAM", dict(rho=0.1), GRAD_SCALER),),   # optional: more suites
           bench=Bench("mysam", dict(rho=0.05), accesses=lambda u, kw: 5 + u,
                       note="norm 1 + perturb 4 + update u"),  # optional: benchmarked
       ))

With ``defaults`` alone the algorithm runs through the equivalence suite (every backend ×
base optimizer × dtype against ``reference``, every state entry) and, when it is
:data:`TWO_PASS`, the late-gradient rule; the other suites run the cases that name them.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from .backends.base import Ops
from .crsam import CRSAM
from .friendlysam import FriendlySAM
from .gsam import GSAM
from .looksam import LookSAM
from .msam import MSAM
from .rbo import RBO
from .sam import ASAM, GCSAM, SAM
from .wsam import WSAM

__all__ = ["Algorithm", "Case", "Bench", "ALGORITHMS", "SUITES", "register", "unregister",
           "registered", "cases", "TWO_PASS", "CLOSURE", "ONE_PASS"]

# -- how an algorithm is driven ---------------------------------------------------------
#: ``first_step`` / ``second_step`` after each backward, or ``step(closure)``.
TWO_PASS = "two-pass"
#: ``step(closure)`` only: the step evaluates the loss three or more times (CR-SAM, RBO).
CLOSURE = "closure"
#: ``step()`` after one backward: one gradient per step (MSAM).
ONE_PASS = "one-pass"
PROTOCOLS = (TWO_PASS, CLOSURE, ONE_PASS)

#: The base optimizers whose update the fused backends merge with the restore (any other
#: ``torch.optim`` class is stepped as is, after the restore).
FUSABLE_BASES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
#: The passes of the restore merged with the base update.
RESTORE_UPDATE = ("restore", "restore_sgd", "restore_adam")

# -- the suites a case can name, and what each checks -----------------------------------
EQUIVALENCE = "equivalence"
RHO_ZERO = "rho-zero"
STATE_DICT = "state-dict"
GRAD_SCALER = "grad-scaler"
SCALER_FOLD = "scaler-fold"
SCALER_INF = "scaler-inf"
MICRO_BATCH = "micro-batch"
COMPILED = "compiled"
SHARDED = "sharded"
TRAINER = "trainer-protocol"
TRAINER_SCALER = "trainer-scaler-step"
SCHEDULES = "schedules"
SCHEDULES_BF16 = "schedules-bf16"

SUITES: Mapping[str, str] = types.MappingProxyType({
    EQUIVALENCE: "test_backends: every fast backend × base × dtype against reference, "
                 "every state entry (keywords: no base optimizer; it comes from the suite)",
    RHO_ZERO: "test_api: rho = 0 is the base optimizer (the suite sets rho = 0)",
    STATE_DICT: "test_api: a checkpoint resumes the same trajectory",
    GRAD_SCALER: "test_training: the GradScaler recipe equals the unscaled step",
    SCALER_FOLD: "test_training: whether the loss scale folds into the ascent "
                 "(Algorithm.folds_loss_scale)",
    SCALER_INF: "test_training: an inf in either pass skips the whole step",
    MICRO_BATCH: "test_training: micro-batches give the large-batch step",
    COMPILED: "test_training: torch.compile of first_step/second_step equals eager "
              "(keywords include the base optimizer)",
    SHARDED: "test_training: FSDP2-sharded parameters equal one process "
             "(keywords include the base optimizer)",
    TRAINER: "test_trainer_protocol: a closure-less step() finishes the step; "
             "max_grad_norm clips the descent direction",
    TRAINER_SCALER: "test_trainer_protocol: scaler.step(opt) after first_step finishes it",
    SCHEDULES: "test_schedules: every schedule against reference, fp32",
    SCHEDULES_BF16: "test_schedules: every schedule against reference, bf16",
})


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Case:
    """One way a suite builds the algorithm: ``cls(params, **kwargs)`` beside what the suite
    adds itself (the backend; the base optimizer and its keywords where the suite supplies
    them). ``id`` is the test id, unique within each suite. Written
    ``Case(id, kwargs, SUITE, ...)``: the suites follow as positional arguments."""

    id: str
    kwargs: Mapping[str, Any]
    suites: Tuple[str, ...]

    def __init__(self, id: str, kwargs: Mapping[str, Any], *suites: str):
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "kwargs", _frozen(kwargs))
        object.__setattr__(self, "suites", tuple(suites))


@dataclass(frozen=True)
class Bench:
    """How the benchmark runs the algorithm: its key on the command line, the papers'
    hyper-parameters, and its byte model (docs/byte-model.md): ``accesses(u, kwargs)`` is
    the element accesses per parameter per step of an ideal fused implementation, ``u``
    those of the base update merged with the restore."""

    key: str
    kwargs: Mapping[str, Any]
    accesses: Callable[[int, Mapping[str, Any]], float]
    note: str
    #: Covered by the ``compiled`` baseline (no call-dependent branch, no closure).
    compilable: bool = False

    def __post_init__(self):
        object.__setattr__(self, "kwargs", _frozen(self.kwargs))


@dataclass(frozen=True)
class Algorithm:
    """One algorithm: how it is built and driven, and the cases the suites run."""

    name: str
    cls: type
    #: :data:`TWO_PASS`, :data:`CLOSURE` or :data:`ONE_PASS`.
    protocol: str
    #: The :class:`~sharpopt.backends.base.Ops` passes its step calls.
    passes: Tuple[str, ...]
    #: Small test hyper-parameters: the equivalence suite's case ``name``.
    defaults: Mapping[str, Any]
    #: Further cases; the case ``(name, defaults, EQUIVALENCE)`` is added in front unless
    #: a case already has that id in that suite, or ``equivalence`` is False.
    cases: Tuple[Case, ...] = ()
    #: Run the equivalence suite on ``defaults``; False only where another suite owns the
    #: algorithm's trajectories against ``reference`` (MSAM: tests/test_msam.py).
    equivalence: bool = True
    #: Base optimizers merged with the restore by the fused backends; () when the
    #: algorithm takes no base optimizer (``base=False``).
    fused_bases: Tuple[type, ...] = FUSABLE_BASES
    #: Whether the constructor takes a base optimizer class as its second argument.
    base: bool = True
    #: Whether a GradScaler's scale folds into the ascent (it depends on ``g`` only through
    #: ``g / ‖g‖``), so the first pass reads the scaled gradients without an unscale pass.
    folds_loss_scale: bool = False
    bench: Optional[Bench] = None
    notes: str = ""

    def __post_init__(self):
        object.__setattr__(self, "defaults", _frozen(self.defaults))
        object.__setattr__(self, "passes", tuple(self.passes))
        main = Case(self.name, self.defaults, EQUIVALENCE)
        if self.equivalence and not any(c.id == self.name and EQUIVALENCE in c.suites
                                        for c in self.cases):
            object.__setattr__(self, "cases", (main, *self.cases))

    def build(self, params, base_optimizer=None, **kwargs):
        """``cls(params, base_optimizer, **kwargs)``; without a base optimizer for an
        algorithm that takes none (a base given to one is an error)."""
        if not self.base:
            if base_optimizer is not None:
                raise TypeError(f"{self.name} takes no base optimizer, got {base_optimizer!r}")
            return self.cls(params, **kwargs)
        if base_optimizer is None:
            return self.cls(params, **kwargs)
        return self.cls(params, base_optimizer, **kwargs)


#: Every registered algorithm, in registration order (the order of the suites' test ids).
ALGORITHMS: Dict[str, Algorithm] = {}


def _check(entry: Algorithm) -> None:
    if not isinstance(entry.cls, type) or not issubclass(entry.cls, torch.optim.Optimizer):
        raise TypeError(f"{entry.name}: cls must be a torch.optim.Optimizer subclass, "
                        f"got {entry.cls!r}")
    if entry.protocol not in PROTOCOLS:
        raise ValueError(f"{entry.name}: protocol must be one of {PROTOCOLS}, "
                         f"got {entry.protocol!r}")
    unknown = [p for p in entry.passes if not callable(getattr(Ops, p, None))]
    if unknown:
        raise ValueError(f"{entry.name}: {unknown} are not passes of Ops")
    if not entry.base and entry.fused_bases:
        raise ValueError(f"{entry.name}: takes no base optimizer, so fused_bases must be ()")
    stray = [b for b in entry.fused_bases if b not in FUSABLE_BASES]
    if stray:
        raise ValueError(f"{entry.name}: the fused backends merge only {FUSABLE_BASES}, "
                         f"not {stray}")
    for case in entry.cases:
        if case.id == entry.name and EQUIVALENCE in case.suites and case.kwargs != entry.defaults:
            raise ValueError(f"{entry.name}: the equivalence case {case.id!r} must use the "
                             f"defaults {dict(entry.defaults)}, got {dict(case.kwargs)}")
        bad = [s for s in case.suites if s not in SUITES]
        if bad or not case.suites:
            raise ValueError(f"{entry.name}, case {case.id!r}: unknown suites {bad} "
                             f"(known: {list(SUITES)})")
    taken = {(s, c.id) for other in ALGORITHMS.values() if other.name != entry.name
             for c in other.cases for s in c.suites}
    mine = [(s, c.id) for c in entry.cases for s in c.suites]
    clash = sorted({k for k in mine if k in taken or mine.count(k) > 1})
    if clash:
        raise ValueError(f"{entry.name}: case ids already used in their suite: {clash}")
    keys = {o.bench.key for o in ALGORITHMS.values() if o.bench and o.name != entry.name}
    if entry.bench is not None and entry.bench.key in keys:
        raise ValueError(f"{entry.name}: bench key {entry.bench.key!r} is taken")


def register(entry: Algorithm) -> Algorithm:
    """Add ``entry`` (a name already registered is an error: :func:`unregister` first)."""
    if entry.name in ALGORITHMS:
        raise ValueError(f"algorithm {entry.name!r} is already registered")
    _check(entry)
    ALGORITHMS[entry.name] = entry
    return entry


def unregister(name: str) -> Algorithm:
    """Remove and return the entry ``name``."""
    return ALGORITHMS.pop(name)


@contextlib.contextmanager
def registered(entry: Algorithm) -> Iterator[Algorithm]:
    """Register ``entry`` for the ``with`` block (a test fixture's lifetime)."""
    register(entry)
    try:
        yield entry
    finally:
        unregister(entry.name)


def cases(suite: str) -> Dict[str, Tuple[Algorithm, Mapping[str, Any]]]:
    """``{case id: (algorithm, keywords)}`` of every case naming ``suite``, in registry
    order, read when called (so a temporarily registered algorithm is included)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r} (known: {list(SUITES)})")
    return {c.id: (a, c.kwargs) for a in ALGORITHMS.values() for c in a.cases
            if suite in c.suites}


# -- the algorithms ---------------------------------------------------------------------
_SGD, _ADAM, _ADAMW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
_SAM_PASSES = ("sumsq", "perturb", *RESTORE_UPDATE)
# Variants that keep g (copied with lincomb) and combine it with g_adv.
_KEEPING_PASSES = ("sumsq", "perturb", "dot", "lincomb", *RESTORE_UPDATE)

register(Algorithm(
    "SAM", SAM, TWO_PASS, _SAM_PASSES, dict(rho=0.05), folds_loss_scale=True,
    cases=(
        Case("SAM", dict(rho=0.05), EQUIVALENCE, STATE_DICT, SCHEDULES, SCHEDULES_BF16),
        Case("SAM-k2", dict(rho=0.05, k=2), EQUIVALENCE, STATE_DICT),
        Case("SAM", {}, RHO_ZERO, MICRO_BATCH),
        Case("SAM", dict(rho=0.1), GRAD_SCALER, SCALER_FOLD, SCALER_INF, TRAINER,
             TRAINER_SCALER),
        Case("SAM(k=2)+SGD", dict(base_optimizer=_SGD, rho=0.1, lr=0.1, momentum=0.9, k=2),
             COMPILED),
        Case("SAM+SGD", dict(base_optimizer=_SGD, rho=0.1, lr=0.1, momentum=0.9), SHARDED),
    ),
    bench=Bench("sam", dict(rho=0.05), lambda u, kw: 5 + u, compilable=True,
                note="norm (read g) 1 + perturb (read g, w; write w, saved) 4 + update u"),
))
register(Algorithm(
    "ASAM", ASAM, TWO_PASS, _SAM_PASSES, dict(rho=0.5, eta=0.01), folds_loss_scale=True,
    cases=(
        Case("ASAM", dict(rho=0.5, eta=0.01), EQUIVALENCE, SCHEDULES),
        Case("ASAM", dict(rho=0.5), GRAD_SCALER),
        Case("ASAM+AdamW", dict(base_optimizer=_ADAMW, lr=0.01), COMPILED),
        Case("ASAM+AdamW", dict(base_optimizer=_ADAMW, rho=0.5, lr=0.01, weight_decay=0.1),
             SHARDED),
    ),
    bench=Bench("asam", dict(rho=0.5, eta=0.01), lambda u, kw: 6 + u, compilable=True,
                note="norm (read g, w) 2 + perturb 4 + u"),
    notes="ASAM's paper defaults (rho 0.5, eta 0.01) are also the test defaults",
))
register(Algorithm(
    "GCSAM", GCSAM, TWO_PASS, _SAM_PASSES, dict(rho=0.05), folds_loss_scale=True,
    cases=(
        Case("GCSAM", dict(rho=0.05), EQUIVALENCE, SCHEDULES, SCHEDULES_BF16),
        Case("GCSAM-raw-adaptive", dict(rho=0.2, norm="raw", adaptive=True), EQUIVALENCE),
        Case("GCSAM", {}, RHO_ZERO),
        Case("GCSAM", dict(rho=0.1), GRAD_SCALER, SCALER_FOLD, SCALER_INF),
        Case("GCSAM+SGD", dict(base_optimizer=_SGD, lr=0.1), COMPILED),
        Case("GCSAM+SGD", dict(base_optimizer=_SGD, rho=0.1, lr=0.1, momentum=0.9), SHARDED),
    ),
    bench=Bench("gcsam", dict(rho=0.05), lambda u, kw: 5 + u, compilable=True,
                note="as SAM: the row sums ride in the norm pass; + u"),
))
register(Algorithm(
    "GSAM", GSAM, TWO_PASS, _KEEPING_PASSES, dict(rho=0.05, alpha=0.4),
    cases=(
        Case("GSAM", dict(rho=0.05, alpha=0.4), EQUIVALENCE, SCHEDULES),
        Case("GSAM", {}, MICRO_BATCH),
        Case("GSAM", dict(rho=0.1, alpha=0.3), GRAD_SCALER, SCALER_FOLD, TRAINER,
             TRAINER_SCALER),
        Case("GSAM+SGD", dict(base_optimizer=_SGD, lr=0.1), COMPILED),
        Case("GSAM+SGD", dict(base_optimizer=_SGD, rho=0.1, alpha=0.3, lr=0.1), SHARDED),
    ),
    bench=Bench("gsam", dict(rho=0.05, alpha=0.4), lambda u, kw: 1 + 5 + 2 + u + 1,
                compilable=True,
                note="norm 1 + perturb & keep g (write g0) 5 + dot/norm (read g0, g_p) 2 + "
                     "update that also reads g0: u + 1"),
))
register(Algorithm(
    "WSAM", WSAM, TWO_PASS, ("sumsq", "perturb", "lincomb", *RESTORE_UPDATE),
    dict(rho=0.05, gamma=0.8),
    cases=(
        Case("WSAM", dict(rho=0.05, gamma=0.8), EQUIVALENCE),
        Case("WSAM-coupled-clip", dict(rho=0.05, gamma=0.5, decouple=False, max_norm=0.5),
             EQUIVALENCE),
        Case("WSAM", dict(rho=0.05), SCHEDULES),
        Case("WSAM", {}, MICRO_BATCH),
        Case("WSAM", dict(rho=0.1), TRAINER),
        Case("WSAM+SGD", dict(base_optimizer=_SGD, lr=0.1, max_norm=0.5), COMPILED),
        Case("WSAM+SGD", dict(base_optimizer=_SGD, rho=0.1, max_norm=0.5, lr=0.1,
                              momentum=0.9), SHARDED),
    ),
    bench=Bench("wsam", dict(rho=0.05, gamma=0.9), lambda u, kw: 1 + 5 + u + 1,
                compilable=True,
                note="norm 1 + perturb & keep g 5 + update with g then w -= c (g_p - g), "
                     "merged: u + 1"),
))
register(Algorithm(
    "CRSAM", CRSAM, CLOSURE, ("sumsq", "perturb", "lincomb", *RESTORE_UPDATE),
    dict(rho=0.05, gamma=0.1, beta=0.1), folds_loss_scale=True,
    cases=(
        Case("CRSAM+SGD", dict(base_optimizer=_SGD, rho=0.1, lr=0.1), SHARDED),
    ),
    bench=Bench("crsam", dict(rho=0.05, gamma=0.1, beta=0.1), lambda u, kw: 1 + 5 + 5 + u + 2,
                note="norm 1 + perturb & keep g0 5 + keep g+ and move to w - e (read g+, "
                     "saved, g0; write g+, w) 5 + combine & update (reads g-, g+, g0): u + 2"),
))
register(Algorithm(
    "LookSAM", LookSAM, TWO_PASS, _KEEPING_PASSES, dict(rho=0.05, k=2, alpha=0.7),
    cases=(
        Case("LookSAM-k3", dict(rho=0.05, k=3), STATE_DICT),
        Case("LookSAM", dict(rho=0.1, k=2), TRAINER),
        Case("LookSAM+SGD", dict(base_optimizer=_SGD, lr=0.1, k=2), COMPILED),
        Case("LookSAM+Adam", dict(base_optimizer=_ADAM, rho=0.1, k=2, lr=0.01), SHARDED),
    ),
    bench=Bench("looksam", dict(rho=0.05, k=5, alpha=0.7),
                lambda u, kw: ((1 + 5 + 2 + u + 2) + (kw["k"] - 1) * (2 + u + 1)) / kw["k"],
                note="every k-th call: norm 1 + perturb & keep g 5 + dot 2 + update writing "
                     "g_v u + 2; other calls: norms of g, g_v 2 + update reading g_v u + 1; "
                     "averaged over k"),
    notes="a timed benchmark sample is one cycle of k calls",
))
register(Algorithm(
    "FriendlySAM", FriendlySAM, TWO_PASS, ("sumsq", "lincomb", "perturb", *RESTORE_UPDATE),
    dict(rho=0.05, sigma=1.0, lam=0.9),
    cases=(
        Case("FriendlySAM", {}, RHO_ZERO),
        Case("FriendlySAM", dict(rho=0.05), STATE_DICT),
        Case("FriendlySAM", dict(rho=0.1), GRAD_SCALER, SCALER_INF),
        Case("FriendlySAM+SGD", dict(base_optimizer=_SGD, lr=0.1), COMPILED),
        Case("FriendlySAM+SGD", dict(base_optimizer=_SGD, rho=0.1, lr=0.1), SHARDED),
    ),
    bench=Bench("friendlysam", dict(rho=0.05, sigma=1.0, lam=0.95), lambda u, kw: 2 + 6 + u,
                compilable=True,
                note="norm of g - sigma m (read g, m) 2 + perturb & update m (read g, m, w; "
                     "write w, saved, m) 6 + u"),
))
register(Algorithm(
    "RBO", RBO, CLOSURE, ("sumsq", "lincomb", "restore"),
    dict(lr=0.05, rho=0.05, inner_steps=3, inner_lr=0.2), fused_bases=(), base=False,
    cases=(
        Case("RBO", dict(lr=0.05, rho=0.1, inner_steps=2), SHARDED),
    ),
    bench=Bench("rbo", dict(lr=0.01, rho=0.05, inner_steps=5, inner_lr=0.2),
                lambda u, kw: 1 + 3 + 4 * kw["inner_steps"],
                note="norm 1 + centre (read w, g; write centre) 3 + K inner steps (read x, "
                     "centre, g; write x) 4 each; no base optimizer"),
    notes="its own optimizer: no base; the equivalence suite runs it fp32/bf16, 3 steps",
))
register(Algorithm(
    "MSAM", MSAM, ONE_PASS, ("sumsq", "lincomb", "msam_sgd", "msam_adam"), dict(rho=0.3),
    equivalence=False,
    notes="one gradient per step; tested by tests/test_msam.py and benchmarked by "
          "bench/bench_msam.py (SGD needs momentum > 0)",
))
