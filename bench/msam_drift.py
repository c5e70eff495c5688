"""``python -m bench.msam_drift``: how far MSAM's move back and forth drifts over a long run.

MSAM keeps no copy of ``w``: each step moves ``w~ = w − s·m`` back with ``w = w~ + s·m``, which
rounds. To see that rounding alone, the run is built so that exact arithmetic gives MSAM and
plain SGD the *same* ``w`` at every step: the gradients are a fixed random sequence (they
do not depend on the weights) and there is no weight decay, so the momentum is the same in
both runs and the moves cancel exactly. Whatever separates MSAM's ``w`` (read inside
``at_w()``) from SGD's is the accumulated round-trip error. It is printed next to plain
SGD's own rounding error (its fp32 or bf16 run against an fp64 run on the same inputs), in
units of the weights' rms, after every ``--every`` steps.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys

import torch

import sharpopt


def run(dtype, steps, n, every, backend, rho, lr, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=gen)
    p_msam = torch.nn.Parameter(w0.to(dtype).clone())
    p_sgd = torch.nn.Parameter(w0.to(dtype).clone())
    p_64 = torch.nn.Parameter(w0.to(dtype).double())
    kw = dict(lr=lr, momentum=0.9)
    opt = sharpopt.MSAM([p_msam], torch.optim.SGD, rho=rho, backend=backend, **kw)
    sgd = torch.optim.SGD([p_sgd], **kw)
    sgd64 = torch.optim.SGD([p_64], **kw)
    rows = []
    for t in range(1, steps + 1):
        g = torch.randn(n, generator=gen).to(dtype)
        for p in (p_msam, p_sgd, p_64):
            p.grad = g.to(p.dtype)
        opt.step()
        sgd.step()
        sgd64.step()
        if t % every == 0 or t == steps:
            with opt.at_w():
                w = p_msam.detach().double()
            ref, exact = p_sgd.detach().double(), p_64.detach()
            rms = exact.square().mean().sqrt().item()
            ulp = torch.finfo(dtype).eps
            rows.append({
                "step": t,
                "msam_vs_sgd_rms": ((w - ref).square().mean().sqrt().item() / rms),
                "msam_vs_sgd_max": ((w - ref).abs().max().item() / rms),
                "sgd_vs_fp64_rms": ((ref - exact).square().mean().sqrt().item() / rms),
                "msam_vs_fp64_rms": ((w - exact).square().mean().sqrt().item() / rms),
                "elements_moved": int((w != ref).sum().item()),
                "ulp_of_dtype": ulp,
                "perturbation_rms": rho / n ** 0.5 / rms,
            })
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--rho", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    result = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m bench.msam_drift " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "args": vars(args), "runs": {}}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        rows = run(dtype, args.steps, args.n, args.every, args.backend, args.rho, args.lr)
        result["runs"][name] = rows
        print(f"{name}: relative to rms(w); 'msam-sgd' is the round trip's drift alone")
        print(f"  {'step':>7} {'msam-sgd rms':>13} {'msam-sgd max':>13} {'sgd-fp64 rms':>13} "
              f"{'msam-fp64 rms':>14} {'moved':>8}")
        for r in rows:
            print(f"  {r['step']:>7} {r['msam_vs_sgd_rms']:>13.3e} {r['msam_vs_sgd_max']:>13.3e} "
                  f"{r['sgd_vs_fp64_rms']:>13.3e} {r['msam_vs_fp64_rms']:>14.3e} "
                  f"{r['elements_moved']:>8}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
