"""Glue for the trainers people use: one small module per trainer.

Each module imports its trainer package itself; ``import sharpopt`` imports none of them.

* ``sharpopt.integrations.lightning``: a LightningModule mixin for automatic optimization
  and a precision plugin for ``16-mixed`` with gradient clipping;
* ``sharpopt.integrations.huggingface``: a ``transformers.Trainer`` subclass whose
  ``training_step`` runs both passes;
* ``sharpopt.integrations.accelerate``: ``first_step`` for an ``AcceleratedOptimizer``;
* ``sharpopt.integrations.timm``: registers the optimizers in timm's optimizer registry.

The optimizer side needs nothing special: ``opt.step()`` (and ``GradScaler.step(opt)``)
after ``opt.first_step()`` finishes the step, which is what these trainers call.
"""
