// What the GEMV and grad-input harnesses share: a fixed-seed generator, and reading,
// writing and rounding a value of the kernels' activation dtypes (kF32 / kF16 / kBF16)
// held in raw memory.
#pragma once

#include <math.h>
#include <stdint.h>

#include "cpu/isa.h"

namespace harness {

using namespace nf4lora;
using namespace nf4lora::cpu;

static uint32_t rng = 12345;
static uint32_t rnd() { rng = rng * 1664525u + 1013904223u; return rng >> 8; }
static float rndf() { return (rnd() % 2000001) / 1000000.0f - 1.0f; }  // [-1, 1]

static int es_of(int dt) { return dt == kF32 ? 4 : 2; }
static float get(const void* p, int dt, int64_t i) {
  if (dt == kF32) return ((const float*)p)[i];
  uint16_t b = ((const uint16_t*)p)[i];
  return dt == kF16 ? fp16_bits_to_float(b) : bf16_bits_to_float(b);
}
static void put(void* p, int dt, int64_t i, float v) {
  if (dt == kF32) ((float*)p)[i] = v;
  else ((uint16_t*)p)[i] = dt == kF16 ? float_to_fp16_bits(v) : float_to_bf16_bits(v);
}
static float round_to(int dt, double v) {  // double -> dtype value (as float)
  float f = (float)v;
  if (dt == kF32) return f;
  return dt == kF16 ? fp16_bits_to_float(float_to_fp16_bits(f))
                    : bf16_bits_to_float(float_to_bf16_bits(f));
}
static double ulp_of(int dt, float r) {  // ulp of a dtype value r (>= its magnitude)
  r = fabsf(r);
  if (dt == kF32) return (double)nextafterf(r, INFINITY) - r;
  if (dt == kF16) { uint16_t b = float_to_fp16_bits(r); return (double)fp16_bits_to_float(b + 1) - fp16_bits_to_float(b); }
  uint16_t b = float_to_bf16_bits(r); return (double)bf16_bits_to_float(b + 1) - bf16_bits_to_float(b);
}

}  // namespace harness
