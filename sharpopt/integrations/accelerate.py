"""accelerate: the two passes around ``Accelerator.prepare`` and ``accelerator.backward``.

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, whose
``step()`` is the usual one: under fp16 it calls ``GradScaler.step`` on the sharpopt
optimizer, which finishes the step begun by :func:`first_step` (an inf/NaN skips it with
``w`` restored, and the scaler backs off). :func:`first_step` reaches the sharpopt
optimizer inside the wrapper and hands it accelerate's scaler::

    model, opt, loader = accelerator.prepare(model, opt, loader)
    for x, y in loader:
        accelerator.backward(loss_fn(model(x), y))
        if first_step(accelerator, opt):                 # w <- w + e
            accelerator.backward(loss_fn(model(x), y))
            accelerator.clip_grad_norm_(model.parameters(), 1.0)   # optional: unscaled
        opt.step()                                       # restore w, base update
        opt.zero_grad()
"""
from __future__ import annotations

from .._core import SharpnessAware

__all__ = ["first_step"]


def first_step(accelerator, optimizer, zero_grad: bool = True) -> bool:
    """``first_step`` of the sharpopt optimizer inside ``optimizer`` (an
    ``AcceleratedOptimizer`` or the optimizer itself), with ``accelerator.scaler``.
    Returns True when the second backward pass is due (see ``SharpnessAware.first_step``)."""
    sam = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(sam, SharpnessAware):
        raise TypeError(f"first_step needs a sharpopt optimizer, got {type(sam).__name__}")
    return sam.first_step(zero_grad=zero_grad, grad_scaler=accelerator.scaler)
