#!/usr/bin/env bash
# Compiles every CUDA source under csrc/ with `nvcc -c` for sm_80 and sm_90: the kernels
# include no torch header, so this needs only the CUDA toolkit, not a GPU or a CUDA torch.
# Skips (exit 0, with a message) when no nvcc is found on PATH or under /usr/local/cuda*/bin.
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

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "nvcc_check: FAILED, no .cu files under csrc/"
  exit 1
fi
status=0
for src in "${sources[@]}"; do
  obj="$out/$(basename "$src" .cu).o"
  if "$nvcc_bin" -c -std=c++17 -O3 -Icsrc \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xcompiler -Wall "$src" -o "$obj"; then
    echo "nvcc_check: ok      $src"
  else
    echo "nvcc_check: FAILED  $src"
    status=1
  fi
done
exit $status
