// launch.h: the C++ API of nf4lora._C_cuda's kernels, with no CUDA or torch types, so
// bindings_cuda.cpp compiles with the plain host compiler. Two implementations: the CUDA
// launchers (codec_kernels.cu, gemv_kernel.cu), and the CPU replay of the same kernels
// (csrc/cuda_host/host_driver.cpp), which tests/test_cuda_host.py links with the same
// bindings_cuda.cpp. Pointers are device addresses; `stream` is a cudaStream_t passed as
// void* (0 = the legacy default stream). Each call validates its arguments
// (std::invalid_argument), launches asynchronously on `stream` and reports a launch error
// as std::runtime_error.
//
// Layouts as csrc/cpu/kernels.h; dtype ids from nf4_codec.h (0 f32, 1 f16, 2 bf16); the
// 4-bit weight and the GEMV operands are the structs of csrc/weight.h.
#pragma once

#include <stdint.h>

#include <string>

#include "../weight.h"

namespace nf4lora {
namespace cuda {

// packed[ceil(n/2)], absmax[ceil(n/blocksize)] <- A[n]; blocksize even; each element's
// code by `encoder` (any format: nf4_codec.h).
void quantize_4bit(const void* A, int dtype, int64_t n, int64_t blocksize,
                   const CodeEncoder& encoder, uint8_t* packed, float* absmax, void* stream);

// q[n], absmax[ceil(n/blocksize)] <- A[n], with a sorted 256-entry float32 code.
void quantize_blockwise(const void* A, int dtype, const float* code, int64_t n,
                        int64_t blocksize, uint8_t* q, float* absmax, void* stream);

// out[weight.n] <- the weight's elements; nested block constants are decoded in the
// kernel. weight.blocksize: a power of two >= 32 (bitsandbytes' 32..4096).
void dequantize_4bit(const PackedWeight& weight, void* out, int out_dtype, void* stream);

// out[n] <- code[q] * absmax[i / blocksize].
void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                          int64_t blocksize, void* out, int out_dtype, void* stream);

// The fused GEMV (weight.h LoraGemvArgs) for 1 <= M <= 8 rows of x, all operands float16
// or all bfloat16. `workspace`: gemv_workspace_bytes(M, rank) bytes of device memory
// (unused and may be null when rank == 0); the call zeroes its first 8 bytes on `stream`
// before the launch. h comes from the same sums as the LoRA term of y.
void gemv_4bit_lora(const LoraGemvArgs& args, void* workspace, void* stream);

// The same kernel for a mixed-adapter batch (weight.h AdapterRows): args.lora_A [count,
// rank, K] and args.lora_B [count, N, rank] stacked, row m with adapter adapters.index[m]
// (-1: none; every index must lie in [-1, count): the kernel reads the adapter it names)
// scaled by adapters.scalings[index]; args.scaling unused. h[m] is row m's own x @ A_i^T
// (0 where -1). Row m gets the bytes gemv_4bit_lora gives it with adapter index[m] alone.
// `workspace`: gemv_workspace_bytes(M, rank), as there.
void multi_lora_gemv_4bit(const LoraGemvArgs& args, const AdapterRows& adapters, void* workspace,
                          void* stream);

// Bytes of GEMV workspace: 2 int32 counters, then M * rank float32 (scaling * x @ A^T).
inline int64_t gemv_workspace_bytes(int64_t M, int64_t rank) {
  return rank > 0 ? 8 + 4 * M * rank : 0;
}

// "ok: N device(s)" or the CUDA runtime's error (no driver, no device, ...).
std::string runtime_status();

}  // namespace cuda
}  // namespace nf4lora
