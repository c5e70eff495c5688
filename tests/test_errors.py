"""Errors name the user's parameter.

Rule: when a backend refuses a parameter (its layout, before a step changes anything; or
a check inside a pass), the message names it as the user knows it - by its name where the
optimizer was built from ``model.named_parameters()``, else by its group, its index in
that group and its shape - and keeps the exception type, chained to the backend's own.
"""
from __future__ import annotations

import pytest
import torch

import sharpopt
from conftest import require_backend


class TwoLayers(torch.nn.Module):
    """A dense layer, a bias-only layer and a strided (non-dense) weight, registered in
    that order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(5, 3)
        self.shift = torch.nn.Parameter(torch.randn(3))
        self.mixer = torch.nn.Parameter(torch.randn(3, 10)[:, ::2])   # strides (10, 2)

    def forward(self, x):
        return (self.head(x) + self.shift) @ self.mixer


def _closure(model, opt):
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss
    return closure


def test_layout_refusal_names_a_named_parameter():
    """A backend asked for by name refuses a strided parameter, naming it."""
    require_backend("cpu")
    model = TwoLayers()
    opt = sharpopt.SAM(model.named_parameters(), torch.optim.SGD, lr=0.1, backend="cpu")
    with pytest.raises(ValueError, match=r"parameter 'mixer' \(shape \(3, 5\)\)") as info:
        opt.step(_closure(model, opt))
    assert "not dense" in str(info.value)


def test_layout_refusal_without_names_gives_group_index_and_shape():
    require_backend("cpu")
    model = TwoLayers()
    groups = [{"params": [model.head.weight, model.head.bias]},
              {"params": [model.shift, model.mixer], "lr": 0.01}]
    opt = sharpopt.SAM(groups, torch.optim.SGD, lr=0.1, backend="cpu")
    with pytest.raises(ValueError, match=r"group 1, parameter 1, shape \(3, 5\)"):
        opt.step(_closure(model, opt))


def test_check_inside_a_pass_names_the_parameter():
    """A C++ check in the cpu backend (a momentum buffer of another length, as a
    checkpoint of another model would leave) comes back naming the parameter it is about,
    as the same exception type, chained to the backend's message."""
    require_backend("cpu")
    model = TwoLayers()
    model.mixer = torch.nn.Parameter(model.mixer.detach().contiguous())
    opt = sharpopt.SAM(model.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                       backend="cpu")
    opt.step(_closure(model, opt))                       # creates the momentum buffers
    opt.base_optimizer.state[model.shift]["momentum_buffer"] = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[\d+\]") as info:
        opt.step(_closure(model, opt))
    message = str(info.value)
    assert "parameter 'shift' (shape (3,))" in message, message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "'shift'" not in str(info.value.__cause__)


def test_check_inside_a_pass_without_names():
    require_backend("cpu")
    model = TwoLayers()
    model.mixer = torch.nn.Parameter(model.mixer.detach().contiguous())
    opt = sharpopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                       backend="cpu")
    opt.step(_closure(model, opt))
    opt.base_optimizer.state[model.head.bias]["momentum_buffer"] = torch.zeros(7)
    # model.parameters() lists own parameters (shift, mixer) before the submodule's
    with pytest.raises(RuntimeError, match=r"group 0, parameter 3, shape \(3,\)"):
        opt.step(_closure(model, opt))


def test_errors_that_name_no_entry_pass_through_unchanged():
    """A refusal that is about no single parameter keeps its message."""
    require_backend("cpu")
    model = TwoLayers()
    model.mixer = torch.nn.Parameter(model.mixer.detach().contiguous())
    opt = sharpopt.SAM(model.named_parameters(), torch.optim.SGD, lr=0.1, backend="cpu")
    ops = opt._ops_for(torch.device("cpu"))
    ws = [model.head.weight.detach(), model.shift.detach()]
    with pytest.raises(ValueError, match="^lincomb takes 1 to 3 terms") as info:
        ops.lincomb(ws, [ws] * 4, [1.0] * 4)
    assert info.value.__cause__ is None


def test_unavailable_backend_names_the_parameter_that_needs_it():
    """A backend asked for by name that cannot run on a parameter's device says which
    parameter needs it (here: cuda without a GPU, or triton on CPU without its
    interpreter)."""
    name = "cuda" if not torch.cuda.is_available() else None
    if name is None:
        pytest.skip("needs a machine where a named backend cannot run")
    model = TwoLayers()
    with pytest.raises(sharpopt.BackendUnavailable, match=r"needed for parameter 'shift'"):
        sharpopt.SAM(model.named_parameters(), torch.optim.SGD, lr=0.1, backend=name)
