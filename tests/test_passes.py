"""Every fast backend's passes, one by one, against ``reference`` on the same inputs.

The passes and their contract are ``sharpopt/backends/base.py``. Each test builds fresh
random inputs, runs the pass through the backend under test and through
``sharpopt.backends.reference``, and compares every output and state tensor within the
entries of ``tests/tolerances.py``. The backends are conftest's fast ones: ``foreach``,
``cpu``, ``cuda`` (skipped without a GPU) and ``triton`` (on CPU tensors under its
interpreter, on CUDA tensors with a GPU).

Shapes are odd on purpose, in three sets:

* ``edges`` - sizes defined from the Triton kernels' vector and chunk lengths: a tensor
  shorter than one vector, a vector plus a tail, several chunks, empty and 0-dim tensors,
  rows longer than one column tile and more rows than one tile, rows of length 1 and 0;
* ``mixed`` - a tensor spread over several CPU work units (2^16 elements) and CUDA chunks,
  long and tiny rows;
* ``many`` - 120 small tensors, more than one CUDA launch table holds.

Each flag grid runs in full on the (per-pass subset of) ``edges`` shapes, and in a
smaller grid that still takes every flag value on ``mixed`` and ``many``. The interpreted
Triton backend runs ``edges`` only (``mixed`` would take minutes there; its plan
splitting is covered with lowered table limits instead), and so does ``foreach`` (torch's
multi-tensor ops have no block geometry of their own; tests/test_properties.py draws
random shapes for it). Every other tensor starts at an odd element offset of its storage,
so no pointer is 16-byte aligned. Backend-specific internals (Triton's tables and
launches, the CPU's thread count, CUDA's launch tables) have their own tests at the end,
marked for that backend.
"""
from __future__ import annotations

import importlib
import itertools
import os

import pytest
import torch

from conftest import FAST_BACKENDS, require_backend
from sharpopt.backends import BackendUnavailable, reference
from tolerances import CHAINED_PASSES, ROW_MEANS, pass_tol, reduction_rtol

REF = reference.load()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["float32", "bfloat16", "float16", "float64"]
# Empty rows divide 0 by 0 on purpose (a nan mean, as torch's); numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

try:  # the Triton kernels' geometry, which the ``edges`` shapes straddle
    from sharpopt.kernels import tables
    B, CH = tables.BLOCK, tables.CHUNK
    MIN_COLS, MAX_COLS = tables.MIN_COLS, tables.MAX_COLS
    MANY_ROWS = 2 * tables.rows_per_tile(tables.cols_for(3)) + 1
except ImportError:  # no triton here: the interpreter's sizes still make odd cases
    tables = None
    B, CH, MIN_COLS, MAX_COLS, MANY_ROWS = 64, 128, 4, 16, 65


def flat_shapes():
    """Shorter than a vector, a vector plus a tail, several chunks, empty, 0-dim; none a
    power of two."""
    return [(1,), (3,), (B - 1,), (CH + B + 3,), (2 * CH + 7,), (0,), (), (5, 7),
            (4, 3, 3, 3), (2, 0), (0, 4)]


def row_shapes():
    """Rows longer than MAX_COLS (a loop over columns), more rows than one tile, one row,
    rows of length 1, a column tile between the two clamps, empty rows."""
    return [(5, 2 * MAX_COLS + 3), (MANY_ROWS, 3), (2, 2 * MIN_COLS + 1), (1, 11), (6, 1),
            (3, 2, 3), (4, 1, 3, 3), (2, 0), (7,), ()]


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


SHAPE_SETS = {"edges": flat_shapes() + row_shapes(), "mixed": MIXED_SHAPES,
              "many": _many_shapes()}
# The parts of ``edges`` a pass's kernel geometry depends on (the interpreted Triton
# kernels take a while per block, so each pass gets the shapes that matter to it): the
# reductions and perturb (row kernels) need the row shapes, the flat passes the flat ones.
EDGES = {
    "sumsq": flat_shapes()[:5] + row_shapes(),
    "perturb": flat_shapes() + row_shapes(),
    "flat": flat_shapes(),
    "update": flat_shapes()[:6],
}


def _id(c):
    if isinstance(c, dict):
        return "-".join(f"{k}={v}" for k, v in c.items())
    return str(c).replace("torch.", "")


def device_of(name: str) -> torch.device:
    """Where a backend's tensors live in these tests."""
    if name == "cuda" or (name == "triton" and not INTERPRET):
        return torch.device("cuda")
    return torch.device("cpu")


def shape_sets_of(name: str):
    """The interpreted Triton kernels and ``foreach`` (torch's multi-tensor ops, with no
    block geometry of their own; random shapes in tests/test_properties.py) run the
    small ``edges`` shapes only."""
    return ["edges"] if name == "foreach" or (name == "triton" and INTERPRET) \
        else list(SHAPE_SETS)


class Target:
    """A backend under test: its Ops, name and device."""

    def __init__(self, name):
        self.name, self.device = name, device_of(name)
        self.ops = require_backend(name, self.device)


@pytest.fixture(params=FAST_BACKENDS)
def backend(request):
    return Target(request.param)


@pytest.fixture
def case(request):
    """A backend with one of its shape sets (parametrized through :func:`cases`)."""
    name, shapes, edges = request.param
    target = Target(name)
    target.shape_set = shapes
    return target, EDGES[edges] if shapes == "edges" else SHAPE_SETS[shapes]


def grid(**axes):
    """Every combination of the values of ``axes``, as tuples in the order given."""
    return list(itertools.product(*axes.values()))


def cases(names: str, full, heavy=None, edges="flat"):
    """``pytest.mark.parametrize`` over ``case`` (each backend with each of its shape sets)
    and the flags ``names``: the whole grid ``full`` on the small ``EDGES[edges]`` shapes,
    and on the large ``mixed``/``many`` sets the smaller grid ``heavy`` (default ``full``),
    which still takes every flag value."""
    params = []
    for b in FAST_BACKENDS:
        for s in shape_sets_of(b):
            flags = full if s == "edges" or heavy is None else heavy
            params += [pytest.param((b, s, edges), *f, id="-".join([b, s, *map(_id, f)]))
                       for f in flags]
    return pytest.mark.parametrize("case," + names, params, indirect=["case"])


def only(*names):
    """Skip unless the test's backend is one of ``names`` (backend-specific internals)."""
    def check(target):
        if target.name not in names:
            pytest.skip(f"checks {'/'.join(names)} internals")
    return check


# -- inputs -----------------------------------------------------------------------------------
def _storage(shape, dtype, device, offset):
    """An uninitialised contiguous tensor whose data starts ``offset`` elements into its
    storage, so that its pointer is not 16-byte aligned when ``offset`` is odd."""
    n = torch.Size(shape).numel()
    return torch.empty(n + offset, dtype=dtype, device=device)[offset:].view(shape)


def rand(shapes, dtype, device, gen, scale=1.0, offset=0.0, positive=False):
    """Random tensors ``randn * scale + offset`` (``|.|`` when positive); every other one
    misaligned. Drawn as one flat fp32 (fp64) sample, then cut into the shapes."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    sizes = [torch.Size(s).numel() for s in shapes]
    flat = torch.randn(sum(sizes), generator=gen, dtype=work)
    if scale != 1.0 or offset != 0.0:
        flat = flat * scale + offset
    if positive:
        flat = flat.abs()
    return [_storage(s, dtype, device, i % 2).copy_(part.view(s))
            for i, (s, part) in enumerate(zip(shapes, flat.split(sizes)))]


def clones(ts):
    """Copies that keep each tensor's misalignment."""
    return [_storage(t.shape, t.dtype, t.device, t.storage_offset() % 2).copy_(t) for t in ts]


def row_buffers(shapes, device, fill=-7.0):
    return [torch.full((s[0],), fill, device=device) if len(s) > 1 else None for s in shapes]


# -- comparisons ------------------------------------------------------------------------------
def _bits(t):
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(view).cpu()


def assert_close(ours, ref, where, tol):
    """Elementwise closeness (nan where the reference has nan); the message names the
    tensor, the count and the worst element."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (
        f"{where}: got {ours.dtype}{tuple(ours.shape)}, expected {ref.dtype}{tuple(ref.shape)}")
    if ref.numel() == 0:
        return
    rtol, atol = tol
    a, b = ours.double().cpu(), ref.double().cpu()
    bad = ~torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        err = (a - b).abs().nan_to_num(float("inf"))
        k = int(torch.argmax(torch.where(bad, err.nan_to_num(0.0) + 1, torch.zeros_like(err))))
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(k), ref.shape))
        raise AssertionError(
            f"{where}: {int(bad.sum())} of {ref.numel()} elements differ "
            f"(rtol {rtol:g}, atol {atol:g}); worst at {idx}: got {a.flatten()[k].item()!r}, "
            f"expected {b.flatten()[k].item()!r}, |diff| {err.flatten()[k].item():.3g}")


def assert_lists(ours, ref, what, tol=None, backend=None):
    """Every tensor of ``ours`` close to ``ref``: within ``tol``, by default the pass
    tolerance of the stored dtype for ``backend``; ``tol="bits"`` demands the same bits."""
    assert tol is not None or backend is not None, "name the backend or the tolerance"
    assert len(ours) == len(ref), f"{what}: {len(ours)} tensors, expected {len(ref)}"
    for i, (o, r) in enumerate(zip(ours, ref)):
        where = f"{what}[{i}] (shape {tuple(r.shape) if r is not None else None})"
        if r is None:
            assert o is None, f"{where}: expected None"
            continue
        if tol == "bits":
            assert o.shape == r.shape and o.dtype == r.dtype, \
                f"{where}: got {o.dtype}{tuple(o.shape)}"
            bad = (_bits(o) != _bits(r)).nonzero()
            assert bad.numel() == 0, (
                f"{where}: {bad.shape[0]} of {r.numel()} elements differ bitwise, first at "
                f"{tuple(bad[0].tolist())}: got {o.cpu()[tuple(bad[0])].item()!r}, expected "
                f"{r.cpu()[tuple(bad[0])].item()!r}")
            continue
        assert_close(o, r, where, tol or pass_tol(r.dtype, backend))


def assert_reduction(got, want, scale, dtype, where, backend):
    """A 0-dim result of the reference's dtype and device type, within
    ``reduction_rtol(dtype, backend)`` of ``scale``, the sum of the terms' absolute values."""
    assert got.dim() == 0 and got.dtype == want.dtype and got.device.type == want.device.type, (
        f"{where}: got {got.dtype} {tuple(got.shape)} on {got.device}, "
        f"expected {want.dtype} () on {want.device}")
    err = abs(got.item() - want.item())
    rtol = reduction_rtol(dtype, backend)
    bound = rtol * max(scale, 1e-30)
    assert err <= bound, (f"{where}: got {got.item()!r}, expected {want.item()!r}, "
                          f"error {err:.3g} > {bound:.3g} (rtol {rtol:g} of "
                          f"sum |terms| = {scale:.6g})")


def dot_scale(xs, ys):
    return REF.dot([x.abs() for x in xs], [y.abs() for y in ys]).item()


# -- reductions -------------------------------------------------------------------------------
@cases("dtype,adaptive,eta,centralize,with_means",
       [(d, a, e, c, m) for d in DTYPES for a, e in [(False, 0.0), (True, 0.0), (True, 0.01)]
        for c in (False, True) for m in (False, True)], edges="sumsq")
def test_sumsq(case, dtype, adaptive, eta, centralize, with_means):
    """sumsq: Σ‖T ⊙ C(g)‖² to the reduction tolerance; the row means it writes (nan for an
    empty row, as torch's mean of nothing) to the row-mean tolerance."""
    t, shapes = case
    gen = torch.Generator().manual_seed(1)
    # An offset makes the rows' means large against their spread: centring must not
    # cancel catastrophically.
    g = rand(shapes, dtype, t.device, gen, offset=3.0)
    w = rand(shapes, dtype, t.device, gen)
    means_o = row_buffers(shapes, t.device) if with_means else None
    means_r = row_buffers(shapes, t.device) if with_means else None
    kw = dict(adaptive=adaptive, eta=eta, centralize=centralize)
    got = t.ops.sumsq(g, w, row_means=means_o, **kw)
    want = REF.sumsq(g, w, row_means=means_r, **kw)
    assert_reduction(got, want, want.item(), dtype, f"sumsq {kw} means={with_means}", t.name)
    if with_means:
        assert_lists(means_o, means_r, "row_means", tol=ROW_MEANS[dtype])


def test_reductions_of_nothing(backend):
    """An empty list, and a list of empty tensors, sum to a 0-dim fp32 zero on the device."""
    ops = backend.ops
    for got in (ops.sumsq([], [], adaptive=False, eta=0.0, centralize=False),
                ops.dot([], [])):
        assert got.dim() == 0 and got.dtype == torch.float32 and got.item() == 0.0, got
    empty = [torch.empty(0, device=backend.device), torch.empty(2, 0, device=backend.device)]
    got = ops.sumsq(empty, empty, adaptive=True, eta=0.1, centralize=True)
    assert got.item() == 0.0 and got.device.type == backend.device.type


@cases("dtype", grid(dtype=DTYPES))
def test_dot(case, dtype):
    """dot: Σ⟨x, y⟩, and with aliased operands (x with itself)."""
    t, shapes = case
    gen = torch.Generator().manual_seed(2)
    x, y = rand(shapes, dtype, t.device, gen), rand(shapes, dtype, t.device, gen)
    assert_reduction(t.ops.dot(x, y), REF.dot(x, y), dot_scale(x, y), dtype, "dot", t.name)
    assert_reduction(t.ops.dot(x, x), REF.dot(x, x), dot_scale(x, x), dtype, "dot, x with x",
                     t.name)


def test_reductions_return_the_accumulation_dtype(backend):
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64, on the tensors' device."""
    gen = torch.Generator().manual_seed(90)
    for dtype, acc in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                       (torch.float16, torch.float32), (torch.float64, torch.float64)):
        x = rand([(5,)], dtype, backend.device, gen)
        for got in (backend.ops.sumsq(x, x, adaptive=False, eta=0.0, centralize=False),
                    backend.ops.dot(x, x)):
            assert got.dtype == acc and got.device.type == backend.device.type, (dtype, got)


def test_reductions_are_deterministic(backend):
    """The compiled backends: the same bits on every call (fixed units, fixed order); on
    ``cpu`` also for any thread count."""
    only("cpu", "cuda", "triton")(backend)
    ops, dev = backend.ops, backend.device
    gen = torch.Generator().manual_seed(3)
    shapes = SHAPE_SETS["edges"] if backend.name == "triton" and INTERPRET else \
        MIXED_SHAPES + [(1 << 20,)]
    g, w = rand(shapes, torch.float32, dev, gen), rand(shapes, torch.float32, dev, gen)
    means = row_buffers(shapes, dev)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in sorted({1, 2, threads}) if backend.name == "cpu" else [threads]:
            torch.set_num_threads(n)
            for _ in range(2):
                results.append((
                    _bits(ops.sumsq(g, w, adaptive=True, eta=0.01, centralize=True,
                                    row_means=means)).item(),
                    _bits(ops.dot(g, w)).item(),
                ))
    finally:
        torch.set_num_threads(threads)
    assert len(set(results)) == 1, f"reductions changed between runs: {results}"


# -- elementwise passes ---------------------------------------------------------------------
@cases("dtype,adaptive,eta,centralized,save,scale_kind",
       [(d, a, e, c, sv, sk) for d in DTYPES
        for a, e in [(False, 0.0), (True, 0.0), (True, 0.01)] for c in (False, True)
        for sv, sk in [(True, "float"), (True, "tensor"), (False, "float"), (False, "tensor")]],
       heavy=[(d, a, e, c, sv, sk) for d in DTYPES
              for a, e in [(False, 0.0), (True, 0.0), (True, 0.01)] for c in (False, True)
              for sv, sk in [(True, "float"), (True, "tensor"), (False, "tensor")]],
       edges="perturb")
def test_perturb(case, dtype, adaptive, eta, centralized, save, scale_kind):
    """perturb: saved ← w bit for bit (when save), w ← saved + scale · T² ⊙ C(g)."""
    t, shapes = case
    dev = t.device
    gen = torch.Generator().manual_seed(4)
    w, g, s = (rand(shapes, dtype, dev, gen) for _ in range(3))
    means = None
    if centralized:
        means = [torch.randn(sh[0], generator=gen).to(dev) if len(sh) > 1 else None
                 for sh in shapes]
    scale = 0.37 if scale_kind == "float" else torch.tensor(-0.21, device=dev)
    w_o, s_o, w_r, s_r = clones(w), clones(s), clones(w), clones(s)
    kw = dict(adaptive=adaptive, eta=eta, row_means=means, save=save)
    t.ops.perturb(w_o, g, s_o, scale, **kw)
    REF.perturb(w_r, g, s_r, scale, **kw)
    assert_lists(s_o, s_r, "saved", tol="bits")
    assert_lists(w_o, w_r, "params", backend=t.name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS[:2])
def test_perturb_centred_rows_around_the_vector_length(backend, dtype):
    """Rows of B - 1, B, B + 1 and 2B + 5 columns (Triton finds an element's row with a
    32-bit division for rows shorter than a vector and a comparison for longer ones),
    tensors spanning several chunks and ending in a tail."""
    shapes = [(3, B - 1), (4, B), (5, B + 1), (CH // B + 3, 2 * B + 5), (2, CH + 3)]
    dev = backend.device
    gen = torch.Generator().manual_seed(110)
    w, g, s = (rand(shapes, dtype, dev, gen) for _ in range(3))
    means = [torch.randn(sh[0], generator=gen).to(dev) for sh in shapes]
    w_o, s_o, w_r, s_r = clones(w), clones(s), clones(w), clones(s)
    backend.ops.perturb(w_o, g, s_o, 0.3, adaptive=True, eta=0.01, row_means=means)
    REF.perturb(w_r, g, s_r, 0.3, adaptive=True, eta=0.01, row_means=means)
    assert_lists(s_o, s_r, "saved", tol="bits")
    assert_lists(w_o, w_r, "params", backend=backend.name)


@cases("dtype", grid(dtype=DTYPES))
def test_restore_is_bitwise(case, dtype):
    """restore: w ← saved bit for bit, special values (a NaN with a payload, ±inf, -0,
    subnormals) included."""
    t, shapes = case
    gen = torch.Generator().manual_seed(5)
    w, s = rand(shapes, dtype, t.device, gen), rand(shapes, dtype, t.device, gen)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40,
                            -1e-45], dtype=torch.float64).to(dtype)
    if dtype in (torch.float32, torch.float64):
        special[0] = special[:1].view(torch.int32 if dtype == torch.float32 else torch.int64)\
            .add(12345).view(dtype)[0]
    s.append(special.to(t.device))
    w.append(torch.zeros_like(s[-1]))
    t.ops.restore(w, s)
    assert_lists(w, s, "params after restore", tol="bits")


def test_perturb_then_restore_roundtrip(backend):
    dev = backend.device
    gen = torch.Generator().manual_seed(6)
    shapes = SHAPE_SETS["mixed" if "mixed" in shape_sets_of(backend.name) else "edges"]
    w = rand(shapes, torch.float32, dev, gen)
    g = rand(shapes, torch.float32, dev, gen)
    s = [torch.empty_like(x) for x in w]
    before = clones(w)
    backend.ops.perturb(w, g, s, 0.05, adaptive=True, eta=0.01)
    assert any(not torch.equal(a, b) for a, b in zip(w, before)), "perturb changed nothing"
    backend.ops.restore(w, s)
    assert_lists(w, before, "params after perturb and restore", tol="bits")


@cases("dtype,terms,alias,coef_kind",
       grid(dtype=DTYPES, terms=[1, 2, 3], alias=[None, "first", "last"],
            coef_kind=["float", "tensor", "mixed"]),
       heavy=[(d, n, a, c) for d in DTYPES for n in (1, 2, 3)
              for a, c in [(None, "float"), ("first", "mixed"), ("last", "float"),
                           ("last", "mixed")]], edges="update")
def test_lincomb(case, dtype, terms, alias, coef_kind):
    """lincomb: out ← Σ coefs[k] · xs[k], out a fresh list or aliasing the first or the last
    term; coefficients floats, device tensors or both."""
    t, shapes = case
    dev = t.device
    gen = torch.Generator().manual_seed(7)
    xs = [rand(shapes, dtype, dev, gen) for _ in range(terms)]
    values = [1.5, -0.25, 3.0][:terms]
    coefs = [torch.tensor(v, device=dev) if coef_kind == "tensor" or
             (coef_kind == "mixed" and k % 2) else v for k, v in enumerate(values)]
    xs_o, xs_r = [clones(x) for x in xs], [clones(x) for x in xs]
    if alias is None:
        out_o = rand(shapes, dtype, dev, gen)
        out_r = clones(out_o)
    else:
        k = 0 if alias == "first" else terms - 1
        out_o, out_r = xs_o[k], xs_r[k]
    t.ops.lincomb(out_o, xs_o, coefs)
    REF.lincomb(out_r, xs_r, coefs)
    assert_lists(out_o, out_r, f"lincomb out ({terms} terms, {coef_kind}, alias {alias})",
                 backend=t.name)


def test_lincomb_rejects_bad_term_counts(backend):
    x = [torch.ones(3, device=backend.device)]
    for xs, coefs in (([], []), ([x] * 4, [1.0] * 4), ([x, x], [1.0])):
        with pytest.raises(ValueError):
            backend.ops.lincomb(x, xs, coefs)


def test_bf16_stores_round_to_nearest_even(backend):
    """fp32 sums exactly half-way between two bf16 neighbours (1 + 2^-8 lies between 1 and
    1 + 2^-7) go to the even neighbour, as torch rounds."""
    dev = backend.device
    x0 = torch.tensor([1.0, 1.0 + 2 ** -7, -1.0], dtype=torch.bfloat16, device=dev)
    x1 = torch.tensor([2 ** -8, 2 ** -8, -2 ** -8], dtype=torch.bfloat16, device=dev)
    out = torch.empty_like(x0)
    backend.ops.lincomb([out], [[x0], [x1]], [1.0, 1.0])
    want = (x0.float() + x1.float()).to(torch.bfloat16)
    assert torch.equal(out, want), f"got {out.tolist()}, expected {want.tolist()}"


# -- restore merged with the base update -------------------------------------------------------
# (momentum, dampening, nesterov) × weight_decay × maximize in full, plus dampening with
# nesterov (which torch.optim refuses but the pass must still compute as written).
SGD_CASES = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n in [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.0, True), (0.8, 0.25, False)]
    for wd in (0.0, 0.05) for mx in (False, True)
] + [dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.0, maximize=True),
     dict(momentum=0.9, dampening=0.1, nesterov=True, weight_decay=5e-4, maximize=False)]
# On the large shape sets: every flag takes both values in some case, and every pair of
# momentum-related flags meets.
SGD_HEAVY = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=5e-4, maximize=True),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-4, maximize=False),
    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.0, maximize=True),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=5e-4, maximize=True),
    dict(momentum=0.9, dampening=0.1, nesterov=True, weight_decay=0.0, maximize=False),
]


@cases("dtype,sgd,with_saved", grid(dtype=DTYPES, sgd=SGD_CASES, with_saved=[True, False]),
       heavy=grid(dtype=DTYPES, sgd=SGD_HEAVY, with_saved=[True, False]), edges="update")
def test_restore_sgd(case, dtype, sgd, with_saved):
    """restore_sgd over two steps: the first initialises the buffers (overwriting garbage,
    never reading it), the second reads them."""
    t, shapes = case
    dev = t.device
    gen = torch.Generator().manual_seed(8)
    w = rand(shapes, dtype, dev, gen)
    w_o, w_r = clones(w), clones(w)
    garbage = rand(shapes, dtype, dev, gen)
    b_o, b_r = (clones(garbage), clones(garbage)) if sgd["momentum"] else ([], [])
    for step in range(2):
        g = rand(shapes, dtype, dev, gen)
        s = rand(shapes, dtype, dev, gen) if with_saved else None
        kw = dict(lr=0.1, init_buffers=(step == 0), **sgd)
        t.ops.restore_sgd(w_o, s, g, b_o, **kw)
        REF.restore_sgd(w_r, s, g, b_r, **kw)
        assert_lists(w_o, w_r, f"params after step {step}", backend=t.name)
        assert_lists(b_o, b_r, f"momentum_buffers after step {step}", backend=t.name)
        # Continue both from the same state so rounding differences do not compound.
        w_o, b_o = clones(w_r), clones(b_r)


# decoupled × amsgrad × maximize in full with weight decay, and without it both ways.
ADAM_CASES = [dict(decoupled=dc, amsgrad=am, maximize=mx, weight_decay=0.1)
              for dc in (False, True) for am in (False, True) for mx in (False, True)] + [
    dict(decoupled=False, amsgrad=False, maximize=False, weight_decay=0.0),
    dict(decoupled=True, amsgrad=False, maximize=False, weight_decay=0.0)]
ADAM_HEAVY = [
    dict(decoupled=False, amsgrad=False, maximize=False, weight_decay=0.0),
    dict(decoupled=False, amsgrad=False, maximize=False, weight_decay=1e-2),
    dict(decoupled=False, amsgrad=True, maximize=True, weight_decay=1e-2),
    dict(decoupled=True, amsgrad=False, maximize=True, weight_decay=1e-2),
    dict(decoupled=True, amsgrad=True, maximize=False, weight_decay=1e-2),
    dict(decoupled=True, amsgrad=False, maximize=False, weight_decay=0.0),
]


@cases("dtype,adam,with_saved",
       grid(dtype=DTYPES, adam=ADAM_CASES, with_saved=[True, False]),
       heavy=grid(dtype=DTYPES, adam=ADAM_HEAVY, with_saved=[True, False]), edges="update")
def test_restore_adam(case, dtype, adam, with_saved):
    """restore_adam: steps 1 and 2 from zero state (each continuing from the reference's
    result, so rounding differences do not compound), and on the ``edges`` shapes also
    step 3 from a random state (m of either sign, v and vmax positive); every state entry
    compared."""
    t, shapes = case
    dev = t.device
    gen = torch.Generator().manual_seed(9)
    w = rand(shapes, dtype, dev, gen)
    zeros = lambda: [torch.zeros_like(x) for x in w]  # noqa: E731
    runs = [([1, 2], {"w": w, "m": zeros(), "v": zeros(), "vmax": zeros()})]
    if t.shape_set == "edges":
        runs.append(([3], {"w": w, "m": rand(shapes, dtype, dev, gen, scale=0.1),
                           "v": rand(shapes, dtype, dev, gen, scale=0.01, positive=True),
                           "vmax": rand(shapes, dtype, dev, gen, scale=0.01, positive=True)}))
    for steps, state in runs:
        if not adam["amsgrad"]:
            state["vmax"] = []
        refs = state
        for step in steps:
            ours = {k: clones(v) for k, v in refs.items()}
            refs = {k: clones(v) for k, v in refs.items()}
            g = rand(shapes, dtype, dev, gen)
            s = rand(shapes, dtype, dev, gen) if with_saved else None
            kw = dict(step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, **adam)
            for st, impl in ((ours, t.ops), (refs, REF)):
                impl.restore_adam(st["w"], s, g, st["m"], st["v"], st["vmax"], **kw)
            for k in ("w", "m", "v", "vmax"):
                assert_lists(ours[k], refs[k], f"{k} after step {step}", backend=t.name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_several_sam_steps(backend, dtype, base):
    """GCSAM-like steps chained through the passes, with the scale kept on the device.
    The scale comes from a reduction, so the chained-passes tolerance applies."""
    shapes = [(CH + 5,), (9, 7), (4, 3, 2, 2), (3,)]
    rho, eps = 0.05, 1e-12
    runs = {}
    for name, ops in (("ref", REF), ("got", backend.ops)):
        gen = torch.Generator().manual_seed(80)
        params = rand(shapes, dtype, backend.device, gen)
        saved = [torch.empty_like(p) for p in params]
        means = row_buffers(shapes, backend.device)
        state = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        for step in range(1, 4):
            grads = rand(shapes, dtype, backend.device, gen)
            norm2 = ops.sumsq(grads, params, adaptive=False, eta=0.0, centralize=True,
                              row_means=means)
            scale = rho / (norm2.sqrt() + eps)
            ops.perturb(params, grads, saved, scale, adaptive=False, eta=0.0, row_means=means)
            g_adv = rand(shapes, dtype, backend.device, gen, scale=0.5)
            if base == "sgd":
                ops.restore_sgd(params, saved, g_adv, state[0], lr=0.1, weight_decay=1e-3,
                                momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
                                init_buffers=step == 1)
            else:
                ops.restore_adam(params, saved, g_adv, state[0], state[1], [], step=step,
                                 lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                                 decoupled=True, amsgrad=False, maximize=False)
        runs[name] = params, state[0]
    tol = CHAINED_PASSES[dtype]
    assert_lists(runs["got"][0], runs["ref"][0], f"3 steps {base}, params", tol=tol)
    assert_lists(runs["got"][1], runs["ref"][1], f"3 steps {base}, state", tol=tol)


# -- the compiled backends' argument checks ----------------------------------------------------
def test_rejects_mismatched_lists(backend):
    """cpu/cuda refuse lists that disagree in length, dtype or layout."""
    only("cpu", "cuda")(backend)
    ops, dev = backend.ops, backend.device
    w = [torch.zeros(4, device=dev)]
    with pytest.raises((RuntimeError, ValueError)):
        ops.restore(w, [torch.zeros(5, device=dev)])
    with pytest.raises((RuntimeError, ValueError)):
        ops.dot(w, [torch.zeros(4, device=dev, dtype=torch.float64)])
    with pytest.raises((RuntimeError, ValueError)):
        ops.restore(w, [torch.zeros(8, device=dev)[::2]])


def test_triton_supports_and_errors(backend):
    """triton: its device rule, and refusals of unsupported dtypes and layouts."""
    only("triton")(backend)
    ops, dev = backend.ops, backend.device
    assert ops.name == "triton" and ops.fuses_base_update
    assert ops.supports(dev)
    other = torch.device("cuda") if dev.type == "cpu" else torch.device("cpu")
    assert not ops.supports(other)
    x = [torch.ones(4, dtype=torch.int32, device=dev)]
    with pytest.raises(TypeError, match="unsupported dtype"):
        ops.dot(x, x)
    nc = [torch.ones(4, 12, device=dev)[:, ::2]]          # a strided view: not dense
    with pytest.raises(ValueError, match="dense"):
        ops.sumsq(nc, nc, adaptive=False, eta=0.0, centralize=False)
    tr = [torch.arange(24.0, device=dev).view(4, 6).t()]   # dense, another memory order
    torch.testing.assert_close(ops.sumsq(tr, tr, adaptive=False, eta=0.0, centralize=False),
                               (tr[0] ** 2).sum())
    with pytest.raises(ValueError, match="row in one block"):
        ops.sumsq(tr, tr, adaptive=False, eta=0.0, centralize=True,
                  row_means=[torch.zeros(6, device=dev)])
    with pytest.raises(ValueError, match="dim <= 1"):
        ops.sumsq([torch.ones(3, device=dev)], [torch.ones(3, device=dev)],
                  adaptive=False, eta=0.0, centralize=False,
                  row_means=[torch.zeros(3, device=dev)])


# -- cuda ---------------------------------------------------------------------------------------
def test_cuda_backend_unavailable_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    mod = importlib.import_module("sharpopt.backends.cuda")
    with pytest.raises(BackendUnavailable):
        mod.load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS[:2])
def test_cuda_more_units_than_one_launch(dtype):
    """cuda: lists that overflow one launch table by blocks (plain and row units)."""
    if "cuda" not in FAST_BACKENDS:
        pytest.skip("cuda is not among the backends tested")
    t = Target("cuda")
    ops, dev = t.ops, t.device
    shapes = [(21_000_000 + 12345,), (70000, 300), (3, 1_000_003), (5,)]
    gen = torch.Generator().manual_seed(10)
    g, w = rand(shapes, dtype, dev, gen), rand(shapes, dtype, dev, gen)
    m_o, m_r = row_buffers(shapes, dev), row_buffers(shapes, dev)
    got = ops.sumsq(g, w, adaptive=True, eta=0.01, centralize=True, row_means=m_o)
    want = REF.sumsq(g, w, adaptive=True, eta=0.01, centralize=True, row_means=m_r)
    assert_reduction(got, want, want.item(), dtype, "sumsq", "cuda")
    assert_lists(m_o, m_r, "row_means", tol=ROW_MEANS[dtype])
    assert_reduction(ops.dot(g, w), REF.dot(g, w), dot_scale(g, w), dtype, "dot", "cuda")
    s = [torch.empty_like(x) for x in w]
    w_o, w_r, s_r = clones(w), clones(w), [torch.empty_like(x) for x in w]
    scale = torch.tensor(0.3, device=dev)
    ops.perturb(w_o, g, s, scale, adaptive=False, eta=0.0, row_means=m_r)
    REF.perturb(w_r, g, s_r, scale, adaptive=False, eta=0.0, row_means=m_r)
    assert_lists(w_o, w_r, "params", backend="cuda")
    b_o, b_r = [torch.zeros_like(x) for x in w], [torch.zeros_like(x) for x in w]
    kw = dict(lr=0.1, weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=True,
              maximize=False, init_buffers=True)
    ops.restore_sgd(w_o, s, g, b_o, **kw)
    REF.restore_sgd(w_r, s_r, g, b_r, **kw)
    assert_lists(w_o, w_r, "params after restore_sgd", backend="cuda")
    assert_lists(b_o, b_r, "momentum_buffers", backend="cuda")


# -- cpu ----------------------------------------------------------------------------------------
def test_cpu_triad_helper():
    """The bandwidth probe of bench/bench_cpu.py computes what it claims."""
    if "cpu" not in FAST_BACKENDS:
        pytest.skip("cpu is not among the backends tested")
    from sharpopt._build import load_extension

    require_backend("cpu")
    gen = torch.Generator().manual_seed(11)
    b, c = torch.randn(3 * 2 ** 16 + 5, generator=gen), torch.randn(3 * 2 ** 16 + 5, generator=gen)
    a = torch.empty_like(b)
    load_extension("cpu").triad(a, b, c, 0.5)
    assert_close(a, b + 0.5 * c, "triad", pass_tol(torch.float32, "cpu"))


# -- triton: tables, launches, caching and CUDA-graph capture ------------------------------------
@pytest.fixture
def triton_target():
    if "triton" not in FAST_BACKENDS:
        pytest.skip("triton is not among the backends tested")
    t = Target("triton")
    if INTERPRET and not tables.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 was set after sharpopt.kernels was imported; "
                           "set it in the environment of the pytest process")
    return t


def test_triton_reductions_split_invariant(triton_target, monkeypatch):
    """The partials keep their order however the plan is split over launches."""
    ops, dev = triton_target.ops, triton_target.device
    shapes = SHAPE_SETS["edges"]
    gen = torch.Generator().manual_seed(5)
    grads, params = rand(shapes, torch.float32, dev, gen), rand(shapes, torch.float32, dev, gen)
    kw = dict(adaptive=True, eta=0.0, centralize=True, row_means=row_buffers(shapes, dev))
    first = ops.sumsq(grads, params, **kw)
    monkeypatch.setattr(tables, "MAX_TENSORS", 2)
    monkeypatch.setattr(tables, "MAX_BLOCKS", 3)
    split = ops.sumsq(grads, params, **kw)
    assert _bits(split).item() == _bits(first).item(), f"{split.item()!r} != {first.item()!r}"


def test_triton_plans_are_cached_and_split(triton_target, monkeypatch):
    gen = torch.Generator().manual_seed(60)
    shapes = [(CH * 3 + 5,)] + flat_shapes()
    xs = rand(shapes, torch.float32, triton_target.device, gen)
    one = tables.plan("flat", [xs])
    assert tables.plan("flat", [xs]) is one, "a second call should reuse the cached plan"
    assert len(one.launches) == 1
    assert tables.plan("flat", [clones(xs)]) is not one, "new allocations need a new plan"
    monkeypatch.setattr(tables, "MAX_TENSORS", 3)
    monkeypatch.setattr(tables, "MAX_BLOCKS", 2)
    split = tables.plan("flat", [xs])
    assert len(split.launches) >= 4 and split.nblocks == one.nblocks
    assert all(ln.ntensors <= 3 and ln.nblocks <= 2 for ln in split.launches)
    assert [ln.first for ln in split.launches] == \
        [sum(x.nblocks for x in split.launches[:i]) for i in range(len(split.launches))]
    rows = tables.plan("rows", [rand(row_shapes(), torch.float32, triton_target.device, gen)])
    assert len({ln.cols for ln in rows.launches}) >= 3, "one launch per column tile expected"


def test_triton_new_addresses_reuse_the_layout_and_write_every_address(triton_target,
                                                                       monkeypatch):
    """New tensors of the same sizes (new gradients after zero_grad(set_to_none=True)) get a
    new plan built on the cached launch layout: every address word is the new tensor's,
    every other word is the first plan's, and a new tensor the kernels cannot walk is
    still refused."""
    monkeypatch.setattr(tables, "MAX_TENSORS", 3)     # several launches, one partial
    gen = torch.Generator().manual_seed(61)
    shapes = [(CH * 3 + 5,)] + flat_shapes()
    dev = triton_target.device
    xs, ys = rand(shapes, torch.float32, dev, gen), rand(shapes, torch.float32, dev, gen)
    one = tables.plan("flat", [xs, ys, None])
    layouts = len(tables._layouts)
    new = clones(xs)
    two = tables.plan("flat", [new, ys, None])
    assert two is not one and len(tables._layouts) == layouts, "the layout should be reused"
    assert [ln.first for ln in two.launches] == [ln.first for ln in one.launches]
    for k, (a, b) in enumerate(zip(one.launches, two.launches)):
        n = a.ntensors
        wa, wb = a.table.cpu(), b.table.cpu()
        assert torch.equal(wa[3 * n:], wb[3 * n:]), f"launch {k}: sizes or blocks changed"
        assert torch.equal(wa[n:2 * n], wb[n:2 * n]), f"launch {k}: the unchanged list's row"
        assert not wb[2 * n:3 * n].any(), f"launch {k}: an absent list must read 0"
        got = wb[:n].tolist()
        assert len(set(got) & set(wa[:n].tolist())) == 0, f"launch {k}: an old address left"
        assert set(got) <= {t.data_ptr() for t in new}, f"launch {k}: unknown address"
    assert sorted(a for ln in two.launches for a in ln.table.cpu()[:ln.ntensors].tolist()) \
        == sorted(t.data_ptr() for t in new if t.numel()), \
        "each new tensor's address exactly once (empty tensors have no program)"
    strided = list(clones(xs))
    strided[2] = torch.empty(2 * strided[2].numel(), device=dev)[::2].view_as(strided[2])
    with pytest.raises(ValueError, match="tensor 2 of a pass"):
        tables.plan("flat", [xs, strided, None])


def test_triton_every_pass_with_split_launches(triton_target, monkeypatch):
    """More tensors than one table holds, and a tensor whose chunks span launches."""
    ops, dev = triton_target.ops, triton_target.device
    monkeypatch.setattr(tables, "MAX_TENSORS", 3)
    monkeypatch.setattr(tables, "MAX_BLOCKS", 4)
    dtype = torch.float32
    shapes = [(CH * 5 + 3,)] + flat_shapes() + row_shapes()
    gen = torch.Generator().manual_seed(70)
    assert len(tables.plan("flat", [rand(shapes, dtype, dev, gen)]).launches) > 2
    params, grads, saved = (rand(shapes, dtype, dev, gen) for _ in range(3))
    m_ref, m_got = row_buffers(shapes, dev), row_buffers(shapes, dev)
    want = REF.sumsq(grads, params, adaptive=True, eta=0.0, centralize=True, row_means=m_ref)
    got = ops.sumsq(grads, params, adaptive=True, eta=0.0, centralize=True, row_means=m_got)
    assert_reduction(got, want, want.item(), dtype, "split sumsq", "triton")
    assert_lists(m_got, m_ref, "split sumsq, row means", tol=ROW_MEANS[dtype])
    assert_reduction(ops.dot(grads, params), REF.dot(grads, params), dot_scale(grads, params),
                     dtype, "split dot", "triton")
    finite_means = [None if m is None else torch.nan_to_num(m) for m in m_ref]
    p_ref, s_ref, p_got, s_got = clones(params), clones(saved), clones(params), clones(saved)
    REF.perturb(p_ref, grads, s_ref, 0.3, adaptive=True, eta=0.01, row_means=finite_means)
    ops.perturb(p_got, grads, s_got, 0.3, adaptive=True, eta=0.01, row_means=finite_means)
    assert_lists(p_got, p_ref, "split perturb, params", backend="triton")
    assert_lists(s_got, s_ref, "split perturb, saved", tol="bits")
    ops.restore(p_got, s_got)
    assert_lists(p_got, s_got, "split restore", tol="bits")
    out_ref, out_got = clones(params), clones(params)
    REF.lincomb(out_ref, [grads, params, saved], [0.5, -2.0, 1.5])
    ops.lincomb(out_got, [grads, params, saved], [0.5, -2.0, 1.5])
    assert_lists(out_got, out_ref, "split lincomb", backend="triton")


@pytest.fixture
def fresh_cache(triton_target, monkeypatch):
    """An empty plan cache of 2 entries and no captured plans, restored afterwards."""
    monkeypatch.setattr(tables, "_cache", type(tables._cache)())
    monkeypatch.setattr(tables, "_captured", {})
    monkeypatch.setattr(tables, "CACHE_SIZE", 2)
    return triton_target


def _fake_capture(monkeypatch, on: bool):
    """What ``plan`` sees inside ``torch.cuda.graph``: an initialised context whose
    current stream captures (no GPU needed: both queries are replaced)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: on)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: on)


def _plain(shapes, seed, dev):
    return rand(shapes, torch.float32, dev, torch.Generator().manual_seed(seed))


def test_triton_lru_evicts_plans_outside_a_capture(fresh_cache):
    dev = fresh_cache.device
    sets = [_plain([(5 + k,), (CH + k,)], 120 + k, dev) for k in range(3)]
    first = tables.plan("flat", [sets[0]])
    tables.plan("flat", [sets[1]])
    tables.plan("flat", [sets[2]])
    assert len(tables._cache) == 2, f"LRU of 2 holds {len(tables._cache)} plans"
    assert tables.plan("flat", [sets[0]]) is not first, "the oldest plan should be evicted"


def test_triton_plan_built_during_a_capture_is_kept_past_eviction(fresh_cache, monkeypatch):
    dev = fresh_cache.device
    xs = _plain([(7,), (CH + 3,)], 130, dev)
    _fake_capture(monkeypatch, True)
    captured = tables.plan("flat", [xs])
    assert tables.plan("flat", [xs]) is captured
    _fake_capture(monkeypatch, False)
    words = [ln.table.clone() for ln in captured.launches]
    for k in range(2 * tables.CACHE_SIZE + 1):   # fill and overflow the LRU
        tables.plan("flat", [_plain([(3 + k,)], 140 + k, dev)])
    assert tables.plan("flat", [xs]) is captured, \
        "a plan a captured graph may use was dropped by the LRU"
    for ln, w in zip(captured.launches, words):
        assert torch.equal(ln.table, w), "a captured plan's table changed"
    assert tables.release_captured_plans() == 1
    assert tables.plan("flat", [xs]) is not captured


def test_triton_cached_plan_used_during_a_capture_moves_out_of_the_lru(fresh_cache, monkeypatch):
    """The warm-up step builds the plan eagerly; the capture reuses it, and from then on
    the graph holds its table's address, so eviction must not free it."""
    dev = fresh_cache.device
    xs = _plain([(9,), (2 * CH + 1,)], 150, dev)
    warm = tables.plan("flat", [xs])
    _fake_capture(monkeypatch, True)
    assert tables.plan("flat", [xs]) is warm
    _fake_capture(monkeypatch, False)
    assert list(tables._captured.values()) == [warm] and len(tables._cache) == 0
    for k in range(2 * tables.CACHE_SIZE + 1):
        tables.plan("flat", [_plain([(3 + k,)], 160 + k, dev)])
    assert tables.plan("flat", [xs]) is warm


def test_triton_passes_run_with_plans_built_during_a_capture(fresh_cache, monkeypatch):
    """A whole pass under the faked capture flag gives the reference's numbers (the
    tables built on a miss during a capture are the same tables)."""
    ops, dev = fresh_cache.ops, fresh_cache.device
    shapes = [(CH + B + 3,), (5, 7), (3,)]
    gen = torch.Generator().manual_seed(170)
    params, grads, saved = (rand(shapes, torch.float32, dev, gen) for _ in range(3))
    p_ref, s_ref, p_got, s_got = clones(params), clones(saved), clones(params), clones(saved)
    REF.perturb(p_ref, grads, s_ref, 0.3, adaptive=False, eta=0.0)
    _fake_capture(monkeypatch, True)
    ops.perturb(p_got, grads, s_got, 0.3, adaptive=False, eta=0.0)
    _fake_capture(monkeypatch, False)
    assert len(tables._captured) == 1 and len(tables._cache) == 0
    assert_lists(p_got, p_ref, "perturb with a plan built during a capture, params",
                 backend="triton")
    assert_lists(s_got, s_ref, "perturb with a plan built during a capture, saved", tol="bits")


def test_triton_sgd_first_step_is_a_runtime_argument(triton_target):
    """The first SGD step (buffer initialised to d) must not be a compile-time switch:
    the second step would compile a new variant inside a CUDA-graph capture."""
    import inspect

    import triton.language as tl
    from sharpopt.kernels import restore_update
    kernel = restore_update._sgd_kernel
    params = inspect.signature(kernel.fn).parameters
    assert "INIT" not in params, "INIT is a constexpr again"
    assert "init" in params and params["init"].annotation is not tl.constexpr
    if hasattr(kernel, "params"):       # compiled: a JITFunction
        unspecialised = [p.name for p in kernel.params if p.do_not_specialize]
    else:                               # the interpreter's wrapper keeps jit's arguments
        unspecialised = kernel.kwargs["do_not_specialize"]
    assert "init" in unspecialised, \
        "init must not be specialised on its value (1 would compile a separate variant)"
