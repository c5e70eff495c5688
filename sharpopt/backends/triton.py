"""Backend ``triton``: the fused passes as multi-tensor Triton kernels.

For a GPU user without a compiler toolchain: ``pip install`` brings Triton, and each pass
is one launch (a few for very large parameter sets, and one per row-length class for the
gradient-centralisation row sums) over every tensor of a (device, dtype) group, through
address tables cached per parameter set (``sharpopt/kernels/tables.py``). Norms and
scales stay in device memory; reductions are deterministic (per-program partials, then a
fixed-order sum) and accumulate in fp32 (fp64 for fp64 tensors). Supported dtypes: fp32,
fp16, bf16 and fp64; others raise TypeError.

It runs on CUDA tensors, and on CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported), which is how its tests run without
a GPU. With the interpreter on, CUDA tensors are refused: the interpreter would follow
the tables' device addresses on the host.

Tables are built on the first call for a parameter set (a host-to-device copy) and
cached. CUDA graphs: capture after one eager step (it compiles every kernel variant the
step needs; the first SGD step is a runtime argument, not a separate variant). Tables used
or built during a capture stay alive for the rest of the process, as the graph keeps
their addresses; a table missed during a capture (gradients allocated in the graph's
pool, as with ``zero_grad(set_to_none=True)``) is uploaded from pinned host memory by an
asynchronous copy that becomes part of the graph.
``sharpopt.kernels.tables.release_captured_plans()`` frees them once the graphs are gone.
"""
from __future__ import annotations

import functools
import os

import torch

from . import BackendUnavailable
from .base import Ops


def load() -> Ops:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing at import
        raise BackendUnavailable(
            f"cannot import triton ({type(exc).__name__}: {exc}); install it with "
            "`pip install triton` (PyTorch's CUDA wheels for Linux bring it)"
        ) from None
    return TritonOps()


class TritonOps(Ops):
    name = "triton"
    fuses_base_update = True
    requires_dense = True
    guards_nonfinite = True

    def __init__(self):
        from ..kernels import lincomb, msam, norm, perturb, restore_update
        self.sumsq = _on_tensors_device(norm.sumsq)
        self.dot = _on_tensors_device(norm.dot)
        self.perturb = _on_tensors_device(perturb.perturb)
        self.restore = _on_tensors_device(lincomb.restore)
        self.lincomb = _on_tensors_device(lincomb.lincomb)
        self.restore_sgd = _on_tensors_device(restore_update.restore_sgd)
        self.restore_adam = _on_tensors_device(restore_update.restore_adam)
        self.msam_sgd = _on_tensors_device(msam.msam_sgd)
        self.msam_adam = _on_tensors_device(msam.msam_adam)

    def supports(self, device: torch.device) -> bool:
        device = torch.device(device)
        if os.environ.get("TRITON_INTERPRET") == "1":
            return device.type == "cpu"
        return device.type == "cuda"


def _on_tensors_device(launcher):
    """Triton launches on the current CUDA device; make it the tensors' (the first
    argument of every pass is a list of them).

    Under ``torch.compile`` a pass runs eagerly between the compiled graphs: the address
    tables come from ``data_ptr()`` on the host, which the tracer cannot follow."""
    @functools.wraps(launcher)
    def run(tensors, *args, **kwargs):
        if len(tensors) and tensors[0].is_cuda:
            device = tensors[0].device
            if device.index is not None and device.index != torch.cuda.current_device():
                with torch.cuda.device(device):
                    return launcher(tensors, *args, **kwargs)
        return launcher(tensors, *args, **kwargs)

    eager = torch.compiler.disable(run)

    @functools.wraps(launcher)
    def dispatch(*args, **kwargs):
        # Only a trace goes through the disabled wrapper, so eager steps pay nothing.
        return eager(*args, **kwargs) if torch.compiler.is_compiling() else run(*args, **kwargs)
    return dispatch
