"""timm: the sharpopt optimizers in timm's optimizer registry.

:func:`register` adds ``<algorithm><base>`` names (``samsgd``, ``samadamw``,
``gsamadamw``, ``looksamsgd``, ...; no underscores, because timm's parser reads
``a_b`` as "Lookahead-wrapped ``b``" and keeps only the last ``_`` field) to timm's
default registry, so ``timm.optim.create_optimizer_v2`` builds them and timm's train
script takes ``--opt samsgd``::

    from sharpopt.integrations.timm import register
    register()
    opt = timm.optim.create_optimizer_v2(model, "samadamw", lr=1e-3, weight_decay=0.05,
                                         eps=1e-8, rho=0.05)

timm's keywords land where they belong: ``lr``, ``weight_decay``, ``momentum`` (SGD; timm
sets 0.9, and these SGD entries are classical momentum, not Nesterov), ``eps`` and
``betas`` (Adam/AdamW) reach the base optimizer; ``rho`` and the other algorithm keywords
reach the wrapper. With timm's ``NativeScaler`` the step is::

    loss_scaler(loss_fn(model(x), y), opt, need_update=False)         # backward only
    if first_step(opt, loss_scaler):                                   # w <- w + e
        loss_scaler(loss_fn(model(x), y), opt, clip_grad=1.0,          # unscale, clip,
                    parameters=model.parameters())                     # scaler.step(opt)
    opt.zero_grad()

(``scaler.step(opt)`` finishes the step; on an inf/NaN it restores ``w`` and skips.)
Importing this module does not import timm; :func:`register` does.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch

from .._core import SharpnessAware
from ..friendlysam import FriendlySAM
from ..gsam import GSAM
from ..looksam import LookSAM
from ..sam import ASAM, GCSAM, SAM
from ..wsam import WSAM

__all__ = ["register", "names", "first_step"]

#: Algorithms that fit timm's one-backward-per-call loop (CR-SAM and RBO need closures).
ALGORITHMS = {"sam": SAM, "asam": ASAM, "gcsam": GCSAM, "gsam": GSAM, "wsam": WSAM,
              "looksam": LookSAM, "friendlysam": FriendlySAM}
#: Base optimizers, with the OptimInfo flags that tell timm which keywords they take.
BASES: Dict[str, Tuple[type, dict]] = {
    "sgd": (torch.optim.SGD, dict(has_eps=False, has_momentum=True, has_betas=False)),
    "adam": (torch.optim.Adam, dict(has_eps=True, has_momentum=False, has_betas=True)),
    "adamw": (torch.optim.AdamW, dict(has_eps=True, has_momentum=False, has_betas=True)),
}


def names() -> List[str]:
    """Every name :func:`register` adds."""
    return [algo + base for algo in ALGORITHMS for base in BASES]


def register(registry=None) -> List[str]:
    """Register every ``<algorithm><base>`` in ``registry`` (timm's default registry when
    None); returns the names. Registering twice replaces the entries (timm logs that)."""
    from timm.optim._optim_factory import OptimInfo, default_registry

    registry = default_registry if registry is None else registry
    for algo, cls in ALGORITHMS.items():
        for base_name, (base, flags) in BASES.items():
            registry.register(OptimInfo(
                name=algo + base_name,
                opt_class=functools.partial(cls, base_optimizer=base),
                description=f"sharpopt.{cls.__name__} around torch.optim.{base.__name__}",
                **flags,
            ))
    return names()


def first_step(optimizer, loss_scaler: Optional[object] = None, zero_grad: bool = True) -> bool:
    """``optimizer.first_step`` with the GradScaler inside timm's ``NativeScaler`` (or a
    ``GradScaler`` itself, or None without loss scaling)."""
    if not isinstance(optimizer, SharpnessAware):
        raise TypeError(f"first_step needs a sharpopt optimizer, got {type(optimizer).__name__}")
    scaler = getattr(loss_scaler, "_scaler", loss_scaler)
    return optimizer.first_step(zero_grad=zero_grad, grad_scaler=scaler)
