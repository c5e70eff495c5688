"""The algorithm registry: a new algorithm needs its module and one entry, nothing else.

A throwaway algorithm (SAM with its ascent radius halved, written with SAM's passes) is
registered by a fixture and runs through the backend-equivalence suite of
``tests/test_backends.py``: the suite reads the registry when asked, so the same check
functions pick the entry up with no other edit. A twin whose fast path diverges from the
reference is caught by the same checks.
"""
from __future__ import annotations

import pytest
import torch

import sharpopt
from sharpopt import registry
from test_backends import (BASES, DTYPES, LATE_BASES, check_late_gradient,
                           check_matches_reference, equivalence_cases)


class HalfSAM(sharpopt.SAM):
    """SAM whose ascent has radius ``rho / 2``: ``e = (rho / 2) · g / (‖g‖ + eps)``."""

    def _rho(self, group: dict):
        return group["rho"] / 2


class DivergingHalfSAM(sharpopt.SAM):
    """HalfSAM on ``reference`` only: every fast backend takes SAM's full radius, i.e. a
    fast path that diverges from the reference (what the suite must catch)."""

    def _rho(self, group: dict):
        return group["rho"] / 2 if self.backend == "reference" else group["rho"]


def _entry(name, cls):
    return registry.Algorithm(
        name, cls, registry.TWO_PASS, ("sumsq", "perturb", *registry.RESTORE_UPDATE),
        defaults=dict(rho=0.1),
        cases=(registry.Case(f"{name}-k2", dict(rho=0.1, k=2), registry.EQUIVALENCE),))


@pytest.fixture
def half_sam():
    with registry.registered(_entry("HalfSAM", HalfSAM)) as entry:
        yield entry
    assert "HalfSAM" not in registry.ALGORITHMS


def _cases_of(entry):
    found = {i: c for i, c in equivalence_cases(with_base=True).items() if c[0] is entry}
    assert list(found) == ["HalfSAM", "HalfSAM-k2"], f"the suite sees {list(found)}"
    return found


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("base", list(BASES))
def test_registered_algorithm_runs_through_the_equivalence_suite(fast_backend, half_sam,
                                                                 base, dtype):
    """Rule: an algorithm registered with its defaults (and one extra case) is compared
    with ``reference`` by the equivalence suite's own check, every base and dtype."""
    for case_id, (entry, kwargs) in _cases_of(half_sam).items():
        check_matches_reference(fast_backend, entry, kwargs, base, dtype)


@pytest.mark.parametrize("base", LATE_BASES)
def test_registered_two_pass_algorithm_gets_the_late_gradient_rule(fast_backend, half_sam,
                                                                   base):
    entry, kwargs = _cases_of(half_sam)["HalfSAM"]
    assert entry.protocol == registry.TWO_PASS
    check_late_gradient(fast_backend, entry, kwargs, base)


def test_halved_radius_changes_the_trajectory():
    """The throwaway is a different algorithm from SAM (else the suite above would prove
    nothing about the registration): same inputs, different weights after one step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    v = torch.nn.Parameter(w.detach().clone())
    loss = lambda p: (p ** 4).sum()                      # noqa: E731  curvature: e matters
    for cls, p in ((HalfSAM, w), (sharpopt.SAM, v)):
        opt = cls([p], torch.optim.SGD, rho=0.5, lr=0.1, backend="reference")
        opt.step(lambda p=p: loss(p).backward() or loss(p))
    assert not torch.allclose(w, v), "HalfSAM stepped like SAM"


def test_a_diverging_fast_path_is_caught(fast_backend):
    """Rule: the equivalence check fails when a registered algorithm's fast path differs
    from its reference (the suite can fail: the checks above are not vacuous)."""
    with registry.registered(_entry("DivergingHalfSAM", DivergingHalfSAM)):
        entry, kwargs = equivalence_cases(with_base=True)["DivergingHalfSAM"]
        with pytest.raises(AssertionError, match="step 0"):
            check_matches_reference(fast_backend, entry, kwargs, "SGD-nesterov-wd",
                                    torch.float32)
    assert "DivergingHalfSAM" not in registry.ALGORITHMS


# -- the registry's own rules ---------------------------------------------------------
def test_every_suite_case_builds_its_algorithm():
    """Every case's keywords are accepted by its constructor (a typo is caught here,
    not by a suite that happens to skip)."""
    for suite in registry.SUITES:
        for case_id, (entry, kwargs) in registry.cases(suite).items():
            kwargs = dict(kwargs)
            base = kwargs.pop("base_optimizer", None)
            if suite not in (registry.COMPILED, registry.SHARDED) and entry.base:
                base = torch.optim.SGD
            p = torch.nn.Parameter(torch.zeros(3))
            lr = {} if "lr" in kwargs or not entry.base else {"lr": 0.1}
            opt = entry.build([p], base, backend="reference", **kwargs, **lr)
            assert isinstance(opt, entry.cls), f"{suite}/{case_id}"


def test_registry_describes_the_classes():
    """What the entries declare matches the classes: closure needs, the loss-scale fold,
    and every exported algorithm is registered."""
    assert set(registry.ALGORITHMS) == {n for n in sharpopt.__all__
                                        if isinstance(getattr(sharpopt, n), type)
                                        and issubclass(getattr(sharpopt, n),
                                                       torch.optim.Optimizer)}
    for entry in registry.ALGORITHMS.values():
        p = torch.nn.Parameter(torch.zeros(3))
        base = (torch.optim.SGD if entry.base else None)
        extra = dict(momentum=0.9) if entry.protocol == registry.ONE_PASS else {}
        opt = entry.build([p], base, lr=0.1, **extra)
        p.grad = torch.ones(3)
        if entry.protocol == registry.TWO_PASS:
            assert opt.first_step() in (True, False), entry.name
        else:
            with pytest.raises(RuntimeError):
                opt.first_step()
        if entry.base and entry.protocol != registry.ONE_PASS:
            assert opt._scale_free_ascent == entry.folds_loss_scale, entry.name


@pytest.mark.parametrize("change,match", [
    (dict(protocol="sometimes"), "protocol must be"),
    (dict(passes=("sumsq", "teleport")), "not passes of Ops"),
    (dict(fused_bases=(torch.optim.RMSprop,)), "merge only"),
    (dict(base=False), "fused_bases must be"),
    (dict(cases=(registry.Case("X", {}, "nightly"),)), "unknown suites"),
    (dict(cases=(registry.Case("SAM", {}, registry.RHO_ZERO),)), "already used"),
    (dict(cases=(registry.Case("X", dict(rho=0.3), registry.EQUIVALENCE),),
          defaults=dict(rho=0.1)), None),
])
def test_bad_entries_are_refused(change, match):
    fields = dict(name="X", cls=HalfSAM, protocol=registry.TWO_PASS,
                  passes=("sumsq", "perturb"), defaults=dict(rho=0.3))
    fields.update(change)
    entry = registry.Algorithm(**fields)
    if match is None:      # an equivalence case named like the entry must be the defaults
        match = "must use the defaults"
    with pytest.raises((ValueError, TypeError), match=match):
        registry.register(entry)
    assert "X" not in registry.ALGORITHMS


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.ALGORITHMS["SAM"])
    with pytest.raises(ValueError, match="unknown suite"):
        registry.cases("nightly")
