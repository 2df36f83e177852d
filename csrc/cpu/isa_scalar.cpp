// Scalar path: the kernel templates with one element per "vector", every primitive a
// direct call of the per-element codec in nf4_codec.h. It is the fallback on CPUs
// without AVX2 and, in the tests, an independent check of the SIMD primitives
// (NF4LORA_CPU_ISA=scalar). Built for baseline x86-64 (the compiler may still use SSE2).
#include <string.h>

#include "isa.h"

namespace nf4lora::cpu::scalar {

constexpr int kW = 1;
using F = float;
using I = int;

inline F load(const float* p) { return *p; }
inline F load(const bf16* p) { return to_float(*p); }
inline F load(const fp16* p) { return to_float(*p); }

struct AbsMax {
  float m = 0.0f;
  bool nan = false;
  void add(F x) {
    nan = nan || is_nan(x);
    const float a = abs_f(x);
    m = a > m ? a : m;
  }
  float result() const { return nan ? bits_float(0x7fc00000u) : m; }
};

inline F splat(float x) { return x; }
inline F mul(F a, F b) { return mul_rn(a, b); }
inline F add(F a, F b) { return add_rn(a, b); }
inline F fmadd(F a, F b, F c) { return add_rn(mul_rn(a, b), c); }  // two roundings here
inline float hsum(F x) { return x; }
template <class Out>
inline void store_out(Out* o, F x) { *o = from_float<Out>(x); }

struct Encoder {
  CodeEncoder code;
  explicit Encoder(const CodeEncoder& e) : code(e) {}
  I operator()(F x) const { return encode_4bit(code, x); }
};

inline void store_packed(uint8_t* out, I first, I second) { *out = pack_nibbles(first, second); }

using Levels = const float*;  // the 16 levels of the weight's code table
inline Levels load_levels(const CodeTable& table) { return table.level; }

template <class Out, bool kStream>  // plain stores only
struct Decoder {
  static constexpr int kStep = 2;  // one packed byte
  Levels levels;
  float scale;
  Decoder(Levels l, float s) : levels(l), scale(s) {}
  void operator()(const uint8_t* p, Out* o) const {
    o[0] = from_float<Out>(mul_rn(levels[unpack_first(*p)], scale));
    o[1] = from_float<Out>(mul_rn(levels[unpack_second(*p)], scale));
  }
};

inline void store_fence() {}

struct DynEncoder {
  const float* code;
  explicit DynEncoder(const float* c) : code(c) {}
  I operator()(F x) const { return encode_dynamic(code, x); }
};

inline void store_bytes(uint8_t* q, I v) { *q = (uint8_t)v; }

template <class Out>
struct Decoder8 {
  static constexpr int kStep = 1;
  const float* code;
  float scale;
  Decoder8(const float* c, float s) : code(c), scale(s) {}
  void operator()(const uint8_t* q, Out* o) const { *o = from_float<Out>(mul_rn(code[*q], scale)); }
};

// gemv_body.h: the constants of w's blocks [b0, b0 + count) (simd_body.h's, one at a time).
inline void block_constants(const PackedWeight& w, int64_t b0, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = w.constant(b0 + i);
}

// gemv_body.h: four packed bytes -> their eight weights, in element order. Eight
// "vectors" of one float, so the sums split into as many independent chains as AVX2's
// 8 lanes (one chain of K products was 8x torch's float32 error at K = 1088).
constexpr int kGemvAccumulators = 64;
struct GemvDecoder {
  static constexpr int kGroup = 8, kVectors = 8;
  static constexpr bool kIntegerSums = false;
  using X = float;
  using Weights = F;
  using Table = F;  // the block constant
  template <class In> static X to_x(In v) { return to_float(v); }
  static int source(int j) { return j; }
  float values[16];  // the weight's levels
  explicit GemvDecoder(const CodeTable& table) { memcpy(values, table.level, sizeof(values)); }
  Table table(float scale) const { return scale; }
  void operator()(const Table& scale, const uint8_t* p, F* w) const {
    for (int i = 0; i < 4; ++i) {
      w[2 * i] = mul_rn(values[unpack_first(p[i])], scale);
      w[2 * i + 1] = mul_rn(values[unpack_second(p[i])], scale);
    }
  }
  static F madd(F w, const X* x, F acc) { return fmadd(w, load(x), acc); }
};
template <class T> struct GemvDecoderFor { using type = GemvDecoder; };
constexpr bool kHasIntegerDecoder = false;
using GemvIntegerDecoder = GemvDecoder;  // never used
constexpr bool kHasInt8Decoder = false;
using GemvInt8Decoder = GemvDecoder;  // never used

#include "kernel_body.h"
#include "gemv_body.h"
#include "gemm_tiles.h"

}  // namespace nf4lora::cpu::scalar

NF4LORA_DEFINE_KERNELS(scalar, "scalar")
