"""The Triton kernels as compiled for the GPU, checked without one (``bench/ptx_check.py``).

Every kernel variant the launchers can request is compiled for sm_90 and sm_80 by the
installed Triton, and by each extra Triton listed in ``$SHARPOPT_EXTRA_TRITON``
(directories separated by ``os.pathsep``, each holding a ``triton`` package, e.g. from
``pip install --no-deps --target DIR triton==3.6.0``), each in its own process with the
interpreter off. The rules (per-element tail guards, 16-byte accesses in the flat
kernels' main loops, no vector access on unaligned tables, no register spills) are
themselves tested on hand-written PTX, so the check can fail.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not installed; plain ``pytest`` does not add it
    sys.path.insert(0, str(ROOT))

from bench import ptx_check  # noqa: E402
EXTRA = [d for d in os.environ.get("SHARPOPT_EXTRA_TRITON", "").split(os.pathsep) if d]
# The whole check takes about a minute per Triton on two cores; allow a slow machine.
TIMEOUT_S = 1800


@pytest.mark.parametrize("triton_dir", [None] + EXTRA,
                         ids=["installed"] + [f"extra:{d}" for d in EXTRA])
def test_compiled_kernels_pass_the_check(triton_dir):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if triton_dir is not None:
        if not os.path.isdir(os.path.join(triton_dir, "triton")):
            pytest.fail(f"$SHARPOPT_EXTRA_TRITON names {triton_dir}, which holds no triton "
                        "package")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, env.get("PYTHONPATH"))
                                            if p)
    res = subprocess.run([sys.executable, "-m", "bench.ptx_check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    out = res.stdout + res.stderr
    print(out)
    first = out.splitlines()[0] if out else ""
    if triton_dir is not None:
        want = os.path.realpath(os.path.join(triton_dir, "triton"))
        assert first.startswith("triton ") and os.path.realpath(first.split(" from ")[-1]) \
            == want, f"the check did not run the Triton in {triton_dir}: {first!r}"
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert res.returncode == 0 and not failures, (
        f"compiled-code check failed ({first}), exit {res.returncode}, "
        f"{len(failures)} variants:\n" + "\n".join(failures[:40]) + "\n" + out[-3000:])
    assert " 0 fail " in out, out[-2000:]


# -- the rules on hand-written PTX ----------------------------------------------------------

def _variant(dt="fp32", flat=True, aligned=True, loads=1, stores=1):
    return ptx_check.Variant("test", "norm", "_flat_kernel", {}, {}, dt, flat, aligned,
                             loads, stores)


CLEAN_LOG = "ptxas info    : Used 40 registers, used 1 barriers\n" \
            "ptxas info    : 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"


# Elements per thread of a compiled main-loop vector (1024 over 128 threads); this
# process may run the interpreter, whose vectors are shorter.
EPT = 8


def _ptx(loop_body, tail):
    preds = "\n".join(f"\t@%p{10 + k} st.global.b32 [ %rd{40 + k} + 0 ], {{ %r{k} }};"
                      for k in range(EPT // 2)) if tail is None else tail
    return ("$L__BB0_2:\n" + loop_body + "\n\tsetp.lt.s64 %p2, %rd3, %rd4;\n"
            "\t@%p2 bra \t$L__BB0_2;\n" + preds + "\n")


def _vec(op, n, reg=10):
    if op == "ld":
        return "\n".join(f"\tld.global.v4.b32 {{ %r1, %r2, %r3, %r4 }}, [ %rd{reg + k} + 0 ];"
                         for k in range(n))
    return "\n".join(f"\tst.global.v4.b32 [ %rd{reg + k} + 0 ], {{ %r1, %r2, %r3, %r4 }};"
                     for k in range(n))


def test_rules_accept_vectorised_loop_and_per_element_tail():
    per = EPT * 4 // 16
    errors, facts = ptx_check.check(_variant(), _ptx(_vec("ld", per) + "\n" +
                                                     _vec("st", per, 20), None),
                                    CLEAN_LOG, EPT)
    assert errors == [] and facts["ld16"] == per and facts["st16"] == per, errors


def test_rules_reject_one_predicate_over_two_vectors():
    """The Triton 3.9 defect: one predicate guards vectors 512 elements apart."""
    per = EPT * 4 // 16
    tail = ("\t@%p4 ld.global.v4.b32 { %r23, %r24, %r25, %r26 }, [ %rd27 + 0 ];\n"
            "\t@%p4 ld.global.v4.b32 { %r28, %r29, %r30, %r31 }, [ %rd28 + 0 ];")
    errors, _ = ptx_check.check(_variant(stores=0), _ptx(_vec("ld", per), tail), CLEAN_LOG,
                                EPT)
    assert any("predicated vector" in e for e in errors), errors
    assert any("tail guarded by 1 predicates" in e for e in errors), errors


def test_rules_reject_scalar_main_loop_and_packed_pairs():
    scalar = "\n".join(f"\tld.global.b32 {{ %r{k} }}, [ %rd{k} + 0 ];" for k in range(8))
    errors, facts = ptx_check.check(_variant(stores=0), _ptx(scalar, None), CLEAN_LOG,
                                    EPT)
    assert facts["ld16"] == 0 and any("16-byte loads" in e for e in errors), errors
    # bf16: a predicated 32-bit load without a 16-bit one under its predicate is a pair
    pair = "\n".join(f"\t@%p{k} ld.global.b32 {{ %r{k} }}, [ %rd{k} + 0 ];" for k in range(8))
    errors, _ = ptx_check.check(_variant("bf16", stores=0), _ptx(_vec("ld", 1), pair),
                                CLEAN_LOG, EPT)
    assert any("packed pair" in e for e in errors), errors


def test_rules_reject_vectors_on_unaligned_tables_and_spills():
    errors, _ = ptx_check.check(_variant(aligned=False), _ptx(_vec("ld", 2), None),
                                CLEAN_LOG, EPT)
    assert any("unaligned" in e for e in errors), errors
    spilled = CLEAN_LOG.replace("0 bytes spill stores, 0 bytes spill loads",
                                "8 bytes spill stores, 12 bytes spill loads")
    errors, facts = ptx_check.check(_variant(flat=False, aligned=False), "", spilled, EPT)
    assert errors == ["spills: 8 B stored, 12 B loaded"] and facts["regs"] == 40, errors
