"""Benchmark of one full SAM step on the CPU, pass by pass through the backends' Ops.

The parameter set has the shapes of ResNet-50 (161 tensors, 25.6 M parameters, fp32). One
step is what the SAM wrapper runs around the user's two backward passes:

    s = sumsq(g)                      # norm pass
    perturb(w, g, saved, rho / (sqrt(s) + eps))
    restore_sgd(...)  or  restore_adam(...)

Each backend (cpu, foreach, reference) is timed on the same tensors. The floor is the
docs/byte-model.md (40 B/param with SGD-momentum, 48 B/param with AdamW) divided by the
triad bandwidth ``a = b + s * c`` measured in the same run (12 B/element, the STREAM
convention). The backends are timed round-robin and compared on their best run, which is
the least disturbed one on a shared machine; median and p90 are printed next to it. Results are printed and appended as one JSON line to
``bench/out/bench_cpu.jsonl`` with the machine, versions and date.

    python bench/bench_cpu.py [--repeat 15] [--threads N] [--backends cpu,foreach,reference]
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
from sharpopt.backends import resolve  # noqa: E402

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


def timeit(fn, repeat, warmup=2):
    return round_robin({"fn": fn}, repeat, warmup)["fn"]


def round_robin(fns, repeat, warmup=2):
    """Times each callable `repeat` times, interleaved, so that load from other processes on
    a shared machine falls on every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def quantiles(ts):
    q = statistics.quantiles(ts, n=10) if len(ts) > 1 else [ts[0]] * 9
    return {"min": min(ts), "p10": q[0], "median": statistics.median(ts), "p90": q[-1]}


def triad_bandwidth(repeat):
    """Best triad bandwidth (12 B/element) of torch.add and of the extension's own triad."""
    from sharpopt._build import load_extension

    ext = load_extension("cpu")
    n = 32 * 2 ** 20  # 3 x 128 MiB: far beyond any last-level cache
    a, b, c = torch.empty(n), torch.randn(n), torch.randn(n)
    ts = round_robin({"torch": lambda: torch.add(b, c, alpha=0.5, out=a),
                      "c++": lambda: ext.triad(a, b, c, 0.5)}, repeat)
    return {k: 12 * n / min(v) for k, v in ts.items()}


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
    s = ops.sumsq(st["g"], st["p"], adaptive=False, eta=0.0, centralize=False)
    scale = RHO / (s.sqrt() + EPS)  # stays a tensor: no host sync in the step
    ops.perturb(st["p"], st["g"], st["saved"], scale, adaptive=False, eta=0.0)
    if opt == "sgd":
        ops.restore_sgd(st["p"], st["saved"], st["g"], st["buf"], lr=0.1, weight_decay=5e-4,
                        momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
                        init_buffers=False)
    else:
        ops.restore_adam(st["p"], st["saved"], st["g"], st["m"], st["v"], [], step=10, lr=1e-3,
                         beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=True,
                         amsgrad=False, maximize=False)


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
    ap.add_argument("--backends", default="cpu,foreach,reference")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_cpu.jsonl"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = resnet50_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends = {name: resolve(name, torch.device("cpu")) for name in names}

    triads = triad_bandwidth(args.repeat)
    bw = max(triads.values())
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {len(shapes)} tensors, {n / 1e6:.2f} M params fp32")
    print(f"# triad a = b + s*c, 12 B/element, best of {args.repeat}: "
          + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in triads.items())
          + f"; the floor uses {bw / 1e9:.2f}")
    print(f"# times: best, median and p90 of {args.repeat} interleaved runs; GB/s (byte model) "
          f"and floor/t from the best. A triad also reads each written line first "
          f"(write-allocate), as do the passes' stores to saved/params, so floor/t can exceed 1.")

    gen = torch.Generator().manual_seed(0)
    st = make_state(shapes, gen)
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": platform.machine(), "processor": platform.processor(),
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(),
              "params": n, "tensors": len(shapes),
              "triad_GBps": {k: v / 1e9 for k, v in triads.items()}, "results": {}}
    for opt in ("sgd", "adamw"):
        floor = BYTES_PER_PARAM[opt] * n / bw
        print(f"\nSAM + {'SGD(momentum 0.9, wd 5e-4)' if opt == 'sgd' else 'AdamW(wd 1e-2)'}: "
              f"byte model {BYTES_PER_PARAM[opt]} B/param -> floor {floor * 1e3:.1f} ms")
        print(f"{'backend':>10} {'min ms':>8} {'median':>8} {'p90':>8} {'GB/s':>7} {'floor/t':>8}")
        med = {}
        times = round_robin({name: (lambda ops=ops: sam_step(ops, st, opt))
                             for name, ops in backends.items()}, args.repeat)
        for name, ts in times.items():
            q = quantiles(ts)
            med[name] = q["min"]
            eff = BYTES_PER_PARAM[opt] * n / q["min"]
            print(f"{name:>10} {q['min'] * 1e3:8.2f} {q['median'] * 1e3:8.2f} {q['p90'] * 1e3:8.2f} "
                  f"{eff / 1e9:7.2f} {floor / q['min']:8.2f}")
            record["results"][f"{opt}/{name}"] = {**{k: v * 1e3 for k, v in q.items()},
                                                  "floor_ms": floor * 1e3}
        if "cpu" in med:
            for other in ("foreach", "reference"):
                if other in med:
                    print(f"  cpu is {med[other] / med['cpu']:.2f}x faster than {other}")
            big = allocated_bytes(lambda: sam_step(backends["cpu"], st, opt))
            print(f"  largest allocation inside a cpu step: {big} B "
                  f"(largest parameter: {max(torch.Size(s).numel() for s in shapes) * 4} B)")
            record["results"][f"{opt}/cpu"]["largest_alloc_B"] = big
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"\nappended to {args.out}")


if __name__ == "__main__":
    main()
