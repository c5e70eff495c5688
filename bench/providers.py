"""Who computes the step: the plain-PyTorch baselines users run today, and sharpopt.

Baselines (written here, in plain PyTorch, for every algorithm of sharpopt):

* ``eager``  — the for-loop wrapper of the common public SAM code: a Python loop over the
  tensors; the global norm is the norm of the stacked per-tensor norms; the weights are
  saved with ``p.data.clone()`` on every step, perturbed with ``e = g * scale; p.add_(e)``
  and restored by pointing ``p.data`` back at the clone; then the base optimizer steps
  with torch's default implementation for the device (the for-loop on CPU).
* ``foreach`` — the same algorithm with ``torch._foreach_*`` list ops, a saved-weights
  buffer allocated once and copied into, and the base optimizer with ``foreach=True``.
* ``eager+fused-base`` — the ``eager`` perturbation, base optimizer with ``fused=True``.
* ``compiled`` — ``torch.compile`` of the ``foreach`` wrapper's ``first_step`` and
  ``second_step`` (base optimizer step included in the compiled region).

The algorithms, their hyper-parameters and closure needs come from
:mod:`sharpopt.registry` (every entry with ``bench`` settings, by its ``bench.key``). An
algorithm without a plain baseline below is benchmarked on sharpopt's backends only.

sharpopt: one provider per backend that ``sharpopt.available_backends(device)`` lists
(``sharpopt:reference``, ``sharpopt:foreach``, ``sharpopt:cpu``, ``sharpopt:cuda``,
``sharpopt:triton``). Triton on CPU tensors only runs under its interpreter, which is a
correctness tool, so it is not benchmarked there.

Every provider exposes the protocol of sharpopt's optimizers: ``first_step()`` returning
whether a second pass is needed, ``second_step()``, and ``step(closure)`` for CR-SAM and
RBO. :func:`run_step` drives any of them through one step of the workload.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import sharpopt
from sharpopt import registry

#: The benchmarked algorithms: registry entries with benchmark settings, by their key.
BENCHED: Dict[str, registry.Algorithm] = {
    a.bench.key: a for a in registry.ALGORITHMS.values() if a.bench is not None}
ALGOS = list(BENCHED)
CLOSURE_ALGOS = tuple(k for k, a in BENCHED.items() if a.protocol == registry.CLOSURE)

#: Hyperparameters: the papers' defaults (ASAM: rho 0.5, eta 0.01; LookSAM k = 5).
ALGO_KW: Dict[str, dict] = {k: dict(a.bench.kwargs) for k, a in BENCHED.items()}

BASES: Dict[str, Tuple[type, dict]] = {
    "sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
}

EPS = 1e-12


def calls_per_sample(algo: str) -> int:
    """Where the cost depends on the call (LookSAM's ``k``: the full step every k-th call),
    a timed sample is one cycle of ``k`` calls."""
    return int(ALGO_KW[algo].get("k", 1))


# -- the plain-PyTorch baselines ------------------------------------------------------
class Plain:
    """One sharpness-aware algorithm written the way user code writes it.

    ``loop=True``: per-tensor ops in a Python loop, a fresh clone of the weights each step
    and a pointer restore (``p.data = old``); ``loop=False``: ``torch._foreach_*`` ops and
    preallocated buffers. Both follow docs/algorithms.md, so they compute the same
    numbers as sharpopt (checked by ``bench.__main__`` before timing).
    """

    #: The algorithms written here (a registry entry outside this list has no baseline).
    ALGOS = ("sam", "asam", "gcsam", "gsam", "wsam", "crsam", "looksam", "friendlysam", "rbo")

    def __init__(self, params, algo: str, base: str, *, loop: bool, fused_base: bool = False):
        self.params = list(params)
        self.algo, self.loop = algo, loop
        self.kw = dict(ALGO_KW[algo])
        self.calls = 0
        self.base = None
        if algo != "rbo":
            cls, base_kw = BASES[base]
            extra = {"fused": True} if fused_base else ({} if loop else {"foreach": True})
            self.base = cls(self.params, **base_kw, **extra)
        self._bufs: Dict[str, List[Tensor]] = {}
        self.saved: List[Tensor] = []
        self.m: Optional[List[Tensor]] = None      # Friendly-SAM's running mean
        self.g_v: Optional[List[Tensor]] = None    # LookSAM's orthogonal component

    # list helpers: one line each for the loop style and the foreach style
    @property
    def grads(self) -> List[Tensor]:
        return [p.grad for p in self.params]

    def _norm(self, xs) -> Tensor:
        if self.loop:
            return torch.norm(torch.stack([x.norm(p=2) for x in xs]), p=2)
        return torch.norm(torch.stack(torch._foreach_norm(xs)), p=2)

    def _dot(self, xs, ys) -> Tensor:
        return torch.stack([torch.dot(x.flatten(), y.flatten()) for x, y in zip(xs, ys)]).sum()

    def _buf(self, name: str) -> List[Tensor]:
        if name not in self._bufs:
            self._bufs[name] = [torch.empty_like(p) for p in self.params]
        return self._bufs[name]

    def _keep(self, name: str, xs) -> List[Tensor]:
        """A copy of ``xs`` (fresh clones in the loop style, a reused buffer otherwise)."""
        if self.loop:
            return [x.detach().clone() for x in xs]
        out = self._buf(name)
        torch._foreach_copy_(out, xs)
        return out

    def _add_scaled(self, ps, vs, scale, t2=None) -> None:
        """``p += scale · (t2 ⊙) v``."""
        if self.loop:
            for i, (p, v) in enumerate(zip(ps, vs)):
                e = v * scale if t2 is None else t2[i] * v * scale
                p.add_(e)
            return
        e = torch._foreach_mul(vs, scale)
        if t2 is not None:
            torch._foreach_mul_(e, t2)
        torch._foreach_add_(ps, e)

    def _restore(self) -> None:
        if self.loop:
            for p, old in zip(self.params, self.saved):
                p.data = old
        else:
            torch._foreach_copy_(self.params, self.saved)

    def _lincomb(self, out, terms) -> None:
        """``out ← Σ c · xs`` (``out`` may be one of the ``xs``)."""
        if self.loop:
            for i, o in enumerate(out):
                acc = terms[0][1][i] * terms[0][0]
                for c, xs in terms[1:]:
                    acc = acc + xs[i] * c
                o.copy_(acc)
            return
        acc = torch._foreach_mul(terms[0][1], terms[0][0])
        for c, xs in terms[1:]:
            torch._foreach_add_(acc, torch._foreach_mul(xs, c))
        torch._foreach_copy_(out, acc)

    # the algorithms
    def _direction(self, gs):
        """``(v, T, u)``: ascent direction, ASAM's ``T`` (or None), the tensors to norm."""
        a = self.algo
        if a == "gcsam":
            v = [g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True) if g.dim() > 1 else g
                 for g in gs]
            return v, None, v
        if a == "asam":
            eta = self.kw["eta"]
            if self.loop:
                t = [p.abs() + eta for p in self.params]
                return gs, t, [ti * g for ti, g in zip(t, gs)]
            t = torch._foreach_add(torch._foreach_abs(self.params), eta)
            return gs, t, torch._foreach_mul(t, gs)
        return gs, None, gs

    def _perturb(self, gs) -> Tensor:
        v, t, u = self._direction(gs)
        scale = self.kw["rho"] / (self._norm(u) + EPS)
        self.saved = self._keep("saved", self.params)
        t2 = None if t is None else ([x * x for x in t] if self.loop else torch._foreach_mul(t, t))
        self._add_scaled(self.params, v, scale, t2)
        return scale

    @torch.no_grad()
    def first_step(self) -> bool:
        a, gs = self.algo, self.grads
        self.calls += 1
        if a == "looksam" and (self.calls - 1) % self.kw["k"] != 0 and self.g_v is not None:
            coef = self.kw["alpha"] * self._norm(gs) / (self._norm(self.g_v) + EPS)
            self._lincomb(gs, [(1.0, gs), (coef, self.g_v)])
            self.base.step()
            return False
        if a in ("gsam", "wsam", "looksam"):
            self.g0 = self._keep("g0", gs)
        if a == "friendlysam":
            if self.m is None:
                self.m = [g.detach().clone() for g in gs]
                d = gs
            else:
                s, lam = self.kw["sigma"], self.kw["lam"]
                if self.loop:
                    d = [g - s * m for g, m in zip(gs, self.m)]
                    for m, g in zip(self.m, gs):
                        m.mul_(lam).add_(g, alpha=1 - lam)
                else:
                    d = torch._foreach_add(gs, self.m, alpha=-s)
                    torch._foreach_mul_(self.m, lam)
                    torch._foreach_add_(self.m, gs, alpha=1 - lam)
            gs = d
        self._perturb(gs)
        return True

    @torch.no_grad()
    def second_step(self) -> None:
        a, gs = self.algo, self.grads
        if a == "gsam":
            alpha = self.kw["alpha"]
            coef = 1.0 + alpha * self._dot(self.g0, gs) / (self._norm(gs) ** 2 + EPS)
            self._lincomb(gs, [(coef, gs), (-alpha, self.g0)])
        if a == "looksam":
            coef = -self._dot(self.g0, gs) / (self._norm(self.g0) ** 2 + EPS)
            if self.g_v is None:
                self.g_v = [torch.empty_like(p) for p in self.params]
            self._lincomb(self.g_v, [(1.0, gs), (coef, self.g0)])
        self._restore()
        if a == "wsam":
            g_p = gs
            for p, g in zip(self.params, self.g0):
                p.grad = g
            self.base.step()
            c = (self.kw["gamma"] / (1 - self.kw["gamma"])) * self.base.param_groups[0]["lr"]
            self._lincomb(self.params, [(1.0, self.params), (-c, g_p), (c, self.g0)])
            for p, g in zip(self.params, g_p):
                p.grad = g
            return
        self.base.step()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]):
        with torch.enable_grad():
            self.zero_grad()
            loss = closure()
        if self.algo == "rbo":
            return self._rbo(closure, loss)
        # CR-SAM: g0 at w, g+ at w + e, g- at w - e
        g0 = self._keep("g0", self.grads)
        scale = self._perturb(g0)
        with torch.enable_grad():
            self.zero_grad()
            closure()
        g_plus = self._keep("gplus", self.grads)
        if self.loop:
            for p, s, g in zip(self.params, self.saved, g0):
                p.data = s.clone()
                p.sub_(g * scale)
        else:
            torch._foreach_copy_(self.params, self.saved)
            torch._foreach_add_(self.params, torch._foreach_mul(g0, -scale))
        with torch.enable_grad():
            self.zero_grad()
            closure()
        gam, bet = self.kw["gamma"], self.kw["beta"]
        gs = self.grads
        self._lincomb(gs, [(1 + gam + bet, g_plus), (gam - bet, gs), (-2 * gam, g0)])
        self._restore()
        self.base.step()
        return loss

    def _rbo(self, closure, loss):
        kw = self.kw
        lr, rho, beta = kw["lr"], kw["rho"], kw["inner_lr"]
        gs = self.grads
        g_sq = self._norm(gs) ** 2
        s = torch.sqrt(1.0 + g_sq)
        centre = self._buf("centre") if not self.loop else [torch.empty_like(p) for p in gs]
        self._lincomb(centre, [(1.0, self.params), (-(rho / s + lr), gs)])
        self.saved = self._keep("saved", self.params)
        centre_l = loss.detach().float() + rho / s - lr * g_sq
        lx = loss.detach().float()
        for k in range(kw["inner_steps"]):
            if k:
                with torch.enable_grad():
                    self.zero_grad()
                    lx = closure().detach().float()
            gs = self.grads
            self._lincomb(self.params, [(1.0 - beta, self.params), (beta, centre),
                                        (-beta * (lx - centre_l), gs)])
        return loss


# -- the registry -----------------------------------------------------------------------
class Provider:
    """A named way to build an optimizer for a parameter set; ``why_not`` is a reason it
    cannot run here (then it is listed as n/a)."""

    def __init__(self, name: str, build: Callable, note: str, why_not: Optional[str] = None):
        self.name, self.build, self.note, self.why_not = name, build, note, why_not


def _sharpopt(params, algo: str, base: str, backend: str):
    entry = BENCHED[algo]
    if not entry.base:
        return entry.build(params, backend=backend, **ALGO_KW[algo])
    base_cls, base_kw = BASES[base]
    return entry.build(params, base_cls, backend=backend, **ALGO_KW[algo], **base_kw)


def _fused_base_why_not(base: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    cls, kw = BASES[base]
    p = torch.nn.Parameter(torch.zeros(4, device=device, dtype=dtype))
    p.grad = torch.ones_like(p)
    try:
        cls([p], **kw, fused=True).step()
    except Exception as exc:  # torch says why (device or dtype not supported)
        return f"torch {torch.__version__}: {cls.__name__}(fused=True): {exc}".splitlines()[0]
    return None


class Compiled:
    """``torch.compile`` of the foreach wrapper's two steps (compiled on the first call)."""

    def __init__(self, params, algo: str, base: str):
        self.inner = Plain(params, algo, base, loop=False)
        self.first_step = torch.compile(self.inner.first_step)
        self.second_step = torch.compile(self.inner.second_step)


#: The compiled provider covers the two-pass algorithms without call-dependent branches
#: (LookSAM's every-k switch would recompile; CR-SAM and RBO run the user's closure inside
#: the step, which torch.compile cannot trace as one region): the registry's
#: ``bench.compilable``.
COMPILABLE = tuple(k for k, a in BENCHED.items() if a.bench.compilable)


def providers(device: torch.device, dtype: torch.dtype, algo: str, base: str, *,
              compile_: bool, compile_why_not: str = "") -> List[Provider]:
    """Every provider for this case, in table order; unavailable ones carry ``why_not``."""
    plain_no = None if algo in Plain.ALGOS else f"no plain-PyTorch baseline for {algo}"
    out = [
        Provider("eager", lambda ps: Plain(ps, algo, base, loop=True),
                 "for-loop wrapper (per-tensor clone/scale/add) + torch default base step",
                 plain_no),
        Provider("foreach", lambda ps: Plain(ps, algo, base, loop=False),
                 "torch._foreach_* wrapper + base(foreach=True)", plain_no),
    ]
    fused_no = plain_no
    if fused_no is None and not BENCHED[algo].base:
        fused_no = f"{BENCHED[algo].name} has no base optimizer"
    fused_no = fused_no or _fused_base_why_not(base, device, dtype)
    out.append(Provider("eager+fused-base",
                        lambda ps: Plain(ps, algo, base, loop=True, fused_base=True),
                        "for-loop perturbation + base(fused=True)", fused_no))
    if plain_no is not None:
        why = plain_no
    elif algo not in COMPILABLE:
        why = f"{algo} is not in the compiled provider (call-dependent branches or a closure)"
    elif not compile_:
        why = compile_why_not or "not requested (--compile)"
    else:
        why = None
    out.append(Provider("compiled", lambda ps: Compiled(ps, algo, base),
                        "torch.compile of the foreach wrapper's steps", why))
    for name in sharpopt.available_backends(device):
        if name == "triton" and device.type == "cpu":
            continue
        out.append(Provider(f"sharpopt:{name}",
                            lambda ps, name=name: _sharpopt(ps, algo, base, name),
                            f"sharpopt backend {name!r}"))
    return out


# -- driving one step -------------------------------------------------------------------
def run_step(opt, pset, algo: str, on_perturbed: Optional[Callable[[], None]] = None) -> None:
    """One optimizer step of the workload. Gradients "arrive" by pointing ``p.grad`` at a
    pre-made set (set 0 before the ascent, set 1 after it, set 2 for CR-SAM's third pass
    and RBO's inner steps): what a backward pass leaves, without its cost.
    ``on_perturbed`` is called between the two steps of a two-pass algorithm (the
    benchmark compares the perturbed weights there)."""
    if algo in CLOSURE_ALGOS:
        calls = [0]
        loss = torch.ones((), device=pset.params[0].device)

        def closure():
            pset.use_grads(min(calls[0], 2))
            calls[0] += 1
            return loss

        opt.step(closure)
        return
    pset.use_grads(0)
    if opt.first_step():
        if on_perturbed is not None:
            on_perturbed()
        pset.use_grads(1)
        opt.second_step()
