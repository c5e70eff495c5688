"""Which keyword belongs to whom: the wrapper's own, or the base optimizer's.

A wrapper is built as ``SAM(params, Base, rho=..., lr=..., eps=...)``: its own keywords
(``rho``, ``perturb_eps``, ``alpha`` for LookSAM, ...) and the base optimizer's (``lr``,
``eps``, ...) arrive in one call. The rule:

* a keyword only the wrapper names is the wrapper's; every other one goes to ``Base``;
* a keyword that both the wrapper and ``Base.__init__`` name (LookSAM's ``alpha`` and
  RMSprop's ``alpha``, SAM's ``rho`` and Adadelta's ``rho``) is refused with an error
  naming both meanings, never silently taken by one side. The caller says which:
  ``sam_kwargs={"alpha": 0.5}`` is the wrapper's, ``base_kwargs={"alpha": 0.9}`` the
  base optimizer's (these two dicts are never ambiguous and may be combined);
* a keyword neither takes is a ``TypeError`` naming both (``eps=`` with SGD, which has no
  ``eps``, says that the perturbation norm's epsilon is now ``perturb_eps``).

The sorting happens in the metaclass's ``__call__``, once per construction and before any
``__init__`` binds defaults, because only there is it known which keywords the caller
actually wrote (a default ``alpha=0.7`` collides with nothing).
"""
from __future__ import annotations

import inspect
from typing import Dict, Optional, Tuple

__all__ = ["SortKeywords"]

_SKIP = {"self", "params", "base_optimizer", "defaults", "base_kwargs", "sam_kwargs"}
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _base_name(base) -> str:
    module = getattr(base, "__module__", "")
    name = getattr(base, "__qualname__", repr(base))
    if module.startswith("torch.optim."):
        module = "torch.optim"   # torch.optim.RMSprop, as users write it
    return f"{module}.{name}" if module else name


def _base_keywords(base) -> Tuple[Optional[set], bool]:
    """The keyword names ``base(...)`` takes, and whether it also takes ``**kwargs``
    (``None`` when its signature cannot be read: nothing is checked then)."""
    try:
        sig = inspect.signature(base)
    except (TypeError, ValueError):
        return None, True
    names = {p.name for p in sig.parameters.values() if p.kind in _NAMED} - {"params"}
    open_ = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return names, open_


class SortKeywords(type):
    """Metaclass of :class:`sharpopt._core.SharpnessAware`; see the module docstring."""

    def __init__(cls, name, bases, namespace, **kwargs):
        super().__init__(name, bases, namespace, **kwargs)
        init = namespace.get("__init__")
        if init is not None and "eps" in inspect.signature(init).parameters:
            # eps is the base optimizer's (Adam's eps): a wrapper that took it would take it
            # from the base optimizer silently whenever the base has one.
            raise TypeError(f"{name}.__init__ must not take 'eps': it belongs to the base "
                            "optimizer; call the perturbation norm's epsilon 'perturb_eps'")

    def own_keywords(cls) -> Dict[str, str]:
        """``{keyword: meaning}`` for every keyword the wrapper's ``__init__`` chain names
        (meanings from the classes' ``_keyword_meanings``, the most derived winning)."""
        described: Dict[str, str] = {}
        names = set()
        for klass in reversed(cls.__mro__):
            if not isinstance(klass, SortKeywords):
                continue
            described.update(klass.__dict__.get("_keyword_meanings", {}))
            init = klass.__dict__.get("__init__")
            if init is not None:
                names.update(p.name for p in inspect.signature(init).parameters.values()
                             if p.kind in _NAMED and p.name not in _SKIP)
        return {n: described.get(n, "own setting") for n in names}

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **cls._sort_keywords(args, kwargs))

    def _sort_keywords(cls, args: tuple, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        own = cls.own_keywords()
        wrapper = cls.__name__
        sam_kwargs = kwargs.pop("sam_kwargs", None) or {}
        base_kwargs = kwargs.get("base_kwargs") or {}
        for label, d in (("sam_kwargs", sam_kwargs), ("base_kwargs", base_kwargs)):
            if not isinstance(d, dict):
                raise TypeError(f"{label} must be a dict of keyword arguments, got {d!r}")
        if len(args) >= 2:
            base = args[1]
        else:
            default = inspect.signature(cls.__init__).parameters.get("base_optimizer")
            base = kwargs.get("base_optimizer", default.default if default is not None else None)
        base_names, base_open = _base_keywords(base) if callable(base) else (None, True)
        base_label = _base_name(base)
        short = getattr(base, "__name__", base_label)
        for name in list(kwargs):
            if name in ("base_kwargs", "base_optimizer"):
                continue
            value = kwargs[name]
            if name in own:
                if base_names is not None and name in base_names:
                    raise TypeError(
                        f"{wrapper}(..., {name}={value!r}) is ambiguous: {name!r} is "
                        f"{wrapper}'s {own[name]}, and also an argument of the base "
                        f"optimizer {base_label} ({short}'s own {name!r}). Say which one "
                        f"you mean: sam_kwargs={{{name!r}: {value!r}}} sets {wrapper}'s, "
                        f"base_kwargs={{{name!r}: {value!r}}} sets {short}'s (both may be "
                        "given)."
                    )
            elif name in base_kwargs:
                raise TypeError(f"{name!r} is given twice, as a keyword and in base_kwargs")
            elif base_names is not None and not base_open and name not in base_names:
                hint = ""
                if name == "eps":
                    hint = (" The perturbation norm's epsilon is called perturb_eps (eps= "
                            "goes to the base optimizer since the keyword change; see the "
                            "release notes in the README).")
                raise TypeError(f"{wrapper} got an unexpected keyword argument {name!r}: "
                                f"neither {wrapper} nor its base optimizer {base_label} "
                                f"takes it.{hint}")
        for name, value in sam_kwargs.items():
            if name not in own:
                raise TypeError(f"sam_kwargs: {wrapper} has no keyword {name!r} (its own "
                                f"are {', '.join(sorted(own))})")
            if name in kwargs:
                raise TypeError(f"{name!r} is given twice, as a keyword and in sam_kwargs")
            kwargs[name] = value
        return kwargs
