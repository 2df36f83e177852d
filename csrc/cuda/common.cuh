// common.cuh: the vocabulary of the CUDA kernels that must also compile as plain C++.
//
// Every kernel in csrc/cuda is written as `__host__ __device__` per-thread (or per-lane)
// functions of explicit indices (thread_work.cuh); the __global__ kernels (*.cu) are thin
// shells, and a host test driver (csrc/cuda_host) runs the very same functions over the
// whole grid on the CPU (tests/test_cuda_host.py). This header holds what both need:
// element types, 16-byte vector loads/stores, and the warp reduction. Where the device
// and host versions differ (intrinsics, shuffles), the difference is confined to a few
// lines here, each saying why the results are the same.
//
// The per-element math (code books, encoders, nibble order, nested absmax, rounding) is
// NOT here: it is nf4_codec.h, shared with the CPU kernels.
#pragma once

#include <stdint.h>
#include <string.h>

#include "../weight.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define NF4K_HD __host__ __device__ __forceinline__
#else
#define NF4K_HD inline
#endif

// Fully unroll a loop with a compile-time trip count: the register arrays it indexes
// (acc[M][R], codes[8], ...) must be indexed by constants, or they go to local memory.
// Device pass only: nvcc's host pass would hand the pragma to gcc (-Wunknown-pragmas).
#if defined(__CUDA_ARCH__)
#define NF4K_UNROLL _Pragma("unroll")
#else
#define NF4K_UNROLL
#endif

#if !defined(__CUDACC__)
#include <math.h>
#endif

namespace nf4lora {
namespace cuda {

constexpr int kWarp = 32;

// quiet_nan and nan_max (the NaN-propagating max torch.amax implements) come from
// nf4_codec.h, shared with the CPU kernels.

// acc + a * b with one rounding. An explicit FMA: setup.py compiles with --fmad=false
// (so the codec's separate multiply/add are never contracted), which would otherwise
// turn the GEMV's accumulation into two instructions. fmaf is correctly rounded on
// host and device, so the host test driver computes the very same bits.
NF4K_HD float fma_rn(float a, float b, float acc) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, acc);
#else
  return fmaf(a, b, acc);
#endif
}

// ---------------------------------------------------------------------------------
// Element types: storage type, exact widening to float, and rounding float -> storage.
// Widening is exact either way. Rounding on the device uses the hardware conversion
// (cvt.rn.{f16,bf16}.f32: IEEE round-to-nearest-even, one instruction; the codec's
// integer version costs ~5-10 instructions an element, a real fraction of dequantize's
// ~20-instruction budget per element at H100 bandwidth). Both are RNE, so the bits are
// the same for every non-NaN value (NaN payloads may differ: both are NaN). The host
// driver uses the codec's version; the CPU test suite checks that against torch.
// ---------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
NF4K_HD float fp16_widen(uint16_t h) { return __half2float(__ushort_as_half(h)); }
NF4K_HD uint16_t fp16_round(float f) { return __half_as_ushort(__float2half_rn(f)); }
NF4K_HD uint16_t bf16_round(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
#else
NF4K_HD float fp16_widen(uint16_t h) { return fp16_bits_to_float(h); }
NF4K_HD uint16_t fp16_round(float f) { return float_to_fp16_bits(f); }
NF4K_HD uint16_t bf16_round(float f) { return float_to_bf16_bits(f); }
#endif

struct F32 {
  using Storage = float;
  static constexpr int kId = kF32;
  NF4K_HD static float widen(float v) { return v; }
  NF4K_HD static float round(float v) { return v; }
};

// float16 (kF16) or bfloat16 (kBF16), stored as their bits. (kId is a constant, so each
// instance keeps one branch of the conditionals.)
template <int kDType>
struct Float16Bits {
  using Storage = uint16_t;
  static constexpr int kId = kDType;
  NF4K_HD static float widen(uint16_t h) {
    return kDType == kF16 ? fp16_widen(h) : bf16_bits_to_float(h);  // bf16: a shift
  }
  NF4K_HD static uint16_t round(float f) { return kDType == kF16 ? fp16_round(f) : bf16_round(f); }
};
struct F16 : Float16Bits<kF16> {};
struct BF16 : Float16Bits<kBF16> {};

// ---------------------------------------------------------------------------------
// 16-byte vectors. On the device, one LDG.128 / STG.128 each (the pointer must be
// 16-byte aligned; callers check and fall back to element-wise code otherwise).
// ---------------------------------------------------------------------------------
struct alignas(16) Vec16 {
  uint32_t w[4];
};

// Read-only data that is re-read (activations, LoRA factors, tables): the
// read-only/L1 path, so the warps of a block share one fetch.
NF4K_HD Vec16 load16(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  return Vec16{{v.x, v.y, v.z, v.w}};
#else
  Vec16 v;
  memcpy(&v, p, 16);
  return v;
#endif
}

// Data read exactly once (the packed 4-bit weight): streaming load, evict-first, so
// megabytes of weight do not push the activations and tables out of L1/L2.
NF4K_HD Vec16 load16_stream(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
  return Vec16{{v.x, v.y, v.z, v.w}};
#else
  return load16(p);
#endif
}

NF4K_HD void store16(void* p, const Vec16& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
#else
  memcpy(p, &v, 16);
#endif
}

NF4K_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The 8 16-bit values of one 16-byte vector -> floats (exact), in memory order.
template <class T>
NF4K_HD void widen8(const Vec16& raw, float v[8]) {
  static_assert(sizeof(typename T::Storage) == 2, "widen8 is for fp16/bf16");
  NF4K_UNROLL
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = T::widen((uint16_t)(raw.w[i] & 0xffffu));  // little endian: the lower
    v[2 * i + 1] = T::widen((uint16_t)(raw.w[i] >> 16));  // half is the first element
  }
}

// Round 8 floats to T and store them at p (16-byte aligned): one 16-byte store for
// fp16/bf16, two for fp32.
template <class T>
NF4K_HD void store8(typename T::Storage* p, const float v[8]) {
  if constexpr (sizeof(typename T::Storage) == 2) {
    Vec16 raw;
    NF4K_UNROLL
    for (int i = 0; i < 4; ++i)
      raw.w[i] = (uint32_t)T::round(v[2 * i]) | ((uint32_t)T::round(v[2 * i + 1]) << 16);
    store16(p, raw);
  } else {
    NF4K_UNROLL
    for (int h = 0; h < 2; ++h) {
      Vec16 raw;
      NF4K_UNROLL
      for (int i = 0; i < 4; ++i) raw.w[i] = float_bits(v[4 * h + i]);
      store16(p + 4 * h, raw);
    }
  }
}

// The 8 4-bit codes held by one 32-bit word of packed bytes (4 bytes, little endian),
// in element order: byte j gives elements 2j (high nibble) and 2j+1 (low nibble).
NF4K_HD void unpack8(uint32_t word, int codes[8]) {
  NF4K_UNROLL
  for (int j = 0; j < 4; ++j) {
    const uint8_t byte = (uint8_t)(word >> (8 * j));
    codes[2 * j] = unpack_first(byte);
    codes[2 * j + 1] = unpack_second(byte);
  }
}

// ---------------------------------------------------------------------------------
// Warp reduction: a butterfly. At step `offset` (16, 8, 4, 2, 1) lane l combines its
// value with lane l ^ offset's as op(mine, theirs). After 5 steps every lane holds the
// same result (op is commutative bit for bit: IEEE addition and nan_max are), which
// every lane may then use. The device does it with __shfl_xor_sync; the host driver
// runs the same steps in the same order over an array of the 32 lanes' values
// (warp_reduce_lanes), so it computes the same bits.
// ---------------------------------------------------------------------------------
struct SumOp {
  NF4K_HD float operator()(float mine, float theirs) const { return add_rn(mine, theirs); }
};
struct MaxOp {
  NF4K_HD float operator()(float mine, float theirs) const { return nan_max(mine, theirs); }
};

#if defined(__CUDACC__)
// Device: one lane's value in, the warp's result out. All 32 lanes must be active.
template <class Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
#endif

// Host (test driver): the same butterfly over all 32 lanes' values, in place.
template <class Op>
inline void warp_reduce_lanes(float v[kWarp], Op op) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    float next[kWarp];
    for (int lane = 0; lane < kWarp; ++lane) next[lane] = op(v[lane], v[lane ^ offset]);
    for (int lane = 0; lane < kWarp; ++lane) v[lane] = next[lane];
  }
}

// ---------------------------------------------------------------------------------
// Per-block scale of a 4-bit tensor: a float32 absmax, or (double quantization)
// decoded from its 8-bit code by the codec: code2[q[b]] * absmax2[b / nbs] + offset.
// The block constants of a PackedWeight (weight.h), plus the nested index as a shift.
// ---------------------------------------------------------------------------------
struct Scales {
  const float* absmax = nullptr;  // [blocks] float32, or null when nested
  NestedAbsmax nested;            // nested.q null: not nested
  int nested_shift = 8;           // log2(nested.blocksize), or -1 if not a power of 2

  NF4K_HD float operator()(int64_t block) const {
    if (nested.q == nullptr) return absmax[block];
    // A shift for the usual power of two (256); otherwise a 32-bit division (the plan
    // checks the range): a 64-bit one is a ~70-instruction subroutine call on the GPU.
    const int64_t b2 = nested_shift >= 0
                           ? (block >> nested_shift)
                           : (int64_t)((uint32_t)block / (uint32_t)nested.blocksize);
    return decode_nested_absmax(nested.code2, nested.q[block], nested.absmax2[b2], nested.offset);
  }
};

// log2(v) if v is a power of two, else -1.
NF4K_HD int log2_exact(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

}  // namespace cuda
}  // namespace nf4lora
