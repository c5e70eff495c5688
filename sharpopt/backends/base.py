"""The primitive passes every backend implements.

Every algorithm in sharpopt is written once (in ``sharpopt/<algorithm>.py``) as a short
sequence of the passes below. A backend is an object with these methods; the optimizer
wrappers never touch a tensor's elements themselves. Adding a backend therefore means
implementing these nine passes (the two MSAM passes have a composed default here), and
its tests are the same suite run against ``reference``.

Conventions shared by every pass:

* Every list argument holds tensors of **one device and one dtype** (the wrappers split
  mixed groups before calling), all of the same length ``n``. Entries are aligned by
  index: ``params[i]``, ``grads[i]``, ``saved[i]`` belong to the same parameter.
* Backends with ``requires_dense`` get tensors that are dense and non-overlapping, and
  every operand of a parameter (gradient, saved copy, optimizer state) is laid out like
  the parameter, so a pass may walk them all in memory order: contiguous and
  channels_last alike. Where a pass centralises rows, each row ``g[r, ...]`` is one block
  of memory (dim 0 is the outermost), which holds for both of those layouts.
  :func:`layout_problem` is that rule; the wrappers send any other layout to ``foreach``
  (or refuse it when the backend was asked for by name). The other backends take any
  strides. ``params``, ``saved`` and the optimizer state have the parameter's dtype; ``row_means`` buffers are fp32 (for fp64 parameters
  too: the centralised direction then carries the mean to fp32 precision; the norm itself
  is accumulated in fp64).
* Scalars (``scale``, the entries of ``coefs``) are Python floats or 0-dim fp32 tensors on
  the tensors' device. A pass never calls ``.item()`` on them: norms stay on the device.
* Reductions (``sumsq``, ``dot``) return a 0-dim tensor on the tensors' device, fp32
  (fp64 for fp64 inputs), accumulated in that precision at least; with ``n == 0`` they
  return zero.
* Arithmetic on bf16/fp16 tensors is carried out in fp32 and rounded once when stored.

Notation used below: ``C(g)`` is gradient centralisation (for a tensor with ``dim > 1``,
``g[r, ...] - mean(g[r, ...])`` per row ``r``; identity otherwise); ``T = |w| + eta`` when
``adaptive`` and ``1`` otherwise, where ``w`` is the unperturbed parameter.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]


class Ops:
    """Interface of a backend. See the module docstring for the shared conventions."""

    #: Registry name (``"reference"``, ``"foreach"``, ``"cpu"``, ...).
    name: str = "?"
    #: True when :meth:`restore_sgd` / :meth:`restore_adam` are worth calling, i.e. the
    #: backend merges the restore with the base update. ``reference`` says False: it
    #: restores and then lets ``torch.optim`` itself step, which is what defines the numbers.
    fuses_base_update: bool = True
    #: True when the passes index raw memory in memory order: the wrappers then give them
    #: only the layouts :func:`layout_problem` accepts, instead of letting a kernel read
    #: the wrong elements.
    requires_dense: bool = False
    #: True when :meth:`perturb`, :meth:`restore_sgd` and :meth:`restore_adam` take the
    #: ``found_inf`` flag of the non-finite guard (see :meth:`restore_sgd`); the wrappers
    #: then check inf/NaN inside those passes instead of in a pass of their own.
    guards_nonfinite: bool = False

    def supports(self, device: torch.device) -> bool:
        """Whether this backend can run on tensors of ``device``."""
        raise NotImplementedError

    # -- reductions -------------------------------------------------------------------
    def sumsq(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        *,
        adaptive: bool,
        eta: float,
        centralize: bool,
        row_means: Optional[Sequence[Optional[Tensor]]] = None,
    ) -> Tensor:
        """``Σ_i ‖T_i ⊙ C_i(g_i)‖²`` (``C`` applied only when ``centralize``).

        When ``row_means`` is given, ``row_means[i]`` is either None (the tensor has
        ``dim <= 1``) or an fp32 buffer of ``g_i.shape[0]`` elements that receives the
        per-row mean of ``g_i``, so that :meth:`perturb` can centralise without a second
        reduction. This is independent of ``centralize`` (GCSAM's "raw" norm wants the
        plain norm but a centralised direction).
        """
        raise NotImplementedError

    def sumsq_value(self, grads: Sequence[Tensor], params: Sequence[Tensor], **kwargs) -> float:
        """:meth:`sumsq` read on the host, as a Python float (its value in its dtype). Only
        called where a host read costs nothing (CPU tensors); a backend whose pass can hand
        the value over without making a tensor overrides it."""
        return self.sumsq(grads, params, **kwargs).item()

    def dot(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
        """``Σ_i ⟨x_i, y_i⟩``."""
        raise NotImplementedError

    # -- elementwise passes -----------------------------------------------------------
    def perturb(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        saved: Sequence[Tensor],
        scale: Scalar,
        *,
        adaptive: bool,
        eta: float,
        row_means: Optional[Sequence[Optional[Tensor]]] = None,
        save: bool = True,
    ) -> None:
        """``saved ← w`` (only when ``save``), then ``w ← saved + scale · T² ⊙ C(g)``.

        ``T = |saved| + eta`` is taken from the saved (unperturbed) weights, so the same
        call with ``save=False`` and a negated scale gives CR-SAM's ``w − e``.
        ``C`` is applied to the tensors whose ``row_means[i]`` is not None, with those
        means; with ``row_means=None`` nothing is centralised.

        ``found_inf`` (backends with ``guards_nonfinite`` only): the two-element fp32 flag
        of :meth:`restore_sgd`; when ``found_inf[0] != 0`` the step is skipped and ``e = 0``:
        ``saved ← w`` with ``w`` unchanged (``save``), or ``w ← saved``.
        """
        raise NotImplementedError

    def restore(self, params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
        """``w ← saved``, bit for bit."""
        raise NotImplementedError

    def lincomb(
        self, out: Sequence[Tensor], xs: Sequence[Sequence[Tensor]], coefs: Sequence[Scalar]
    ) -> None:
        """``out_i ← Σ_k coefs[k] · xs[k][i]`` for 1 to 3 terms; ``out`` may alias any ``xs[k]``."""
        raise NotImplementedError

    # -- restore merged with the base optimizer's update --------------------------------
    def restore_sgd(
        self,
        params: Sequence[Tensor],
        saved: Optional[Sequence[Tensor]],
        grads: Sequence[Tensor],
        momentum_buffers: Sequence[Tensor],
        *,
        lr: float,
        weight_decay: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        maximize: bool,
        init_buffers: bool,
    ) -> None:
        """``w ← saved`` (skipped when ``saved`` is None), then one ``torch.optim.SGD`` step
        with gradient ``d = grads``::

            d ← (−d if maximize else d) + weight_decay · w
            buf ← d                                  if init_buffers (first step)
            buf ← momentum · buf + (1 − dampening) · d   otherwise
            d ← d + momentum · buf if nesterov else buf  (only when momentum ≠ 0)
            w ← w − lr · d

        With ``momentum == 0`` ``momentum_buffers`` is empty and ignored.

        ``found_inf`` (backends with ``guards_nonfinite`` only; None: no guard): a contiguous
        fp32 tensor of two elements on the tensors' device, read and written by the pass
        on the device (no host synchronisation):

        * ``found_inf[0] != 0``: the step is skipped: ``w ← saved`` and nothing else.
        * otherwise an element whose gradient ``grads[i][j]`` is inf or NaN keeps its
          weight (``saved``, or ``w``) and its state (a buffer created by this step,
          ``init_buffers``, starts at 0 there), every other element takes the step, and
          ``found_inf[1]`` is set to 1 when any element was kept so.
        """
        raise NotImplementedError

    def restore_adam(
        self,
        params: Sequence[Tensor],
        saved: Optional[Sequence[Tensor]],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        max_exp_avg_sqs: Sequence[Tensor],
        *,
        step: int,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        amsgrad: bool,
        maximize: bool,
    ) -> None:
        """``w ← saved`` (skipped when None), then one ``torch.optim.Adam``/``AdamW`` step
        with gradient ``d = grads``; ``step`` is the already incremented step count::

            d ← −d if maximize else d
            w ← w · (1 − lr · weight_decay)        if decoupled   (AdamW)
            d ← d + weight_decay · w               otherwise      (Adam)
            m ← m + (1 − beta1) · (d − m)
            v ← beta2 · v + (1 − beta2) · d²
            vmax ← max(vmax, v)                    if amsgrad (then v ← vmax below)
            w ← w − lr / (1 − beta1^step) · m / (√v / √(1 − beta2^step) + eps)

        With ``amsgrad`` False ``max_exp_avg_sqs`` is empty and ignored. ``found_inf``:
        as in :meth:`restore_sgd` (a kept element keeps ``m``, ``v`` and ``vmax``).
        """
        raise NotImplementedError

    # -- MSAM: the move back from w~, the base update and the momentum norm in one pass ----
    # The defaults below compose the primitive passes (three passes over the tensors); the
    # fused backends override them with one pass that also returns the norm.
    def msam_sgd(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        momentum_buffers: Sequence[Tensor],
        back: Optional[Scalar],
        *,
        lr: float,
        weight_decay: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        maximize: bool,
        init_buffers: bool,
    ) -> Tensor:
        """MSAM's step with SGD-momentum (``momentum != 0``); returns ``Σ_i ‖buf_i‖²`` of
        the updated buffers (accumulated as :meth:`sumsq` does)::

            w ← w + back · buf          (the move back from w~; skipped when back is None)
            one torch.optim.SGD step on w with gradient grads (see restore_sgd)

        ``back`` must be None when ``init_buffers`` (there is no buffer to move along).
        """
        if back is not None:
            self.lincomb(params, [params, momentum_buffers], [1.0, back])
        self.restore_sgd(params, None, grads, momentum_buffers, lr=lr,
                         weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, maximize=maximize, init_buffers=init_buffers)
        return self.sumsq(momentum_buffers, momentum_buffers, adaptive=False, eta=0.0,
                          centralize=False)

    def msam_adam(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        max_exp_avg_sqs: Sequence[Tensor],
        back: Optional[Scalar],
        *,
        step: int,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        amsgrad: bool,
        maximize: bool,
    ) -> Tensor:
        """MSAM's step with Adam/AdamW; returns ``Σ_i ‖exp_avg_i‖²`` after the update::

            w ← w + back · exp_avg      (the old exp_avg; skipped when back is None)
            one torch.optim.Adam/AdamW step on w with gradient grads (see restore_adam)
        """
        if back is not None:
            self.lincomb(params, [params, exp_avgs], [1.0, back])
        self.restore_adam(params, None, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                          step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                          maximize=maximize)
        return self.sumsq(exp_avgs, exp_avgs, adaptive=False, eta=0.0, centralize=False)


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same memory order: equal strides on every dimension longer than
    one (a size-1 dimension's stride is arbitrary and does not move any element)."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory exactly once, in some order of its
    dimensions (contiguous, channels_last, a transpose of either...)."""
    expected = 1
    for stride, n in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return False
        expected *= n
    return True


def rows_are_blocks(t: Tensor) -> bool:
    """Whether each row ``t[r, ...]`` is one block of memory (dim 0 the outermost), as
    gradient centralisation's row passes need; trivially so for ``dim <= 1``, a single row
    or an empty tensor."""
    return t.dim() <= 1 or t.shape[0] <= 1 or t.numel() == 0 or \
        t.stride(0) * t.shape[0] == t.numel()


def layout_problem(p: Tensor, g: Optional[Tensor], *, rows: bool) -> Optional[str]:
    """Why a ``requires_dense`` backend cannot run parameter ``p`` with gradient ``g``
    (None when it can): both dense and non-overlapping and laid out alike, and, with
    ``rows`` (gradient centralisation), each row ``p[r, ...]`` one block of memory."""
    if p.is_contiguous() and (g is None or g.is_contiguous()):
        return None                               # the common case, decided in C++
    if not is_dense(p):
        return "it is not dense (a strided view or an overlapping tensor)"
    if g is not None and not same_layout(p, g):
        return f"its gradient has other strides {tuple(g.stride())}"
    if rows and not rows_are_blocks(p):
        return "gradient centralisation needs each row in one block of memory (dim 0 outermost)"
    return None


def centralize_dims(t: Tensor) -> tuple:
    """The dimensions GC averages over: every one but the first (empty for ``dim <= 1``)."""
    return tuple(range(1, t.dim()))
