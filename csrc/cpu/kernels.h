// The CPU kernels' public C++ API: raw pointers and sizes, no torch types.
// The Python side (nf4lora/backends/cpu.py) validates dtypes, shapes and contiguity
// and allocates every output; these functions only check what would otherwise be
// undefined behaviour (null pointers, block sizes) and throw std::invalid_argument.
//
// Outputs of >= 4 MiB get madvise(MADV_HUGEPAGE) before the kernel writes them (a
// fresh torch.empty faults in page by page otherwise; see dispatch.cpp);
// NF4LORA_CPU_HUGEPAGES=0 turns that off.
// dequantize_4bit writes outputs of >= 16 MiB with non-temporal stores when `out` is
// 64-byte aligned (they would not stay in a 32 MiB L3 anyway; see dispatch.cpp);
// NF4LORA_CPU_STREAM=0 turns that off, =1 streams every aligned output.
//
// Layouts (all flat, row-major), n = number of elements, blocks = ceil(n / blocksize):
//   A / out      n elements of dtype (kF32 / kF16 / kBF16, see nf4_codec.h)
//   packed       ceil(n / 2) bytes, element 2j in the high nibble of byte j
//   absmax       blocks float32
//   q (8-bit)    n bytes, codes into a sorted 256-entry float32 `code`
// A 4-bit weight is a PackedWeight (csrc/weight.h): packed, its block constants (float32,
// or double-quantized and decoded on the fly), n, blocksize, and its format's code table.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "../weight.h"

namespace nf4lora {
namespace cpu {

// packed, absmax <- A, each element's code by `encoder` (any format: nf4_codec.h).
void quantize_4bit(const void* A, int dtype, int64_t n, int64_t blocksize,
                   const CodeEncoder& encoder, uint8_t* packed, float* absmax);

// out[weight.n] of out_dtype <- the weight's elements.
void dequantize_4bit(const PackedWeight& weight, void* out, int out_dtype);

void quantize_blockwise(const void* A, int dtype, const float* code, int64_t n,
                        int64_t blocksize, uint8_t* q, float* absmax);

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                          int64_t blocksize, void* out, int out_dtype);

// Fused small-M matmul (decode), the operands of csrc/weight.h LoraGemvArgs. K must be a
// multiple of the weight's blocksize, the blocksize a multiple of 32. Accumulates in
// float32; output bytes do not depend on the thread count.
void lora_gemv_4bit(const LoraGemvArgs& args);

// The weight's interleaved copy for lora_gemv_4bit (weight.h kInterleaved*: args.interleaved):
// out[interleaved_bytes(N, K)] <- weight [N, K]. Needs interleavable(K, blocksize).
void interleave_4bit(const PackedWeight& weight, int64_t N, int64_t K, uint8_t* out);

// Whether the active ISA has the kernel that reads an interleaved copy (AVX2, AVX-512);
// where it has not, lora_gemv_4bit reads the row layout and ignores args.interleaved.
bool has_interleaved_gemv();
// Whether a fused call with x of `dtype` reads the copy its weight brings (x finite, K and
// blocksize of 64): an ISA with the kernel, 16-bit x, NF4LORA_CPU_GEMV auto, integer or
// int8 (dispatch.cpp).
bool reads_interleaved(int dtype);

// lora_gemv_4bit for a mixed-adapter batch (weight.h AdapterRows; args.scaling unused):
// the same kernel and one pass over W; row m gets the bytes lora_gemv_4bit gives it on the
// same x with adapter index[m] on every row (a row without adapter: those of the matmul
// without LoRA).
void multi_lora_gemv_4bit(const LoraGemvArgs& args, const AdapterRows& adapters);

// Fused small-M grad-input (the backward of the matmul for x), csrc/weight.h
// GradInputArgs: reads W packed, never materializes it. Same requirements as
// lora_gemv_4bit (K a multiple of the blocksize, the blocksize of 32); float32 sums, one
// rounding to dtype; output bytes do not depend on the thread count.
void lora_grad_input_4bit(const GradInputArgs& args);

// The tile GEMMs for larger M (gemm_tiles.h): bf16 operands, W decoded into bf16 tiles in
// cache (never materialized) and multiplied with AMX (or its emulation), float32 sums
// rounded once to the output's dtype (bf16 or float32):
//   forward      y[M, N] = x[M, K] @ W^T      (a = x, out = y)
//   grad_input   dx[M, K] = grad[M, N] @ W    (a = grad, out = dx)
// K must be a multiple of the blocksize, the blocksize of 32. Output bytes do not depend
// on the thread count.
struct TileGemmArgs {
  const void* a = nullptr;  // x [M, K] or grad [M, N], bf16
  int64_t M = 0, N = 0, K = 0;
  PackedWeight weight;      // [N, K]
  void* out = nullptr;      // y [M, N] or dx [M, K]
  int out_dtype = kBF16;    // kBF16, or kF32 (the sums unrounded: the caller's GEMM dtype)
  bool grad_input = false;
};
void tile_gemm_4bit(const TileGemmArgs& args);
// Which tile GEMM bf16 calls of the matmul and its grad-input take (from M = 16 and past
// the fused kernel: nf4lora/backends/cpu.py): "amx" (AMX-BF16 CPU, tile state granted by
// the OS), "amx-emulated" (the same kernels, their tile instructions run in plain C++:
// tests only), or "" (none: the fused kernel, and dequantize + torch's GEMM past it).
// NF4LORA_CPU_GEMM=auto|amx|amx-emulated|dequantize (read at every call) picks; auto is
// "" until the AMX kernel has been measured against oneDNN's AMX GEMM (dispatch.cpp).
std::string tile_gemm();
// Whether this CPU can run AMX-BF16 tile instructions in this process (CPU flags and the
// OS's permission for the tile state).
bool has_amx();

// True when this CPU has native instructions for GEMMs in `dtype` (kBF16:
// AVX512-BF16 or AMX-BF16; kF16: AVX512-FP16; float32 always). Without them torch's
// 16-bit CPU matmuls run several times slower than float32 ones.
bool native_16bit_gemm(int dtype);

// ISA selection. The active path is the best one this CPU supports, unless the
// environment variable NF4LORA_CPU_ISA (read at every call) names another supported
// one: "scalar", "avx2" or "avx512". Naming an unsupported or unknown one throws.
std::string active_isa();

// The fused GEMV's decoder for M rows of x of dtype on the active path, as the next call
// with finite x picks it: "integer" (int16 levels, exact int32 sums), "bf16" (weights as
// bf16, vdpbf16ps) or "float" (float32 weights and FMAs). NF4LORA_CPU_GEMV=auto|integer|
// float (read at every call) overrides the measured default (dispatch.cpp).
std::string gemv_decoder(int64_t M, int dtype);
std::vector<std::string> supported_isas();  // best last, always starts with "scalar"

// OpenMP threads used by the kernels: set_num_threads(k > 0) fixes it, 0 restores the
// default (omp_get_max_threads(), which follows torch.set_num_threads / OMP_NUM_THREADS).
int num_threads();
void set_num_threads(int k);

}  // namespace cpu
}  // namespace nf4lora
