"""Hugging Face Trainer with SharpnessAwareTrainer equals a hand-written sharpopt loop on the
same batches: the optimizer through optimizer_cls_and_kwargs (AdamW's eps reaching AdamW),
gradient accumulation, the Trainer's max_grad_norm clipping, fp32 and bf16, the loss at w."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install -e '.[integrations]')")

import sharpopt  # noqa: E402
from sharpopt.integrations.huggingface import SharpnessAwareTrainer  # noqa: E402

N, BATCH = 24, 4


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.BatchNorm1d(9),
                                       torch.nn.Tanh(), torch.nn.Linear(9, 3))

    def forward(self, x, labels=None):
        logits = self.net(x).float()
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def dataset():
    g = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)
    return [{"x": xs[i], "labels": ys[i]} for i in range(N)]


OPT = (sharpopt.SAM, dict(base_optimizer=torch.optim.AdamW, rho=0.1, lr=1e-2, eps=1e-3,
                          weight_decay=0.0))


def hand_loop(accumulate, clip, bf16):
    model = Tiny()
    cls, kw = OPT
    opt = cls(model.parameters(), **kw)
    assert opt.param_groups[0]["eps"] == 1e-3
    data = dataset()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    batches = [data[i:i + BATCH] for i in range(0, N, BATCH)]
    total = 0.0
    for start in range(0, len(batches), accumulate):
        window = batches[start:start + accumulate]

        def backward_all():
            acc = 0.0
            for b in window:
                x = torch.stack([d["x"] for d in b])
                y = torch.stack([d["labels"] for d in b])
                with ctx():
                    loss = model(x, y)["loss"] / len(window)
                loss.backward()
                acc += float(loss)
            return acc
        total += backward_all()
        assert opt.first_step(zero_grad=True)
        with sharpopt.freeze_bn_stats(model):
            backward_all()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True)
    return model, total / (len(batches) // accumulate)


@pytest.mark.parametrize("accumulate,clip,bf16", [
    (1, 0.0, False), (3, 0.0, False), (2, 0.05, False), (2, 0.05, True),
], ids=["fp32", "accumulate-3", "accumulate-2-clip", "bf16-accumulate-2-clip"])
def test_trainer_matches_hand_written_loop(tmp_path, accumulate, clip, bf16):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_train_epochs=1,
        gradient_accumulation_steps=accumulate, max_grad_norm=clip, bf16=bf16,
        use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
        lr_scheduler_type="constant", train_sampling_strategy="sequential",
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    model = Tiny()
    trainer = SharpnessAwareTrainer(model=model, args=args, train_dataset=dataset(),
                                    optimizer_cls_and_kwargs=OPT)
    out = trainer.train()
    ref, ref_loss = hand_loop(accumulate, clip, bf16)
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, sharpopt.SAM) and opt.param_groups[0]["eps"] == 1e-3
    assert trainer.state.global_step == N // BATCH // accumulate
    tol = dict(rtol=1e-2, atol=1e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **tol,
                                   msg=lambda m: f"accumulate={accumulate} clip={clip} "
                                                 f"bf16={bf16}, {name}: {m}")
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):   # BN counted once
        torch.testing.assert_close(b, c, **tol, msg=lambda m: f"buffer {name}: {m}")
    # the loss the Trainer records is the one at w
    assert out.training_loss == pytest.approx(ref_loss, rel=1e-2 if bf16 else 1e-5)
