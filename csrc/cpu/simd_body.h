// simd_body.h: the kernel_body.h primitives that the AVX2 and AVX-512 paths share, written
// once over a small per-ISA vocabulary. The two used to be separate copies kept in step by
// hand; what stays in isa_avx2.cpp / isa_avx512.cpp is what really differs (loads,
// narrowing, masks, lookups, the 16-bit decode and the GEMV decoders).
//
// NOT a normal header (no include guard, on purpose): each of those files includes it once,
// inside its own namespace and `#pragma GCC target` region, after defining:
//
//   NF4LORA_MM(op)                the intrinsic of its width: _mm256_##op / _mm512_##op
//   kW, F, I                      floats per vector, float vector, int32 vector
//   Mask                          a per-lane predicate (AVX2: all-ones lanes; AVX-512: __mmask16)
//   Half                          kW 16-bit values (__m128i / __m256i)
//   Table16                       16 floats to look up by a 4-bit index
//   load(const bf16*), load(const fp16*)   kW elements -> F (exact)
//   as_int(F), and_i, or_i        bit casts and logic
//   abs(F), greater, less, unordered(F) -> Mask, either(Mask, Mask), any(Mask)
//   has_bit(I, bit) -> Mask       lanes where (v & bit) != 0
//   select(m, if_false, if_true)  per lane, for F and for I
//   add_if(I, Mask, amount)       v + amount where m
//   lookup8(table, I)             entry index (< 8) of 8 floats in a vector
//   load_table16, lookup16(Table16, I), mul(Table16, F)   the same for 16 floats
//   gather(const float*, I)       base[index] per lane
//   Table256(const float*), t(I)  a 256-entry float table looked up per lane (index < 256)
//   reduce_max(F), lanes8(F)      max of the lanes; the lanes summed down to one __m256
//   narrow_u16(I) -> Half         int32 lanes in 0..65535 -> 16-bit
//   store_half(void*, Half), load_bytes(const uint8_t*) -> I (kW bytes, zero-extended)
//   codes32(p) -> I               the kW codes of kW / 2 packed bytes, in element order
//   arranged_bytes(p) -> I        16 packed bytes placed for the 16-bit Decoder's lanes
//   store_vector<kStream>(o, I), store_interleaved<kStream>(o, low, high), store_fence()
//                                 decoder output stores, plain or non-temporal
//
// Every operation here is exact or a single IEEE float32 op, in the order of the scalar
// codec (nf4_codec.h): every path gives the same bytes (the tests and
// scripts/check_avx512_emulated.sh compare them).
#ifndef NF4LORA_MM
#error "define NF4LORA_MM and the vocabulary above before including simd_body.h"
#endif

// ---- arithmetic ----------------------------------------------------------------------
inline F load(const float* p) { return NF4LORA_MM(loadu_ps)(p); }
inline F splat(float x) { return NF4LORA_MM(set1_ps)(x); }
inline F mul(F a, F b) { return NF4LORA_MM(mul_ps)(a, b); }
inline F add(F a, F b) { return NF4LORA_MM(add_ps)(a, b); }
inline F fmadd(F a, F b, F c) { return NF4LORA_MM(fmadd_ps)(a, b, c); }
inline I splat_i(int x) { return NF4LORA_MM(set1_epi32)(x); }
inline I add_i(I a, I b) { return NF4LORA_MM(add_epi32)(a, b); }
inline I sub_i(I a, int b) { return NF4LORA_MM(sub_epi32)(a, splat_i(b)); }
template <int kShift> inline I srli(I v) { return NF4LORA_MM(srli_epi32)(v, kShift); }

// The sum of the kW lanes in a fixed order: down to 8 lanes (lanes8), then (0+4, 1+5,
// 2+6, 3+7), then pairs, then the last two.
inline float hsum(F v) {
  const __m256 h = lanes8(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- float32 -> 16-bit, round to nearest even (nf4_codec.h float_to_*_bits) -------
template <class Out> Half to_u16(F x);
template <>
inline Half to_u16<bf16>(F x) {
  const I u = as_int(x);
  const I lsb = and_i(srli<16>(u), splat_i(1));
  const I rounded = srli<16>(add_i(u, add_i(lsb, splat_i(0x7fff))));
  const I quiet_nan = or_i(srli<16>(u), splat_i(0x40));
  return narrow_u16(select(unordered(x), rounded, quiet_nan));
}
template <>
inline Half to_u16<fp16>(F x) {
  return NF4LORA_MM(cvtps_ph)(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <class Out>
inline void store_out(Out* o, F x) { store_half(o, to_u16<Out>(x)); }
template <>
inline void store_out<float>(float* o, F x) { NF4LORA_MM(storeu_ps)(o, x); }

// ---- absmax ------------------------------------------------------------------------
struct AbsMax {
  F m;       // running max of |x|
  Mask nan;  // lanes that ever saw a NaN (max_ps would drop it)
  // (explicit constructor: gcc does not give implicit ones the target attribute)
  AbsMax() : m(NF4LORA_MM(setzero_ps)()), nan(Mask{}) {}
  void add(F x) {
    nan = either(nan, unordered(x));
    m = NF4LORA_MM(max_ps)(m, abs(x));
  }
  // No NaN in m, and |x| has no -0.0, so the order of the max does not matter.
  float result() const { return any(nan) ? bits_float(0x7fc00000u) : reduce_max(m); }
};

// ---- 4-bit encode -----------------------------------------------------------------
// The number of the 15 ascending thresholds t that lie strictly below x (nf4_codec.h
// encode_4bit), by a binary search: a branch-free decision tree whose level l decides
// bit 4 - l of the count by comparing x with one threshold per lane, picked by the bits
// found so far (bitsandbytes' dQuantizeNF4 is the same tree): t7, then t3|t11, then
// t1|t5|t9|t13, then t0|t2|..|t14. Compares are ordered (_CMP_GT_OQ): NaN goes left every
// time and counts 0; a tie is not "greater", so it keeps the lower count.
struct ThresholdCount {
  F root, left, right;  // levels 1 and 2
  F third, fourth;      // levels 3 and 4: the candidates, by count >> 2 and count >> 1
  explicit ThresholdCount(const float* t) {
    root = splat(t[7]);
    left = splat(t[3]);
    right = splat(t[11]);
    float third_candidates[kW] = {}, fourth_candidates[kW] = {};
    for (int k = 0; k < 4; ++k) third_candidates[k] = t[4 * k + 1];
    for (int k = 0; k < 8; ++k) fourth_candidates[k] = t[2 * k];
    third = load(third_candidates);
    fourth = load(fourth_candidates);
  }
  I operator()(F x) const {
    const Mask top = greater(x, root);
    I count = add_if(splat_i(0), top, 8);
    count = add_if(count, greater(x, select(top, left, right)), 4);
    count = add_if(count, greater(x, lookup8(third, srli<2>(count))), 2);
    return add_if(count, greater(x, lookup8(fourth, srli<1>(count))), 1);
  }
};

// The 4-bit codes of scaled values in any format (nf4_codec.h CodeEncoder): the count of
// its thresholds below x, then that count's code (a 16-entry lookup) and code 0 for NaN.
// Where the codes are the counts (every sorted table: all formats but FP4) both steps are
// skipped, since NaN already counts 0: they cost 9% of an NF4 quantize (bf16 4096x4096,
// one Zen 4 thread: 8.7 vs 8.0 ms). The branch is the same for a whole call.
struct Encoder {
  ThresholdCount count;
  Table16 code_of_count;  // the 16 codes, as int32 bit patterns in float lanes
  bool codes_are_counts;
  explicit Encoder(const CodeEncoder& e)
      : count(e.threshold), code_of_count(codes(e)), codes_are_counts(e.code_of_count == kCounts) {}
  I operator()(F x) const {
    if (codes_are_counts) return count(x);
    const I code = as_int(lookup16(code_of_count, count(x)));
    return select(unordered(x), code, splat_i(0));
  }
  static constexpr uint64_t kCounts = 0xFEDCBA9876543210ull;  // code c for count c
  static Table16 codes(const CodeEncoder& e) {
    int32_t code[16];
    for (int c = 0; c < 16; ++c) code[c] = (int32_t)((e.code_of_count >> (4 * c)) & 15u);
    float bits[16];
    memcpy(bits, code, sizeof(bits));
    return load_table16(bits);
  }
};

// ---- 4-bit decode ------------------------------------------------------------------
// The weight's 16 levels, loaded once per call; each block's decoder scales them.
using Levels = Table16;
inline Levels load_levels(const CodeTable& table) { return load_table16(table.level); }

// 16-bit outputs: per block, the 16 possible outputs level[c] * absmax rounded to Out
// (exactly what each element would compute) are split into a low-byte and a high-byte
// plane (byte_planes: each ISA's own); a decode step is then byte shuffles (pshufb: a
// 16-entry lookup in every 128-bit lane) and an interleave of the two bytes.
//
// Speed, bf16 with nested absmax, L2-resident, one Zen 3 core (AVX2): 6.2 G elements/s
// with 16 outputs per 12-instruction step (from zero-extended codes), a 28-instruction
// table build and a 64-bit division (nested index) per block; 11.4 G elements/s with 32
// outputs per 12-instruction step, a 16-instruction table build and no division. At the
// old speed two cores barely kept up with memory; now they take half its time.
//
// t: the 16 levels times the scale; lo / hi: the 16 low / high bytes of them
// rounded to Out, in every 128-bit lane. `finite`: the scale is finite, so no product is
// NaN.
template <class Out> void byte_planes(const Table16& t, bool finite, I& lo, I& hi);

template <class Out, bool kStream>
struct Decoder {
  // 32 outputs per step on both ISAs (64 on AVX-512 would leave blocksize 32 to the scalar
  // tail): 16 packed bytes, arranged per lane by arranged_bytes(), and two bytes each.
  static constexpr int kStep = 32;
  I lo, hi;  // byte planes
  Decoder(const Levels& levels, float scale) {
    byte_planes<Out>(mul(levels, splat(scale)), is_finite(scale), lo, hi);
  }
  void operator()(const uint8_t* p, Out* o) const {
    const I x = arranged_bytes(p);
    const I nibble = NF4LORA_MM(set1_epi8)(0x0F);
    // element 2j is the high nibble of byte j, element 2j+1 the low one
    const I c = NF4LORA_MM(unpacklo_epi8)(and_i(NF4LORA_MM(srli_epi16)(x, 4), nibble),
                                          and_i(x, nibble));
    store_interleaved<kStream>(o, NF4LORA_MM(shuffle_epi8)(lo, c), NF4LORA_MM(shuffle_epi8)(hi, c));
  }
};

// float output: the 16 products level[c] * absmax, looked up by code (codes32: kW codes
// from kW / 2 packed bytes, in element order).
template <bool kStream>
struct Decoder<float, kStream> {
  static constexpr int kStep = kW;  // kW / 2 packed bytes -> kW floats
  Table16 t;
  Decoder(const Levels& levels, float scale) : t(mul(levels, splat(scale))) {}
  void operator()(const uint8_t* p, float* o) const {
    store_vector<kStream>(o, as_int(lookup16(t, codes32(p))));
  }
};

// ---- dynamic 8-bit (double quantization) -------------------------------------------
// nf4_codec.h encode_dynamic, lane by lane. The 7-step search visits, at step s, one
// of 128/s pivots (127; 63|191; 64k+31; 32k+15; 16k+7; 8k+3; 4k+1) and ends on an even
// index. The first five steps read their code[pivot] from registers (broadcast, select,
// lookups); only the last two steps and the final value need gathers (slow on AVX2
// machines: ~25 cycles of latency each). code[lower] and code[upper] are carried along
// instead of gathered again.
struct DynEncoder {
  const float* code;
  F c127, c63, c191, by64, by32, first, last;
  Table16 by16;
  explicit DynEncoder(const float* c) : code(c) {
    float t64[kW] = {c[31], c[95], c[159], c[223]}, t32[kW] = {}, t16[16];
    for (int k = 0; k < 8; ++k) t32[k] = c[32 * k + 15];
    for (int k = 0; k < 16; ++k) t16[k] = c[16 * k + 7];
    c127 = splat(c[127]);
    c63 = splat(c[63]);
    c191 = splat(c[191]);
    by64 = load(t64);
    by32 = load(t32);
    by16 = load_table16(t16);
    first = splat(c[0]);
    last = splat(c[255]);
  }
  I operator()(F x) const {
    I pivot = splat_i(127), lower = splat_i(0), upper = splat_i(255);
    F lower_value = first, upper_value = last;
    // one search step: compare with v = code[pivot], move the bracket, move the pivot
    auto step = [&](F v, int s) {
      const Mask up = greater(x, v);
      lower = select(up, lower, pivot);
      lower_value = select(up, lower_value, v);
      upper = select(up, pivot, upper);
      upper_value = select(up, v, upper_value);
      pivot = add_if(sub_i(pivot, s), up, 2 * s);
    };
    step(c127, 64);
    step(select(has_bit(pivot, 128), c63, c191), 32);
    step(lookup8(by64, srli<6>(pivot)), 16);
    step(lookup8(by32, srli<5>(pivot)), 8);
    step(lookup16(by16, srli<4>(pivot)), 4);
    step(gather(code, pivot), 2);
    step(gather(code, pivot), 1);
    // nearest of lower / pivot / upper by float32 midpoints; ties stay on the pivot
    const F value = gather(code, pivot);
    const F mid_up = mul(add(upper_value, value), splat(0.5f));
    const F mid_lo = mul(add(lower_value, value), splat(0.5f));
    return select(greater(x, value), select(less(x, mid_lo), pivot, lower),
                  select(greater(x, mid_up), pivot, upper));
  }
};

template <class Out>
struct Decoder8 {
  static constexpr int kStep = kW;
  const float* code;
  F scale;
  Decoder8(const float* c, float s) : code(c), scale(splat(s)) {}
  void operator()(const uint8_t* q, Out* o) const {
    store_out(o, mul(gather(code, load_bytes(q)), scale));
  }
};

// gemv_body.h: the constants of w's blocks [b0, b0 + count), kW at a time (a lookup of
// the nested codes' values); the same two roundings as decode_nested_absmax. A scalar
// walker took ~10 instructions per block, as many as decoding and multiplying its 64
// weights (an M = 4 call of the bf16 decoder: 11% slower on a nested W than on a plain one).
inline void block_constants(const PackedWeight& w, int64_t b0, int64_t count, float* out) {
  if (!w.is_nested()) {
    memcpy(out, w.absmax + b0, count * sizeof(float));
    return;
  }
  const NestedAbsmax& nested = w.nested;
  const Table256 code2(nested.code2);
  const F offset = splat(nested.offset);
  for (int64_t i = 0; i < count;) {  // runs of blocks that share one absmax2
    const int64_t b = b0 + i, group = b / nested.blocksize;
    const int64_t left = nested.blocksize - b % nested.blocksize;
    const int64_t run = count - i < left ? count - i : left;
    const F absmax2 = splat(nested.absmax2[group]);
    int64_t j = 0;
    for (; j + kW <= run; j += kW)
      store_out<float>(out + i + j,
                       add(mul(code2(load_bytes(nested.q + b + j)), absmax2), offset));
    for (; j < run; ++j)
      out[i + j] = decode_nested_absmax(nested.code2, nested.q[b + j], nested.absmax2[group],
                                        nested.offset);
    i += run;
  }
}

// ---- gemv_body.h: what the float32 GEMV decoders of both ISAs share ------------------
// Weights are float32 vectors table[code] * scale, x is copied as float32, and a step is
// an FMA per vector.
struct FloatGemvDecoder {
  static constexpr bool kIntegerSums = false;
  using X = float;
  using Weights = F;
  using Table = F;  // the block constant in every lane
  template <class In> static X to_x(In v) { return to_float(v); }
  Table table(float scale) const { return splat(scale); }
  static F madd(F w, const X* x, F acc) { return fmadd(w, load(x), acc); }
};

// ... and what their integer decoders share (see gemv_body.h): integer weights and x
// (Level: int16_t with kGemvLevelScale, or int8_t with kGemvInt8LevelScale), the block
// constant as the Table, exact int32 sums per group.
template <class Level, int kMaxLevel>
struct IntegerSums {
  static constexpr bool kIntegerSums = true;
  static constexpr float kLevelScale = float(kMaxLevel);
  // X elements after a row's kGroup levels in each step of x_paired that hold the start
  // value of its Sum (start_values, start): none, a Sum starts at 0
  static constexpr int kStartColumns = 0;
  using X = Level;
  using Weights = I;
  using Table = float;
  using Sum = I;
  Table table(float scale) const { return scale; }
  static I start(const X*) { return splat_i(0); }
  static void start_values(const X*, X*) {}
  static F sum_to_float(I sum) { return NF4LORA_MM(cvtepi32_ps)(sum); }  // rounds once, 2^-24
  // x's kGemvXGroup elements at x as levels, x * kLevelScale / max |x| rounded to nearest
  // (ties to even), |level| <= kLevelScale, into out; returns max |x| (x is finite: the
  // dispatcher checked)
  template <class In>
  static float x_levels(const In* x, int32_t* out) {
    F biggest = splat(0.0f);
    for (int j = 0; j < kGemvXGroup; j += kW) biggest = NF4LORA_MM(max_ps)(biggest, abs(load(x + j)));
    const float max_abs = reduce_max(biggest);
    const F to_level = splat(max_abs > 0.0f ? kLevelScale / max_abs : 0.0f);
    const F most = splat(kLevelScale), least = splat(-kLevelScale);
    for (int j = 0; j < kGemvXGroup; j += kW) {  // (+ the rounding of to_level: clamped)
      const F v = NF4LORA_MM(min_ps)(NF4LORA_MM(max_ps)(mul(load(x + j), to_level), least), most);
      store_vector<false>(out + j, NF4LORA_MM(cvtps_epi32)(v));
    }
    return max_abs;
  }
  // the fold factor of each lane of a Sum, from the step's factors (one per x scale group):
  // a step of one scale group folds every lane with the same factor
  static F fold(const float* factors) { return splat(factors[0]); }

  // fold[j] = (the constant of group j's block) * (x's scale of group j), j < groups.
  static void fold_factors(const float* block_scale, const float* x_scale, int64_t groups,
                           int64_t groups_per_block, float* fold) {
    int64_t j = 0;
    if (groups_per_block == 1)
      for (; j + kW <= groups; j += kW) store_out<float>(fold + j, mul(load(block_scale + j), load(x_scale + j)));
    for (; j < groups; ++j) fold[j] = mul_rn(block_scale[j / groups_per_block], x_scale[j]);
  }
};
// the int16 decoders' base (every ISA with an integer decoder)
using IntegerGemvDecoder = IntegerSums<int16_t, int(kGemvLevelScale)>;
// The int8 decoder (gemv_body.h with_decoder) is AVX512-VNNI's alone: a file that has one
// defines NF4LORA_GEMV_INT8 to 1 and its own kHasInt8Decoder and GemvInt8Decoder.
#if !defined(NF4LORA_GEMV_INT8) || !NF4LORA_GEMV_INT8
constexpr bool kHasInt8Decoder = false;
using GemvInt8Decoder = IntegerGemvDecoder;  // never used
#endif
