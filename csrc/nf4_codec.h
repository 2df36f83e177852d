// nf4_codec.h: the ONE per-element codec of the nf4lora format, shared by the CPU
// kernels (csrc/cpu) and the CUDA kernels (csrc/cuda). Everything here is a pure
// function of its arguments, usable on host and device.
//
// The spec is nf4lora/reference.py (pure PyTorch). Every function below matches it
// bit for bit; that is why:
//   * every float operation is a single IEEE float32 op: host code is compiled with
//     -ffp-contract=off, and device code uses __fmul_rn/__fadd_rn, which nvcc never
//     fuses into an FMA (a fused a*b+c rounds once and would differ from the spec);
//   * comparisons are strict and ordered, so NaN compares false everywhere (a threshold
//     count of 0; the 4-bit encoder then gives it code 0, the dynamic 8-bit one code 0);
//   * the float -> bf16/fp16 conversions round to nearest even, like torch's `.to()`.
//
// No std:: calls: CUDA device code has no <cmath>/<cstring>; bit casts use memcpy-free
// unions on host and __float_as_uint on device.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define NF4_HD __host__ __device__ __forceinline__
#else
#define NF4_HD inline
#endif

namespace nf4lora {

// ---------------------------------------------------------------------------------
// A 4-bit format as data. The kernels know no format by name: NF4, FP4 and every code
// book (nf4lora/codebook.py) are values of these two structs, built in Python by
// codebook.kernel_codec(format key) and read by the bindings (csrc/bindings_common.h).
// ---------------------------------------------------------------------------------

// Decoding: element = level[code] * the block's absmax (reference.dequantize_4bit).
struct CodeTable {
  float level[16];
};

// Encoding a scaled value x = element * (1 / absmax): count the thresholds strictly below
// x (ascending, so a binary search finds the count too), and take that count's code.
//   * a table of 16 ascending levels (every format but FP4): the thresholds are the
//     float32 midpoints of consecutive levels and the code is the count (reference.
//     encode_sorted: a value on a midpoint is not above it, so it keeps the lower level);
//   * FP4 (sign bit 3, magnitude from |x| against 7 CUDA thresholds, reference.encode_fp4):
//     the thresholds are those 7 negated (each one float lower, so that a tie on |x| keeps
//     the lower magnitude on both sides), the negative float nearest zero (so -0.0 counts
//     as positive, as x < 0 says) and the 7 themselves; the codes are the sign-magnitude
//     codes of those 16 intervals (codebook.kernel_codec derives them).
// NaN is above nothing; it gets code 0 (bitsandbytes' CUDA rule for an all-zero block,
// scaled 0 * inf) whatever the code of count 0 is.
struct CodeEncoder {
  float threshold[15];     // ascending
  uint64_t code_of_count;  // bits 4c..4c+3: the code of count c (0..15)
};

// dtype ids of the kernels (their Python names: weight.h kDTypeNames).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---------------------------------------------------------------------------------
// Bit casts and strictly-rounded arithmetic: a * b, a + b and a / b rounded once each,
// never contracted into an FMA. The device has intrinsics for each; on the host the
// plain operators are (-ffp-contract=off keeps them apart) and bit casts go through a
// union.
// ---------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
NF4_HD uint32_t float_bits(float x) { return __float_as_uint(x); }
NF4_HD float bits_float(uint32_t u) { return __uint_as_float(u); }
NF4_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
NF4_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
NF4_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }  // IEEE under --use_fast_math too
#else
NF4_HD uint32_t float_bits(float x) {
  union { float f; uint32_t u; } v;
  v.f = x;
  return v.u;
}
NF4_HD float bits_float(uint32_t u) {
  union { uint32_t u; float f; } v;
  v.u = u;
  return v.f;
}
NF4_HD float mul_rn(float a, float b) { return a * b; }
NF4_HD float add_rn(float a, float b) { return a + b; }
NF4_HD float div_rn(float a, float b) { return a / b; }
#endif

NF4_HD float abs_f(float x) { return bits_float(float_bits(x) & 0x7fffffffu); }
NF4_HD bool is_nan(float x) { return (float_bits(x) & 0x7fffffffu) > 0x7f800000u; }
NF4_HD bool is_finite(float x) { return (float_bits(x) & 0x7f800000u) != 0x7f800000u; }
NF4_HD float quiet_nan() { return bits_float(0x7fc00000u); }

// The max of two magnitudes (non-negative or NaN) that keeps a NaN once seen, as
// torch.amax does: a block holding a NaN gets a NaN absmax, which is how callers detect
// bad input. Commutative and associative, so every reduction order gives the same bits.
NF4_HD float nan_max(float a, float b) {
  if (is_nan(a) || is_nan(b)) return quiet_nan();
  return a > b ? a : b;
}

// ---------------------------------------------------------------------------------
// The 4-bit codec: a table lookup and a threshold count.
// ---------------------------------------------------------------------------------

// The table value of a 4-bit code (no scale). `code & 15` keeps any int in the table.
NF4_HD float decode_4bit(const CodeTable& table, int code) { return table.level[code & 15]; }

// The code of a scaled value x (see CodeEncoder). Strict, ordered compares: a value on a
// threshold is not above it, and NaN is above none.
NF4_HD int encode_4bit(const CodeEncoder& encoder, float x) {
  int count = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) count += (x > encoder.threshold[i]) ? 1 : 0;
  return is_nan(x) ? 0 : (int)((encoder.code_of_count >> (4 * count)) & 15u);
}

// Nibble packing: element 2j in the high nibble of byte j, element 2j+1 in the low one.
NF4_HD uint8_t pack_nibbles(int first, int second) {
  return (uint8_t)((first << 4) | (second & 15));
}
NF4_HD int unpack_first(uint8_t byte) { return byte >> 4; }
NF4_HD int unpack_second(uint8_t byte) { return byte & 15; }
// The code of element i of a packed array.
NF4_HD int unpack_code(const uint8_t* packed, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? unpack_second(byte) : unpack_first(byte);
}

// Dynamic 8-bit encode, EXACTLY reference.encode_dynamic (= bitsandbytes CUDA
// dQuantize): a 7-step binary search over the sorted 256-entry `code` (start at 127,
// steps 64..1, go up while x > code[pivot]) brackets x as code[lower] < x <=
// code[upper]; then the nearest of lower/pivot/upper by float32 midpoints, a value
// exactly on a midpoint going to the pivot. NaN goes down every step and ends at 0.
NF4_HD int encode_dynamic(const float* code, float x) {
  int pivot = 127, lower = 0, upper = 255;
  for (int step = 64; step > 0; step >>= 1) {
    const bool up = x > code[pivot];
    lower = up ? pivot : lower;
    upper = up ? upper : pivot;
    pivot = up ? pivot + step : pivot - step;
  }
  const float value = code[pivot];
  if (x > value) {
    return (x > mul_rn(add_rn(code[upper], value), 0.5f)) ? upper : pivot;
  }
  return (x < mul_rn(add_rn(code[lower], value), 0.5f)) ? lower : pivot;
}

// Double quantization: absmax[i] = code2[q[i]] * absmax2[i / nested_blocksize] + offset,
// two float32 roundings in this order (reference.dequantize_absmax), never fused.
NF4_HD float decode_nested_absmax(const float* code2, uint8_t q, float absmax2,
                                  float offset) {
  return add_rn(mul_rn(code2[q], absmax2), offset);
}

// ---------------------------------------------------------------------------------
// float32 -> bf16 / fp16, round to nearest even, NaN stays NaN; same bits as torch's
// `.to(torch.bfloat16 / torch.float16)` for every non-NaN input, including subnormals
// and overflow to inf (NaN payloads may differ; torch itself is not consistent there).
// ---------------------------------------------------------------------------------
NF4_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
  // RNE at bit 16: add 0x7fff plus the lowest kept bit; a carry into the exponent is
  // the correct result (including rounding up to inf).
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

NF4_HD uint16_t float_to_fp16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  // NaN -> quiet NaN
  // >= 65520 (half way between 65504, the largest half, and 65536) rounds to inf;
  // the tie goes up because 65504's mantissa is odd.
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
  if (a >= 0x38800000u) {  // >= 2^-14: a normal half. Rebias the exponent by 127 - 15.
    const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | ((rounded - (112u << 23)) >> 13));
  }
  // Subnormal half: the result is round(|f| / 2^-24), RNE, in 0..1024 (1024 is the
  // smallest normal, 0x0400, which is also the right encoding). |f| = m * 2^(e - 150)
  // with the implicit bit in m, so |f| / 2^-24 = m >> (126 - e).
  const uint32_t e = a >> 23;
  const uint32_t shift = 126u - e;  // >= 14 here
  if (shift > 24u) return (uint16_t)sign;  // < 2^-25: rounds to zero
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  r += (rem > half || (rem == half && (r & 1u))) ? 1u : 0u;
  return (uint16_t)(sign | r);
}

// bf16 / fp16 -> float32 is exact.
NF4_HD float bf16_bits_to_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

NF4_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0x1fu) return bits_float(sign | 0x7f800000u | (m << 13));  // inf / NaN
  if (e != 0) return bits_float(sign | ((e + 112u) << 23) | (m << 13));
  // zero or subnormal: m * 2^-24, exact in float32 (one rounding-free multiply).
  return bits_float(sign | float_bits(mul_rn((float)m, 5.9604644775390625e-8f)));
}

}  // namespace nf4lora
