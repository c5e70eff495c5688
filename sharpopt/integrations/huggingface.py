"""Hugging Face ``transformers.Trainer``: both passes inside ``training_step``.

The Trainer calls ``training_step`` once per micro-batch and, after the window's last one,
clips (``max_grad_norm``) and calls ``optimizer.step()``. :class:`SharpnessAwareTrainer`
keeps the window's micro-batches; on the last one (``accelerator.sync_gradients``) it
calls ``first_step`` (with accelerate's GradScaler under fp16) and backpropagates every
micro-batch of the window again at ``w + e`` (BatchNorm running statistics frozen, see
``sharpopt.freeze_bn_stats``). The Trainer's own clipping then acts on
the second pass's gradients (unscaled first by accelerate), and its ``optimizer.step()``
finishes the step (a sharpopt optimizer's closure-less ``step()``; ``GradScaler.step``
under fp16, which skips an inf/NaN step with ``w`` restored). The loss it records is the
loss at ``w``.

The optimizer comes through the Trainer's own arguments::

    trainer = SharpnessAwareTrainer(
        model=model, args=TrainingArguments(..., gradient_accumulation_steps=4, bf16=True),
        train_dataset=ds,
        optimizer_cls_and_kwargs=(sharpopt.SAM, dict(
            base_optimizer=torch.optim.AdamW, rho=0.05, lr=5e-5, eps=1e-8,
            weight_decay=0.01)),
    )

``eps`` is AdamW's (``perturb_eps`` would be the perturbation norm's). Any other
optimizer gets the Trainer's plain ``training_step``.
"""
from __future__ import annotations

from typing import Any, List, Tuple

from transformers import Trainer

from .._core import SharpnessAware
from ..training import freeze_bn_stats

__all__ = ["SharpnessAwareTrainer"]


def _unwrap(optimizer):
    """The sharpopt optimizer inside accelerate's ``AcceleratedOptimizer`` (or None)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, SharpnessAware) else None


class SharpnessAwareTrainer(Trainer):
    """``transformers.Trainer`` whose ``training_step`` runs SAM's two passes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sharpopt_window: List[Tuple[Any, Any]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        sam = _unwrap(self.optimizer)
        if sam is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._sharpopt_window.append((inputs, num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)   # at w
        if self.accelerator.sync_gradients:     # the window's last micro-batch
            window, self._sharpopt_window = self._sharpopt_window, []
            if sam.first_step(zero_grad=True, grad_scaler=self.accelerator.scaler):
                with freeze_bn_stats(model):
                    for batch, n_items in window:                           # at w + e
                        super().training_step(model, batch, n_items)
        return loss
