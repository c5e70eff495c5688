"""Each algorithm's update against values worked out by hand on tiny problems.

The losses are chosen so every gradient has a closed form (``L = ½ Σ c·w²`` gives
``g = c ⊙ w``; ``L = ¼ Σ w⁴`` gives ``g = w³``), and the expected weights are written from
the formulas of docs/algorithms.md with numpy in fp64. Each case is built so that a wrong sign, a missing
square, the wrong norm or a missing restore changes the answer. They run on ``reference``
and on every fast backend present.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sharpopt
from conftest import FAST_BACKENDS, require_backend

BACKENDS = ["reference", *FAST_BACKENDS]
C = np.array([1.0, 2.0])
W0 = np.array([3.0, 2.0])          # g = C·W0 = [3, 4], ‖g‖ = 5


@pytest.fixture(params=BACKENDS)
def backend(request):
    require_backend(request.param)
    return request.param


def quad_problem(w0=W0, c=C):
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    c_t = torch.tensor(c, dtype=torch.float64)

    def closure():
        loss = 0.5 * (c_t * w * w).sum()
        loss.backward()
        return loss
    return w, closure


def quartic_problem(w0):
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))

    def closure():
        loss = 0.25 * (w ** 4).sum()
        loss.backward()
        return loss
    return w, closure


def check(w, expected, rule):
    got = w.detach().numpy()
    assert np.allclose(got, expected, rtol=1e-9, atol=1e-12), \
        f"{rule}: got {got}, expected {expected}, diff {got - expected}"


def test_sam_ascends_along_normalised_gradient_then_restores(backend):
    w, closure = quad_problem()
    opt = sharpopt.SAM([w], torch.optim.SGD, rho=0.5, lr=0.1, backend=backend)
    opt.step(closure)
    e = 0.5 * np.array([3.0, 4.0]) / 5.0            # [0.3, 0.4]
    g_adv = C * (W0 + e)                            # [3.3, 4.8]
    check(w, W0 - 0.1 * g_adv, "SAM: w - lr * g(w + rho g/|g|)")


def test_sam_first_and_second_step_match_closure_form(backend):
    w, closure = quad_problem()
    opt = sharpopt.SAM([w], torch.optim.SGD, rho=0.5, lr=0.1, backend=backend)
    closure()
    assert opt.first_step(zero_grad=True) is True
    check(w, W0 + 0.5 * np.array([3.0, 4.0]) / 5.0, "SAM first_step: w + e")
    closure()
    opt.second_step(zero_grad=True)
    check(w, W0 - 0.1 * C * (W0 + np.array([0.3, 0.4])), "SAM second_step")
    assert w.grad is None


@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_asam_scales_by_t_squared_and_normalises_by_t(backend, eta):
    w, closure = quad_problem()
    opt = sharpopt.ASAM([w], torch.optim.SGD, rho=0.5, eta=eta, lr=0.1, backend=backend)
    opt.step(closure)
    g = C * W0
    t = np.abs(W0) + eta
    e = 0.5 * t * t * g / np.linalg.norm(t * g)
    check(w, W0 - 0.1 * C * (W0 + e), "ASAM: e = rho T^2 g / |T g|")


@pytest.mark.parametrize("norm", ["centralized", "raw"])
def test_gcsam_centralises_rows_of_matrices_only(backend, norm):
    wm0 = np.array([[1.0, 3.0], [2.0, 6.0]])        # L = ½|W|²: g = W, row means [2, 4]
    b0 = np.array([1.0, -2.0])                      # a bias: dim 1, not centralised
    wm = torch.nn.Parameter(torch.tensor(wm0))
    bias = torch.nn.Parameter(torch.tensor(b0))

    def closure():
        loss = 0.5 * (wm * wm).sum() + 0.5 * (bias * bias).sum()
        loss.backward()
        return loss
    rho = math.sqrt(10.0)
    opt = sharpopt.GCSAM([wm, bias], torch.optim.SGD, rho=rho, norm=norm, lr=0.5,
                         backend=backend)
    opt.step(closure)
    gc = np.array([[-1.0, 1.0], [-2.0, 2.0]])
    if norm == "centralized":
        denom = math.sqrt(10.0 + 5.0)               # |GC(W)|^2 + |b|^2
    else:
        denom = math.sqrt(50.0 + 5.0)               # |W|^2 + |b|^2
    check(wm, wm0 - 0.5 * (wm0 + rho * gc / denom), f"GCSAM({norm}) matrix")
    check(bias, b0 - 0.5 * (b0 + rho * b0 / denom), f"GCSAM({norm}) bias")


def test_gsam_subtracts_alpha_times_orthogonal_part(backend):
    w, closure = quad_problem()
    opt = sharpopt.GSAM([w], torch.optim.SGD, rho=0.5, alpha=0.4, lr=0.1, backend=backend)
    opt.step(closure)
    g = C * W0
    gp = C * (W0 + 0.5 * g / np.linalg.norm(g))
    g_perp = g - (g @ gp) / (gp @ gp) * gp
    check(w, W0 - 0.1 * (gp - 0.4 * g_perp), "GSAM: d = g_p - alpha g_perp")


def test_gsam_rho_follows_lr_between_rho_min_and_rho_max(backend):
    w, closure = quad_problem()
    opt = sharpopt.GSAM([w], torch.optim.SGD, rho_min=0.1, rho_max=0.5, lr_min=0.0,
                        alpha=0.0, lr=0.1, backend=backend)
    opt.param_groups[0]["lr"] = 0.05               # halfway: rho_t = 0.3
    opt.step(closure)
    g = C * W0
    gp = C * (W0 + 0.3 * g / 5.0)
    check(w, W0 - 0.05 * gp, "GSAM rho_t = rho_min + (rho_max - rho_min)(lr - lr_min)/(...)")


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_weights_sharpness_term(backend, decouple):
    w, closure = quad_problem()
    lr, eps_adam = 0.01, 1e-8
    opt = sharpopt.WSAM([w], torch.optim.Adam, rho=0.5, gamma=0.9, decouple=decouple,
                        lr=lr, eps=eps_adam, backend=backend)
    opt.step(closure)
    a = 0.9 / 0.1
    g = C * W0
    gp = C * (W0 + 0.5 * g / 5.0)
    adam1 = lambda d: d / (np.abs(d) + eps_adam)   # first Adam step: m̂ = d, v̂ = d²
    if decouple:
        expected = W0 - lr * adam1(g) - lr * a * (gp - g)
    else:
        expected = W0 - lr * adam1(a * gp + (1 - a) * g)
    check(w, expected, f"WSAM decouple={decouple}")


def test_crsam_adds_curvature_and_difference_terms(backend):
    w0 = np.array([1.0, -2.0, 0.5])
    w, closure = quartic_problem(w0)
    opt = sharpopt.CRSAM([w], torch.optim.SGD, rho=0.3, gamma=0.1, beta=0.2, lr=0.1,
                         backend=backend)
    opt.step(closure)
    g0 = w0 ** 3
    e = 0.3 * g0 / np.linalg.norm(g0)
    gplus, gminus = (w0 + e) ** 3, (w0 - e) ** 3
    d = gplus + 0.1 * (gplus + gminus - 2 * g0) + 0.2 * (gplus - gminus)
    check(w, w0 - 0.1 * d, "CR-SAM: d = g+ + gamma (g+ + g- - 2 g0) + beta (g+ - g-)")


def test_rbo_one_inner_step_matches_projection_formula(backend):
    w, closure = quad_problem()
    lr, rho, beta = 0.1, 0.2, 0.3
    opt = sharpopt.RBO([w], lr=lr, rho=rho, inner_steps=2, inner_lr=beta, backend=backend)
    opt.step(closure)
    loss = lambda x: 0.5 * (C * x * x).sum()
    g = C * W0
    s = math.sqrt(1 + g @ g)
    cw = W0 - (rho / s + lr) * g
    cl = loss(W0) + rho / s - lr * (g @ g)
    x = W0.copy()
    for _ in range(2):
        x = x - beta * ((x - cw) + (loss(x) - cl) * (C * x))
    check(w, x, "RBO inner steps toward the projection of the rolled centre")


def test_rbo_with_zero_radius_is_gradient_descent(backend):
    w, closure = quad_problem(c=np.array([0.5, 0.25]))
    opt = sharpopt.RBO([w], lr=1e-3, rho=0.0, inner_steps=200, inner_lr=0.5, backend=backend)
    opt.step(closure)
    gd = W0 - 1e-3 * np.array([0.5, 0.25]) * W0
    got = w.detach().numpy()
    # The projection of (w - lr g, L - lr|g|²) onto the graph is GD up to O(lr²).
    assert np.allclose(got, gd, atol=1e-5), f"RBO(rho=0) {got} vs GD {gd}"
    assert not np.allclose(got, W0, atol=1e-4), "RBO(rho=0) did not move"


def test_sam_every_k_steps_alternates_sam_and_plain_steps(backend):
    w, closure = quad_problem()
    opt = sharpopt.SAM([w], torch.optim.SGD, rho=0.5, k=2, lr=0.1, backend=backend)
    opt.step(closure)
    w1 = W0 - 0.1 * C * (W0 + 0.5 * C * W0 / 5.0)
    check(w, w1, "every-k: call 1 is SAM")
    opt.step(closure)
    check(w, w1 - 0.1 * C * w1, "every-k: call 2 is a plain base step")
    w.grad = None
    closure()
    assert opt.first_step() is True, "every-k: call 3 perturbs again"


def test_looksam_reuses_orthogonal_component_between_sam_steps(backend):
    w, closure = quad_problem()
    opt = sharpopt.LookSAM([w], torch.optim.SGD, rho=0.5, k=2, alpha=0.7, lr=0.1,
                           backend=backend)
    opt.step(closure)
    g = C * W0
    g_adv = C * (W0 + 0.5 * g / np.linalg.norm(g))
    g_v = g_adv - (g @ g_adv) / (g @ g) * g
    w1 = W0 - 0.1 * g_adv
    check(w, w1, "LookSAM: step 1 is SAM")
    w.grad = None
    closure()
    assert opt.first_step() is False, "LookSAM: step 2 is one pass"
    g1 = C * w1
    d = g1 + 0.7 * np.linalg.norm(g1) / np.linalg.norm(g_v) * g_v
    check(w, w1 - 0.1 * d, "LookSAM: d = g + alpha |g|/|g_v| g_v")
    torch.testing.assert_close(opt.state[w]["g_v"], torch.tensor(g_v), msg="LookSAM g_v state")


def test_friendlysam_perturbs_along_gradient_minus_running_mean(backend):
    w, closure = quad_problem()
    opt = sharpopt.FriendlySAM([w], torch.optim.SGD, rho=0.5, sigma=1.0, lam=0.9, lr=0.1,
                               backend=backend)
    opt.step(closure)
    g1 = C * W0
    w1 = W0 - 0.1 * C * (W0 + 0.5 * g1 / np.linalg.norm(g1))   # first step: raw g
    check(w, w1, "Friendly-SAM step 1 (m = g)")
    opt.step(closure)
    g2 = C * w1
    d = g2 - 1.0 * g1
    w2 = w1 - 0.1 * C * (w1 + 0.5 * d / np.linalg.norm(d))
    check(w, w2, "Friendly-SAM step 2: d = g - sigma m")
    m = 0.9 * g1 + 0.1 * g2
    assert np.allclose(opt.state[w]["momentum"].numpy(), m), "Friendly-SAM m update"


def test_sam_with_momentum_sgd_two_steps(backend):
    w, closure = quad_problem()
    opt = sharpopt.SAM([w], torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, nesterov=True,
                       weight_decay=0.01, backend=backend)
    wk, buf = W0.copy(), None
    for _ in range(2):
        opt.step(closure)
        g = C * wk
        d = C * (wk + 0.5 * g / np.linalg.norm(g)) + 0.01 * wk
        buf = d if buf is None else 0.9 * buf + d
        wk = wk - 0.1 * (d + 0.9 * buf)
        check(w, wk, "SAM + SGD(momentum, nesterov, weight decay)")
    assert np.allclose(opt.base_optimizer.state[w]["momentum_buffer"].numpy(), buf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_square_root_is_correctly_rounded(dtype):
    """The reference's Adam denominator takes a correctly rounded square root on every
    CPU (torch's own is one ulp off for many inputs on some CPUs). ``math.sqrt`` rounds
    correctly in fp64, and rounding that to fp32 is the correctly rounded fp32 root."""
    from sharpopt.backends.reference import sqrt_rn

    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4000, generator=gen, dtype=torch.float64).mul(1e-3).to(dtype)
    got = sqrt_rn(x)
    want = torch.tensor([math.sqrt(v) for v in x.tolist()], dtype=torch.float64).to(dtype)
    bad = (got != want).nonzero().flatten().tolist()
    assert got.dtype == dtype and not bad, \
        f"{len(bad)} of {x.numel()} roots not correctly rounded, first at {bad[:3]}"
    cl = torch.rand(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last)
    assert torch.equal(sqrt_rn(cl), sqrt_rn(cl.contiguous())), "a channels_last input"

