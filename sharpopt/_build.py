"""Finding or building the compiled extensions of the ``cpu`` and ``cuda`` backends.

:func:`load_extension` is the only entry point. It returns the module in this order:

1. the extension built by ``setup.py`` (``sharpopt._C_cpu`` / ``sharpopt._C_cuda``) when it
   imports and, for ``cpu``, was compiled for an instruction set this machine has;
2. otherwise a just-in-time build with ``torch.utils.cpp_extension.load`` (needs ninja and a
   C++ compiler; nvcc for ``cuda``), cached in ``$SHARPOPT_BUILD_DIR/<name>`` or torch's
   default extensions directory. It prints one line to stderr when it compiles; later runs
   load the cached build.

A build that fails raises :class:`~sharpopt._errors.BackendUnavailable` (also exported as
``sharpopt.BackendUnavailable`` and ``sharpopt.backends.BackendUnavailable``) with the tail of
the compiler's output. Nothing here runs at ``import sharpopt``: the backends call it on
first use.

The C++/CUDA sources are looked up in ``sharpopt/csrc`` (where ``setup.py`` puts them in a
built wheel) and then in ``csrc/`` next to the package (a source or editable checkout).

This module imports neither torch nor the rest of sharpopt at import time, so ``setup.py``
loads it by path to share the source lists and compiler flags.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional

BUILD_DIR_ENV = "SHARPOPT_BUILD_DIR"

#: Instruction sets the CPU extension can be compiled for, weakest first.
ISA_ORDER = ["DEFAULT", "AVX2", "AVX512"]

# ATen's at::vec picks its vector width from CPU_CAPABILITY_*; the -m flags must match it.
_ISA_FLAGS: Dict[str, List[str]] = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}

_cache: Dict[str, object] = {}


def csrc_dir() -> Path:
    """Directory holding ``sharpopt_math.h`` and the ``cpu/`` and ``cuda/`` sources."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "sharpopt_math.h").is_file():
            return cand
    raise FileNotFoundError(
        f"sharpopt's C++ sources are missing (looked in {here / 'csrc'} and {here.parent / 'csrc'})"
    )


def machine_isa() -> str:
    """The strongest entry of :data:`ISA_ORDER` this CPU runs, as torch detects it."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    import torch

    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return "AVX512"
    return "AVX2" if cap.startswith("AVX2") else "DEFAULT"


def sources(kind: str, root: Optional[Path] = None) -> List[str]:
    root = csrc_dir() if root is None else root
    if kind == "cpu":
        return [str(root / "cpu" / "sharpopt_cpu.cpp"), str(root / "cpu" / "host.cpp")]
    if kind == "cuda":
        return [str(root / "cuda" / "sharpopt_cuda.cpp"), str(root / "cuda" / "sharpopt_kernels.cu")]
    raise ValueError(f"unknown extension kind {kind!r}")


def cxx_flags(kind: str, isa: str = "DEFAULT") -> List[str]:
    # OpenMP is what makes at::parallel_for run in parallel inside the extension. No
    # contraction of a*b+c into one fma, as nvcc's --fmad=false below: GCC contracts even
    # vector intrinsics by default, differently in each instantiation, so the guarded and
    # the plain update (and the reference's separate ops) would round apart.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"] if kind == "cpu" else ["-O3"]
    return flags + (_ISA_FLAGS[isa] if kind == "cpu" else [])


def nvcc_flags() -> List[str]:
    # The kernels must round like the CPU code and the reference: no fast-math, and no
    # contraction of a*b+c into one fma (nvcc's default --fmad=true rounds once where the
    # reference's separate ops round twice). .ci/nvcc_check.sh compiles with these flags and
    # fails on any fma left in the PTX.
    return ["-O3", "-lineinfo", "--fmad=false"]


def ld_flags(kind: str) -> List[str]:
    return ["-fopenmp"] if kind == "cpu" else []


def _unavailable(msg: str) -> Exception:
    # Imported here, not at the top: setup.py loads this file by path, outside the package.
    from ._errors import BackendUnavailable

    return BackendUnavailable(msg)


def _prebuilt(kind: str):
    """The setup.py build, or None (with the reason) when it is absent or unsuitable."""
    try:
        mod = importlib.import_module(f"sharpopt._C_{kind}")
    except ImportError as exc:
        return None, f"no prebuilt extension ({exc})"
    if kind == "cpu":
        built, here = mod.isa(), machine_isa()
        if ISA_ORDER.index(built) > ISA_ORDER.index(here):
            return None, f"prebuilt extension targets {built}, this CPU has {here}"
    return mod, ""


def load_extension(kind: str):
    """The compiled module for ``kind`` (``"cpu"`` or ``"cuda"``); see the module docstring."""
    if kind in _cache:
        return _cache[kind]
    mod, _ = _prebuilt(kind)
    if mod is None:
        mod = _jit_build(kind)
    _cache[kind] = mod
    return mod


def _jit_build(kind: str):
    try:
        import torch.utils.cpp_extension as cpp
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        raise _unavailable(f"torch.utils.cpp_extension is not importable: {exc}") from None
    try:
        root = csrc_dir()
    except FileNotFoundError as exc:
        raise _unavailable(str(exc)) from None
    isa = machine_isa() if kind == "cpu" else "DEFAULT"
    name = f"sharpopt_{kind}_{isa.lower()}" if kind == "cpu" else f"sharpopt_{kind}"
    build_root = os.environ.get(BUILD_DIR_ENV)
    if build_root:
        build_dir = os.path.join(os.path.expanduser(build_root), name)
        os.makedirs(build_dir, exist_ok=True)
    else:
        build_dir = cpp._get_build_directory(name, verbose=False)
    if not os.path.exists(os.path.join(build_dir, f"{name}.so")):
        print(f"sharpopt: compiling the {kind!r} extension ({isa if kind == 'cpu' else 'nvcc'}) "
              f"into {build_dir}; this happens once", file=sys.stderr, flush=True)
    try:
        return cpp.load(
            name=name,
            sources=sources(kind, root),
            extra_cflags=cxx_flags(kind, isa),
            extra_cuda_cflags=nvcc_flags() if kind == "cuda" else None,
            extra_ldflags=ld_flags(kind),
            extra_include_paths=[str(root)],
            build_directory=build_dir,
            with_cuda=(kind == "cuda"),
            verbose=False,
        )
    except Exception as exc:  # compiler errors, missing ninja/nvcc, a broken cache
        text = str(exc).strip().splitlines()
        tail = "\n".join(text[-25:])
        raise _unavailable(f"building the {kind!r} extension failed: {tail}") from None
