"""Backend ``cuda``: the fused passes as hand-written CUDA kernels.

The same per-element math as the ``cpu`` backend (``csrc/sharpopt_math.h``), launched
through sharpopt's own multi-tensor apply: one launch covers a table of tensors passed as
the kernel argument (under 4 KiB; each block finds its tensor and chunk in it), loads are
16-byte vectors when every pointer of a chunk is aligned, and a list whose tensors do not
fit one table (66 to 198 tensors, by the number of operand lists) takes several launches.
``sumsq`` and ``dot`` are two-stage reductions (per-block partials, then one block adds
them in a fixed order): deterministic, and the result stays on the device. Scalars given
as 0-dim tensors are read by the kernels from device memory, so no pass synchronises with
the host.

The kernels (``csrc/cuda/sharpopt_kernels.cu``) include no torch header; the binding
(``csrc/cuda/sharpopt_cuda.cpp``) validates the lists, takes the current stream and
passes raw pointers. It is built by ``setup.py`` where torch has CUDA, or on first use.
"""
from __future__ import annotations

import torch

from . import BackendUnavailable
from .base import Ops
from .cpu import CpuOps


class CudaOps(CpuOps):
    """Same argument marshalling as :class:`~sharpopt.backends.cpu.CpuOps`; the extension
    functions have the same signatures."""

    name = "cuda"

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda"


def load() -> Ops:
    """The ``cuda`` backend; raises BackendUnavailable without a GPU or a working build."""
    if torch.version.cuda is None:
        raise BackendUnavailable(f"this torch ({torch.__version__}) was built without CUDA")
    if not torch.cuda.is_available():
        raise BackendUnavailable("torch.cuda.is_available() is False (no GPU visible)")
    from .._build import load_extension

    return CudaOps(load_extension("cuda"))
