"""Host cost per tensor of one optimizer step: what the Python side and the launches cost.

On a GPU a step's time is set by the host once the kernels are fast: the Python work per
tensor, host syncs and launches. This benchmark makes that cost visible on any machine by
giving every parameter one element, so the data work is nothing and the time is the
host's. For each tensor count (160, about a ResNet-50; 1200, a large transformer's count)
it times, interleaved round-robin and reported as the median (with best and spread):

* the whole public SAM step, ``first_step()`` + ``second_step()``, of each sharpopt
  backend present (``triton`` is left out under the interpreter, whose per-operation cost
  is not the compiled launcher's), with the library defaults (``check_finite=True``) and
  with ``check_finite=False``;
* on a machine without a GPU, ``triton``'s Python share: its public step with every
  kernel launch replaced by a no-op (the wrapper, the plan, the launchers' argument
  preparation; not the launch itself, which only a GPU can time);
* torch's own *single* base step for comparison: ``SGD``/``AdamW`` with ``fused=True``
  and with ``foreach=True``.

The steps are timed round-robin, so each starts with the caches and branch predictors
other code left (as a training step does, after a backward pass); ``--back-to-back`` times
each step's samples in a row instead, which gives the lower bound with everything warm.
The figure is µs per tensor (median time / tensor count). A SAM step is two optimizer
passes to torch's one, so "no more than torch's fused single step" is a demanding bar.

    python -m bench.bench_host [--tensors 160,1200] [--repeat 200] [--back-to-back] [--json FILE]
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
from typing import Callable, Dict, List

import torch

if not torch.cuda.is_available():
    # triton's launchers load on CPU tensors only with its interpreter on (set before
    # triton is imported); their kernels are stubbed out below, so it never runs one.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sharpopt  # noqa: E402
from sharpopt.backends import BackendUnavailable, resolve  # noqa: E402

BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2))}


#: Backends timed per device type (triton on CPU runs under the interpreter: not timed).
BACKENDS = {"cpu": ("cpu", "foreach", "reference"), "cuda": ("triton", "cuda", "foreach")}


class _NoLaunch:
    """Stands for a Triton kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return _no_launch


def _no_launch(*args, **kwargs):
    return None


class _NoReduce(_NoLaunch):
    """Stands for the reductions' last kernel: writes a norm of 1 (one small op per
    reduction) so that the step's inf/NaN check sees a finite norm."""

    def __getitem__(self, grid):
        return lambda partials, out, *args, **kwargs: out.fill_(1.0)


def stub_triton_launches() -> bool:
    """Replace every kernel of ``sharpopt.kernels`` by :class:`_NoLaunch` (for this
    process); False when triton cannot be imported."""
    try:
        from sharpopt.kernels import lincomb, msam, norm, perturb, restore_update
    except ImportError:
        return False
    for module in (lincomb, msam, norm, perturb, restore_update):
        for name in dir(module):
            if name.endswith("_kernel"):
                setattr(module, name, _NoReduce() if name == "_finish_kernel" else _NoLaunch())
    return True


def _params(n: int, device: torch.device) -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(1, generator=g).to(device)) for _ in range(n)]
    for p in ps:
        p.grad = (torch.randn(1, generator=g) * 1e-3).to(device)
    return ps


def steps(n: int, base: str, device: torch.device) -> Dict[str, Callable[[], None]]:
    """Name -> one step over ``n`` one-element parameters (each callable owns its copy)."""
    cls, kw = BASES[base]
    out: Dict[str, Callable[[], None]] = {}
    for backend in BACKENDS.get(device.type, ("foreach",)):
        try:
            resolve(backend, device)
        except BackendUnavailable:
            continue
        for check in (True, False):
            opt = sharpopt.SAM(_params(n, device), cls, rho=0.05, backend=backend,
                               check_finite=check, **kw)

            def sam(opt=opt):
                opt.first_step()
                opt.second_step()
            out[f"sharpopt {backend} SAM step" + ("" if check else ", check_finite=False")] = sam
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" \
            and stub_triton_launches():
        for check in (True, False):
            opt = sharpopt.SAM(_params(n, device), cls, rho=0.05, backend="triton",
                               check_finite=check, **kw)

            def sam(opt=opt):
                opt.first_step()
                opt.second_step()
            out["sharpopt triton SAM step, launches stubbed"
                + ("" if check else ", check_finite=False")] = sam
    for flag in ("fused", "foreach"):
        opt = cls(_params(n, device), **kw, **{flag: True})
        out[f"torch {cls.__name__}({flag}=True) single step"] = opt.step
    return out


def run(n: int, base: str, repeat: int, device: torch.device = torch.device("cpu"),
        warmup: int = 20, back_to_back: bool = False) -> Dict[str, dict]:
    """Per step name: µs per tensor (median, best, quartiles) over ``repeat`` samples,
    taken round-robin (on CUDA each sample ends with a synchronisation), or with
    ``back_to_back`` all samples of one step in a row: the caches and branch predictors
    then hold that step's own objects and code (the host cost's lower bound; a training
    step follows a backward pass, closer to the round-robin figure)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fns = steps(n, base, device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    if back_to_back:
        order = [k for k in names for _ in range(repeat)]
    else:
        order = [k for r in range(repeat) for k in names[r % len(names):] + names[:r % len(names)]]
    for k in order:
        sync()
        t0 = time.perf_counter()
        fns[k]()
        sync()
        times[k].append(time.perf_counter() - t0)
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        out[k] = {"median_us_per_tensor": q[1] / n * 1e6, "best_us_per_tensor": min(ts) / n * 1e6,
                  "q25_us_per_tensor": q[0] / n * 1e6, "q75_us_per_tensor": q[2] / n * 1e6,
                  "median_ms": q[1] * 1e3}
    return out


def host_table(device: torch.device, tensors=(160, 1200), repeat: int = 100, log=print,
               threads: int = 1, back_to_back: bool = False) -> dict:
    """The host-cost table of ``python -m bench``: every count and base, printed. Runs on
    ``threads`` torch threads (restored after; default one: with one-element tensors a
    thread pool only adds its own start-up cost to every pass)."""
    results = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = _host_table(device, tensors, repeat, log, back_to_back)
    finally:
        torch.set_num_threads(before)
    return results


def _host_table(device: torch.device, tensors, repeat: int, log, back_to_back: bool) -> dict:
    results = {}
    how = "back to back" if back_to_back else "round-robin"
    for n in tensors:
        for base in BASES:
            res = results[f"{n} tensors, {base}"] = run(n, base, repeat, device,
                                                         back_to_back=back_to_back)
            log(f"host cost, {n} one-element tensors, base {base}, {how}: µs per tensor "
                "(median, best, q25-q75)")
            for k, v in res.items():
                log(f"  {k:58s} {v['median_us_per_tensor']:6.2f}  {v['best_us_per_tensor']:6.2f}"
                    f"  {v['q25_us_per_tensor']:.2f}-{v['q75_us_per_tensor']:.2f}")
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", default="160,1200")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the host path, not the thread pool, is timed)")
    ap.add_argument("--back-to-back", action="store_true",
                    help="time all samples of one step in a row instead of round-robin "
                         "(warm caches: the lower bound of the host cost)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m bench.bench_host "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": platform.machine(), "processor": platform.processor(),
              "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
              "sharpopt": sharpopt.__version__, "back_to_back": args.back_to_back,
              "results": {}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record["device"] = str(device)
    record["results"] = host_table(device, [int(x) for x in args.tensors.split(",")],
                                   args.repeat, threads=args.threads,
                                   back_to_back=args.back_to_back)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
