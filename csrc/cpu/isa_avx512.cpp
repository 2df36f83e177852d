// AVX-512 path (F + BW): isa_avx2.cpp with 16-float vectors and mask registers.
// Same primitives, same order of operations, same tables; only the register width
// and the idioms that AVX-512 makes shorter differ:
//   * compares give __mmask16 and counting is a masked add;
//   * the float 16-entry lookup is one _mm512_permutexvar_ps instead of two permutes
//     and a blend;
//   * narrowing int32 -> int16/int8 is vpmovdw/vpmovdb instead of packus + permutes.
// The 16-bit decode keeps AVX2's byte-plane pshufb lookup (vpshufb is per 128-bit
// lane on both, so the tables are broadcast to every lane in the same way).
//
// Not using AVX512-BF16's vcvtneps2bf16: it flushes subnormals, torch does not.
// This machine class may lack AVX-512; the path is compiled everywhere and picked
// only when __builtin_cpu_supports("avx512f") and ("avx512bw") are both true.
//
// isa_avx512bf16.cpp compiles this file again with NF4LORA_AVX512_BF16=1: the same
// kernels plus AVX512-BF16, in namespace avx512bf16. The only code that differs is the
// fused GEMV for bf16 activations (GemvBf16Decoder, vdpbf16ps); the dispatcher picks
// that build when the CPU also has avx512bf16.
#include <immintrin.h>
#include <string.h>

#include "isa.h"

#ifndef NF4LORA_AVX512_BF16
#define NF4LORA_AVX512_BF16 0
#endif
#if NF4LORA_AVX512_BF16
#define NF4LORA_AVX512_NAMESPACE avx512bf16
#define NF4LORA_AVX512_NAME "avx512bf16"
#else
#define NF4LORA_AVX512_NAMESPACE avx512
#define NF4LORA_AVX512_NAME "avx512"
#endif

#pragma GCC push_options
#if NF4LORA_AVX512_BF16
#pragma GCC target("avx512f,avx512bw,avx2,f16c,avx512bf16")
#else
#pragma GCC target("avx512f,avx512bw,avx2,f16c")
#endif
// gcc 12's avx512fintrin.h builds some results from _mm512_undefined_*() and then
// trips its own -Wmaybe-uninitialized / -Wuninitialized (a known false positive), once
// per intrinsic use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace nf4lora {
namespace cpu {
namespace NF4LORA_AVX512_NAMESPACE {

constexpr int kW = 16;
using F = __m512;
using I = __m512i;

// ---- loads -------------------------------------------------------------------------
inline F load(const float* p) { return _mm512_loadu_ps(p); }
inline F load(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline F load(const fp16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// ---- float32 -> 16-bit, round to nearest even --------------------------------------
template <class Out> __m256i to_u16(F x);
template <>
inline __m256i to_u16<bf16>(F x) {
  const I u = _mm512_castps_si512(x);
  const I lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  I r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const I quiet_nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), quiet_nan);
  return _mm512_cvtepi32_epi16(r);
}
template <>
inline __m256i to_u16<fp16>(F x) {
  return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <class Out>
inline void store_out(Out* o, F x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), to_u16<Out>(x));
}
template <>
inline void store_out<float>(float* o, F x) { _mm512_storeu_ps(o, x); }

// ---- absmax ------------------------------------------------------------------------
struct AbsMax {
  F m;
  __mmask16 nan;
  AbsMax() : m(_mm512_setzero_ps()), nan(0) {}
  void add(F x) {
    nan = (__mmask16)(nan | _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q));
    m = _mm512_max_ps(m, _mm512_abs_ps(x));
  }
  float result() const {
    if (nan) return bits_float(0x7fc00000u);
    return _mm512_reduce_max_ps(m);  // no NaN here, so the order does not matter
  }
};

inline F splat(float x) { return _mm512_set1_ps(x); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(F v) {  // halve to 8 lanes, then as isa_avx2.cpp
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- 4-bit encode: the decision tree of isa_avx2.cpp, with mask registers ---------
inline __mmask16 gt_mask(F x, F t) { return _mm512_cmp_ps_mask(x, t, _CMP_GT_OQ); }
inline I add_if(I index, __mmask16 mask, int amount) {
  return _mm512_mask_add_epi32(index, mask, index, _mm512_set1_epi32(amount));
}

template <int QT> struct Encoder;

template <>
struct Encoder<kNF4> {
  F t7, t3, t11, odd, even;  // odd: t1,t5,t9,t13 by index/4; even: t0,t2,..,t14 by index/2
  Encoder() {
    const float t[15] = {NF4LORA_NF4_THRESHOLDS};
    t7 = _mm512_set1_ps(t[7]);
    t3 = _mm512_set1_ps(t[3]);
    t11 = _mm512_set1_ps(t[11]);
    const float o[16] = {t[1], t[5], t[9], t[13]};
    const float e[16] = {t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]};
    odd = _mm512_loadu_ps(o);
    even = _mm512_loadu_ps(e);
  }
  I operator()(F x) const {
    const __mmask16 m8 = gt_mask(x, t7);
    I code = _mm512_maskz_mov_epi32(m8, _mm512_set1_epi32(8));
    code = add_if(code, gt_mask(x, _mm512_mask_blend_ps(m8, t3, t11)), 4);
    code = add_if(code, gt_mask(x, _mm512_permutexvar_ps(_mm512_srli_epi32(code, 2), odd)), 2);
    code = add_if(code, gt_mask(x, _mm512_permutexvar_ps(_mm512_srli_epi32(code, 1), even)), 1);
    return code;
  }
};

template <>
struct Encoder<kFP4> {
  F t3, t1, t5, even;  // even: t0,t2,t4,t6 by rank/2
  I by_rank;
  Encoder() {
    const float t[7] = {NF4LORA_FP4_ABS_THRESHOLDS};
    t3 = _mm512_set1_ps(t[3]);
    t1 = _mm512_set1_ps(t[1]);
    t5 = _mm512_set1_ps(t[5]);
    const float e[16] = {t[0], t[2], t[4], t[6]};
    even = _mm512_loadu_ps(e);
    const int codes[16] = {NF4LORA_FP4_CODE_BY_RANK};  // rank <= 7: the rest unused
    by_rank = _mm512_loadu_si512(codes);
  }
  I operator()(F x) const {
    const F a = _mm512_abs_ps(x);
    const __mmask16 m4 = gt_mask(a, t3);
    I rank = _mm512_maskz_mov_epi32(m4, _mm512_set1_epi32(4));
    rank = add_if(rank, gt_mask(a, _mm512_mask_blend_ps(m4, t1, t5)), 2);
    rank = add_if(rank, gt_mask(a, _mm512_permutexvar_ps(_mm512_srli_epi32(rank, 1), even)), 1);
    const I code = _mm512_permutexvar_epi32(rank, by_rank);
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_or_epi32(code, negative, code, _mm512_set1_epi32(8));
  }
};

// 32 codes (int32) -> 16 bytes, code 2j in the high nibble of byte j.
inline void store_packed(uint8_t* out, I first, I second) {
  // narrow to 32 codes as u16, in element order
  I w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(first)),
                           _mm512_cvtepi32_epi16(second), 1);
  // each 32-bit lane holds codes 2j (low half) and 2j+1 (high half): make the byte
  w = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0xF)), 4),
                      _mm512_srli_epi32(w, 16));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(w));
}

// ---- 4-bit decode ------------------------------------------------------------------
// float output: 16 codes in 32-bit lanes (one byte per 64-bit lane).
inline I codes32(const uint8_t* p) {
  const I q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm512_or_si512(_mm512_srli_epi64(q, 4),
                         _mm512_slli_epi64(_mm512_and_si512(q, _mm512_set1_epi64(0xF)), 32));
}

// 16-bit outputs: isa_avx2.cpp's byte planes and lookups, four 128-bit lanes wide.
// The 16 table values rounded to 16 bits -> lo / hi: the 16 low / high bytes, in all
// four lanes. `finite`: the scale is finite, so no product is NaN.
template <class Out> void byte_planes(F t, bool finite, I& lo, I& hi);
template <>
inline void byte_planes<bf16>(F t, bool finite, I& lo, I& hi) {
  const I u = _mm512_castps_si512(t);
  const I lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  I r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  if (!finite)  // NaN: truncated and quieted
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q),
                              _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  // lane k holds entries 4k..4k+3: bytes 2 (low) to dword 0, bytes 3 (high) to dword 1
  const I d = _mm512_shuffle_epi8(
      r, _mm512_broadcast_i32x4(_mm_setr_epi8(2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1,
                                              -1, -1, -1)));
  lo = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12), d);
  hi = _mm512_permutexvar_epi32(_mm512_setr_epi32(1, 5, 9, 13, 1, 5, 9, 13, 1, 5, 9, 13, 1, 5, 9, 13), d);
}
template <>
inline void byte_planes<fp16>(F t, bool, I& lo, I& hi) {
  // entries 0-7 | 8-15; per 128-bit lane, dwords: low bytes of 4 entries, of the next
  // 4, then their high bytes
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const I d = _mm512_castsi256_si512(_mm256_shuffle_epi8(to_u16<fp16>(t), split));
  lo = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5, 0, 1, 4, 5, 0, 1, 4, 5), d);
  hi = _mm512_permutexvar_epi32(_mm512_setr_epi32(2, 3, 6, 7, 2, 3, 6, 7, 2, 3, 6, 7, 2, 3, 6, 7), d);
}

// Output stores of the 4-bit decoders: plain, or non-temporal (kStream, 64-byte
// aligned); see isa_avx2.cpp.
template <bool kStream>
inline void store_512(void* o, I v) {
  if (kStream) _mm512_stream_si512(reinterpret_cast<I*>(o), v);
  else _mm512_storeu_si512(o, v);
}
inline void store_fence() { _mm_sfence(); }

template <class Out, bool kStream>
struct Decoder {
  // 32 per step, not 64 (two stores, as isa_avx2.cpp does with two lanes): blocksize 32
  // would otherwise fall through to the scalar tail.
  static constexpr int kStep = 32;  // 16 packed bytes -> 32 outputs (64 bytes)
  I lo, hi;                         // byte planes, the same 16 bytes in all four lanes
  Decoder(int qt, float scale) {
    byte_planes<Out>(_mm512_mul_ps(_mm512_loadu_ps(codebook_4bit(qt)), _mm512_set1_ps(scale)),
                     is_finite(scale), lo, hi);
  }
  void operator()(const uint8_t* p, Out* o) const {
    // Every lane gets the 16 packed bytes; lane k keeps bytes 4k..4k+3, whose nibbles are
    // the codes of elements 8k..8k+7, so one byte interleave emits elements 0-31 in order.
    const I arrange = _mm512_setr_epi32(0x03020100, -1, -1, -1, 0x07060504, -1, -1, -1,
                                        0x0B0A0908, -1, -1, -1, 0x0F0E0D0C, -1, -1, -1);
    const I x = _mm512_shuffle_epi8(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), arrange);
    const I nibble = _mm512_set1_epi8(0x0F);
    // element 2j is the high nibble of byte j, element 2j+1 the low one
    const I c = _mm512_unpacklo_epi8(_mm512_and_si512(_mm512_srli_epi16(x, 4), nibble),
                                     _mm512_and_si512(x, nibble));
    store_512<kStream>(o, _mm512_unpacklo_epi8(_mm512_shuffle_epi8(lo, c), _mm512_shuffle_epi8(hi, c)));
  }
};

template <bool kStream>
struct Decoder<float, kStream> {
  static constexpr int kStep = 16;  // 8 packed bytes -> 16 floats
  F t;
  Decoder(int qt, float scale) {
    t = _mm512_mul_ps(_mm512_loadu_ps(codebook_4bit(qt)), _mm512_set1_ps(scale));
  }
  void operator()(const uint8_t* p, float* o) const {
    store_512<kStream>(o, _mm512_castps_si512(_mm512_permutexvar_ps(codes32(p), t)));
  }
};

// ---- dynamic 8-bit (double quantization) -------------------------------------------
inline F gather(const float* code, I index) { return _mm512_i32gather_ps(index, code, 4); }

// isa_avx2.cpp's DynEncoder: the first five steps from registers (the 16 pivots of
// step 4 fit one register here), the last two and the final value gathered.
struct DynEncoder {
  const float* code;
  F c127, c63, c191, by64, by32, by16, first, last;
  explicit DynEncoder(const float* c) : code(c) {
    c127 = _mm512_set1_ps(c[127]);
    c63 = _mm512_set1_ps(c[63]);
    c191 = _mm512_set1_ps(c[191]);
    float t64[16] = {c[31], c[95], c[159], c[223]}, t32[16] = {}, t16[16];
    for (int k = 0; k < 8; ++k) t32[k] = c[32 * k + 15];
    for (int k = 0; k < 16; ++k) t16[k] = c[16 * k + 7];
    by64 = _mm512_loadu_ps(t64);
    by32 = _mm512_loadu_ps(t32);
    by16 = _mm512_loadu_ps(t16);
    first = _mm512_set1_ps(c[0]);
    last = _mm512_set1_ps(c[255]);
  }
  I operator()(F x) const {
    I pivot = _mm512_set1_epi32(127), lower = _mm512_setzero_si512(),
      upper = _mm512_set1_epi32(255);
    F lower_value = first, upper_value = last;
    auto step = [&](F v, int s) {
      const __mmask16 up = _mm512_cmp_ps_mask(x, v, _CMP_GT_OQ);
      lower = _mm512_mask_mov_epi32(lower, up, pivot);
      lower_value = _mm512_mask_mov_ps(lower_value, up, v);
      upper = _mm512_mask_mov_epi32(pivot, up, upper);
      upper_value = _mm512_mask_mov_ps(v, up, upper_value);
      const I down = _mm512_sub_epi32(pivot, _mm512_set1_epi32(s));
      pivot = _mm512_mask_add_epi32(down, up, down, _mm512_set1_epi32(2 * s));
    };
    step(c127, 64);
    step(_mm512_mask_blend_ps(_mm512_test_epi32_mask(pivot, _mm512_set1_epi32(128)), c63, c191), 32);
    step(_mm512_permutexvar_ps(_mm512_srli_epi32(pivot, 6), by64), 16);
    step(_mm512_permutexvar_ps(_mm512_srli_epi32(pivot, 5), by32), 8);
    step(_mm512_permutexvar_ps(_mm512_srli_epi32(pivot, 4), by16), 4);
    step(gather(code, pivot), 2);
    step(gather(code, pivot), 1);
    const F value = gather(code, pivot);
    const F half = _mm512_set1_ps(0.5f);
    const F mid_up = _mm512_mul_ps(_mm512_add_ps(upper_value, value), half);
    const F mid_lo = _mm512_mul_ps(_mm512_add_ps(lower_value, value), half);
    const __mmask16 above = _mm512_cmp_ps_mask(x, value, _CMP_GT_OQ);
    const __mmask16 to_upper = _mm512_cmp_ps_mask(x, mid_up, _CMP_GT_OQ);
    const __mmask16 to_lower = _mm512_cmp_ps_mask(x, mid_lo, _CMP_LT_OQ);
    return _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(pivot, to_lower, lower), above,
                                 _mm512_mask_mov_epi32(pivot, to_upper, upper));
  }
};

inline void store_bytes(uint8_t* q, I v) {  // 16 codes 0..255 -> 16 bytes
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(v));
}

template <class Out>
struct Decoder8 {
  static constexpr int kStep = kW;
  const float* code;
  F scale;
  Decoder8(const float* c, float s) : code(c), scale(_mm512_set1_ps(s)) {}
  void operator()(const uint8_t* q, Out* o) const {
    const I index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    store_out(o, _mm512_mul_ps(gather(code, index), scale));
  }
};

// gemv_body.h: 16 packed bytes -> the 16 high-nibble weights (even elements), then the
// 16 low-nibble ones (odd). permutexvar reads the low 4 bits of each lane, so the low
// nibble needs no mask; it is one cheap instruction on AVX-512 cores (unlike AVX2's
// two-table vpermps + blend, see isa_avx2.cpp).
constexpr int kGemvAccumulators = 8;
struct GemvDecoder {
  static constexpr int kGroup = 32, kVectors = 2;
  using X = float;
  using Weights = F;
  using Table = F;  // the block constant in every lane
  template <class In> static X to_x(In v) { return to_float(v); }
  static int source(int j) { return j < 16 ? 2 * j : 2 * (j - 16) + 1; }
  F values;
  explicit GemvDecoder(int qt) : values(_mm512_loadu_ps(codebook_4bit(qt))) {}
  Table table(float scale) const { return splat(scale); }
  void operator()(const Table& scale, const uint8_t* p, F* w) const {
    const I v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w[0] = mul(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), values), scale);
    w[1] = mul(_mm512_permutexvar_ps(v, values), scale);
  }
  static F madd(F w, const X* x, F acc) { return fmadd(w, load(x), acc); }
};

#if NF4LORA_AVX512_BF16
// bf16 activations on CPUs with AVX512-BF16: 64 weights from 32 bytes, as bf16, and
// vdpbf16ps (16 float32 lanes += the products of 16 pairs of bf16; the products are
// exact). Each weight is bf16(table[code] * absmax), what dequantize_4bit to bfloat16
// gives, so this computes x @ dequantize_4bit(W, bf16)^T with float32 sums.
// vdpbf16ps treats subnormal inputs as zero (|value| < 1.2e-38) and flushes subnormal
// sums; the lanes add each pair in an order of the hardware's choosing.
// Decoding costs ~6 instructions per 64 weights plus ~4 per block for its table, against
// ~14 for the float32 path: at M = 1 the step is bound by memory, not decoding.
struct GemvBf16Decoder {
  static constexpr int kGroup = 64, kVectors = 2;
  using X = bf16;
  using Weights = I;
  using Table = I;  // lanes 0-15: the block's 16 weights as bf16
  static X to_x(bf16 v) { return v; }
  static int source(int j) { return j < 32 ? 2 * j : 2 * (j - 32) + 1; }
  F values;
  explicit GemvBf16Decoder(int qt) : values(_mm512_loadu_ps(codebook_4bit(qt))) {}
  Table table(float scale) const {
    return _mm512_castsi256_si512(to_u16<bf16>(mul(values, splat(scale))));
  }
  void operator()(const Table& table, const uint8_t* p, I* w) const {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i first = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);  // elements 2i
    w[0] = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(first), table);
    w[1] = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm256_and_si256(q, low)), table);
  }
  static F madd(I w, const X* x, F acc) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_loadu_si512(x));
  }
};
template <class T> struct GemvDecoderFor { using type = GemvDecoder; };
template <> struct GemvDecoderFor<bf16> { using type = GemvBf16Decoder; };
#else
template <class T> struct GemvDecoderFor { using type = GemvDecoder; };
#endif

#include "kernel_body.h"
#include "gemv_body.h"

}  // namespace NF4LORA_AVX512_NAMESPACE
}  // namespace cpu
}  // namespace nf4lora

#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace nf4lora {
namespace cpu {
namespace NF4LORA_AVX512_NAMESPACE {
// Outside the target region: the dispatcher calls this before checking the CPU.
const IsaKernels& kernels() {
  static const IsaKernels k{NF4LORA_AVX512_NAME, &quantize_4bit_entry, &dequantize_4bit_entry,
                            &quantize_blockwise_entry, &dequantize_blockwise_entry,
                            &gemv_prepare_entry,      &gemv_lora_h_entry,
                            &gemv_rows_entry};
  return k;
}
}  // namespace NF4LORA_AVX512_NAMESPACE
}  // namespace cpu
}  // namespace nf4lora
