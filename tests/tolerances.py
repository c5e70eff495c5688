"""The one tolerance table of the test suites: how far a backend may be from ``reference``.

Each entry says which kind of difference it allows and why; a test picks the entry for
what it compares, never a number of its own. Where the two pass-test files and the
property tests had different values for the same comparison, the tighter one is kept;
an entry looser than another for the same comparison names the backends that need it
and what they do differently (``tests/test_passes.py`` fails with the tighter one).

* ``PASS`` - one elementwise pass (perturb, lincomb, the restore-and-update passes) on the
  same inputs, per stored dtype: ``triton``'s kernels mirror the reference's operations one
  by one (no multiply-add contraction, bf16/fp16 rounded to nearest even once), so they
  match to the last bit on every element seen; one rounding step of the stored dtype is
  allowed in case a GPU's libdevice and the CPU's eager kernels round an intermediate
  differently.
* ``PASS_REORDERED`` - the same comparison for ``cpu``, ``cuda`` and ``foreach``: the C++
  kernels contract multiply-adds (``at::vec::fmadd``) and order some operations
  differently, and ``foreach`` computes through torch's multi-tensor kernels
  (``alpha=`` forms, ``addcdiv``), so an fp32/fp64 result may be a few ulps off and a
  bf16/fp16 result one ulp of the storage type (an fp32 difference of one ulp can flip
  the final rounding). With ``PASS`` they fail on a few elements per tensor.
* ``REDUCTION`` - ``sumsq`` and ``dot``: rtol relative to the sum of the terms' absolute
  values (summation order is the only difference; every backend accumulates in fp32, fp64
  for fp64 inputs).
* ``REDUCTION_FOREACH`` - ``foreach``'s reductions take each tensor's norm with
  ``torch._foreach_norm`` and square it: the square root and the square each round, a
  few fp32 ulps of the sum on tensors of 10^5 elements (the value the property tests
  always used for it).
* ``DOT_OF_RESULT`` - (rtol, atol) of ``dot`` relative to its result, which the property
  tests check besides ``REDUCTION``: on their small random shapes it holds, and where
  the terms cancel it is the tighter of the two bounds.
* ``ROW_MEANS`` - the fp32 per-row means ``sumsq`` writes for gradient centralisation: one
  short fp32 sum each, summed in another order.
* ``CHAINED_PASSES`` - a few SAM steps chained through the passes: the perturbation's
  scale comes from a reduction (summation order differs), and bf16 roundings compound over
  the steps.
* ``TRAJECTORY`` - whole multi-step optimizer runs (``conftest.assert_close``). fp32/fp64:
  only summation order differs from the reference, but it compounds over the steps. bf16:
  each stored value is rounded to 8 bits of mantissa, and the backends round at different
  points (torch.optim after every op, the fused kernels once), so a few ulps of bf16
  (2^-8 each) apart.
"""
from __future__ import annotations

import torch

PASS = {                                 # (rtol, atol)
    torch.float64: (2.0 ** -52, 1e-300),
    torch.float32: (2.0 ** -23, 1e-30),
    torch.bfloat16: (2.0 ** -7, 2.0 ** -133),
    torch.float16: (2.0 ** -10, 2.0 ** -24),
}

PASS_REORDERED = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2.0 ** -7, 1e-6),
    torch.float16: (2.0 ** -10, 1e-6),
}
REORDERING_BACKENDS = ("cpu", "cuda", "foreach")

REDUCTION = {
    torch.float64: 1e-14,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-6,   # bf16/fp16 inputs are exact in fp32, the accumulation is fp32
    torch.float16: 1e-6,
}

REDUCTION_FOREACH = {
    torch.float64: 1e-14,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-5,
    torch.float16: 1e-5,
}

DOT_OF_RESULT = {
    torch.float64: (1e-10, 1e-6),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-5, 1e-6),
}

ROW_MEANS = {                            # (rtol, atol); the buffers are fp32 for every dtype
    torch.float64: (1e-10, 1e-7),       # summed in fp64 and rounded once to fp32
    torch.float32: (1e-6, 1e-7),
    torch.bfloat16: (1e-6, 1e-7),
    torch.float16: (1e-6, 1e-7),
}

CHAINED_PASSES = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2.0 ** -6, 1e-3),
}

TRAJECTORY = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (3e-2, 1e-2),
    torch.float16: (5e-3, 1e-3),
}


def pass_tol(dtype: torch.dtype, backend: str) -> tuple:
    """(rtol, atol) for one elementwise pass of ``backend`` on ``dtype`` tensors."""
    return (PASS_REORDERED if backend in REORDERING_BACKENDS else PASS)[dtype]


def reduction_rtol(dtype: torch.dtype, backend: str) -> float:
    """rtol, relative to the sum of the terms' absolute values, of ``backend``'s
    reductions on ``dtype`` tensors."""
    return (REDUCTION_FOREACH if backend == "foreach" else REDUCTION)[dtype]
