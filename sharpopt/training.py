"""Helpers for real training loops around the two-pass step."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["freeze_bn_stats"]


@contextlib.contextmanager
def freeze_bn_stats(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Keep BatchNorm running statistics from being updated inside the block.

    SAM's second forward pass runs at the perturbed weights ``w + e``; letting it update
    ``running_mean``/``running_var`` would count every batch twice, once from a point the
    model never takes. The layers still normalise with the batch statistics (training mode
    is unchanged, so the gradient is the usual one); on exit the running buffers and
    ``num_batches_tracked`` are put back exactly as they were::

        loss_fn(model(x), y).backward();  opt.first_step(zero_grad=True)
        with sharpopt.freeze_bn_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    With ``opt.step(closure)``, freeze on the closure's second call (``opt.perturbed``)::

        def closure():
            with sharpopt.freeze_bn_stats(model) if opt.perturbed else contextlib.nullcontext():
                loss = loss_fn(model(x), y)
                loss.backward()
            return loss
    """
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            buffers = [getattr(module, name) for name in
                       ("running_mean", "running_var", "num_batches_tracked")]
            saved.extend((b, b.detach().clone()) for b in buffers if b is not None)
    try:
        yield model
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
