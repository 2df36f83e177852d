// weight.h: a packed 4-bit weight, and the fused matmul's operands, as every native kernel
// takes them. PackedWeight is the C++ twin of nf4lora/_weight.py's PackedWeight: plain
// pointers and sizes, usable on host and device. The CPU kernels (csrc/cpu), the CUDA
// kernels (csrc/cuda) and their CPU replay (csrc/cuda_host) take these structs; the one
// place that builds them from the Python objects is csrc/bindings_common.h.
#pragma once

#include <stdint.h>

#include "nf4_codec.h"

namespace nf4lora {

// The names Python gives the ids of nf4_codec.h's DType, in id order (torch.<name>). The
// bindings map names to ids with these (and export them as DTYPE_IDS); Python never spells
// an id. Formats have no ids: a weight carries its code table as data (CodeTable).
constexpr const char* kDTypeNames[] = {"float32", "float16", "bfloat16"};
constexpr int kNumDTypes = sizeof(kDTypeNames) / sizeof(kDTypeNames[0]);

// Double quantization of the block constants (nf4_codec.h decode_nested_absmax):
//   absmax[b] = code2[q[b]] * absmax2[b / blocksize] + offset     (two float32 roundings)
// In Python: q is PackedWeight.absmax (uint8 when nested), absmax2 nested.absmax, code2
// nested.code.
struct NestedAbsmax {
  const uint8_t* q = nullptr;      // [blocks] 8-bit codes of absmax - offset
  const float* absmax2 = nullptr;  // [ceil(blocks / blocksize)]
  const float* code2 = nullptr;    // [256] the dynamic map
  float offset = 0.0f;
  int64_t blocksize = 256;
};

// The 4-bit codes of n elements in blocks of `blocksize`, each block with one constant.
struct PackedWeight {
  const uint8_t* packed = nullptr;  // [ceil(n / 2)], element 2j in the high nibble of byte j
  const float* absmax = nullptr;    // [blocks] float32 block constants; null when nested
  NestedAbsmax nested;              // the block constants when nested.q is not null
  int64_t n = 0;                    // elements (a matmul weight [N, K]: N * K)
  int64_t blocksize = 64;
  CodeTable table = {};             // the format's 16 levels: element = level[code] * constant

  NF4_HD bool is_nested() const { return nested.q != nullptr; }
  NF4_HD int64_t blocks() const { return (n + blocksize - 1) / blocksize; }
  // Block b's constant, one at a time (the vectorized kernels decode runs of them).
  NF4_HD float constant(int64_t b) const {
    return !is_nested() ? absmax[b]
                        : decode_nested_absmax(nested.code2, nested.q[b], nested.absmax2[b / nested.blocksize],
                                               nested.offset);
  }
};

// The CPU kernels' row-interleaved copy of a matmul weight [N, K] (nf4lora.backends.cpu
// interleave_4bit; built once per weight, for repeated small-M calls: an eval-mode
// Linear4bit). The bitsandbytes-format bytes above stay the weight; this is a cache the
// fused GEMV reads instead, where one vector lane is one row of W (csrc/cpu/gemv_body.h
// "interleaved"). Tiles of kInterleavedRows rows (the last one padded with rows of code 0
// and constant 0), each cut into groups of kInterleavedColumns columns, stored group
// after group (one sequential stream per tile):
//   8 chunks of 64 bytes: 32 16-bit words; word 2j + h of chunk c holds, in bits 4s..4s+3,
//     the code of row j, column 64 g + 8 c + 2 s + h (s = 0..3)
//   16 float32: the block constant of each row at that group (double quantization decoded
//     by the spec's rule, nf4_codec.h decode_nested_absmax: the same float32 the row
//     layout's kernels compute)
// Needs K a multiple of 64 and blocksize a multiple of 64 (one constant per group).
// Why float32 constants (+12.5% over the codes; the format's u8 codes are +1.6%): the
// kernel would have to do the nested lookup per group, 16 lanes of a 256-entry table.
// Measured, one Zen 4 thread, 4096x4096 M = 1, W streamed, against this layout: the
// bytes alone (u8 codes in a second stream, no lookup: wrong values) 0.90x the time, so
// at most 10% to win; with vgatherdps (~20 TSC ticks each here) for code2 1.25x, for
// code2 and absmax2 1.78x; code2 by VBMI byte planes (vpermt2b, 64 constants per 4
// groups) 0.96x streamed but 1.09x in cache, and 1.24x with absmax2 added (registers).
constexpr int64_t kInterleavedRows = 16;
constexpr int64_t kInterleavedColumns = 64;
constexpr int64_t kInterleavedChunks = kInterleavedColumns / 8;  // of 8 columns x 16 rows
constexpr int64_t kInterleavedGroupBytes =
    kInterleavedRows * kInterleavedColumns / 2 + kInterleavedRows * int64_t(sizeof(float));
NF4_HD int64_t interleaved_tiles(int64_t N) { return (N + kInterleavedRows - 1) / kInterleavedRows; }
NF4_HD int64_t interleaved_bytes(int64_t N, int64_t K) {
  return interleaved_tiles(N) * (K / kInterleavedColumns) * kInterleavedGroupBytes;
}
NF4_HD bool interleavable(int64_t K, int64_t blocksize) {
  return K % kInterleavedColumns == 0 && blocksize % kInterleavedColumns == 0;
}

// The fused small-M matmul (decode), the same operands on CPU and CUDA:
//   y = x @ W^T + (scaling * h) @ lora_B^T + bias        h = x @ lora_A^T
// x, lora_A, lora_B, bias, y and h are all of `dtype`; W is `weight`, [N, K].
struct LoraGemvArgs {
  const void* x = nullptr;       // [M, K]
  int dtype = kBF16;
  int64_t M = 0, N = 0, K = 0;
  PackedWeight weight;           // weight.n == N * K
  const void* lora_A = nullptr;  // [rank, K]
  const void* lora_B = nullptr;  // [N, rank]
  int64_t rank = 0;              // 0: no LoRA (lora_A, lora_B and h unused)
  float scaling = 1.0f;
  const void* bias = nullptr;    // [N], or null
  void* y = nullptr;             // [M, N]
  void* h = nullptr;             // [M, rank], rounded to dtype (what backward saves)
  // CPU only: the weight's interleaved copy (interleaved_bytes(N, K)), or null. The CPU
  // dispatcher reads it where its kernel runs (dispatch.cpp), the row layout otherwise.
  const uint8_t* interleaved = nullptr;
};

// A mixed-adapter batch (nf4lora.multi_lora_matmul_4bit): `count` adapters stacked, so that
// LoraGemvArgs::lora_A is [count, rank, K] and lora_B [count, N, rank], and row m of x uses
// adapter index[m] with scaling scalings[index[m]] (LoraGemvArgs::scaling unused), or none
// where index[m] is -1 (its h row 0, its y the matmul's without LoRA).
struct AdapterRows {
  const int64_t* index = nullptr;   // [M], each in [-1, count)
  const float* scalings = nullptr;  // [count]
  int64_t count = 0;
};

// The backward's grad-input for small M (CPU: csrc/cpu/gemv_body.h grad_input):
//   dx = grad @ W + grad_h @ lora_A
// grad [M, N], grad_h [M, rank], lora_A [rank, K] and dx [M, K] all of `dtype`; W is
// `weight`, [N, K].
struct GradInputArgs {
  const void* grad = nullptr;    // [M, N]
  int dtype = kBF16;
  int64_t M = 0, N = 0, K = 0;
  PackedWeight weight;           // weight.n == N * K
  const void* lora_A = nullptr;  // [rank, K]
  const void* grad_h = nullptr;  // [M, rank]
  int64_t rank = 0;              // 0: no LoRA term (lora_A, grad_h unused)
  void* dx = nullptr;            // [M, K]
};

}  // namespace nf4lora
