// kernel_body.h: the ONE implementation of each CPU op, shared by every ISA.
//
// NOT a normal header (no include guard, on purpose): each ISA translation unit
// (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp) includes it once, inside its own
// namespace nf4lora::cpu::<isa> and, for the SIMD ones, inside a
// `#pragma GCC target(...)` region, after defining these primitives:
//
//   kW                          floats per vector (1, 8 or 16)
//   F, I                        float vector, int32 vector
//   load(const In*)             kW elements of float / bf16 / fp16 -> F (exact)
//   AbsMax{add(F), result()}    max |x| over the added vectors; NaN if any lane was NaN
//   splat(float), mul(F, F)     broadcast; IEEE multiply (never fused)
//   Encoder(CodeEncoder)(F) -> I  4-bit codes of scaled values (any format: nf4_codec.h)
//   store_packed(u8*, I, I)     2*kW codes (first vector first) -> kW packed bytes
//   Levels, load_levels(CodeTable)  a weight's 16 levels as the decoders read them
//   Decoder<Out, kStream>(levels, scale)  kStep elements from kStep/2 packed bytes,
//                               level*scale, rounded once to Out (float / bf16 / fp16);
//                               kStream: with non-temporal stores (kStep * sizeof(Out)
//                               bytes, aligned to that when the block start is 64-aligned)
//   store_fence()               orders the streaming stores before what follows
//   DynEncoder(code)(F) -> I    dynamic 8-bit codes (binary search + midpoints)
//   store_bytes(u8*, I)         kW codes -> kW bytes
//   Decoder8<Out>(code, scale)  kStep elements: code[q] * scale rounded to Out
//
// The loops here are the whole algorithm; the primitives are the per-ISA vocabulary
// (AVX2 and AVX-512 share most of theirs: simd_body.h). Everything a primitive cannot
// cover (the tail of a partial last block, an odd element count) goes through the scalar
// codec in nf4_codec.h, which is the same arithmetic, so every path gives the same bytes.
//
// Each entry point processes quantization blocks [b0, b1); blocks are independent, so
// any split across threads gives identical output.

inline int64_t block_length(int64_t block, int64_t blocksize, int64_t n) {
  const int64_t left = n - block * blocksize;
  return left < blocksize ? left : blocksize;
}

// max(|m|, |x|) that keeps a NaN once seen; m is a running max of magnitudes.
inline float nan_max_abs(float m, float x) { return nan_max(m, abs_f(x)); }

template <class In>
inline float block_absmax(const In* x, int64_t len) {
  AbsMax vmax;
  int64_t i = 0;
  for (; i + kW <= len; i += kW) vmax.add(load(x + i));
  float m = vmax.result();
  for (; i < len; ++i) m = nan_max_abs(m, to_float(x[i]));
  return m;
}

// ---- 4-bit quantize: absmax, scaled = x * (1 / absmax), encode, pack. -------------
template <class In>
void quantize_4bit_impl(const Quant4Args& args, int64_t b0, int64_t b1) {
  const In* A = static_cast<const In*>(args.A);
  const CodeEncoder code_encoder = args.encoder;  // a local: the stores cannot alias it
  const Encoder encode(code_encoder);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * args.blocksize;  // even: blocksize is even
    const int64_t len = block_length(b, args.blocksize, args.n);
    const In* x = A + begin;
    uint8_t* out = args.packed + begin / 2;

    const float absmax = block_absmax(x, len);
    args.absmax[b] = absmax;
    // IEEE reciprocal, then a multiply per element (the reference and bitsandbytes'
    // kernel do the same; x / absmax would round differently). An all-zero block has
    // reciprocal inf and scaled 0 * inf = NaN, which every encoder maps to code 0.
    const float r = div_rn(1.0f, absmax);
    const F rv = splat(r);

    int64_t i = 0;
    for (; i + 2 * kW <= len; i += 2 * kW)
      store_packed(out + i / 2, encode(mul(load(x + i), rv)), encode(mul(load(x + i + kW), rv)));
    for (; i < len; i += 2) {
      const float first = mul_rn(to_float(x[i]), r);
      // Odd n: the last byte's low nibble encodes a padding 0.0 with this block's scale.
      const float second = (i + 1 < len) ? mul_rn(to_float(x[i + 1]), r) : mul_rn(0.0f, r);
      out[i / 2] = pack_nibbles(encode_4bit(code_encoder, first), encode_4bit(code_encoder, second));
    }
  }
}

// ---- 4-bit dequantize: level[code] * absmax, rounded once to Out. -----------------
// With double quantization each block's absmax is decoded here, once, from its 8-bit
// code (two float32 roundings, as reference.dequantize_absmax); no absmax array.
// kStream: the decoder writes with non-temporal stores (args.stream, see dispatch.cpp).
// `out` receives block b0's first element (the tile GEMM decodes a row's run of blocks
// into its own buffer: gemm_tiles.h).
template <class Out, bool kStream>
void dequantize_4bit_blocks(const PackedWeight& weight, int64_t b0, int64_t b1, Out* const out) {
  // Locals, not weight fields: the vector stores may alias anything, so the compiler would
  // reload every field once per block.
  const uint8_t* const packed = weight.packed;
  const float* const absmax = weight.absmax;
  const NestedAbsmax nested = weight.nested;
  const bool has_nested = weight.is_nested();
  const int64_t n = weight.n, blocksize = weight.blocksize;
  const CodeTable table = weight.table;
  const Levels levels = load_levels(table);  // once per call, not per block
  using Decode = Decoder<Out, kStream>;
  constexpr int kStep = Decode::kStep;
  for (int64_t b = b0; b < b1;) {
    // One nested group (one absmax2 value) at a time: no 64-bit division per block.
    int64_t end = b1;
    float absmax2 = 0.0f;
    if (has_nested) {
      const int64_t g = b / nested.blocksize;
      absmax2 = nested.absmax2[g];
      if ((g + 1) * nested.blocksize < end) end = (g + 1) * nested.blocksize;
    }
    for (; b < end; ++b) {
      const float scale =
          has_nested ? decode_nested_absmax(nested.code2, nested.q[b], absmax2, nested.offset)
                     : absmax[b];
      const int64_t begin = b * blocksize;
      const int64_t len = block_length(b, blocksize, n);
      const uint8_t* p = packed + begin / 2;
      Out* o = out + (begin - b0 * blocksize);

      const Decode decode(levels, scale);
      int64_t i = 0;
      for (; i + kStep <= len; i += kStep) decode(p + i / 2, o + i);
      for (; i < len; ++i)
        o[i] = from_float<Out>(mul_rn(decode_4bit(table, unpack_code(p, i)), scale));
    }
  }
}

template <class Out>
void dequantize_4bit_impl(const Dequant4Args& args, int64_t b0, int64_t b1) {
  Out* const out = static_cast<Out*>(args.out) + b0 * args.weight.blocksize;
  if (args.stream) {
    dequantize_4bit_blocks<Out, true>(args.weight, b0, b1, out);
    store_fence();  // streaming stores are weakly ordered: drain them before returning
  } else {
    dequantize_4bit_blocks<Out, false>(args.weight, b0, b1, out);
  }
}

// ---- 8-bit blockwise quantize with a sorted 256-entry code (the dynamic map). ------
template <class In>
void quantize_blockwise_impl(const Quant8Args& args, int64_t b0, int64_t b1) {
  const In* A = static_cast<const In*>(args.A);
  const DynEncoder encode(args.code);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * args.blocksize;
    const int64_t len = block_length(b, args.blocksize, args.n);
    const In* x = A + begin;
    uint8_t* q = args.q + begin;

    const float absmax = block_absmax(x, len);
    args.absmax[b] = absmax;
    const float r = div_rn(1.0f, absmax);
    const F rv = splat(r);

    int64_t i = 0;
    for (; i + kW <= len; i += kW) store_bytes(q + i, encode(mul(load(x + i), rv)));
    for (; i < len; ++i) q[i] = (uint8_t)encode_dynamic(args.code, mul_rn(to_float(x[i]), r));
  }
}

// ---- 8-bit blockwise dequantize: code[q] * absmax, rounded once to Out. -----------
template <class Out>
void dequantize_blockwise_impl(const Dequant8Args& args, int64_t b0, int64_t b1) {
  Out* out = static_cast<Out*>(args.out);
  for (int64_t b = b0; b < b1; ++b) {
    const float scale = args.absmax[b];
    const int64_t begin = b * args.blocksize;
    const int64_t len = block_length(b, args.blocksize, args.n);
    const uint8_t* q = args.q + begin;
    Out* o = out + begin;

    const Decoder8<Out> decode(args.code, scale);
    constexpr int kStep = Decoder8<Out>::kStep;
    int64_t i = 0;
    for (; i + kStep <= len; i += kStep) decode(q + i, o + i);
    for (; i < len; ++i) o[i] = from_float<Out>(mul_rn(args.code[q[i]], scale));
  }
}

// ---- Entry points: pick the template instance for the dtype (the format is data). ---
// fn(float{}), fn(fp16{}) or fn(bf16{}) for a dtype id the dispatcher has checked.
template <class Fn>
void with_dtype(int dtype, Fn fn) {
  switch (dtype) {
    case kF32: return fn(float{});
    case kF16: return fn(fp16{});
    default: return fn(bf16{});
  }
}

void quantize_4bit_entry(const Quant4Args& a, int64_t b0, int64_t b1) {
  with_dtype(a.dtype, [&](auto in) { quantize_4bit_impl<decltype(in)>(a, b0, b1); });
}

void dequantize_4bit_entry(const Dequant4Args& a, int64_t b0, int64_t b1) {
  with_dtype(a.out_dtype, [&](auto out) { dequantize_4bit_impl<decltype(out)>(a, b0, b1); });
}

void quantize_blockwise_entry(const Quant8Args& a, int64_t b0, int64_t b1) {
  with_dtype(a.dtype, [&](auto in) { quantize_blockwise_impl<decltype(in)>(a, b0, b1); });
}

void dequantize_blockwise_entry(const Dequant8Args& a, int64_t b0, int64_t b1) {
  with_dtype(a.out_dtype, [&](auto out) { dequantize_blockwise_impl<decltype(out)>(a, b0, b1); });
}
