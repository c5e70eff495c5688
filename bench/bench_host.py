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
other code left; ``--back-to-back`` times each step's samples in a row instead, which gives
the lower bound with everything warm. Both keep the same gradient tensors from step to
step. ``--after-backward`` is the training loop's case: before each optimizer call
(``first_step``, ``second_step``, torch's ``step``) an untimed backward pass frees the old
gradients and gives every parameter a new one, made in C++ with no Python object yet. The
call then meets what a backward leaves: cold caches, new tensors to wrap, and a C
allocator full of freed blocks, which glibc merges on the first request of 1 KiB or more
(about 0.2 ms at 1200 tensors, paid by whichever code asks first).

The figure is µs per tensor (median time / tensor count). A SAM step is two optimizer
passes to torch's one, so "no more than torch's fused single step" is a demanding bar.

    python -m bench.bench_host [--tensors 160,1200] [--repeat 200] [--back-to-back]
                               [--after-backward] [--json FILE]
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

from .rounds import rounds  # noqa: E402

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


class _Backward:
    """A training loop's backward pass on ``params``: ``zero_grad(set_to_none=True)``, then
    autograd gives every parameter a new gradient tensor (made in C++, with no Python object
    yet, as a real backward makes them). It frees the old gradients and allocates new ones,
    so the optimizer call after it meets the caches and the C allocator a backward leaves."""

    def __init__(self, params: List[torch.nn.Parameter]):
        self.params = params
        # Held here, so autograd copies each seed into a new gradient tensor.
        self.seeds = [p.grad.detach().clone() for p in params]

    def __call__(self) -> None:
        for p in self.params:
            p.grad = None
        torch.autograd.backward(self.params, self.seeds)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes; on CUDA from a synchronised start to a synchronised end."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn: Callable[[], object]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    return timed


def steps(n: int, base: str, device: torch.device, after_backward: bool = False
          ) -> Dict[str, Callable[[], float]]:
    """Name -> one timed step over ``n`` one-element parameters (each callable owns its
    copy and returns the seconds its optimizer calls took). With ``after_backward`` each
    optimizer call (``first_step``, ``second_step``, torch's ``step``) follows a backward
    pass (see :class:`_Backward`), which is not timed."""
    cls, kw = BASES[base]
    timed = _timer(device)
    out: Dict[str, Callable[[], float]] = {}

    def sam_step(opt: torch.optim.Optimizer, params) -> Callable[[], float]:
        if not after_backward:
            return lambda: timed(lambda: (opt.first_step(), opt.second_step()))
        backward = _Backward(params)

        def sample() -> float:
            backward()
            t = timed(opt.first_step)
            backward()
            return t + timed(opt.second_step)
        return sample

    def torch_step(opt: torch.optim.Optimizer, params) -> Callable[[], float]:
        if not after_backward:
            return lambda: timed(opt.step)
        backward = _Backward(params)

        def sample() -> float:
            backward()
            return timed(opt.step)
        return sample

    sam_backends = [b for b in BACKENDS.get(device.type, ("foreach",)) if _runs(b, device)]
    stubbed = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" \
        and stub_triton_launches()
    if stubbed:
        sam_backends.append("triton")
    for backend in sam_backends:
        label = "triton SAM step, launches stubbed" if backend == "triton" and stubbed \
            else f"{backend} SAM step"
        for check in (True, False):
            params = _params(n, device)
            opt = sharpopt.SAM(params, cls, rho=0.05, backend=backend, check_finite=check, **kw)
            name = f"sharpopt {label}" + ("" if check else ", check_finite=False")
            out[name] = sam_step(opt, params)
    for flag in ("fused", "foreach"):
        params = _params(n, device)
        out[f"torch {cls.__name__}({flag}=True) single step"] = torch_step(
            cls(params, **kw, **{flag: True}), params)
    return out


def _runs(backend: str, device: torch.device) -> bool:
    try:
        resolve(backend, device)
    except BackendUnavailable:
        return False
    return True


def run(n: int, base: str, repeat: int, device: torch.device = torch.device("cpu"),
        warmup: int = 20, back_to_back: bool = False, after_backward: bool = False
        ) -> Dict[str, dict]:
    """Per step name: µs per tensor (median, best, quartiles) over ``repeat`` samples,
    taken round-robin, each round in a random order of its own (see ``bench.rounds``; on
    CUDA each sample ends with a synchronisation), or with
    ``back_to_back`` all samples of one step in a row: the caches and branch predictors
    then hold that step's own objects and code (the host cost's lower bound). With
    ``after_backward`` each optimizer call follows a backward pass that makes new
    gradients, as in training (the backward is not timed)."""
    fns = steps(n, base, device, after_backward)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    if back_to_back:
        order = [k for k in names for _ in range(repeat)]
    else:
        order = [k for one in rounds(names, repeat) for k in one]
    for k in order:
        times[k].append(fns[k]())
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        out[k] = {"median_us_per_tensor": q[1] / n * 1e6, "best_us_per_tensor": min(ts) / n * 1e6,
                  "q25_us_per_tensor": q[0] / n * 1e6, "q75_us_per_tensor": q[2] / n * 1e6,
                  "median_ms": q[1] * 1e3}
    return out


def host_table(device: torch.device, tensors=(160, 1200), repeat: int = 100, log=print,
               threads: int = 1, back_to_back: bool = False, after_backward: bool = False
               ) -> dict:
    """The host-cost table of ``python -m bench``: every count and base, printed. Runs on
    ``threads`` torch threads (restored after; default one: with one-element tensors a
    thread pool only adds its own start-up cost to every pass)."""
    results = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = _host_table(device, tensors, repeat, log, back_to_back, after_backward)
    finally:
        torch.set_num_threads(before)
    return results


def _host_table(device: torch.device, tensors, repeat: int, log, back_to_back: bool,
                after_backward: bool) -> dict:
    results = {}
    how = "back to back" if back_to_back else "round-robin"
    if after_backward:
        how += ", each call after a backward pass"
    for n in tensors:
        for base in BASES:
            key = f"{n} tensors, {base}" + (", after backward" if after_backward else "")
            res = results[key] = run(n, base, repeat, device, back_to_back=back_to_back,
                                     after_backward=after_backward)
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
    ap.add_argument("--after-backward", action="store_true",
                    help="give every parameter new gradients by a backward pass before each "
                         "optimizer call, as in training (not timed)")
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
              "after_backward": args.after_backward, "results": {}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record["device"] = str(device)
    record["results"] = host_table(device, [int(x) for x in args.tensors.split(",")],
                                   args.repeat, threads=args.threads,
                                   back_to_back=args.back_to_back,
                                   after_backward=args.after_backward)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
