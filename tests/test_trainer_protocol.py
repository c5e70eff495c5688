"""What trainers need from the optimizer: keywords that reach the base optimizer, a
closure-less second half (``step()``, ``GradScaler.step(opt)``), gradients a trainer
accumulated, and clipping of the descent direction (``max_grad_norm``)."""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

import sharpopt
from sharpopt import registry



def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def loss_of(model, x, y, scale=1.0):
    return F.cross_entropy(model(x), y) * scale


def assert_same(model, ref, what, exact=False, rtol=1e-5, atol=1e-6):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if exact:
            assert torch.equal(p, q), f"{what}: {name} differs by {(p - q).abs().max():.3g}"
        else:
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{what}, {name}: {m}")


# -- keywords ----------------------------------------------------------------------------
def test_eps_reaches_the_base_optimizer(backend):
    """``eps=`` is the base optimizer's (Adam's eps), ``perturb_eps=`` the norm's: with
    rho = 0 the wrapper takes AdamW's steps with that eps exactly."""
    x, y = batch()
    model, ref = net(), net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.AdamW, rho=0.0, backend=backend,
                       lr=1e-2, eps=1e-2)
    assert opt.param_groups[0]["eps"] == 1e-2 and opt.perturb_eps == 1e-12
    base = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-2)
    for _ in range(3):
        opt.step(lambda: loss_of(model, x, y).backward())
        base.zero_grad()
        loss_of(ref, x, y).backward()
        base.step()
    assert_same(model, ref, "SAM(rho=0, AdamW eps=1e-2) vs AdamW(eps=1e-2)")


def test_perturb_eps_is_the_norms_epsilon():
    """``e = rho · g / (‖g‖ + perturb_eps)``: with perturb_eps = ‖g‖ the step is rho / 2."""
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([3.0, 0.0, 4.0])          # ‖g‖ = 5
    opt = sharpopt.SAM([w], torch.optim.SGD, rho=0.2, perturb_eps=5.0, lr=0.1)
    opt.first_step()
    torch.testing.assert_close(w.detach(), 0.2 * torch.tensor([3.0, 0.0, 4.0]) / 10.0)


@pytest.mark.parametrize("cls,base,name,value", [
    (sharpopt.LookSAM, torch.optim.RMSprop, "alpha", 0.5),
    (sharpopt.GSAM, torch.optim.RMSprop, "alpha", 0.5),
    (sharpopt.LookSAM, torch.optim.ASGD, "alpha", 0.5),
    (sharpopt.SAM, torch.optim.Adadelta, "rho", 0.05),
])
def test_keyword_both_take_is_refused_naming_both(cls, base, name, value):
    """A keyword that the wrapper and the base optimizer both take is never silently given
    to one of them: the error names both meanings and how to say which."""
    with pytest.raises(TypeError) as info:
        cls(net().parameters(), base, lr=0.01, **{name: value})
    msg = str(info.value)
    meaning = cls.own_keywords()[name]
    for part in (f"{cls.__name__}'s {meaning}", f"torch.optim.{base.__name__}",
                 f"sam_kwargs={{'{name}': {value}}}", f"base_kwargs={{'{name}': {value}}}"):
        assert part in msg, f"error for {name}= does not say {part!r}: {msg}"


def test_sam_kwargs_and_base_kwargs_say_whose():
    ps = list(net().parameters())
    opt = sharpopt.LookSAM(ps, torch.optim.RMSprop, lr=0.01, sam_kwargs={"alpha": 0.5},
                           base_kwargs={"alpha": 0.9})
    assert opt.alpha == 0.5 and opt.param_groups[0]["alpha"] == 0.9
    opt = sharpopt.LookSAM(ps, torch.optim.RMSprop, lr=0.01, base_kwargs={"alpha": 0.9})
    assert opt.alpha == 0.7 and opt.param_groups[0]["alpha"] == 0.9     # LookSAM default
    opt = sharpopt.LookSAM(ps, torch.optim.RMSprop, lr=0.01, sam_kwargs={"alpha": 0.5})
    assert opt.alpha == 0.5 and opt.param_groups[0]["alpha"] == 0.99    # RMSprop default
    opt = sharpopt.LookSAM(ps, torch.optim.SGD, lr=0.01, alpha=0.5)     # no collision
    assert opt.alpha == 0.5
    opt = sharpopt.SAM(ps, torch.optim.Adadelta, sam_kwargs={"rho": 0.1}, lr=1.0)
    assert opt.param_groups[0]["rho"] == 0.1 and opt.base_optimizer.defaults["rho"] == 0.9


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=1e-6), "perturb_eps"),                       # old spelling, SGD has no eps
    (dict(epsilon=1e-6), "neither SAM nor its base optimizer torch.optim.SGD"),
    (dict(momentum=0.9, base_kwargs={"momentum": 0.8}), "given twice"),
    (dict(rho=0.1, sam_kwargs={"rho": 0.2}), "given twice"),
    (dict(sam_kwargs={"momentum": 0.9}), "SAM has no keyword 'momentum'"),
    (dict(base_kwargs=[("momentum", 0.9)]), "base_kwargs must be a dict"),
])
def test_unknown_or_doubled_keywords_are_refused(kwargs, match):
    with pytest.raises(TypeError, match=match):
        sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_a_wrapper_that_takes_eps_is_refused_at_definition():
    with pytest.raises(TypeError, match="perturb_eps"):
        class Bad(sharpopt.SAM):
            def __init__(self, params, base_optimizer=torch.optim.SGD, eps=1e-12, **kw):
                super().__init__(params, base_optimizer, perturb_eps=eps, **kw)


# -- closure-less completion -------------------------------------------------------------
#: The registry's trainer-protocol cases: name → (class, keywords).
CASES = {name: (algo.cls, kw) for name, (algo, kw) in
         registry.cases(registry.TRAINER).items()}


@pytest.mark.parametrize("case", list(CASES))
def test_closure_less_step_finishes_like_second_step(backend, case):
    """``first_step(); backward; step()`` is ``first_step(); backward; second_step()``,
    bit for bit, including the cheap steps where first_step returns False."""
    cls, kw = CASES[case]
    model, ref = net(), net()
    opt = cls(model.parameters(), torch.optim.AdamW, backend=backend, lr=1e-2, **kw)
    ref_opt = cls(ref.parameters(), torch.optim.AdamW, backend=backend, lr=1e-2, **kw)
    for i in range(4):
        x, y = batch(seed=i)
        loss_of(model, x, y).backward()
        loss_of(ref, x, y).backward()
        went_on = opt.first_step(zero_grad=True)
        assert ref_opt.first_step(zero_grad=True) == went_on
        if went_on:
            loss_of(model, x, y).backward()
            loss_of(ref, x, y).backward()
            ref_opt.second_step(zero_grad=True)
        opt.step()                        # a trainer calls it whatever first_step said
        opt.zero_grad()
        assert_same(model, ref, f"{case}, step {i}", exact=True)


def test_closure_less_step_with_nothing_pending_raises():
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, *batch()).backward()
    with pytest.raises(RuntimeError, match="none is pending"):
        opt.step()
    assert opt.first_step(zero_grad=True)
    loss_of(model, *batch()).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="none is pending"):   # not twice
        opt.step()


# -- GradScaler.step(opt) ------------------------------------------------------------------
def fp16_loss(model, x, y, poison=False):
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).float(), y)
    return loss * (float("inf") if poison else 1.0)


def scaler_step(model, opt, scaler, x, y, *, poison=None, clip=None):
    """A trainer's loop: the first pass by hand, then ``scaler.step(opt)``, optionally
    after ``scaler.unscale_(opt)`` and ``clip_grad_norm_`` between the passes."""
    scaler.scale(fp16_loss(model, x, y, poison == 1)).backward()
    if opt.first_step(zero_grad=True, grad_scaler=scaler):
        scaler.scale(fp16_loss(model, x, y, poison == 2)).backward()
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("case", list(registry.cases(registry.TRAINER_SCALER)))
def test_grad_scaler_step_finishes_the_step(backend, case):
    """``scaler.step(opt)`` after ``first_step`` gives the documented
    ``second_step(grad_scaler=)`` result, without the deprecated-protocol warning."""
    algo, kw = registry.cases(registry.TRAINER_SCALER)[case]
    cls = algo.cls
    model, ref = net(), net()
    opt = cls(model.parameters(), torch.optim.SGD, backend=backend, lr=0.1, momentum=0.9, **kw)
    ref_opt = cls(ref.parameters(), torch.optim.SGD, backend=backend, lr=0.1, momentum=0.9,
                  **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for i in range(3):
        x, y = batch(seed=i)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            scaler_step(model, opt, scaler, x, y)
        ref_scaler.scale(fp16_loss(ref, x, y)).backward()
        assert ref_opt.first_step(zero_grad=True, grad_scaler=ref_scaler)
        ref_scaler.scale(fp16_loss(ref, x, y)).backward()
        ref_opt.second_step(zero_grad=True, grad_scaler=ref_scaler)
        ref_scaler.update()
        assert_same(model, ref, f"{case}, step {i}", rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == ref_scaler.get_scale()


@pytest.mark.parametrize("poison", [1, 2], ids=["inf-in-first-pass", "inf-in-second-pass"])
def test_grad_scaler_step_skip_restores_w_and_backs_off(backend, poison):
    """When the scaler skips, the weights are ``w`` again (not ``w + e``), the state is
    untouched, the scale is lowered, and the next step proceeds."""
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, backend=backend, rho=0.1,
                       lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    x, y = batch()
    scaler_step(model, opt, scaler, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.base_optimizer.state_dict()["state"])
    scaler_step(model, opt, scaler, x, y, poison=poison)
    for i, (p, q) in enumerate(zip(model.parameters(), before)):
        assert torch.equal(p, q), f"param {i} was left moved by {(p - q).abs().max():.3g}"
    for k, st in opt.base_optimizer.state_dict()["state"].items():
        assert torch.equal(st["momentum_buffer"], state[k]["momentum_buffer"]), f"state {k}"
    assert scaler.get_scale() == 2.0 ** 11
    scaler_step(model, opt, scaler, x, y)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("finish", ["scaler.step", "second_step"])
def test_unscale_and_clip_between_the_passes(backend, finish):
    """A trainer's ``scaler.unscale_(opt)`` + ``clip_grad_norm_`` between the passes
    clips the unscaled descent gradients and is not unscaled twice: the step equals the
    fp32 step with the same clipping by hand."""
    model, ref = net(), net()
    kw = dict(rho=0.1, lr=0.1, momentum=0.9)
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, backend=backend, **kw)
    ref_opt = sharpopt.SAM(ref.parameters(), torch.optim.SGD, backend=backend, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for i in range(3):
        x, y = batch(seed=i)
        scaler.scale(fp16_loss(model, x, y)).backward()
        assert opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(fp16_loss(model, x, y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        if finish == "scaler.step":
            scaler.step(opt)
        else:
            opt.second_step(grad_scaler=scaler)
        scaler.update()
        opt.zero_grad()

        fp16_loss(ref, x, y).backward()
        ref_opt.first_step(zero_grad=True)
        fp16_loss(ref, x, y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.second_step(zero_grad=True)
        assert_same(model, ref, f"{finish}, step {i}", rtol=1e-4, atol=1e-5)


def test_unscale_before_first_step_is_refused():
    model = net()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(fp16_loss(model, *batch())).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="between the passes"):
        opt.first_step(grad_scaler=scaler)


# -- gradients accumulated before step(closure) ----------------------------------------------
@pytest.mark.parametrize("cls", [sharpopt.SAM, sharpopt.GSAM])
def test_step_closure_keeps_accumulated_micro_batches(backend, cls):
    """Micro-batches a trainer backpropagated before ``step(closure)`` are part of the
    first pass (Lightning calls the closure for the last one only): the ascent follows
    the whole batch's gradient."""
    x, y = batch(12)
    xs, ys = x.split(4), y.split(4)
    model, ref = net(), net()
    opt = cls(model.parameters(), torch.optim.SGD, backend=backend, rho=0.1, lr=0.1)
    ref_opt = cls(ref.parameters(), torch.optim.SGD, backend=backend, rho=0.1, lr=0.1)
    for a, b in zip(xs[:2], ys[:2]):
        (loss_of(model, a, b) / 3).backward()
    state = {"calls": 0}

    def closure():                          # last micro-batch at w, then the whole batch
        state["calls"] += 1
        if state["calls"] == 1:
            loss = loss_of(model, xs[2], ys[2]) / 3
            loss.backward()
            return loss
        for a, b in zip(xs, ys):
            (loss_of(model, a, b) / 3).backward()
    opt.step(closure)
    for second in (False, True):
        for a, b in zip(xs, ys):
            (loss_of(ref, a, b) / 3).backward()
        ref_opt.second_step(zero_grad=True) if second else ref_opt.first_step(zero_grad=True)
    assert_same(model, ref, f"{cls.__name__} with accumulated micro-batches")
    assert all(p.grad is None for p in model.parameters()), "step(closure) leaves no grads"


# -- max_grad_norm ------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("base,bkw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                      (torch.optim.AdamW, dict(lr=1e-2))])
def test_max_grad_norm_clips_the_descent_direction(backend, case, base, bkw):
    """``max_grad_norm`` scales the direction handed to the base optimizer by
    ``min(1, max / (‖d‖ + 1e-6))``, as ``clip_grad_norm_`` on ``d`` before ``Base.step``
    (for SAM, clipping ``g_adv`` between the passes is the same step)."""
    cls, kw = CASES[case]
    model, ref = net(), net()
    opt = cls(model.parameters(), base, backend=backend, max_grad_norm=0.05, **kw, **bkw)
    ref_opt = cls(ref.parameters(), base, backend="reference", **kw, **bkw)
    clipped = []
    real_step = ref_opt.base_optimizer.step

    def clip_then_step(*a, **k):              # the reference clips d right before Base.step
        clipped.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)))
        return real_step(*a, **k)
    ref_opt.base_optimizer.step = clip_then_step
    for i in range(4):
        x, y = batch(seed=i)
        opt.step(lambda: loss_of(model, x, y).backward())
        ref_opt.step(lambda: loss_of(ref, x, y).backward())
        assert_same(model, ref, f"{case}/{base.__name__}, step {i}", rtol=2e-5, atol=2e-6)
    assert max(clipped) > 0.05, "the test must clip: direction norms were all below max"


def test_max_grad_norm_must_be_positive():
    with pytest.raises(ValueError, match="max_grad_norm must be"):
        sharpopt.SAM(net().parameters(), torch.optim.SGD, lr=0.1, max_grad_norm=0.0)


# -- BatchNorm with step(closure) ------------------------------------------------------------
def test_freeze_bn_stats_recipe_for_step_closure():
    """The README's closure recipe: ``freeze_bn_stats`` on the closure's second call
    (``opt.perturbed``) leaves the running statistics of one forward pass at ``w``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.BatchNorm1d(9),
                                torch.nn.Tanh(), torch.nn.Linear(9, 3))
    plain = copy.deepcopy(model)
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    x, y = batch()
    seen = []

    def closure():
        seen.append(opt.perturbed)
        with sharpopt.freeze_bn_stats(model) if opt.perturbed else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        return loss
    opt.step(closure)
    plain(x)
    assert seen == [False, True] and not opt.perturbed
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(plain[1], name)), name


def test_a_partial_base_optimizer_is_checked_too():
    base = functools.partial(torch.optim.RMSprop, momentum=0.5)
    with pytest.raises(TypeError, match="ambiguous"):
        sharpopt.LookSAM(net().parameters(), base, lr=0.01, alpha=0.5)
    opt = sharpopt.LookSAM(net().parameters(), base, lr=0.01, sam_kwargs={"alpha": 0.5})
    assert opt.alpha == 0.5 and opt.param_groups[0]["momentum"] == 0.5
