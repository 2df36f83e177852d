#pragma once
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <math.h>
#include <string.h>
#include <immintrin.h>
// intrinsics simde 0.7.4 lacks, emulated with its portable vector types
// lane-by-lane integer conversions: dst.dst_field[i] = (type)src.src_field[i], i < n
#define SHIM_CONVERT(name, Dst, Src, n, dst_field, src_field, type)              \
  static inline Dst shim_##name(Src a) {                                         \
    Src##_private x = Src##_to_private(a);                                       \
    Dst##_private r;                                                             \
    for (int i = 0; i < n; ++i) r.dst_field[i] = (type)x.src_field[i];           \
    return Dst##_from_private(r);                                                \
  }
SHIM_CONVERT(cvtepu16_epi32, simde__m512i, simde__m256i, 16, i32, u16, int32_t)
SHIM_CONVERT(cvtepi32_epi16, simde__m256i, simde__m512i, 16, i16, i32, int16_t)
SHIM_CONVERT(cvtepi32_epi8, simde__m128i, simde__m512i, 16, i8, i32, int8_t)
SHIM_CONVERT(cvtepu8_epi32, simde__m512i, simde__m128i, 16, i32, u8, int32_t)
SHIM_CONVERT(cvtepu8_epi64, simde__m512i, simde__m128i, 8, i64, u8, int64_t)
SHIM_CONVERT(cvtepu8_epi16, simde__m512i, simde__m256i, 32, u16, u8, uint16_t)
SHIM_CONVERT(cvtepi32_ps, simde__m512, simde__m512i, 16, f32, i32, float)  // C: nearest even
#define _mm512_cvtepu16_epi32 shim_cvtepu16_epi32
#define _mm512_cvtepi32_epi16 shim_cvtepi32_epi16
#define _mm512_cvtepi32_epi8 shim_cvtepi32_epi8
#define _mm512_cvtepu8_epi32 shim_cvtepu8_epi32
#define _mm512_cvtepu8_epi64 shim_cvtepu8_epi64
#define _mm512_cvtepu8_epi16 shim_cvtepu8_epi16
#define _mm512_cvtepi32_ps shim_cvtepi32_ps
static inline simde__m512 shim_cvtph_ps(simde__m256i a) {
  simde__m256i_private x = simde__m256i_to_private(a);
  simde__m512_private r;
  __m128i lo, hi; memcpy(&lo, &x.u16[0], 16); memcpy(&hi, &x.u16[8], 16);
  __m256 a0 = _mm256_cvtph_ps(lo), a1 = _mm256_cvtph_ps(hi);
  memcpy(&r.f32[0], &a0, 32); memcpy(&r.f32[8], &a1, 32);
  return simde__m512_from_private(r);
}
#define _mm512_cvtph_ps shim_cvtph_ps
static inline simde__m512i shim_cvtps_epi32(simde__m512 a) {  // MXCSR's default: nearest even
  simde__m512_private x = simde__m512_to_private(a); simde__m512i_private r;
  for (int k = 0; k < 16; ++k) r.i32[k] = (int32_t)nearbyintf(x.f32[k]);
  return simde__m512i_from_private(r);
}
#define _mm512_cvtps_epi32 shim_cvtps_epi32
static inline simde__m256i shim_cvtps_ph(simde__m512 a, int) {
  simde__m512_private x = simde__m512_to_private(a); simde__m256i_private r;
  __m256 a0, a1; memcpy(&a0, &x.f32[0], 32); memcpy(&a1, &x.f32[8], 32);
  __m128i h0 = _mm256_cvtps_ph(a0, 0), h1 = _mm256_cvtps_ph(a1, 0);  // 0 = round to nearest even
  memcpy(&r.u16[0], &h0, 16); memcpy(&r.u16[8], &h1, 16);
  return simde__m256i_from_private(r);
}
#define _mm512_cvtps_ph shim_cvtps_ph
static inline simde__m512 shim_i32gather_ps(simde__m512i idx, const float* base, int scale) {
  simde__m512i_private i = simde__m512i_to_private(idx); simde__m512_private r;
  for (int k = 0; k < 16; ++k) r.f32[k] = *(const float*)((const char*)base + (int64_t)i.i32[k] * scale);
  return simde__m512_from_private(r);
}
#define _mm512_i32gather_ps shim_i32gather_ps
static inline float shim_reduce_max_ps(simde__m512 a) {
  simde__m512_private x = simde__m512_to_private(a); float m = x.f32[0];
  for (int k = 1; k < 16; ++k) m = x.f32[k] > m ? x.f32[k] : m;
  return m;
}
#define _mm512_reduce_max_ps shim_reduce_max_ps
static inline void shim_stream_si512(simde__m512i* p, simde__m512i v) {
  if ((uintptr_t)p % 64) __builtin_trap();  // the real instruction faults when misaligned
  memcpy(p, &v, 64);
}
#define _mm512_stream_si512 shim_stream_si512

// AVX512-BF16's vcvtneps2bf16: nearest even, NaN quieted (its top 16 bits | 0x40), and
// subnormal inputs read as zero of their sign (the hardware's DAZ; checked on Zen 4)
static inline simde__m256bh shim_cvtneps_pbh(simde__m512 a) {
  simde__m512_private x = simde__m512_to_private(a);
  uint16_t out[16];
  for (int k = 0; k < 16; ++k) {
    uint32_t u;
    memcpy(&u, &x.f32[k], 4);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
    out[k] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40)
                                              : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  }
  simde__m256bh r;
  memcpy(&r, out, 32);
  return r;
}
#define _mm512_cvtneps_pbh shim_cvtneps_pbh

// simde 0.7.4 aliases _mm512_madd_epi16 with the four arguments of its masked form
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
