"""The ``triton`` backend's passes against ``reference``, pass by pass.

Runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment
before Triton is imported; CI runs this file in its own pytest process that way), or on
CUDA tensors when a GPU is present and the interpreter is off. Sizes are defined from the
kernels' own vector and chunk lengths so that both modes cover: a tensor shorter than one
vector, a tail, several chunks, empty tensors, rows longer than one column tile and more
rows than one tile, and (with the table limits lowered) plans split over several launches.
"""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("needs a CUDA GPU, or TRITON_INTERPRET=1 set before Triton is imported "
                "(run this file in its own pytest process)", allow_module_level=True)

pytest.importorskip("triton")

from sharpopt.backends import reference  # noqa: E402
from sharpopt.backends import triton as triton_backend  # noqa: E402
from sharpopt.kernels import tables  # noqa: E402

# Empty rows divide 0 by 0 on purpose (a nan mean, as torch's); numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

REF = reference.load()
OPS = triton_backend.load()

if INTERPRET and not tables.INTERPRET:
    raise RuntimeError("TRITON_INTERPRET=1 was set after sharpopt.kernels was imported; "
                       "set it in the environment of the pytest process")

# Elementwise passes mirror the reference's operations one by one (no FMA contraction;
# bf16 rounded to nearest even once), so they match to the last bit on every element we
# have seen; the tolerance allows one rounding step of the stored dtype, in case a GPU's
# libdevice and the CPU's eager kernels round an intermediate differently.
ELEMENTWISE_TOL = {                      # (rtol, atol)
    torch.float32: (2 ** -23, 1e-30),
    torch.float64: (2 ** -52, 1e-300),
    torch.float16: (2 ** -10, 2 ** -24),
    torch.bfloat16: (2 ** -7, 2 ** -133),
}
# Reductions differ from the reference only in summation order: relative to the sum of
# the absolute values of the terms, a few units of the accumulation type times log2(n).
REDUCE_RTOL = {
    torch.float32: 1e-6,
    torch.bfloat16: 1e-6,   # inputs are exact in fp32, the accumulation is fp32
    torch.float16: 1e-6,
    torch.float64: 1e-14,
}
# Row means are one short fp32 (fp64) sum each.
MEAN_TOL = {torch.float32: (1e-6, 1e-7), torch.bfloat16: (1e-6, 1e-7),
            torch.float16: (1e-6, 1e-7), torch.float64: (1e-6, 1e-7)}  # stored as fp32

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
B, CH = tables.BLOCK, tables.CHUNK


def flat_shapes():
    """Odd 1-D and n-D sizes: shorter than a vector, a vector plus a tail, several
    chunks, empty, 0-dim; none a power of two."""
    return [(1,), (3,), (B - 1,), (CH + B + 3,), (2 * CH + 7,), (0,), (), (5, 7),
            (4, 3, 3, 3), (2, 0), (0, 4)]


def row_shapes():
    """Shapes whose rows cover the row kernel's cases: rows longer than MAX_COLS (a loop
    over columns), more rows than one tile, one row, rows of length 1, empty rows."""
    long_cols = 2 * tables.MAX_COLS + 3
    many_rows = 2 * tables.rows_per_tile(tables.cols_for(3)) + 1
    mid_cols = 2 * tables.MIN_COLS + 1      # a column tile between the two clamps
    return [(5, long_cols), (many_rows, 3), (2, mid_cols), (1, 11), (6, 1), (3, 2, 3),
            (4, 1, 3, 3), (2, 0), (7,), ()]


def make(shapes, dtype, seed, scale=1.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale + offset)
            .to(dtype).to(DEVICE) for s in shapes]


def clones(ts):
    return [t.clone() for t in ts]


def means_for(shapes, dtype=torch.float32, fill=float("nan")):
    return [torch.full((s[0],), fill, dtype=dtype, device=DEVICE) if len(s) > 1 else None
            for s in shapes]


def assert_tensors(got, want, where, tol=None, equal_nan=False):
    """Every tensor of ``got`` close to ``want`` (exactly equal when ``tol == "bits"``)."""
    assert len(got) == len(want), f"{where}: {len(got)} tensors, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        what = f"{where}, tensor {i} of shape {tuple(w.shape)} ({w.dtype})"
        assert g.shape == w.shape and g.dtype == w.dtype, \
            f"{what}: got {tuple(g.shape)} {g.dtype}"
        if tol == "bits":
            gb, wb = _bits(g), _bits(w)
            bad = (gb != wb).nonzero()
            assert bad.numel() == 0, (
                f"{what}: {bad.shape[0]} of {w.numel()} elements differ bitwise, first at "
                f"{tuple(bad[0].tolist())}: got {g[tuple(bad[0])].item()!r}, expected "
                f"{w[tuple(bad[0])].item()!r}")
            continue
        rtol, atol = tol or ELEMENTWISE_TOL[w.dtype]
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=rtol, atol=atol, equal_nan=equal_nan,
                                   msg=lambda m: f"{what}: {m}")


def _bits(t):
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(view).cpu()


def assert_reduction(got, want, scale, dtype, where):
    assert got.shape == () and got.dtype == want.dtype, \
        f"{where}: got {tuple(got.shape)} {got.dtype}, expected () {want.dtype}"
    err = abs(got.item() - want.item())
    bound = REDUCE_RTOL[dtype] * max(scale, 1e-30)
    assert err <= bound, (f"{where}: got {got.item()!r}, expected {want.item()!r}, "
                          f"error {err:.3g} > {bound:.3g} (rtol {REDUCE_RTOL[dtype]} of "
                          f"sum |terms| = {scale:.6g})")


# -- reductions ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("centralize", [False, True])
@pytest.mark.parametrize("with_means", [False, True])
def test_sumsq(dtype, adaptive, centralize, with_means):
    shapes = flat_shapes()[:5] + row_shapes()
    # An offset makes the rows' means large against their spread: centring must not
    # cancel catastrophically.
    grads = make(shapes, dtype, 1, offset=3.0)
    params = make(shapes, dtype, 2)
    m_ref = means_for(shapes) if with_means else None
    m_got = means_for(shapes) if with_means else None
    where = f"sumsq {dtype} adaptive={adaptive} centralize={centralize} means={with_means}"
    want = REF.sumsq(grads, params, adaptive=adaptive, eta=0.01, centralize=centralize,
                     row_means=m_ref)
    got = OPS.sumsq(clones(grads), clones(params), adaptive=adaptive, eta=0.01,
                    centralize=centralize, row_means=m_got)
    assert_reduction(got, want, want.item(), dtype, where)
    if with_means:
        # empty rows give nan means, as torch's mean of nothing
        assert_tensors([m for m in m_got if m is not None], [m for m in m_ref if m is not None],
                       where + ", row means", tol=MEAN_TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dot(dtype):
    shapes = flat_shapes()
    xs, ys = make(shapes, dtype, 3), make(shapes, dtype, 4)
    want = REF.dot(xs, ys)
    got = OPS.dot(xs, ys)
    scale = REF.dot([x.abs() for x in xs], [y.abs() for y in ys]).item()
    assert_reduction(got, want, scale, dtype, f"dot {dtype}")
    # x with itself (aliased operands) is sumsq
    assert_reduction(OPS.dot(xs, xs), REF.dot(xs, xs), REF.dot(xs, xs).item(), dtype,
                     f"dot {dtype}, x with itself")


def test_reductions_of_nothing():
    for got in (OPS.sumsq([], [], adaptive=False, eta=0.0, centralize=False), OPS.dot([], [])):
        assert got.shape == () and got.item() == 0.0
    empty = [torch.empty(0, device=DEVICE), torch.empty(2, 0, device=DEVICE)]
    got = OPS.sumsq(empty, empty, adaptive=True, eta=0.1, centralize=True)
    assert got.item() == 0.0 and got.device.type == DEVICE.type


def test_reductions_are_deterministic_and_split_invariant(monkeypatch):
    shapes = flat_shapes() + row_shapes()
    grads, params = make(shapes, torch.float32, 5), make(shapes, torch.float32, 6)
    kw = dict(adaptive=True, eta=0.0, centralize=True, row_means=means_for(shapes))
    first = OPS.sumsq(grads, params, **kw)
    again = OPS.sumsq(grads, params, **kw)
    assert _bits(first).item() == _bits(again).item(), f"{first.item()!r} != {again.item()!r}"
    # The partials keep their order however the plan is split over launches.
    monkeypatch.setattr(tables, "MAX_TENSORS", 2)
    monkeypatch.setattr(tables, "MAX_BLOCKS", 3)
    split = OPS.sumsq(grads, params, **kw)
    assert _bits(split).item() == _bits(first).item(), f"{split.item()!r} != {first.item()!r}"


# -- elementwise passes -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_perturb(dtype, save, adaptive, centred, scale_kind):
    shapes = flat_shapes() + row_shapes()
    params, grads, saved = make(shapes, dtype, 7), make(shapes, dtype, 8), make(shapes, dtype, 9)
    means = [None if m is None else torch.randn(m.shape, device=DEVICE)
             for m in means_for(shapes)] if centred else None
    scale = -0.37 if scale_kind == "float" else torch.tensor(0.21, device=DEVICE)
    p_ref, s_ref = clones(params), clones(saved)
    p_got, s_got = clones(params), clones(saved)
    REF.perturb(p_ref, grads, s_ref, scale, adaptive=adaptive, eta=0.01, row_means=means,
                save=save)
    OPS.perturb(p_got, grads, s_got, scale, adaptive=adaptive, eta=0.01, row_means=means,
                save=save)
    where = f"perturb {dtype} save={save} adaptive={adaptive} centred={centred} {scale_kind}"
    assert_tensors(s_got, s_ref, where + ", saved", tol="bits")
    assert_tensors(p_got, p_ref, where + ", params")


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bit_exact(dtype):
    shapes = flat_shapes()
    saved = make(shapes, dtype, 10)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40,
                            -1e-45], dtype=torch.float64).to(dtype).to(DEVICE)
    if dtype in (torch.float32, torch.float64):
        # a NaN with a payload must survive too
        special[0] = special[:1].view(torch.int32 if dtype == torch.float32 else torch.int64)\
            .add(12345).view(dtype)[0]
    saved.append(special)
    params = make(shapes, dtype, 11) + [torch.zeros_like(special)]
    OPS.restore(params, saved)
    assert_tensors(params, saved, f"restore {dtype}", tol="bits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nterms", [1, 2, 3])
@pytest.mark.parametrize("coef_kind", ["float", "tensor", "mixed"])
@pytest.mark.parametrize("alias", [None, 0, "last"])
def test_lincomb(dtype, nterms, coef_kind, alias):
    shapes = flat_shapes()[:6]
    xs = [make(shapes, dtype, 20 + k) for k in range(nterms)]
    values = [0.7, -1.3, 2.5][:nterms]
    coefs = [torch.tensor(v, device=DEVICE) if coef_kind == "tensor" or
             (coef_kind == "mixed" and k % 2) else v for k, v in enumerate(values)]
    if alias is None:
        out_ref, out_got = make(shapes, dtype, 30), make(shapes, dtype, 30)
        xs_ref, xs_got = xs, xs
    else:
        k = 0 if alias == 0 else nterms - 1
        xs_ref = [clones(x) for x in xs]
        xs_got = [clones(x) for x in xs]
        out_ref, out_got = xs_ref[k], xs_got[k]
    REF.lincomb(out_ref, xs_ref, coefs)
    OPS.lincomb(out_got, xs_got, coefs)
    assert_tensors(out_got, out_ref, f"lincomb {dtype} terms={nterms} {coef_kind} "
                                     f"out aliases {alias}")


def test_lincomb_rejects_bad_term_counts():
    x = [torch.ones(3, device=DEVICE)]
    for xs, coefs in (([], []), ([x] * 4, [1.0] * 4), ([x, x], [1.0])):
        with pytest.raises(ValueError):
            OPS.lincomb(x, xs, coefs)


SGD_CASES = [  # (momentum, dampening, nesterov)
    (0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.0, True), (0.8, 0.25, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum,dampening,nesterov", SGD_CASES)
@pytest.mark.parametrize("with_saved", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("init_buffers", [True, False])
def test_restore_sgd(dtype, momentum, dampening, nesterov, with_saved, weight_decay, maximize,
                     init_buffers):
    shapes = flat_shapes()[:6]
    params, saved, grads = make(shapes, dtype, 40), make(shapes, dtype, 41), make(shapes, dtype, 42)
    bufs = make(shapes, dtype, 43) if momentum else []
    state = {}
    for name, ops in (("ref", REF), ("got", OPS)):
        p, b = clones(params), clones(bufs)
        ops.restore_sgd(p, clones(saved) if with_saved else None, grads, b, lr=0.1,
                        weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                        nesterov=nesterov, maximize=maximize, init_buffers=init_buffers)
        state[name] = (p, b)
    where = (f"restore_sgd {dtype} momentum={momentum} dampening={dampening} "
             f"nesterov={nesterov} saved={with_saved} wd={weight_decay} maximize={maximize} "
             f"init={init_buffers}")
    assert_tensors(state["got"][0], state["ref"][0], where + ", params")
    assert_tensors(state["got"][1], state["ref"][1], where + ", momentum buffers")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("with_saved", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
def test_restore_adam(dtype, decoupled, amsgrad, with_saved, maximize):
    shapes = flat_shapes()[:6]
    params, saved, grads = make(shapes, dtype, 50), make(shapes, dtype, 51), make(shapes, dtype, 52)
    m0 = make(shapes, dtype, 53, scale=0.1)
    v0 = [x.abs() for x in make(shapes, dtype, 54, scale=0.01)]
    vmax0 = [x.abs() for x in make(shapes, dtype, 55, scale=0.01)] if amsgrad else []
    state = {}
    for name, ops in (("ref", REF), ("got", OPS)):
        p, m, v, vmax = clones(params), clones(m0), clones(v0), clones(vmax0)
        ops.restore_adam(p, clones(saved) if with_saved else None, grads, m, v, vmax, step=3,
                         lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                         decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)
        state[name] = (p, m, v, vmax)
    where = (f"restore_adam {dtype} decoupled={decoupled} amsgrad={amsgrad} "
             f"saved={with_saved} maximize={maximize}")
    for k, what in enumerate(("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")):
        assert_tensors(state["got"][k], state["ref"][k], f"{where}, {what}")


# -- tables, launches and several calls ---------------------------------------------------

def test_plans_are_cached_and_split(monkeypatch):
    shapes = [(CH * 3 + 5,)] + flat_shapes()
    xs = make(shapes, torch.float32, 60)
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
    rows = tables.plan("rows", [make(row_shapes(), torch.float32, 61)])
    assert len({ln.cols for ln in rows.launches}) >= 3, "one launch per column tile expected"


def test_every_pass_with_split_launches(monkeypatch):
    """More tensors than one table holds, and a tensor whose chunks span launches."""
    monkeypatch.setattr(tables, "MAX_TENSORS", 3)
    monkeypatch.setattr(tables, "MAX_BLOCKS", 4)
    dtype = torch.float32
    shapes = [(CH * 5 + 3,)] + flat_shapes() + row_shapes()
    assert len(tables.plan("flat", [make(shapes, dtype, 0)]).launches) > 2
    params, grads, saved = make(shapes, dtype, 70), make(shapes, dtype, 71), make(shapes, dtype, 72)
    m_ref, m_got = means_for(shapes), means_for(shapes)
    want = REF.sumsq(grads, params, adaptive=True, eta=0.0, centralize=True, row_means=m_ref)
    got = OPS.sumsq(grads, params, adaptive=True, eta=0.0, centralize=True, row_means=m_got)
    assert_reduction(got, want, want.item(), dtype, "split sumsq")
    assert_tensors([m for m in m_got if m is not None], [m for m in m_ref if m is not None],
                   "split sumsq, row means", tol=MEAN_TOL[dtype], equal_nan=True)
    assert_reduction(OPS.dot(grads, params), REF.dot(grads, params),
                     REF.dot([g.abs() for g in grads], [p.abs() for p in params]).item(), dtype,
                     "split dot")
    finite_means = [None if m is None else torch.nan_to_num(m) for m in m_ref]
    p_ref, s_ref, p_got, s_got = clones(params), clones(saved), clones(params), clones(saved)
    REF.perturb(p_ref, grads, s_ref, 0.3, adaptive=True, eta=0.01, row_means=finite_means)
    OPS.perturb(p_got, grads, s_got, 0.3, adaptive=True, eta=0.01, row_means=finite_means)
    assert_tensors(p_got, p_ref, "split perturb, params")
    assert_tensors(s_got, s_ref, "split perturb, saved", tol="bits")
    OPS.restore(p_got, s_got)
    assert_tensors(p_got, s_got, "split restore", tol="bits")
    out_ref, out_got = clones(params), clones(params)
    REF.lincomb(out_ref, [grads, params, saved], [0.5, -2.0, 1.5])
    OPS.lincomb(out_got, [grads, params, saved], [0.5, -2.0, 1.5])
    assert_tensors(out_got, out_ref, "split lincomb")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_several_sam_steps(dtype, base):
    """GCSAM-like steps chained through the passes, with the scale kept on the device."""
    shapes = [(CH + 5,), (9, 7), (4, 3, 2, 2), (3,)]
    rho, eps = 0.05, 1e-12
    runs = {}
    for name, ops in (("ref", REF), ("got", OPS)):
        params = make(shapes, dtype, 80)
        saved = [torch.empty_like(p) for p in params]
        means = means_for(shapes)
        state = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        for step in range(1, 4):
            grads = make(shapes, dtype, 100 + step)
            norm2 = ops.sumsq(grads, params, adaptive=False, eta=0.0, centralize=True,
                              row_means=means)
            scale = rho / (norm2.sqrt() + eps)
            ops.perturb(params, grads, saved, scale, adaptive=False, eta=0.0, row_means=means)
            g_adv = make(shapes, dtype, 200 + step, scale=0.5)
            if base == "sgd":
                ops.restore_sgd(params, saved, g_adv, state[0], lr=0.1, weight_decay=1e-3,
                                momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
                                init_buffers=step == 1)
            else:
                ops.restore_adam(params, saved, g_adv, state[0], state[1], [], step=step,
                                 lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                                 decoupled=True, amsgrad=False, maximize=False)
        runs[name] = params, state
    # The scale comes from a reduction (summation order differs), so allow a few ulps.
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2 ** -6, 1e-3)}[dtype]
    assert_tensors(runs["got"][0], runs["ref"][0], f"3 steps {base} {dtype}, params", tol=tol)
    assert_tensors(runs["got"][1][0], runs["ref"][1][0], f"3 steps {base} {dtype}, state",
                   tol=tol)


# -- contract details -----------------------------------------------------------------------

def test_supports_and_errors():
    assert OPS.name == "triton" and OPS.fuses_base_update
    assert OPS.supports(DEVICE)
    other = torch.device("cuda") if DEVICE.type == "cpu" else torch.device("cpu")
    assert not OPS.supports(other)
    x = [torch.ones(4, dtype=torch.int32, device=DEVICE)]
    with pytest.raises(TypeError, match="unsupported dtype"):
        OPS.dot(x, x)
    nc = [torch.ones(4, 12, device=DEVICE)[:, ::2]]          # a strided view: not dense
    with pytest.raises(ValueError, match="dense"):
        OPS.sumsq(nc, nc, adaptive=False, eta=0.0, centralize=False)
    tr = [torch.arange(24.0, device=DEVICE).view(4, 6).t()]   # dense, another memory order
    torch.testing.assert_close(OPS.sumsq(tr, tr, adaptive=False, eta=0.0, centralize=False),
                               (tr[0] ** 2).sum())
    with pytest.raises(ValueError, match="row in one block"):
        OPS.sumsq(tr, tr, adaptive=False, eta=0.0, centralize=True,
                  row_means=[torch.zeros(6, device=DEVICE)])
    with pytest.raises(ValueError, match="dim <= 1"):
        OPS.sumsq([torch.ones(3, device=DEVICE)], [torch.ones(3, device=DEVICE)],
                  adaptive=False, eta=0.0, centralize=False,
                  row_means=[torch.zeros(3, device=DEVICE)])


def test_reductions_return_device_tensors_of_the_accumulation_dtype():
    for dtype, acc in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                       (torch.float16, torch.float32), (torch.float64, torch.float64)):
        x = make([(5,)], dtype, 90)
        got = OPS.sumsq(x, x, adaptive=False, eta=0.0, centralize=False)
        assert got.dtype == acc and got.device.type == DEVICE.type, (dtype, got.dtype)


def test_bf16_stores_round_to_nearest_even():
    # fp32 sums exactly half-way between two bf16 neighbours (1 + 2^-8 lies between 1 and
    # 1 + 2^-7): ties go to the even neighbour, as torch and the GPU round.
    one = torch.ones(3, dtype=torch.bfloat16, device=DEVICE)
    x0 = torch.tensor([1.0, 1.0 + 2 ** -7, -1.0], dtype=torch.bfloat16, device=DEVICE)
    x1 = torch.full((3,), 2 ** -8, dtype=torch.bfloat16, device=DEVICE) * torch.tensor(
        [1.0, 1.0, -1.0], dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty_like(one)
    OPS.lincomb([out], [[x0], [x1]], [1.0, 1.0])
    want = (x0.float() + x1.float()).to(torch.bfloat16)
    assert torch.equal(out, want), f"got {out.tolist()}, expected {want.tolist()}"


# -- rows longer than a vector, sizes of the row index ----------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_centred_rows_around_the_vector_length(dtype):
    """perturb finds an element's row with a 32-bit division for rows shorter than a
    vector and a comparison for longer ones: rows of B - 1, B, B + 1 and 2B + 5 columns,
    tensors spanning several chunks and ending in a tail."""
    shapes = [(3, B - 1), (4, B), (5, B + 1), (CH // B + 3, 2 * B + 5), (2, CH + 3)]
    params, grads, saved = make(shapes, dtype, 110), make(shapes, dtype, 111), \
        make(shapes, dtype, 112)
    means = [torch.randn(s[0], device=DEVICE) for s in shapes]
    p_ref, s_ref, p_got, s_got = clones(params), clones(saved), clones(params), clones(saved)
    REF.perturb(p_ref, grads, s_ref, 0.3, adaptive=True, eta=0.01, row_means=means)
    OPS.perturb(p_got, grads, s_got, 0.3, adaptive=True, eta=0.01, row_means=means)
    assert_tensors(s_got, s_ref, f"perturb rows around B {dtype}, saved", tol="bits")
    assert_tensors(p_got, p_ref, f"perturb rows around B {dtype}, params")


# -- table lifetime and CUDA-graph capture -------------------------------------------------

@pytest.fixture
def fresh_cache(monkeypatch):
    """An empty plan cache of 2 entries and no captured plans, restored afterwards."""
    monkeypatch.setattr(tables, "_cache", type(tables._cache)())
    monkeypatch.setattr(tables, "_captured", {})
    monkeypatch.setattr(tables, "CACHE_SIZE", 2)
    return tables


def _fake_capture(monkeypatch, on: bool):
    """What ``plan`` sees inside ``torch.cuda.graph``: an initialised context whose
    current stream captures (no GPU needed: both queries are replaced)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: on)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: on)


def test_lru_evicts_plans_outside_a_capture(fresh_cache):
    sets = [make([(5 + k,), (CH + k,)], torch.float32, 120 + k) for k in range(3)]
    first = tables.plan("flat", [sets[0]])
    tables.plan("flat", [sets[1]])
    tables.plan("flat", [sets[2]])
    assert len(tables._cache) == 2, f"LRU of 2 holds {len(tables._cache)} plans"
    assert tables.plan("flat", [sets[0]]) is not first, "the oldest plan should be evicted"


def test_plan_built_during_a_capture_is_kept_past_eviction(fresh_cache, monkeypatch):
    xs = make([(7,), (CH + 3,)], torch.float32, 130)
    _fake_capture(monkeypatch, True)
    captured = tables.plan("flat", [xs])
    assert tables.plan("flat", [xs]) is captured
    _fake_capture(monkeypatch, False)
    words = [ln.table.clone() for ln in captured.launches]
    for k in range(2 * tables.CACHE_SIZE + 1):   # fill and overflow the LRU
        tables.plan("flat", [make([(3 + k,)], torch.float32, 140 + k)])
    assert tables.plan("flat", [xs]) is captured, \
        "a plan a captured graph may use was dropped by the LRU"
    for ln, w in zip(captured.launches, words):
        assert torch.equal(ln.table, w), "a captured plan's table changed"
    assert tables.release_captured_plans() == 1
    assert tables.plan("flat", [xs]) is not captured


def test_cached_plan_used_during_a_capture_moves_out_of_the_lru(fresh_cache, monkeypatch):
    """The warm-up step builds the plan eagerly; the capture reuses it, and from then on
    the graph holds its table's address, so eviction must not free it."""
    xs = make([(9,), (2 * CH + 1,)], torch.float32, 150)
    warm = tables.plan("flat", [xs])
    _fake_capture(monkeypatch, True)
    assert tables.plan("flat", [xs]) is warm
    _fake_capture(monkeypatch, False)
    assert list(tables._captured.values()) == [warm] and len(tables._cache) == 0
    for k in range(2 * tables.CACHE_SIZE + 1):
        tables.plan("flat", [make([(3 + k,)], torch.float32, 160 + k)])
    assert tables.plan("flat", [xs]) is warm


def test_passes_run_with_plans_built_during_a_capture(fresh_cache, monkeypatch):
    """A whole pass under the faked capture flag gives the reference's numbers (the
    tables built on a miss during a capture are the same tables)."""
    shapes = [(CH + B + 3,), (5, 7), (3,)]
    params, grads, saved = make(shapes, torch.float32, 170), make(shapes, torch.float32, 171), \
        make(shapes, torch.float32, 172)
    p_ref, s_ref, p_got, s_got = clones(params), clones(saved), clones(params), clones(saved)
    REF.perturb(p_ref, grads, s_ref, 0.3, adaptive=False, eta=0.0)
    _fake_capture(monkeypatch, True)
    OPS.perturb(p_got, grads, s_got, 0.3, adaptive=False, eta=0.0)
    _fake_capture(monkeypatch, False)
    assert len(tables._captured) == 1 and len(tables._cache) == 0
    assert_tensors(p_got, p_ref, "perturb with a plan built during a capture, params")
    assert_tensors(s_got, s_ref, "perturb with a plan built during a capture, saved",
                   tol="bits")


def test_sgd_first_step_is_a_runtime_argument():
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
