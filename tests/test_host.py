"""The host helpers of a step (``sharpopt._host``) and the extensions' list arguments.

Rules checked:
* each C++ helper gives what its Python fallback gives (which parameters have a gradient,
  ``p.grad`` of each, data addresses, element counts, the triton layout rule), and a key
  changes exactly when what it stands for changes; ``grad_key_is`` answers exactly as
  comparing a new key would;
* a list refilled in place holds the gradients and lets them go again, with every
  reference count back where it was;
* the bindings read list arguments without taking or dropping a reference of any tensor
  (a borrowed handle that was released, or one released twice, shows in the counts), take
  tuples as lists, refuse a non-tensor entry with a TypeError, and keep working on
  tensors held only by the argument list.
"""
from __future__ import annotations

import sys

import pytest
import torch

import sharpopt
from sharpopt import _host
from conftest import REQUIRED, require_backend


@pytest.fixture
def ext():
    """The loaded helpers (the prebuilt extension, or the cpu backend's own build)."""
    require_backend("cpu")
    mod = _host._ext()
    if mod is None:
        if "cpu" in REQUIRED:
            pytest.fail("the cpu extension is required but has no host helpers (rebuild it)")
        pytest.skip("the loaded cpu extension predates the host helpers")
    return mod


@pytest.fixture
def python_only(monkeypatch):
    monkeypatch.setattr(_host, "_ext", lambda: None)


def _params(n=7, with_grad=(0, 2, 3, 6)):
    ps = [torch.nn.Parameter(torch.randn(i + 1)) for i in range(n)]
    for i in with_grad:
        ps[i].grad = torch.randn_like(ps[i])
    return ps


def test_grad_key_changes_exactly_when_the_gradient_set_changes(ext):
    ps = _params()
    groups = [ps[:4], ps[4:]]
    key = _host.grad_key(groups)
    assert _host.grad_key(groups) == key
    ps[2].grad = torch.randn_like(ps[2])          # a new gradient tensor: same parameters
    assert _host.grad_key(groups) == key
    ps[5].grad = torch.zeros_like(ps[5])          # a gradient appears
    assert _host.grad_key(groups) != key
    ps[5].grad = None
    assert _host.grad_key(groups) == key
    ps[0].grad = None                             # one disappears
    assert _host.grad_key(groups) != key
    ps[0].grad = torch.zeros_like(ps[0])
    assert _host.grad_key([ps[4:], ps[:4]]) != key   # another order


def test_grad_key_matches_the_python_fallback(ext, monkeypatch):
    ps = _params()
    groups = [ps[:3], ps[3:]]
    fast = _host.grad_key(groups)
    monkeypatch.setattr(_host, "_ext", lambda: None)
    slow = _host.grad_key(groups)
    addresses = [int.from_bytes(fast[i:i + 8], sys.byteorder) for i in range(0, len(fast), 8)]
    assert addresses == slow == [id(p) for p in ps if p.grad is not None]


def test_grad_key_of_a_group_that_is_not_a_list_falls_back(ext):
    ps = _params()
    assert _host.grad_key([tuple(ps)]) == [id(p) for p in ps if p.grad is not None]


@pytest.mark.parametrize("path", ["ext", "python"])
def test_grad_key_is_answers_as_a_new_key_would(path, request):
    request.getfixturevalue("ext" if path == "ext" else "python_only")
    ps = _params()
    groups = [ps[:4], ps[4:]]
    key = _host.grad_key(groups)
    changes = [
        lambda: setattr(ps[2], "grad", torch.randn_like(ps[2])),   # new tensor, same set
        lambda: setattr(ps[5], "grad", torch.zeros_like(ps[5])),   # one appears (group 2)
        lambda: setattr(ps[5], "grad", None),
        lambda: setattr(ps[0], "grad", None),                      # the first disappears
        lambda: setattr(ps[0], "grad", torch.zeros_like(ps[0])),
        lambda: setattr(ps[6], "grad", None),                      # the last disappears
        lambda: setattr(ps[6], "grad", torch.zeros_like(ps[6])),
    ]
    for step, change in enumerate(changes):
        change()
        want = _host.grad_key(groups) == key
        assert _host.grad_key_is(groups, key) is want, f"after change {step}"
    assert _host.grad_key_is([ps[4:], ps[:4]], key) is False, "another group order"
    assert _host.grad_key_is([ps[:4], ps[4:], []], key) is True, "an empty group adds nothing"
    assert _host.grad_key_is([ps[:3], ps[4:]], key) is False, "a parameter left out"


@pytest.mark.parametrize("path", ["ext", "python"])
def test_grads_into_refills_in_place_and_clear_lets_go(path, request):
    request.getfixturevalue("ext" if path == "ext" else "python_only")
    ps = _params()
    before = [sys.getrefcount(p.grad) for p in ps if p.grad is not None]
    held = [None] * len(ps)
    for _ in range(20):
        got = _host.grads_into(ps, held)
        assert got is held and len(held) == len(ps)
        assert all(g is p.grad for p, g in zip(ps, held)), \
            [i for i, (p, g) in enumerate(zip(ps, held)) if g is not p.grad]
    _host.clear(held)
    assert held == [None] * len(ps)
    assert [sys.getrefcount(p.grad) for p in ps if p.grad is not None] == before
    ps[0].grad = torch.randn_like(ps[0])       # a new gradient: refilled, old one let go
    _host.grads_into(ps, held)
    assert held[0] is ps[0].grad


def test_grads_into_refuses_lists_of_different_lengths(ext):
    with pytest.raises(ValueError, match="length"):
        ext.grads_into([torch.zeros(1)], [None, None])


@pytest.mark.parametrize("path", ["ext", "python"])
def test_first_unlike_is_the_triton_layout_rule(path, request):
    request.getfixturevalue("ext" if path == "ext" else "python_only")
    like = [torch.empty(4, 6), torch.empty(2, 3, 5, 5).to(memory_format=torch.channels_last),
            torch.empty(7), torch.empty(0, 3)]
    good = [torch.empty(4, 6), torch.empty_like(like[1]), torch.empty(7), torch.empty(0, 3)]
    assert _host.first_unlike(good, like) == -1
    assert _host.first_unlike([None, good[1], None, None], like) == -1, "None is skipped"
    assert _host.first_unlike([torch.empty(24)] + good[1:], like) == -1, "a flat view"
    cases = {
        0: torch.empty(6, 4).t(),                 # dense, but not the parameter's order
        1: torch.empty(2, 3, 5, 5),               # contiguous beside a channels_last one
        2: torch.empty(14)[::2],                  # not dense
    }
    for i, t in cases.items():
        bad = list(good)
        bad[i] = t
        assert _host.first_unlike(bad, like) == i, f"entry {i} should be refused"
    transposed = [torch.empty(6, 4).t()]
    assert _host.first_unlike([torch.empty(6, 4).t()], transposed) == -1, \
        "a transpose beside a transpose of the same layout"
    if path == "ext":
        with pytest.raises(IndexError):
            _host._ext().first_unlike(good, like[:2])


@pytest.mark.parametrize("path", ["ext", "python"])
def test_grads_are_the_parameters_gradient_objects(path, request):
    request.getfixturevalue("ext" if path == "ext" else "python_only")
    ps = _params()
    got = _host.grads(ps)
    assert len(got) == len(ps)
    for i, (p, g) in enumerate(zip(ps, got)):
        assert g is p.grad, f"entry {i}: not p.grad"


def test_grads_take_and_give_back_one_reference_each(ext):
    ps = _params()
    before = [sys.getrefcount(p.grad) for p in ps if p.grad is not None]
    for _ in range(50):
        got = _host.grads(ps)
        del got
    after = [sys.getrefcount(p.grad) for p in ps if p.grad is not None]
    assert after == before


def test_grads_refuse_a_non_tensor(ext):
    with pytest.raises(TypeError, match="non-tensor"):
        ext.grads([torch.zeros(1), "w"])


@pytest.mark.parametrize("path", ["ext", "python"])
def test_addresses_and_counts(path, request):
    request.getfixturevalue("ext" if path == "ext" else "python_only")
    ts = [torch.zeros(5), None, torch.zeros(3, 4)]
    again = [ts[0], None, ts[2]]
    assert _host.data_ptrs(ts) == _host.data_ptrs(again)
    moved = [ts[0], None, torch.zeros(3, 4)]
    assert _host.data_ptrs(moved) != _host.data_ptrs(ts)
    assert _host.data_ptrs(None) is None
    dense = [t for t in ts if t is not None]
    assert _host.numels(dense) == _host.numels([torch.empty(5), torch.empty(12)])
    assert _host.numels(dense) != _host.numels([torch.empty(5), torch.empty(13)])
    if path == "ext":
        raw = _host.data_ptrs(ts)
        values = [int.from_bytes(raw[i:i + 8], sys.byteorder) for i in range(0, len(raw), 8)]
        assert values == [ts[0].data_ptr(), 0, ts[2].data_ptr()]


def test_list_arguments_leave_every_reference_count_as_it_was(ext):
    ops = require_backend("cpu")
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((1,), (17,), (30, 10))]
    saved = [torch.randn_like(p) for p in params]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    means = [None, None, torch.empty(30)]      # a list whose entries may be None
    everything = params + saved + grads + bufs + means[2:]
    before = [sys.getrefcount(t) for t in everything]
    for _ in range(20):
        ops.restore_sgd(params, saved, grads, bufs, lr=0.1, weight_decay=0.0, momentum=0.9,
                        dampening=0.0, nesterov=False, maximize=False, init_buffers=False)
        ops.lincomb(saved, [saved, grads], [1.0, 0.0])
        ops.sumsq(grads, params, adaptive=True, eta=0.01, centralize=False)
        ops.sumsq(grads, params, adaptive=False, eta=0.0, centralize=True, row_means=means)
        ops.perturb(params, grads, saved, 0.0, adaptive=False, eta=0.0, row_means=means)
    after = [sys.getrefcount(t) for t in everything]
    assert after == before
    torch.testing.assert_close(means[2], grads[2].mean(dim=1), msg="row means of grads[2]")


def test_a_tuple_is_a_list_and_a_non_tensor_entry_is_refused(ext):
    ops = require_backend("cpu")
    w = [torch.zeros(5), torch.zeros(2)]
    saved = (torch.arange(5.0), torch.ones(2))
    ops.restore(tuple(w), saved)
    assert torch.equal(w[0], saved[0]) and torch.equal(w[1], saved[1])
    with pytest.raises(TypeError):
        ops._ext.restore([torch.zeros(5), 3.0], [torch.zeros(5), torch.zeros(1)])


def test_tensors_held_only_by_the_argument_list(ext):
    ops = require_backend("cpu")
    # The lists are the only owners while the call runs; the result must be right and
    # nothing may be freed early or twice (the interpreter would crash or the sum differ).
    for _ in range(20):
        total = ops.sumsq([torch.full((n,), 2.0) for n in (3, 1000, 7)], [], adaptive=False,
                          eta=0.0, centralize=False)
        assert float(total) == 4.0 * 1010


@pytest.mark.parametrize("algo", ["SAM", "ASAM", "GCSAM"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_scalars_on_the_host_give_the_tensor_path_bit_for_bit(algo, backend, monkeypatch):
    """On the CPU the ascent's norm and scale are Python floats (``_host_scalars``); each
    operation is rounded as torch rounds it, so the perturbed weights are those of the 0-dim
    tensor path to the last bit: fp32, bf16 and fp64 groups, two rhos, several steps."""
    require_backend(backend)
    from sharpopt import _finite

    calls = []

    def run(host: bool):
        if not host:
            monkeypatch.setattr(_finite._FiniteChecks, "_host_scalars", lambda self, b: False)
        on_host = sharpopt.SAM._host_scales

        def spy(self, *args):
            calls.append(host)
            return on_host(self, *args)
        monkeypatch.setattr(sharpopt.SAM, "_host_scales", spy)
        gen = torch.Generator().manual_seed(11)
        groups = [
            {"params": [torch.nn.Parameter(torch.randn(5, 7, generator=gen)),
                        torch.nn.Parameter(torch.randn(3, generator=gen))], "rho": 0.05},
            {"params": [torch.nn.Parameter(torch.randn(4, 6, generator=gen).bfloat16())],
             "rho": 0.3},
            {"params": [torch.nn.Parameter(torch.randn(9, generator=gen).double())],
             "rho": 0.7},
        ]
        opt = getattr(sharpopt, algo)(groups, torch.optim.SGD, lr=0.1, momentum=0.9,
                                      backend=backend)
        seen = []
        for step in range(3):
            for g in groups:
                for p in g["params"]:
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) * 10.0 ** -step
            opt.first_step()
            seen.append([p.detach().clone() for g in groups for p in g["params"]])
            opt.second_step()
        monkeypatch.undo()
        return seen

    host, tensors = run(True), run(False)
    assert calls == [True] * 3, f"the host path ran {calls} (True: host run, False: tensor run)"
    for step, (a, b) in enumerate(zip(host, tensors)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"step {step}, parameter {i}: perturbed weights differ"


def test_a_nonfinite_norm_on_the_host_raises_before_anything_moves():
    require_backend("cpu")
    p = torch.nn.Parameter(torch.ones(4))
    opt = sharpopt.SAM([p], torch.optim.SGD, lr=0.1, backend="cpu")
    p.grad = torch.tensor([1.0, float("inf"), 0.0, 2.0])
    with pytest.raises(FloatingPointError, match="first pass"):
        opt.first_step()
    assert torch.equal(p, torch.ones(4)) and not opt.perturbed
