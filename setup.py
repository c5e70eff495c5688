"""Builds sharpopt's compiled backends (the package metadata is in pyproject.toml).

Install with ``pip install --no-build-isolation -e .`` so that torch is importable here.
Without torch, or with ``SHARPOPT_NO_EXT=1``, no extension is built and the ``cpu``/``cuda``
backends compile themselves on first use instead (see sharpopt/_build.py).

Environment variables:
  SHARPOPT_NO_EXT=1      build no extension at all.
  SHARPOPT_NO_CUDA=1     skip the CUDA extension (it is built only where torch has CUDA).
  SHARPOPT_CPU_ISA=X     DEFAULT, AVX2 or AVX512: the vector width of the CPU extension.
                         Default: the build machine's (as torch detects it). A machine
                         without that instruction set ignores the build and compiles its
                         own on first use, so the default is safe to ship; DEFAULT gives a
                         portable but slower build.
  SHARPOPT_CUDA_ARCH=L   compute capabilities, e.g. "8.0;9.0" (sets TORCH_CUDA_ARCH_LIST;
                         default: torch's choice for the visible GPU).

The C++/CUDA sources are also copied into the package (sharpopt/csrc) of a non-editable
build, so that an installed wheel can still compile on first use.
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _build_helpers():
    # Loaded by path: importing the sharpopt package itself would need its dependencies.
    spec = importlib.util.spec_from_file_location("_sharpopt_build", ROOT / "sharpopt" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class build_py_with_sources(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            dst = Path(self.build_lib) / "sharpopt" / "csrc"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(ROOT / "csrc", dst)


def _extensions():
    if _flag("SHARPOPT_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    helpers = _build_helpers()
    csrc = Path("csrc")
    isa = os.environ.get("SHARPOPT_CPU_ISA", "").strip().upper() or helpers.machine_isa()
    if isa not in helpers.ISA_ORDER:
        raise SystemExit(f"SHARPOPT_CPU_ISA must be one of {helpers.ISA_ORDER}, got {isa!r}")
    exts = [CppExtension(
        "sharpopt._C_cpu",
        helpers.sources("cpu", csrc),
        include_dirs=[str(ROOT / csrc)],
        extra_compile_args={"cxx": helpers.cxx_flags("cpu", isa)},
        extra_link_args=helpers.ld_flags("cpu"),
    )]
    if torch.version.cuda and CUDA_HOME and not _flag("SHARPOPT_NO_CUDA"):
        if os.environ.get("SHARPOPT_CUDA_ARCH"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["SHARPOPT_CUDA_ARCH"]
        exts.append(CUDAExtension(
            "sharpopt._C_cuda",
            helpers.sources("cuda", csrc),
            include_dirs=[str(ROOT / csrc)],
            extra_compile_args={"cxx": helpers.cxx_flags("cuda"), "nvcc": helpers.nvcc_flags()},
        ))
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": build_py_with_sources, **cmdclass})
