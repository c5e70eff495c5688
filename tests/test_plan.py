"""The step plan: what a step derives from the parameter set is made once and reused.

Rule (``_Core._gather``): the plan is reused while the same parameters, in the same groups,
have gradients and stay on their device and dtype, and it is rebuilt whenever any of that
changes. Each test below drives one change on every backend and checks the trajectory
against ``reference`` (whose numbers do not depend on any plan), so a stale plan shows as
a wrong weight or state entry.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sharpopt
from test_backends import LateBranch as Net, compare

BASES = {
    "SGD-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "AdamW": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


def data(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
            for _ in range(n)]


def two_pass(model, opt, x, y, branch=(True, True)):
    model.use_branch = branch[0]
    F.cross_entropy(model(x), y).backward()
    if opt.first_step(zero_grad=True):
        model.use_branch = branch[1]
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


def pair(fast_backend, base, cls=sharpopt.SAM, **kw):
    base_cls, base_kw = BASES[base]
    ref_model = Net()
    ref_model.use_branch = True
    model = copy.deepcopy(ref_model)
    ref = cls(ref_model.parameters(), base_cls, backend="reference", rho=0.05, **kw, **base_kw)
    opt = cls(model.parameters(), base_cls, backend=fast_backend, rho=0.05, **kw, **base_kw)
    return ref_model, model, ref, opt


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("cls", [sharpopt.SAM, sharpopt.GCSAM], ids=["SAM", "GCSAM"])
def test_plan_follows_gradients_appearing_and_disappearing(fast_backend, base, cls):
    """A parameter without a gradient on some steps (in the first pass, the second, or
    both) is left out on those steps and back in on the others."""
    ref_model, model, ref, opt = pair(fast_backend, base, cls)
    pattern = [(True, True), (False, False), (False, True), (True, False), (True, True),
               (False, False), (True, True)]
    for step, ((x, y), branch) in enumerate(zip(data(len(pattern)), pattern)):
        two_pass(ref_model, ref, x, y, branch)
        two_pass(model, opt, x, y, branch)
        compare(step, ref_model, model, ref, opt, torch.float32)


@pytest.mark.parametrize("base", list(BASES))
def test_plan_is_reused_and_dropped_by_add_param_group(fast_backend, base):
    """Steps with the same parameter set reuse one plan (the same bucket objects); a group
    added mid-run is stepped from its first step on."""
    ref_model, model, ref, opt = pair(fast_backend, base)
    extra = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    extra_ref = [torch.nn.Parameter(t.detach().clone()) for t in extra]
    batches = data(5)
    seen = []
    for step, (x, y) in enumerate(batches):
        if step == 2:
            ref.add_param_group({"params": extra_ref, "lr": 0.02})
            opt.add_param_group({"params": extra, "lr": 0.02})
        for m, o, ex in ((ref_model, ref, extra_ref), (model, opt, extra)):
            loss = F.cross_entropy(m(x), y)
            if step >= 2:
                loss = loss + sum((e ** 2).sum() for e in ex)
            loss.backward()
            assert o.first_step(zero_grad=True)
            if o is opt:
                seen.append(opt._plan[1])
            loss = F.cross_entropy(m(x), y)
            if step >= 2:
                loss = loss + sum((e ** 2).sum() for e in ex)
            loss.backward()
            o.second_step(zero_grad=True)
        compare(step, ref_model, model, ref, opt, torch.float32)
        for e, e_ref in zip(extra, extra_ref):
            torch.testing.assert_close(e, e_ref, msg=lambda m: f"step {step}, added group: {m}")
    assert seen[0] is seen[1], "the same parameter set rebuilt its plan"
    assert seen[2] is not seen[1], "add_param_group kept the old plan"
    assert seen[3] is seen[2]


@pytest.mark.parametrize("base", list(BASES))
def test_plan_dropped_by_load_state_dict(fast_backend, base):
    """Loading a checkpoint mid-run (state tensors replaced) continues exactly like the
    reference loading the same checkpoint."""
    ref_model, model, ref, opt = pair(fast_backend, base)
    batches = data(6)
    for x, y in batches[:2]:
        two_pass(ref_model, ref, x, y)
        two_pass(model, opt, x, y)
    snap_model, snap = copy.deepcopy(ref_model.state_dict()), copy.deepcopy(ref.state_dict())
    for x, y in batches[2:4]:          # steps the checkpoint will undo
        two_pass(ref_model, ref, x, y)
        two_pass(model, opt, x, y)
    for m, o in ((ref_model, ref), (model, opt)):
        m.load_state_dict(snap_model)
        o.load_state_dict(copy.deepcopy(snap))
    for step, (x, y) in enumerate(batches[4:]):
        two_pass(ref_model, ref, x, y)
        two_pass(model, opt, x, y)
        compare(step, ref_model, model, ref, opt, torch.float32)


def test_plan_follows_a_dtype_move(fast_backend):
    """``model.double()`` keeps the Parameter objects but moves their storage: the plan
    and the scratch buffers are made again for fp64."""
    ref_model, model, ref, opt = pair(fast_backend, "SGD-momentum")
    for g in (*ref.param_groups, *opt.param_groups):
        g["momentum"] = 0.0                 # no state to carry across dtypes
    for step, (x, y) in enumerate(data(4)):
        if step == 2:
            ref_model.double()
            model.double()
        if step >= 2:
            x = x.double()
        two_pass(ref_model, ref, x, y)
        two_pass(model, opt, x, y)
        compare(step, ref_model, model, ref, opt, torch.float32)
    assert all(b.dtype == torch.float64 for b in opt._plan[1])


@pytest.mark.parametrize("how", ["clear", "replace"])
@pytest.mark.parametrize("base", list(BASES))
def test_state_reset_mid_run_is_seen(fast_backend, base, how):
    """The plan keeps the base optimizer's state lists while its state dict is the same
    object of the same size: emptying it (``state.clear()``) or replacing it restarts the
    momentum / Adam moments exactly as torch.optim does."""
    from collections import defaultdict
    ref_model, model, ref, opt = pair(fast_backend, base)
    for step, (x, y) in enumerate(data(6)):
        if step == 3:
            for o in (ref, opt):
                if how == "clear":
                    o.base_optimizer.state.clear()
                else:
                    o.base_optimizer.state = defaultdict(dict)
        two_pass(ref_model, ref, x, y)
        two_pass(model, opt, x, y)
        compare(step, ref_model, model, ref, opt, torch.float32)
