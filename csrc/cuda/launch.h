// launch.h: the C++ API of nf4lora._C_cuda's kernels, with no CUDA or torch types, so
// bindings_cuda.cpp compiles with the plain host compiler. Pointers are device
// addresses; `stream` is a cudaStream_t passed as void* (0 = the legacy default
// stream). Each call validates its arguments (std::invalid_argument), launches
// asynchronously on `stream` and reports a launch error as std::runtime_error.
//
// Layouts as csrc/cpu/kernels.h; dtype ids from nf4_codec.h (0 f32, 1 f16, 2 bf16).
#pragma once

#include <stdint.h>

#include <string>

namespace nf4lora {
namespace cuda {

// The second level of double quantization:
//   absmax[i] = code2[q[i]] * absmax2[i / blocksize] + offset
struct Nested {
  const uint8_t* q = nullptr;        // [blocks]
  const float* absmax2 = nullptr;    // [ceil(blocks / blocksize)]
  const float* code2 = nullptr;      // [256]
  float offset = 0.0f;
  int64_t blocksize = 256;
};

// packed[ceil(n/2)], absmax[ceil(n/blocksize)] <- A[n]; blocksize even.
void quantize_4bit(const void* A, int dtype, int64_t n, int64_t blocksize, int quant_type,
                   uint8_t* packed, float* absmax, void* stream);

// q[n], absmax[ceil(n/blocksize)] <- A[n], with a sorted 256-entry float32 code.
void quantize_blockwise(const void* A, int dtype, const float* code, int64_t n,
                        int64_t blocksize, uint8_t* q, float* absmax, void* stream);

// out[n] <- packed; `nested` null: absmax is float32 [blocks]; otherwise absmax is unused
// and each block's scale is decoded from `nested` in the kernel. blocksize: a power of
// two >= 32 (bitsandbytes' 32..4096).
void dequantize_4bit(const uint8_t* packed, const float* absmax, const Nested* nested, int64_t n,
                     int64_t blocksize, int quant_type, void* out, int out_dtype, void* stream);

// out[n] <- code[q] * absmax[i / blocksize].
void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                          int64_t blocksize, void* out, int out_dtype, void* stream);

// y[M, N] = x[M, K] @ W^T + (scaling * (x @ A^T)) @ B^T + bias, 1 <= M <= 8, x/A/B/bias/y
// all float16 or all bfloat16, W the 4-bit [N, K] weight. rank 0: no LoRA (A, B unused).
// `workspace`: gemv_workspace_bytes(M, rank) bytes of device memory (unused and may be
// null when rank == 0); the call zeroes its first 8 bytes on `stream` before the launch.
struct GemvArgs {
  const void* x = nullptr;
  int dtype = 2;
  int64_t M = 1, N = 0, K = 0;
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;   // float32 [blocks] unless nested
  const Nested* nested = nullptr;
  int64_t blocksize = 64;
  int quant_type = 0;
  const void* lora_A = nullptr;    // [rank, K]
  const void* lora_B = nullptr;    // [N, rank]
  int64_t rank = 0;
  float scaling = 1.0f;
  const void* bias = nullptr;      // [N] or null
  void* workspace = nullptr;
  void* y = nullptr;
};
void gemv_4bit_lora(const GemvArgs& args, void* stream);

// Bytes of GEMV workspace: 2 int32 counters, then M * rank float32 (x @ A^T).
inline int64_t gemv_workspace_bytes(int64_t M, int64_t rank) {
  return rank > 0 ? 8 + 4 * M * rank : 0;
}

// "ok: N device(s)" or the CUDA runtime's error (no driver, no device, ...).
std::string runtime_status();

}  // namespace cuda
}  // namespace nf4lora
