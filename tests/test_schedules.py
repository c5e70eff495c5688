"""SAM schedules: decisions from the rule and the seed, the same on two gloo ranks, state in
state_dict(), and every backend against the reference with each schedule.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import sharpopt
from sharpopt import registry
from conftest import FAST_BACKENDS, require_backend
from sharpopt.schedules import Adaptive, EveryK, LatePhase, Random
from test_backends import BASES, batches, closure_for, compare, make_model, sync

SCHEDULES = {
    "random": lambda: Random(0.5, seed=11),
    "random-linear": lambda: Random(0.2, p_end=0.9, steps=6, seed=2),
    "adaptive": lambda: Adaptive(steps=6),
    "late": lambda: LatePhase(2),
}


def _decisions(opt, model, data):
    """Run ``opt`` through first_step/second_step; the list of first_step's answers."""
    out = []
    for x, y in data:
        opt.zero_grad()
        closure_for(model, x, y)()
        perturbed = opt.first_step(zero_grad=True)
        out.append(perturbed)
        if perturbed:
            closure_for(model, x, y)()
            opt.second_step(zero_grad=True)
    return out


def test_random_draws_are_a_function_of_seed_and_step():
    a, b, c = Random(0.3, seed=5), Random(0.3, seed=5), Random(0.3, seed=6)
    da = [a.decide(t) for t in range(2000)]
    assert da == [b.decide(t) for t in range(2000)], "same seed, different decisions"
    assert da != [c.decide(t) for t in range(2000)], "another seed gave the same decisions"
    # The draw of step t does not depend on the draws before it (resume, ranks).
    assert [a.decide(t) for t in range(1500, 2000)] == da[1500:]
    frac = sum(da) / len(da)
    assert abs(frac - 0.3) < 0.05, f"fraction of SAM steps {frac:.3f} for p = 0.3"


def test_random_linear_probability():
    s = Random(0.2, p_end=0.8, steps=10)
    got = [s.probability(t) for t in (0, 5, 10, 20)]
    assert got == pytest.approx([0.2, 0.5, 0.8, 0.8]), got
    assert all(Random(1.0).decide(t) for t in range(100))
    assert not any(Random(0.0).decide(t) for t in range(100))


def test_every_k_and_late_phase_rules():
    assert [EveryK(3).decide(t) for t in range(7)] == [1, 0, 0, 1, 0, 0, 1]
    assert [LatePhase(3).decide(t) for t in range(6)] == [0, 0, 0, 1, 1, 1]


def _ae_sam_rule(sq_norms, steps, delta=0.9, lam1=-1.0, lam2=1.0):
    """AE-SAM's decisions written out from the paper's formulas."""
    mu = var = 0.0
    out = []
    for t, q in enumerate(sq_norms):
        mu = delta * mu + (1 - delta) * q
        var = delta * var + (1 - delta) * (q - mu) ** 2
        c = lam1 + (lam2 - lam1) * min(t / steps, 1.0)
        out.append(q >= mu + c * math.sqrt(var))
    return out


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_adaptive_decides_from_the_gradient_norm(backend):
    """The optimizer's decisions are the AE-SAM rule applied to ‖g‖² of each step's first
    gradient (computed here independently, in fp64)."""
    require_backend(backend)
    dtype = torch.float32
    model = make_model(dtype)
    steps = 12
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9,
                       schedule=Adaptive(steps=steps), backend=backend)
    decided, sq = [], []
    for x, y in batches(dtype, steps):
        opt.zero_grad()
        closure_for(model, x, y)()
        sq.append(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
        perturbed = opt.first_step(zero_grad=True)
        decided.append(perturbed)
        if perturbed:
            closure_for(model, x, y)()
            opt.second_step(zero_grad=True)
    expected = _ae_sam_rule(sq, steps)
    assert decided == expected, f"decisions {decided} != rule {expected}"
    assert 0 < sum(decided) < steps, f"the test should see both kinds of step: {decided}"


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_matches_decide(name):
    """first_step perturbs exactly on the steps the schedule object says (replayed on a
    fresh copy of the schedule, fed the same norms for the adaptive one)."""
    dtype = torch.float64
    model = make_model(dtype)
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9,
                       schedule=SCHEDULES[name](), backend="reference")
    decided = _decisions(opt, model, batches(dtype, 8))
    if name != "adaptive":
        fresh = SCHEDULES[name]()
        assert decided == [fresh.decide(t) for t in range(8)]


def _train(cls, kwargs, backend, dtype, steps, base="SGD-nesterov-wd"):
    base_cls, base_kwargs = BASES[base]
    model = make_model(dtype)
    opt = cls(model.parameters(), base_cls, backend=backend, **kwargs, **base_kwargs)
    return model, opt


ALGOS = {name: (algo.cls, kw) for name, (algo, kw) in
         registry.cases(registry.SCHEDULES).items()}


# Every algorithm and schedule in fp32; bf16 with SAM and GCSAM (the schedule's decision is
# independent of the dtype; bf16 checks the rounding of the plain and the two-pass steps).
CASES = ([(a, n, torch.float32) for a in ALGOS for n in SCHEDULES]
         + [(a, n, torch.bfloat16) for a in registry.cases(registry.SCHEDULES_BF16)
            for n in SCHEDULES])


@pytest.mark.parametrize("algo,name,dtype", CASES,
                         ids=[f"{a}-{n}-{str(d).replace('torch.', '')}" for a, n, d in CASES])
def test_backend_matches_reference_with_schedule(fast_backend, algo, name, dtype):
    cls, kwargs = ALGOS[algo]
    steps = 6
    ref_model, ref_opt = _train(cls, {**kwargs, "schedule": SCHEDULES[name]()}, "reference",
                                dtype, steps)
    model = copy.deepcopy(ref_model)
    base_cls, base_kwargs = BASES["SGD-nesterov-wd"]
    opt = cls(model.parameters(), base_cls, backend=fast_backend, schedule=SCHEDULES[name](),
              **kwargs, **base_kwargs)
    seen = []
    for step, (x, y) in enumerate(batches(dtype, steps)):
        ref_opt.step(closure_for(ref_model, x, y))
        opt.step(closure_for(model, x, y))
        seen.append(ref_opt._decision.perturb)
        assert opt._decision.perturb == ref_opt._decision.perturb, f"step {step}: decisions differ"
        compare(step, ref_model, model, ref_opt, opt, dtype)
        if dtype == torch.bfloat16:
            sync(ref_model, model, ref_opt, opt)
    if name != "adaptive":
        assert not all(seen) and any(seen), f"schedule {name} should mix both kinds: {seen}"


def test_every_k_schedule_is_the_k_keyword():
    dtype = torch.float64
    a, b = make_model(dtype), make_model(dtype)
    kw = dict(rho=0.05, lr=0.05, momentum=0.9, backend="reference")
    oa = sharpopt.SAM(a.parameters(), torch.optim.SGD, k=3, **kw)
    ob = sharpopt.SAM(b.parameters(), torch.optim.SGD, schedule=EveryK(3), **kw)
    data = batches(dtype, 7)
    assert _decisions(oa, a, data) == _decisions(ob, b, data) == [1, 0, 0, 1, 0, 0, 1]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_adaptive_state_resumes_with_state_dict():
    """Decisions after a resume equal those of the uninterrupted run (the EMAs are saved)."""
    dtype = torch.float64
    data = batches(dtype, 10)
    mk = lambda m: sharpopt.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.05,  # noqa: E731
                                momentum=0.9, schedule=Adaptive(steps=10), backend="reference")
    model = make_model(dtype)
    opt = mk(model)
    first = _decisions(opt, model, data[:5])
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert ckpt["opt"]["sharpopt"]["schedule"]["state"]["mu"] > 0
    rest = _decisions(opt, model, data[5:])
    resumed = make_model(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = mk(resumed)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.schedule.state_dict() == ckpt["opt"]["sharpopt"]["schedule"]["state"]
    assert _decisions(opt2, resumed, data[5:]) == rest, f"after {first}"
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    other = sharpopt.SAM(make_model(dtype).parameters(), torch.optim.SGD, lr=0.1,
                         schedule=Random(0.5))
    with pytest.raises(ValueError, match="saved with schedule Adaptive"):
        other.load_state_dict(ckpt["opt"])


def test_bad_schedule_arguments_are_refused():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="not both"):
        sharpopt.SAM(p, torch.optim.SGD, lr=0.1, k=2, schedule=Random(0.5))
    with pytest.raises(TypeError, match="Schedule"):
        sharpopt.SAM(p, torch.optim.SGD, lr=0.1, schedule="random")
    for bad in (lambda: Random(1.5), lambda: Random(0.5, steps=3), lambda: Adaptive(0),
                lambda: Adaptive(10, delta=1.0), lambda: LatePhase(-1), lambda: EveryK(0)):
        with pytest.raises(ValueError):
            bad()
    opt = sharpopt.SAM(p, torch.optim.SGD, lr=0.1, schedule=Adaptive(10))
    scaler = torch.amp.GradScaler("cpu")
    p[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="grad_scaler"):
        opt.first_step(grad_scaler=scaler)


# -- two gloo ranks: the same decisions everywhere ---------------------------------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)   # the same initial model on both ranks, as DDP requires
        result = {}
        for name in ("random", "adaptive"):
            model = make_model(torch.float32)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            sched = Random(0.5, seed=4) if name == "random" else Adaptive(steps=8)
            opt = sharpopt.SAM(ddp.parameters(), torch.optim.SGD, rho=0.05, lr=0.05,
                               momentum=0.9, schedule=sched, backend="foreach")
            decided = []
            # Each rank its own batches (a different data shard): DDP averages the gradients,
            # so the adaptive norm is the same, and the random draws never look at data.
            for x, y in batches(torch.float32, 8, seed=100 + rank):
                opt.zero_grad()
                F.cross_entropy(ddp(x), y).backward()
                perturbed = opt.first_step(zero_grad=True)
                decided.append(perturbed)
                if perturbed:
                    F.cross_entropy(ddp(x), y).backward()
                    opt.second_step(zero_grad=True)
            result[name] = (decided, [p.detach().clone() for p in model.parameters()])
        out[rank] = result
    finally:
        dist.destroy_process_group()


def test_decisions_identical_on_two_gloo_ranks():
    out = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    for name in ("random", "adaptive"):
        d0, w0 = out[0][name]
        d1, w1 = out[1][name]
        assert d0 == d1, f"{name}: rank 0 decided {d0}, rank 1 {d1}"
        assert any(d0) and not all(d0) or name == "adaptive", f"{name}: {d0}"
        for i, (a, b) in enumerate(zip(w0, w1)):
            torch.testing.assert_close(a, b, rtol=0, atol=0,
                                       msg=lambda m: f"{name}, param {i}: ranks differ: {m}")
    assert out[0]["random"][0] == [Random(0.5, seed=4).decide(t) for t in range(8)]
