"""The public contract: drop-in API, rho = 0, checkpoints, dispatch and clear errors."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import sharpopt
from sharpopt import registry
from sharpopt.backends import BackendUnavailable

RHO_ZERO = registry.cases(registry.RHO_ZERO)
STATE_DICT = registry.cases(registry.STATE_DICT)
CLOSURE_ONLY = [n for n, a in registry.ALGORITHMS.items() if a.protocol == registry.CLOSURE]


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 11), torch.nn.Tanh(), torch.nn.Linear(11, 3))


def data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 7, generator=g), torch.randint(0, 3, (5,), generator=g))
            for _ in range(n)]


def closure_for(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("base,kw", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
])
@pytest.mark.parametrize("case", list(RHO_ZERO))
def test_rho_zero_reproduces_base_optimizer(backend, case, base, kw):
    algo, case_kw = RHO_ZERO[case]
    model, ref = net(), net()
    opt = algo.build(model.parameters(), base, **{**case_kw, "rho": 0.0}, backend=backend,
                     **kw)
    base_opt = base(ref.parameters(), **kw)
    for x, y in data():
        opt.step(closure_for(model, x, y))
        base_opt.zero_grad()
        closure_for(ref, x, y)()
        base_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        # same math, but fused backends may order a sum differently: ulp-level agreement
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_rho_zero_is_bit_exact_on_reference():
    model, ref = net(), net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, rho=0.0, backend="reference",
                       lr=0.1, momentum=0.9)
    base_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in data():
        opt.step(closure_for(model, x, y))
        base_opt.zero_grad()
        closure_for(ref, x, y)()
        base_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", list(STATE_DICT))
@pytest.mark.parametrize("base,bkw", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
])
def test_state_dict_round_trip_resumes_same_trajectory(backend, case, base, bkw):
    algo, kw = STATE_DICT[case]
    steps = data(7)
    model = net()
    opt = algo.build(model.parameters(), base, backend=backend, **kw, **bkw)
    for x, y in steps[:3]:
        opt.step(closure_for(model, x, y))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    for x, y in steps[3:]:
        opt.step(closure_for(model, x, y))

    resumed = net(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = algo.build(resumed.parameters(), base, backend=backend, **kw, **bkw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.base_optimizer.state, "base optimizer state was not restored"
    for x, y in steps[3:]:
        opt2.step(closure_for(resumed, x, y))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name} differs after resuming: {(p - q).abs().max()}"


def test_checkpoint_moves_between_backends():
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, backend="reference", lr=0.1,
                       momentum=0.9)
    for x, y in data(2):
        opt.step(closure_for(model, x, y))
    ckpt = opt.state_dict()
    other = sharpopt.SAM(model.parameters(), torch.optim.SGD, backend="foreach", lr=0.1,
                         momentum=0.9)
    other.load_state_dict(ckpt)
    for p in model.parameters():
        assert torch.equal(other.base_optimizer.state[p]["momentum_buffer"],
                           opt.base_optimizer.state[p]["momentum_buffer"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving a checkpoint needs a GPU")
@pytest.mark.parametrize("src,dst", [("cpu", "cuda"), ("cuda", "cpu")])
@pytest.mark.parametrize("cls,kw", [(sharpopt.SAM, dict(rho=0.05)),
                                    (sharpopt.FriendlySAM, dict(rho=0.05))])
def test_checkpoint_moves_between_cpu_and_gpu(src, dst, cls, kw):
    """Saved on one device, loaded on the other (auto backend on each): the state follows
    the parameters and training goes on as it would have on the first device."""
    steps = data(6)
    model = net().to(src)
    opt = cls(model.parameters(), torch.optim.AdamW, lr=1e-2, **kw)
    on = lambda t, dev: t.to(dev)
    for x, y in steps[:3]:
        opt.step(closure_for(model, on(x, src), on(y, src)))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    for x, y in steps[3:]:
        opt.step(closure_for(model, on(x, src), on(y, src)))

    moved = net(seed=123).to(dst)
    moved.load_state_dict(ckpt["model"])
    opt2 = cls(moved.parameters(), torch.optim.AdamW, lr=1e-2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for p in moved.parameters():
        for name, v in {**opt2.base_optimizer.state[p], **opt2.state[p]}.items():
            if name != "step":
                assert v.device == p.device, f"state {name} stayed on {v.device}"
    for x, y in steps[3:]:
        opt2.step(closure_for(moved, on(x, dst), on(y, dst)))
    for (name, p), q in zip(model.named_parameters(), moved.parameters()):
        torch.testing.assert_close(q.cpu(), p.cpu(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} after moving {src}->{dst}: {m}")


def test_state_dict_between_passes_is_refused():
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data(1)[0]
    closure_for(model, x, y)()
    opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    closure_for(model, x, y)()
    opt.second_step()
    opt.state_dict()


def test_restore_is_bit_exact():
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.0)
    x, y = data(1)[0]
    closure_for(model, x, y)()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    closure_for(model, x, y)()
    opt.second_step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), "restore + lr=0 step must give back w bit for bit"


def test_param_groups_are_shared_with_base_and_scheduler_works():
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = data(1)[0]
    closure_for(model, x, y)()
    opt.first_step(zero_grad=True)
    closure_for(model, x, y)()
    opt.second_step(zero_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # no "scheduler.step() before optimizer.step()"
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_per_group_rho_and_add_param_group():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt = sharpopt.SAM([{"params": a.parameters(), "rho": 0.2}], torch.optim.SGD, rho=0.05,
                       lr=0.1, momentum=0.9)
    opt.add_param_group({"params": b.parameters(), "lr": 0.01})
    assert opt.param_groups[0]["rho"] == 0.2
    assert opt.param_groups[1]["rho"] == 0.05
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["lr"] == 0.01
    x = torch.randn(4, 3)
    opt.step(lambda: b(a(x)).sum().backward() or b(a(x)).sum())
    assert all(p in opt.base_optimizer.state for p in b.parameters())


def test_named_parameters_are_accepted():
    model = net()
    opt = sharpopt.SAM(model.named_parameters(), torch.optim.SGD, lr=0.1)
    assert opt.param_groups[0]["param_names"][0] == "0.weight"
    x, y = data(1)[0]
    opt.step(closure_for(model, x, y))


def test_zero_gradient_gives_zero_perturbation_not_nan(backend):
    w = torch.nn.Parameter(torch.ones(5))
    opt = sharpopt.ASAM([w], torch.optim.SGD, lr=0.1, backend=backend)
    w.grad = torch.zeros(5)
    opt.first_step()
    assert torch.equal(w, torch.ones(5))
    w.grad = torch.zeros(5)
    opt.second_step()
    assert torch.equal(w, torch.ones(5))


# -- dispatch --------------------------------------------------------------------------
def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv("SHARPOPT_BACKEND", "reference")
    opt = sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1)
    assert opt.backend == "reference"
    explicit = sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1, backend="foreach")
    assert explicit.backend == "foreach"


def test_auto_picks_an_available_backend():
    opt = sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1)
    assert opt.backend in sharpopt.available_backends()
    with pytest.raises(AttributeError):
        opt.backend = "reference"


def test_forced_unavailable_backend_raises_with_reason(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(BackendUnavailable, match="cuda"):
        sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1, backend="cuda")
    monkeypatch.setenv("SHARPOPT_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="cuda"):
        sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1)


def test_failed_fused_backend_falls_back_with_one_warning(monkeypatch):
    from sharpopt import backends as dispatch
    reason = "backend 'cpu' is unavailable: the compiler failed (simulated)"
    monkeypatch.setitem(dispatch._failed, "cpu", reason)
    monkeypatch.delitem(dispatch._loaded, "cpu", raising=False)
    monkeypatch.setattr(dispatch, "_announced", set())
    monkeypatch.delenv("SHARPOPT_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="compiler failed"):
        opt = sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1)
    assert opt.backend == "foreach"
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # once, not per optimizer
        sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(BackendUnavailable, match="compiler failed"):
        sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1, backend="cpu")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sharpopt backend 'fastest'"):
        sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1, backend="fastest")


# -- bad input -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=-0.1), "rho must be"),
    (dict(rho=float("nan")), "rho must be"),
    (dict(perturb_eps=0.0), "perturb_eps must be"),
    (dict(k=0), "k must be"),
    (dict(eta=-1.0), "eta must be"),
])
def test_invalid_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_negative_per_group_rho_raises():
    with pytest.raises(ValueError, match="rho must be"):
        sharpopt.SAM([{"params": net().parameters(), "rho": -1.0}], torch.optim.SGD, lr=0.1)


def test_base_optimizer_instance_is_rejected():
    model = net()
    with pytest.raises(TypeError, match="optimizer class"):
        sharpopt.SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))


def test_second_step_before_first_step_raises():
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data(1)[0]
    closure_for(model, x, y)()
    with pytest.raises(RuntimeError, match="without a matching first_step"):
        opt.second_step()


def test_first_step_twice_raises():
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data(1)[0]
    closure_for(model, x, y)()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


@pytest.mark.parametrize("name", CLOSURE_ONLY)
def test_closure_only_algorithms_refuse_two_pass_api(name):
    algo = registry.ALGORITHMS[name]
    model = net()
    opt = algo.build(model.parameters(), torch.optim.SGD if algo.base else None, lr=0.1)
    x, y = data(1)[0]
    closure_for(model, x, y)()
    with pytest.raises(RuntimeError, match="closure"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_step_without_closure_raises():
    opt = sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_sparse_gradients_raise_and_leave_weights():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = sharpopt.SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    assert torch.equal(emb.weight, before)


def test_complex_parameters_raise_and_leave_weights(backend):
    """A complex parameter (even beside real ones) is refused before anything is written."""
    real = torch.nn.Parameter(torch.randn(4, 3))
    cplx = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64))
    before = [real.detach().clone(), cplx.detach().clone()]
    opt = sharpopt.SAM([real, cplx], torch.optim.SGD, lr=0.1, backend=backend)
    (real.sum() + cplx.abs().sum()).backward()
    with pytest.raises(RuntimeError, match="complex"):
        opt.first_step()
    assert torch.equal(real, before[0]) and torch.equal(cplx, before[1])
    assert not any(opt.base_optimizer.state.values()), "optimizer state was created"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU beside the CPU")
def test_one_group_on_cpu_and_gpu_matches_reference_on_cpu():
    """Parameters of one group on two devices: one bucket per device, and the norm is one
    global norm (the sum of both devices' partial sums)."""
    steps = data(3)
    model, ref = net(), net()
    model[2].cuda()

    def closure_split(x, y):
        def closure():
            h = torch.tanh(model[0](x)).cuda()
            loss = F.cross_entropy(model[2](h), y.cuda())
            loss.backward()
            return loss
        return closure

    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    ref_opt = sharpopt.SAM(ref.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                           backend="reference")
    for x, y in steps:
        opt.step(closure_split(x, y))
        ref_opt.step(closure_for(ref, x, y))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} (on {p.device}): {m}")


def test_failing_second_closure_restores_weights():
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data(1)[0]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return closure_for(model, x, y)()
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    opt.step(closure_for(model, x, y))   # and the optimizer is usable again
