"""Property-based: random shapes, dtypes and hyperparameters through every pass of every
fast backend, against the reference passes (hypothesis draws the cases)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharpopt.backends import reference
from conftest import require_backend
from test_passes import assert_reduction, dot_scale
from tolerances import DOT_OF_RESULT, ROW_MEANS, pass_tol

REF = reference.load()

shapes = st.lists(
    st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float64])
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def tensors(shape_list, dtype, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g, dtype=torch.float64) for s in shape_list]
    return [(t.abs() if positive else t).to(dtype) for t in out]


def clone(ts):
    return [t.clone() for t in ts]


def close(actual, expected, dtype, what, backend):
    rtol, atol = pass_tol(dtype, backend)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}, tensor {i} {tuple(e.shape)}: {m}")


@pytest.fixture(params=["foreach", "cpu", "triton"])
def ops(request):
    return require_backend(request.param)


@SETTINGS
@given(shape_list=shapes, dtype=dtypes, seed=st.integers(0, 2 ** 16),
       adaptive=st.booleans(), centralize=st.booleans(), eta=st.sampled_from([0.0, 0.01]),
       scale=st.floats(-2.0, 2.0))
def test_sumsq_and_perturb_match_reference(ops, shape_list, dtype, seed, adaptive, centralize,
                                           eta, scale):
    g = tensors(shape_list, dtype, seed)
    w = tensors(shape_list, dtype, seed + 1)
    means = lambda: [torch.empty(t.shape[0], dtype=torch.float32) if t.dim() > 1 else None
                     for t in w]
    m_ref, m_ops = means(), means()
    s_ref = REF.sumsq(g, w, adaptive=adaptive, eta=eta, centralize=centralize, row_means=m_ref)
    s_ops = ops.sumsq(g, w, adaptive=adaptive, eta=eta, centralize=centralize, row_means=m_ops)
    assert_reduction(s_ops, s_ref, s_ref.item(), dtype, "sumsq", ops.name)
    for a, b, t in zip(m_ops, m_ref, w):
        if a is not None and t.numel():
            rtol, atol = ROW_MEANS[dtype]
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    w_ref, w_ops = clone(w), clone(w)
    saved_ref, saved_ops = [torch.empty_like(t) for t in w], [torch.empty_like(t) for t in w]
    kw = dict(adaptive=adaptive, eta=eta)
    REF.perturb(w_ref, g, saved_ref, scale, row_means=m_ref if centralize else None, **kw)
    ops.perturb(w_ops, g, saved_ops, scale, row_means=m_ref if centralize else None, **kw)
    for a, b in zip(saved_ops, w):
        assert torch.equal(a, b), "perturb must save w bit for bit"
    close(w_ops, w_ref, dtype, "perturb", ops.name)


@SETTINGS
@given(shape_list=shapes, dtype=dtypes, seed=st.integers(0, 2 ** 16),
       coefs=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=3), alias=st.booleans())
def test_lincomb_and_dot_match_reference(ops, shape_list, dtype, seed, coefs, alias):
    xs = [tensors(shape_list, dtype, seed + k) for k in range(len(coefs))]
    d_ref, d_ops = REF.dot(xs[0], xs[-1]), ops.dot(xs[0], xs[-1])
    assert_reduction(d_ops, d_ref, dot_scale(xs[0], xs[-1]), dtype, "dot", ops.name)
    rtol, atol = DOT_OF_RESULT[dtype]
    torch.testing.assert_close(d_ops.double().cpu(), d_ref.double(), rtol=rtol, atol=atol)
    if alias:     # out is the first input, as the optimizers use it
        out_ref, out_ops = clone(xs[0]), clone(xs[0])
        REF.lincomb(out_ref, [out_ref, *xs[1:]], coefs)
        ops.lincomb(out_ops, [out_ops, *xs[1:]], coefs)
    else:
        out_ref = [torch.empty_like(t) for t in xs[0]]
        out_ops = [torch.empty_like(t) for t in xs[0]]
        REF.lincomb(out_ref, xs, coefs)
        ops.lincomb(out_ops, xs, coefs)
    close(out_ops, out_ref, dtype, f"lincomb {coefs}", ops.name)


@SETTINGS
@given(shape_list=shapes, dtype=dtypes, seed=st.integers(0, 2 ** 16),
       momentum=st.sampled_from([0.0, 0.9]), dampening=st.sampled_from([0.0, 0.3]),
       nesterov=st.booleans(), maximize=st.booleans(), init=st.booleans(),
       weight_decay=st.sampled_from([0.0, 1e-2]), lr=st.floats(1e-3, 1.0))
def test_restore_sgd_matches_reference(ops, shape_list, dtype, seed, momentum, dampening,
                                       nesterov, maximize, init, weight_decay, lr):
    if nesterov and (momentum == 0 or dampening != 0):
        nesterov = False
    w, saved, d = (tensors(shape_list, dtype, seed + k) for k in range(3))
    bufs = tensors(shape_list, dtype, seed + 3) if momentum else []
    results = []
    for impl in (REF, ops):
        p, b = clone(w), clone(bufs)
        impl.restore_sgd(p, saved, d, b, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         dampening=dampening, nesterov=nesterov, maximize=maximize,
                         init_buffers=init)
        results.append((p, b))
    close(results[1][0], results[0][0], dtype, "restore_sgd params", ops.name)
    close(results[1][1], results[0][1], dtype, "restore_sgd momentum_buffer", ops.name)


@SETTINGS
@given(shape_list=shapes, dtype=dtypes, seed=st.integers(0, 2 ** 16),
       step=st.integers(1, 50), amsgrad=st.booleans(), decoupled=st.booleans(),
       maximize=st.booleans(), weight_decay=st.sampled_from([0.0, 1e-2]),
       restore=st.booleans())
def test_restore_adam_matches_reference(ops, shape_list, dtype, seed, step, amsgrad, decoupled,
                                        maximize, weight_decay, restore):
    w, saved, d, m = (tensors(shape_list, dtype, seed + k) for k in range(4))
    v = tensors(shape_list, dtype, seed + 4, positive=True)
    vmax = tensors(shape_list, dtype, seed + 5, positive=True) if amsgrad else []
    results = []
    for impl in (REF, ops):
        p, mm, vv, vx = clone(w), clone(m), clone(v), clone(vmax)
        impl.restore_adam(p, saved if restore else None, d, mm, vv, vx, step=step, lr=1e-2,
                          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay,
                          decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)
        results.append((p, mm, vv, vx))
    for i, name in enumerate(("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")):
        close(results[1][i], results[0][i], dtype, f"restore_adam {name}", ops.name)
