// host_driver.cpp: the CPU replay of nf4lora._C_cuda's kernels, for tests/test_cuda_host.py.
// It implements csrc/cuda/launch.h, as the CUDA launchers (codec_kernels.cu,
// gemv_kernel.cu) do, by running the kernels' per-thread code (thread_work.cuh) over the
// whole grid on the CPU. The test compiles it with the real bindings
// (csrc/cuda/bindings_cuda.cpp) into a module that stands in for nf4lora._C_cuda, so the
// binding code runs too. No CUDA, no torch.
//
// Each entry point goes through the same plan as the real launcher (csrc/cuda/plan.h:
// argument checks, vector-or-element-wise path, grid size), then replays the kernel:
//   * every CUDA block and every thread of the grid, one after another. Threads of
//     these kernels write disjoint outputs, so any order is one legal schedule;
//   * a warp's shuffle reduction as the same butterfly over the 32 lanes' values
//     (common.cuh: warp_reduce_lanes), so the sums have the same bits;
//   * shared-memory tables as plain arrays (the kernels only copy them in);
//   * the GEMV's ticket order: the LoRA-shrink blocks first, then the output blocks,
//     which is the order the device's tickets + wait enforce;
//   * a mixed-adapter batch's index is checked here (the replay can read it; the device
//     trusts its caller), so a test cannot pass one that reads outside the stacks.
// Not replayed (see the test module's docstring): the shuffles, __syncthreads, the
// atomics and the fence/spin between blocks, and the device-only conversions.
// The stream is ignored: each call has finished when it returns.
#include <string.h>

#include <string>

#include "../cuda/plan.h"

namespace nf4lora {
namespace cuda {
namespace {

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

template <class T, int M, bool kPerRow>
void run_gemv(const GemvPlan& plan) {
  constexpr int R = gemv_rows_per_warp(M);
  constexpr int S = gemv_shrink_rows(M, kPerRow);
  const GemvParams& p = plan.params;
  const int64_t shrink_blocks = plan.grid.shrink_blocks;
  for (int64_t block = 0; block < plan.grid.blocks; ++block)  // ticket order
    for (int warp = 0; warp < kGemvWarps; ++warp) {
      if (block < shrink_blocks) {
        const int64_t u = block * kGemvWarps + warp;
        if (u >= gemv_shrink_warps(M, p.rank, kPerRow)) continue;
        float acc[kWarp][S][1];
        for (int lane = 0; lane < kWarp; ++lane)
          shrink_lane_dot<T, M, kPerRow>(p, (int)u, lane, acc[lane]);
        warp_sum(acc);
        for (int lane = 0; lane < kWarp; ++lane)
          shrink_lane_store<T, M, kPerRow>(p, (int)u, lane, acc[lane]);
        continue;
      }
      const int64_t row0 = ((block - shrink_blocks) * kGemvWarps + warp) * R;
      if (row0 >= p.N) continue;
      float acc[kWarp][M][R];
      for (int lane = 0; lane < kWarp; ++lane)
        gemv_lane_dot<T, M>(p, plan.table.level, row0, lane, acc[lane]);
      if (p.rank > 0)
        for (int lane = 0; lane < kWarp; ++lane)
          gemv_lane_expand<T, M, kPerRow>(p, row0, lane, acc[lane]);
      warp_sum(acc);
      for (int lane = 0; lane < kWarp; ++lane) gemv_lane_store<T, M>(p, row0, lane, acc[lane]);
    }
}

}  // namespace

void quantize_4bit(const void* A, int dtype, int64_t n, int64_t blocksize,
                   const CodeEncoder& encoder, uint8_t* packed, float* absmax, void*) {
  const QuantPlan plan = plan_quantize(A, n, blocksize, packed, absmax, /*four_bit=*/true);
  with_float_type(dtype, [&](auto in) { run_quantize<decltype(in)>(plan, Encode4{encoder}); });
}

void quantize_blockwise(const void* A, int dtype, const float* code, int64_t n,
                        int64_t blocksize, uint8_t* q, float* absmax, void*) {
  const QuantPlan plan = plan_quantize(A, n, blocksize, q, absmax, /*four_bit=*/false);
  require(n == 0 || code != nullptr, "null code");
  float code_s[256];  // the kernel's shared-memory copy
  if (n > 0) memcpy(code_s, code, sizeof(code_s));
  with_float_type(dtype, [&](auto in) { run_quantize<decltype(in)>(plan, Encode8{code_s}); });
}

void dequantize_4bit(const PackedWeight& weight, void* out, int out_dtype, void*) {
  const Dequant4Plan plan = plan_dequantize_4bit(weight, out);
  with_float_type(out_dtype, [&](auto o) {
    for (int64_t tid = 0; tid < plan.grid * kDequantThreads; ++tid)
      dequantize_4bit_thread<decltype(o)>(plan.params, plan.table.level, tid);
  });
}

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                          int64_t blocksize, void* out, int out_dtype, void*) {
  const Dequant8Plan plan = plan_dequantize_blockwise(q, absmax, code, n, blocksize, out);
  float code_s[256];
  if (n > 0) memcpy(code_s, code, sizeof(code_s));
  with_float_type(out_dtype, [&](auto o) {
    for (int64_t tid = 0; tid < plan.grid * kDequantThreads; ++tid)
      dequantize_8bit_thread<decltype(o)>(plan.params, code_s, tid);
  });
}

void gemv_4bit_lora(const LoraGemvArgs& args, void* workspace, void*) {
  const GemvPlan plan = plan_gemv(args, nullptr, workspace);
  if (plan.empty) return;
  with_half_type(args.dtype, [&](auto t) {
    with_rows(args.M, [&](auto m) { run_gemv<decltype(t), decltype(m)::value, false>(plan); });
  });
}

void multi_lora_gemv_4bit(const LoraGemvArgs& args, const AdapterRows& adapters, void* workspace,
                          void*) {
  const GemvPlan plan = plan_gemv(args, &adapters, workspace);
  if (plan.empty) return;
  // The device trusts the index (its caller checked it); the replay, which can read it,
  // makes sure no test hands the kernel one that would read outside the stacks.
  for (int64_t m = 0; m < args.M && args.rank > 0; ++m)
    require(adapters.index[m] >= -1 && adapters.index[m] < adapters.count,
            "adapter index out of range: each must lie in [-1, adapters)");
  with_half_type(args.dtype, [&](auto t) {
    with_rows(args.M, [&](auto m) { run_gemv<decltype(t), decltype(m)::value, true>(plan); });
  });
}

std::string runtime_status() { return "host replay (no device): the kernels' code on the CPU"; }

}  // namespace cuda
}  // namespace nf4lora
