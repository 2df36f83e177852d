// AVX2 path (+F16C): the kernel templates over 8-float vectors.
//
// Compiled for AVX2 with `#pragma GCC target` (the same as putting
// __attribute__((target("avx2,f16c"))) on every function below), so the .so is still
// built for baseline x86-64 and the dispatcher picks this path only after
// __builtin_cpu_supports says so. Nothing from a std:: template is instantiated in
// the target region: a COMDAT copy compiled for AVX2 could be picked by the linker
// for the baseline callers too.
//
// isa_avx512.cpp is the same file with 16-float vectors; keep the two in step.
#include <immintrin.h>
#include <string.h>

#include "isa.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")

namespace nf4lora {
namespace cpu {
namespace avx2 {

constexpr int kW = 8;
using F = __m256;
using I = __m256i;

// ---- loads: kW elements -> float32, exact ------------------------------------------
inline F load(const float* p) { return _mm256_loadu_ps(p); }
inline F load(const bf16* p) {  // bf16 is the top half of a float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline F load(const fp16* p) {  // F16C converts subnormals exactly
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// ---- float32 -> 16-bit, round to nearest even (nf4_codec.h float_to_*_bits) -------
template <class Out> __m128i to_u16(F x);
template <>
inline __m128i to_u16<bf16>(F x) {
  const I u = _mm256_castps_si256(x);
  const I lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  I r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const I quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, quiet_nan, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
template <>
inline __m128i to_u16<fp16>(F x) {
  return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <class Out>
inline void store_out(Out* o, F x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o), to_u16<Out>(x));
}
template <>
inline void store_out<float>(float* o, F x) { _mm256_storeu_ps(o, x); }

// ---- absmax ------------------------------------------------------------------------
struct AbsMax {
  F m, nan;  // running max of |x|; lanes that ever saw a NaN (max_ps would drop it)
  // (explicit constructor: gcc does not give implicit ones the target attribute)
  AbsMax() : m(_mm256_setzero_ps()), nan(_mm256_setzero_ps()) {}
  void add(F x) {
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x));
  }
  float result() const {
    if (_mm256_movemask_ps(nan)) return bits_float(0x7fc00000u);
    __m128 v = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    v = _mm_max_ps(v, _mm_movehl_ps(v, v));
    v = _mm_max_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
  }
};

inline F splat(float x) { return _mm256_set1_ps(x); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(F v) {  // (0+4, 1+5, 2+6, 3+7), then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- 4-bit encode -----------------------------------------------------------------
// The code is the number of thresholds strictly below x (nf4_codec.h encode_nf4); with
// sorted thresholds that is a binary search, here a branch-free decision tree whose
// level k compares against one threshold picked per lane (bitsandbytes' dQuantizeNF4
// is the same tree). Compares are ordered (_CMP_GT_OQ): NaN goes left every time and
// gets code 0; a tie is not "greater", so it keeps the lower code.
// 15 NF4 thresholds t0..t14: t7, then t3|t11, then t1|t5|t9|t13, then t0|t2|..|t14.
// 7 FP4 |x| thresholds: t3, then t1|t5, then t0|t2|t4|t6.
inline I gt_mask(F x, F t) { return _mm256_castps_si256(_mm256_cmp_ps(x, t, _CMP_GT_OQ)); }
inline I add_if(I index, I mask, int amount) {
  return _mm256_add_epi32(index, _mm256_and_si256(mask, _mm256_set1_epi32(amount)));
}

template <int QT> struct Encoder;

template <>
struct Encoder<kNF4> {
  F t7, t3, t11, odd, even;  // odd: t1,t5,t9,t13 by index/4; even: t0,t2,..,t14 by index/2
  Encoder() {
    const float t[15] = {NF4LORA_NF4_THRESHOLDS};
    t7 = _mm256_set1_ps(t[7]);
    t3 = _mm256_set1_ps(t[3]);
    t11 = _mm256_set1_ps(t[11]);
    odd = _mm256_setr_ps(t[1], t[5], t[9], t[13], 0.0f, 0.0f, 0.0f, 0.0f);
    even = _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]);
  }
  I operator()(F x) const {
    const I m8 = gt_mask(x, t7);
    I code = _mm256_and_si256(m8, _mm256_set1_epi32(8));
    code = add_if(code, gt_mask(x, _mm256_blendv_ps(t3, t11, _mm256_castsi256_ps(m8))), 4);
    code = add_if(code, gt_mask(x, _mm256_permutevar8x32_ps(odd, _mm256_srli_epi32(code, 2))), 2);
    code = add_if(code, gt_mask(x, _mm256_permutevar8x32_ps(even, _mm256_srli_epi32(code, 1))), 1);
    return code;
  }
};

template <>
struct Encoder<kFP4> {
  F t3, t1, t5, even;  // even: t0,t2,t4,t6 by rank/2
  I by_rank;
  Encoder() {
    const float t[7] = {NF4LORA_FP4_ABS_THRESHOLDS};
    t3 = _mm256_set1_ps(t[3]);
    t1 = _mm256_set1_ps(t[1]);
    t5 = _mm256_set1_ps(t[5]);
    even = _mm256_setr_ps(t[0], t[2], t[4], t[6], 0.0f, 0.0f, 0.0f, 0.0f);
    const int codes[8] = {NF4LORA_FP4_CODE_BY_RANK};
    by_rank = _mm256_loadu_si256(reinterpret_cast<const I*>(codes));
  }
  I operator()(F x) const {
    const F a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const I m4 = gt_mask(a, t3);
    I rank = _mm256_and_si256(m4, _mm256_set1_epi32(4));
    rank = add_if(rank, gt_mask(a, _mm256_blendv_ps(t1, t5, _mm256_castsi256_ps(m4))), 2);
    rank = add_if(rank, gt_mask(a, _mm256_permutevar8x32_ps(even, _mm256_srli_epi32(rank, 1))), 1);
    const I code = _mm256_permutevar8x32_epi32(by_rank, rank);
    const I negative = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_or_si256(code, _mm256_and_si256(negative, _mm256_set1_epi32(8)));
  }
};

// 16 codes (int32) -> 8 bytes, code 2j in the high nibble of byte j.
inline void store_packed(uint8_t* out, I first, I second) {
  // narrow to 16 codes as u16, in element order (packus interleaves the 128-bit lanes)
  I w = _mm256_permute4x64_epi64(_mm256_packus_epi32(first, second), 0xD8);
  // each 32-bit lane holds codes 2j (low half) and 2j+1 (high half): make the byte
  w = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0xF)), 4),
                      _mm256_srli_epi32(w, 16));
  const __m128i b16 = _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(b16, b16));
}

// ---- 4-bit decode ------------------------------------------------------------------
// Codes of 2 * kBytes elements from kBytes packed bytes: widen each byte to a pair of
// lanes, high nibble in the first (element 2j), low nibble in the second.
// float output: 8 codes in 32-bit lanes (one byte per 64-bit lane).
inline I codes32(const uint8_t* p) {
  uint32_t four;
  memcpy(&four, p, 4);
  const I q = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128((int)four));
  return _mm256_or_si256(_mm256_srli_epi64(q, 4),
                         _mm256_slli_epi64(_mm256_and_si256(q, _mm256_set1_epi64x(0xF)), 32));
}

// 16-bit outputs: per block, the 16 possible outputs table[c] * absmax rounded to Out
// (exactly what each element would compute) are split into a low-byte and a
// high-byte plane; a decode step is then byte shuffles (pshufb: 16-entry lookups).
//
// Speed, bf16 with nested absmax, L2-resident, one Zen 3 core: 6.2 G elements/s with 16
// outputs per 12-instruction step (from zero-extended codes), a 28-instruction table
// build and a 64-bit division (nested index) per block; 11.4 G elements/s with 32
// outputs per 12-instruction step, a 16-instruction table build and no division. At
// the old speed two cores barely kept up with memory; now they take half its time.

// The 16 table values t0 = entries 0..7, t1 = 8..15 rounded to 16 bits -> lo / hi: the
// 16 low / high bytes, in both 128-bit lanes. `finite`: the scale is finite, so no
// product is NaN.
template <class Out> void byte_planes(F t0, F t1, bool finite, I& lo, I& hi);

// to_u16<bf16> without the packing: bf16 is the top half of u + 0x7fff + lsb ...
inline I bf16_rne(F x) {
  const I u = _mm256_castps_si256(x);
  const I lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
}
// ... except for NaN, truncated and quieted instead.
inline I bf16_nan(I r, F x) {
  const I quiet = _mm256_or_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x400000));
  return _mm256_blendv_epi8(r, quiet, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

template <>
inline void byte_planes<bf16>(F t0, F t1, bool finite, I& lo, I& hi) {
  I r0 = bf16_rne(t0), r1 = bf16_rne(t1);
  // t * absmax is NaN only for a non-finite absmax; the NaN blends would be 6 of the
  // table build's ~16 instructions
  if (!finite) {
    r0 = bf16_nan(r0, t0);
    r1 = bf16_nan(r1, t1);
  }
  // bytes 2 and 3 of each lane. r0's 128-bit lanes hold entries 0-3 | 4-7, r1's 8-11 |
  // 12-15; move low bytes to dword 0 (r0) / 2 (r1), high bytes to dword 1 / 3 ...
  const I from_r0 = _mm256_setr_epi8(2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                     2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  const I from_r1 = _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 2, 6, 10, 14, 3, 7, 11, 15,
                                     -1, -1, -1, -1, -1, -1, -1, -1, 2, 6, 10, 14, 3, 7, 11, 15);
  const I d = _mm256_or_si256(_mm256_shuffle_epi8(r0, from_r0), _mm256_shuffle_epi8(r1, from_r1));
  // ... so dwords 0..7 are lo 0-3, hi 0-3, lo 8-11, hi 8-11, lo 4-7, hi 4-7, lo 12-15,
  // hi 12-15: one dword permute per plane puts it in order in both lanes.
  lo = _mm256_permutevar8x32_epi32(d, _mm256_setr_epi32(0, 4, 2, 6, 0, 4, 2, 6));
  hi = _mm256_permutevar8x32_epi32(d, _mm256_setr_epi32(1, 5, 3, 7, 1, 5, 3, 7));
}
template <>
inline void byte_planes<fp16>(F t0, F t1, bool, I& lo, I& hi) {
  const I v = _mm256_set_m128i(to_u16<fp16>(t1), to_u16<fp16>(t0));  // entries 0-7 | 8-15
  // per lane: 4 dwords = low bytes of its first 4 entries, of its last 4, high bytes ditto
  const I split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                   0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const I d = _mm256_shuffle_epi8(v, split);
  lo = _mm256_permutevar8x32_epi32(d, _mm256_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5));
  hi = _mm256_permutevar8x32_epi32(d, _mm256_setr_epi32(2, 3, 6, 7, 2, 3, 6, 7));
}

// Output stores of the 4-bit decoders: plain, or non-temporal (kStream, 32-byte
// aligned): a streaming store skips the read-for-ownership of the line, so writing an
// output far beyond the L3 moves 2 bytes per bf16 element instead of 4.
template <bool kStream>
inline void store_256(void* o, I v) {
  if (kStream) _mm256_stream_si256(reinterpret_cast<I*>(o), v);
  else _mm256_storeu_si256(reinterpret_cast<I*>(o), v);
}
inline void store_fence() { _mm_sfence(); }

template <class Out, bool kStream>
struct Decoder {
  static constexpr int kStep = 32;  // 16 packed bytes -> 32 outputs (64 bytes)
  I lo, hi;                         // byte planes, the same 16 bytes in both 128-bit lanes
  Decoder(int qt, float scale) {
    const float* table = codebook_4bit(qt);
    const F s = _mm256_set1_ps(scale);
    byte_planes<Out>(_mm256_mul_ps(_mm256_loadu_ps(table), s),
                     _mm256_mul_ps(_mm256_loadu_ps(table + 8), s), is_finite(scale), lo, hi);
  }
  void operator()(const uint8_t* p, Out* o) const {
    // Lane 0 takes packed bytes 0-3 and 8-11, lane 1 bytes 4-7 and 12-15: after the
    // nibble interleave lane 0 holds the codes of elements 0-7 and 16-23, lane 1 of
    // 8-15 and 24-31, which is what the final byte interleaves need to emit elements
    // 0-15 and 16-31 without a lane-crossing shuffle.
    const I arrange = _mm256_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, -1, -1, -1, -1, -1, -1, -1, -1,
                                       4, 5, 6, 7, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    const I x = _mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), arrange);
    const I nibble = _mm256_set1_epi8(0x0F);
    // element 2j is the high nibble of byte j, element 2j+1 the low one
    const I c = _mm256_unpacklo_epi8(_mm256_and_si256(_mm256_srli_epi16(x, 4), nibble),
                                     _mm256_and_si256(x, nibble));
    const I l = _mm256_shuffle_epi8(lo, c), h = _mm256_shuffle_epi8(hi, c);
    store_256<kStream>(o, _mm256_unpacklo_epi8(l, h));
    store_256<kStream>(o + 16, _mm256_unpackhi_epi8(l, h));
  }
};

// float output: the 16 products table[c] * absmax in two registers; a 16-entry lookup
// is two 8-entry permutes (low 3 bits of the code) blended on bit 3.
template <bool kStream>
struct Decoder<float, kStream> {
  static constexpr int kStep = 8;  // 4 packed bytes -> 8 floats
  F t0, t1;
  Decoder(int qt, float scale) {
    const float* table = codebook_4bit(qt);
    t0 = _mm256_mul_ps(_mm256_loadu_ps(table), _mm256_set1_ps(scale));
    t1 = _mm256_mul_ps(_mm256_loadu_ps(table + 8), _mm256_set1_ps(scale));
  }
  void operator()(const uint8_t* p, float* o) const {
    const I c = codes32(p);
    const F bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(c, 28));  // bit 3 -> sign bit
    store_256<kStream>(o, _mm256_castps_si256(_mm256_blendv_ps(
                              _mm256_permutevar8x32_ps(t0, c), _mm256_permutevar8x32_ps(t1, c), bit3)));
  }
};

// ---- dynamic 8-bit (double quantization) -------------------------------------------
inline F gather(const float* code, I index) { return _mm256_i32gather_ps(code, index, 4); }

// nf4_codec.h encode_dynamic, lane by lane. The 7-step search visits, at step s, one
// of 128/s pivots (127; 63|191; 64k+31; 32k+15; 16k+7; 8k+3; 4k+1) and ends on an even
// index. The first five steps read their code[pivot] from registers (broadcast, blend,
// permutes); only the last two steps and the final value need gathers (slow on
// AVX2 machines: ~25 cycles of latency each). code[lower] and code[upper] are
// carried along instead of gathered again.
struct DynEncoder {
  const float* code;
  F c127, c63, c191, by64, by32, by16lo, by16hi, first, last;
  explicit DynEncoder(const float* c) : code(c) {
    c127 = _mm256_set1_ps(c[127]);
    c63 = _mm256_set1_ps(c[63]);
    c191 = _mm256_set1_ps(c[191]);
    by64 = _mm256_setr_ps(c[31], c[95], c[159], c[223], 0.0f, 0.0f, 0.0f, 0.0f);
    by32 = _mm256_setr_ps(c[15], c[47], c[79], c[111], c[143], c[175], c[207], c[239]);
    by16lo = _mm256_setr_ps(c[7], c[23], c[39], c[55], c[71], c[87], c[103], c[119]);
    by16hi = _mm256_setr_ps(c[135], c[151], c[167], c[183], c[199], c[215], c[231], c[247]);
    first = _mm256_set1_ps(c[0]);
    last = _mm256_set1_ps(c[255]);
  }
  I operator()(F x) const {
    I pivot = _mm256_set1_epi32(127), lower = _mm256_setzero_si256(),
      upper = _mm256_set1_epi32(255);
    F lower_value = first, upper_value = last;
    // one search step: compare with v = code[pivot], move the bracket, move the pivot
    auto step = [&](F v, int s) {
      const I up = _mm256_castps_si256(_mm256_cmp_ps(x, v, _CMP_GT_OQ));
      const F upf = _mm256_castsi256_ps(up);
      lower = _mm256_blendv_epi8(lower, pivot, up);
      lower_value = _mm256_blendv_ps(lower_value, v, upf);
      upper = _mm256_blendv_epi8(pivot, upper, up);
      upper_value = _mm256_blendv_ps(v, upper_value, upf);
      pivot = _mm256_add_epi32(_mm256_sub_epi32(pivot, _mm256_set1_epi32(s)),
                               _mm256_and_si256(up, _mm256_set1_epi32(2 * s)));
    };
    step(c127, 64);
    step(_mm256_blendv_ps(c63, c191, _mm256_castsi256_ps(_mm256_slli_epi32(pivot, 24))), 32);
    step(_mm256_permutevar8x32_ps(by64, _mm256_srli_epi32(pivot, 6)), 16);
    step(_mm256_permutevar8x32_ps(by32, _mm256_srli_epi32(pivot, 5)), 8);
    const I k16 = _mm256_srli_epi32(pivot, 4);  // 0..15: low 3 bits permute, bit 3 blends
    step(_mm256_blendv_ps(_mm256_permutevar8x32_ps(by16lo, k16), _mm256_permutevar8x32_ps(by16hi, k16),
                          _mm256_castsi256_ps(_mm256_slli_epi32(k16, 28))), 4);
    step(gather(code, pivot), 2);
    step(gather(code, pivot), 1);
    // nearest of lower / pivot / upper by float32 midpoints; ties stay on the pivot
    const F value = gather(code, pivot);
    const F half = _mm256_set1_ps(0.5f);
    const F mid_up = _mm256_mul_ps(_mm256_add_ps(upper_value, value), half);
    const F mid_lo = _mm256_mul_ps(_mm256_add_ps(lower_value, value), half);
    const I above = _mm256_castps_si256(_mm256_cmp_ps(x, value, _CMP_GT_OQ));
    const I to_upper = _mm256_castps_si256(_mm256_cmp_ps(x, mid_up, _CMP_GT_OQ));
    const I to_lower = _mm256_castps_si256(_mm256_cmp_ps(x, mid_lo, _CMP_LT_OQ));
    return _mm256_blendv_epi8(_mm256_blendv_epi8(pivot, lower, to_lower),
                              _mm256_blendv_epi8(pivot, upper, to_upper), above);
  }
};

inline void store_bytes(uint8_t* q, I v) {  // 8 codes 0..255 -> 8 bytes
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packus_epi16(w, w));
}

template <class Out>
struct Decoder8 {
  static constexpr int kStep = kW;
  const float* code;
  F scale;
  Decoder8(const float* c, float s) : code(c), scale(_mm256_set1_ps(s)) {}
  void operator()(const uint8_t* q, Out* o) const {
    const I index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    store_out(o, _mm256_mul_ps(gather(code, index), scale));
  }
};

// ---- gemv_body.h: 32 weights per step, all lookups in-lane ---------------------------
// The float Decoder above needs 4 vpermps + 2 blends per 16 weights; vpermps crosses
// 128-bit lanes and is the bottleneck on Zen 3 (measured: ~9 cycles per 16 weights, so
// M = 1 ran at 1/4 of memory bandwidth). Here a 16-entry float lookup is 4 pshufb, one
// per byte of the float32 table entries (byte planes, the same 16 bytes in both lanes),
// followed by byte and word interleaves that rebuild the floats.
// 16 packed bytes go to both lanes; lane 0 keeps the high nibbles (elements 0, 2, ..,
// 30), lane 1 the low ones (1, 3, .., 31). The interleaves (in-lane) then put elements
// 8i + {0, 2, 4, 6} in lane 0 and 8i + {1, 3, 5, 7} in lane 1 of w[i]: source() is that
// order, which gemv_body.h applies to x once.
constexpr int kGemvAccumulators = 8;  // of 16 registers: the rest decode
struct GemvDecoder {
  static constexpr int kGroup = 32, kVectors = 4;  // 16 packed bytes -> 4 vectors
  using X = float;
  using Weights = F;
  using Table = F;  // the block constant in every lane
  template <class In> static X to_x(In v) { return to_float(v); }
  static int source(int j) { return (j & ~7) + ((j & 3) << 1) + ((j >> 2) & 1); }
  I plane[4];  // plane[k]: byte k of the 16 float32 table entries
  explicit GemvDecoder(int qt) {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(codebook_4bit(qt));
    for (int k = 0; k < 4; ++k) {
      alignas(16) uint8_t column[16];
      for (int c = 0; c < 16; ++c) column[c] = bytes[4 * c + k];
      plane[k] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(column)));
    }
  }
  Table table(float scale) const { return splat(scale); }
  void operator()(const Table& scale, const uint8_t* p, F* w) const {
    const I q = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const I codes = _mm256_and_si256(_mm256_srlv_epi32(q, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
                                     _mm256_set1_epi8(0x0F));
    const I b0 = _mm256_shuffle_epi8(plane[0], codes), b1 = _mm256_shuffle_epi8(plane[1], codes);
    const I b2 = _mm256_shuffle_epi8(plane[2], codes), b3 = _mm256_shuffle_epi8(plane[3], codes);
    const I low01 = _mm256_unpacklo_epi8(b0, b1), high01 = _mm256_unpackhi_epi8(b0, b1);
    const I low23 = _mm256_unpacklo_epi8(b2, b3), high23 = _mm256_unpackhi_epi8(b2, b3);
    w[0] = mul(_mm256_castsi256_ps(_mm256_unpacklo_epi16(low01, low23)), scale);
    w[1] = mul(_mm256_castsi256_ps(_mm256_unpackhi_epi16(low01, low23)), scale);
    w[2] = mul(_mm256_castsi256_ps(_mm256_unpacklo_epi16(high01, high23)), scale);
    w[3] = mul(_mm256_castsi256_ps(_mm256_unpackhi_epi16(high01, high23)), scale);
  }
  static F madd(F w, const X* x, F acc) { return fmadd(w, load(x), acc); }
};
template <class T> struct GemvDecoderFor { using type = GemvDecoder; };

#include "kernel_body.h"
#include "gemv_body.h"

}  // namespace avx2
}  // namespace cpu
}  // namespace nf4lora

#pragma GCC pop_options

namespace nf4lora {
namespace cpu {
namespace avx2 {
// Outside the target region: the dispatcher calls this before knowing the CPU has AVX2.
const IsaKernels& kernels() {
  static const IsaKernels k{"avx2", &quantize_4bit_entry, &dequantize_4bit_entry,
                            &quantize_blockwise_entry, &dequantize_blockwise_entry,
                            &gemv_prepare_entry,      &gemv_lora_h_entry,
                            &gemv_rows_entry};
  return k;
}
}  // namespace avx2
}  // namespace cpu
}  // namespace nf4lora
