"""timm: the registered names build sharpopt optimizers through create_optimizer_v2, and
the NativeScaler loop equals a hand-written sharpopt loop. Importing sharpopt (and the
integration modules) imports no trainer package."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sharpopt
from sharpopt.integrations import timm as sharpopt_timm


def test_import_sharpopt_imports_no_trainer_package():
    code = ("import sys, sharpopt, sharpopt.integrations.timm, sharpopt.integrations; "
            "bad = [m for m in ('timm', 'torchvision', 'lightning', 'pytorch_lightning', "
            "'transformers', 'accelerate') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported at `import sharpopt`: {out.stdout}"


def test_registered_names_pass_timms_parser_rules():
    """timm splits a name on '_' (the first field may be 'lookahead') and keeps the last
    field, lower-cased: a name must be one lower-case field."""
    for name in sharpopt_timm.names():
        assert name == name.lower() and "_" not in name, name


@pytest.fixture(scope="module")
def timm():
    try:
        import timm.optim
        import timm.utils
    except Exception as exc:   # e.g. a torchvision built for another torch
        pytest.skip(f"timm does not import here: {type(exc).__name__}: {exc}")
    sharpopt_timm.register()
    return timm


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


@pytest.mark.parametrize("name", sharpopt_timm.names())
def test_create_optimizer_v2_builds_registered_optimizers(timm, name):
    base_name = next(b for b in sharpopt_timm.BASES if name.endswith(b) and
                     name[:-len(b)] in sharpopt_timm.ALGORITHMS)
    algo, (base, flags) = name[:-len(base_name)], sharpopt_timm.BASES[base_name]
    extra = dict(eps=1e-6, betas=(0.8, 0.9)) if flags["has_eps"] else {}
    opt = timm.optim.create_optimizer_v2(net(), name, lr=0.01, weight_decay=1e-3, rho=0.07,
                                         **extra)
    assert type(opt) is sharpopt_timm.ALGORITHMS[algo]
    assert type(opt.base_optimizer) is base
    groups = opt.param_groups
    assert {g["weight_decay"] for g in groups} == {0.0, 1e-3}   # timm's no-decay split
    assert all(g["rho"] == 0.07 and g["lr"] == 0.01 for g in groups)
    if flags["has_eps"]:
        assert all(g["eps"] == 1e-6 and g["betas"] == (0.8, 0.9) for g in groups)
        assert opt.perturb_eps == 1e-12
    else:
        assert all(g["momentum"] == 0.9 and not g["nesterov"] for g in groups)


def test_native_scaler_loop_matches_hand_written_loop(timm):
    from timm.utils import NativeScaler

    def batches():
        g = torch.Generator().manual_seed(2)
        return [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
                for _ in range(4)]

    def loss_fn(model, x, y):
        with torch.autocast("cpu", dtype=torch.float16):
            return F.cross_entropy(model(x).float(), y)

    model, ref = net(), net()
    opt = timm.optim.create_optimizer_v2(model, "gsamadamw", lr=1e-2, rho=0.1, eps=1e-6)
    ref_opt = sharpopt.GSAM(ref.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, eps=1e-6,
                            weight_decay=0.0)
    loss_scaler = NativeScaler(device="cpu")
    ref_scaler = torch.amp.GradScaler("cpu")
    for x, y in batches():
        loss_scaler(loss_fn(model, x, y), opt, need_update=False)
        if sharpopt_timm.first_step(opt, loss_scaler):
            loss_scaler(loss_fn(model, x, y), opt, clip_grad=0.05,
                        parameters=model.parameters())
        opt.zero_grad()

        ref_scaler.scale(loss_fn(ref, x, y)).backward()
        assert ref_opt.first_step(zero_grad=True, grad_scaler=ref_scaler)
        ref_scaler.scale(loss_fn(ref, x, y)).backward()
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.second_step(zero_grad=True, grad_scaler=ref_scaler)
        ref_scaler.update()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"NativeScaler loop, {name}: {m}")
