// AVX-512 path (F + BW): the kernel templates over 16-float vectors.
// What it shares with AVX2 is simd_body.h, the same algorithms in the same order of
// operations; the vocabulary below is where AVX-512 is shorter:
//   * compares give __mmask16 and selecting or counting is a masked move or add;
//   * the float 16-entry lookup is one _mm512_permutexvar_ps instead of two permutes
//     and a blend;
//   * narrowing int32 -> int16/int8 is vpmovdw/vpmovdb instead of packus + permutes.
// The 16-bit decode keeps AVX2's byte-plane pshufb lookup (vpshufb is per 128-bit
// lane on both, so the tables are broadcast to every lane in the same way).
//
// AVX512-BF16's vcvtneps2bf16 flushes subnormals, torch does not: it only builds the
// bf16 decoder's tables where no product can be subnormal (GemvBf16Decoder::table).
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
#pragma GCC target("avx512f,avx512bw,avx2,f16c,avx512bf16,avx512vnni")
#else
#pragma GCC target("avx512f,avx512bw,avx2,f16c")
#endif
// gcc 12's avx512fintrin.h builds some results from _mm512_undefined_*() and then
// trips its own -Wmaybe-uninitialized / -Wuninitialized (a known false positive), once
// per intrinsic use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace nf4lora::cpu::NF4LORA_AVX512_NAMESPACE {

constexpr int kW = 16;
using F = __m512;
using I = __m512i;
using Mask = __mmask16;
using Half = __m256i;
using Table16 = F;
#define NF4LORA_MM(op) _mm512_##op

// ---- simd_body.h's vocabulary --------------------------------------------------------
inline F load(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline F load(const fp16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline I as_int(F x) { return _mm512_castps_si512(x); }
inline I and_i(I a, I b) { return _mm512_and_si512(a, b); }
inline I or_i(I a, I b) { return _mm512_or_si512(a, b); }
inline F abs(F x) { return _mm512_abs_ps(x); }

inline Mask greater(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline Mask less(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline Mask unordered(F x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
inline Mask either(Mask a, Mask b) { return (Mask)(a | b); }
inline bool any(Mask m) { return m != 0; }
inline Mask has_bit(I v, int bit) { return _mm512_test_epi32_mask(v, _mm512_set1_epi32(bit)); }
inline F select(Mask m, F if_false, F if_true) {
  return _mm512_mask_blend_ps(m, if_false, if_true);
}
inline I select(Mask m, I if_false, I if_true) {
  return _mm512_mask_blend_epi32(m, if_false, if_true);
}
inline I add_if(I v, Mask m, int amount) {
  return _mm512_mask_add_epi32(v, m, v, _mm512_set1_epi32(amount));
}

// permutexvar reads the low 4 bits of each index: an 8-entry table is a 16-entry one
// whose index stays below 8.
inline F lookup8(F table, I index) { return _mm512_permutexvar_ps(index, table); }
inline Table16 load_table16(const float* t) { return _mm512_loadu_ps(t); }
inline F lookup16(Table16 t, I index) { return _mm512_permutexvar_ps(index, t); }
inline F gather(const float* base, I index) { return _mm512_i32gather_ps(index, base, 4); }
// A 256-entry float table (the 8-bit code of double-quantized block constants) held in
// 16 registers: vpermi2ps looks up 32 entries by bits 0-4, and bits 5-7 pick among the 8
// results. vgatherdps is microcoded on Zen 4: ~4.5 cycles per looked-up block constant,
// 17% of an M = 1 GEMV over a double-quantized 4096x4096 W (663 vs 549 us without double
// quantization, one thread); this is ~18 simple instructions per 16 entries.
struct Table256 {
  F part[16];
  explicit Table256(const float* table) {
    for (int i = 0; i < 16; ++i) part[i] = _mm512_loadu_ps(table + 16 * i);
  }
  F operator()(I index) const {
    F r[8];
    for (int k = 0; k < 8; ++k) r[k] = _mm512_permutex2var_ps(part[2 * k], index, part[2 * k + 1]);
    const Mask bit5 = has_bit(index, 32), bit6 = has_bit(index, 64), bit7 = has_bit(index, 128);
    for (int k = 0; k < 4; ++k) r[k] = _mm512_mask_blend_ps(bit5, r[2 * k], r[2 * k + 1]);
    for (int k = 0; k < 2; ++k) r[k] = _mm512_mask_blend_ps(bit6, r[2 * k], r[2 * k + 1]);
    return _mm512_mask_blend_ps(bit7, r[0], r[1]);
  }
};

inline float reduce_max(F m) { return _mm512_reduce_max_ps(m); }
inline __m256 lanes8(F v) {  // lanes i + (i + 8)
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

inline Half narrow_u16(I r) { return _mm512_cvtepi32_epi16(r); }
inline void store_half(void* o, Half h) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), h); }
inline I load_bytes(const uint8_t* q) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
}

// The codes of 2 * 8 elements from 8 packed bytes, in 32-bit lanes: each byte widened to
// a 64-bit lane, its high nibble (element 2j) in the low half, its low nibble in the high.
inline I codes32(const uint8_t* p) {
  const I q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm512_or_si512(_mm512_srli_epi64(q, 4),
                         _mm512_slli_epi64(_mm512_and_si512(q, _mm512_set1_epi64(0xF)), 32));
}

// Output stores of the 4-bit decoders: plain, or non-temporal (kStream, 64-byte
// aligned); see isa_avx2.cpp.
template <bool kStream>
inline void store_vector(void* o, I v) {
  if (kStream) _mm512_stream_si512(reinterpret_cast<I*>(o), v);
  else _mm512_storeu_si512(o, v);
}
inline void store_fence() { _mm_sfence(); }

// The 16-bit Decoder's step. Every lane gets the 16 packed bytes; lane k keeps bytes
// 4k..4k+3, whose nibbles are the codes of elements 8k..8k+7, so one byte interleave emits
// elements 0-31 in order.
inline I arranged_bytes(const uint8_t* p) {
  const I arrange = _mm512_setr_epi32(0x03020100, -1, -1, -1, 0x07060504, -1, -1, -1,
                                      0x0B0A0908, -1, -1, -1, 0x0F0E0D0C, -1, -1, -1);
  return _mm512_shuffle_epi8(
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), arrange);
}
template <bool kStream>
inline void store_interleaved(void* o, I low, I high) {
  store_vector<kStream>(o, _mm512_unpacklo_epi8(low, high));
}

#define NF4LORA_GEMV_INT8 NF4LORA_AVX512_BF16  // GemvInt8Decoder below
#include "simd_body.h"

// ---- kernel_body.h's narrowing stores ------------------------------------------------
// 32 codes (int32) -> 16 bytes, code 2j in the high nibble of byte j.
inline void store_packed(uint8_t* out, I first, I second) {
  // narrow to 32 codes as u16, in element order
  I w = _mm512_inserti64x4(_mm512_castsi256_si512(narrow_u16(first)), narrow_u16(second), 1);
  // each 32-bit lane holds codes 2j (low half) and 2j+1 (high half): make the byte
  w = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0xF)), 4),
                      _mm512_srli_epi32(w, 16));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(w));
}

inline void store_bytes(uint8_t* q, I v) {  // 16 codes 0..255 -> 16 bytes
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(v));
}

// ---- the 16-bit Decoder's byte planes (simd_body.h) -----------------------------------
// isa_avx2.cpp's planes, four 128-bit lanes wide.
template <>
inline void byte_planes<bf16>(const Table16& t, bool finite, I& lo, I& hi) {
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
inline void byte_planes<fp16>(const Table16& t, bool, I& lo, I& hi) {
  // entries 0-7 | 8-15; per 128-bit lane, dwords: low bytes of 4 entries, of the next
  // 4, then their high bytes
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const I d = _mm512_castsi256_si512(_mm256_shuffle_epi8(to_u16<fp16>(t), split));
  lo = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5, 0, 1, 4, 5, 0, 1, 4, 5), d);
  hi = _mm512_permutexvar_epi32(_mm512_setr_epi32(2, 3, 6, 7, 2, 3, 6, 7, 2, 3, 6, 7, 2, 3, 6, 7), d);
}

// gemv_body.h: 16 packed bytes -> the 16 high-nibble weights (even elements), then the
// 16 low-nibble ones (odd). permutexvar reads the low 4 bits of each lane, so the low
// nibble needs no mask; it is one cheap instruction on AVX-512 cores (unlike AVX2's
// two-table vpermps + blend, see isa_avx2.cpp).
constexpr int kGemvAccumulators = 8;
struct GemvDecoder : FloatGemvDecoder {
  static constexpr int kGroup = 32, kVectors = 2;
  static int source(int j) { return j < 16 ? 2 * j : 2 * (j - 16) + 1; }
  F values;  // the weight's 16 levels
  explicit GemvDecoder(const CodeTable& table) : values(load(table.level)) {}
  void operator()(const Table& scale, const uint8_t* p, F* w) const {
    const I v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w[0] = mul(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), values), scale);
    w[1] = mul(_mm512_permutexvar_ps(v, values), scale);
  }
};

// The 16-bit GEMV decoders' step: 32 packed bytes -> 64 16-bit entries of `table` (lanes
// 0-15) by code, the 32 high-nibble ones (even elements) in w[0], the low-nibble ones in
// w[1]: source(j) = j < 32 ? 2j : 2(j - 32) + 1.
inline void lookup64_epi16(const uint8_t* p, I table, I* w) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i first = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);  // elements 2i
  w[0] = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(first), table);
  w[1] = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm256_and_si256(q, low)), table);
}

// 16-bit activations: the integer decoder (gemv_body.h). A step is 64 packed bytes = 128
// weights read as 32 16-bit words, each holding 4 codes: vpermw looks up 32 int16 levels
// by the low 5 bits of each word, so the word itself and the word shifted right by 4, 8
// and 12 give the 4 codes of every word (bit 4 is the next code's low bit: the 16 levels
// are repeated in lanes 16-31). 1 load, 3 shifts and 4 vpermw per 128 weights, where
// unpacking nibbles to one code per 16-bit lane (vpmovzxbw) took 2 loads, 1 shift, 2 ands,
// 2 vpmovzxbw and 2 vpermw per 64 (micro-benchmark, 4096x4096 in L3, M = 1, one Zen 4
// core: 2.21 -> 1.68 TSC ticks per 32 weights). Word i's codes are elements 4i..4i+3 in
// the order (bits 0-3, 4-7, 8-11, 12-15) = (4i + 1, 4i, 4i + 3, 4i + 2) (high nibble
// first within a byte). CPUs with AVX512-BF16 all have AVX512-VNNI (Cooper Lake, Sapphire
// Rapids, Zen 4; the dispatcher checks both): its vpdpwssd is vpmaddwd + vpaddd in one.
// Each int32 lane i of a Sum holds words 2i and 2i + 1 of each vector: elements 8i..8i+7,
// so lanes 0-7 sum the step's first x scale group (64 columns) and lanes 8-15 its second.
inline F fold_halves(const float* factors) {  // lanes 0-7: factors[0], 8-15: factors[1]
  double pair;
  memcpy(&pair, factors, sizeof(pair));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                               _mm512_castpd_ps(_mm512_set1_pd(pair)));
}
struct GemvInt16Decoder : IntegerGemvDecoder {
  static constexpr int kGroup = 128, kVectors = 4;
  static int source(int j) {
    constexpr int kNibble[4] = {1, 0, 3, 2};  // element within a word, by vector
    return 4 * (j % 32) + kNibble[j / 32];
  }
  I levels;  // int16 lanes 0-15, again in 16-31
  explicit GemvInt16Decoder(const CodeTable& table) {
    alignas(64) int16_t level[32];
    int16_levels(table, level);
    memcpy(level + 16, level, 16 * sizeof(int16_t));
    levels = _mm512_load_si512(level);
  }
  void operator()(const Table&, const uint8_t* p, I* w) const {
    const I q = _mm512_loadu_si512(p);
    w[0] = _mm512_permutexvar_epi16(q, levels);
    w[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(q, 4), levels);
    w[2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(q, 8), levels);
    w[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(q, 12), levels);
  }
  static I madd(I w, const X* x, I sum) {
    const I xv = _mm512_loadu_si512(x);
#if NF4LORA_AVX512_BF16
    return _mm512_dpwssd_epi32(sum, w, xv);
#else
    return _mm512_add_epi32(sum, _mm512_madd_epi16(w, xv));
#endif
  }
  static F fold(const float* factors) { return fold_halves(factors); }
};

#if NF4LORA_AVX512_BF16
// The opt-in int8 decoder (NF4LORA_CPU_GEMV=int8; the dispatcher never picks it itself):
// levels and x as int8 (x127, x per 64 columns 127 / max |x|), AVX512-VNNI vpdpbusd: 64
// byte products per instruction into 16 int32 lanes, twice vpdpwssd's 32. At M = 8 the
// int16 decoder is bound by its multiplies (4 vpdpwssd per row per 128 weights, shared
// decode), this one issues 2. vpdpbusd multiplies unsigned by signed bytes, so the weights
// are level + 128 (1..255) and each step's Sum starts at -128 * (the sum of the x levels it
// multiplies), x-only and exact: computed once per row in gemv_prepare_rows
// (start_values) and stored after the step's 128 x levels (kStartColumns), one 64-byte
// load per row and step. Bounds per int32 lane and step: 8 products of at most 255 * 127
// plus a start of at most 128 * 8 * 127, < 2^19; the sum itself is at most 8 * 127^2 <
// 2^24, so even its conversion to float is exact.
// A step is one 64-byte load, 128 weights: the low nibbles and the high nibbles (shifted
// down by 4 within 16-bit words) masked to 0..15, each looked up by vpshufb in the 16
// biased levels repeated in every 128-bit lane. vpermb (VBMI) would save the two ands,
// but Cooper Lake has AVX512-BF16 and VNNI without VBMI. Byte b of w[0] is element 2b
// (high nibble), of w[1] element 2b + 1: int32 lane i sums bytes 4i..4i + 3 of both, the
// elements 8i..8i + 7, so the lane -> scale group mapping (fold) is the int16 decoder's.
// Error: each level and each x within 0.5 / 127 of its scale (4e-3), twice bf16's 2^-9:
// less exact than the dense bf16 baseline (tests/test_cpu_matmul.py states it).
struct GemvInt8Decoder : IntegerSums<int8_t, int(kGemvInt8LevelScale)> {
  static constexpr int kGroup = 128, kVectors = 2;
  static constexpr int kStartColumns = 64;  // 16 int32 start values
  static int source(int j) { return j < 64 ? 2 * j : 2 * (j - 64) + 1; }
  I levels;  // the 16 levels + 128 as bytes, in every 128-bit lane
  explicit GemvInt8Decoder(const CodeTable& table) {
    int8_t level[16];
    integer_levels(table, kLevelScale, level);
    alignas(16) uint8_t biased[16];
    for (int c = 0; c < 16; ++c) biased[c] = static_cast<uint8_t>(level[c] + 128);
    levels = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(biased)));
  }
  void operator()(const Table&, const uint8_t* p, I* w) const {
    const I q = _mm512_loadu_si512(p), low = _mm512_set1_epi8(0x0F);
    w[0] = _mm512_shuffle_epi8(levels, _mm512_and_si512(_mm512_srli_epi16(q, 4), low));
    w[1] = _mm512_shuffle_epi8(levels, _mm512_and_si512(q, low));
  }
  static I madd(I w, const X* x, I sum) { return _mm512_dpbusd_epi32(sum, w, _mm512_loadu_si512(x)); }
  static I start(const X* at) { return _mm512_loadu_si512(at); }
  // lane i's start: -128 times the x levels of bytes 4i..4i + 3 of both vectors
  static void start_values(const X* level, X* out) {
    int32_t start[16];
    for (int i = 0; i < 16; ++i) {
      int32_t sum = 0;
      for (int v = 0; v < kVectors; ++v)
        for (int b = 0; b < 4; ++b) sum += level[v * (kGroup / kVectors) + 4 * i + b];
      start[i] = -128 * sum;
    }
    memcpy(out, start, sizeof(start));
  }
  static F fold(const float* factors) { return fold_halves(factors); }
};
constexpr bool kHasInt8Decoder = true;
#endif

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
  static constexpr bool kIntegerSums = false;
  using X = bf16;
  using Weights = I;
  using Table = I;  // lanes 0-15: the block's 16 weights as bf16
  static X to_x(bf16 v) { return v; }
  static int source(int j) { return j < 32 ? 2 * j : 2 * (j - 32) + 1; }
  F values;  // the weight's 16 levels
  // The smallest |scale| whose products with the nonzero levels are all normal floats.
  // From there up to FLT_MAX, vcvtneps2bf16 rounds them as to_u16 does (to nearest even,
  // overflow to inf). Below, it flushes subnormals where to_u16 rounds the largest up to
  // the smallest normal bf16 (which vdpbf16ps then uses): there (and for inf and NaN
  // scales) the table takes to_u16's ~9 instructions instead of one. The table is built
  // once per block and row of W: at M = 8, 16 vdpbf16ps per block; 0.93-0.97x the time
  // at M = 4-17 (4096x4096, one Zen 4 thread, A/B; tests/test_cpu_matmul.py's any_scale
  // test holds the boundary).
  float normal_from;
  explicit GemvBf16Decoder(const CodeTable& table) : values(load(table.level)) {
    float smallest = 0.0f;  // of the nonzero |levels|
    for (float level : table.level)
      if (level != 0.0f && (smallest == 0.0f || fabsf(level) < smallest)) smallest = fabsf(level);
    normal_from = smallest == 0.0f ? 0.0f : 0x1p-126f / smallest * 2.0f;  // 2x: the division's rounding
  }
  Table table(float scale) const {
    const F weights = mul(values, splat(scale));
    if (fabsf(scale) >= normal_from && fabsf(scale) <= 0x1.fffffep127f)
      return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(weights));
    return _mm512_castsi256_si512(to_u16<bf16>(weights));
  }
  void operator()(const Table& table, const uint8_t* p, I* w) const { lookup64_epi16(p, table, w); }
  static F madd(I w, const X* x, F acc) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_loadu_si512(x));
  }
};
template <class T> struct GemvDecoderFor { using type = GemvDecoder; };
template <> struct GemvDecoderFor<bf16> { using type = GemvBf16Decoder; };
#else
template <class T> struct GemvDecoderFor { using type = GemvDecoder; };
#endif
constexpr bool kHasIntegerDecoder = true;
using GemvIntegerDecoder = GemvInt16Decoder;
#define NF4LORA_GEMV_INTERLEAVED 16  // gemv_interleaved.h (a tile's 16 rows in one vector)

#if NF4LORA_AVX512_BF16 && !defined(NF4LORA_NO_AMX)  // (the SIMDe check builds without it)
#define NF4LORA_TILE_GEMM_AMX 1  // gemm_tiles.h: the AMX entry (every AMX CPU has AVX512-BF16)
#endif
#include "kernel_body.h"
#include "gemv_body.h"
#include "gemm_tiles.h"

#undef NF4LORA_MM
}  // namespace nf4lora::cpu::NF4LORA_AVX512_NAMESPACE

#pragma GCC diagnostic pop
#pragma GCC pop_options

// Outside the target region: the dispatcher calls this before checking the CPU.
NF4LORA_DEFINE_KERNELS(NF4LORA_AVX512_NAMESPACE, NF4LORA_AVX512_NAME)
