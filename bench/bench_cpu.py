"""Benchmark of one full SAM step on the CPU: what a user calls, then pass by pass.

The parameter set has the shapes of ResNet-50 (161 tensors, 25.6 M parameters, fp32).

* **The public step** (the headline): ``sharpopt.SAM(params, SGD|AdamW, backend=...)``
  with its defaults (``check_finite=True``), ``first_step()`` + ``second_step()`` on fixed
  gradients (the user's two backward passes are not timed); also with
  ``check_finite=False``, which shows what the default inf/NaN check costs.
* **The passes** (a breakdown): the three backend calls the step makes, through ``Ops``
  directly, each timed alone and together::

      s = sumsq(g)                      # norm pass
      perturb(w, g, saved, rho / (sqrt(s) + eps))
      restore_sgd(...)  or  restore_adam(...)

The floor is the docs/byte-model.md count (40 B/param with SGD-momentum, 48 B/param with
AdamW) over the triad bandwidth ``a = b + s * c`` (12 B/element, the STREAM convention).
The triad is one more candidate of the same round robin as the steps and the passes, so
the floor is measured in the same seconds as what it is compared with: on a shared
virtual machine the bandwidth drifts by up to 2x within minutes, and a triad timed once
before the run put the same kernels anywhere between 79 % and 97 % of "the floor". The
figures are medians, with the best run and the p10-p90 spread beside them; % of the floor
is the triad's median time over the candidate's, scaled by their bytes. Results are
printed and appended as one JSON line to ``bench/out/bench_cpu.jsonl`` with the machine,
versions, date and command.

    python bench/bench_cpu.py [--repeat 15] [--threads N] [--backends cpu,foreach]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sharpopt  # noqa: E402
from sharpopt.backends import resolve  # noqa: E402

from bench.rounds import rounds  # noqa: E402
from bench.triad import BYTES_PER_ELEMENT, triads  # noqa: E402

RHO, EPS = 0.05, 1e-12
BYTES_PER_PARAM = {"sgd": 40, "adamw": 48}  # docs/byte-model.md, fp32, fused


def resnet50_shapes():
    """Parameter shapes of torchvision's resnet50 (conv, bn weight/bias, fc)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inp = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            shapes += [(width, inp, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if b == 0:
                shapes += [(width * 4, inp, 1, 1), (width * 4,), (width * 4,)]
            inp = width * 4
    return shapes + [(1000, 2048), (1000,)]


def round_robin(fns, repeat, warmup=2):
    """Times each callable `repeat` times, interleaved, so that load from other processes on
    a shared machine falls on every candidate alike; each round in a random order of its
    own, so that no candidate always follows the same one (see bench/rounds.py)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: [] for name in fns}
    for order in rounds(list(fns), repeat):
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def quantiles(ts):
    q = statistics.quantiles(ts, n=10) if len(ts) > 1 else [ts[0]] * 9
    return {"min": min(ts), "p10": q[0], "median": statistics.median(ts), "p90": q[-1]}


TRIAD_N = 32 * 2 ** 20  # 3 x 128 MiB: far beyond any last-level cache


def make_state(shapes, gen):
    p = [torch.randn(s, generator=gen) for s in shapes]
    return {
        "p": p,
        "g": [torch.randn(s, generator=gen) for s in shapes],
        "saved": [torch.empty_like(t) for t in p],
        "buf": [torch.zeros_like(t) for t in p],
        "m": [torch.zeros_like(t) for t in p],
        "v": [torch.zeros_like(t) for t in p],
    }


def sam_step(ops, st, opt):
    """The step's three backend calls in order (norm, perturb, update): see ``passes``."""
    for run, _ in passes(ops, st, opt).values():
        run()


def public_step(shapes, opt, backend, check_finite, seed=0):
    """A ``sharpopt.SAM`` over fresh parameters of ``shapes`` with fixed gradients, and the
    callable of one whole step as a user runs it (without the backward passes)."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    base, kw = ((torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)) if opt == "sgd"
                else (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)))
    sam = sharpopt.SAM(ps, base, rho=RHO, backend=backend, check_finite=check_finite, **kw)

    def step():
        sam.first_step()
        sam.second_step()
    return step


def passes(ops, st, opt):
    """The step's three backend calls, each alone (for the breakdown)."""
    box = {}

    def norm():
        box["s"] = ops.sumsq(st["g"], st["p"], adaptive=False, eta=0.0, centralize=False)

    def perturb():
        ops.perturb(st["p"], st["g"], st["saved"], RHO / (box["s"].sqrt() + EPS),
                    adaptive=False, eta=0.0)

    def update():
        if opt == "sgd":
            ops.restore_sgd(st["p"], st["saved"], st["g"], st["buf"], lr=0.1,
                            weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False,
                            maximize=False, init_buffers=False)
        else:
            ops.restore_adam(st["p"], st["saved"], st["g"], st["m"], st["v"], [], step=10,
                             lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
                             decoupled=True, amsgrad=False, maximize=False)
    # bytes per parameter of each pass (docs/byte-model.md): norm reads g; perturb reads
    # w, g and writes saved, w; the update reads saved, g, state and writes state, w
    update_bytes = 20 if opt == "sgd" else 28
    return {"norm": (norm, 4), "perturb": (perturb, 16), "update": (update, update_bytes)}


def allocated_bytes(fn):
    """Largest single CPU allocation made by fn (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    return max(sizes, default=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backends", default="cpu,foreach")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_cpu.jsonl"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = resnet50_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends = {name: resolve(name, torch.device("cpu")) for name in names}

    tri = triads(torch.device("cpu"), TRIAD_N)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {len(shapes)} tensors, {n / 1e6:.2f} M params fp32")
    print(f"# times: median, best and p10-p90 of {args.repeat} interleaved runs of every row "
          f"and of the triad; GB/s (byte model) and % of the floor from the medians. A triad "
          f"also reads each written line first (write-allocate), as do the passes' stores, "
          f"so % floor can exceed 100.")

    gen = torch.Generator().manual_seed(0)
    st = make_state(shapes, gen)
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv),
              "machine": platform.machine(), "processor": platform.processor(),
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(),
              "params": n, "tensors": len(shapes), "triad_GBps": {}, "results": {}}
    head = (f"{'':>34} {'median ms':>9} {'best':>7} {'p10-p90':>13} {'GB/s':>6} "
            f"{'% floor':>7}")
    for opt in ("sgd", "adamw"):
        nbytes = BYTES_PER_PARAM[opt] * n
        # every row of this table, and the triads, in one round robin
        cands = {("triad", k): f for k, f in tri.items()}
        for name in names:
            for check in (True, False):
                cands[("step", name, check)] = public_step(shapes, opt, name, check)
        parts = {}
        for name, ops in backends.items():
            parts[name] = passes(ops, st, opt)
            cands[("passes", name)] = lambda ops=ops: sam_step(ops, st, opt)
            for k, (f, _) in parts[name].items():
                cands[("pass", name, k)] = f
        times = round_robin(cands, args.repeat)
        tri_bw = {k[1]: BYTES_PER_ELEMENT * TRIAD_N / statistics.median(ts)
                  for k, ts in times.items() if k[0] == "triad"}
        bw = max(tri_bw.values())
        record["triad_GBps"][opt] = {k: v / 1e9 for k, v in tri_bw.items()}
        print(f"\nSAM + {'SGD(momentum 0.9, wd 5e-4)' if opt == 'sgd' else 'AdamW(wd 1e-2)'}: "
              f"byte model {BYTES_PER_PARAM[opt]} B/param -> floor {nbytes / bw * 1e3:.1f} ms "
              f"at the triad's {bw / 1e9:.2f} GB/s (median; "
              + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in tri_bw.items()) + ")")
        print(head)

        def report(label, key, ts, nb):
            q = quantiles(ts)
            fl = nb / bw
            print(f"{label:>34} {q['median'] * 1e3:9.2f} {q['min'] * 1e3:7.2f} "
                  f"{q['p10'] * 1e3:6.2f}-{q['p90'] * 1e3:<6.2f} {nb / q['median'] / 1e9:6.2f} "
                  f"{100 * fl / q['median']:6.0f}%")
            record["results"][f"{opt}/{key}"] = {**{k: v * 1e3 for k, v in q.items()},
                                                 "floor_ms": fl * 1e3,
                                                 "floor_fraction": fl / q["median"]}
        for key, ts in times.items():
            if key[0] == "step":
                _, name, check = key
                label = f"{name} SAM step, " + ("defaults" if check else "check_finite=False")
                report(label, f"step/{name}/" + ("defaults" if check else "no-check"), ts,
                       nbytes)
            elif key[0] == "passes":
                report(f"{key[1]} passes via Ops (3 calls)", f"passes/{key[1]}", ts, nbytes)
            elif key[0] == "pass":
                _, name, k = key
                nb = parts[name][k][1] * n
                report(f"{name}   {k} ({parts[name][k][1]} B/param)", f"passes/{name}/{k}", ts,
                       nb)
        del cands, times
        if "cpu" in backends:
            big = allocated_bytes(lambda: sam_step(backends["cpu"], st, opt))
            print(f"  largest allocation inside a cpu step: {big} B "
                  f"(largest parameter: {max(torch.Size(s).numel() for s in shapes) * 4} B)")
            record["results"][f"{opt}/passes/cpu"]["largest_alloc_B"] = big
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"\nappended to {args.out}")


if __name__ == "__main__":
    main()
