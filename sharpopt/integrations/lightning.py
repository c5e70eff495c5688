"""Lightning: sharpness-aware optimizers under automatic optimization.

Lightning steps the optimizer once per accumulation window, through one closure that runs
``training_step`` + backward on the window's last micro-batch (the earlier ones were
backpropagated already). A SAM step needs the whole window's gradient at ``w`` and again
at ``w + e``, so :class:`SharpnessAwareMixin` makes the step:

1. Lightning's own closure: the last micro-batch at ``w`` (its ``self.log`` calls and its
   loss are the ones Lightning records, so the logged loss is the loss at ``w``); the
   gradients now hold the window's sum, as Lightning accumulated it;
2. ``first_step`` (with the precision plugin's GradScaler under ``16-mixed``);
3. every micro-batch of the window again at ``w + e`` (``training_step`` through the
   strategy, so autocast and the loss scale apply; divided by ``accumulate_grad_batches``
   as Lightning divides; ``self.log`` calls muted; BatchNorm running statistics left as
   they were, see ``sharpopt.freeze_bn_stats``);
4. Lightning's hooks and ``gradient_clip_val`` clipping (on the second pass's gradients,
   which SAM hands to the base optimizer; unscaled first under ``16-mixed``), then the
   optimizer's closure-less completion (``GradScaler.step(opt)`` under ``16-mixed``: an
   inf/NaN in either pass skips the step with ``w`` restored and lowers the scale).

Usage::

    from sharpopt.integrations.lightning import SharpnessAwareMixin

    class Model(SharpnessAwareMixin, lightning.pytorch.LightningModule):
        def training_step(self, batch, batch_idx):
            loss = ...
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return sharpopt.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

``32-true``, ``bf16-mixed`` and ``16-mixed`` (Lightning's own precision plugins) all work,
with ``accumulate_grad_batches`` and ``gradient_clip_val``. ``gradient_clip_val`` clips the
second pass's gradients (for SAM exactly the descent direction; for GSAM/WSAM the
optimizer's ``max_grad_norm=`` clips the final direction instead), and on the cheap steps
of ``k > 1``/LookSAM, which update inside ``first_step``, it comes too late: use
``max_grad_norm=`` there. ``training_step`` runs twice per micro-batch, so anything else it
does besides logging (counters, metric updates) happens twice.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, List, Tuple

try:
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.utilities import GradClipAlgorithmType
except ImportError:  # the standalone package
    from pytorch_lightning.plugins.precision import Precision
    from pytorch_lightning.utilities import GradClipAlgorithmType

from .._core import SharpnessAware
from ..training import freeze_bn_stats

__all__ = ["SharpnessAwareMixin"]


def _unwrap(optimizer):
    """The sharpopt optimizer inside a ``LightningOptimizer`` (or None)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, SharpnessAware) else None


class SharpnessAwareMixin:
    """Put before ``LightningModule`` in the bases; see the module docstring."""

    def on_train_batch_start(self, batch: Any, batch_idx: int):
        # The window's micro-batches, replayed at w + e (references to the batches only).
        # A window starts where Lightning zeroes the gradients (batch_idx % n == 0).
        if self.automatic_optimization:
            if batch_idx % self.trainer.accumulate_grad_batches == 0:
                self.__dict__["_sharpopt_window"] = []
            self.__dict__.setdefault("_sharpopt_window", []).append((batch, batch_idx))
        return super().on_train_batch_start(batch, batch_idx)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None):
        window: List[Tuple[Any, int]] = self.__dict__.pop("_sharpopt_window", [])
        sam = _unwrap(optimizer)
        if sam is None or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)

        def both_passes():
            loss = optimizer_closure()                  # at w: Lightning's result and logs
            if loss is None:
                raise RuntimeError(
                    "SharpnessAwareMixin: training_step returned None on the last "
                    "micro-batch of a window; a sharpness-aware step cannot skip half-way "
                    "(skip whole windows, or return a loss)")
            if sam.first_step(zero_grad=True, grad_scaler=scaler):
                self._sharpopt_second_pass(window)
            return loss

        return optimizer.step(closure=both_passes)

    def _sharpopt_second_pass(self, window: List[Tuple[Any, int]]) -> None:
        trainer = self.trainer
        n = trainer.accumulate_grad_batches
        with self._sharpopt_muted_logging(), freeze_bn_stats(self):
            for batch, idx in window:
                out = trainer.strategy.training_step(batch, idx)
                loss = out.get("loss") if isinstance(out, Mapping) else out
                if loss is not None:
                    trainer.strategy.backward(loss / n, None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        """``gradient_clip_val`` on the second pass's gradients, unscaled first under
        ``16-mixed`` (Lightning's own check refuses to clip for an optimizer that unscales in
        its step; the optimizer sees this unscale and does not repeat it)."""
        sam = _unwrap(optimizer)
        if sam is None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                       gradient_clip_algorithm)
        plugin = self.trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(sam)
        Precision.clip_gradients(plugin, sam, gradient_clip_val,
                                 GradClipAlgorithmType(gradient_clip_algorithm or "norm"))

    @contextlib.contextmanager
    def _sharpopt_muted_logging(self):
        """``self.log``/``self.log_dict`` do nothing inside (the pass at ``w + e``)."""
        noop = lambda *args, **kwargs: None  # noqa: E731
        self.__dict__["log"] = self.__dict__["log_dict"] = noop
        try:
            yield
        finally:
            del self.__dict__["log"], self.__dict__["log_dict"]
