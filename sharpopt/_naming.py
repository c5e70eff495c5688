"""Errors that name the user's parameter.

A backend refuses a tensor by its index in the pass's lists (``grads[3]``, ``tensor 3``);
the user knows their parameters by name. ``describe_param`` names one (its name where the
optimizer was built from ``model.named_parameters()``, else its group, index and shape),
and ``_Reporting`` wraps a backend so that an error raised inside a pass is re-raised,
same type and chained, naming the parameter the failing entry belongs to. The mapping is
worked out only when an error happens: a pass that succeeds pays one frame and a ``try``.
"""
from __future__ import annotations

import functools
import re
import weakref
from typing import Optional, Sequence

from torch import Tensor

from .backends.base import Ops


def describe_param(param_groups: Sequence[dict], p: Tensor) -> str:
    """How an error names parameter ``p``: its name where the optimizer was built from
    ``model.named_parameters()`` (torch keeps them as a group's ``"param_names"``), else its
    group and index in the optimizer, and its shape."""
    shape = tuple(p.shape)
    for g, group in enumerate(param_groups):
        for i, q in enumerate(group["params"]):
            if q is p:
                names = group.get("param_names")
                if names:
                    return f"parameter {names[i]!r} (shape {shape})"
                return f"group {g}, parameter {i}, shape {shape}"
    return f"a parameter of shape {shape}"


# Where a backend's message points at one entry of its lists: "grads[3]", "xs[k][3]",
# "tensor 3" (the C++ checks and the Triton tables name entries that way).
_ENTRY = re.compile(r"\[(\d+)\]|\btensor (\d+)\b")


class _Reporting:
    """A backend whose refusals name the user's parameter.

    Every attribute is the backend's own; a pass is called straight through (one frame and
    a ``try``, no work per tensor). Only when a pass raises is the failing entry of its
    lists (the index its message names, or the only entry) traced back to the parameter it
    belongs to - the parameter itself, its gradient, local shard, optimizer state or a
    scratch buffer - and the error re-raised with that parameter's name, as the same
    exception type, chained to the original.
    """

    def __init__(self, ops: Ops, owner):
        # ``owner``: the optimizer (``_plan._Core``), held weakly; it maps a tensor to its
        # parameter (``_param_of``) and holds the param groups.
        self._ops = ops
        self._owner = weakref.ref(owner)

    def __repr__(self) -> str:
        return repr(self._ops)

    def __getattr__(self, name: str):
        attr = getattr(self._ops, name)
        if callable(attr) and not name.startswith("_") and name != "supports":
            fn = attr

            @functools.wraps(fn)
            def attr(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                    named = self._named(exc, args, kwargs)
                    if named is None:
                        raise
                    raise named from exc
        self.__dict__[name] = attr        # later lookups skip __getattr__
        return attr

    def _named(self, exc: Exception, args: tuple, kwargs: dict) -> Optional[Exception]:
        owner = self._owner()
        if owner is None:
            return None
        message = str(exc)
        lists = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))]
        lists += [x for a in lists for x in a if isinstance(x, (list, tuple))]   # lincomb's xs
        lists = [a for a in lists if a and all(t is None or isinstance(t, Tensor) for t in a)]
        match = _ENTRY.search(message.split("\n", 1)[0])
        if match is not None:
            index = int(match.group(1) or match.group(2))
        elif lists and all(len(a) == 1 for a in lists):
            index = 0
        else:
            return None
        for a in lists:
            if index < len(a) and a[index] is not None:
                p = owner._param_of(a[index])
                if p is not None:
                    where = describe_param(owner.param_groups, p)
                    try:
                        return type(exc)(f"{message} (entry {index} of the lists: {where})")
                    except Exception:     # an exception type built from other arguments
                        return None
        return None
