"""Compiled-code check of the Triton kernels, without a GPU.

    python -m bench.ptx_check                  # the installed Triton, sm_90 and sm_80
    python -m bench.ptx_check --all            # every variant, not a covering subset
    PYTHONPATH=<dir> python -m bench.ptx_check # another Triton installed in <dir>

The oldest supported Triton goes side by side with the installed one (torch is not
touched; the check imports torch, which works with either)::

    pip install --no-deps --target <dir> triton==3.6.0
    SHARPOPT_EXTRA_TRITON=<dir> python -m pytest -q tests/test_compiled.py

By default each flat kernel's switches are covered (every dtype and alignment, all
switches off and all on) and the row kernel is compiled in every variant (all switches
at every column tile): 388 compilations, one to two minutes per Triton on two cores with
a cold cache; ``--all`` compiles the launchers' whole product (1124, about 6 minutes).

Compiles the kernel variants the launchers of ``sharpopt.kernels`` can request (their
compile-time switches: dtype, alignment of the tables, mode switches, row-plan column
tiles) ahead of time with ``triton.compile`` for each target, runs the ``ptxas`` shipped
with that Triton with ``-v`` on the PTX, and asserts:

* **per-element tail guards** -- a masked access can only be right when each element
  has its own predicate (the mask is ``offset < numel`` with an arbitrary numel): no
  predicated vector access (``@%p ld/st.global.v2/.v4``); in 16-bit kernels no
  predicated 32-bit access (a packed pair) unless the same predicate also guards a
  16-bit access (the fp32 row means of perturb are loaded per element; fp32 partial
  sums and means are stored alone, so stores count only in kernels that store 16-bit
  data); and a flat
  kernel's tail uses at least as many distinct predicates as a thread has elements;
* **16-byte accesses in the unmasked main loops** of the flat kernels when the tables
  are aligned: inside the loop (label to backward branch) at least ``streams x bytes
  per thread / 16`` 16-byte loads and stores;
* **no vector access at all** when the tables are not aligned (a 16-byte access on an
  unaligned address faults);
* **no local-memory spills** (``ptxas -v``: 0 bytes spill stores and loads).

Prints one line per variant (registers, spills, 16-byte accesses, verdict) and a
summary; exits 1 when any variant breaks a rule. Runs with the interpreter off (the
kernels must be ``triton.jit`` functions): run as a program it removes
``TRITON_INTERPRET`` from its environment before importing ``triton``; imported (the
tests import the rules) it changes nothing.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

TARGETS = (90, 80)
# Names of the dtype choices; the element size decides the 16-byte access counts.
DTYPES = ("fp32", "bf16", "fp16", "fp64")
ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


class Variant(NamedTuple):
    name: str             # e.g. "perturb DT=bf16 ALIGNED=1 SAVE=1 ..."
    module: str           # module of sharpopt.kernels
    kernel: str           # kernel function name
    signature: Dict[str, str]   # runtime argument types (constexpr ones filled in later)
    consts: Dict[str, object]   # constexpr values by name ("DT" etc. as dtype names)
    dt: str
    flat: bool            # a flat pass: unmasked main loop and a masked tail
    aligned: bool
    loads: int            # data streams read per element in the main loop
    stores: int           # data streams written per element
    #: The kernel also writes one fp32 partial sum per program, after its data (the MSAM
    #: passes: update + the momentum's sum of squares): its last 32-bit store.
    partial_store: bool = False


def _bool_space(names):
    return [dict(zip(names, bits)) for bits in itertools.product((False, True),
                                                                 repeat=len(names))]


def _cover(space: List[dict], full: bool) -> List[dict]:
    """All switch combinations, or a covering pair: all off and all on (every value of
    every switch appears; the heaviest combination decides the registers)."""
    if full or len(space) <= 2:
        return space
    return [space[0], space[-1]]


def variants(full: bool = False) -> List[Variant]:
    """The launchers' compile-time choices. Each kernel's constexpr names are checked
    against the ones enumerated here, so a new switch cannot go unchecked."""
    from sharpopt.kernels import tables as tb
    out: List[Variant] = []
    acc = lambda dt: "fp64" if dt == "fp64" else "fp32"  # noqa: E731
    table = {"table": "*i64", "ntensors": "i32"}
    flat_common = lambda dt, al: dict(DT=dt, ACC=acc(dt), ALIGNED=al,  # noqa: E731
                                      BLOCK=tb.BLOCK, CHUNK=tb.CHUNK)

    def add(module, kernel, sig, consts, dt, flat, aligned, loads, stores, label,
            partial_store=False):
        name = f"{module}.{kernel} {dt} {'aligned' if aligned else 'unaligned'} {label}"
        out.append(Variant(name.strip(), module, kernel, sig, consts, dt, flat, aligned,
                           loads, stores, partial_store))

    for dt, al in itertools.product(DTYPES, (True, False)):
        a = acc(dt)
        # norm._flat_kernel: MODE 0 sumsq, 1 ASAM sumsq, 2 dot
        for mode in (0, 1, 2):
            add("norm", "_flat_kernel",
                {**table, "partials": f"*{a}", "first": "i32", "eta": "fp64"},
                dict(MODE=mode, **flat_common(dt, al)), dt, True, al, 1 + (mode > 0), 0,
                f"MODE={mode}")
        # perturb: scale in device memory or by value; the non-finite guard's flag or none
        space = [dict(s, scale_ptr=p, flag=f) for s in _bool_space(("SAVE", "ADAPTIVE"))
                 for p in (None, f"*{a}") for f in (None, "*fp32")]
        for sw in _cover(space, full):
            sig = {**table, "scale_val": "fp64", "eta": "fp64"}
            consts = dict(SAVE=sw["SAVE"], ADAPTIVE=sw["ADAPTIVE"], **flat_common(dt, al))
            for name in ("scale_ptr", "flag"):
                if sw[name] is None:
                    consts[name] = None
                else:
                    sig[name] = sw[name]
            add("perturb", "_perturb_kernel", sig, consts, dt, True, al, 2,
                1 + sw["SAVE"], _label(sw))
        # restore + SGD / Adam(W), with the guard's flag or without: its one scalar store
        # of found_inf is the kernel's last 32-bit store (as a partial sum's)
        updates = (
            ("_sgd_kernel", ("HAS_SAVED", "MOMENTUM", "NESTEROV", "MAXIMIZE"),
             {**{k: "fp64" for k in ("lr", "wd", "mom", "damp1")}, "init": "i32"},
             lambda sw: (2 + sw["MOMENTUM"], 1 + sw["MOMENTUM"])),
            ("_adam_kernel", ("HAS_SAVED", "DECOUPLED", "AMSGRAD", "MAXIMIZE"),
             {k: "fp64" for k in ("wd", "decay", "beta1c", "beta2", "beta2c", "step_size",
                                   "bc2_sqrt", "eps")},
             lambda sw: (4 + sw["AMSGRAD"], 3 + sw["AMSGRAD"])),
        )
        for kernel, switches, scalars, streams in updates:
            space = [dict(s, flag=f) for s in _bool_space(switches) for f in (None, "*fp32")]
            for sw in _cover(space, full):
                sig = {**table, **scalars}
                consts = dict({k: sw[k] for k in switches}, **flat_common(dt, al))
                if sw["flag"] is None:
                    consts["flag"] = None
                else:
                    sig["flag"] = sw["flag"]
                add("restore_update", kernel, sig, consts, dt, True, al, *streams(sw),
                    _label(sw), partial_store=sw["flag"] is not None)
        # MSAM: move back + SGD / Adam(W) + the momentum's sum of squares (kernels/msam.py);
        # the move-back scale in device memory or by value. HAS_BACK and INIT never come
        # together from the launcher; the all-on cover compiles them together anyway.
        msam_sig = {**table, "partials": f"*{a}", "first": "i32", "back_val": "fp64"}
        space = [dict(s, back_ptr=p) for s in _bool_space(("HAS_BACK", "NESTEROV", "MAXIMIZE",
                                                           "INIT")) for p in (None, f"*{a}")]
        for sw in _cover(space, full):
            sig = {**msam_sig, **{k: "fp64" for k in ("lr", "wd", "mom", "damp1")}}
            consts = dict({k: sw[k] for k in ("HAS_BACK", "NESTEROV", "MAXIMIZE", "INIT")},
                          **flat_common(dt, al))
            if sw["back_ptr"] is None:
                consts["back_ptr"] = None
            else:
                sig["back_ptr"] = sw["back_ptr"]
            add("msam", "_msam_sgd_kernel", sig, consts, dt, True, al, 3 - sw["INIT"], 2,
                _label(sw), partial_store=True)
        space = [dict(s, back_ptr=p) for s in _bool_space(("HAS_BACK", "DECOUPLED", "AMSGRAD",
                                                           "MAXIMIZE")) for p in (None, f"*{a}")]
        for sw in _cover(space, full):
            sig = {**msam_sig, **{k: "fp64" for k in ("wd", "decay", "beta1c", "beta2", "beta2c",
                                                      "step_size", "bc2_sqrt", "eps")}}
            consts = dict({k: sw[k] for k in ("HAS_BACK", "DECOUPLED", "AMSGRAD", "MAXIMIZE")},
                          **flat_common(dt, al))
            if sw["back_ptr"] is None:
                consts["back_ptr"] = None
            else:
                sig["back_ptr"] = sw["back_ptr"]
            add("msam", "_msam_adam_kernel", sig, consts, dt, True, al, 4 + sw["AMSGRAD"],
                3 + sw["AMSGRAD"], _label(sw), partial_store=True)
        # lincomb: 1-3 terms, each coefficient a device scalar or a value; COPY (1 term)
        space = []
        for nterms in (1, 2, 3):
            for ptrs in itertools.product((None, f"*{a}"), repeat=nterms):
                space.append(dict(NTERMS=nterms, COPY=False, ptrs=ptrs))
        space.append(dict(NTERMS=1, COPY=True, ptrs=(None,)))
        pick = space if full else [space[0], space[-2], space[-1]]
        for sw in pick:
            sig, consts = dict(table), dict(NTERMS=sw["NTERMS"], COPY=sw["COPY"],
                                            **flat_common(dt, al))
            ptrs = list(sw["ptrs"]) + [None] * (3 - len(sw["ptrs"]))
            for k, p in enumerate(ptrs):
                sig[f"c{k}_val"] = "fp64"
                if p is None:
                    consts[f"c{k}_ptr"] = None
                else:
                    sig[f"c{k}_ptr"] = p
            ptr_label = "".join("p" if p else "v" for p in sw["ptrs"])
            add("lincomb", "_lincomb_kernel", sig, consts, dt, True, al,
                sw["NTERMS"], 1, f"NTERMS={sw['NTERMS']} COPY={int(sw['COPY'])} "
                f"coefs={ptr_label}")
    # Row plans: every column tile cols_for() can return.
    cols_choices = []
    c = tb.MIN_COLS
    while c <= tb.MAX_COLS:
        cols_choices.append(c)
        c *= 2
    for dt in DTYPES:
        a = acc(dt)
        space = _bool_space(("ADAPTIVE", "CENTRALIZE"))
        for cols in cols_choices:
            # every combination at every tile: register allocation here is not monotonic
            # in the switches (a lighter variant spilled where the heaviest did not)
            for sw in space:
                add("norm", "_rows_kernel",
                    {**table, "partials": f"*{a}", "first": "i32", "eta": "fp64"},
                    dict(sw, DT=dt, ACC=a, ROWS=tb.rows_per_tile(cols), COLS=cols),
                    dt, False, False, 0, 0, f"COLS={cols} " + _label(sw))
    for a in ("fp32", "fp64"):
        add("norm", "_finish_kernel", {"partials": f"*{a}", "out": f"*{a}", "n": "i32"},
            dict(BLOCK=_finish_block()), a, False, False, 0, 0, "")
    return out


def _finish_block():
    from sharpopt.kernels import norm
    return norm.FINISH_BLOCK


def _label(sw: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else ('p' if v else 'v')}"
                    for k, v in sw.items())


# -- compiling ------------------------------------------------------------------------------

def _compile(v: Variant, sm: int) -> Tuple[str, str]:
    """(PTX, ptxas -v log) of one variant for sm_<sm>."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib
    from sharpopt.kernels import tables as tb
    fn = getattr(importlib.import_module(f"sharpopt.kernels.{v.module}"), v.kernel)
    tl_dt = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
    consts = {k: tl_dt[x] if k in ("DT", "ACC") else x for k, x in v.consts.items()}
    missing = [a for a in fn.arg_names if a not in consts and a not in v.signature]
    extra = [a for a in list(v.consts) + list(v.signature) if a not in fn.arg_names]
    if missing or extra:
        raise RuntimeError(f"{v.name}: the check's variant does not match the kernel's "
                           f"arguments (missing {missing}, unknown {extra}); update "
                           f"bench/ptx_check.py with the launcher")
    signature = {a: "constexpr" if a in consts else v.signature[a] for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", sm, 32), options=tb.launch_options())
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    ptxas, flags = ptxas_command(sm)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([ptxas, *flags, "-v", f"--gpu-name={arch}", path, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{v.name}: ptxas failed: {res.stderr[-2000:]}")
    return ptx, res.stderr + res.stdout


def ptxas_command(sm: int) -> Tuple[str, List[str]]:
    """The ptxas this Triton uses for sm_<sm> and the options it passes that change
    register allocation (no FMA contraction, as ``launch_options`` asks)."""
    import inspect

    from triton.backends.nvidia import compiler as nv
    flags = ["--fmad=false"]
    if "--regAllocOptLevel=2" in inspect.getsource(nv.CUDABackend.make_cubin):
        flags.append("--regAllocOptLevel=2")
    return nv.get_ptxas(sm).path, flags


# -- rules ------------------------------------------------------------------------------

_ACCESS = re.compile(r"^\s*(@!?(%p\d+)\s+)?(ld|st)\.global((?:\.\w+)*)\s")
_VEC = re.compile(r"\.v(\d)")
_WIDTH = re.compile(r"\.[bfsu](\d+)\b")


class Access(NamedTuple):
    line: int
    pred: Optional[str]
    op: str        # "ld" / "st"
    vec: int       # 1, 2 or 4
    bits: int      # width of one vector lane


def accesses(ptx: str) -> List[Access]:
    out = []
    for i, text in enumerate(ptx.splitlines()):
        m = _ACCESS.match(text)
        if not m:
            continue
        mods = m.group(4)
        vec = _VEC.search(mods)
        width = _WIDTH.findall(mods)
        out.append(Access(i, m.group(2), m.group(3), int(vec.group(1)) if vec else 1,
                          int(width[-1]) if width else 0))
    return out


def loop_lines(ptx: str) -> set:
    """Lines inside a loop: from a label to a later branch back to it."""
    lines = ptx.splitlines()
    labels = {}
    inside = set()
    for i, text in enumerate(lines):
        m = re.match(r"^(\$\w+):", text)
        if m:
            labels[m.group(1)] = i
        b = re.search(r"\bbra(?:\.uni)?\s+(\$\w+);", text)
        if b and b.group(1) in labels and labels[b.group(1)] < i:
            inside.update(range(labels[b.group(1)], i + 1))
    return inside


def elements_per_thread() -> int:
    """Elements of one operand a thread holds in a main-loop vector."""
    from sharpopt.kernels import tables as tb
    return tb.BLOCK // (32 * tb.NUM_WARPS)



def check(v: Variant, ptx: str, log: str,
          ept: Optional[int] = None) -> Tuple[List[str], dict]:
    """(broken rules, facts) of one compiled variant; ``ept`` is the elements of one
    operand a thread holds in a main-loop vector (from the compiled-mode block size)."""
    ept = ept or elements_per_thread()
    errors: List[str] = []
    acc = accesses(ptx)
    esize = ESIZE[v.dt]
    # guards
    by_pred: Dict[str, List[Access]] = {}
    for a in acc:
        if a.pred:
            by_pred.setdefault(a.pred, []).append(a)
    for a in acc:
        if a.pred and a.vec > 1:
            errors.append(f"predicated vector access on PTX line {a.line + 1} "
                          f"({a.op}.v{a.vec}.b{a.bits}): one predicate for {a.vec} lanes")
    if esize == 2:
        # 32-bit stores are also the fp32 partial sums and row means: only kernels that
        # store their 16-bit data can store a packed pair, and the one partial sum of a
        # kernel that stores both (partial_store) is its last 32-bit store.
        partial = None
        if v.partial_store:
            partial = max((a.line for a in acc if a.op == "st" and a.bits == 32 and a.vec == 1),
                          default=None)
        for p, group in by_pred.items():
            pairs = [a for a in group if a.bits == 32 and (a.op == "ld" or v.stores)
                     and a.line != partial]
            if pairs and not any(a.bits == 16 for a in group):
                lines = [a.line + 1 for a in pairs]
                errors.append(f"predicate {p} guards 32-bit accesses (PTX lines {lines}) "
                              f"and no 16-bit one: a packed pair of 16-bit elements")
    if v.flat:
        # the masked tail runs in half vectors
        data_preds = {p for p, g in by_pred.items() if any(a.bits in (8 * esize, 32, 16)
                                                          for a in g)}
        if len(data_preds) < ept // 2:
            errors.append(f"tail guarded by {len(data_preds)} predicates for {ept // 2} "
                          f"elements per thread")
    # widths
    inside = loop_lines(ptx)
    wide = lambda a: a.vec * a.bits == 128  # noqa: E731
    ld16 = sum(1 for a in acc if a.line in inside and a.op == "ld" and wide(a) and not a.pred)
    st16 = sum(1 for a in acc if a.line in inside and a.op == "st" and wide(a) and not a.pred)
    if v.flat and v.aligned:
        per_stream = ept * esize // 16
        if ld16 < v.loads * per_stream or st16 < v.stores * per_stream:
            errors.append(f"main loop has {ld16} 16-byte loads and {st16} 16-byte stores, "
                          f"expected >= {v.loads * per_stream} and "
                          f">= {v.stores * per_stream}")
    if not v.aligned and any(a.vec > 1 for a in acc):
        errors.append("vector access in a variant for unaligned tables")
    # registers and spills
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    facts = {"regs": int(regs.group(1)) if regs else -1,
             "spill_st": int(spill.group(1)) if spill else -1,
             "spill_ld": int(spill.group(2)) if spill else -1, "ld16": ld16, "st16": st16}
    if not regs or not spill:
        errors.append(f"could not parse ptxas -v output: {log[-500:]!r}")
    elif facts["spill_st"] or facts["spill_ld"]:
        errors.append(f"spills: {facts['spill_st']} B stored, {facts['spill_ld']} B loaded")
    return errors, facts


def _run_one(job):
    v, sm = job
    try:
        ptx, log = _compile(v, sm)
        errors, facts = check(v, ptx, log)
    except Exception as exc:  # a variant that does not compile breaks the check too
        errors, facts = [f"compile failed: {type(exc).__name__}: {exc}"[:2000]], {}
    return v, sm, errors, facts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true",
                    help="every switch combination, not a covering subset")
    ap.add_argument("--sm", type=int, action="append", help="targets (default 90 and 80)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--filter", default="", help="only variants whose name contains this")
    args = ap.parse_args(argv)

    import multiprocessing

    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from sharpopt.kernels import tables as tb
    if tb.INTERPRET:
        raise SystemExit("sharpopt.kernels was imported with TRITON_INTERPRET=1; run "
                         "this check in its own process")
    print(f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}", flush=True)
    vs = [v for v in variants(args.all) if args.filter in v.name]
    jobs = [(v, sm) for sm in (args.sm or TARGETS) for v in vs]
    t0 = time.time()
    failed, regs = 0, {}
    # fork: the workers inherit the imported modules (no GPU is touched).
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for v, sm, errors, facts in pool.imap(_run_one, jobs, chunksize=4):
            head = f"triton {triton.__version__} sm_{sm} {v.name}"
            stats = (f"regs {facts['regs']} spill {facts['spill_st']}/{facts['spill_ld']} "
                     f"ld16 {facts['ld16']} st16 {facts['st16']}" if facts else "")
            if facts:
                regs.setdefault((sm, v.module + "." + v.kernel), []).append(facts["regs"])
            if errors:
                failed += 1
                print(f"FAIL {head}: {stats}: " + "; ".join(errors), flush=True)
            else:
                print(f"ok   {head}: {stats}", flush=True)
    print(f"registers (min-max) by kernel, triton {triton.__version__}:")
    for (sm, k), r in sorted(regs.items()):
        print(f"  sm_{sm} {k}: {min(r)}-{max(r)} over {len(r)} variants")
    print(f"triton {triton.__version__}: {len(jobs) - failed} of {len(jobs)} variants pass, "
          f"{failed} fail ({time.time() - t0:.0f} s, {args.jobs} processes)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
