"""The compiled backends' passes, one by one, against ``reference`` on the same inputs.

Every test builds fresh random inputs, runs the pass through the compiled backend
(``cpu`` on CPU tensors, ``cuda`` on GPU tensors; the latter skips without a GPU) and
through ``sharpopt.backends.reference``, and compares every output and state tensor.
Shapes are odd on purpose: single elements, sizes that are no multiple of a vector, empty
tensors, a tensor spread over several work units, matrices with long and with tiny rows,
and a list with more tensors than one CUDA launch table holds.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from sharpopt.backends import BackendUnavailable, reference

REF = reference.load()

# (rtol, atol) against reference, per dtype. fp32/fp64: operation order and FMA contraction
# differ, so a few ulps; bf16/fp16: both round once from fp32, and an fp32 difference of one
# ulp can flip the final rounding, so one ulp of the storage type.
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-13),
    torch.bfloat16: (2.0 ** -7, 1e-6),
    torch.float16: (2.0 ** -10, 1e-6),
}
# Reductions accumulate in fp32 (fp64 for fp64) in both implementations, in different orders.
RED_TOL = {
    torch.float32: 1e-5,
    torch.float64: 1e-12,
    torch.bfloat16: 1e-5,
    torch.float16: 1e-5,
}
DTYPES = list(TOL)

# 3 * 2**16 + 7 elements spans several work units of the CPU (2**16) and CUDA chunks.
MIXED_SHAPES = [
    (1,), (3,), (123,), (2048 + 16,), (0,), (7, 5), (64, 3, 3, 3), (3, 0), (1, 1),
    (3 * 2 ** 16 + 7,), (2, 70001), (5000, 9), (33, 17, 2), (4, 1),
]


def _many_shapes():
    g = torch.Generator().manual_seed(1234)
    shapes = []
    for i in range(120):
        n = int(torch.randint(1, 300, (1,), generator=g))
        shapes.append((n,) if i % 3 else (max(1, n // 7), 7))
    return shapes


SHAPE_SETS = {"mixed": MIXED_SHAPES, "many": _many_shapes()}


@pytest.fixture(params=["cpu", "cuda"])
def backend(request):
    name = request.param
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("the cuda backend needs a GPU")
    ops = importlib.import_module(f"sharpopt.backends.{name}").load()
    return ops, torch.device("cuda" if name == "cuda" else "cpu")


@pytest.fixture(params=list(SHAPE_SETS))
def shapes(request):
    return SHAPE_SETS[request.param]


def _storage(shape, dtype, device, offset):
    """An uninitialised contiguous tensor whose data starts ``offset`` elements into its
    storage, so that its pointer is not 16-byte aligned when ``offset`` is odd."""
    n = torch.Size(shape).numel()
    return torch.empty(n + offset, dtype=dtype, device=device)[offset:].view(shape)


def rand(shapes, dtype, device, gen, positive=False):
    """Random tensors; every other one is misaligned (scalar/unaligned code paths)."""
    out = []
    for i, s in enumerate(shapes):
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        if positive:
            t = t.abs() + 0.1
        out.append(_storage(s, dtype, device, i % 2).copy_(t))
    return out


def clones(ts):
    """Copies that keep each tensor's misalignment."""
    return [_storage(t.shape, t.dtype, t.device, t.storage_offset() % 2).copy_(t) for t in ts]


def row_buffers(shapes, device):
    return [torch.full((s[0],), -7.0, device=device) if len(s) > 1 else None for s in shapes]


def assert_close(ours, ref, dtype, what, i=None):
    """Elementwise closeness; the message names the tensor, the count and the worst element."""
    where = what if i is None else f"{what}[{i}] (shape {tuple(ref.shape)})"
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (
        f"{where}: got {ours.dtype}{tuple(ours.shape)}, expected {ref.dtype}{tuple(ref.shape)}")
    if ref.numel() == 0:
        return
    rtol, atol = TOL[dtype] if ref.dtype == dtype else TOL[torch.float32]
    a, b = ours.double().cpu(), ref.double().cpu()
    nan_mismatch = a.isnan() != b.isnan()
    err = (a - b).abs().nan_to_num(0.0)
    bad = (err > atol + rtol * b.abs().nan_to_num(0.0)) | nan_mismatch
    if bad.any():
        k = int(torch.argmax(torch.where(bad, err + 1, torch.zeros_like(err))))
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(k), ref.shape))
        raise AssertionError(
            f"{where}: {int(bad.sum())} of {ref.numel()} elements differ "
            f"(rtol {rtol:g}, atol {atol:g}); worst at {idx}: got {a.flatten()[k].item()!r}, "
            f"expected {b.flatten()[k].item()!r}, |diff| {err.flatten()[k].item():.3g}")


def assert_lists(ours, ref, dtype, what):
    assert len(ours) == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref)):
        if r is None:
            assert o is None, f"{what}[{i}]: expected None"
            continue
        assert_close(o, r, dtype, what, i)


def assert_scalar(ours, ref, dtype, what):
    assert ours.dim() == 0 and ours.dtype == ref.dtype and ours.device == ref.device, (
        f"{what}: got {ours.dtype} {tuple(ours.shape)} on {ours.device}, "
        f"expected {ref.dtype} {tuple(ref.shape)} on {ref.device}")
    a, b = ours.item(), ref.item()
    assert math.isclose(a, b, rel_tol=RED_TOL[dtype], abs_tol=1e-30), (
        f"{what}: got {a!r}, expected {b!r} (rel. diff {abs(a - b) / max(abs(b), 1e-300):.3g}, "
        f"tolerance {RED_TOL[dtype]:g})")


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
@pytest.mark.parametrize("centralize", [False, True])
@pytest.mark.parametrize("with_means", [False, True])
def test_sumsq(backend, shapes, dtype, adaptive, eta, centralize, with_means):
    ops, dev = backend
    gen = torch.Generator().manual_seed(1)
    g = rand(shapes, dtype, dev, gen)
    # An offset per tensor makes centralisation matter (and cancellation visible).
    g = [t + 3 for t in g]
    w = rand(shapes, dtype, dev, gen)
    means_o = row_buffers(shapes, dev) if with_means else None
    means_r = row_buffers(shapes, dev) if with_means else None
    got = ops.sumsq(g, w, adaptive=adaptive, eta=eta, centralize=centralize, row_means=means_o)
    want = REF.sumsq(g, w, adaptive=adaptive, eta=eta, centralize=centralize, row_means=means_r)
    assert_scalar(got, want, dtype, "sumsq")
    if with_means:
        assert_lists(means_o, means_r, torch.float32, "row_means")


def test_sumsq_empty_list(backend):
    ops, dev = backend
    got = ops.sumsq([], [], adaptive=False, eta=0.0, centralize=False)
    assert got.dim() == 0 and got.dtype == torch.float32 and got.item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_dot(backend, shapes, dtype):
    ops, dev = backend
    gen = torch.Generator().manual_seed(2)
    x, y = rand(shapes, dtype, dev, gen), rand(shapes, dtype, dev, gen)
    assert_scalar(ops.dot(x, y), REF.dot(x, y), dtype, "dot")


def test_reductions_are_deterministic(backend):
    """Same bits on every call and for any thread count (fixed units, fixed order)."""
    ops, dev = backend
    gen = torch.Generator().manual_seed(3)
    shapes = MIXED_SHAPES + [(1 << 20,)]
    g, w = rand(shapes, torch.float32, dev, gen), rand(shapes, torch.float32, dev, gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            for _ in range(2):
                results.append((
                    ops.sumsq(g, w, adaptive=True, eta=0.01, centralize=True).item(),
                    ops.dot(g, w).item(),
                ))
    finally:
        torch.set_num_threads(threads)
    assert len(set(results)) == 1, f"reductions changed between runs: {results}"


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
@pytest.mark.parametrize("centralized", [False, True])
@pytest.mark.parametrize("save,scale_kind", [(True, "float"), (True, "tensor"), (False, "tensor")])
def test_perturb(backend, shapes, dtype, adaptive, eta, centralized, save, scale_kind):
    ops, dev = backend
    gen = torch.Generator().manual_seed(4)
    w, g = rand(shapes, dtype, dev, gen), rand(shapes, dtype, dev, gen)
    s = rand(shapes, dtype, dev, gen)
    means = None
    if centralized:
        means = [torch.randn(sh[0], generator=gen).to(dev) if len(sh) > 1 else None
                 for sh in shapes]
    scale = 0.37 if scale_kind == "float" else torch.tensor(-0.37, device=dev)
    w_o, s_o, w_r, s_r = clones(w), clones(s), clones(w), clones(s)
    ops.perturb(w_o, g, s_o, scale, adaptive=adaptive, eta=eta, row_means=means, save=save)
    REF.perturb(w_r, g, s_r, scale, adaptive=adaptive, eta=eta, row_means=means, save=save)
    assert_lists(w_o, w_r, dtype, "params")
    for i, (a, b) in enumerate(zip(s_o, s_r)):
        assert torch.equal(a, b), f"saved[{i}] is not bit-identical to the reference"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_restore_is_bitwise(backend, shapes, dtype):
    ops, dev = backend
    gen = torch.Generator().manual_seed(5)
    w, s = rand(shapes, dtype, dev, gen), rand(shapes, dtype, dev, gen)
    ops.restore(w, s)
    for i, (a, b) in enumerate(zip(w, s)):
        assert torch.equal(a, b), f"params[{i}] differs from saved[{i}] after restore"


def test_perturb_then_restore_roundtrip(backend):
    ops, dev = backend
    gen = torch.Generator().manual_seed(6)
    w = rand(MIXED_SHAPES, torch.float32, dev, gen)
    g = rand(MIXED_SHAPES, torch.float32, dev, gen)
    s = [torch.empty_like(t) for t in w]
    before = clones(w)
    ops.perturb(w, g, s, 0.05, adaptive=True, eta=0.01)
    assert any(not torch.equal(a, b) for a, b in zip(w, before)), "perturb changed nothing"
    ops.restore(w, s)
    for i, (a, b) in enumerate(zip(w, before)):
        assert torch.equal(a, b), f"params[{i}] not restored bit for bit"


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("alias,tensor_coefs", [(None, False), ("first", True), ("last", False),
                                                ("last", True)])
def test_lincomb(backend, shapes, dtype, terms, alias, tensor_coefs):
    ops, dev = backend
    gen = torch.Generator().manual_seed(7)
    xs = [rand(shapes, dtype, dev, gen) for _ in range(terms)]
    coefs = [1.5, -0.25, 3.0][:terms]
    if tensor_coefs:  # mix tensors and floats
        coefs = [torch.tensor(c, device=dev) if k % 2 == 0 else c for k, c in enumerate(coefs)]
    xs_o, xs_r = [clones(x) for x in xs], [clones(x) for x in xs]
    if alias is None:
        out_o, out_r = rand(shapes, dtype, dev, gen), None
        out_r = clones(out_o)
    else:
        k = 0 if alias == "first" else terms - 1
        out_o, out_r = xs_o[k], xs_r[k]
    ops.lincomb(out_o, xs_o, coefs)
    REF.lincomb(out_r, xs_r, coefs)
    assert_lists(out_o, out_r, dtype, "out")


# ---------------------------------------------------------------------------------------
# Every flag takes both values in some case, and every pair of momentum-related flags
# meets (the full product costs 3x the time and found nothing more).
SGD_CASES = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=5e-4, maximize=True),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-4, maximize=False),
    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.0, maximize=True),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=5e-4, maximize=True),
    dict(momentum=0.9, dampening=0.1, nesterov=True, weight_decay=0.0, maximize=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("with_saved", [True, False])
def test_restore_sgd(backend, shapes, dtype, case, with_saved):
    ops, dev = backend
    gen = torch.Generator().manual_seed(8)
    w = rand(shapes, dtype, dev, gen)
    w_o, w_r = clones(w), clones(w)
    garbage = rand(shapes, dtype, dev, gen)  # the first step must overwrite, not read, bufs
    b_o, b_r = (clones(garbage), clones(garbage)) if case["momentum"] else ([], [])
    for step in range(2):  # the first step initialises the buffers, the second reads them
        g = rand(shapes, dtype, dev, gen)
        s = rand(shapes, dtype, dev, gen) if with_saved else None
        kw = dict(lr=0.1, init_buffers=(step == 0), **case)
        ops.restore_sgd(w_o, s, g, b_o, **kw)
        REF.restore_sgd(w_r, s, g, b_r, **kw)
        assert_lists(w_o, w_r, dtype, f"params after step {step}")
        assert_lists(b_o, b_r, dtype, f"momentum_buffers after step {step}")
        # Continue both from the same state so rounding differences do not compound.
        w_o, b_o = clones(w_r), clones(b_r)


ADAM_CASES = [
    dict(decoupled=False, amsgrad=False, maximize=False, weight_decay=0.0),
    dict(decoupled=False, amsgrad=False, maximize=False, weight_decay=1e-2),
    dict(decoupled=False, amsgrad=True, maximize=True, weight_decay=1e-2),
    dict(decoupled=True, amsgrad=False, maximize=True, weight_decay=1e-2),
    dict(decoupled=True, amsgrad=True, maximize=False, weight_decay=1e-2),
    dict(decoupled=True, amsgrad=False, maximize=False, weight_decay=0.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ADAM_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("with_saved", [True, False])
def test_restore_adam(backend, shapes, dtype, case, with_saved):
    ops, dev = backend
    gen = torch.Generator().manual_seed(9)
    w = rand(shapes, dtype, dev, gen)
    state = {
        "m": [torch.zeros_like(t) for t in w],
        "v": [torch.zeros_like(t) for t in w],
        "vmax": [torch.zeros_like(t) for t in w] if case["amsgrad"] else [],
    }
    ours = {"w": clones(w), **{k: clones(v) for k, v in state.items()}}
    refs = {"w": clones(w), **{k: clones(v) for k, v in state.items()}}
    for step in range(1, 3):
        g = rand(shapes, dtype, dev, gen)
        s = rand(shapes, dtype, dev, gen) if with_saved else None
        kw = dict(step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, **case)
        for st, ops_ in ((ours, ops), (refs, REF)):
            ops_.restore_adam(st["w"], s, g, st["m"], st["v"], st["vmax"], **kw)
        for k in ("w", "m", "v", "vmax"):
            assert_lists(ours[k], refs[k], dtype, f"{k} after step {step}")
        ours = {k: clones(v) for k, v in refs.items()}


# ---------------------------------------------------------------------------------------
def test_rejects_mismatched_lists(backend):
    ops, dev = backend
    w = [torch.zeros(4, device=dev)]
    with pytest.raises((RuntimeError, ValueError)):
        ops.restore(w, [torch.zeros(5, device=dev)])
    with pytest.raises((RuntimeError, ValueError)):
        ops.dot(w, [torch.zeros(4, device=dev, dtype=torch.float64)])
    with pytest.raises((RuntimeError, ValueError)):
        ops.restore(w, [torch.zeros(8, device=dev)[::2]])


def test_cuda_backend_unavailable_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    mod = importlib.import_module("sharpopt.backends.cuda")
    with pytest.raises(BackendUnavailable):
        mod.load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_more_units_than_one_launch(dtype):
    """Lists that overflow one launch table by blocks (plain and row units) on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("the cuda backend needs a GPU")
    ops = importlib.import_module("sharpopt.backends.cuda").load()
    dev = torch.device("cuda")
    shapes = [(21_000_000 + 12345,), (70000, 300), (3, 1_000_003), (5,)]
    gen = torch.Generator().manual_seed(10)
    g, w = rand(shapes, dtype, dev, gen), rand(shapes, dtype, dev, gen)
    m_o, m_r = row_buffers(shapes, dev), row_buffers(shapes, dev)
    got = ops.sumsq(g, w, adaptive=True, eta=0.01, centralize=True, row_means=m_o)
    want = REF.sumsq(g, w, adaptive=True, eta=0.01, centralize=True, row_means=m_r)
    assert_scalar(got, want, dtype, "sumsq")
    assert_lists(m_o, m_r, torch.float32, "row_means")
    assert_scalar(ops.dot(g, w), REF.dot(g, w), dtype, "dot")
    s = [torch.empty_like(t) for t in w]
    w_o, w_r, s_r = clones(w), clones(w), [torch.empty_like(t) for t in w]
    ops.perturb(w_o, g, s, torch.tensor(0.3, device=dev), adaptive=False, eta=0.0, row_means=m_r)
    REF.perturb(w_r, g, s_r, torch.tensor(0.3, device=dev), adaptive=False, eta=0.0, row_means=m_r)
    assert_lists(w_o, w_r, dtype, "params")
    b_o, b_r = [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in w]
    ops.restore_sgd(w_o, s, g, b_o, lr=0.1, weight_decay=5e-4, momentum=0.9, dampening=0.0,
                    nesterov=True, maximize=False, init_buffers=True)
    REF.restore_sgd(w_r, s_r, g, b_r, lr=0.1, weight_decay=5e-4, momentum=0.9, dampening=0.0,
                    nesterov=True, maximize=False, init_buffers=True)
    assert_lists(w_o, w_r, dtype, "params after restore_sgd")
    assert_lists(b_o, b_r, dtype, "momentum_buffers")


def test_cpu_triad_helper():
    """The bandwidth probe of bench/bench_cpu.py computes what it claims."""
    from sharpopt._build import load_extension

    gen = torch.Generator().manual_seed(11)
    b, c = torch.randn(3 * 2 ** 16 + 5, generator=gen), torch.randn(3 * 2 ** 16 + 5, generator=gen)
    a = torch.empty_like(b)
    load_extension("cpu").triad(a, b, c, 0.5)
    assert_close(a, b + 0.5 * c, torch.float32, "triad")
