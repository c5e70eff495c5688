"""The bandwidth probe every benchmark here compares with: the STREAM triad.

``a = b + s·c`` on fp32 arrays far larger than the caches moves 12 B per element (two
reads and a write, the STREAM convention); a pass's byte-model GB/s over the triad's is its
"% of triad". On the CPU the extension's own triad is timed too: it runs with the passes'
threading and vector code, so it shows what that code can reach.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

#: Bytes the triad counts per element.
BYTES_PER_ELEMENT = 12


def triads(device: torch.device, n: int) -> Dict[str, Callable[[], None]]:
    """The triad on fp32 arrays of ``n`` elements on ``device``, as callables: ``"torch"``
    (``torch.add``) and, on the CPU where the extension loads, ``"c++"``."""
    a = torch.empty(n, device=device)
    b = torch.rand(n, device=device)
    c = torch.rand(n, device=device)
    out = {"torch": lambda: torch.add(b, c, alpha=0.5, out=a)}
    if torch.device(device).type == "cpu":
        try:
            from sharpopt._build import load_extension
            ext = load_extension("cpu")
        except Exception:  # no extension here: torch.add alone
            return out
        out["c++"] = lambda: ext.triad(a, b, c, 0.5)
    return out
