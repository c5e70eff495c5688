"""Every fast backend against ``reference``: every algorithm × base optimizer × dtype.

Two copies of a small network (conv, batch norm, linear, layer norm; odd sizes; smooth activations, so
that gradients are continuous in the weights) train on
the same batches for several steps, one with ``backend="reference"`` and one with the
backend under test. After every step the parameters, every entry of the base optimizer's
state and every entry of the wrapper's own state must agree within the dtype's tolerance.

The algorithms and their keywords come from :mod:`sharpopt.registry` (its ``equivalence``
cases). :func:`check_matches_reference` and :func:`check_late_gradient` run one case; the
parametrized tests below and ``tests/test_registry.py`` (an algorithm registered by a
fixture) call them.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sharpopt
from conftest import assert_close
from sharpopt import registry

STEPS = 5
#: Algorithms without a base optimizer (RBO) evaluate the closure K + 1 times a step:
#: fewer steps, fp32 and bf16 only (their fp64 passes are tested per pass).
BASELESS_STEPS = 3


def equivalence_cases(with_base: bool):
    """``{id: (algorithm, keywords)}``: the registry's equivalence cases, read now."""
    return {i: c for i, c in registry.cases(registry.EQUIVALENCE).items()
            if c[0].base == with_base}


ALGORITHMS = equivalence_cases(with_base=True)
BASELESS = equivalence_cases(with_base=False)
#: The late-gradient rule applies to the two-pass protocol (each algorithm's main case).
LATE_GRADIENT = [i for i, (a, _) in ALGORITHMS.items()
                 if a.protocol == registry.TWO_PASS and i == a.name]

BASES = {
    "SGD-nesterov-wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                              weight_decay=5e-4)),
    "SGD-dampening-maximize": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3,
                                                     maximize=True)),
    "AdamW-amsgrad": (torch.optim.AdamW, dict(lr=3e-3, weight_decay=1e-2, amsgrad=True)),
    "Adam-l2": (torch.optim.Adam, dict(lr=3e-3, weight_decay=1e-3)),
}

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3, bias=False), torch.nn.BatchNorm2d(5), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(5 * 3 * 3, 7), torch.nn.LayerNorm(7),
        torch.nn.Tanh(), torch.nn.Linear(7, 3),
    )
    return model.to(dtype)


def batches(dtype, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 5, 5, generator=g).to(dtype), torch.randint(0, 3, (6,), generator=g))
            for _ in range(n)]


def closure_for(model, x, y):
    """Forward + backward. Low-precision parameters are cast up for the forward pass, so
    the two runs' gradients differ only as much as their weights do (a bf16 forward would
    amplify one-ulp weight differences into different gradients and hide real errors)."""
    low = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)

    def closure():
        if low:
            tensors = {n: t.double() for n, t in
                       [*model.named_parameters(), *model.named_buffers()]
                       if t.is_floating_point()}
            out = torch.func.functional_call(model, tensors, (x.double(),))
        else:
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        return loss
    return closure


def _state_pairs(ref_opt, opt, ref_model, model):
    """(what, reference tensor or value, tested tensor or value) for params and state."""
    for (name, p_ref), p in zip(ref_model.named_parameters(), model.parameters()):
        yield f"param {name}", p_ref.detach(), p.detach()
        for label, ref_state, state in (
            ("base", getattr(ref_opt, "base_optimizer", ref_opt).state,
             getattr(opt, "base_optimizer", opt).state),
            ("wrapper", ref_opt.state, opt.state),
        ):
            if p_ref not in ref_state and p not in state:
                continue
            ref_entries, entries = ref_state[p_ref], state[p]
            assert set(entries) == set(ref_entries), \
                f"{name}: {label} state keys {set(entries)} != {set(ref_entries)}"
            for key in ref_entries:
                yield f"{name}, {label} state {key!r}", ref_entries[key], entries[key]


def compare(step, ref_model, model, ref_opt, opt, dtype):
    """Parameters and every state entry of ``opt`` against ``ref_opt``.

    fp32/fp64: whole trajectories, elementwise within ``TOL``. bf16/fp16: both runs round,
    at different points (torch.optim's bf16 update rounds after every op, the fused passes
    once), and a one-ulp weight difference changes the next gradient; so after each step
    the tested run is re-synchronised to the reference (:func:`sync`) and every step is
    held to a few ulps of each entry's own scale, from identical inputs.
    """
    low = dtype in (torch.bfloat16, torch.float16)
    for what, ref_val, val in _state_pairs(ref_opt, opt, ref_model, model):
        what = f"step {step}, {what}"
        if not isinstance(ref_val, torch.Tensor):
            assert val == ref_val, what
            continue
        assert val.dtype == ref_val.dtype, f"{what}: dtype {val.dtype} != {ref_val.dtype}"
        if "'step'" in what:
            assert torch.equal(val, ref_val), f"{what}: {val} != {ref_val}"
        elif low:
            ulps = 4 * torch.finfo(dtype).eps
            scale = ref_val.float().abs().max().item() if ref_val.numel() else 0.0
            torch.testing.assert_close(val.float(), ref_val.float(), rtol=ulps,
                                       atol=ulps * scale + 1e-30,
                                       msg=lambda m: f"{what} (4 ulps of {scale:.3g}): {m}")
        else:
            assert_close(val, ref_val, what, dtype)


def sync(ref_model, model, ref_opt, opt):
    """Copy the reference run's weights and state into the tested run (bit for bit)."""
    with torch.no_grad():
        for _, ref_val, val in _state_pairs(ref_opt, opt, ref_model, model):
            if isinstance(ref_val, torch.Tensor):
                val.copy_(ref_val)


def check_matches_reference(backend, algo: registry.Algorithm, kwargs, base, dtype,
                            steps: int = STEPS):
    """Rule: ``algo`` built with ``kwargs`` (and base optimizer ``BASES[base]``, None for an
    algorithm without one) on ``backend`` takes the reference's steps: parameters and every
    state entry within the dtype's tolerance after each of ``steps`` steps."""
    if backend == "triton" and dtype == torch.float64:
        # The triton fp64 kernels are covered pass by pass (test_triton_kernels.py,
        # test_properties.py); whole trajectories run fp32/bf16 under the interpreter,
        # which would otherwise take most of the suite's time budget.
        pytest.skip("triton: fp64 trajectories not run (fp64 passes are tested per pass)")
    base_cls, base_kwargs = BASES[base] if base is not None else (None, {})
    ref_model = make_model(dtype)
    model = copy.deepcopy(ref_model)
    ref_opt = algo.build(ref_model.parameters(), base_cls, backend="reference", **kwargs,
                         **base_kwargs)
    opt = algo.build(model.parameters(), base_cls, backend=backend, **kwargs, **base_kwargs)
    assert opt.backend == backend
    for step, (x, y) in enumerate(batches(dtype, steps)):
        ref_opt.step(closure_for(ref_model, x, y))
        opt.step(closure_for(model, x, y))
        compare(step, ref_model, model, ref_opt, opt, dtype)
        if dtype == torch.bfloat16:
            sync(ref_model, model, ref_opt, opt)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_backend_matches_reference(fast_backend, algo, base, dtype):
    entry, kwargs = ALGORITHMS[algo]
    check_matches_reference(fast_backend, entry, kwargs, base, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("algo", list(BASELESS))
def test_baseless_matches_reference(fast_backend, algo, dtype):
    entry, kwargs = BASELESS[algo]
    check_matches_reference(fast_backend, entry, kwargs, None, dtype, steps=BASELESS_STEPS)


def test_two_pass_api_matches_reference(fast_backend):
    """first_step/second_step with a generic base (RMSprop: restore, then base.step())."""
    dtype = torch.float32
    ref_model = make_model(dtype)
    model = copy.deepcopy(ref_model)
    mk = lambda m, be: sharpopt.GCSAM(m.parameters(), torch.optim.RMSprop, rho=0.1, lr=1e-3,
                                      backend=be)
    ref_opt, opt = mk(ref_model, "reference"), mk(model, fast_backend)
    for step, (x, y) in enumerate(batches(dtype, 3)):
        for m, o in ((ref_model, ref_opt), (model, opt)):
            closure_for(m, x, y)()
            assert o.first_step(zero_grad=True)
            closure_for(m, x, y)()
            o.second_step(zero_grad=True)
        compare(step, ref_model, model, ref_opt, opt, dtype)


class LateBranch(torch.nn.Module):
    """A trunk used by every forward and a branch used only when ``use_branch`` is set, so
    the branch's parameters get a gradient in the second pass of a step and not the first
    (stochastic depth, conditional branches, MoE routing)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(5, 7)
        self.branch = torch.nn.Linear(7, 7)
        self.head = torch.nn.Linear(7, 3)
        self.use_branch = False

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        if self.use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def check_late_gradient(backend, algo: registry.Algorithm, kwargs, base):
    """Rule: a parameter whose gradient appears only in the second pass is updated by the
    base optimizer on that gradient, as torch.optim (and ``reference``) would; the fused
    paths used to skip it."""
    base_cls, base_kwargs = BASES[base]
    ref_model = LateBranch()
    model = copy.deepcopy(ref_model)
    ref_opt = algo.build(ref_model.parameters(), base_cls, backend="reference", **kwargs,
                         **base_kwargs)
    opt = algo.build(model.parameters(), base_cls, backend=backend, **kwargs, **base_kwargs)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        x, y = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
        for m, o in ((ref_model, ref_opt), (model, opt)):
            m.use_branch = False
            F.cross_entropy(m(x), y).backward()
            if o.first_step(zero_grad=True):
                m.use_branch = True
                F.cross_entropy(m(x), y).backward()
                o.second_step(zero_grad=True)
        compare(step, ref_model, model, ref_opt, opt, torch.float32)
    assert not torch.equal(model.branch.weight, LateBranch().branch.weight), \
        "the branch was never stepped"


LATE_BASES = ["SGD-nesterov-wd", "AdamW-amsgrad"]


@pytest.mark.parametrize("base", LATE_BASES)
@pytest.mark.parametrize("algo", LATE_GRADIENT)
def test_gradient_only_in_second_pass_is_stepped(fast_backend, algo, base):
    entry, kwargs = ALGORITHMS[algo]
    check_late_gradient(fast_backend, entry, kwargs, base)
