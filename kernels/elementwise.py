"""The per-element math of the Triton kernels, under the names of ``csrc/sharpopt_math.h``.

Each function takes values already loaded and widened to the accumulation type (fp32, or
fp64 for fp64 tensors) and returns the new values; the kernels load, call and store. The
same names, with the same operation order, are the C++/CUDA templates in
``csrc/sharpopt_math.h`` and the torch functions in ``sharpopt/backends/reference.py``,
so the four copies of each update can be read side by side:

===================== ========================================================
``weighted_dev``      the norm's term ``T (g - mu)``, ``T = |w| + eta`` (adaptive)
``perturb_elem``      ``s + scale T² (g - mu)``, ``T = |s| + eta`` (adaptive)
``lincomb_elem``      ``c0 x0 + c1 x1 + c2 x2``, 1 to 3 terms, left to right
``sgd_elem``          one ``torch.optim.SGD`` step (after the restore)
``adam_elem``         one ``torch.optim.Adam``/``AdamW`` step (after the restore)
``msam_back_elem``    MSAM's move back from ``w~``: ``w~ + s m``
``keep``              the non-finite guard's choice: ``old`` where ``z`` is NaN
===================== ========================================================

Switches that select code (``ADAPTIVE``, ``MAXIMIZE``, ...) are compile-time constants;
``init`` (a first SGD step) may be a runtime value.
"""
from __future__ import annotations

import triton.language as tl

from .tables import device_fn, div, sqrt


@device_fn
def weighted_dev(w, g, mu, eta, ADAPTIVE: tl.constexpr):
    d = g - mu
    if ADAPTIVE:
        d = (tl.abs(w) + eta) * d
    return d


@device_fn
def perturb_elem(s, g, mu, scale, eta, ADAPTIVE: tl.constexpr):
    d = g - mu
    if ADAPTIVE:
        t = tl.abs(s) + eta
        d = d * t * t
    return s + scale * d


@device_fn
def lincomb_elem(x0, x1, x2, c0, c1, c2, NTERMS: tl.constexpr):
    acc = c0 * x0
    if NTERMS > 1:
        acc = acc + c1 * x1
    if NTERMS > 2:
        acc = acc + c2 * x2
    return acc


@device_fn
def sgd_elem(w, buf, g, lr, wd, mom, damp1, init, MOMENTUM: tl.constexpr,
             NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr):
    """(new w, new buf); ``buf`` is ignored without ``MOMENTUM`` and when ``init``."""
    d = g
    if MAXIMIZE:
        d = -d
    d = d + wd * w
    if MOMENTUM:
        if init != 0:
            buf = d
        else:
            buf = mom * buf + damp1 * d
        if NESTEROV:
            d = d + mom * buf
        else:
            d = buf
    return w - lr * d, buf


@device_fn
def adam_elem(w, m, v, vmax, g, wd, decay, beta1c, beta2, beta2c, step_size, bc2_sqrt, eps,
              DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
              ACC: tl.constexpr):
    """(new w, m, v, vmax); ``vmax`` is returned as given without ``AMSGRAD``."""
    d = g
    if MAXIMIZE:
        d = -d
    if DECOUPLED:
        w = w * decay
    else:
        d = d + wd * w
    m = m + beta1c * (d - m)
    v = beta2 * v + beta2c * d * d
    vv = v
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        vv = vmax
    denom = div(sqrt(vv, ACC), bc2_sqrt, ACC) + eps
    return w - div(step_size * m, denom, ACC), m, v, vmax


@device_fn
def msam_back_elem(w_tilde, m, s):
    return w_tilde + s * m


@device_fn
def keep(z, fresh, old):
    """``old`` where ``z`` is NaN (``z = g - g``: the gradient was inf or NaN), else
    ``fresh``."""
    return tl.where(z != z, old, fresh)
