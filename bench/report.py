"""Output of ``python -m bench``: the terminal table, the JSON record and the PNG chart."""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import List

import torch


def machine_info(device: torch.device) -> dict:
    """Device, CPU, thread count and library versions, for the JSON record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    for mod in ("sharpopt", "numpy", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def _fmt_row(r: dict, low: bool = False) -> List[str]:
    if "na" in r:
        return [r["provider"], "n/a", "", "", "", "", "", "", "", r["na"]]
    q = r["ms"]
    mem = f"{r['mem_peak_added_mb']:.0f}" if "mem_peak_added_mb" in r else "-"
    return [
        r["provider"], f"{q['median']:.2f}", f"{q['q25']:.2f}-{q['q75']:.2f}", str(q["n"]),
        f"{r['gbs']:.2f}", f"{100 * r['frac_triad']:.0f}%", mem,
        f"{r['speedup']:.2f}x" if "speedup" in r else "-",
        f"{r['diff']:.0e}" if low is False else f"{r.get('diff_ulp', float('nan')):.1f}ulp", "",
    ]


HEADER = ["provider", "ms/step", "IQR ms", "n", "GB/s", "%triad", "peak+MB", "vs eager",
          "diff", "note"]


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [c.ljust(w) if i in (0, len(r) - 1) else c.rjust(w) for i, (c, w) in
                 enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _triad(case: dict, bw: dict) -> float:
    """The triad GB/s a case's %triad is taken against: the median of the triads timed in
    its own rounds (results written before those existed: the best triad of the start)."""
    return case["triad_gbs"]["median"] if "triad_gbs" in case else bw["triad"]["best_gbs"]


def format_case(case: dict, bw: dict) -> str:
    base = "" if case["algo"] == "rbo" else f" + {case['base']}"
    head = (f"== {case['title']} ({case['n_params'] / 1e6:.2f}M params, {case['n_tensors']} "
            f"tensors) {case['dtype']} {case['algo']}{base}: byte model "
            f"{case['model_bytes_per_param']:g} B/param, floor "
            f"{case['model_bytes_per_param'] * case['n_params'] / _triad(case, bw) / 1e6:.2f}"
            f" ms at triad {_triad(case, bw):.1f} GB/s (median, timed in the same rounds)")
    low = case["dtype"] in ("bf16", "fp16")
    body = _table([HEADER] + [_fmt_row(r, low) for r in case["rows"]])
    what = ("diff = max|w - w_ref| in units of the dtype's spacing at the largest weight" if low
            else "diff = max|w - w_ref| / max|w_ref - w0|")
    foot = (f"   (gradient hand-over {case['handover_ms']:.3f} ms/step, included; {what}, "
            "w_ref = sharpopt reference, after the first step)")
    return "\n".join([head, body, foot])


def summary(result: dict) -> str:
    """One line per case: the best sharpopt backend against the eager wrapper."""
    lines = ["", "summary (median ms/step; speed-up over the eager for-loop wrapper):"]
    for c in result["cases"]:
        timed = [r for r in c["rows"] if "ms" in r]
        eager = next((r for r in timed if r["provider"] == "eager"), None)
        ours = [r for r in timed if r["provider"].startswith("sharpopt:")]
        if not eager or not ours:
            continue
        best = min(ours, key=lambda r: r["ms"]["median"])
        base = "" if c["algo"] == "rbo" else f"+{c['base']}"
        lines.append(
            f"  {c['title']:<20} {c['dtype']:<5} {c['algo']}{base:<7} eager "
            f"{eager['ms']['median']:8.2f} ms -> {best['provider']} {best['ms']['median']:8.2f}"
            f" ms  ({best['speedup']:.2f}x, {100 * best['frac_triad']:.0f}% of triad)")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=False)
        f.write("\n")


def plot(result: dict, path: str) -> None:
    """One panel per case (GB/s of each provider, with the copy and triad ceilings), then
    one per host-cost table (µs per tensor of each step, see :mod:`bench.bench_host`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    host = result.get("host_us_per_tensor") or {}
    panels = len(cases) + len(host)
    if not panels:
        return
    ncol = min(2, panels)
    nrow = (panels + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(7.5 * ncol, 3.2 * nrow), squeeze=False)
    flat = list(axes.flat)
    for ax, c in zip(flat, cases):
        _case_panel(ax, c, result["bandwidth"])
    for ax, (title, rows) in zip(flat[len(cases):], host.items()):
        _host_panel(ax, title, rows)
    for ax in flat[panels:]:
        ax.axis("off")
    m = result["machine"]
    fig.suptitle(f"sharpopt step benchmark: {m['device_name']}, {m['threads']} threads, "
                 f"torch {m['torch']} ({result['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _case_panel(ax, c: dict, bw: dict) -> None:
    rows = [r for r in c["rows"] if "ms" in r]
    names = [r["provider"] for r in rows]
    gbs = [r["gbs"] for r in rows]
    lo = [r["gbs"] - c["model_bytes_per_param"] * c["n_params"] / (r["ms"]["q75"] / 1e3) / 1e9
          for r in rows]
    hi = [c["model_bytes_per_param"] * c["n_params"] / (r["ms"]["q25"] / 1e3) / 1e9 - r["gbs"]
          for r in rows]
    colors = ["#4c72b0" if n.startswith("sharpopt") else "#999999" for n in names]
    y = range(len(rows))
    ax.barh(y, gbs, xerr=[lo, hi], color=colors, capsize=2)
    for yi, r, h in zip(y, rows, hi):
        ax.text(r["gbs"] + h, yi, f"  {r['ms']['median']:.1f} ms ({r.get('speedup', 1):.1f}x)",
                va="center", fontsize=7)
    ax.axvline(_triad(c, bw), color="#c44e52", ls="--", lw=1, label="triad")
    ax.axvline(bw["copy"]["best_gbs"], color="#dd8452", ls=":", lw=1, label="copy")
    ax.set_yticks(list(y))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    base = "" if c["algo"] == "rbo" else f" + {c['base']}"
    ax.set_title(f"{c['title']} {c['dtype']}, {c['algo']}{base} "
                 f"({c['model_bytes_per_param']:g} B/param)", fontsize=9)
    ax.set_xlabel("GB/s (byte model / median step time; bars: IQR)", fontsize=8)
    ax.set_xlim(0, max(gbs + [_triad(c, bw), bw["copy"]["best_gbs"]]) * 1.35)
    ax.legend(fontsize=7, loc="lower right")


def _host_panel(ax, title: str, rows: dict) -> None:
    """Median µs per tensor of each step (bars: q25-q75), on a log scale: the reference
    is two orders of magnitude above the fused steps."""
    names = list(rows)
    med = [rows[n]["median_us_per_tensor"] for n in names]
    lo = [m - rows[n]["q25_us_per_tensor"] for m, n in zip(med, names)]
    hi = [rows[n]["q75_us_per_tensor"] - m for m, n in zip(med, names)]
    colors = ["#4c72b0" if n.startswith("sharpopt") else "#999999" for n in names]
    y = range(len(names))
    ax.barh(y, med, xerr=[lo, hi], color=colors, capsize=2)
    for yi, m, h in zip(y, med, hi):
        ax.text(m + h, yi, f"  {m:.2f}", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_yticks(list(y))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(f"host cost: {title} (one element each; SAM = both passes)", fontsize=9)
    ax.set_xlabel("µs per tensor (median; bars: q25-q75; log scale)", fontsize=8)
    ax.set_xlim(min(med) / 2, max(med) * 4)
