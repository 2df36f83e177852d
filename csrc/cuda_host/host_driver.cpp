// host_driver.cpp: runs the CUDA kernels' per-thread code (csrc/cuda/thread_work.cuh) on
// the CPU over the whole grid, for tests/test_cuda_host.py. Built by the test with g++
// into a temporary shared library and called through ctypes; no CUDA, no torch.
//
// Each entry point goes through the same plan as the real launcher (csrc/cuda/plan.h:
// argument checks, vector-or-element-wise path, grid size), then replays the kernel:
//   * every CUDA block and every thread of the grid, one after another. Threads of
//     these kernels write disjoint outputs, so any order is one legal schedule;
//   * a warp's shuffle reduction as the same butterfly over the 32 lanes' values
//     (common.cuh: warp_reduce_lanes), so the sums have the same bits;
//   * shared-memory tables as plain arrays (the kernels only copy them in);
//   * the GEMV's ticket order: the LoRA-shrink blocks first, then the output blocks,
//     which is the order the device's tickets + wait enforce.
// Not replayed (see the test module's docstring): the shuffles, __syncthreads, the
// atomics and the fence/spin between blocks, and the device-only conversions.
//
// The entry points mirror nf4lora._C_cuda (csrc/cuda/bindings_cuda.cpp) argument for
// argument, minus the stream. Each returns 0, or 1 with nf4h_last_error() set.
#include <exception>
#include <string>

#include "../cuda/plan.h"

using namespace nf4lora;
using namespace nf4lora::cuda;

namespace {

std::string g_error;

template <class Fn>
int guarded(Fn&& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}

// One warp per quantization block: lanes' partial absmax, warp max, lanes encode.
template <class In, class Encode>
void run_quantize(const QuantPlan& plan, const Encode& encode) {
  for (int64_t cta = 0; cta < plan.grid; ++cta)
    for (int warp = 0; warp < kQuantWarps; ++warp) {
      const int64_t block = cta * kQuantWarps + warp;
      if (block >= plan.quant_blocks) continue;
      float absmax[kWarp];
      for (int lane = 0; lane < kWarp; ++lane)
        absmax[lane] = quantize_lane_absmax<In>(plan.params, block, lane);
      warp_reduce_lanes(absmax, MaxOp{});
      for (int lane = 0; lane < kWarp; ++lane)
        quantize_lane_encode<In>(plan.params, encode, block, lane, absmax[lane]);
    }
}

// Sum acc[lane][m][r] over lanes for every (m, r), as the device's per-slot butterflies.
template <int M, int R>
void warp_sum(float (&acc)[kWarp][M][R]) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float v[kWarp];
      for (int lane = 0; lane < kWarp; ++lane) v[lane] = acc[lane][m][r];
      warp_reduce_lanes(v, SumOp{});
      for (int lane = 0; lane < kWarp; ++lane) acc[lane][m][r] = v[lane];
    }
}

template <class T, int M>
void run_gemv(const GemvPlan& plan) {
  constexpr int R = gemv_rows_per_warp(M);
  const GemvParams& p = plan.params;
  const int64_t shrink_blocks = plan.grid.shrink_blocks;
  for (int64_t block = 0; block < plan.grid.blocks; ++block)  // ticket order
    for (int warp = 0; warp < kGemvWarps; ++warp) {
      if (block < shrink_blocks) {
        const int64_t j = block * kGemvWarps + warp;
        if (j >= p.rank) continue;
        float acc[kWarp][M][1];
        for (int lane = 0; lane < kWarp; ++lane) shrink_lane_dot<T, M>(p, (int)j, lane, acc[lane]);
        warp_sum(acc);
        for (int lane = 0; lane < kWarp; ++lane) shrink_lane_store<M>(p, (int)j, lane, acc[lane]);
        continue;
      }
      const int64_t row0 = ((block - shrink_blocks) * kGemvWarps + warp) * R;
      if (row0 >= p.N) continue;
      float acc[kWarp][M][R];
      for (int lane = 0; lane < kWarp; ++lane) gemv_lane_dot<T, M>(p, plan.lut.v, row0, lane, acc[lane]);
      if (p.rank > 0)
        for (int lane = 0; lane < kWarp; ++lane) gemv_lane_expand<T, M>(p, row0, lane, acc[lane]);
      warp_sum(acc);
      for (int lane = 0; lane < kWarp; ++lane) gemv_lane_store<T, M>(p, row0, lane, acc[lane]);
    }
}

Nested make_nested(const uint8_t* q, const float* absmax2, const float* code2, float offset,
                   int64_t blocksize) {
  Nested nested;
  nested.q = q;
  nested.absmax2 = absmax2;
  nested.code2 = code2;
  nested.offset = offset;
  nested.blocksize = blocksize;
  return nested;
}

}  // namespace

extern "C" {

const char* nf4h_last_error() { return g_error.c_str(); }

// Launch geometry, for the tests to check the grid covers the work exactly once.
int64_t nf4h_gemv_rows_per_warp(int M) { return gemv_rows_per_warp(M); }

int nf4h_quantize_4bit(const void* A, int dtype, int64_t n, int64_t blocksize, int quant_type,
                       uint8_t* packed, float* absmax) {
  return guarded([&] {
    require_quant_type(quant_type);
    const QuantPlan plan = plan_quantize(A, n, blocksize, packed, absmax, true);
    with_float_type(dtype, [&](auto in) { run_quantize<decltype(in)>(plan, Encode4{quant_type}); });
  });
}

int nf4h_quantize_blockwise(const void* A, int dtype, const float* code, int64_t n,
                            int64_t blocksize, uint8_t* q, float* absmax) {
  return guarded([&] {
    const QuantPlan plan = plan_quantize(A, n, blocksize, q, absmax, false);
    require(n == 0 || code != nullptr, "null code");
    float code_s[256];  // the kernel's shared-memory copy
    if (n > 0) memcpy(code_s, code, sizeof(code_s));
    with_float_type(dtype, [&](auto in) { run_quantize<decltype(in)>(plan, Encode8{code_s}); });
  });
}

int nf4h_dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                         int quant_type, void* out, int out_dtype) {
  return guarded([&] {
    const Dequant4Plan plan = plan_dequantize_4bit(packed, absmax, nullptr, n, blocksize, quant_type, out);
    with_float_type(out_dtype, [&](auto o) {
      for (int64_t tid = 0; tid < plan.grid * kDequantThreads; ++tid)
        dequantize_4bit_thread<decltype(o)>(plan.params, plan.lut.v, tid);
    });
  });
}

int nf4h_dequantize_4bit_nested(const uint8_t* packed, const uint8_t* qabsmax, const float* absmax2,
                                const float* code2, float offset, int64_t nested_blocksize,
                                int64_t n, int64_t blocksize, int quant_type, void* out,
                                int out_dtype) {
  return guarded([&] {
    const Nested nested = make_nested(qabsmax, absmax2, code2, offset, nested_blocksize);
    const Dequant4Plan plan = plan_dequantize_4bit(packed, nullptr, &nested, n, blocksize, quant_type, out);
    with_float_type(out_dtype, [&](auto o) {
      for (int64_t tid = 0; tid < plan.grid * kDequantThreads; ++tid)
        dequantize_4bit_thread<decltype(o)>(plan.params, plan.lut.v, tid);
    });
  });
}

int nf4h_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                              int64_t blocksize, void* out, int out_dtype) {
  return guarded([&] {
    const Dequant8Plan plan = plan_dequantize_blockwise(q, absmax, code, n, blocksize, out);
    float code_s[256];
    if (n > 0) memcpy(code_s, code, sizeof(code_s));
    with_float_type(out_dtype, [&](auto o) {
      for (int64_t tid = 0; tid < plan.grid * kDequantThreads; ++tid)
        dequantize_8bit_thread<decltype(o)>(plan.params, code_s, tid);
    });
  });
}

int nf4h_gemv_4bit_lora(const void* x, int dtype, int64_t M, int64_t N, int64_t K,
                        const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                        const float* absmax2, const float* code2, float offset,
                        int64_t nested_blocksize, int64_t blocksize, int quant_type,
                        const void* lora_A, const void* lora_B, int64_t rank, float scaling,
                        const void* bias, void* workspace, void* y) {
  return guarded([&] {
    const Nested nested = make_nested(qabsmax, absmax2, code2, offset, nested_blocksize);
    GemvArgs a;
    a.x = x;
    a.dtype = dtype;
    a.M = M;
    a.N = N;
    a.K = K;
    a.packed = packed;
    a.absmax = absmax;
    a.nested = qabsmax != nullptr ? &nested : nullptr;
    a.blocksize = blocksize;
    a.quant_type = quant_type;
    a.lora_A = lora_A;
    a.lora_B = lora_B;
    a.rank = rank;
    a.scaling = scaling;
    a.bias = bias;
    a.workspace = workspace;
    a.y = y;
    const GemvPlan plan = plan_gemv(a);
    if (plan.empty) return;
    with_half_type(dtype, [&](auto t) {
      with_rows(M, [&](auto m) { run_gemv<decltype(t), decltype(m)::value>(plan); });
    });
  });
}

int64_t nf4h_gemv_workspace_bytes(int64_t M, int64_t rank) { return gemv_workspace_bytes(M, rank); }

}  // extern "C"
