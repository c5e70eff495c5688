"""MSAM's step in hardware units: part of ``python -m bench`` (and runnable alone).

One MSAM step (``sharpopt.MSAM.step()``, gradients already in ``p.grad``) on each backend,
next to one plain base step of ``torch.optim`` (foreach) on the same tensors. Byte model per
parameter, accesses × element size (fp32 shown):

* MSAM + SGD-momentum: the fused pass reads ``w~, g, m`` and writes ``m, w`` (20 B), the
  perturbation reads ``w, m`` and writes ``w`` (12 B): 32 B. (SGD alone: 20 B.)
* MSAM + AdamW: reads ``w~, g, m, v``, writes ``m, v, w`` (28 B), then the same 12 B: 40 B.

The momentum's norm rides on the fused pass. ``%triad`` is the byte model's GB/s (from the
best sample) over the best triad (``a = b + s·c``, 12 B per fp32 element, 3 × 64 MiB arrays;
on CPU the faster of ``torch.add`` and the cpu extension's own multi-threaded triad) seen in
the run; a triad sample is taken after every step sample, so that load from other processes
on a shared machine reaches both alike.

    python -m bench.bench_msam [--workloads resnet50] [--dtypes fp32] [--repeats 10] [--out F]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from typing import Callable, List

import torch

import sharpopt

from .triad import BYTES_PER_ELEMENT, triads
from .workloads import WORKLOADS, make_params

# Accesses per parameter per step (each costs the element size in bytes).
ACCESSES = {"sgd": 8, "adamw": 10, "torch-sgd": 5, "torch-adamw": 7}
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2))}


def _time(step: Callable[[], None], sync: Callable[[], None], warmup: int, repeats: int,
          probe: Callable[[], None]) -> tuple:
    """Times of ``step`` and of ``probe`` (the triad), sampled alternately."""
    for _ in range(warmup):
        step()
    sync()
    ts, ps = [], []
    for _ in range(repeats):
        for fn, out in ((step, ts), (probe, ps)):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    return ts, ps


class _Triad:
    """The bandwidth probe: best of torch.add and (on CPU) the extension's triad."""

    N = 2 ** 24

    def __init__(self, device: torch.device):
        self.fns = list(triads(device, self.N).values())
        self.k = 0
        self.best_gbs = 0.0

    def __call__(self):
        self.k += 1
        self.fns[self.k % len(self.fns)]()

    def record(self, times: List[float]) -> None:
        self.best_gbs = max(self.best_gbs, BYTES_PER_ELEMENT * self.N / min(times) / 1e9)


def msam_table(device: torch.device, workloads, dtypes, triad_gbs: float, repeats: int = 10,
               warmup: int = 3, log=print) -> List[dict]:
    """Rows of the MSAM table (one per workload, dtype, base and backend)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    backends = [b for b in sharpopt.available_backends(device) if b != "reference"]
    rows = []
    probe = _Triad(device)
    probe.best_gbs = triad_gbs
    log("\nMSAM step (one gradient per step; byte model: SGD 32 B, AdamW 40 B per fp32 "
        "parameter; torch.optim alone: 20 / 28 B); %triad against the best triad of the run")
    log(f"{'workload':<10} {'dtype':<5} {'base':<6} {'provider':<16} {'best ms':>8} "
        f"{'median':>8} {'GB/s':>7}")
    for w in workloads:
        for dname, dtype in dtypes.items():
            for base in BASES:
                cls, kw = BASES[base]
                providers = [(f"msam:{b}", b) for b in backends] + [(f"torch.optim {base}", None)]
                for label, backend in providers:
                    ps = make_params(w, dtype, device, n_grads=1)
                    ps.use_grads(0)
                    if backend is None:
                        opt = cls(ps.params, foreach=True, **kw)
                        acc = ACCESSES[f"torch-{base}"]
                    else:
                        opt = sharpopt.MSAM(ps.params, cls, rho=0.3, backend=backend,
                                            check_finite=False, **kw)
                        acc = ACCESSES[base]
                    ts, ps_ = _time(opt.step, sync, warmup, repeats, probe)
                    probe.record(ps_)
                    n = sum(p.numel() for p in ps.params)
                    nbytes = acc * n * torch.empty((), dtype=dtype).element_size()
                    best, med = min(ts), statistics.median(ts)
                    gbs = nbytes / best / 1e9
                    row = {"workload": w, "dtype": dname, "base": base, "provider": label,
                           "params": n, "bytes": nbytes, "best_ms": best * 1e3,
                           "median_ms": med * 1e3, "gbs": gbs}
                    rows.append(row)
                    log(f"{w:<10} {dname:<5} {base:<6} {label:<16} {best * 1e3:8.2f} "
                        f"{med * 1e3:8.2f} {gbs:7.1f}")
                    del opt, ps
    for row in rows:
        row["triad_gbs"] = probe.best_gbs
        row["pct_triad"] = 100 * row["gbs"] / probe.best_gbs
    log(f"best triad of the run: {probe.best_gbs:.1f} GB/s; %triad: " + ", ".join(
        f"{r['workload']} {r['base']} {r['provider']} {r['pct_triad']:.0f}%" for r in rows))
    return rows


def main(argv=None) -> int:
    from .__main__ import DTYPES, measure_bandwidth

    ap = argparse.ArgumentParser(prog="python -m bench.bench_msam", description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="resnet50")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the rows as JSON to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bw = measure_bandwidth(device, 2 ** 24, 5)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {list(WORKLOADS)}")
    dtypes = {d: DTYPES[d] for d in args.dtypes.split(",")}
    rows = msam_table(device, workloads, dtypes, bw["triad"]["best_gbs"], args.repeats)
    if args.out:
        from .report import machine_info
        record = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
                  "command": "python -m bench.bench_msam "
                             + " ".join(argv if argv is not None else sys.argv[1:]),
                  "machine": machine_info(device), "bandwidth": bw, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
