#!/usr/bin/env bash
# CI compile check of the CUDA kernels (no GPU needed).
#
#   bash scripts/check_cuda.sh
#
# 1. Compiles every csrc/cuda/*.cu for sm_80 and sm_90 with the flags setup.py uses,
#    nvcc warnings AND host-compiler warnings as errors, and `--resource-usage`.
# 2. Prints registers / spills / local memory (stack) / shared memory per kernel.
# 3. Checks the host-side C++ of the CUDA extension with -Wall -Wextra -Werror: the
#    pybind11 module (csrc/cuda/*.cpp) and the CPU replay driver (csrc/cuda_host).
# Exits non-zero on any warning, compile error, spill, or stack frame (a register array
# indexed at run time falls to local memory: as slow as a spill). Skips, exit 0, with a
# message when nvcc is absent. About a minute on 2 cores (the 4 nvcc jobs run 2 at a time).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"
  else NVCC="$(command -v nvcc || true)"; fi
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: SKIPPED: nvcc not found (put it on PATH or set CUDA_HOME); nothing compiled"
  exit 0
fi

ARCHS=(80 90)
JOBS="${CHECK_CUDA_JOBS:-2}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda: no csrc/cuda/*.cu files"; exit 1
fi
echo "check_cuda: $("$NVCC" --version | tail -1) | ${#SOURCES[@]} file(s) x sm_${ARCHS[*]/%/,} $JOBS jobs"

# One nvcc job: <source> <arch>. --fmad=false and -O3 as setup.py; -Werror all-warnings
# turns nvcc/cudafe/ptxas warnings into errors, -Xcompiler -Werror the host compiler's.
compile_one() {
  local src="$1" arch="$2" log="$OUT/$(basename "$1" .cu).sm_$2.log"
  if "$NVCC" -c "$src" -o "$log.o" -O3 -std=c++17 --fmad=false -Icsrc \
      -gencode "arch=compute_$arch,code=sm_$arch" \
      -Werror all-warnings --resource-usage -Xcompiler -Wall,-Wextra,-Werror >"$log" 2>&1; then
    echo ok >"$log.status"
  else
    echo failed >"$log.status"
  fi
}
export -f compile_one
export NVCC OUT

start=$SECONDS
for src in "${SOURCES[@]}"; do for arch in "${ARCHS[@]}"; do echo "$src $arch"; done; done |
  xargs -P "$JOBS" -L 1 bash -c 'compile_one "$0" "$1"'

# Host-side C++ of the extension and of the test driver: syntax + warnings only (fast).
PY_INCLUDES="$(python -c 'import pybind11, sysconfig; print("-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"])' 2>/dev/null || true)"
host_status=0
for cpp in csrc/cuda/*.cpp csrc/cuda_host/*.cpp; do
  if [[ "$cpp" == csrc/cuda/*.cpp && -z "$PY_INCLUDES" ]]; then
    echo "check_cuda: note: pybind11 not importable, $cpp not checked"; continue
  fi
  # shellcheck disable=SC2086
  if ! ${CXX:-g++} -std=c++17 -fsyntax-only -Wall -Wextra -Werror -ffp-contract=off -Icsrc $PY_INCLUDES "$cpp" \
      >"$OUT/host.log" 2>&1; then
    echo "check_cuda: FAILED: host compile of $cpp"; cat "$OUT/host.log"; host_status=1
  fi
done

# Resource-usage table, from ptxas' "Compiling entry function", "N bytes stack frame,
# N bytes spill stores, N bytes spill loads" and "Used N registers, ..., N bytes smem".
status=$host_status
rows="$OUT/rows.tsv"
: >"$rows"
for log in "$OUT"/*.log; do
  [[ "$log" == */host.log ]] && continue
  if [[ "$(cat "$log.status")" != ok ]]; then
    echo "check_cuda: FAILED: $(basename "$log" .log)"; grep -v "^ptxas info" "$log" | head -40
    status=1
    continue
  fi
  if grep -qiE "warning" "$log"; then
    echo "check_cuda: FAILED: warnings in $(basename "$log" .log)"; grep -iE "warning" "$log"; status=1
  fi
  # POSIX awk (mawk here): no gawk extensions.
  awk -v q="'" '
    /Compiling entry function/ { split($0, part, q); name = part[2]; arch = part[4] }
    /bytes stack frame/ { stack = $1; spill_st = $5; spill_ld = $9 }
    /Used [0-9]+ registers/ {
      regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
      smem = 0
      if ($0 ~ /bytes smem/) { smem = $0; sub(/ bytes smem.*/, "", smem); sub(/.* /, "", smem) }
      if (name != "") print name "\t" arch "\t" regs "\t" spill_st "\t" spill_ld "\t" stack "\t" smem
      name = ""
    }' "$log" >>"$rows"
done

# Demangle and shorten: nf4lora::cuda::(anonymous namespace)::k<nf4lora::cuda::BF16, 8>(...) -> k<BF16, 8>
table="$OUT/table.tsv"
printf "kernel\tarch\tregs\tspill_st\tspill_ld\tstack\tsmem\n" >"$table"
while IFS=$'\t' read -r name rest; do
  pretty="$(echo "$name" | c++filt | sed -E 's/nf4lora::cuda::(\(anonymous namespace\)::)?//g; s/\(.*$//')"
  printf "%s\t%s\n" "$pretty" "$rest"
done < <(sort -u "$rows") | sort -t$'\t' -k1,1 -k2,2 >>"$table"
column -t -s$'\t' "$table"

kernels=$(($(wc -l <"$table") - 1))
bad=$(awk -F'\t' 'NR > 1 && ($4 > 0 || $5 > 0 || $6 > 0)' "$table")
if [[ -n "$bad" ]]; then
  echo "check_cuda: FAILED: spills or local memory (stack frame) in:"; echo "$bad"; status=1
fi
if [[ $kernels -eq 0 ]]; then echo "check_cuda: FAILED: no kernels found in the ptxas output"; status=1; fi
echo "check_cuda: $kernels kernel builds checked in $((SECONDS - start)) s: $([[ $status -eq 0 ]] && echo OK || echo FAILED)"
exit $status
