// AVX2 path (+F16C, FMA): the kernel templates over 8-float vectors.
//
// Compiled for AVX2 with `#pragma GCC target` (the same as putting
// __attribute__((target("avx2,f16c,fma"))) on every function below), so the .so is still
// built for baseline x86-64 and the dispatcher picks this path only after
// __builtin_cpu_supports says so. Nothing from a std:: template is instantiated in
// the target region: a COMDAT copy compiled for AVX2 could be picked by the linker
// for the baseline callers too.
//
// What AVX2 and AVX-512 share is simd_body.h, over the vocabulary defined here; this
// file keeps what is AVX2's own: masks as all-ones lanes, 16-entry lookups as two
// 8-entry permutes, narrowing with packus, and in-lane byte-plane decoders.
#include <immintrin.h>
#include <string.h>

#include "isa.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")

namespace nf4lora::cpu::avx2 {

constexpr int kW = 8;
using F = __m256;
using I = __m256i;
using Mask = __m256i;  // all-ones lanes where true
using Half = __m128i;
#define NF4LORA_MM(op) _mm256_##op

// ---- simd_body.h's vocabulary --------------------------------------------------------
inline F load(const bf16* p) {  // bf16 is the top half of a float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline F load(const fp16* p) {  // F16C converts subnormals exactly
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline I as_int(F x) { return _mm256_castps_si256(x); }
inline I and_i(I a, I b) { return _mm256_and_si256(a, b); }
inline I or_i(I a, I b) { return _mm256_or_si256(a, b); }
inline F abs(F x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

inline Mask greater(F a, F b) { return as_int(_mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
inline Mask less(F a, F b) { return as_int(_mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
inline Mask unordered(F x) { return as_int(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
inline Mask either(Mask a, Mask b) { return or_i(a, b); }
inline bool any(Mask m) { return !_mm256_testz_si256(m, m); }
inline Mask has_bit(I v, int bit) {
  const I b = _mm256_set1_epi32(bit);
  return _mm256_cmpeq_epi32(and_i(v, b), b);
}
inline F select(Mask m, F if_false, F if_true) {
  return _mm256_blendv_ps(if_false, if_true, _mm256_castsi256_ps(m));
}
inline I select(Mask m, I if_false, I if_true) { return _mm256_blendv_epi8(if_false, if_true, m); }
inline I add_if(I v, Mask m, int amount) {
  return _mm256_add_epi32(v, and_i(m, _mm256_set1_epi32(amount)));
}

inline F lookup8(F table, I index) { return _mm256_permutevar8x32_ps(table, index); }
// 16 floats in two registers: two 8-entry permutes (low 3 bits of the index), blended on
// bit 3.
struct Table16 {
  F lo, hi;
};
inline Table16 load_table16(const float* t) { return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; }
inline Table16 mul(const Table16& t, F s) {
  return {_mm256_mul_ps(t.lo, s), _mm256_mul_ps(t.hi, s)};
}
inline F lookup16(const Table16& t, I index) {
  const F bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(lookup8(t.lo, index), lookup8(t.hi, index), bit3);
}
inline F gather(const float* base, I index) { return _mm256_i32gather_ps(base, index, 4); }
// A 256-entry float table looked up per lane (AVX-512 keeps it in registers; AVX2 has too
// few of them and no two-table permute, so it gathers).
struct Table256 {
  const float* table;
  explicit Table256(const float* t) : table(t) {}
  F operator()(I index) const { return gather(table, index); }
};

inline float reduce_max(F m) {
  __m128 v = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  v = _mm_max_ps(v, _mm_movehl_ps(v, v));
  v = _mm_max_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}
inline __m256 lanes8(F v) { return v; }

inline Half narrow_u16(I r) {
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void store_half(void* o, Half h) { _mm_storeu_si128(reinterpret_cast<__m128i*>(o), h); }
inline I load_bytes(const uint8_t* q) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
}

// The codes of 2 * 4 elements from 4 packed bytes, in 32-bit lanes: each byte widened to a
// 64-bit lane, its high nibble (element 2j) in the low half, its low nibble in the high.
inline I codes32(const uint8_t* p) {
  uint32_t four;
  memcpy(&four, p, 4);
  const I q = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128((int)four));
  return _mm256_or_si256(_mm256_srli_epi64(q, 4),
                         _mm256_slli_epi64(_mm256_and_si256(q, _mm256_set1_epi64x(0xF)), 32));
}

// Output stores of the 4-bit decoders: plain, or non-temporal (kStream, 32-byte
// aligned): a streaming store skips the read-for-ownership of the line, so writing an
// output far beyond the L3 moves 2 bytes per bf16 element instead of 4.
template <bool kStream>
inline void store_vector(void* o, I v) {
  if (kStream) _mm256_stream_si256(reinterpret_cast<I*>(o), v);
  else _mm256_storeu_si256(reinterpret_cast<I*>(o), v);
}
inline void store_fence() { _mm_sfence(); }

// The 16-bit Decoder's step. Lane 0 takes packed bytes 0-3 and 8-11, lane 1 bytes 4-7
// and 12-15: after the nibble interleave lane 0 holds the codes of elements 0-7 and
// 16-23, lane 1 of 8-15 and 24-31, which is what the final byte interleaves need to emit
// elements 0-15 and 16-31 without a lane-crossing shuffle.
inline I arranged_bytes(const uint8_t* p) {
  const I arrange = _mm256_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, -1, -1, -1, -1, -1, -1, -1, -1,
                                     4, 5, 6, 7, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  return _mm256_shuffle_epi8(
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), arrange);
}
template <bool kStream>
inline void store_interleaved(void* o, I low, I high) {
  store_vector<kStream>(o, _mm256_unpacklo_epi8(low, high));
  store_vector<kStream>(static_cast<char*>(o) + 32, _mm256_unpackhi_epi8(low, high));
}

#include "simd_body.h"

// ---- kernel_body.h's narrowing stores ------------------------------------------------
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

inline void store_bytes(uint8_t* q, I v) {  // 8 codes 0..255 -> 8 bytes
  const __m128i w = narrow_u16(v);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packus_epi16(w, w));
}

// ---- the 16-bit Decoder's byte planes (simd_body.h) -----------------------------------
// t.lo holds entries 0..7, t.hi 8..15; the planes hold the same 16 bytes in both lanes.

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
inline void byte_planes<bf16>(const Table16& t, bool finite, I& lo, I& hi) {
  I r0 = bf16_rne(t.lo), r1 = bf16_rne(t.hi);
  // t * absmax is NaN only for a non-finite absmax; the NaN blends would be 6 of the
  // table build's ~16 instructions
  if (!finite) {
    r0 = bf16_nan(r0, t.lo);
    r1 = bf16_nan(r1, t.hi);
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
inline void byte_planes<fp16>(const Table16& t, bool, I& lo, I& hi) {
  const I v = _mm256_set_m128i(to_u16<fp16>(t.hi), to_u16<fp16>(t.lo));  // entries 0-7 | 8-15
  // per lane: 4 dwords = low bytes of its first 4 entries, of its last 4, high bytes ditto
  const I split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                   0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const I d = _mm256_shuffle_epi8(v, split);
  lo = _mm256_permutevar8x32_epi32(d, _mm256_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5));
  hi = _mm256_permutevar8x32_epi32(d, _mm256_setr_epi32(2, 3, 6, 7, 2, 3, 6, 7));
}

// ---- gemv_body.h: 32 weights per step, all lookups in-lane ---------------------------
// The float Decoder (simd_body.h) needs 4 vpermps + 2 blends per 16 weights; vpermps
// crosses 128-bit lanes and is the bottleneck on Zen 3 (measured: ~9 cycles per 16
// weights, so M = 1 ran at 1/4 of memory bandwidth). Here a 16-entry float lookup is 4
// pshufb, one per byte of the float32 table entries (byte planes, the same 16 bytes in
// both lanes), followed by byte and word interleaves that rebuild the floats.
// 16 packed bytes go to both lanes; lane 0 keeps the high nibbles (elements 0, 2, ..,
// 30), lane 1 the low ones (1, 3, .., 31). The interleaves (in-lane) then put elements
// 8i + {0, 2, 4, 6} in lane 0 and 8i + {1, 3, 5, 7} in lane 1 of w[i]: source() is that
// order, which gemv_body.h applies to x once.
constexpr int kGemvAccumulators = 8;  // of 16 registers: the rest decode
struct GemvDecoder : FloatGemvDecoder {
  static constexpr int kGroup = 32, kVectors = 4;  // 16 packed bytes -> 4 vectors
  static int source(int j) { return (j & ~7) + ((j & 3) << 1) + ((j >> 2) & 1); }
  I plane[4];  // plane[k]: byte k of the weight's 16 float32 levels
  explicit GemvDecoder(const CodeTable& table) {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(table.level);
    for (int k = 0; k < 4; ++k) {
      alignas(16) uint8_t column[16];
      for (int c = 0; c < 16; ++c) column[c] = bytes[4 * c + k];
      plane[k] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(column)));
    }
  }
  void operator()(const Table& scale, const uint8_t* p, F* w) const {
    const I q = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    scaled_levels(_mm256_and_si256(_mm256_srlv_epi32(q, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
                                   _mm256_set1_epi8(0x0F)),
                  scale, w);
  }
  // The levels of 32 codes (one per byte) times scale: w[i] holds those of bytes
  // 4i..4i+3 of lane 0 in its lane 0 and of lane 1 in its lane 1.
  void scaled_levels(I codes, const Table& scale, F* w) const {
    const I b0 = _mm256_shuffle_epi8(plane[0], codes), b1 = _mm256_shuffle_epi8(plane[1], codes);
    const I b2 = _mm256_shuffle_epi8(plane[2], codes), b3 = _mm256_shuffle_epi8(plane[3], codes);
    const I low01 = _mm256_unpacklo_epi8(b0, b1), high01 = _mm256_unpackhi_epi8(b0, b1);
    const I low23 = _mm256_unpacklo_epi8(b2, b3), high23 = _mm256_unpackhi_epi8(b2, b3);
    w[0] = mul(_mm256_castsi256_ps(_mm256_unpacklo_epi16(low01, low23)), scale);
    w[1] = mul(_mm256_castsi256_ps(_mm256_unpackhi_epi16(low01, low23)), scale);
    w[2] = mul(_mm256_castsi256_ps(_mm256_unpacklo_epi16(high01, high23)), scale);
    w[3] = mul(_mm256_castsi256_ps(_mm256_unpackhi_epi16(high01, high23)), scale);
  }
};
// 32 packed bytes as 64 codes, one per byte: `high` holds the high nibbles (element 2b of
// byte b), `low` the low ones (element 2b + 1).
inline void split_nibbles(const uint8_t* p, I& high, I& low) {
  const I q = _mm256_loadu_si256(reinterpret_cast<const I*>(p));
  const I nibble = _mm256_set1_epi8(0x0F);
  high = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
  low = _mm256_and_si256(q, nibble);
}

// Blocksizes that are a multiple of 64: the same lookup, 64 weights per step from one
// 32-byte load, a 16-bit shift and two ands (split_nibbles, as the integer decoder), where
// 32-weight steps took a broadcast load, a variable shift and an and for every 32. Lane 0
// holds packed bytes 0-15, lane 1 bytes 16-31; w[0..3] their high nibbles (element 2b of
// byte b), w[4..7] the low ones (2b + 1). A micro-benchmark of the step loop (AVX2-only
// EPYC Zen 1, one thread, 512x1024 W in L2, TSC ticks per 32 weights, M = 1): 14.3 ->
// 12.1; the four lookups and eight unpacks per 32 weights (24 micro-ops on Zen 1's two
// shuffle pipes: >= 10 ticks at 2.4 GHz) are what is left.
struct GemvDecoder64 : GemvDecoder {
  static constexpr int kGroup = 64, kVectors = 8;
  static int source(int j) {  // vector j / 8, lane (j / 4) % 2, position j % 4
    const int byte = 16 * ((j / 4) % 2) + 4 * ((j / 8) % 4) + j % 4;
    return 2 * byte + j / 32;
  }
  using GemvDecoder::GemvDecoder;
  void operator()(const Table& scale, const uint8_t* p, F* w) const {
    I high, low;
    split_nibbles(p, high, low);
    scaled_levels(high, scale, w);
    scaled_levels(low, scale, w + 4);
  }
};
template <class T> struct GemvDecoderFor { using type = GemvDecoder64; };

// 16 int16 levels as two byte planes (their low and high bytes) in both 128-bit lanes, for
// pshufb: a code's level is unpacklo/hi_epi8(shuffle(lo, code), shuffle(hi, code)).
struct BytePlanes {
  I lo, hi;
  BytePlanes() = default;
  explicit BytePlanes(const int16_t* levels) {
    alignas(16) uint8_t low[16], high[16];
    for (int c = 0; c < 16; ++c) {
      low[c] = static_cast<uint8_t>(levels[c] & 0xFF);
      high[c] = static_cast<uint8_t>((levels[c] >> 8) & 0xFF);
    }
    lo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(low)));
    hi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(high)));
  }
};

// 16-bit activations: the integer decoder (gemv_body.h). The same in-lane lookup with two
// byte planes (the low and high bytes of the 16 int16 levels, built once per call, not per
// block) and one byte interleave per vector give 64 int16 weights per 32 packed bytes: one
// 32-byte load, a 16-bit shift and two ands make the high nibbles (element 2b of byte b) and
// the low ones (2b + 1) one code per byte, 4 pshufb look up their levels' low and high
// bytes, 4 unpacks make the words. 12 instructions per 64 weights, where two 16-byte loads
// each broadcast to both lanes and split by a variable shift took 14 (AMD EPYC Zen 4, one
// thread, NF4LORA_CPU_ISA=avx2, bf16 x, 4096x4096 W in cache, interleaved A/B, TSC ticks
// per 32 weights: M = 1 3.60 -> 3.40, M = 2 5.0 -> 4.9, M = 4 9.2 -> 9.0, M = 8 unchanged
// at ~17: each row's 10 multiply-add-fold instructions per 64 dominate there). The
// interleaves stay in their 128-bit lane: w[v] holds packed bytes 0-7 (v = 0, 2) or 8-15
// (v = 1, 3) in lane 0 and bytes 16-23 / 24-31 in lane 1, v < 2 their high nibbles, v >= 2
// their low ones: source() is that order. A step is one x scale group, so each int32 lane
// of a sum adds 8 products (isa.h: no overflow).
// Tried (a micro-benchmark of this loop, W in L2 or L3, the same Zen 4 thread, ticks per 32
// weights at M = 1 / 2 / 4, this decoder 2.45 / 3.50 / 6.17): the unpacks replaced by
// shifts, ands and ors (3.20 / 4.33 / 7.00) or by shifts and vpblendvb (2.96 / 4.05 / 6.70),
// more instructions than the unpacks they save; a 128-weight step with one int32 sum per
// scale group (no lane may add 16 products) and two folds, halving the loop's overhead
// (2.37 / 3.83 / 6.38: 3% faster at M = 1, 9% slower at M = 2, and gemv_body.h's loop would
// need two folds per step). GCC already adds the 4 vpmaddwd results pairwise (3 vpaddd per
// step and row, the first add of zero folded away).
struct GemvInt16Decoder : IntegerGemvDecoder {
  static constexpr int kGroup = 64, kVectors = 4;
  static int source(int j) {  // vector j / 16, word j % 16: packed byte b, element 2b or 2b + 1
    const int byte = j % 8 + 8 * ((j / 16) % 2) + 16 * ((j / 8) % 2);
    return 2 * byte + j / 32;
  }
  BytePlanes planes;
  explicit GemvInt16Decoder(const CodeTable& table) {
    int16_t levels[16];
    int16_levels(table, levels);
    planes = BytePlanes(levels);
  }
  void operator()(const Table&, const uint8_t* p, I* w) const {
    I even, odd;
    split_nibbles(p, even, odd);
    const I even_lo = _mm256_shuffle_epi8(planes.lo, even), even_hi = _mm256_shuffle_epi8(planes.hi, even);
    const I odd_lo = _mm256_shuffle_epi8(planes.lo, odd), odd_hi = _mm256_shuffle_epi8(planes.hi, odd);
    w[0] = _mm256_unpacklo_epi8(even_lo, even_hi);
    w[1] = _mm256_unpackhi_epi8(even_lo, even_hi);
    w[2] = _mm256_unpacklo_epi8(odd_lo, odd_hi);
    w[3] = _mm256_unpackhi_epi8(odd_lo, odd_hi);
  }
  static I madd(I w, const X* x, I sum) {
    return _mm256_add_epi32(sum, _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const I*>(x))));
  }
};
constexpr bool kHasIntegerDecoder = true;
using GemvIntegerDecoder = GemvInt16Decoder;
#define NF4LORA_GEMV_INTERLEAVED 8  // gemv_interleaved.h (a tile's rows in two halves)

#include "kernel_body.h"
#include "gemv_body.h"
#include "gemm_tiles.h"

#undef NF4LORA_MM
}  // namespace nf4lora::cpu::avx2

#pragma GCC pop_options

// Outside the target region: the dispatcher calls this before knowing the CPU has AVX2.
NF4LORA_DEFINE_KERNELS(avx2, "avx2")
