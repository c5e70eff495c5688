"""accelerate: Accelerator.prepare + accelerator.backward + the two passes equal a
hand-written sharpopt loop (fp32, bf16, clipping between the passes); the fp16 scaler path
through accelerate's own AcceleratedOptimizer.step (on CPU with a CPU GradScaler, since
Accelerator(mixed_precision="fp16") has no scaler on CPU; the full path runs on a GPU)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed "
                                 "(pip install -e '.[integrations]')")
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

import sharpopt  # noqa: E402
from sharpopt.integrations.accelerate import first_step  # noqa: E402

N, BATCH = 5, 4


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)   # one mixed-precision setting per process otherwise
    yield
    AcceleratorState._reset_state(True)


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def data():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g))
            for _ in range(N)]


def make_opt(model):
    return sharpopt.GSAM(model.parameters(), torch.optim.AdamW, rho=0.1, alpha=0.3, lr=1e-2)


def hand_loop(clip, ctx=contextlib.nullcontext, scaler=None, poison=None):
    model = net()
    opt = make_opt(model)
    for i, (x, y) in enumerate(data()):
        def loss():
            with ctx():
                out = F.cross_entropy(model(x).float(), y)
            out = out * float("inf") if i == poison else out
            return scaler.scale(out) if scaler else out
        loss().backward()
        if opt.first_step(zero_grad=True, grad_scaler=scaler):
            loss().backward()
            if clip:
                if scaler:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.second_step(zero_grad=True, grad_scaler=scaler)
        if scaler:
            scaler.update()
    return model


def accelerate_loop(accelerator, clip):
    model = net()
    opt = make_opt(model)
    model, opt = accelerator.prepare(model, opt)
    for x, y in data():
        accelerator.backward(F.cross_entropy(model(x).float(), y))
        if first_step(accelerator, opt):
            accelerator.backward(F.cross_entropy(model(x).float(), y))
            if clip:
                accelerator.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return accelerator.unwrap_model(model)


@pytest.mark.parametrize("precision,clip", [("no", None), ("no", 0.05), ("bf16", 0.05)])
def test_accelerate_matches_hand_written_loop(precision, clip):
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision=precision)
    model = accelerate_loop(accelerator, clip)
    bf16 = precision == "bf16"
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    ref = hand_loop(clip, ctx)
    tol = dict(rtol=1e-2, atol=1e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **tol,
                                   msg=lambda m: f"{precision} clip={clip}, {name}: {m}")


@pytest.mark.parametrize("poison", [None, 2], ids=["finite", "inf-at-step-2"])
def test_accelerated_optimizer_scaler_step(poison):
    """accelerate's AcceleratedOptimizer.step with a GradScaler (scaler.step(opt, None),
    then update()) finishes the step; an inf skips it with w restored."""
    init = 2.0 ** 12
    accelerate.Accelerator(cpu=True)          # the state AcceleratedOptimizer reads
    model = net()
    scaler = torch.amp.GradScaler("cpu", init_scale=init)
    opt = AcceleratedOptimizer(make_opt(model), device_placement=False, scaler=scaler)
    ctx = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    for i, (x, y) in enumerate(data()):
        def loss():
            with ctx():
                out = F.cross_entropy(model(x).float(), y)
            return scaler.scale(out * float("inf") if i == poison else out)
        before = [p.detach().clone() for p in model.parameters()]
        loss().backward()
        if opt.optimizer.first_step(zero_grad=True, grad_scaler=scaler):
            loss().backward()
        opt.step()
        opt.zero_grad()
        if i == poison:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), \
                "a skipped step must leave w as it was"
    ref = hand_loop(None, ctx, torch.amp.GradScaler("cpu", init_scale=init), poison)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"poison={poison}, {name}: {m}")
    assert scaler.get_scale() == (init / 2 if poison else init)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Accelerator(mixed_precision='fp16') has a GradScaler only on a GPU")
def test_accelerate_fp16_on_gpu_matches_hand_written_loop():
    accelerator = accelerate.Accelerator(mixed_precision="fp16")
    model = accelerate_loop(accelerator, 0.05)
    ref = net().cuda()
    opt = make_opt(ref)
    scaler = torch.amp.GradScaler("cuda")
    for x, y in data():
        x, y = x.cuda(), y.cuda()
        def loss():
            with torch.autocast("cuda", dtype=torch.float16):
                return scaler.scale(F.cross_entropy(ref(x).float(), y))
        loss().backward()
        if opt.first_step(zero_grad=True, grad_scaler=scaler):
            loss().backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
            opt.second_step(zero_grad=True, grad_scaler=scaler)
        scaler.update()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-4,
                                   msg=lambda m: f"fp16 on GPU, {name}: {m}")
