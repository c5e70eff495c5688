"""Host helpers of a step, in C++ where the compiled ``cpu`` extension is loaded.

Per parameter and step, the plan's Python walks (which parameters have a gradient now,
``p.grad`` of each, Adam's step counters) cost about 0.1 µs each in Python and a few ns
in C++, which at a thousand parameters is most of what a small step costs the host. The
extension is used once it is there: prebuilt by ``setup.py`` (for this CPU's instruction
set), or already compiled by the ``cpu`` backend in this process. These helpers never
start a compilation; without the extension they give the same results from Python.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _build

_UNSET = object()
_prebuilt = _UNSET


def _ext():
    """The loaded cpu extension (one that has these helpers), or None."""
    global _prebuilt
    if torch.compiler.is_compiling():
        return None
    if _prebuilt is _UNSET:
        mod, _ = _build._prebuilt("cpu")
        _prebuilt = mod if hasattr(mod, "grad_key") else None
    if _prebuilt is not None:
        return _prebuilt
    mod = _build._cache.get("cpu")
    return mod if hasattr(mod, "grad_key") else None


def grad_key(groups: Sequence[list]):
    """Which parameters of the lists ``groups`` have a gradient now, in order: a value that
    compares equal exactly when the same parameters have gradients (the step plan's key;
    the plan holds the parameters, so an address is not reused while it is compared)."""
    ext = _ext()
    if ext is not None:
        try:
            return ext.grad_key(list(groups))
        except TypeError:           # a group whose params are not a list of tensors
            pass
    return [id(p) for ps in groups for p in ps if p.grad is not None]


def grad_key_is(groups: Sequence[list], key) -> bool:
    """``grad_key(groups) == key`` without making the new key (in C++: no allocation)."""
    ext = _ext()
    if ext is not None and isinstance(key, bytes):
        try:
            return ext.grad_key_is(list(groups), key)
        except TypeError:           # a group whose params are not a list of tensors
            pass
    return grad_key(groups) == key


def grads_into(params: list, out: list) -> list:
    """``out[i] = params[i].grad`` in place (``out`` as long as ``params``); returns ``out``.
    A list kept for the purpose is refilled each pass without a new allocation."""
    ext = _ext()
    if ext is not None and isinstance(params, list):
        ext.grads_into(params, out)
    else:
        for i, p in enumerate(params):
            out[i] = p.grad
    return out


def clear(out: list) -> None:
    """Every entry of the list ``out`` set to None in place (its tensors let go)."""
    ext = _ext()
    if ext is not None:
        ext.clear_list(out)
    else:
        for i in range(len(out)):
            out[i] = None


def grads(params: list) -> List[Optional[Tensor]]:
    """``[p.grad for p in params]`` (``params`` a list)."""
    ext = _ext()
    if ext is not None and isinstance(params, list):
        return ext.grads(params)
    return [p.grad for p in params]


def data_ptrs(tensors: Optional[Sequence[Optional[Tensor]]]):
    """The data addresses of ``tensors`` (0 for a None entry; None for no list), as a
    value that compares equal exactly when they are the same addresses."""
    if tensors is None:
        return None
    ext = _ext()
    if ext is not None and isinstance(tensors, list):
        return ext.data_ptrs(tensors)
    try:
        return tuple(map(Tensor.data_ptr, tensors))
    except TypeError:  # an absent (None) entry
        return tuple(0 if t is None else t.data_ptr() for t in tensors)


def first_unlike(tensors: Sequence[Optional[Tensor]], like: Sequence[Tensor]) -> int:
    """The index of the first entry of ``tensors`` (None entries skipped) that is not on
    ``like[0]``'s device, or neither contiguous (where ``like[i]`` is, or has another
    shape: a flat view) nor dense and laid out like ``like[i]``; -1 when there is none.
    The layout rule of the triton backend's launch tables."""
    ext = _ext()
    if ext is not None and isinstance(tensors, list) and isinstance(like, list):
        try:
            return ext.first_unlike(tensors, like)
        except TypeError:           # an entry that is not a tensor: Python says where
            pass
    from .backends.base import is_dense, same_layout

    device = like[0].device if len(like) else None
    for i, t in enumerate(tensors):
        if t is None:
            continue
        p = like[i]
        if t.device != device or not (t.is_contiguous() and (
                p.is_contiguous() or t.shape != p.shape)) and not (
                is_dense(t) and same_layout(t, p)):
            return i
    return -1


def numels(tensors: Sequence[Tensor]):
    """The element counts of ``tensors``, as a value that compares equal exactly when
    they are the same counts."""
    ext = _ext()
    if ext is not None and isinstance(tensors, list):
        return ext.numels(tensors)
    return tuple(map(Tensor.numel, tensors))


def advance_steps(steps: List[Tensor], delta: float) -> Optional[Tuple[float, float]]:
    """``steps += delta`` for Adam's step counters; (lowest, highest) new count when the
    extension did it in one call (one-element fp32 CPU tensors, as torch.optim keeps
    them), else None (one ``_foreach_add_``, and the caller reads the counters)."""
    ext = _ext()
    if ext is not None and steps:
        try:
            return ext.advance_steps(steps, float(delta))
        except RuntimeError:     # some counter is not a one-element fp32 CPU tensor
            pass
    torch._foreach_add_(steps, delta)
    return None
