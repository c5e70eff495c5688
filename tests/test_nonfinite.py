"""The non-finite guard: inf/NaN found inside the fused passes, with no pass of its own.

Rules checked (``Ops.restore_sgd`` / ``Ops.perturb`` and ``SharpnessAware``'s guard):

* an update pass given ``found_inf`` keeps every element whose gradient is inf or NaN
  (weight restored, state untouched, a new momentum buffer 0 there), steps every other
  element exactly as without the guard, and sets ``found_inf[1]``;
* ``found_inf[0] != 0`` skips the step: the update only restores ``w``, the perturbation
  is ``e = 0``;
* through the optimizer (defaults, no scaler): an inf/NaN never reaches the weights or
  the state, and ``FloatingPointError`` says so -- at once where the flags live on the CPU,
  at the next ``first_step`` where they live on a GPU (simulated here by reading them
  late on the CPU);
* the default step runs no separate inf/NaN pass on the guarding backends.
"""
from __future__ import annotations

import pytest
import torch

import sharpopt
from sharpopt import _core, _finite
from sharpopt.backends import reference
from conftest import (FAST_BACKENDS, assert_close, fixed_gradient_step, replay_beside_eager,
                      require_backend)

REF = reference.load()
#: The backends whose passes take ``found_inf``; every other one must say it does not.
GUARDING = [n for n in ("cpu", "triton", "cuda") if n in FAST_BACKENDS]
# The last shape spans several CPU work units (2**16) and CUDA chunks. Triton under its
# interpreter (which runs the kernels in chunks of 128 elements, in Python) gets one that
# spans several of those chunks and ends in a partial one, at a fraction of the time.
SHAPES = [(1,), (37,), (5, 13), (0,), (3, 1, 7), (2 ** 16 + 9,)]
INTERPRETED_SHAPES = SHAPES[:-1] + [(6 * 128 + 9,)]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered")
BAD = (float("inf"), float("-inf"), float("nan"))


@pytest.fixture(params=GUARDING)
def guarded(request):
    return require_backend(request.param)


def test_guarding_backends_say_so():
    for name in FAST_BACKENDS + ["reference"]:
        try:
            ops = sharpopt.backends._load(name)
        except sharpopt.backends.BackendUnavailable:
            continue
        assert ops.guards_nonfinite == (name in GUARDING), name


def _inputs(dtype, seed, poison=True, ops=None):
    """Fresh tensors per shape and, with ``poison``, a few inf/NaN gradient elements in
    every other non-empty tensor (the mask of them is returned)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda s: torch.randn(s, generator=g).to(dtype)  # noqa: E731
    w, saved, grads, bad = [], [], [], []
    shapes = INTERPRETED_SHAPES if ops is not None and ops.name == "triton" else SHAPES
    for i, shape in enumerate(shapes):
        w.append(rnd(shape))
        saved.append(rnd(shape))
        gr = rnd(shape)
        mask = torch.zeros(shape, dtype=torch.bool)
        if poison and gr.numel() and i % 2 == 0:
            idx = torch.randperm(gr.numel(), generator=g)[: max(1, gr.numel() // 97)]
            mask.view(-1)[idx] = True
            vals = torch.tensor(BAD, dtype=dtype)[torch.arange(len(idx)) % 3]
            gr.view(-1)[idx] = vals
        grads.append(gr)
        bad.append(mask)
    return w, saved, grads, bad


def _clone(ts):
    return [t.clone() for t in ts]


UPDATES = {
    "sgd": ("sgd", dict(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.1,
                        nesterov=False, maximize=False, init_buffers=False)),
    "sgd-first-step": ("sgd", dict(lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0,
                                   nesterov=True, maximize=False, init_buffers=True)),
    "sgd-no-momentum": ("sgd", dict(lr=0.1, weight_decay=1e-2, momentum=0.0, dampening=0.0,
                                    nesterov=False, maximize=True, init_buffers=False)),
    "adam": ("adam", dict(step=3, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=1e-2,
                          decoupled=False, amsgrad=False, maximize=False)),
    "adamw-amsgrad": ("adam", dict(step=5, lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6,
                                   weight_decay=1e-1, decoupled=True, amsgrad=True,
                                   maximize=True)),
}


def _state(kind, kw, w, seed):
    g = torch.Generator().manual_seed(seed + 7)
    like = lambda: [torch.randn(t.shape, generator=g).to(t.dtype) for t in w]  # noqa: E731
    if kind == "sgd":
        return [like()] if kw["momentum"] else [[]]
    pos = lambda: [torch.rand(t.shape, generator=g).to(t.dtype) for t in w]  # noqa: E731
    return [like(), pos(), pos() if kw["amsgrad"] else []]


def _run(ops, kind, kw, w, saved, grads, state, found=None):
    extra = {} if found is None else {"found_inf": found}
    if kind == "sgd":
        ops.restore_sgd(w, saved, grads, state[0], **kw, **extra)
    else:
        ops.restore_adam(w, saved, grads, *state, **kw, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("has_saved", [True, False], ids=["restore", "no-saved"])
@pytest.mark.parametrize("case", list(UPDATES))
def test_update_keeps_the_elements_whose_gradient_is_not_finite(guarded, case, has_saved,
                                                                dtype):
    kind, kw = UPDATES[case]
    seed = sum(map(ord, case)) + 2 * has_saved + 3 * dtype.itemsize
    w, saved, grads, bad = _inputs(dtype, seed=seed, ops=guarded)
    state = _state(kind, kw, w, 3)
    before_w = _clone(saved if has_saved else w)
    before_state = [_clone(s) for s in state]
    # Expected: the reference update on the same inputs with the bad gradients replaced by
    # 0 (any finite value), then the kept elements put back.
    ref_w, ref_state = _clone(w), [_clone(s) for s in state]
    clean = [torch.where(m, torch.zeros_like(x), x) for x, m in zip(grads, bad)]
    _run(REF, kind, kw, ref_w, _clone(saved) if has_saved else None, clean, ref_state)
    found = torch.zeros(2, dtype=torch.float32)
    _run(guarded, kind, kw, w, saved if has_saved else None, grads, state, found)
    assert found.tolist() == [0.0, 1.0], f"found_inf after a poisoned update: {found.tolist()}"
    for i, m in enumerate(bad):
        where = f"{case}, tensor {i} {tuple(m.shape)}"
        assert torch.equal(w[i][m], before_w[i][m]), f"{where}: a kept weight changed"
        assert_close(w[i][~m], ref_w[i][~m], where + ", weights", dtype)
        for k, (s, r, s0) in enumerate(zip(state, ref_state, before_state)):
            if not len(s):
                continue
            kept = torch.zeros_like(s0[i][m]) if kw.get("init_buffers") else s0[i][m]
            assert torch.equal(s[i][m], kept), f"{where}: state {k} changed where kept"
            assert_close(s[i][~m], r[i][~m], f"{where}, state {k}", dtype)
            assert torch.isfinite(s[i]).all(), f"{where}: state {k} not finite"
        assert torch.isfinite(w[i]).all(), f"{where}: weights not finite"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["sgd", "adamw-amsgrad"])
def test_update_reports_one_bad_element_wherever_it_lies(guarded, case, dtype):
    """found_inf[1] is set by a single inf/NaN at any position of a tensor: the CPU pass
    records it in vector lanes and in the scalar tail apart, each of which must report."""
    kind, kw = UPDATES[case]
    n = 64 + 5    # whole vectors of every width, then a tail
    for pos in (0, 9, 31, 63, 64, n - 1):
        w = [torch.linspace(-1, 1, n).to(dtype)]
        grads = [torch.full((n,), 0.5).to(dtype)]
        grads[0][pos] = float("nan") if pos % 2 else float("inf")
        state = _state(kind, kw, w, pos)
        found = torch.zeros(2, dtype=torch.float32)
        _run(guarded, kind, kw, w, None, grads, state, found)
        assert found.tolist() == [0.0, 1.0], \
            f"{case}, {dtype}: a bad gradient at element {pos} of {n} gave {found.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", list(UPDATES))
def test_guard_changes_no_number_of_a_clean_update(guarded, case, dtype):
    kind, kw = UPDATES[case]
    w, saved, grads, _ = _inputs(dtype, seed=5, poison=False, ops=guarded)
    state = _state(kind, kw, w, 5)
    w2, state2 = _clone(w), [_clone(s) for s in state]
    found = torch.zeros(2, dtype=torch.float32)
    _run(guarded, kind, kw, w, saved, grads, state, found)
    _run(guarded, kind, kw, w2, saved, grads, state2)
    assert found.tolist() == [0.0, 0.0], f"{case}, {dtype}: a clean update set {found.tolist()}"
    for i in range(len(w)):
        assert torch.equal(w[i], w2[i]), f"{case}: tensor {i} differs with the guard"
        for k in range(len(state)):
            if len(state[k]):
                assert torch.equal(state[k][i], state2[k][i]), f"{case}: state {k}[{i}]"


@pytest.mark.parametrize("has_saved", [True, False], ids=["restore", "no-saved"])
@pytest.mark.parametrize("case", list(UPDATES))
def test_a_skipped_step_only_restores(guarded, case, has_saved):
    kind, kw = UPDATES[case]
    w, saved, grads, _ = _inputs(torch.float32, seed=9, ops=guarded)
    state = _state(kind, kw, w, 9)
    before_w = _clone(saved if has_saved else w)
    before_state = [_clone(s) for s in state]
    found = torch.tensor([1.0, 0.0])
    _run(guarded, kind, kw, w, saved if has_saved else None, grads, state, found)
    assert found.tolist() == [1.0, 0.0], "a skipped step reports nothing more"
    for i in range(len(w)):
        assert torch.equal(w[i], before_w[i]), f"{case}: weights {i} not restored"
        for k, (s, s0) in enumerate(zip(state, before_state)):
            if len(s):
                kept = torch.zeros_like(s0[i]) if kw.get("init_buffers") else s0[i]
                assert torch.equal(s[i], kept), f"{case}: state {k}[{i}] changed"


@pytest.mark.parametrize("save", [True, False])
def test_a_skipped_step_perturbs_by_zero(guarded, save):
    w, saved, grads, _ = _inputs(torch.float32, seed=11, ops=guarded)
    w0, s0 = _clone(w), _clone(saved)
    means = [torch.empty(g.shape[0]) if g.dim() > 1 else None for g in grads]
    guarded.sumsq(grads, w, adaptive=True, eta=0.01, centralize=True, row_means=means)
    guarded.perturb(w, grads, saved, 0.5, adaptive=True, eta=0.01, row_means=means,
                    save=save, found_inf=torch.tensor([1.0, 0.0]))
    for i in range(len(w)):
        expect = w0[i] if save else s0[i]
        assert torch.equal(w[i], expect), f"tensor {i}: w moved on a skipped step"
        assert torch.equal(saved[i], w0[i] if save else s0[i]), f"tensor {i}: saved"


# -- through the optimizer -------------------------------------------------------------
BASES = {"SGD": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
         "AdamW": (torch.optim.AdamW, dict(lr=1e-2))}
ALGOS = {"SAM": sharpopt.SAM, "ASAM": sharpopt.ASAM, "GCSAM": sharpopt.GCSAM}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(17, 13, generator=g)
    return model(x).square().mean()


def _snapshot(model, opt):
    ws = [p.detach().clone() for p in model.parameters()]
    st = {id(p): {k: v.clone() for k, v in opt.base_optimizer.state[p].items()}
          for p in model.parameters() if p in opt.base_optimizer.state}
    return ws, st


def _assert_state_equal(model, opt, st, what):
    for i, p in enumerate(model.parameters()):
        for k, v in opt.base_optimizer.state[p].items():
            assert torch.equal(v, st[id(p)][k]), f"{what}: param {i} state {k!r} changed"


def _steps(model, opt, n, seed=0):
    for s in range(n):
        _loss(model, seed + s).backward()
        opt.first_step(zero_grad=True)
        _loss(model, seed + s).backward()
        opt.second_step(zero_grad=True)


def _count_separate_checks(monkeypatch):
    calls = []
    real = _core.SharpnessAware._nonfinite

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(_core.SharpnessAware, "_nonfinite", spy)
    return calls


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("algo", list(ALGOS))
def test_inf_in_the_second_pass_keeps_those_elements_and_raises(guarded, algo, base,
                                                                monkeypatch):
    cls, (base_cls, kw) = ALGOS[algo], BASES[base]
    model, twin = _model(), _model()
    opt = cls(model.parameters(), base_cls, backend=guarded.name, **kw)
    ref = cls(twin.parameters(), base_cls, backend="reference", check_finite=False, **kw)
    _steps(model, opt, 2)
    _steps(twin, ref, 2)
    checks = _count_separate_checks(monkeypatch)
    before, st = _snapshot(model, opt)
    for m, o in ((model, opt), (twin, ref)):
        _loss(m, 7).backward()
        o.first_step(zero_grad=True)
        _loss(m, 7).backward()
    w = list(model.parameters())[0]
    w.grad[1, 2], w.grad[4, 0] = float("inf"), float("nan")
    list(twin.parameters())[0].grad[1, 2] = 0.0     # the twin steps them on 0: ignored below
    list(twin.parameters())[0].grad[4, 0] = 0.0
    with pytest.raises(FloatingPointError, match="second pass of this step"):
        opt.second_step(zero_grad=True)
    ref.second_step(zero_grad=True)
    assert not checks, "the default step ran a separate inf/NaN pass"
    kept = torch.zeros_like(w, dtype=torch.bool)
    kept[1, 2] = kept[4, 0] = True
    assert torch.equal(w[kept], before[0][kept]), "a kept weight moved"
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        m = kept if i == 0 else torch.zeros_like(p, dtype=torch.bool)
        assert_close(p[~m], q[~m], f"{algo}+{base}: param {i} (finite elements)")
        for k, v in opt.base_optimizer.state[p].items():
            assert torch.isfinite(v).all(), f"param {i} state {k} not finite"
            if k == "step":
                assert torch.equal(v, st[id(p)][k]), "Adam's step count advanced"
            elif i == 0:
                assert torch.equal(v[kept], st[id(p)][k][kept]), f"state {k} moved where kept"
    _steps(model, opt, 1, seed=20)                  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("base", list(BASES))
def test_inf_in_the_first_pass_raises_before_anything_moves(guarded, base, monkeypatch):
    base_cls, kw = BASES[base]
    model = _model()
    opt = sharpopt.SAM(model.parameters(), base_cls, backend=guarded.name, **kw)
    _steps(model, opt, 2)
    checks = _count_separate_checks(monkeypatch)
    before, st = _snapshot(model, opt)
    _loss(model, 3).backward()
    list(model.parameters())[2].grad[0, 5] = float("-inf")
    with pytest.raises(FloatingPointError, match="first pass"):
        opt.first_step(zero_grad=True)
    assert not checks, "the default step ran a separate inf/NaN pass"
    assert not opt.perturbed
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    _assert_state_equal(model, opt, st, "after the refused first pass")
    opt.zero_grad()
    _steps(model, opt, 1, seed=30)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("poison", [1, 2], ids=["first-pass", "second-pass"])
def test_flags_read_late_raise_at_the_next_first_step(guarded, base, poison, monkeypatch):
    """A GPU's flags stay on the device: the step goes on without a host read (e = 0 and no
    update after an inf in the first pass) and the next first_step raises."""
    monkeypatch.setattr(_finite, "_reads_now", lambda devices: False)
    base_cls, kw = BASES[base]
    model = _model()
    opt = sharpopt.SAM(model.parameters(), base_cls, backend=guarded.name, **kw)
    _steps(model, opt, 2)
    before, st = _snapshot(model, opt)
    _loss(model, 3).backward()
    if poison == 1:
        list(model.parameters())[0].grad.fill_(float("nan"))
    assert opt.first_step(zero_grad=True) is True       # no host read: the step goes on
    if poison == 1:
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), \
            "the weights were perturbed after an inf in the first pass"
    _loss(model, 3).backward()
    if poison == 2:
        for p in model.parameters():
            p.grad.fill_(float("inf"))
    opt.second_step(zero_grad=True)                      # nothing raised yet
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), \
        "the weights moved in a step the guard kept whole"
    _loss(model, 4).backward()
    with pytest.raises(FloatingPointError, match="previous step"):
        opt.first_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    _assert_state_equal(model, opt, st, "after the late report")
    opt.zero_grad()
    _steps(model, opt, 2, seed=40)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _NotYet:
    """An event whose copy has not arrived until ``arrived`` is set."""

    arrived = False

    def query(self):
        return type(self).arrived


def test_a_report_the_host_has_not_received_yet_is_kept(guarded, monkeypatch):
    """The host may run several steps ahead of a GPU: a step's flags that have not arrived
    by the next first_step stay queued behind the later steps' and are still read, oldest
    first, naming the step that found the inf/NaN (none is overwritten)."""
    monkeypatch.setattr(_finite, "_reads_now", lambda devices: False)
    real = _finite._copy_to_host
    monkeypatch.setattr(_finite, "_copy_to_host",
                        lambda flags: (real(flags)[0], _NotYet()))
    model = _model()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, backend=guarded.name, lr=0.1,
                       momentum=0.9)
    _steps(model, opt, 1)                               # step 1: clean
    _loss(model, 3).backward()
    opt.first_step(zero_grad=True)                      # step 2: poisoned second pass
    _loss(model, 3).backward()
    list(model.parameters())[0].grad[0, 0] = float("nan")
    opt.second_step(zero_grad=True)
    _steps(model, opt, 2, seed=10)                      # steps 3 and 4: nothing arrived
    assert len(opt._run.pending) == 4, "a report was lost before it was read"
    _NotYet.arrived = True
    try:
        _loss(model, 5).backward()
        with pytest.raises(FloatingPointError, match=r"step 2 \(a previous step\)"):
            opt.first_step(zero_grad=True)
        assert len(opt._run.pending) == 2, "the reports after the failing one were dropped"
        opt.zero_grad()
        _steps(model, opt, 1, seed=20)                  # reads steps 3 and 4: clean
        assert len(opt._run.pending) == 1
    finally:
        _NotYet.arrived = False


def test_other_algorithms_keep_the_separate_check(guarded, monkeypatch):
    """LookSAM's descent writes its own state from the second pass's gradients, which the
    update's guard would not cover: it keeps the separate check, and an inf still leaves
    everything as it was."""
    model = _model()
    opt = sharpopt.LookSAM(model.parameters(), torch.optim.SGD, backend=guarded.name, k=2,
                           lr=0.1, momentum=0.9)
    assert not opt._guarded_descent
    for s in range(2):
        opt.step(lambda: _loss(model, s).backward())
    while True:                          # up to a step that perturbs (every k-th)
        before, st = _snapshot(model, opt)
        _loss(model, 5).backward()
        if opt.first_step(zero_grad=True):
            break
    _loss(model, 5).backward()
    list(model.parameters())[1].grad[0] = float("nan")
    checks = _count_separate_checks(monkeypatch)
    with pytest.raises(FloatingPointError, match="second pass"):
        opt.second_step(zero_grad=True)
    assert checks, "LookSAM's second pass was not checked"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    _assert_state_equal(model, opt, st, "LookSAM after a refused second pass")


def test_a_captured_default_step_counts_instead_of_raising(guarded, monkeypatch):
    """Inside a CUDA-graph capture nothing can raise or read the host: the guard still
    keeps the weights and counts the step in ``nonfinite_steps`` (device ops only). The
    GPU and the capture are simulated (flags read late, capture flag faked)."""
    monkeypatch.setattr(_finite, "_reads_now", lambda devices: False)
    model = _model()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, backend=guarded.name, lr=0.1,
                       momentum=0.9)
    _steps(model, opt, 2)
    assert opt.nonfinite_steps == 0
    before, st = _snapshot(model, opt)
    prior = [id(entry) for entry in opt._run.pending]   # eager copies not read yet
    monkeypatch.setattr(sharpopt._plan, "_capturing", lambda: True)
    _loss(model, 3).backward()
    assert opt.first_step(zero_grad=True)
    _loss(model, 3).backward()
    for p in model.parameters():
        p.grad.fill_(float("nan"))
    opt.second_step(zero_grad=True)
    assert [id(entry) for entry in opt._run.pending] == prior, \
        "a captured step made a host copy"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    _assert_state_equal(model, opt, st, "captured poisoned step")
    assert opt.nonfinite_steps == 1


def test_paths_that_read_the_host_still_refuse_capture(monkeypatch):
    """Where the check needs a host read (flags on the CPU, or a backend without the
    guard) a capture is refused before anything moves, naming check_finite=False."""
    model = _model()
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, backend="foreach", lr=0.1)
    monkeypatch.setattr(_finite, "_reads_now", lambda devices: False)
    _steps(model, opt, 1)
    before, _ = _snapshot(model, opt)
    monkeypatch.setattr(sharpopt._plan, "_capturing", lambda: True)
    _loss(model, 3).backward()
    with pytest.raises(RuntimeError, match="check_finite=False"):
        opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# -- a capturable=True Adam/AdamW base ----------------------------------------------------
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
def test_a_capturable_adam_base_takes_the_device_check_through_the_fused_kernel(
        backend, cls, monkeypatch):
    """With ``capturable=True`` (what torch needs to capture its Adam), the default check
    runs on the device and the base step runs as torch's fused kernel, which takes the
    flag: each step equals that of a ``fused=True`` base bit for bit, a NaN skips the
    whole step (weights, moments and step count as they were) and raises, nothing is read
    on the host for the check, the group's ``fused`` option is left as the user set it,
    and a (simulated) capture is not refused."""
    kw = dict(lr=1e-2, weight_decay=1e-2)
    model, twin = _model(), _model()
    opt = sharpopt.SAM(model.parameters(), cls, backend=backend, capturable=True, **kw)
    ref = sharpopt.SAM(twin.parameters(), cls, backend=backend, fused=True, **kw)
    checks = _count_separate_checks(monkeypatch)
    _steps(model, opt, 2)
    _steps(twin, ref, 2)
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        assert torch.equal(p, q), f"param {i} differs from the fused=True base's step"
    assert all(g["fused"] is None and g["capturable"] for g in opt.param_groups)
    before, st = _snapshot(model, opt)
    _loss(model, 3).backward()
    assert opt.first_step(zero_grad=True)
    _loss(model, 3).backward()
    list(model.parameters())[2].grad[1, 4] = float("nan")
    with pytest.raises(FloatingPointError, match="this step.*skipped"):
        opt.second_step(zero_grad=True)
    assert not checks, "the second pass was checked with a host read"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), \
        "the weights moved in a skipped step"
    _assert_state_equal(model, opt, st, "skipped step")
    if all(ops.guards_nonfinite for ops in opt._ops.values()):   # first pass: no host read
        monkeypatch.setattr(_finite, "_reads_now", lambda devices: False)
        monkeypatch.setattr(sharpopt._plan, "_capturing", lambda: True)
    _steps(model, opt, 1, seed=50)         # not refused: no step of it reads the host
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- on a GPU ----------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


#: The default step's GPU paths: the guard inside sharpopt's fused SGD update, and
#: torch's fused AdamW kernel (capturable by design) skipping on the device check's flag,
#: asked for with fused=True or, as torch's capture needs, capturable=True.
GPU_BASES = {"SGD": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
             "AdamW-fused": (torch.optim.AdamW, dict(lr=1e-2, fused=True)),
             "AdamW-capturable": (torch.optim.AdamW, dict(lr=1e-2, capturable=True))}


def _gpu_setup(backend, base="SGD", seed=0):
    shapes = [(33, 7), (33,), (5, 3, 3, 3), (1,), (70001,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i + seed))
                             .cuda()) for i, s in enumerate(shapes)]
    for p in ps:
        p.grad = torch.zeros_like(p)
    cls, kw = GPU_BASES[base]
    return ps, sharpopt.SAM(ps, cls, rho=0.1, backend=backend, **kw)


@needs_gpu
@pytest.mark.parametrize("base", list(GPU_BASES))
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_default_gpu_step_never_synchronises(gpu_backend, base):
    """Zero host synchronisations in a default step (check_finite=True) after warm-up."""
    require_backend(gpu_backend, torch.device("cuda"))
    ps, opt = _gpu_setup(gpu_backend, base)
    g = [torch.randn_like(p) for p in ps]
    step = fixed_gradient_step(ps, opt, g, g)
    step()
    _assert_steps_never_synchronise(opt, step)


def _assert_steps_never_synchronise(opt, step):
    """After one more warm-up ``step()``: three steps under
    ``torch.cuda.set_sync_debug_mode("error")`` (a synchronisation raises), none of which
    may find inf/NaN."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert opt.nonfinite_steps == 0


@needs_gpu
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_new_gradient_tensors_every_pass_never_synchronise(gpu_backend):
    """``zero_grad(set_to_none=True)`` gives every backward new gradient tensors, at new
    addresses once the old ones are still held: the triton backend then builds new launch
    tables, whose upload must not synchronise either (nor may the cuda backend's)."""
    require_backend(gpu_backend, torch.device("cuda"))
    ps, opt = _gpu_setup(gpu_backend)
    keep = []                    # hold the old gradients: the new ones get new addresses

    def step():
        for p in ps:
            keep.append(p.grad)
            p.grad = torch.randn_like(p)
        opt.first_step()
        for p in ps:
            keep.append(p.grad)
            p.grad = torch.randn_like(p)
        opt.second_step()

    _assert_steps_never_synchronise(opt, step)


@needs_gpu
@pytest.mark.parametrize("base", list(GPU_BASES))
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_default_step_replays_from_a_cuda_graph_and_counts_infs(gpu_backend, base):
    """A whole default SAM step captured after one warm-up step: replays match eager
    steps, and a replay on poisoned gradients keeps the weights where the guard says
    (that element with SGD, all of them with the fused AdamW kernel's skip) and is
    counted."""
    require_backend(gpu_backend, torch.device("cuda"))
    torch.manual_seed(0)
    (ps, opt), (qs, ref) = _gpu_setup(gpu_backend, base), _gpu_setup(gpu_backend, base)
    g1 = [torch.randn_like(p) for p in ps]
    g2 = [torch.randn_like(p) for p in ps]
    graph = replay_beside_eager(fixed_gradient_step(ps, opt, g1, g2),
                                fixed_gradient_step(qs, ref, g1, g2))
    for i, (p, q) in enumerate(zip(ps, qs)):
        torch.testing.assert_close(p, q, msg=lambda m: f"param {i}: {m}")
    before = [p.detach().clone() for p in ps]
    g2[0][3, 4] = float("inf")
    graph.replay()
    torch.cuda.synchronize()
    assert ps[0][3, 4] == before[0][3, 4], "a kept weight moved in a replay"
    if base.startswith("AdamW"):
        assert all(torch.equal(p, q) for p, q in zip(ps, before)), "the skipped step moved"
    assert all(torch.isfinite(p).all() for p in ps)
    assert opt.nonfinite_steps == 1


# -- a torch fused=True base optimizer ----------------------------------------------------
@pytest.mark.parametrize("late", [False, True], ids=["read-now", "read-late"])
@pytest.mark.parametrize("base", list(BASES))
def test_a_torch_fused_base_skips_the_step_on_the_device(backend, base, late, monkeypatch):
    """With torch's ``fused=True`` SGD/AdamW as the base (not merged by sharpopt), the
    second pass is checked on the device and the flag handed to the base's own step as
    ``found_inf``, which skips the whole step (Adam's count included): no host read, so
    such a step can be captured. Clean steps are those of ``check_finite=False``."""
    if late:
        monkeypatch.setattr(_finite, "_reads_now", lambda devices: False)
    base_cls, kw = BASES[base]
    model, twin = _model(), _model()
    opt = sharpopt.SAM(model.parameters(), base_cls, backend=backend, fused=True, **kw)
    ref = sharpopt.SAM(twin.parameters(), base_cls, backend=backend, fused=True,
                       check_finite=False, **kw)
    _steps(model, opt, 2)
    _steps(twin, ref, 2)
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        assert torch.equal(p, q), f"{base}: param {i} differs from check_finite=False"
    checks = _count_separate_checks(monkeypatch)
    before, st = _snapshot(model, opt)
    _loss(model, 3).backward()
    assert opt.first_step(zero_grad=True)
    _loss(model, 3).backward()
    list(model.parameters())[2].grad[1, 4] = float("nan")
    if late:
        opt.second_step(zero_grad=True)
        _loss(model, 4).backward()
        with pytest.raises(FloatingPointError, match="previous step.*skipped"):
            opt.first_step(zero_grad=True)
        opt.zero_grad()
    else:
        with pytest.raises(FloatingPointError, match="this step.*skipped"):
            opt.second_step(zero_grad=True)
    assert not checks, "the second pass was checked with a host read"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), \
        "the weights moved in a skipped step"
    _assert_state_equal(model, opt, st, f"{base}: skipped step")
    assert opt.nonfinite_steps == 1
    _steps(model, opt, 1, seed=50)
    assert all(torch.isfinite(p).all() for p in model.parameters())
