"""Lightning automatic optimization with the SAM mixin equals a hand-written sharpopt loop
on the same batches: 32-true, bf16-mixed, accumulate_grad_batches > 1, gradient_clip_val,
16-mixed (CPU fp16 autocast where this torch has it), the loss at w logged."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed "
                         "(pip install -e '.[integrations]')")

import sharpopt  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from sharpopt.integrations.lightning import SharpnessAwareMixin  # noqa: E402

N_BATCHES, BATCH = 6, 4


def data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g))
            for _ in range(N_BATCHES)]


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.BatchNorm1d(9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 3))


def make_opt(params, cls):
    if cls is sharpopt.GSAM:
        return sharpopt.GSAM(params, torch.optim.AdamW, rho=0.1, alpha=0.3, lr=1e-2)
    return sharpopt.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)


class Module(SharpnessAwareMixin, pl.LightningModule):
    def __init__(self, cls):
        super().__init__()
        self.net, self.cls, self.logged = net(), cls, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x).float(), y)
        self.log("train_loss", loss)
        self.logged.append(float(loss))      # every call, at w and at w + e
        return loss

    def configure_optimizers(self):
        return make_opt(self.net.parameters(), self.cls)


def hand_loop(cls, accumulate, clip, autocast_dtype, scaler=None):
    """The README's two-call recipe with accumulation, clipping between the passes."""
    model = net()
    opt = make_opt(model.parameters(), cls)
    batches = data()
    ctx = (lambda: torch.autocast("cpu", dtype=autocast_dtype)) if autocast_dtype \
        else contextlib.nullcontext
    losses = []
    for start in range(0, N_BATCHES, accumulate):
        window = batches[start:start + accumulate]

        def backward_all():
            for x, y in window:
                with ctx():
                    loss = F.cross_entropy(model(x).float(), y)
                out = loss / accumulate
                (scaler.scale(out) if scaler else out).backward()
            return loss
        losses.append(float(backward_all()))
        if opt.first_step(zero_grad=True, grad_scaler=scaler):
            with sharpopt.freeze_bn_stats(model):
                backward_all()
            if clip:
                if scaler:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.second_step(zero_grad=True, grad_scaler=scaler)
        if scaler:
            scaler.update()
    return model, losses


def fit(module, **trainer_kw):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **trainer_kw)
    loader = torch.utils.data.DataLoader(data(), batch_size=None, shuffle=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, loader)
    return trainer


CASES = {
    "32-true": dict(precision="32-true"),
    "bf16-mixed": dict(precision="bf16-mixed"),
    "accumulate-3": dict(precision="32-true", accumulate_grad_batches=3),
    "clip": dict(precision="32-true", gradient_clip_val=0.05),
    "bf16-accumulate-clip": dict(precision="bf16-mixed", accumulate_grad_batches=2,
                                 gradient_clip_val=0.05),
}


@pytest.mark.parametrize("cls", [sharpopt.SAM, sharpopt.GSAM], ids=["SAM", "GSAM"])
@pytest.mark.parametrize("case", list(CASES))
def test_lightning_matches_hand_written_loop(case, cls):
    kw = CASES[case]
    accumulate = kw.get("accumulate_grad_batches", 1)
    dtype = torch.bfloat16 if kw["precision"] == "bf16-mixed" else None
    module = Module(cls)
    trainer = fit(module, **kw)
    ref, losses = hand_loop(cls, accumulate, kw.get("gradient_clip_val"), dtype)
    assert trainer.global_step == N_BATCHES // accumulate
    tol = dict(rtol=1e-2, atol=1e-3) if dtype else dict(rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(module.net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **tol,
                                   msg=lambda m: f"{case}/{cls.__name__}, {name}: {m}")
    # BatchNorm statistics counted once per batch (the pass at w + e is frozen)
    for (name, b), c in zip(module.net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, **tol, msg=lambda m: f"{case}, buffer {name}: {m}")
    # the logged loss is the one at w (the last window's last micro-batch), not at w + e
    logged = float(trainer.callback_metrics["train_loss"])
    assert logged == pytest.approx(losses[-1], rel=1e-2 if dtype else 1e-6), \
        f"{case}: logged {logged}, loss at w {losses[-1]}, calls {module.logged[-4:]}"


def _cpu_fp16_autocast():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.linear(torch.randn(2, 2), torch.randn(2, 2))
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cpu_fp16_autocast(), reason="this torch has no fp16 autocast on CPU")
@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clip"])
def test_lightning_16_mixed_with_scaler_matches_hand_written_loop(clip):
    """16-mixed: Lightning's own plugin, given the CPU device and a CPU GradScaler here
    (``precision="16-mixed"`` on CPU becomes bf16 in Lightning; on a GPU it is this plugin
    with "cuda"): both passes scaled, the second unscaled once, then clipped."""
    init = 2.0 ** 12
    plugin = MixedPrecision("16-mixed", "cpu",
                            scaler=torch.amp.GradScaler("cpu", init_scale=init))
    module = Module(sharpopt.SAM)
    fit(module, plugins=[plugin], accumulate_grad_batches=2, gradient_clip_val=clip)
    ref, _ = hand_loop(sharpopt.SAM, 2, clip, torch.float16,
                       scaler=torch.amp.GradScaler("cpu", init_scale=init))
    for (name, p), q in zip(module.net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-4,
                                   msg=lambda m: f"16-mixed clip={clip}, {name}: {m}")
    assert plugin.scaler.get_scale() == init


@pytest.mark.skipif(not _cpu_fp16_autocast(), reason="this torch has no fp16 autocast on CPU")
def test_lightning_16_mixed_inf_skips_the_step_with_w_restored():
    class Poisoned(Module):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 1 else loss

    plugin = MixedPrecision("16-mixed", "cpu",
                            scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    module = Poisoned(sharpopt.SAM)
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append([p.detach().clone() for p in pl_module.net.parameters()])
    fit(module, plugins=[plugin], max_steps=3, callbacks=[Watch()])
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1])), \
        "the skipped step must leave w as it was (not w + e)"
    assert any(not torch.equal(a, b) for a, b in zip(seen[1], seen[2])), "training goes on"
    assert plugin.scaler.get_scale() == 2.0 ** 11
