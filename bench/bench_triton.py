"""Benchmark of the ``triton`` backend's SAM step on a GPU, in hardware units.

    python bench/bench_triton.py                 # on a CUDA GPU
    python bench/bench_triton.py --interpret     # tiny sizes on CPU under Triton's interpreter
    python bench/bench_triton.py --ptx 90        # no GPU needed: compile every kernel for
                                                 # sm_90 and check its PTX (ptx_check.py)

Measures, in one run:

1. the device-to-device copy bandwidth (the floor: ``bytes / bandwidth``);
2. the fused SAM + AdamW step (sumsq, perturb, restore + AdamW through the backend's
   passes) on 100 M fp32 parameters, against the byte model's 48 bytes per parameter
   (norm 4 + perturb 16 + restore/AdamW 28);
3. the same step on ResNet-50's parameter shapes (161 tensors, 25.6 M parameters) against
   an eager for-loop SAM wrapper with ``torch.optim.AdamW(foreach=False)`` and against
   ``torch.compile`` of the same step written with the ``foreach`` backend;
4. the whole triton SAM step (sumsq + perturb + restore/SGD-momentum) captured in one CUDA
   graph and replayed, after checking that a replay gives the same bits as an eager step.

The gradients are fixed random tensors (no model runs): this times the optimizer alone.
Prints a table and appends one JSON record (device, driver, versions, date, results) to
``bench/out/bench_triton.jsonl`` (``--json`` to change it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

if "--interpret" in sys.argv:
    # Must precede the first import of triton (torch may import it lazily later).
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

RHO, EPS = 0.05, 1e-12
ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
SGDM = dict(lr=0.1, weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False,
            maximize=False)
BYTES_SAM_ADAMW = 48   # per fp32 parameter: 4 (norm) + 16 (perturb) + 28 (restore+AdamW)
BYTES_SAM_SGDM = 40    # 4 + 16 + 20 (restore+SGD-momentum)


def resnet50_shapes(width_div: int = 1):
    """Parameter shapes of torchvision's ResNet-50 (conv, batch-norm weight/bias, fc);
    ``width_div`` shrinks every channel count for the interpreter run."""
    c = lambda n: max(1, n // width_div)  # noqa: E731
    shapes = [(c(64), 3, 7, 7), (c(64),), (c(64),)]
    inplanes = c(64)
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        w = c(width)
        for b in range(blocks):
            shapes += [(w, inplanes, 1, 1), (w,), (w,), (w, w, 3, 3), (w,), (w,),
                       (4 * w, w, 1, 1), (4 * w,), (4 * w,)]
            if b == 0:
                shapes += [(4 * w, inplanes, 1, 1), (4 * w,), (4 * w,)]
            inplanes = 4 * w
    shapes += [(1000 // width_div, inplanes), (1000 // width_div,)]
    return shapes


def even_shapes(total: int, ntensors: int):
    per = total // ntensors
    return [(per,)] * (ntensors - 1) + [(total - per * (ntensors - 1),)]


class Problem:
    """Parameters, gradients and optimizer state of one parameter set."""

    def __init__(self, shapes, device, seed=0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        mk = lambda s: torch.randn(s, generator=gen).to(device)  # noqa: E731
        self.params = [mk(s) for s in shapes]
        self.grads = [mk(s) * 1e-2 for s in shapes]
        self.saved = [torch.empty_like(p) for p in self.params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.buf = [torch.zeros_like(p) for p in self.params]
        self.numel = sum(p.numel() for p in self.params)


def sam_adamw_step(ops, pb: Problem, step: int = 10):
    """One SAM + AdamW step through the passes (the second gradient reuses ``grads``)."""
    norm2 = ops.sumsq(pb.grads, pb.params, adaptive=False, eta=0.0, centralize=False)
    scale = RHO / (norm2.sqrt() + EPS)
    ops.perturb(pb.params, pb.grads, pb.saved, scale, adaptive=False, eta=0.0)
    ops.restore_adam(pb.params, pb.saved, pb.grads, pb.m, pb.v, [], step=step, decoupled=True,
                     amsgrad=False, maximize=False, **ADAMW)


def sam_sgdm_step(ops, pb: Problem):
    norm2 = ops.sumsq(pb.grads, pb.params, adaptive=False, eta=0.0, centralize=False)
    scale = RHO / (norm2.sqrt() + EPS)
    ops.perturb(pb.params, pb.grads, pb.saved, scale, adaptive=False, eta=0.0)
    ops.restore_sgd(pb.params, pb.saved, pb.grads, pb.buf, init_buffers=False, **SGDM)


class EagerLoopSAM:
    """What a typical SAM wrapper does: per-tensor norms and updates, a saved copy per
    tensor, then the base optimizer's own for-loop step."""

    def __init__(self, pb: Problem):
        self.pb = pb
        self.params = [torch.nn.Parameter(p.clone()) for p in pb.params]
        for p, g in zip(self.params, pb.grads):
            p.grad = g.clone()
        self.base = torch.optim.AdamW(self.params, lr=ADAMW["lr"], betas=(ADAMW["beta1"],
                                      ADAMW["beta2"]), eps=ADAMW["eps"],
                                      weight_decay=ADAMW["weight_decay"], foreach=False)
        self.old = [torch.empty_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params]), p=2)
        scale = RHO / (norm + EPS)
        for p, old in zip(self.params, self.old):
            old.copy_(p)
            p.add_(p.grad * scale)
        for p, old in zip(self.params, self.old):
            p.copy_(old)
        self.base.step()


def timed(fn, device, reps: int, warmup: int):
    """Median and 20/80 % quantiles of ``fn``'s time in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        import time
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8), "reps": reps}


def copy_bandwidth(device, nbytes: int, reps: int, warmup: int):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, reps, warmup)
    return 2 * src.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9, t


def environment(device):
    import triton
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                   cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception as exc:  # no nvidia-smi on the path: say so, keep going
            env["driver"] = f"unknown ({type(exc).__name__})"
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()})", driver="n/a")
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interpret", action="store_true",
                    help="tiny sizes on CPU under TRITON_INTERPRET=1 (exercises the code paths)")
    ap.add_argument("--params", type=float, default=100e6, help="size of the large set")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "out" /
                                          "bench_triton.jsonl"))
    ap.add_argument("--ptx", type=int, metavar="SM",
                    help="compile the kernels for this compute capability (e.g. 90) without "
                         "a GPU and check their PTX (bench/ptx_check.py)")
    args = ap.parse_args()
    if args.ptx:
        return ptx_report(args.ptx)

    if args.interpret:
        device = torch.device("cpu")
        big_shapes, rn50_shapes = even_shapes(3000, 3), resnet50_shapes(width_div=32)
        reps, warmup, copy_bytes = 1, 0, 1 << 20
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_triton.py needs a CUDA GPU (torch.cuda.is_available() is False). "
                     "Run it with --interpret for a CPU smoke run of its code paths.")
        device = torch.device("cuda")
        big_shapes, rn50_shapes = even_shapes(int(args.params), 100), resnet50_shapes()
        reps, warmup, copy_bytes = args.reps, 5, 1 << 30

    from sharpopt.backends import BackendUnavailable, resolve
    try:
        triton_ops = resolve("triton", device)
    except BackendUnavailable as exc:
        sys.exit(f"bench_triton.py: {exc}")
    foreach_ops = resolve("foreach", device)

    env = environment(device)
    rows, results = [], {}

    bw, t = copy_bandwidth(device, copy_bytes, reps, warmup)
    results["copy"] = {"GBps": bw, **t}
    rows.append(("d2d copy", f"{copy_bytes / 2**20:.0f} MiB", t["median_ms"], bw, 1.0))

    def report(name, size, pb, t, bytes_per_param):
        gbps = bytes_per_param * pb.numel / (t["median_ms"] * 1e-3) / 1e9
        floor_ms = bytes_per_param * pb.numel / (bw * 1e9) * 1e3
        results[name] = {"params": pb.numel, "tensors": len(pb.params), "GBps": gbps,
                         "floor_ms": floor_ms, "bytes_per_param": bytes_per_param, **t}
        rows.append((name, size, t["median_ms"], gbps, gbps / bw))

    big = Problem(big_shapes, device)
    report("triton SAM+AdamW", f"{big.numel / 1e6:.1f}M/{len(big_shapes)}", big,
           timed(lambda: sam_adamw_step(triton_ops, big), device, reps, warmup), BYTES_SAM_ADAMW)
    del big

    rn = Problem(rn50_shapes, device)
    size = f"{rn.numel / 1e6:.2f}M/{len(rn50_shapes)}"
    report("RN50 triton SAM+AdamW", size, rn,
           timed(lambda: sam_adamw_step(triton_ops, rn), device, reps, warmup), BYTES_SAM_ADAMW)
    eager = EagerLoopSAM(rn)
    report("RN50 eager loop SAM+AdamW", size, rn, timed(eager.step, device, reps, warmup),
           BYTES_SAM_ADAMW)
    del eager
    # The interpreter run only checks that the compiled path traces (no C++ build on CPU).
    compiled = torch.compile(lambda: sam_adamw_step(foreach_ops, rn),
                             backend="eager" if args.interpret else "inductor")
    report("RN50 compiled foreach SAM+AdamW", size, rn,
           timed(compiled, device, reps, max(warmup, 2)), BYTES_SAM_ADAMW)

    report("RN50 triton SAM+SGDm eager", size, rn,
           timed(lambda: sam_sgdm_step(triton_ops, rn), device, reps, warmup), BYTES_SAM_SGDM)
    if device.type == "cuda":
        graph_rows(triton_ops, rn, device, reps, report, size, results)
    else:
        results["cuda_graph"] = "skipped: needs CUDA"

    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"driver {env['driver']}  {env['date']}")
    print(f"{'case':34s} {'params/tensors':>15s} {'median ms':>10s} {'GB/s':>9s} "
          f"{'of copy':>8s}")
    for name, sz, ms, gbps, frac in rows:
        print(f"{name:34s} {sz:>15s} {ms:10.3f} {gbps:9.1f} {frac:8.1%}")
    print(f"(GB/s counts the byte model: {BYTES_SAM_ADAMW} B/param SAM+AdamW, "
          f"{BYTES_SAM_SGDM} B/param SAM+SGD-momentum; 'of copy' = fraction of the copy "
          f"bandwidth, i.e. of the floor)")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps({"env": env, "results": results}) + "\n")
    print(f"appended to {out}")


def graph_rows(ops, pb, device, reps, report, size, results):
    """Capture a whole SAM + SGD-momentum step in a CUDA graph; check a replay against an
    eager step from the same state, then time replays."""
    sam_sgdm_step(ops, pb)            # builds and caches the tables outside the capture
    torch.cuda.synchronize()
    snapshot = [t.clone() for t in pb.params + pb.buf]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sam_sgdm_step(ops, pb)
    for t, s in zip(pb.params + pb.buf, snapshot):
        t.copy_(s)
    graph.replay()
    replayed = [t.clone() for t in pb.params + pb.buf]
    for t, s in zip(pb.params + pb.buf, snapshot):
        t.copy_(s)
    sam_sgdm_step(ops, pb)
    same = all(torch.equal(a, b) for a, b in zip(replayed, pb.params + pb.buf))
    results["cuda_graph_matches_eager"] = same
    if not same:
        print("WARNING: the CUDA-graph replay differs from the eager step")
    report("RN50 triton SAM+SGDm CUDA graph", size, pb,
           timed(graph.replay, device, reps, 3), BYTES_SAM_SGDM)


def ptx_report(sm: int):
    """Compile every kernel variant for sm_<sm> without a GPU and check the PTX (tail
    guards, 16-byte accesses, spills): see ``bench/ptx_check.py``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import ptx_check
    return ptx_check.main(["--sm", str(sm)])


if __name__ == "__main__":
    sys.exit(main())
