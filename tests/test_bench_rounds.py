"""The benchmarks' round order (bench/rounds.py): every round times each candidate once, and
no candidate always follows the same one (its cost would carry that neighbour's)."""
from bench.rounds import rounds


def test_each_round_is_a_permutation_and_reruns_repeat():
    names = [f"c{i}" for i in range(7)]
    got = rounds(names, 50, seed=3)
    assert len(got) == 50
    for i, order in enumerate(got):
        assert sorted(order) == sorted(names), f"round {i} is not a permutation: {order}"
    assert got == rounds(names, 50, seed=3), "the same seed must give the same sequence"
    assert got != rounds(names, 50, seed=4)


def test_no_candidate_always_follows_the_same_one():
    names = list(range(5))
    predecessors = {k: set() for k in names}
    for order in rounds(names, 40):
        for before, after in zip(order, order[1:]):
            predecessors[after].add(before)
    for k, seen in predecessors.items():
        assert len(seen) >= 3, f"candidate {k} followed only {sorted(seen)} in 40 rounds"
