"""pytest-benchmark timings of each backend pass, on demand: ``pytest bench/``.

(The project's test run collects ``tests/`` only; these files are benchmarks.)

Each backend the device offers (``sharpopt.available_backends``; Triton on CPU tensors is
the interpreter and is skipped) runs each pass over a ResNet-18-shaped set and the
many-small-tensors set, fp32:

* ``sumsq``        — the global-norm pass (read g: 4 B/param);
* ``perturb``      — ``saved ← w; w ← w + s·g`` (read g, w; write w, saved: 16 B/param);
* ``restore_sgd``  — ``w ← saved`` + SGD-momentum update (read saved, g, m; write m, w: 20 B);
* ``restore_adam`` — ``w ← saved`` + AdamW update (read saved, g, m, v; write m, v, w: 28 B).

``extra_info`` of each benchmark holds the parameter count, the pass's byte model and the
GB/s at the median time (``--benchmark-json`` writes them out).
"""
from __future__ import annotations

import pytest
import torch

import sharpopt
from sharpopt.backends import resolve

from .workloads import make_params

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in sharpopt.available_backends(DEVICE)
            if not (b == "triton" and DEVICE.type == "cpu")]
WORKLOADS = ["resnet18", "small"]
BYTES = {"sumsq": 4, "perturb": 16, "restore_sgd": 20, "restore_adam": 28}


@pytest.fixture(scope="module", params=WORKLOADS)
def tensors(request):
    ps = make_params(request.param, torch.float32, DEVICE, n_grads=1)
    params = [p.detach() for p in ps.params]
    grads = ps.grad_sets[0]
    return {
        "name": request.param, "params": params, "grads": grads,
        "saved": [p.clone() for p in params],
        "m": [torch.zeros_like(p) for p in params],
        "v": [torch.zeros_like(p) for p in params],
        "n": sum(p.numel() for p in params),
    }


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, tensors, pass_name, fn):
    def call():
        fn()
        _sync()

    benchmark.group = f"{pass_name} {tensors['name']}"
    benchmark.pedantic(call, rounds=7, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        n_params=tensors["n"], bytes_per_param=BYTES[pass_name],
        gbs=BYTES[pass_name] * tensors["n"] / median / 1e9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sumsq(benchmark, tensors, backend):
    ops = resolve(backend, DEVICE)
    _run(benchmark, tensors, "sumsq", lambda: ops.sumsq(
        tensors["grads"], tensors["params"], adaptive=False, eta=0.0, centralize=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb(benchmark, tensors, backend):
    ops = resolve(backend, DEVICE)
    scale = torch.tensor(1e-3, device=DEVICE)
    _run(benchmark, tensors, "perturb", lambda: ops.perturb(
        tensors["params"], tensors["grads"], tensors["saved"], scale, adaptive=False, eta=0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_sgd(benchmark, tensors, backend):
    ops = resolve(backend, DEVICE)
    if not ops.fuses_base_update:
        pytest.skip(f"{backend} does not merge the restore with the base update "
                    "(it restores, then torch.optim steps)")
    _run(benchmark, tensors, "restore_sgd", lambda: ops.restore_sgd(
        tensors["params"], tensors["saved"], tensors["grads"], tensors["m"], lr=0.01,
        weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
        init_buffers=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_adam(benchmark, tensors, backend):
    ops = resolve(backend, DEVICE)
    if not ops.fuses_base_update:
        pytest.skip(f"{backend} does not merge the restore with the base update")
    _run(benchmark, tensors, "restore_adam", lambda: ops.restore_adam(
        tensors["params"], tensors["saved"], tensors["grads"], tensors["m"], tensors["v"], [],
        step=10, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
        decoupled=True, amsgrad=False, maximize=False))
