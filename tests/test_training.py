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
from conftest import FAST_BACKENDS, require_backend

BACKENDS = ["reference", *FAST_BACKENDS]


@pytest.fixture(params=BACKENDS)
def backend(request):
    require_backend(request.param)
    return request.param


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


def test_grad_scaler_recipe_matches_unscaled_fp32_step(backend):
    """The loss scale cancels: the scaled fp16-autocast step equals the same step taken
    with the autocast gradients unscaled by hand."""
    x, y = batch()
    model, ref = net(), net()
    kw = dict(rho=0.1, lr=0.1, momentum=0.9)
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, backend=backend, **kw)
    ref_opt = sharpopt.SAM(ref.parameters(), torch.optim.SGD, backend=backend, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled_sam_step(model, opt, scaler, x, y)

    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(ref(x).float(), y)
        loss.backward()
        return loss
    ref_opt.step(closure)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    assert scaler.get_scale() == 2.0 ** 12


@pytest.mark.parametrize("poison", [1, 2], ids=["inf-in-first-pass", "inf-in-second-pass"])
def test_grad_scaler_inf_skips_whole_step_and_lowers_scale(backend, poison):
    x, y = batch()
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, backend=backend, lr=0.1,
                       momentum=0.9)
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
@pytest.mark.parametrize("cls", [sharpopt.SAM, sharpopt.GSAM, sharpopt.WSAM])
def test_micro_batches_give_the_large_batch_step(backend, cls):
    x, y = batch(12)
    model, ref = net(), net()
    opt = cls(model.parameters(), torch.optim.SGD, backend=backend, lr=0.1, momentum=0.9)
    ref_opt = cls(ref.parameters(), torch.optim.SGD, backend=backend, lr=0.1, momentum=0.9)
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
