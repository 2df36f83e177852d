#!/usr/bin/env bash
# Run the AVX-512 CPU kernels on a machine without AVX-512, through SIMDe's portable
# emulation of the intrinsics (Debian package libsimde-dev), and check them:
#   cmp_codec  every codec entry point (quantize, dequantize incl. streaming stores,
#              8-bit blockwise) against the scalar path, byte for byte, for NF4, FP4, a
#              custom table and an encoder with scrambled codes (formats.h: the kernels
#              take formats as data), quantize also on every threshold and its neighbours;
#   cmp_gemv   the fused GEMV (scalar, native AVX2, emulated AVX-512 and AVX-512 +
#              AVX512-BF16; NF4, FP4 and a custom table; one adapter or a mixed-adapter
#              batch, each row its own adapter or none) against a float64 reference
#              (float32 within 1e-5 of the sum of |terms|, 16-bit outputs within one ulp;
#              for the vdpbf16ps path the reference's weights are rounded to bf16, as
#              that path's are);
#   cmp_grad_input  the fused grad-input (dx = grad @ W + grad_h @ lora_A, W packed) of the
#              same four paths against a float64 reference, panels cut three ways (the bytes
#              must not depend on the cut).
# csrc/cpu/isa_avx512.cpp is compiled as is, twice (the second time with
# NF4LORA_AVX512_BF16=1, as isa_avx512bf16.cpp does), except for a few lines: immintrin.h
# becomes the shim (SIMDe + the few intrinsics simde 0.7.4 lacks) and the target pragmas
# go, so the objects hold no AVX-512 instruction (checked). Without libsimde-dev (and no
# way to install it) this prints why and exits 0: it checks a path this machine class
# cannot run, it is not a build requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
HERE=$ROOT/scripts/avx512_emulated

if [ ! -f /usr/include/simde/x86/avx512.h ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q libsimde-dev >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libsimde-dev >/dev/null 2>&1; } || true
  fi
fi
if [ ! -f /usr/include/simde/x86/avx512.h ]; then
  echo "skipped: libsimde-dev is not installed and could not be installed"
  exit 0
fi

BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
sed -e 's|#include <immintrin.h>|#include "simde_shim.h"|' \
    -e 's|^#pragma GCC target(.*)$||' \
    csrc/cpu/isa_avx512.cpp > "$BUILD/isa_avx512_simde.cpp"
# NF4LORA_NO_AMX: no AMX entry in the emulated avx512bf16 object (its tile GEMM's
# instructions are AMX's, not AVX-512's; the tests run that kernel emulated on every CPU)
FLAGS=(-O2 -std=c++17 -ffp-contract=off -Wno-psabi -DNF4LORA_NO_AMX -I"$ROOT/csrc" -I"$ROOT/csrc/cpu" -I"$HERE")
g++ "${FLAGS[@]}" -c csrc/cpu/isa_scalar.cpp -o "$BUILD/scalar.o"
g++ "${FLAGS[@]}" -c csrc/cpu/isa_avx2.cpp -o "$BUILD/avx2.o"
g++ "${FLAGS[@]}" -mavx2 -mf16c -mfma -c "$BUILD/isa_avx512_simde.cpp" -o "$BUILD/avx512.o"
g++ "${FLAGS[@]}" -mavx2 -mf16c -mfma -DNF4LORA_AVX512_BF16=1 -c "$BUILD/isa_avx512_simde.cpp" \
    -o "$BUILD/avx512bf16.o"
for object in avx512 avx512bf16; do
  if objdump -d "$BUILD/$object.o" | grep -q "zmm\|bf16ps"; then
    echo "the emulated $object object holds real AVX-512 instructions: the shim did not take" >&2
    exit 1
  fi
done
for harness in cmp_codec cmp_gemv cmp_grad_input; do
  g++ "${FLAGS[@]}" -mavx2 -mf16c -mfma "$HERE/$harness.cpp" "$BUILD/scalar.o" "$BUILD/avx2.o" \
      "$BUILD/avx512.o" "$BUILD/avx512bf16.o" -o "$BUILD/$harness"
  echo "== $harness"
  "$BUILD/$harness"
done
