"""Memory layouts the fused backends walk in memory order.

Rule (``sharpopt.backends.base.layout_problem``): a fused backend runs a parameter whose
tensor is dense and non-overlapping and whose gradient, saved copy and optimizer state are
laid out like it (contiguous and channels_last alike); gradient centralisation also needs
each row in one block of memory. Any other layout goes to ``foreach`` under ``auto`` (said
once) and is refused, naming the parameter, by a backend asked for by name.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import sharpopt
from conftest import require_backend
from test_backends import ALGORITHMS, batches, closure_for, compare

CL = torch.channels_last
BASES = {
    "SGD-momentum-wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "AdamW": (torch.optim.AdamW, dict(lr=3e-3, weight_decay=1e-2)),
}


def cl_model(seed=0):
    """Two conv layers (one with an odd 7x3x3x3 kernel) and a head, in channels_last."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 7, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(7, 5, 3, bias=False), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(5 * 3 * 3, 3),
    )
    return model.to(memory_format=CL)


def conv_weights(model):
    return [m.weight for m in model if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_channels_last_trains_like_reference(fast_backend, algo, base):
    """Every algorithm on a channels_last conv net: same trajectory as the reference, the
    fused backend really ran every parameter (no fallback), and the state it created
    (saved copies, momentum, Adam moments) is channels_last too."""
    entry, kwargs = ALGORITHMS[algo]
    base_cls, base_kwargs = BASES[base]
    ref_model = cl_model()
    model = copy.deepcopy(ref_model)
    assert all(w.is_contiguous(memory_format=CL) and not w.is_contiguous()
               for w in conv_weights(model))
    ref_opt = entry.build(ref_model.parameters(), base_cls, backend="reference", **kwargs,
                          **base_kwargs)
    opt = entry.build(model.parameters(), base_cls, backend=fast_backend, **kwargs,
                      **base_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a fallback would warn
        for step, (x, y) in enumerate(batches(torch.float32, 4)):
            x = x.contiguous(memory_format=CL)
            ref_opt.step(closure_for(ref_model, x, y))
            opt.step(closure_for(model, x, y))
            compare(step, ref_model, model, ref_opt, opt, torch.float32)
    assert opt.backend == fast_backend
    for w in conv_weights(model):
        assert w.is_contiguous(memory_format=CL), "the step changed the parameter's layout"
        for key, t in opt.base_optimizer.state[w].items():
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                assert t.is_contiguous(memory_format=CL), f"state {key!r} is not channels_last"


def test_state_from_a_contiguous_checkpoint_is_relaid(fast_backend):
    """A checkpoint of a contiguous model loaded into a channels_last one: the momentum is
    given the parameters' layout (values kept), and training goes on like the reference."""
    def run(model, backend, state=None):
        opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05,
                           momentum=0.9, backend=backend)
        if state is not None:
            opt.load_state_dict(state)
        return opt

    warm = cl_model().to(memory_format=torch.contiguous_format)
    warm_opt = run(warm, "reference")
    data = batches(torch.float32, 4)
    for x, y in data[:2]:
        warm_opt.step(closure_for(warm, x, y))
    state = warm_opt.state_dict()
    assert all(s["momentum_buffer"].is_contiguous() for s in state["base_optimizer"]["state"].values())
    ref_model, model = copy.deepcopy(warm), copy.deepcopy(warm)
    model.to(memory_format=CL)
    ref_opt = run(ref_model, "reference", copy.deepcopy(state))
    opt = run(model, fast_backend, copy.deepcopy(state))
    for step, (x, y) in enumerate(data[2:]):
        ref_opt.step(closure_for(ref_model, x, y))
        opt.step(closure_for(model, x, y))
        compare(step, ref_model, model, ref_opt, opt, torch.float32)
    if require_backend(fast_backend).requires_dense:     # the others take any strides
        for w in conv_weights(model):
            assert opt.base_optimizer.state[w]["momentum_buffer"].is_contiguous(
                memory_format=CL), "the momentum kept the checkpoint's layout"


def _rows_not_outermost():
    """A dense 4x6 weight whose dim 0 is not the outermost (a transposed contiguous 6x4):
    fine for the flat passes, not for gradient centralisation's row blocks."""
    return torch.nn.Parameter(torch.randn(6, 4).t())


@pytest.mark.parametrize("make, rows", [
    (lambda: torch.nn.Parameter(torch.randn(4, 10)[:, ::2]), False),   # not dense
    (_rows_not_outermost, True),                                       # rows not blocks
], ids=["strided-view", "gc-rows-not-blocks"])
def test_unsupported_layout_refused_by_name_and_falls_back_under_auto(fast_backend, make, rows):
    """A forced fused backend refuses the layout before changing anything, naming the
    parameter's shape; ``auto`` (where it picks that backend) steps that one parameter with
    ``foreach`` (one warning) and matches the reference."""
    from sharpopt.backends import resolve

    if not require_backend(fast_backend).requires_dense:
        pytest.skip(f"{fast_backend} takes any strides")
    cls = sharpopt.GCSAM if rows else sharpopt.SAM
    w, other = make(), torch.nn.Parameter(torch.randn(5, 3))
    target = torch.randn(w.shape)

    def closure_of(p, q):
        def closure():
            loss = ((p - target) ** 2).sum() + (q ** 2).sum()
            loss.backward()
            return loss
        return closure

    before = w.detach().clone()
    forced = cls([w, other], torch.optim.SGD, lr=0.1, momentum=0.9, backend=fast_backend)
    with pytest.raises(ValueError, match=r"shape \(4, (5|6)\)"):
        forced.step(closure_of(w, other))
    assert torch.equal(w.detach(), before), "a refused step changed the weights"

    if resolve("auto", w.device).name != fast_backend:
        return                                  # auto does not pick this backend here
    w_ref, other_ref = (torch.nn.Parameter(t.detach().clone()) for t in (w, other))
    w_auto, other_auto = make(), torch.nn.Parameter(other.detach().clone())
    with torch.no_grad():
        w_auto.copy_(w)
    ref = cls([w_ref, other_ref], torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference")
    auto = cls([w_auto, other_auto], torch.optim.SGD, lr=0.1, momentum=0.9, backend="auto")
    with pytest.warns(RuntimeWarning, match="foreach"):
        auto.step(closure_of(w_auto, other_auto))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # said once, not every step
        for _ in range(2):
            auto.step(closure_of(w_auto, other_auto))
    for _ in range(3):
        ref.step(closure_of(w_ref, other_ref))
    torch.testing.assert_close(w_auto, w_ref)
    torch.testing.assert_close(other_auto, other_ref)
