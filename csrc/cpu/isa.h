// Internal interface between the dispatcher (dispatch.cpp) and the per-ISA kernel
// translation units (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp). Every ISA TU
// compiles the same kernel templates (kernel_body.h, gemv_body.h) against its own vector
// primitives (AVX2 and AVX-512: mostly the shared simd_body.h) and exports one table of
// entry points. Each entry point processes the
// quantization blocks [b0, b1); the dispatcher splits blocks across OpenMP threads.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <numeric>

#include <type_traits>

#include "../nf4_codec.h"
#include "kernels.h"
#include "tiles.h"

namespace nf4lora {
namespace cpu {

// 16-bit storage types: distinct types so templates can tell bf16 from fp16.
struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bf16_bits_to_float(x.bits); }
inline float to_float(fp16 x) { return fp16_bits_to_float(x.bits); }

template <class T> T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) { return bf16{float_to_bf16_bits(x)}; }
template <> inline fp16 from_float<fp16>(float x) { return fp16{float_to_fp16_bits(x)}; }

// The integer GEMV decoders (gemv_body.h) multiply integers: the 16 levels of the weight's
// code table times a level scale, rounded (codebook.check_code keeps every level within
// [-1, 1]), and x per group of kGemvXGroup elements times that scale / max |x|, rounded.
// int16 (kGemvLevelScale, the default): 16383^2 * 8 < 2^31, so eight products per int32
// lane (a step of 64 in AVX2's 8 lanes, of 128 in AVX-512's 16) cannot overflow. int8
// (kGemvInt8LevelScale, opt-in NF4LORA_CPU_GEMV=int8, AVX512-VNNI vpdpbusd: see
// isa_avx512.cpp GemvInt8Decoder for its bound).
constexpr float kGemvLevelScale = 16383.0f;
// The interleaved GEMV's W levels (gemv_interleaved.h: a lane sums 64 / 16 columns between
// folds, so its levels are smaller; x keeps kGemvLevelScale), for bf16 / fp16 x.
constexpr float kInterleavedLevelScaleBf16 = 2047.0f;
constexpr float kInterleavedLevelScaleFp16 = 8191.0f;
constexpr float kGemvInt8LevelScale = 127.0f;
template <class Level>
inline void integer_levels(const CodeTable& table, float scale, Level* out) {
  for (int c = 0; c < 16; ++c) {
    // A level beyond [-1, 1] (only a hand-made KernelCodec has one) saturates rather than
    // wraps. Compares, not fminf/fmaxf: those were libm calls here, 1.5% of an M = 1
    // 4096x4096 GEMV, which builds its decoder once per 16 rows of W.
    const float level = table.level[c] * scale;
    const float kept = level > scale ? scale : level < -scale ? -scale : level;
    out[c] = static_cast<Level>(lrintf(kept));
  }
}
inline void int16_levels(const CodeTable& table, int16_t* out) {
  integer_levels(table, kGemvLevelScale, out);
}

struct Quant4Args {
  const void* A; int dtype; int64_t n; int64_t blocksize; CodeEncoder encoder;
  uint8_t* packed; float* absmax;
};
struct Dequant4Args {
  PackedWeight weight; void* out; int out_dtype;
  bool stream;  // non-temporal output stores; out and every block start 64-byte aligned
};
struct Quant8Args {
  const void* A; int dtype; const float* code; int64_t n; int64_t blocksize;
  uint8_t* q; float* absmax;
};
struct Dequant8Args {
  const uint8_t* q; const float* absmax; const float* code; int64_t n; int64_t blocksize;
  void* out; int out_dtype;
};

// The fused small-M matmul (gemv_body.h): its operands plus the float32 workspaces the
// dispatcher allocates, [M, K], [M, K] (only with LoRA), [M, rank] and [M, K / 64] (the
// activation scales of the integer decoders), the dispatcher's choice of decoder
// (sums: float, the ISA's int16 integer decoder, or its int8 one; dispatch.cpp
// gemv_sums), and
// which adapter each row of x uses (weight.h AdapterRows). One adapter is the case of
// adapter_index null: adapter 0, `scaling`, for every row; a mixed batch
// (multi_lora_gemv_4bit) gives row m adapter_index[m] (-1: none), its rows of the stacked
// lora_A [adapters, rank, K] and lora_B [adapters, N, rank], and scalings[adapter_index[m]].
constexpr int64_t kGemvXGroup = 64;  // elements of x per activation scale (integer decoders)
// Which sums the fused GEMV computes: float (every ISA), exact int32 sums of int16 levels
// (avx2, avx512, avx512bf16), or of int8 levels (avx512bf16 only, opt-in). An ISA or a
// blocksize without the chosen integer decoder runs the next one down (gemv_body.h
// with_decoder: int8 -> int16 -> float).
enum class GemvSums : uint8_t { kFloat, kInt16, kInt8 };
struct GemvWork : LoraGemvArgs {
  float* x_paired; float* x_natural; float* h_scaled; float* x_scales; GemvSums sums;
  const int64_t* adapter_index = nullptr;  // [M] in [-1, adapters), or null
  const float* scalings = nullptr;         // [adapters] (with adapter_index)

  int64_t adapter(int64_t m) const { return adapter_index != nullptr ? adapter_index[m] : 0; }
  float scaling_of(int64_t adapter) const { return scalings != nullptr ? scalings[adapter] : scaling; }
};

// The fused grad-input (gemv_body.h grad_input_panel): its operands, grad and grad_h as
// float32 copies ([M, N], [M, rank]), and the panel width (columns of W per work item, a
// multiple of the blocksize). Each call of the entry gets 2 * M * panel floats of scratch.
constexpr int64_t kGradPanelMaxBlocks = 128;  // blocks per panel at most (a stack array)
struct GradInputWork : GradInputArgs {
  const float* grad_f; const float* grad_h_f; int64_t panel;
};

// The tile GEMMs (gemm_tiles.h): their operands, `a` repacked into tiles of 16 rows
// (a_tiles of them; dispatch.cpp), and how W is cut. A work item is a panel of W: forward,
// kTilePanelRows rows of W (columns of y), decoded `chunk` columns per pass; grad-input,
// `panel` columns of W (of dx), decoded `chunk` rows per pass. Each work item gets
// tile_scratch_bytes of scratch: the decoded chunk (grad-input: also as pairs), then the
// panel's float32 sums.
constexpr int64_t kTilePanelRows = 128;
constexpr int64_t kTileWPad = 32;  // elements past a decoded row of the forward (gemm_tiles.h)
struct TileGemmWork : TileGemmArgs {
  // forward: x as bf16 pairs, [a_tiles][K / 2][16] uint32; grad-input: grad's rows, [a_tiles *
  // 16][a_stride] bf16; zero past M (and past N)
  const void* a_repacked; int64_t a_tiles; int64_t a_stride;
  int64_t chunk; int64_t panel;
};
inline int64_t tile_w_stride(const TileGemmWork& a) { return a.chunk + kTileWPad; }  // forward
inline int64_t tile_sums_offset(const TileGemmWork& a) {  // bytes of the decoded chunk
  const int64_t elements = a.grad_input ? 2 * a.chunk * a.panel : a.panel * tile_w_stride(a);
  return elements * int64_t(sizeof(bf16));
}
inline int64_t tile_scratch_bytes(const TileGemmWork& a) {
  return tile_sums_offset(a) + a.a_tiles * kTileRows * a.panel * int64_t(sizeof(float));
}
using TileGemmPanel = void (*)(const TileGemmWork&, int64_t panel, uint8_t* scratch);

// The fused GEMV's phases: per row m of x; over rows (or tiles) [i0, i1) of W.
using GemvXPhase = void (*)(const GemvWork&, int64_t m);
using GemvWPhase = void (*)(const GemvWork&, int64_t i0, int64_t i1);
struct IsaKernels {
  const char* name;
  void (*quantize_4bit)(const Quant4Args&, int64_t b0, int64_t b1);
  void (*dequantize_4bit)(const Dequant4Args&, int64_t b0, int64_t b1);
  void (*quantize_blockwise)(const Quant8Args&, int64_t b0, int64_t b1);
  void (*dequantize_blockwise)(const Dequant8Args&, int64_t b0, int64_t b1);
  // the three phases of lora_gemv_4bit: per row m of x; per element (m, j) of h; rows of y
  void (*gemv_prepare)(const GemvWork&, int64_t m);
  void (*gemv_lora_h)(const GemvWork&, int64_t m, int64_t j);
  void (*gemv_rows)(const GemvWork&, int64_t n0, int64_t n1);
  // the same phases 1 and 3 on the weight's interleaved copy (gemv_interleaved.h; null
  // where the ISA has none): per row m of x; tiles [t0, t1) of 16 rows of W
  GemvXPhase gemv_interleaved_prepare;
  GemvWPhase gemv_interleaved_tiles;
  // dx[:, c0:c1] of the fused grad-input (c0, c1 on block boundaries)
  void (*grad_input_panel)(const GradInputWork&, int64_t c0, int64_t c1, float* scratch);
  // one panel of the tile GEMM, its tile operations emulated (every ISA) or AMX (null
  // where the ISA's translation unit holds no AMX code)
  TileGemmPanel gemm_tiles_emulated;
  TileGemmPanel gemm_tiles_amx;
};

// Defines nf4lora::cpu::<ns>::kernels(), the table of the entry points that kernel_body.h
// and gemv_body.h define in namespace <ns>. Expand it OUTSIDE any `#pragma GCC target`
// region: the dispatcher calls it before it knows which ISA the CPU has.
#define NF4LORA_DEFINE_KERNELS(ns, name)                                                  \
  namespace nf4lora::cpu::ns {                                                           \
  const IsaKernels& kernels() {                                                          \
    static const IsaKernels k{name, &quantize_4bit_entry, &dequantize_4bit_entry,        \
                              &quantize_blockwise_entry, &dequantize_blockwise_entry,    \
                              &gemv_prepare_entry, &gemv_lora_h_entry, &gemv_rows_entry,  \
                              kGemvInterleavedPrepare, kGemvInterleavedTiles,             \
                              &grad_input_panel_entry,                                    \
                              &gemm_tiles_emulated_entry, kGemmTilesAmx};                 \
    return k;                                                                            \
  }                                                                                      \
  }

namespace scalar { const IsaKernels& kernels(); }
namespace avx2 { const IsaKernels& kernels(); }
namespace avx512 { const IsaKernels& kernels(); }
namespace avx512bf16 { const IsaKernels& kernels(); }

}  // namespace cpu
}  // namespace nf4lora
