"""Shared test setup: which backends the suites run, and comparison helpers.

Every fast backend is compared with ``reference``. A backend that cannot run here is
skipped with its reason, unless it is named in ``$SHARPOPT_REQUIRE_BACKENDS`` (comma
separated; CI names the ones this machine must have), in which case that is a failure.
``$SHARPOPT_TEST_BACKENDS`` narrows the list (e.g. ``triton`` under the interpreter).
"""
from __future__ import annotations

import os

import torch

# Triton kernels run on CPU tensors only under its interpreter, which must be switched on
# before triton is first imported. Without a GPU the whole session runs that way (it
# changes nothing for code that is not a Triton kernel).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sharpopt.backends import BACKENDS, BackendUnavailable, _load  # noqa: E402
from tolerances import TRAJECTORY  # noqa: E402

FAST_BACKENDS = [n for n in BACKENDS if n != "reference"]
_only = os.environ.get("SHARPOPT_TEST_BACKENDS")
if _only:
    FAST_BACKENDS = [n.strip() for n in _only.split(",") if n.strip()]
REQUIRED = {n.strip() for n in os.environ.get("SHARPOPT_REQUIRE_BACKENDS", "").split(",")
            if n.strip()}

# Elementwise tolerances for whole multi-step trajectories: tests/tolerances.py says why.
TOL = TRAJECTORY


def require_backend(name: str, device: torch.device = torch.device("cpu")):
    """The backend's Ops, or skip (fail when the backend is required)."""
    try:
        ops = _load(name)
        if not ops.supports(device):
            raise BackendUnavailable(f"backend {name!r} does not run on {device.type} here")
    except BackendUnavailable as exc:
        if name in REQUIRED:
            pytest.fail(f"required backend unavailable: {exc}")
        pytest.skip(str(exc))
    return ops


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, dtype=None):
    """``torch.testing.assert_close`` with the per-dtype tolerance and a message naming
    ``what`` (e.g. ``"step 3, param 2 (conv.weight), exp_avg"``)."""
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(
        actual.float() if actual.dtype != torch.float64 else actual,
        expected.float() if expected.dtype != torch.float64 else expected,
        rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}",
    )


#: Every backend, the reference included.
ALL_BACKENDS = ["reference", *FAST_BACKENDS]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Each backend in turn, ``reference`` included (skipped where it cannot run, a failure
    where it is required)."""
    require_backend(request.param)
    return request.param


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    require_backend(request.param)
    return request.param


def capture_after_warmup(step):
    """A CUDA graph of ``step()``, captured after one eager warm-up call on a side stream
    (which allocates the state and scratch and builds the kernels' address tables), as
    torch's capture recipe asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def fixed_gradient_step(params, opt, g1, g2):
    """One two-pass step on fixed gradients (``g1`` in the first pass, ``g2`` in the
    second) copied into the existing gradient buffers: no allocation, no host read, so it
    can be captured in a CUDA graph."""
    def step():
        torch._foreach_copy_([p.grad for p in params], g1)
        opt.first_step()
        torch._foreach_copy_([p.grad for p in params], g2)
        opt.second_step()
    return step


def replay_beside_eager(step, ref_step, replays: int = 3):
    """Capture ``step`` (after its warm-up) and replay it ``replays`` times, each beside
    one eager ``ref_step`` (plus the reference's own warm-up step): afterwards both sides
    have taken ``replays + 1`` steps. Returns the graph."""
    graph = capture_after_warmup(step)
    ref_step()                      # the warm-up (capturing records the work, runs none)
    for _ in range(replays):
        graph.replay()
        ref_step()
    torch.cuda.synchronize()
    return graph
