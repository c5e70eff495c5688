"""The order in which an interleaved benchmark times its candidates, round by round.

Every benchmark here times its candidates interleaved (each round times every candidate
once), so that a burst of load from elsewhere on a shared machine falls on all of them
alike. The order inside a round matters too: what ran just before a step decides what is
left in the caches and in the C allocator's free lists when the step starts, and on
small tensors that is most of the step's host cost. A fixed or rotated order keeps the
cyclic order, so each candidate always follows the same neighbour and carries that
neighbour's cost as its own. Measured with ``bench_host`` (1200 one-element tensors, SAM +
SGD on ``cpu``, rotated order, one run each): the step that followed torch's foreach step
took 0.66 µs per tensor with the default check and 0.57 without it; with the two swapped
in the list, 0.58 and 0.62. Each round therefore takes a fresh random order, seeded so that
a rerun times the same sequence.
"""
from __future__ import annotations

import random
from typing import List, Sequence, TypeVar

K = TypeVar("K")


def rounds(names: Sequence[K], repeat: int, seed: int = 0) -> List[List[K]]:
    """``repeat`` rounds, each every name of ``names`` once, in a random order of its own."""
    rng = random.Random(seed)
    out = []
    for _ in range(repeat):
        order = list(names)
        rng.shuffle(order)
        out.append(order)
    return out
