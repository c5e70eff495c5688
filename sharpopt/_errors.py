"""Exceptions shared by the backends and the extension builder.

A leaf module (it imports nothing), so ``sharpopt._build`` can raise them without reaching
up into ``sharpopt.backends``. Re-exported as ``sharpopt.BackendUnavailable`` and
``sharpopt.backends.BackendUnavailable``.
"""
from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A backend that was asked for by name cannot run here; the message says why."""
