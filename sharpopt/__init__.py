"""sharpopt: fused sharpness-aware optimizers for PyTorch.

Every optimizer is a ``torch.optim.Optimizer``; the wrappers take a base optimizer class
and its keyword arguments (``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)``). The
numbers are defined by the ``reference`` backend; ``backend=`` (or ``$SHARPOPT_BACKEND``)
picks who computes them.
"""
from .backends import BackendUnavailable, available_backends
from .crsam import CRSAM
from .friendlysam import FriendlySAM
from .gsam import GSAM
from .looksam import LookSAM
from .msam import MSAM
from .rbo import RBO
from . import schedules
from .sam import ASAM, GCSAM, SAM
from .training import freeze_bn_stats
from .wsam import WSAM

__version__ = "0.1.0"

__all__ = [
    "SAM", "ASAM", "GCSAM", "GSAM", "WSAM", "CRSAM", "RBO", "LookSAM", "FriendlySAM", "MSAM",
    "BackendUnavailable", "available_backends", "freeze_bn_stats", "schedules",
]
