"""``python -m bench.demo``: train small models on real data with and without SAM variants.

The data ship inside scikit-learn (nothing is downloaded):

* ``digits`` — 1,797 handwritten digits, 8×8 grey images, 10 classes; a small CNN
  (two 3×3 convolutions, 16 and 32 channels, max-pool, 64-unit hidden layer);
* ``cancer`` — the Wisconsin breast-cancer diagnostic set, 569 tumours × 30 features,
  malignant / benign; an MLP 30-64-32-2.

Fixed split: 70 % train / 30 % test, stratified, ``random_state=0``; features scaled with
the training statistics. Each optimizer trains from the same initialisation for a given
seed (the seed also drives the batch order); test accuracy is reported as mean ± std over
the seeds, with the training time per epoch (forward, backward and step) and the time
spent in the optimizer step alone. The cost columns say what each method costs end to end:
the epoch time relative to SGD's (the optimizers of a seed train side by side, one epoch
each in turn, and ``x SGD`` is the median over seeds and epochs of the ratio to SGD's epoch of
the same seed and index, so that load from other processes falls on all of them alike), the
share of the epoch spent inside the optimizer's calls, and the fraction of steps that ran
SAM's second forward/backward. A second table times the step alone with each sharpopt
backend and with the plain for-loop wrapper, on the trained model's real parameters
(two real gradient sets handed over as in ``python -m bench``).

Base optimizer of every SAM variant: SGD, momentum 0.9, weight decay 5e-4, the same lr as
the SGD baseline, cosine schedule; rho as in the papers (SAM, GCSAM, GSAM, Friendly-SAM
0.05; ASAM 0.5 with eta 0.01). The cheaper variants: SAM every 3rd step (``sam-k3``),
LookSAM (k = 5, alpha = 0.7), SAM on a random half of the steps (``sam-random``, RST / SS-SAM),
AE-SAM's adaptive policy (``sam-adaptive``, the paper's defaults over the run), SAM in the last
half of the run only (``sam-late``), and MSAM (rho = 0.3, one gradient per step, evaluated at
``w`` through ``at_w()``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

import sharpopt

from . import providers as P
from .workloads import ParamSet

OPTIMIZERS = ["sgd", "adam", "sam", "asam", "gcsam", "gsam", "friendlysam", "sam-k3", "looksam",
              "sam-random", "sam-adaptive", "sam-late", "msam"]
SAM_KW = {"sam": dict(rho=0.05), "asam": dict(rho=0.5, eta=0.01), "gcsam": dict(rho=0.05),
          "gsam": dict(rho=0.05, alpha=0.4), "friendlysam": dict(rho=0.05, sigma=1.0, lam=0.95)}
SAM_CLS = {"sam": sharpopt.SAM, "asam": sharpopt.ASAM, "gcsam": sharpopt.GCSAM,
           "gsam": sharpopt.GSAM, "friendlysam": sharpopt.FriendlySAM}
# The cheaper variants: (class, keyword arguments given the run's total number of steps).
CHEAP = {
    "sam-k3": (sharpopt.SAM, lambda n: dict(rho=0.05, k=3)),
    "looksam": (sharpopt.LookSAM, lambda n: dict(rho=0.05, k=5, alpha=0.7)),
    "sam-random": (sharpopt.SAM, lambda n: dict(rho=0.05,
                                                schedule=sharpopt.schedules.Random(0.5, seed=0))),
    "sam-adaptive": (sharpopt.SAM, lambda n: dict(rho=0.05,
                                                  schedule=sharpopt.schedules.Adaptive(steps=n))),
    "sam-late": (sharpopt.SAM, lambda n: dict(rho=0.05,
                                              schedule=sharpopt.schedules.LatePhase(n // 2))),
}
MSAM_KW = dict(rho=0.3)
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def load(name: str):
    """(x_train, y_train, x_test, y_test) as tensors; the fixed split."""
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    if name == "digits":
        ds = load_digits()
        x = ds.data.reshape(-1, 1, 8, 8) / 16.0
    else:
        ds = load_breast_cancer()
        x = ds.data
    xtr, xte, ytr, yte = train_test_split(x, ds.target, test_size=0.3, random_state=0,
                                          stratify=ds.target)
    mean, std = xtr.mean(axis=0), xtr.std(axis=0) + 1e-8
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def model_for(name: str) -> nn.Module:
    if name == "digits":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 2))


def make_optimizer(name: str, params, backend: str = "auto", total_steps: int = 1):
    if name == "sgd":
        return torch.optim.SGD(params, **SGD_KW)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if name == "msam":
        return sharpopt.MSAM(params, torch.optim.SGD, backend=backend, **MSAM_KW, **SGD_KW)
    if name in CHEAP:
        cls, kw = CHEAP[name]
        return cls(params, torch.optim.SGD, backend=backend, **kw(total_steps), **SGD_KW)
    return SAM_CLS[name](params, torch.optim.SGD, backend=backend, **SAM_KW[name], **SGD_KW)


class Run:
    """One optimizer training one model of one seed, an epoch at a time."""

    def __init__(self, dataset, data, opt_name: str, seed: int, epochs: int, batch: int):
        self.data, self.batch, self.epochs = data, batch, epochs
        xtr = data[0]
        torch.manual_seed(seed)
        self.model = model_for(dataset)
        self.n_steps = epochs * ((len(xtr) + batch - 1) // batch)
        self.opt = make_optimizer(opt_name, self.model.parameters(), total_steps=self.n_steps)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            getattr(self.opt, "base_optimizer", self.opt), T_max=epochs)
        self.loss_fn = nn.CrossEntropyLoss()
        self.gen = torch.Generator().manual_seed(seed)
        self.two_pass = opt_name in SAM_CLS or opt_name in CHEAP
        self.step_s, self.epoch_s, self.sam_steps = 0.0, [], 0

    def epoch(self) -> None:
        xtr, ytr = self.data[0], self.data[1]
        model, opt, loss_fn = self.model, self.opt, self.loss_fn
        model.train()
        t_epoch = time.perf_counter()
        for idx in torch.randperm(len(xtr), generator=self.gen).split(self.batch):
            x, y = xtr[idx], ytr[idx]
            loss_fn(model(x), y).backward()
            if self.two_pass:
                t0 = time.perf_counter()
                again = opt.first_step(zero_grad=True)
                self.step_s += time.perf_counter() - t0
                if again:
                    self.sam_steps += 1
                    loss_fn(model(x), y).backward()
                    t0 = time.perf_counter()
                    opt.second_step(zero_grad=True)
                    self.step_s += time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                opt.step()
                self.step_s += time.perf_counter() - t0
                opt.zero_grad()
        self.sched.step()
        self.epoch_s.append(time.perf_counter() - t_epoch)

    def result(self) -> dict:
        xte, yte = self.data[2], self.data[3]
        self.model.eval()
        at_w = self.opt.at_w() if hasattr(self.opt, "at_w") else contextlib.nullcontext()
        with torch.no_grad(), at_w:     # MSAM's model holds w~ between steps; evaluate at w
            acc = (self.model(xte).argmax(1) == yte).float().mean().item()
        return {"acc": acc, "epoch_s": statistics.median(self.epoch_s),
                "epoch_times": list(self.epoch_s), "step_ms": self.step_s / self.n_steps * 1e3,
                "opt_share": self.step_s / sum(self.epoch_s),
                "sam_frac": self.sam_steps / self.n_steps,
                "backend": getattr(self.opt, "backend", "torch")}


def train_interleaved(dataset, data, names, seed: int, epochs: int, batch: int) -> dict:
    """Every optimizer of ``names`` on seed ``seed``, epoch by epoch in turn (the order
    rotated every epoch), so that load from other processes falls on all of them alike."""
    runs = {name: Run(dataset, data, name, seed, epochs, batch) for name in names}
    order = list(names)
    for e in range(epochs):
        for name in order[e % len(order):] + order[:e % len(order)]:
            runs[name].epoch()
    return {name: run.result() for name, run in runs.items()}


def step_times(dataset, data, algos, repeats: int, batch: int) -> dict:
    """Median µs of one optimizer step alone (first + second), per algorithm and provider."""
    xtr, ytr = data[0], data[1]
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = model_for(dataset)
    grads = []
    for k in range(3):      # three real gradient sets, from three batches
        model.zero_grad()
        loss_fn(model(xtr[k * batch:(k + 1) * batch]), ytr[k * batch:(k + 1) * batch]).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    init = [p.detach().clone() for p in model.parameters()]
    names = ["eager"] + [f"sharpopt:{b}" for b in sharpopt.available_backends(torch.device("cpu"))
                         if b != "triton"]
    out = {}
    for algo in algos:
        row = {}
        for name in names:
            ps = ParamSet(dataset, dataset, [nn.Parameter(v.clone()) for v in init], grads)
            if name == "eager":
                opt = P.Plain(ps.params, algo, "sgd", loop=True)
            else:
                opt = SAM_CLS[algo](ps.params, torch.optim.SGD, backend=name.split(":")[1],
                                    **SAM_KW[algo], **SGD_KW)
            for _ in range(5):
                P.run_step(opt, ps, algo)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                P.run_step(opt, ps, algo)
                ts.append(time.perf_counter() - t0)
            row[name] = statistics.median(ts) * 1e6
        out[algo] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, fewer epochs")
    ap.add_argument("--seeds", type=int, help="default 5 (quick 3)")
    ap.add_argument("--datasets", default="digits,cancer")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: these models are tiny, and on a "
                         "busy 2-core machine two threads made an epoch ~40x slower)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (3 if args.quick else 5)
    epochs = {"digits": 10 if args.quick else 20, "cancer": 20 if args.quick else 50}
    opts = [o.strip() for o in args.optimizers.split(",")]
    datasets = [d.strip() for d in args.datasets.split(",")]
    print(f"sharpopt {sharpopt.__version__} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | {seeds} seeds | batch {args.batch}", flush=True)
    started = time.perf_counter()
    record = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m bench.demo " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "sharpopt": sharpopt.__version__,
              "threads": torch.get_num_threads(), "seeds": seeds, "epochs": epochs,
              "results": {}, "step_us": {}}
    for ds in datasets:
        data = load(ds)
        print(f"\n== {ds}: {len(data[0])} train / {len(data[2])} test, {epochs[ds]} epochs, "
              f"{sum(p.numel() for p in model_for(ds).parameters())} parameters", flush=True)
        print(f"{'optimizer':<13} {'test acc % (mean ± std)':>24} {'s/epoch':>8} "
              f"{'x SGD':>6} {'opt %':>6} {'SAM %':>6} {'step ms':>8}  backend")
        res = {}
        per_seed = [train_interleaved(ds, data, opts, s, epochs[ds], args.batch)
                    for s in range(seeds)]
        for name in opts:
            runs = [r[name] for r in per_seed]
            accs = [100 * r["acc"] for r in runs]
            res[name] = {key: [r[key] for r in runs]
                         for key in ("epoch_s", "epoch_times", "step_ms", "opt_share",
                                     "sam_frac")}
            res[name].update(acc=accs, backend=runs[0]["backend"])
            epoch = statistics.median(res[name]["epoch_s"])
            # Relative cost: the median over every (seed, epoch) of this optimizer's epoch
            # time over SGD's epoch of the same seed and index, run moments apart.
            rel = float("nan")
            if "sgd" in opts:
                rel = statistics.median(
                    t / t_sgd for r, r_sgd in zip(runs, [x["sgd"] for x in per_seed])
                    for t, t_sgd in zip(r["epoch_times"], r_sgd["epoch_times"]))
            res[name]["epoch_vs_sgd"] = rel
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"{name:<13} {statistics.mean(accs):>15.2f} ± {sd:5.2f} {epoch:>8.3f} "
                  f"{rel:>6.2f} {100 * statistics.median(res[name]['opt_share']):>6.1f} "
                  f"{100 * statistics.median(res[name]['sam_frac']):>6.1f} "
                  f"{statistics.median(res[name]['step_ms']):>8.3f}  {runs[0]['backend']}", flush=True)
        record["results"][ds] = res
        algos = [o for o in opts if o in SAM_CLS]
        if algos:
            st = step_times(ds, data, algos, 30 if args.quick else 100, args.batch)
            record["step_us"][ds] = st
            cols = list(next(iter(st.values())))
            print(f"\n   optimizer step alone, median µs (first_step + second_step), {ds} model:")
            print("   " + f"{'':<12}" + "".join(f"{c:>20}" for c in cols))
            for algo, row in st.items():
                print("   " + f"{algo:<12}" + "".join(f"{row[c]:>20.0f}" for c in cols))
    elapsed = time.perf_counter() - started
    record["elapsed_s"] = elapsed
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"demo-cpu-{_dt.date.today().isoformat()}"
                                  f"{'-quick' if args.quick else ''}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"\nwrote {os.path.relpath(path)} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
