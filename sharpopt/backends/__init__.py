"""The one place that picks a backend.

``resolve(requested, device)`` turns the ``backend=`` argument of an optimizer (or the
``SHARPOPT_BACKEND`` environment variable, which replaces ``"auto"``) into an
:class:`~sharpopt.backends.base.Ops` object:

* an explicit name (``"reference"``, ``"foreach"``, ``"cpu"``, ``"cuda"``, ``"triton"``)
  returns that backend or raises :class:`BackendUnavailable` saying why it cannot run;
* ``"auto"`` walks the preference list of the device type and takes the first backend
  that loads. It logs its choice once (``logging``, logger ``"sharpopt"``); when every
  fused backend failed to load (a build error, a missing package) and it falls back to
  ``foreach``, it also warns once, saying why.

Backends are loaded lazily: nothing is imported or compiled until an optimizer asks.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import Dict, List, Tuple

import torch

from .._errors import BackendUnavailable
from .base import Ops

__all__ = ["BackendUnavailable", "resolve", "is_forced", "available_backends", "BACKENDS",
           "ENV_VAR"]

ENV_VAR = "SHARPOPT_BACKEND"
log = logging.getLogger("sharpopt")


# name -> module path (relative to this package) exposing ``load() -> Ops``; ``load``
# raises BackendUnavailable with the reason when the backend cannot run.
BACKENDS: Dict[str, str] = {
    "reference": ".reference",
    "foreach": ".foreach",
    "cpu": ".cpu",
    "cuda": ".cuda",
    "triton": ".triton",
}

# Preference per device type for ``auto``: fused kernels first, foreach always works.
AUTO_ORDER: Dict[str, List[str]] = {
    "cpu": ["cpu", "foreach"],
    "cuda": ["triton", "cuda", "foreach"],
}
_DEFAULT_ORDER = ["foreach"]

_loaded: Dict[str, Ops] = {}
_failed: Dict[str, str] = {}
_announced: set = set()


def _load(name: str) -> Ops:
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        raise BackendUnavailable(_failed[name])
    if name not in BACKENDS:
        raise ValueError(
            f"unknown sharpopt backend {name!r}; choose one of "
            f"{['auto', *BACKENDS]} (argument backend= or ${ENV_VAR})"
        )
    try:
        module = importlib.import_module(BACKENDS[name], __name__)
        ops = module.load()
    except BackendUnavailable as exc:
        _failed[name] = f"backend {name!r} is unavailable: {exc}"
        raise BackendUnavailable(_failed[name]) from None
    _loaded[name] = ops
    return ops


def _requested(requested: str) -> str:
    """The backend asked for: ``requested``, with ``$SHARPOPT_BACKEND`` replacing ``auto``."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    requested = requested.strip().lower()
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    return requested


def is_forced(requested: str) -> bool:
    """Whether ``requested`` names one backend (so it must run or raise) rather than auto."""
    return _requested(requested) != "auto"


def resolve(requested: str, device: torch.device) -> Ops:
    """Return the backend to use for parameters on ``device``."""
    requested = _requested(requested)
    if requested != "auto":
        ops = _load(requested)
        if not ops.supports(device):
            raise BackendUnavailable(
                f"backend {requested!r} does not run on {device.type} tensors"
            )
        return ops
    skipped: List[Tuple[str, str]] = []
    failed: List[str] = []
    for name in AUTO_ORDER.get(device.type, _DEFAULT_ORDER):
        try:
            ops = _load(name)
        except BackendUnavailable as exc:
            skipped.append((name, str(exc)))
            failed.append(str(exc))
            continue
        if not ops.supports(device):
            skipped.append((name, f"does not run on {device.type}"))
            continue
        key = (device.type, name)
        if key not in _announced:
            _announced.add(key)
            why = "; ".join(reason for _, reason in skipped)
            log.info(
                "sharpopt: backend 'auto' chose %r for %s tensors%s",
                name, device.type, f" ({why})" if why else "",
            )
            if failed and name == "foreach":
                warnings.warn(
                    f"sharpopt: no fused backend for {device.type} tensors, using 'foreach' "
                    f"({'; '.join(failed)})", RuntimeWarning, stacklevel=3,
                )
        return ops
    raise BackendUnavailable(f"no sharpopt backend runs on {device.type} tensors")


def available_backends(device: torch.device = torch.device("cpu")) -> List[str]:
    """Names of the backends that load and run on ``device`` here (may build extensions)."""
    names = []
    for name in BACKENDS:
        try:
            if _load(name).supports(device):
                names.append(name)
        except BackendUnavailable:
            pass
    return names


