#!/usr/bin/env bash
# Static checks of the CUDA kernels, on the compiled code: no GPU and no CUDA torch needed
# (the .cu files include no torch header). Every .cu under csrc/ is compiled with `nvcc -c`
# for sm_80 and sm_90 with the flags the real build uses (sharpopt/_build.py nvcc_flags(),
# shared by setup.py and the just-in-time build) plus `-Xptxas -v`, and the check fails when
#   - a file does not compile;
#   - the build flags lack --fmad=false, or the PTX holds an fma instruction (a contracted
#     multiply-add rounds once where the reference rounds twice);
#   - a kernel spills registers (spill stores or loads > 0) or has a stack frame (none of
#     these kernels recurses or indexes a local array: a stack frame means a by-value
#     argument or an array was demoted to local memory);
#   - a kernel's parameters (summed from its PTX .entry, with alignment) exceed 4096 bytes,
#     the kernel-argument limit before CUDA 12.1;
#   - .ci/cuda_plan_test.cu (the launch tables' host code, run on the CPU) fails;
#   - the torch-side binding csrc/cuda/sharpopt_cuda.cpp does not compile (syntax and types
#     only, against the installed torch's headers; skipped when they lack c10/cuda).
# It prints registers, stack, spills and parameter bytes of every kernel. Skips (exit 0,
# with a message) when no nvcc is found on PATH or under /usr/local/cuda*/bin.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc_bin="$(command -v nvcc || true)"
if [[ -z "$nvcc_bin" ]]; then
  for cand in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    if [[ -x "$cand" ]]; then nvcc_bin="$cand"; fi   # the glob sorts: the last is the newest
  done
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "nvcc_check: SKIPPED, no nvcc on PATH or under /usr/local/cuda*/bin"
  exit 0
fi
echo "nvcc_check: using $nvcc_bin ($("$nvcc_bin" --version | tail -n 1))"

# The build's own nvcc flags (_build.py imports nothing at import time, so no torch here).
mapfile -t build_flags < <(python3 - <<'EOF'
import importlib.util
spec = importlib.util.spec_from_file_location("_sharpopt_build", "sharpopt/_build.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print("\n".join(mod.nvcc_flags()))
EOF
)
echo "nvcc_check: build flags ${build_flags[*]}"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "nvcc_check: FAILED, no .cu files under csrc/"
  exit 1
fi
status=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  keep="$out/$name"
  mkdir -p "$keep"
  # -keep leaves the PTX of both targets in $keep for the parameter and fma checks.
  if "$nvcc_bin" -c -std=c++17 -Icsrc "${build_flags[@]}" -Xptxas -v -keep -keep-dir "$keep" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xcompiler -Wall "$src" -o "$keep/$name.o" >"$keep/ptxas.log" 2>&1; then
    echo "nvcc_check: compiled $src"
  else
    cat "$keep/ptxas.log"
    echo "nvcc_check: FAILED  $src does not compile"
    status=1
    continue
  fi
  if ! python3 - "$src" "$keep" "${build_flags[@]}" <<'EOF'
import glob, re, subprocess, sys

src, keep, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
PARAM_LIMIT = 4096
failures = []

if "--fmad=false" not in flags:
    failures.append("the build flags lack --fmad=false: nvcc contracts a*b+c into one fma, "
                    "which rounds once where the reference rounds twice")

def demangle(names):
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                             text=True, check=True)
        out = res.stdout.splitlines()
        if len(out) == len(names):
            return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        pass
    return {n: n for n in names}

def short(name):
    name = re.sub(r"sharpopt_cuda::\(anonymous namespace\)::", "", name)
    return re.sub(r"sharpopt::math::|sharpopt_cuda::", "", name)

# ptxas -v: "Compiling entry function 'X' for 'sm_NN'" then the stack/spill and register lines.
stats = {}  # (arch, mangled) -> dict
cur = None
for line in open(f"{keep}/ptxas.log"):
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
    if m:
        cur = (m.group(2), m.group(1))
        stats[cur] = {}
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        stats[cur].update(stack=int(m.group(1)), st=int(m.group(2)), ld=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", line)
    if m:
        stats[cur]["regs"] = int(m.group(1))

# Parameter bytes of every .entry in the PTX, laid out as the ABI does (each aligned).
SCALAR = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "b32": 4,
          "u32": 4, "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}
params = {}  # (arch, mangled) -> bytes
fma = {}     # (arch, mangled) -> count of fma instructions
for ptx in sorted(glob.glob(f"{keep}/*.ptx")):
    arch = "sm_" + re.search(r"compute_(\d+)", ptx).group(1) if re.search(r"compute_(\d+)", ptx) else "?"
    text = open(ptx).read()
    for m in re.finditer(r"\.entry\s+(\S+)\s*\((.*?)\)\s*(?:\.\w+[^{]*)?\{(.*?)\n\}", text, re.S):
        name, plist, body = m.group(1), m.group(2), m.group(3)
        off = 0
        for p in re.finditer(r"\.param\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+\S+?(?:\[(\d+)\])?\s*(?:,|$)", plist):
            elem = SCALAR.get(p.group(2), 8)
            align = int(p.group(1)) if p.group(1) else elem
            size = elem * (int(p.group(3)) if p.group(3) else 1)
            off = (off + align - 1) // align * align + size
        params[(arch, name)] = off
        fma[(arch, name)] = len(re.findall(r"\bfma\.rn\.f(?:32|64)\b", body))

if not stats:
    failures.append("no kernel found in the ptxas output")
names = demangle(sorted({k[1] for k in stats}))
print(f"  {'arch':6} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'param B':>7} {'fma':>4}  kernel")
for (arch, mangled), s in sorted(stats.items(), key=lambda kv: (kv[0][0], short(names[kv[0][1]]))):
    pb = params.get((arch, mangled))
    nf = fma.get((arch, mangled), 0)
    kname = short(names[mangled])
    print(f"  {arch:6} {s.get('regs', -1):>4} {s.get('stack', -1):>5} "
          f"{s.get('st', -1):>5}/{s.get('ld', -1):<5} {pb if pb is not None else '?':>7} {nf:>4}  {kname}")
    if s.get("st", 0) or s.get("ld", 0):
        failures.append(f"{arch} {kname}: spills ({s['st']} B stores, {s['ld']} B loads)")
    if s.get("stack", 0):
        failures.append(f"{arch} {kname}: {s['stack']} B stack frame")
    if pb is None:
        failures.append(f"{arch} {kname}: no .entry found in the PTX to measure its parameters")
    elif pb > PARAM_LIMIT:
        failures.append(f"{arch} {kname}: {pb} B of parameters, over the {PARAM_LIMIT} B limit")
    if nf:
        failures.append(f"{arch} {kname}: {nf} fma instruction(s) in the PTX")
for f in failures:
    print(f"nvcc_check: FAILED  {src}: {f}")
sys.exit(1 if failures else 0)
EOF
  then
    status=1
  else
    echo "nvcc_check: ok      $src"
  fi
done

# The launch tables' host code, run here (no GPU needed): every block finds its tensor.
if "$nvcc_bin" -std=c++17 -O1 -Icsrc "${build_flags[@]}" -gencode arch=compute_80,code=sm_80 \
    .ci/cuda_plan_test.cu -o "$out/cuda_plan_test" >"$out/plan_test.log" 2>&1; then
  if "$out/cuda_plan_test"; then
    echo "nvcc_check: ok      .ci/cuda_plan_test.cu"
  else
    echo "nvcc_check: FAILED  .ci/cuda_plan_test.cu (launch-table test)"
    status=1
  fi
else
  cat "$out/plan_test.log"
  echo "nvcc_check: FAILED  .ci/cuda_plan_test.cu does not compile"
  status=1
fi

# The torch-side binding (csrc/cuda/sharpopt_cuda.cpp) cannot be built against a CPU-only
# torch, but it can be compiled for syntax and types: torch's headers ship c10/cuda, only
# the build-generated c10/cuda/impl/cuda_cmake_macros.h is missing (an empty stand-in
# here), and the CUDA runtime headers come with nvcc.
cuda_inc=""
for cand in "$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")/include" \
    /usr/local/cuda/include /usr/local/cuda-*/include; do
  if [[ -f "$cand/cuda_runtime.h" ]]; then cuda_inc="$cand"; fi
done
if mapfile -t inc < <(python3 -c '
import os, sys, sysconfig
try:
    import torch
except ImportError:
    sys.exit(1)
base = os.path.join(os.path.dirname(torch.__file__), "include")
if not os.path.isdir(os.path.join(base, "c10", "cuda")):
    sys.exit(1)
print(base)
print(os.path.join(base, "torch", "csrc", "api", "include"))
print(sysconfig.get_paths()["include"])
') && [[ ${#inc[@]} -eq 3 && -n "$cuda_inc" ]]; then
  mkdir -p "$out/stub/c10/cuda/impl"
  echo "#pragma once" > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  if g++ -std=c++17 -fsyntax-only -I"$out/stub" -I"${inc[0]}" -I"${inc[1]}" -I"${inc[2]}" \
      -I"$cuda_inc" -Icsrc -DTORCH_EXTENSION_NAME=_C_cuda csrc/cuda/sharpopt_cuda.cpp \
      >"$out/binding.log" 2>&1; then
    echo "nvcc_check: ok      csrc/cuda/sharpopt_cuda.cpp (syntax and types, CPU torch headers)"
  else
    grep -E "error" "$out/binding.log" | head -20
    echo "nvcc_check: FAILED  csrc/cuda/sharpopt_cuda.cpp does not compile"
    status=1
  fi
else
  echo "nvcc_check: SKIPPED csrc/cuda/sharpopt_cuda.cpp (no torch with c10/cuda headers, or no CUDA headers)"
fi
exit $status
