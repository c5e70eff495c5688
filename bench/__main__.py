"""``python -m bench``: time one sharpness-aware optimizer step, every provider side by side.

For each case (workload × dtype × algorithm × base optimizer) and each provider
(see :mod:`bench.providers`), on the device present:

1. the reference: sharpopt's ``reference`` backend steps a copy of the parameters once,
   keeping the weights at the perturbed point and after the step;
2. per provider, under the memory tracker: its own copy of the parameters is made and the
   optimizer built ("setup"), one *cold* sample runs (state is created, the compiled
   provider compiles; the weights at the perturbed point and after the sample are
   compared with the reference: column ``diff`` = max |w − w_ref| / max |w_ref − w0|,
   about 1e-4 from fp32 rounding; for bf16/fp16, whose spacing near the weights is as
   large as one update here, the table shows ``diff_ulp``, the largest difference in units
   of the dtype's spacing at the reference value), then one *steady* sample;
3. timing: ``warmup`` + ``repeats`` interleaved rounds; each round times one sample of
   every provider, in a random order of its own (``bench.rounds``: no provider always
   follows the same one), so that bursts of background load hit all providers alike
   (``time.perf_counter``, synchronised on CUDA). One sample is one step (one cycle of
   ``k`` calls for LookSAM, divided by k). A provider that has used ``--budget`` seconds
   stops early and keeps the samples it has (column ``n``).

Gradients: the step needs a fresh gradient after the ascent, as the second backward would
produce. Three gradient sets are made once; before the ascent ``p.grad`` is pointed at set
0, after it at set 1 (and set 2 for CR-SAM's third pass and RBO's inner steps). Pointing
costs no memory traffic; its Python cost is measured alone and printed (it is included in
every provider's time). Between samples, outside the timed region, the sets are copied
back from pristine copies, since GSAM, WSAM and LookSAM write their direction into ``.grad``.

Peak memory added: the high-water mark of allocated bytes above the level before the
optimizer existed (parameters and gradients excluded), during the steady sample; it
includes the state the optimizer keeps (momentum, saved weights, ...) and temporaries.
On CUDA it comes from ``torch.cuda.max_memory_allocated``; on CPU from the allocation and
free events of PyTorch's CPU allocator recorded by ``torch.profiler(profile_memory=True)``
(summed in time order; allocations made outside PyTorch's allocator, e.g. by the C++
runtime, are not seen).

Bandwidth: a copy (``b.copy_(a)``, 8 B per element) and a triad (``a = b + s·c``, 12 B)
on fp32 arrays much larger than the caches, timed at the start (the header line, and the
chart's copy line). The triad is also timed once in every round of every case, beside the
providers: ``%triad`` is a provider's byte-model GB/s over that triad's median, so the two
are measured in the same seconds (a shared machine's bandwidth drifts within minutes).

Host cost (:mod:`bench.bench_host`, ``--no-host`` skips it): the public SAM step on 160 and
1200 one-element tensors, so that only the host's work is timed, in µs per tensor next to
torch's fused and foreach single steps (printed, in the JSON, and as the chart's last panels),
once with the gradients kept from step to step and once with a backward pass before every
optimizer call (``--after-backward``: new gradient tensors, as in training).

MSAM (one gradient per step, no second pass) gets its own table after the cases
(:mod:`bench.bench_msam`): its fused step on every backend next to torch.optim's plain step,
in GB/s of its byte model and %triad (``--no-msam`` skips it).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import datetime as _dt
import os
import statistics
import sys
import time
from typing import Callable, List, Tuple

import torch

import sharpopt

from . import providers as P
from . import report
from .rounds import rounds
from .triad import BYTES_PER_ELEMENT, triads
from .workloads import WORKLOADS, bytes_per_param, make_params

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Compiling a foreach graph over more tensors than this takes minutes on a small CPU;
#: such workloads report the compiled provider as n/a with this reason.
COMPILE_MAX_TENSORS = 300


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _quantiles(xs: List[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": q[1], "q25": q[0], "q75": q[2], "min": xs[0], "max": xs[-1], "n": len(xs)}


# -- bandwidth ceiling ----------------------------------------------------------------
def measure_bandwidth(device: torch.device, n: int, repeats: int) -> dict:
    """Copy and triad GB/s on fp32 arrays of ``n`` elements (best and median)."""
    sync = _sync(device)
    a = torch.empty(n, device=device)
    b = torch.rand(n, device=device)
    kernels = {"copy": (lambda: a.copy_(b), 8),
               "triad": (triads(device, n)["torch"], BYTES_PER_ELEMENT)}
    out = {"elements": n, "array_mb": n * 4 / 1e6}
    for name, (fn, bpe) in kernels.items():
        fn()
        ts = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        out[name] = {"best_gbs": bpe * n / min(ts) / 1e9,
                     "median_gbs": bpe * n / statistics.median(ts) / 1e9}
    return out


# -- memory ---------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop chatter on file descriptor 2."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class MemoryTracker:
    """Run named phases and report, per phase, the allocated bytes at its start and end and
    the high-water mark inside it (all relative to the start of the first phase).

    CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated``. CPU: one
    ``torch.profiler`` session with ``profile_memory=True``; each phase is a
    ``record_function`` range, and the allocator's alloc/free events are summed in time
    order. Everything the phases free is allocated inside the session (the parameters are
    made in the first phase), so no free goes unseen.
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled = device, enabled

    def run(self, phases):
        if not self.enabled:
            for _, fn in phases:
                fn()
            return None
        if self.device.type == "cuda":
            out, origin = {}, None
            for name, fn in phases:
                torch.cuda.synchronize()
                start = torch.cuda.memory_allocated()
                origin = start if origin is None else origin
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                out[name] = {"start": start - origin, "end": torch.cuda.memory_allocated() - origin,
                             "peak": torch.cuda.max_memory_allocated() - origin}
            return out
        from torch.profiler import ProfilerActivity, profile, record_function

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                      profile_memory=True) as prof:
            for name, fn in phases:
                with record_function(f"bench::{name}"):
                    fn()
        events = prof.profiler.kineto_results.events()
        windows = {e.name()[len("bench::"):]: (e.start_ns(), e.end_ns()) for e in events
                   if e.name().startswith("bench::")}
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        out = {}
        for name, _ in phases:
            lo, hi = windows[name]
            level = sum(b for t, b in mem if t < lo)
            start, peak = level, level
            for t, b in mem:
                if lo <= t <= hi:
                    level += b
                    peak = max(peak, level)
            out[name] = {"start": start, "end": level, "peak": peak}
        origin = out[phases[0][0]]["start"]
        return {k: {kk: vv - origin for kk, vv in v.items()} for k, v in out.items()}


# -- one case ----------------------------------------------------------------------------
def _max_diff(ws, refs) -> float:
    return max((w.float() - r.float()).abs().max().item() for w, r in zip(ws, refs))


def _ulp_diff(ws, refs) -> float:
    """max |w − w_ref| in units of the dtype's spacing at the tensor's largest weight."""
    eps = torch.finfo(refs[0].dtype).eps
    return max((w.float() - r.float()).abs().max().item()
               / max(r.float().abs().max().item() * eps, 1e-30) for w, r in zip(ws, refs))


def run_case(args, device, workload: str, dtype_name: str, algo: str, base: str,
             probe: Tuple[Callable[[], None], int], log) -> dict:
    dtype = DTYPES[dtype_name]
    pset = make_params(workload, dtype, device)
    init = pset.clone_state()
    pristine = [[g.clone() for g in gs] for gs in pset.grad_sets]
    sync = _sync(device)
    tracker = MemoryTracker(device, args.memory)
    per_sample = P.calls_per_sample(algo)
    model_bpp = bytes_per_param(algo, base, dtype)   # the benchmark's own k, inner_steps
    model_bytes = model_bpp * pset.n_params

    def reset_grads():
        for gs, ps in zip(pset.grad_sets, pristine):
            torch._foreach_copy_(gs, ps)

    def sample(opt, ps, on_perturbed=None):
        for i in range(per_sample):
            P.run_step(opt, ps, algo, on_perturbed if i == 0 else None)

    # Python cost of handing over the gradients (included in every provider's time)
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        pset.use_grads(0)
        pset.use_grads(1)
        ts.append(time.perf_counter() - t0)
    handover_ms = statistics.median(ts) * 1e3

    compile_why = ""
    if not args.compile:
        compile_why = "skipped in --quick (add --compile; compiling takes tens of seconds a case)" if args.quick \
            else "not requested"
    elif pset.n_tensors > COMPILE_MAX_TENSORS:
        compile_why = (f"skipped: {pset.n_tensors} tensors (> {COMPILE_MAX_TENSORS}); "
                       "compile time grows with the tensor count")
    provs = P.providers(device, dtype, algo, base, compile_=bool(args.compile and not compile_why),
                        compile_why_not=compile_why)
    if args.providers:
        provs = [p for p in provs if p.name in args.providers]

    # sharpopt's reference backend defines the numbers: weights at the perturbed point
    # (two-pass algorithms) and after the first sample
    reset_grads()
    ref_ps = pset.fork(init)
    ref_opt = P._sharpopt(ref_ps.params, algo, base, "reference")
    ref_pert: List[torch.Tensor] = []
    sample(ref_opt, ref_ps, lambda: ref_pert.extend(ref_ps.clone_state()))
    ref_w = ref_ps.clone_state()
    size_e = _max_diff(ref_pert, init) if ref_pert else 0.0
    size_step = _max_diff(ref_w, init)
    del ref_opt, ref_ps

    rows, live = [], []
    for prov in provs:
        row = {"provider": prov.name, "note": prov.note}
        rows.append(row)
        if prov.why_not:
            row["na"] = prov.why_not
            log(f"    {prov.name:<20} n/a: {prov.why_not}")
            continue
        holder = {}
        diffs = []

        def setup(prov=prov, holder=holder):
            holder["ps"] = pset.fork(init)
            if prov.name == "compiled":
                torch._dynamo.reset()
            holder["opt"] = prov.build(holder["ps"].params)

        def check_perturbed(holder=holder, diffs=diffs):
            diffs.append(_max_diff(holder["ps"].params, ref_pert) / max(size_e, 1e-30))

        def cold(holder=holder, check_perturbed=check_perturbed):
            t0 = time.perf_counter()
            sample(holder["opt"], holder["ps"], check_perturbed if ref_pert else None)
            sync()
            holder["cold_s"] = time.perf_counter() - t0
            # compared here, before the steady sample moves the weights on (the
            # temporaries are freed again, so the memory levels are unaffected)
            holder["diff"] = _max_diff(holder["ps"].params, ref_w) / max(size_step, 1e-30)
            holder["diff_ulp"] = _ulp_diff(holder["ps"].params, ref_w)

        def steady(holder=holder):
            reset_grads()
            sample(holder["opt"], holder["ps"])

        try:
            reset_grads()
            gc.collect()    # no frees of earlier providers' garbage inside the windows
            mem = tracker.run([("setup", setup), ("cold", cold), ("steady", steady)])
        except Exception as exc:  # report and go on: one broken provider must not end the run
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            row["na"] = f"failed: {msg}"
            log(f"    {prov.name:<20} FAILED {msg}")
            continue
        row["cold_s"] = holder["cold_s"]
        row["diff"] = max([holder["diff"]] + diffs)
        row["diff_ulp"] = holder["diff_ulp"]
        if mem is not None:
            row["mem_persistent_mb"] = (mem["cold"]["end"] - mem["cold"]["start"]) / 1e6
            row["mem_peak_added_mb"] = (mem["steady"]["peak"] - mem["cold"]["start"]) / 1e6
        row["_holder"] = holder
        live.append(row)
        log(f"    {prov.name:<20} first step {holder['cold_s']:.2f} s, diff {row['diff']:.0e}"
            + (f", peak +{row['mem_peak_added_mb']:.0f} MB" if mem is not None else ""))

    # timing: interleaved rounds (each round times every provider once, in a random
    # order, see bench/rounds.py), so a burst of background load hits every provider alike
    times = {row["provider"]: [] for row in live}
    log(f"    timing {args.warmup} + {args.repeats} interleaved rounds ...")
    spent = {row["provider"]: 0.0 for row in live}
    triad, triad_bytes = probe
    triad_ts = []
    for r, order in enumerate(rounds(live, args.warmup + args.repeats)):
        sync()
        t0 = time.perf_counter()
        triad()
        sync()
        if r >= args.warmup:
            triad_ts.append(time.perf_counter() - t0)
        for row in order:
            if spent[row["provider"]] > args.budget and times[row["provider"]]:
                continue    # this provider has had its time; keep the samples it has
            h = row["_holder"]
            reset_grads()
            sync()
            t0 = time.perf_counter()
            sample(h["opt"], h["ps"])
            sync()
            dt = time.perf_counter() - t0
            spent[row["provider"]] += dt
            if r >= args.warmup:
                times[row["provider"]].append(dt / per_sample)
    triad_gbs = {"median": triad_bytes / statistics.median(triad_ts) / 1e9,
                 "best": triad_bytes / min(triad_ts) / 1e9, "n": len(triad_ts)}
    for row in live:
        row.pop("_holder")
        q = _quantiles([t * 1e3 for t in times[row["provider"]]])
        row["ms"] = q
        row["gbs"] = model_bytes / (q["median"] / 1e3) / 1e9
        row["frac_triad"] = row["gbs"] / triad_gbs["median"]

    eager = next((r for r in rows if r["provider"] == "eager" and "ms" in r), None)
    for r in rows:
        if eager and "ms" in r:
            r["speedup"] = eager["ms"]["median"] / r["ms"]["median"]
    return {
        "workload": workload, "title": pset.title, "dtype": dtype_name, "algo": algo,
        "base": base, "n_params": pset.n_params, "n_tensors": pset.n_tensors,
        "model_bytes_per_param": model_bpp, "handover_ms": handover_ms,
        "calls_per_sample": per_sample, "triad_gbs": triad_gbs, "rows": rows,
    }


# -- CLI ----------------------------------------------------------------------------------
def _list(choices):
    def parse(text: str) -> List[str]:
        items = list(choices) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)} or 'all'")
        return items
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time one sharpness-aware optimizer step: the plain-PyTorch wrappers "
                    "users run today next to every sharpopt backend.")
    ap.add_argument("--quick", action="store_true",
                    help="SAM + SGD-momentum, fp32, ResNet-18 and the many-small-tensors set, "
                         "few repeats, no torch.compile (a couple of minutes on 2 CPU cores)")
    ap.add_argument("--workloads", type=_list(WORKLOADS), help="default: all (quick: resnet18,small)")
    ap.add_argument("--dtypes", type=_list(DTYPES), help="default: fp32,bf16 (quick: fp32)")
    ap.add_argument("--algos", type=_list(P.ALGOS), help="default: sam")
    ap.add_argument("--bases", type=_list(P.BASES), help="default: sgd (SGD, momentum 0.9)")
    ap.add_argument("--providers", type=lambda s: [t.strip() for t in s.split(",")],
                    help="only these providers (names as in the table)")
    ap.add_argument("--repeats", type=int, help="timed samples per provider (default 10, quick 5)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3, quick 2)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of stepping per provider and case; a provider past it "
                         "keeps the samples it has (column n) (default 60, quick 8)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="include torch.compile of the foreach wrapper (default: on, off in --quick)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-msam", dest="msam", action="store_false",
                    help="skip the MSAM table (bench.bench_msam)")
    ap.add_argument("--no-host", dest="host", action="store_false",
                    help="skip the host-cost table (bench.bench_host: µs per tensor)")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory measurement")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                    help="folder for the JSON and PNG (default: bench/results)")
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    args = ap.parse_args(argv)
    q = args.quick
    args.workloads = args.workloads or (["resnet18", "small"] if q else list(WORKLOADS))
    args.dtypes = args.dtypes or (["fp32"] if q else ["fp32", "bf16"])
    args.algos = args.algos or ["sam"]
    args.bases = args.bases or ["sgd"]
    args.repeats = args.repeats or (5 if q else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if q else 3)
    if args.budget is None:
        args.budget = 8.0 if q else 60.0
    if args.compile is None:
        args.compile = not q
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log = lambda msg: print(msg, flush=True)
    started = time.perf_counter()
    machine = report.machine_info(device)
    log(f"sharpopt {sharpopt.__version__} | torch {torch.__version__} | {machine['device_name']}"
        f" | {machine['threads']} threads")
    log(f"backends here: {', '.join(sharpopt.available_backends(device))}")
    n_bw = 2 ** 24 if args.quick else 2 ** 26
    bw = measure_bandwidth(device, n_bw, 5 if args.quick else 10)
    log(f"bandwidth ({bw['array_mb']:.0f} MB fp32 arrays, best of runs): copy "
        f"{bw['copy']['best_gbs']:.1f} GB/s, triad {bw['triad']['best_gbs']:.1f} GB/s")
    probe = triads(device, n_bw)["torch"], BYTES_PER_ELEMENT * n_bw
    cases = []
    # RBO has no base optimizer: it runs once per workload and dtype
    combos = [(w, d, a, b) for w in args.workloads for d in args.dtypes for a in args.algos
              for b in (args.bases[:1] if a == "rbo" else args.bases)]
    for i, (w, d, a, b) in enumerate(combos, 1):
        base_label = "-" if a == "rbo" else b
        log(f"[{i}/{len(combos)}] {WORKLOADS[w][0]} {d} {a} + {base_label}")
        case = run_case(args, device, w, d, a, b, probe, log)
        cases.append(case)
        log(report.format_case(case, bw))
    msam_rows = []
    if args.msam:
        from .bench_msam import msam_table
        msam_rows = msam_table(device, args.workloads, {d: DTYPES[d] for d in args.dtypes},
                               bw["triad"]["best_gbs"], args.repeats, args.warmup, log)
    host = {}
    if args.host:
        # In a fresh process: this one's large heap and allocator state would slow the very
        # host work being measured (torch's own single step too, by ~3x here).
        import subprocess
        import tempfile
        # Twice: with the gradients kept from step to step, and with a backward pass before
        # every optimizer call (new gradient tensors, as in training).
        with tempfile.TemporaryDirectory() as tmp:
            for extra in ([], ["--after-backward"]):
                path = os.path.join(tmp, "host.json")
                subprocess.run([sys.executable, "-m", "bench.bench_host", "--repeat",
                                str(60 if args.quick else 200), "--json", path, *extra],
                               check=True,
                               cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
                with open(path) as f:
                    host.update(json.load(f)["results"])
    elapsed = time.perf_counter() - started
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine, "bandwidth": bw, "elapsed_s": elapsed,
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "memory": args.memory,
                     "compile": args.compile, "algo_kwargs": P.ALGO_KW,
                     "bases": {k: {"class": c.__name__, **kw} for k, (c, kw) in P.BASES.items()}},
        "cases": cases,
        "msam": msam_rows,
        "host_us_per_tensor": host,
    }
    stem = f"{device.type}-{_dt.date.today().isoformat()}{'-quick' if args.quick else ''}{args.tag}"
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, stem + ".json")
    png_path = os.path.join(args.out, stem + ".png")
    report.write_json(result, json_path)
    report.plot(result, png_path)
    log(report.summary(result))
    log(f"wrote {os.path.relpath(json_path)} and {os.path.relpath(png_path)} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
