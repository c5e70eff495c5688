"""When to pay for SAM: schedules that decide, step by step, whether a step perturbs.

A schedule is passed as ``schedule=`` to :class:`~sharpopt.SAM`, :class:`~sharpopt.ASAM`,
:class:`~sharpopt.GCSAM`, :class:`~sharpopt.GSAM` and :class:`~sharpopt.WSAM`. At each
``first_step`` (``t = 0, 1, 2, ...``, counting the first steps that completed) it says whether
this step is a full two-pass step (the caller runs the second forward/backward) or a plain
``Base.step(g)`` that ``first_step`` finishes itself (it then returns False, and
``step(closure)`` evaluates the closure once).

* :class:`EveryK` — steps ``t = 0, k, 2k, ...`` (the ``k=`` keyword of the wrappers).
* :class:`Random` — RST / SS-SAM (Zhao, Zhang & Hu, 2022): perturb with probability ``p_t``,
  constant or linear from ``p`` to ``p_end`` over ``steps``. The draw of step ``t`` is a
  function of ``(seed, t)`` only (a generator seeded from both, on the host), so every rank
  draws the same decisions, a resumed run draws what the uninterrupted one would, and no
  device value is read.
* :class:`Adaptive` — AE-SAM (Jiang, Yang, Zhang & Kwok, "An Adaptive Policy to Employ
  Sharpness-Aware Minimization", ICLR 2023): EMAs of the squared gradient norm
  ``μ ← δμ + (1 − δ)‖g‖²``, ``σ² ← δσ² + (1 − δ)(‖g‖² − μ)²``; perturb iff
  ``‖g‖² ≥ μ + c_t·σ`` with ``c_t`` linear from ``λ1`` to ``λ2`` over ``steps``.
* :class:`LatePhase` — plain steps before step ``start``, SAM from it on (Zhou et al.,
  ICLR 2025: SAM's benefit comes from the late phase of training).

Only :class:`Adaptive` needs a device value on the host: the norm that the ascent computes
anyway (``‖g‖`` for SAM, ``‖T ⊙ g‖`` for ASAM, ``‖GC(g)‖`` for GCSAM — the one its
perturbation divides by) is read once per step, a single host synchronisation; on the steps
that perturb the ascent reuses it, so the gradients are still read once for the norm.
Schedules keep their state (the EMAs) in the optimizer's ``state_dict()``.
"""
from __future__ import annotations

import math
import random
from typing import Optional

__all__ = ["Schedule", "EveryK", "Random", "Adaptive", "LatePhase"]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


class Schedule:
    """Base class: ``decide(t, sq_norm)`` says whether step ``t`` perturbs.

    ``needs_norm``: the decision needs ``‖·‖²`` of the ascent's direction (a host read).
    """

    needs_norm = False

    def decide(self, t: int, sq_norm: Optional[float] = None) -> bool:  # pragma: no cover
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Mutable state (counters live in the optimizer; most schedules have none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class EveryK(Schedule):
    """Perturb on steps ``t = 0, k, 2k, ...`` (the 1st, k+1-th, ... call)."""

    def __init__(self, k: int):
        self.k = _positive_int("k", k)

    def decide(self, t, sq_norm=None):
        return t % self.k == 0


class Random(Schedule):
    """RST / SS-SAM: perturb step ``t`` with probability ``p_t``.

    ``p_t = p`` when ``p_end`` is None, else linear from ``p`` (at ``t = 0``) to ``p_end`` (at
    ``t = steps`` and after). The uniform draw of step ``t`` comes from a generator seeded with
    ``(seed, t)``: the same on every rank and after a resume, whatever happened before.
    """

    def __init__(self, p: float = 0.5, *, p_end: Optional[float] = None,
                 steps: Optional[int] = None, seed: int = 0):
        self.p = _real("p", p)
        self.p_end = None if p_end is None else _real("p_end", p_end)
        for name, v in (("p", self.p), ("p_end", self.p_end)):
            if v is not None and not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if self.p_end is not None:
            self.steps = _positive_int("steps", steps)
        elif steps is not None:
            raise ValueError("steps is the length of the linear schedule from p to p_end; "
                             "give p_end too (or neither)")
        else:
            self.steps = None
        self.seed = _positive_int("seed", seed, minimum=0)

    def probability(self, t: int) -> float:
        if self.p_end is None:
            return self.p
        frac = min(t / self.steps, 1.0)
        return self.p + (self.p_end - self.p) * frac

    def draw(self, t: int) -> float:
        """The uniform number in [0, 1) of step ``t`` (a function of ``(seed, t)``)."""
        return random.Random(f"sharpopt.schedules.Random:{self.seed}:{t}").random()

    def decide(self, t, sq_norm=None):
        return self.draw(t) < self.probability(t)


class Adaptive(Schedule):
    """AE-SAM (Jiang, Yang, Zhang & Kwok, ICLR 2023): SAM where the gradient norm is large.

    At step ``t``, with ``q = ‖g‖²`` (the squared norm the ascent divides by)::

        μ  ← δ·μ + (1 − δ)·q
        σ² ← δ·σ² + (1 − δ)·(q − μ)²            (with the new μ)
        c_t = λ1 + (λ2 − λ1) · min(t / steps, 1)
        perturb iff q ≥ μ + c_t·σ

    ``μ`` and ``σ²`` start at 0. ``steps`` is the length of the run in steps (the paper's
    ``T``). Defaults ``δ = 0.9``, ``λ1 = −1``, ``λ2 = 1``: early on most steps perturb
    (``c_t < 0``), late only the steps whose gradient norm is above its running mean by
    more than a standard deviation. A non-finite ``q`` (an overflowing step, which the
    optimizer then refuses or skips) leaves the EMAs as they were.

    The decision reads ``q`` on the host: one synchronisation per step.
    """

    needs_norm = True

    def __init__(self, steps: int, *, delta: float = 0.9, lambda1: float = -1.0,
                 lambda2: float = 1.0):
        self.steps = _positive_int("steps", steps)
        self.delta = _real("delta", delta)
        if not 0 <= self.delta < 1:
            raise ValueError(f"delta must be in [0, 1), got {delta!r}")
        self.lambda1 = _real("lambda1", lambda1)
        self.lambda2 = _real("lambda2", lambda2)
        self._mu = 0.0
        self._var = 0.0

    def threshold_coef(self, t: int) -> float:
        return self.lambda1 + (self.lambda2 - self.lambda1) * min(t / self.steps, 1.0)

    def decide(self, t, sq_norm=None):
        if sq_norm is None:
            raise ValueError("the adaptive schedule needs the squared gradient norm")
        q = float(sq_norm)
        if not math.isfinite(q):
            return True   # let the step's own non-finite handling refuse or skip it
        d = self.delta
        self._mu = d * self._mu + (1 - d) * q
        self._var = d * self._var + (1 - d) * (q - self._mu) ** 2
        return q >= self._mu + self.threshold_coef(t) * math.sqrt(self._var)

    def state_dict(self):
        return {"mu": self._mu, "var": self._var}

    def load_state_dict(self, state):
        self._mu, self._var = float(state["mu"]), float(state["var"])


class LatePhase(Schedule):
    """Plain base steps for ``t < start``, SAM from step ``start`` on."""

    def __init__(self, start: int):
        self.start = _positive_int("start", start, minimum=0)

    def decide(self, t, sq_norm=None):
        return t >= self.start
