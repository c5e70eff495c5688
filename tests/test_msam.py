"""MSAM: the reference against the SPEC's rule, every backend against the reference, rho = 0
against torch.optim, at_w(), and checkpoints that resume bit for bit.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import sharpopt
from conftest import FAST_BACKENDS, assert_close, require_backend
from test_backends import BASES, batches, closure_for, compare, make_model, sync

STEPS = 5
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
_ids = lambda d: str(d).replace("torch.", "")  # noqa: E731


def msam(model, base, backend, rho=0.3, **extra):
    base_cls, base_kwargs = BASES[base]
    return sharpopt.MSAM(model.parameters(), base_cls, rho=rho, backend=backend,
                         **{**base_kwargs, **extra})


def by_rule(model, base, data, rho, eps=1e-12):
    """The SPEC's MSAM written out with torch.optim and plain tensor ops (keeps ``w``
    explicitly, so it also says where the model is at ``w``). Returns (w, w~) per step."""
    base_cls, base_kwargs = BASES[base]
    opt = base_cls(model.parameters(), **base_kwargs)
    key = "momentum_buffer" if base_cls is torch.optim.SGD else "exp_avg"
    ps = list(model.parameters())
    scale = None
    out = []
    for x, y in data:
        opt.zero_grad()
        closure_for(model, x, y)()
        with torch.no_grad():
            if scale is not None:
                for p in ps:
                    p.add_(opt.state[p][key] * scale)
            opt.step()
            w = [p.detach().clone() for p in ps]
            norm = torch.stack([opt.state[p][key].double().square().sum() for p in ps]).sum().sqrt()
            scale = (rho / (norm + eps)).to(torch.float64 if ps[0].dtype == torch.float64
                                             else torch.float32)
            for p in ps:
                p.sub_(opt.state[p][key] * scale)
        out.append((w, [p.detach().clone() for p in ps]))
    return out


@pytest.mark.parametrize("base", list(BASES))
def test_reference_follows_the_rule(base):
    """backend='reference' computes w~ = w − rho·m/(‖m‖+eps) after Base.step at w."""
    dtype = torch.float64
    data = batches(dtype, STEPS)
    model, rule_model = make_model(dtype), make_model(dtype)
    expected = by_rule(rule_model, base, data, 0.3)
    opt = msam(model, base, "reference")
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        closure_for(model, x, y)()
        opt.step()
        w, w_tilde = expected[step]
        for i, p in enumerate(model.parameters()):
            assert_close(p.detach(), w_tilde[i], f"step {step}, param {i}, w~")
        with opt.at_w():
            for i, p in enumerate(model.parameters()):
                assert_close(p.detach(), w[i], f"step {step}, param {i}, w inside at_w()")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("base", list(BASES))
def test_backend_matches_reference(fast_backend, base, dtype):
    if fast_backend == "triton" and dtype == torch.float64:
        pytest.skip("triton: fp64 trajectories not run (fp64 passes are tested per pass)")
    ref_model = make_model(dtype)
    model = copy.deepcopy(ref_model)
    ref_opt, opt = msam(ref_model, base, "reference"), msam(model, base, fast_backend)
    for step, (x, y) in enumerate(batches(dtype, STEPS)):
        ref_opt.step(closure_for(ref_model, x, y))
        opt.step(closure_for(model, x, y))
        compare(step, ref_model, model, ref_opt, opt, dtype)
        if dtype == torch.bfloat16:
            sync(ref_model, model, ref_opt, opt)
            # The scale s must follow too: it was computed from the unsynced momentum.
            opt._msam.back = {id(p): (p, ref_opt._msam.back[id(q)][1])
                              for p, q in zip(model.parameters(), ref_model.parameters())}


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize("base", list(BASES))
def test_rho_zero_is_the_base_optimizer(backend, base):
    """rho = 0: bit for bit torch.optim on the reference backend, within tolerance elsewhere
    (the fused update's summation order)."""
    require_backend(backend)
    dtype = torch.float32
    model, plain = make_model(dtype), make_model(dtype)
    opt = msam(model, base, backend, rho=0.0)
    base_cls, base_kwargs = BASES[base]
    ref = base_cls(plain.parameters(), **base_kwargs)
    for step, (x, y) in enumerate(batches(dtype, STEPS)):
        opt.zero_grad()
        closure_for(model, x, y)()
        opt.step()
        ref.zero_grad()
        closure_for(plain, x, y)()
        ref.step()
        for i, (p, q) in enumerate(zip(model.parameters(), plain.parameters())):
            if backend == "reference":
                assert torch.equal(p, q), f"step {step}, param {i}: rho=0 is not torch.optim"
            else:
                assert_close(p.detach(), q.detach(), f"step {step}, param {i}")


def _run(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        closure_for(model, x, y)()
        opt.step()


def _same(a_model, b_model, a_opt, b_opt, what):
    for i, (p, q) in enumerate(zip(a_model.parameters(), b_model.parameters())):
        assert torch.equal(p, q), f"{what}: param {i} differs by {(p - q).abs().max()}"
        for key, v in a_opt.base_optimizer.state[p].items():
            assert torch.equal(v, b_opt.base_optimizer.state[q][key]), f"{what}: {i} {key}"


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize("base", ["SGD-nesterov-wd", "AdamW-amsgrad"])
def test_checkpoint_mid_run_resumes_bit_exactly(backend, base):
    """Model (at w~) and optimizer saved after step 3, reloaded into fresh objects through
    torch.save: steps 4..7 give the same bits as the run that never stopped."""
    require_backend(backend)
    dtype = torch.float32
    data = batches(dtype, 7)
    model = make_model(dtype)
    opt = msam(model, base, backend)
    _run(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _run(model, opt, data[3:])

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make_model(dtype, seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = msam(resumed, base, backend)
    opt2.load_state_dict(ckpt["opt"])
    _run(resumed, opt2, data[3:])
    _same(model, resumed, opt, opt2, "resumed run")


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_at_w_puts_the_model_at_w_and_back_bit_for_bit(backend):
    require_backend(backend)
    dtype = torch.float32
    data = batches(dtype, 3)
    model, rule_model = make_model(dtype), make_model(dtype)
    expected = by_rule(rule_model, "SGD-nesterov-wd", data, 0.3)
    opt = msam(model, "SGD-nesterov-wd", backend)
    _run(model, opt, data)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.at_w():
        for i, p in enumerate(model.parameters()):
            assert_close(p.detach(), expected[-1][0][i], f"param {i} inside at_w()")
            assert not torch.equal(p, before[i]), f"param {i}: at_w() did not move it"
        with pytest.raises(RuntimeError, match="inside at_w"):
            opt.step()
        with pytest.raises(RuntimeError, match="does not nest"):
            with opt.at_w():
                pass
    for i, p in enumerate(model.parameters()):
        assert torch.equal(p, before[i]), f"param {i}: not back at w~ bit for bit"


def test_checkpoint_saved_inside_at_w_resumes_from_w():
    """Saved inside at_w() the model file holds w and the state says nothing is perturbed:
    the resumed run's first step takes its gradient at w and does not move back."""
    dtype = torch.float64
    data = batches(dtype, 4)
    model = make_model(dtype)
    opt = msam(model, "SGD-nesterov-wd", "reference")
    _run(model, opt, data[:2])
    with opt.at_w():
        ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
        w = [p.detach().clone() for p in model.parameters()]
    assert ckpt["opt"]["sharpopt"]["msam"]["perturbed"] == {}
    resumed = make_model(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = msam(resumed, "SGD-nesterov-wd", "reference")
    opt2.load_state_dict(ckpt["opt"])
    for p, q in zip(resumed.parameters(), w):
        assert torch.equal(p, q)
    # Expected: a plain SGD step from w with the loaded momentum, then the perturbation.
    plain = make_model(dtype)
    plain.load_state_dict(ckpt["model"])
    base = torch.optim.SGD(plain.parameters(), **BASES["SGD-nesterov-wd"][1])
    # A copy: load_state_dict keeps the given tensors, which opt2 updates in place.
    base.load_state_dict(copy.deepcopy(ckpt["opt"]["base_optimizer"]))
    _run(resumed, opt2, data[2:3])
    base.zero_grad()
    closure_for(plain, *data[2])()
    base.step()
    with opt2.at_w():
        for i, (p, q) in enumerate(zip(resumed.parameters(), plain.parameters())):
            assert_close(p.detach(), q.detach(), f"param {i}: first resumed step")


def test_parameter_without_gradient_goes_back_to_w():
    """A parameter perturbed in one step and without a gradient in the next is moved back
    to w and left there (torch.optim does not step it)."""
    dtype = torch.float64
    model = make_model(dtype)
    opt = msam(model, "SGD-nesterov-wd", "reference")
    data = batches(dtype, 2)
    _run(model, opt, data[:1])
    last = model[-1].weight
    with opt.at_w():
        w_last = last.detach().clone()
    opt.zero_grad()
    closure_for(model, *data[1])()
    last.grad = None
    opt.step()
    assert_close(last.detach(), w_last, "last layer after a step without its gradient")
    assert id(last) not in opt._msam.back
    with opt.at_w():
        assert_close(last.detach(), w_last, "last layer inside at_w()")


def test_bad_arguments_are_refused():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="momentum > 0"):
        sharpopt.MSAM(p, torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="SGD"):
        sharpopt.MSAM(p, torch.optim.RMSprop, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        sharpopt.MSAM(p, torch.optim.SGD, rho=-1.0, lr=0.1, momentum=0.9)
    opt = sharpopt.MSAM(p, torch.optim.Adam, lr=0.1, eps=1e-6)
    assert opt.base_optimizer.param_groups[0]["eps"] == 1e-6, "Adam's eps must reach Adam"
    with pytest.raises(RuntimeError, match="one gradient per step"):
        opt.first_step()


def _lists(dtype, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for n in sizes]


# Odd sizes: empty, one element, smaller than a vector, not a multiple of any block.
SIZES = [0, 1, 7, 123, 2048 + 16, 5000]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_pass_against_its_composition(fast_backend, kind, dtype):
    """msam_sgd / msam_adam: without a move back, the same bits as restore_sgd /
    restore_adam and a sum of squares of the new momentum as sumsq computes it; with a move
    back, as lincomb then the update (within tolerance: one rounding fewer)."""
    from sharpopt.backends import _load
    ops, ref = _load(fast_backend), _load("reference")
    for back in (None, 0.37):
        w, g, m, v = (_lists(dtype, SIZES, s) for s in range(4))
        v = [x.abs() for x in v]
        w2, m2, v2 = ([x.clone() for x in xs] for xs in (w, m, v))
        if kind == "sgd":
            kw = dict(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=True,
                      maximize=False, init_buffers=False)
            got = ops.msam_sgd(w, g, m, back, **kw)
            if back is not None:
                ref.lincomb(w2, [w2, m2], [1.0, back])
            (ops if back is None else ref).restore_sgd(w2, None, g, m2, **kw)
            states = [(m, m2, "buf")]
        else:
            vm, vm2 = [x.clone() for x in v], [x.clone() for x in v]
            kw = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=1e-2,
                      decoupled=True, amsgrad=True, maximize=False)
            got = ops.msam_adam(w, g, m, v, vm, back, **kw)
            if back is not None:
                ref.lincomb(w2, [w2, m2], [1.0, back])
            (ops if back is None else ref).restore_adam(w2, None, g, m2, v2, vm2, **kw)
            states = [(m, m2, "exp_avg"), (v, v2, "exp_avg_sq"), (vm, vm2, "max_exp_avg_sq")]
        expect = ref.sumsq(states[0][1], states[0][1], adaptive=False, eta=0.0,
                           centralize=False)
        for i, (a, b) in enumerate(zip(w, w2)):
            what = f"back={back}, tensor {i} (numel {a.numel()}), w"
            if back is None:
                assert torch.equal(a, b), f"{what}: differs by {(a - b).abs().max()}"
            elif dtype == torch.bfloat16:
                torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=2 ** -7,
                                           msg=lambda s: f"{what}: {s}")
            else:
                assert_close(a, b, what)
            for x, y, name in states:
                if back is None:
                    assert torch.equal(x[i], y[i]), f"back=None, tensor {i}, {name}"
                else:
                    assert_close(x[i], y[i], f"back={back}, tensor {i}, {name}", dtype)
        assert got.dtype == expect.dtype, f"norm dtype {got.dtype} != {expect.dtype}"
        torch.testing.assert_close(got, expect, rtol=1e-5 if dtype != torch.float64 else 1e-12,
                                   atol=0, msg=lambda s: f"back={back}, sum of squares: {s}")


def test_nonfinite_gradient_is_refused_before_anything_is_written():
    dtype = torch.float32
    model = make_model(dtype)
    opt = msam(model, "SGD-nesterov-wd", "cpu" if "cpu" in FAST_BACKENDS else "foreach")
    data = batches(dtype, 2)
    _run(model, opt, data[:1])
    before = [p.detach().clone() for p in model.parameters()]
    m_before = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    closure_for(model, *data[1])()
    next(model.parameters()).grad[0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    for i, p in enumerate(model.parameters()):
        assert torch.equal(p, before[i]), f"param {i} was written"
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], m_before[i])


def test_grad_scaler_step_matches_the_unscaled_run():
    """GradScaler.step(opt): unscaled through the shared param_groups, then MSAM's step; a
    power-of-two scale makes it the same run as without a scaler, bit for bit."""
    dtype = torch.float32
    data = batches(dtype, 4)
    a, b = make_model(dtype), make_model(dtype)
    oa, ob = msam(a, "AdamW-amsgrad", "reference"), msam(b, "AdamW-amsgrad", "reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for x, y in data:
        oa.zero_grad()
        closure_for(a, x, y)()
        oa.step()
        ob.zero_grad()
        scaler.scale(F.cross_entropy(b(x), y)).backward()
        scaler.step(ob)
        scaler.update()
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert torch.equal(p, q), f"param {i}: {(p - q).abs().max()}"


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_pass_scalar_as_tensor_and_split_launches(fast_backend, kind, monkeypatch):
    """The move-back scale given as a 0-dim device tensor gives the same bits as the float;
    for triton, also when the plan is split over several launches (a tensor's chunks in two
    launches, partial sums at their global index)."""
    from sharpopt.backends import _load
    if fast_backend == "foreach":
        pytest.skip("foreach composes torch ops: a tensor and a float coefficient take "
                    "different kernels (alpha= vs a multiply), so only tolerances apply")
    ops = _load(fast_backend)
    sizes = [5 * 128 + 3, 7, 0, 123, 1, 2048 + 16]
    runs = []
    for variant in ("float", "tensor", "split"):
        if variant == "split":
            if fast_backend != "triton":
                continue
            from sharpopt.kernels import tables
            monkeypatch.setattr(tables, "MAX_TENSORS", 2)
            monkeypatch.setattr(tables, "MAX_BLOCKS", 3)
        back = 0.37 if variant == "float" else torch.tensor(0.37)
        w, g, m, v = (_lists(torch.float32, sizes, s) for s in range(4))
        v = [x.abs() for x in v]
        if kind == "sgd":
            norm = ops.msam_sgd(w, g, m, back, lr=0.1, weight_decay=1e-2, momentum=0.9,
                                dampening=0.0, nesterov=False, maximize=False, init_buffers=False)
        else:
            norm = ops.msam_adam(w, g, m, v, [], back, step=2, lr=1e-2, beta1=0.9, beta2=0.99,
                                 eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=False,
                                 maximize=True)
        runs.append((variant, norm, w, m, v))
    _, norm0, w0, m0, v0 = runs[0]
    for variant, norm, w, m, v in runs[1:]:
        assert torch.equal(norm, norm0), f"{variant}: norm {norm.item()!r} != {norm0.item()!r}"
        for name, xs, ys in (("w", w, w0), ("m", m, m0), ("v", v, v0)):
            for i, (a, b) in enumerate(zip(xs, ys)):
                assert torch.equal(a, b), f"{variant}: {name}[{i}] differs"


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_per_group_rho_with_one_global_norm(backend):
    """rho per param group scales one global ‖m‖ (over both groups); rho = 0 leaves its group
    at w. Checked against the rule written out with torch.optim.SGD."""
    require_backend(backend)
    dtype = torch.float32 if backend != "reference" else torch.float64
    model, plain = make_model(dtype), make_model(dtype)
    rhos = (0.3, 0.0)

    def groups(m):
        ps = list(m.parameters())
        return [{"params": ps[:3], "rho": rhos[0]}, {"params": ps[3:], "rho": rhos[1]}]

    opt = sharpopt.MSAM(groups(model), torch.optim.SGD, lr=0.05, momentum=0.9, backend=backend)
    base = torch.optim.SGD([{"params": g["params"]} for g in groups(plain)], lr=0.05, momentum=0.9)
    scale = None
    for step, (x, y) in enumerate(batches(dtype, 4)):
        opt.zero_grad()
        closure_for(model, x, y)()
        opt.step()
        base.zero_grad()
        closure_for(plain, x, y)()
        with torch.no_grad():
            if scale is not None:
                for g, r in zip(base.param_groups, rhos):
                    for p in g["params"]:
                        p.add_(base.state[p]["momentum_buffer"] * (r * scale))
            base.step()
            ps = list(plain.parameters())
            norm = torch.stack([base.state[p]["momentum_buffer"].square().sum() for p in ps])
            scale = 1.0 / (norm.sum().sqrt() + 1e-12)
            for g, r in zip(base.param_groups, rhos):
                for p in g["params"]:
                    p.sub_(base.state[p]["momentum_buffer"] * (r * scale))
        for i, (p, q) in enumerate(zip(model.parameters(), plain.parameters())):
            assert_close(p.detach(), q.detach(), f"step {step}, param {i} (group {int(i >= 3)})")
