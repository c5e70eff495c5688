"""Backend ``cpu``: the fused passes as one compiled C++ call per pass over a tensor list.

Each pass reads and writes every tensor once (the fused byte counts of docs/byte-model.md), runs on
all threads of ``torch.get_num_threads()`` through ``at::parallel_for``, and vectorises with
ATen's ``at::vec``. The per-element math is ``csrc/sharpopt_math.h``, shared with the
``cuda`` backend. Reductions cut the work into shape-determined units and add the unit
partials in a fixed order, in double, so they are bit-reproducible for any thread count.
bf16/fp16 tensors are computed in fp32 and rounded once when stored.

The extension comes from ``setup.py`` or is compiled on first use (see ``sharpopt._build``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import Ops, Scalar


def _scalar(s: Scalar) -> Tuple[float, Optional[Tensor]]:
    """A pass scalar as (value, tensor): the C++ side reads the tensor when one is given."""
    if isinstance(s, Tensor):
        return 0.0, s
    return float(s), None


def _opt(row_means: Optional[Sequence[Optional[Tensor]]]) -> List[Optional[Tensor]]:
    return [] if row_means is None else _seq(row_means)


def _seq(xs: Sequence) -> Sequence:
    """``xs`` as the extension takes it: a list or tuple as it is (read in place, no copy),
    any other iterable copied into a list."""
    return xs if isinstance(xs, (list, tuple)) else list(xs)


class CpuOps(Ops):
    name = "cpu"
    fuses_base_update = True
    requires_dense = True
    guards_nonfinite = True

    def __init__(self, ext) -> None:
        self._ext = ext

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    def sumsq(self, grads, params, *, adaptive, eta, centralize, row_means=None) -> Tensor:
        return self._ext.sumsq(_seq(grads), _seq(params) if adaptive else [], bool(adaptive),
                               float(eta), bool(centralize), _opt(row_means))

    def sumsq_value(self, grads, params, *, adaptive, eta, centralize, row_means=None) -> float:
        return self._ext.sumsq_value(_seq(grads), _seq(params) if adaptive else [],
                                     bool(adaptive), float(eta), bool(centralize),
                                     _opt(row_means))

    def dot(self, xs, ys) -> Tensor:
        return self._ext.dot(_seq(xs), _seq(ys))

    def perturb(self, params, grads, saved, scale, *, adaptive, eta, row_means=None,
                save=True, found_inf=None) -> None:
        value, tensor = _scalar(scale)
        self._ext.perturb(_seq(params), _seq(grads), _seq(saved), value, tensor, bool(adaptive),
                          float(eta), _opt(row_means), bool(save), found_inf)

    def restore(self, params, saved) -> None:
        self._ext.restore(_seq(params), _seq(saved))

    def lincomb(self, out, xs, coefs) -> None:
        if not 1 <= len(xs) <= 3 or len(xs) != len(coefs):
            raise ValueError("lincomb takes 1 to 3 terms with one coefficient each")
        split = [_scalar(c) for c in coefs]
        tensors = [t for _, t in split]
        self._ext.lincomb(_seq(out), [_seq(x) for x in xs], [v for v, _ in split],
                          tensors if any(t is not None for t in tensors) else [])

    def restore_sgd(self, params, saved, grads, momentum_buffers, *, lr, weight_decay,
                    momentum, dampening, nesterov, maximize, init_buffers,
                    found_inf=None) -> None:
        self._ext.restore_sgd(
            _seq(params), [] if saved is None else _seq(saved), saved is not None, _seq(grads),
            _seq(momentum_buffers) if momentum != 0 else [], float(lr), float(weight_decay),
            float(momentum), float(dampening), bool(nesterov), bool(maximize),
            bool(init_buffers), found_inf)

    def restore_adam(self, params, saved, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *,
                     step, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                     maximize, found_inf=None) -> None:
        self._ext.restore_adam(
            _seq(params), [] if saved is None else _seq(saved), saved is not None, _seq(grads),
            _seq(exp_avgs), _seq(exp_avg_sqs), _seq(max_exp_avg_sqs) if amsgrad else [],
            int(step), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            bool(decoupled), bool(amsgrad), bool(maximize), found_inf)

    def msam_sgd(self, params, grads, momentum_buffers, back, *, lr, weight_decay, momentum,
                 dampening, nesterov, maximize, init_buffers) -> Tensor:
        value, tensor = _scalar(0.0 if back is None else back)
        return self._ext.msam_sgd(
            _seq(params), _seq(grads), _seq(momentum_buffers), value, tensor, back is not None,
            float(lr), float(weight_decay), float(momentum), float(dampening), bool(nesterov),
            bool(maximize), bool(init_buffers))

    def msam_adam(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, back, *, step,
                  lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize) -> Tensor:
        value, tensor = _scalar(0.0 if back is None else back)
        return self._ext.msam_adam(
            _seq(params), _seq(grads), _seq(exp_avgs), _seq(exp_avg_sqs),
            _seq(max_exp_avg_sqs) if amsgrad else [], value, tensor, back is not None,
            int(step), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            bool(decoupled), bool(amsgrad), bool(maximize))


def load() -> Ops:
    """The ``cpu`` backend; raises BackendUnavailable when its extension cannot be built."""
    from .._build import load_extension

    return CpuOps(load_extension("cpu"))
