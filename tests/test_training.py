"""Training that holds up: loss scaling, BatchNorm, accumulation, distributed, bad input."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import sharpopt
from conftest import (ALL_BACKENDS, assert_close, fixed_gradient_step, replay_beside_eager,
                      require_backend)
from sharpopt import registry



def net(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 9)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(9))
    layers += [torch.nn.Tanh(), torch.nn.Linear(9, 3)]
    return torch.nn.Sequential(*layers)


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            copy.deepcopy(opt.base_optimizer.state_dict()["state"]))


def assert_unchanged(model, opt, snap, what):
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q), f"{what}: weights changed"
    now = opt.base_optimizer.state_dict()["state"]
    assert now.keys() == state.keys(), f"{what}: optimizer state entries changed"
    for k in state:
        for name, v in state[k].items():
            assert torch.equal(now[k][name], v), f"{what}: state {name} changed"


# -- mixed precision ---------------------------------------------------------------------
def scaled_sam_step(model, opt, scaler, x, y, poison=None):
    """The documented fp16 recipe; ``poison`` puts an inf into pass 1 or 2."""
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).float(), y)
    scaler.scale(loss * (float("inf") if poison == 1 else 1.0)).backward()
    if opt.first_step(zero_grad=True, grad_scaler=scaler):
        with torch.autocast("cpu", dtype=torch.float16):
            loss2 = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss2 * (float("inf") if poison == 2 else 1.0)).backward()
        opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()


# SAM, ASAM and GCSAM fold 1/scale into the ascent; GSAM and Friendly-SAM need unscaled
# first-pass gradients (kept for the descent, or averaged into state) and unscale them
# (the registry's ``folds_loss_scale``).
SCALER_CASES = registry.cases(registry.GRAD_SCALER)


@pytest.mark.parametrize("case", list(SCALER_CASES))
def test_grad_scaler_recipe_matches_unscaled_fp32_step(backend, case):
    """The loss scale cancels: the scaled fp16-autocast step equals the same step taken
    with the autocast gradients unscaled by hand."""
    x, y = batch()
    model, ref = net(), net()
    algo, kw = SCALER_CASES[case]
    kw = dict(kw, lr=0.1, momentum=0.9)
    opt = algo.build(model.parameters(), torch.optim.SGD, backend=backend, **kw)
    ref_opt = algo.build(ref.parameters(), torch.optim.SGD, backend=backend, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled_sam_step(model, opt, scaler, x, y)

    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(ref(x).float(), y)
        loss.backward()
        return loss
    ref_opt.step(closure)
    for i, (p, q) in enumerate(zip(model.parameters(), ref.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4,
                                   msg=lambda m: f"{case}, param {i}: {m}")
    assert scaler.get_scale() == 2.0 ** 12


@pytest.mark.parametrize("case", list(registry.cases(registry.SCALER_FOLD)))
def test_grad_scaler_folds_into_the_ascent_without_an_unscale_pass(case, monkeypatch):
    """Where the ascent is homogeneous in g, the first pass reads the scaled gradients
    once (the norm pass) instead of unscaling them first; the others still unscale."""
    x, y = batch()
    model = net()
    algo, kw = registry.cases(registry.SCALER_FOLD)[case]
    opt = algo.build(model.parameters(), torch.optim.SGD, backend="foreach", lr=0.1, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    calls = []
    unscale = torch._amp_foreach_non_finite_check_and_unscale_
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_",
                        lambda *a: calls.append(1) or unscale(*a))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).float(), y)
    scaler.scale(loss).backward()
    assert opt.first_step(zero_grad=True, grad_scaler=scaler)
    folds = algo.folds_loss_scale
    assert (len(calls) == 0) == folds, f"{case}: {len(calls)} unscale passes in pass 1"


@pytest.mark.parametrize("case", list(registry.cases(registry.SCALER_INF)))
@pytest.mark.parametrize("poison", [1, 2], ids=["inf-in-first-pass", "inf-in-second-pass"])
def test_grad_scaler_inf_skips_whole_step_and_lowers_scale(backend, poison, case):
    x, y = batch()
    model = net()
    algo, kw = registry.cases(registry.SCALER_INF)[case]
    opt = algo.build(model.parameters(), torch.optim.SGD, backend=backend, lr=0.1,
                     momentum=0.9, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled_sam_step(model, opt, scaler, x, y)             # state exists now
    snap = snapshot(model, opt)
    scaled_sam_step(model, opt, scaler, x, y, poison=poison)
    assert_unchanged(model, opt, snap, f"inf in pass {poison}")
    assert scaler.get_scale() == 2.0 ** 11, "the scaler must back off after an inf"
    scaled_sam_step(model, opt, scaler, x, y)             # and training goes on
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), snap[0]))


def assert_trains(opt, closure, steps=20):
    """``steps`` optimizer steps lower the closure's loss."""
    first = float(closure().detach())
    opt.zero_grad()
    for _ in range(steps):
        opt.step(closure)
    assert float(closure().detach()) < first


def test_bf16_autocast_needs_no_scaler():
    x, y = batch()
    model = net()
    opt = sharpopt.GCSAM(model.parameters(), torch.optim.AdamW, lr=1e-2)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss
    assert_trains(opt, closure)


def test_bf16_parameters_train():
    x, y = batch()
    model = net().to(torch.bfloat16)
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.2, momentum=0.9)

    def closure():
        loss = F.cross_entropy(model(x.bfloat16()).float(), y)
        loss.backward()
        return loss
    assert_trains(opt, closure)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# -- non-finite gradients without a scaler -----------------------------------------------
@pytest.mark.parametrize("which", [1, 2])
def test_nan_gradient_without_scaler_raises_and_keeps_weights(backend, which):
    x, y = batch()
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.AdamW, backend=backend, lr=1e-2)
    opt.step(lambda: F.cross_entropy(model(x), y).backward())
    snap = snapshot(model, opt)
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y) * (float("nan") if len(calls) == which else 1.0)
        loss.backward()
        return loss
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        opt.step(closure)
    assert_unchanged(model, opt, snap, f"NaN in pass {which}")
    opt.step(lambda: F.cross_entropy(model(x), y).backward())


# -- BatchNorm ---------------------------------------------------------------------------
def test_freeze_bn_stats_counts_each_batch_once():
    x, y = batch()
    model, plain = net(bn=True), net(bn=True)
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with sharpopt.freeze_bn_stats(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    plain(x)                                     # one forward: one statistics update
    bn, bn_plain = model[1], plain[1]
    assert torch.equal(bn.running_mean, bn_plain.running_mean)
    assert torch.equal(bn.running_var, bn_plain.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_without_freeze_bn_stats_the_second_pass_would_count():
    x, y = batch()
    model, plain = net(bn=True), net(bn=True)
    model(x)
    model(x)
    plain(x)
    assert not torch.equal(model[1].running_mean, plain[1].running_mean)


# -- gradient accumulation ---------------------------------------------------------------
@pytest.mark.parametrize("case", list(registry.cases(registry.MICRO_BATCH)))
def test_micro_batches_give_the_large_batch_step(backend, case):
    algo, kw = registry.cases(registry.MICRO_BATCH)[case]
    x, y = batch(12)
    model, ref = net(), net()
    opt = algo.build(model.parameters(), torch.optim.SGD, backend=backend, lr=0.1,
                     momentum=0.9, **kw)
    ref_opt = algo.build(ref.parameters(), torch.optim.SGD, backend=backend, lr=0.1,
                         momentum=0.9, **kw)
    for _ in range(3):
        ref_opt.step(lambda: F.cross_entropy(ref(x), y).backward())
        for second in (False, True):
            for xs, ys in zip(x.split(4), y.split(4)):
                (F.cross_entropy(model(xs), ys) / 3).backward()
            if second:
                opt.second_step(zero_grad=True)
            else:
                assert opt.first_step(zero_grad=True)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- groups with several dtypes, non-contiguous parameters, compiled models ---------------
def test_group_with_mixed_dtypes_matches_reference(backend):
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))

    def closure_for(p, q):
        def closure():
            loss = (p.sum(1) ** 2).sum() + (q ** 3).sum().float()
            loss.backward()
            return loss
        return closure
    opt = sharpopt.GCSAM([a, b], torch.optim.SGD, lr=0.01, momentum=0.9, backend=backend)
    ref = sharpopt.GCSAM([a2, b2], torch.optim.SGD, lr=0.01, momentum=0.9, backend="reference")
    for _ in range(3):
        opt.step(closure_for(a, b))
        ref.step(closure_for(a2, b2))
    torch.testing.assert_close(a, a2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, b2, rtol=1e-10, atol=1e-12)


def test_non_contiguous_parameter(backend):
    w = torch.nn.Parameter(torch.randn(4, 6).t())          # a transposed view
    assert not w.is_contiguous()
    w_ref = torch.nn.Parameter(w.detach().clone())
    target = torch.randn(6, 4)
    mk = lambda p, be: sharpopt.SAM([p], torch.optim.SGD, lr=0.1, backend=be)
    try:
        opt = mk(w, backend)
        opt.step(lambda: ((w - target) ** 2).sum().backward())
    except ValueError as exc:                              # a clear refusal is allowed
        assert "contiguous" in str(exc)
        return
    ref = mk(w_ref, "reference")
    ref.step(lambda: ((w_ref - target) ** 2).sum().backward())
    torch.testing.assert_close(w, w_ref)


def test_compiled_model_trains(backend):
    x, y = batch()
    model = net()
    compiled = torch.compile(model, backend="aot_eager")
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.2, backend=backend)

    def closure():
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        return loss
    assert_trains(opt, closure, steps=10)


# -- the optimizer step under torch.compile and CUDA graphs ------------------------------
def _compiled_case(name):
    """The registry's ``compiled`` case as ``make(params, backend)``; ``check_finite=False``
    so that nothing in the step reads a value back to the host."""
    algo, kw = registry.cases(registry.COMPILED)[name]
    return lambda ps, be: algo.build(ps, backend=be, check_finite=False, **kw)


COMPILED_CASES = {name: _compiled_case(name) for name in registry.cases(registry.COMPILED)}


def _two_pass(model, x, y, first, second):
    """One step through ``first``/``second`` (compiled or not); zero_grad stays outside,
    since torch.optim's zero_grad is never traced."""
    F.cross_entropy(model(x), y).backward()
    perturbed = first()
    model.zero_grad()
    if perturbed:
        F.cross_entropy(model(x), y).backward()
        second()
        model.zero_grad()


@pytest.mark.parametrize("case", list(COMPILED_CASES))
def test_compiled_first_and_second_step_match_eager(backend, case):
    """``torch.compile(opt.first_step)`` / ``(opt.second_step)`` take the same steps as
    eager calls (to rounding: a compiled torch.optim base step may order its arithmetic
    differently) and keep the protocol's record of the perturbation (torch drops attribute
    writes on an Optimizer inside a compiled method)."""
    x, y = batch()
    make = COMPILED_CASES[case]
    model, twin = net(), net()
    eager, opt = make(model.parameters(), backend), make(twin.parameters(), backend)
    first = torch.compile(lambda: opt.first_step(), backend="aot_eager")
    second = torch.compile(lambda: opt.second_step(), backend="aot_eager")
    for step in range(4):
        _two_pass(model, x, y, eager.first_step, eager.second_step)
        _two_pass(twin, x, y, first, second)
        assert opt._run.perturbed is None, f"step {step}: still marked as perturbed"
        for i, (p, q) in enumerate(zip(twin.parameters(), model.parameters())):
            assert_close(p.detach(), q.detach(), f"{case}, step {step}, param {i}")
    assert opt.state_dict()["sharpopt"] == eager.state_dict()["sharpopt"]


def test_ascent_traces_to_one_graph_without_host_sync():
    """With ``check_finite=False`` the whole first step (norm, scale, perturbation) is one
    graph: nothing in it reads a value back to the host, so it can be captured. The
    inf/NaN check needs such a read, which is why it can be switched off."""
    x, y = batch()
    for check_finite in (False, True):
        model = net()
        opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="foreach",
                           check_finite=check_finite)
        first = torch.compile(lambda: opt.first_step(), backend="aot_eager", fullgraph=True)
        F.cross_entropy(model(x), y).backward()
        if check_finite:
            with pytest.raises(Exception, match="item|graph break|Unsupported|data-dependent"):
                first()
        else:
            assert first() is True
            assert opt._run.perturbed is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("base,bkw", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    # the step count must live on the device to advance inside a replayed graph
    (torch.optim.AdamW, dict(lr=1e-2, capturable=True)),
])
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda", "foreach"])
def test_cuda_graph_replay_matches_eager_steps(gpu_backend, base, bkw):
    """A whole SAM optimizer step (both passes, fixed gradients) captured in a CUDA graph
    after one eager warm-up step: three replays give the weights and state of three eager
    steps."""
    require_backend(gpu_backend, torch.device("cuda"))
    torch.manual_seed(0)
    shapes = [(33, 7), (33,), (5, 3, 3, 3), (1,)]
    g1 = [torch.randn(s, device="cuda") for s in shapes]
    g2 = [torch.randn(s, device="cuda") for s in shapes]

    def setup():
        ps = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))
                                 .cuda()) for i, s in enumerate(shapes)]
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt = sharpopt.SAM(ps, base, rho=0.1, backend=gpu_backend, check_finite=False, **bkw)
        return ps, opt, fixed_gradient_step(ps, opt, g1, g2)

    ps, opt, step = setup()
    ref_ps, ref_opt, ref_step = setup()
    replay_beside_eager(step, ref_step)
    for i, (p, q) in enumerate(zip(ps, ref_ps)):
        torch.testing.assert_close(p, q, msg=lambda m: f"param {i}: {m}")
        state, ref_state = opt.base_optimizer.state[p], ref_opt.base_optimizer.state[q]
        assert state.keys() == ref_state.keys()
        for name in state:
            torch.testing.assert_close(state[name], ref_state[name],
                                       msg=lambda m: f"param {i}, {name}: {m}")


@pytest.mark.parametrize("base", [torch.optim.Adam, torch.optim.AdamW])
def test_fused_adam_refuses_capture_without_capturable(backend, base, monkeypatch):
    """Rule: a fused Adam/AdamW update is never captured with ``capturable=False`` (its step
    count is read on the host, so a replay would repeat one bias correction forever): it
    raises, naming ``capturable``, with the weights restored to ``w`` and the state as it
    was. ``reference`` runs torch.optim's own step, whose own capture checks apply. The
    capture is faked (no GPU needed): the refusal does not depend on the device."""
    x, y = batch()
    model = net()
    opt = sharpopt.SAM(model.parameters(), base, rho=0.1, lr=1e-2, backend=backend,
                       check_finite=False)
    _two_pass(model, x, y, opt.first_step, opt.second_step)      # the state exists
    snap = snapshot(model, opt)
    F.cross_entropy(model(x), y).backward()
    assert opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    monkeypatch.setattr(sharpopt._plan, "_capturing", lambda: True)
    if backend == "reference":
        opt.second_step()
        return
    with pytest.raises(RuntimeError, match="capturable=True"):
        opt.second_step()
    assert opt._run.perturbed is None
    assert_unchanged(model, opt, snap, f"{base.__name__}: refused capture")


def test_check_finite_refuses_capture_before_changing_anything(monkeypatch):
    """Rule: the default inf/NaN check reads a flag on the host, which a CUDA-graph capture
    cannot do, so a captured step with ``check_finite=True`` raises a clear error (naming
    ``check_finite=False``) before the weights move. The capture is faked."""
    x, y = batch()
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    _two_pass(model, x, y, opt.first_step, opt.second_step)
    snap = snapshot(model, opt)
    F.cross_entropy(model(x), y).backward()
    monkeypatch.setattr(sharpopt._plan, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="check_finite=False"):
        opt.first_step()
    assert_unchanged(model, opt, snap, "refused capture")


# -- distributed (2 processes, gloo, CPU) ------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, mode, backend, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = batch(8)
        model = net()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = sharpopt.SAM(ddp.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                           backend=backend)
        xs, ys = x[rank::world], y[rank::world]
        for _ in range(3):
            if mode == "m-sharpness":        # per-rank ascent: skip the first all-reduce
                with ddp.no_sync():
                    F.cross_entropy(ddp(xs), ys).backward()
            else:
                F.cross_entropy(ddp(xs), ys).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(ddp(xs), ys).backward()
            opt.second_step(zero_grad=True)
        out[rank] = [p.detach().clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


def _single_process(mode, world=2):
    """What 2 ranks should compute, in one process on the global batch."""
    x, y = batch(8)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        w = [p.detach().clone() for p in model.parameters()]
        shards = [(x[r::world], y[r::world]) for r in range(world)]
        if mode == "m-sharpness":
            g_adv = None
            for xs, ys in shards:          # each rank perturbs along its own gradient
                model.zero_grad()
                F.cross_entropy(model(xs), ys).backward()
                g = [p.grad.clone() for p in model.parameters()]
                norm = torch.stack([t.norm() for t in g]).norm()
                with torch.no_grad():
                    for p, t, w0 in zip(model.parameters(), g, w):
                        p.copy_(w0 + 0.1 * t / (norm + 1e-12))
                model.zero_grad()
                F.cross_entropy(model(xs), ys).backward()
                part = [p.grad.clone() / world for p in model.parameters()]
                g_adv = part if g_adv is None else [a + b for a, b in zip(g_adv, part)]
                with torch.no_grad():
                    for p, w0 in zip(model.parameters(), w):
                        p.copy_(w0)
        else:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            g = [p.grad.clone() for p in model.parameters()]
            norm = torch.stack([t.norm() for t in g]).norm()
            with torch.no_grad():
                for p, t in zip(model.parameters(), g):
                    p.add_(0.1 * t / (norm + 1e-12))
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            g_adv = [p.grad.clone() for p in model.parameters()]
            with torch.no_grad():
                for p, w0 in zip(model.parameters(), w):
                    p.copy_(w0)
        for p, g in zip(model.parameters(), g_adv):
            p.grad = g
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["synchronised", "m-sharpness"])
def test_ddp_two_ranks_match_single_process(mode):
    backend = "foreach"
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), mode, backend, out), nprocs=2, join=True)
    expected = _single_process(mode)
    for rank in range(2):
        for i, (p, q) in enumerate(zip(out[rank], expected)):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, param {i}: {m}")


# -- FSDP2 / DTensor-sharded parameters (2 processes, gloo, CPU) -------------------------
class _Gained(torch.nn.Module):
    """``net()`` times a (1, 3) gain: with 2 ranks its dim-0 shards are 1 row and 0 rows,
    and the layers' shards are uneven (9 rows → 5 + 4, 3 → 2 + 1)."""

    def __init__(self):
        super().__init__()
        self.body = net()
        self.gain = torch.nn.Parameter(1.0 + 0.1 * torch.randn(1, 3))

    def forward(self, x):
        return self.body(x) * self.gain


def _sharded_case(name):
    """The registry's ``sharded`` case as (``make(params, backend)``, whether it needs
    ``step(closure)``)."""
    algo, kw = registry.cases(registry.SHARDED)[name]
    return (lambda ps, be: algo.build(ps, backend=be, **kw)), algo.protocol == registry.CLOSURE


# name → (optimizer factory, whether it needs step(closure)); every rule with a global
# reduction (norm, dot, clip), row means and its own state is here.
SHARDED_CASES = {name: _sharded_case(name) for name in registry.cases(registry.SHARDED)}


def _train_sharded_case(model, opt, xs, ys, closure_only, world, steps=3):
    def closure():
        loss = F.cross_entropy(model(xs), ys)
        loss.backward()
        # The rules that read the loss value (RBO) need the global-batch loss on every rank.
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
        return loss / world

    for _ in range(steps):
        if closure_only:
            opt.step(closure)
            continue
        closure()
        if opt.first_step(zero_grad=True):
            closure()
            opt.second_step(zero_grad=True)


def _fsdp_worker(rank, world, port, backend, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        x, y = batch(8)
        xs, ys = x[rank::world], y[rank::world]
        result = {}
        for name, (make, closure_only) in SHARDED_CASES.items():
            model = _Gained()
            for layer in model.body:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = make(model.parameters(), backend)
            _train_sharded_case(model, opt, xs, ys, closure_only, world)
            result[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
            # State shaped like the sharded parameters (so it checkpoints as they do).
            states = list(opt.state.values())
            if hasattr(opt, "base_optimizer"):
                states += list(opt.base_optimizer.state.values())
            result[name + " state"] = sorted({
                type(v).__name__ for st in states for k, v in st.items()
                if k != "step" and isinstance(v, torch.Tensor)})
            opt.state_dict()

        # An inf in one rank's shard only: every rank must refuse the step, with the
        # weights left as they were (a rank that went on would perturb alone).
        model = _Gained()
        fully_shard(model, mesh=mesh)
        opt = SHARDED_CASES["SAM+SGD"][0](model.parameters(), backend)
        F.cross_entropy(model(xs), ys).backward()
        before = [p.to_local().clone() for p in model.parameters()]
        if rank == 0:
            next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")
        try:
            opt.first_step()
            result["inf"] = "stepped"
        except FloatingPointError:
            kept = all(torch.equal(p.to_local(), q) for p, q in zip(model.parameters(), before))
            result["inf"] = "refused, weights kept" if kept else "refused, weights changed"

        # With a ShardedGradScaler an inf on one rank, in either pass, skips the step on
        # every rank and the scale backs off everywhere.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        for poison in (1, 2):
            model = _Gained()
            fully_shard(model, mesh=mesh)
            opt = SHARDED_CASES["SAM+SGD"][0](model.parameters(), backend)
            scaler = ShardedGradScaler("cpu", init_scale=2.0 ** 10)
            before = [p.to_local().clone() for p in model.parameters()]
            for k in (1, 2):
                scale = float("inf") if (k == poison and rank == 0) else 1.0
                scaler.scale(F.cross_entropy(model(xs), ys) * scale).backward()
                if k == 1 and not opt.first_step(zero_grad=True, grad_scaler=scaler):
                    break
            else:
                opt.second_step(zero_grad=True, grad_scaler=scaler)
            scaler.update()
            kept = all(torch.equal(p.to_local(), q) for p, q in zip(model.parameters(), before))
            result[f"scaler inf in pass {poison}"] = (kept, scaler.get_scale())
        out[rank] = result
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fsdp2_sharded_parameters_match_single_process(backend):
    """With FSDP2 (``fully_shard``, uneven and empty shards) every rule reduces its norms
    and dot products over the ranks, so the gathered weights equal one process stepping
    the whole model on the global batch (with the reference backend)."""
    require_backend(backend)
    out = mp.Manager().dict()
    mp.spawn(_fsdp_worker, args=(2, _free_port(), backend, out), nprocs=2, join=True)
    x, y = batch(8)
    for name, (make, closure_only) in SHARDED_CASES.items():
        stateless = name in ("GSAM+SGD", "CRSAM+SGD", "RBO")   # plain SGD, no buffers
        for rank in range(2):
            assert out[rank][name + " state"] == ([] if stateless else ["DTensor"]), \
                f"{name}, rank {rank}: state entries are {out[rank][name + ' state']}"
        model = _Gained()
        opt = make(model.parameters(), "reference")
        _train_sharded_case(model, opt, x, y, closure_only, world=1)
        for rank in range(2):
            for i, (p, q) in enumerate(zip(out[rank][name], model.parameters())):
                torch.testing.assert_close(
                    p, q.detach(), rtol=1e-5, atol=1e-6,
                    msg=lambda m: f"{name}, {backend}, rank {rank}, param {i}: {m}")
    assert [out[r]["inf"] for r in range(2)] == ["refused, weights kept"] * 2
    for poison in (1, 2):
        got = [out[r][f"scaler inf in pass {poison}"] for r in range(2)]
        assert got == [(True, 2.0 ** 9)] * 2, f"inf on rank 0 in pass {poison}: {got}"
