// The fused 4-bit GEMV + LoRA kernel of nf4lora._C_cuda, for M <= 8 rows of x (decode):
//   y = x @ W^T + (scaling * (x @ A^T)) @ B^T + bias,   h = x @ A^T
// in ONE launch (at decode sizes a launch costs about as much as the whole ideal
// GEMV: 2.6 us for 4096x4096 on H100). The per-lane work is thread_work.cuh; this file
// is the shell: block ordering, the wait for the LoRA shrink, and the warp sums.
// A mixed-adapter batch (multi_lora_gemv_4bit: row m its own adapter i, scaled by
// scalings[i], or none) is the same kernel with kPerRow = true: M * rank shrink warps (one
// per row of x and row of its A) instead of rank, and each row's B in the expand.
//
// Why an ordering at all: every output row's expand needs all of t = scaling * x @ A^T,
// which the first CUDA blocks compute in the same pass. Blocks take a ticket from an
// atomic counter when they start, and tickets [0, shrink_blocks) compute t. A block that
// waits for t holds a later ticket, so every shrink block had already started (it is
// resident) and finishes without waiting on anyone: no deadlock, whatever order or
// residency the hardware picks. (blockIdx order is not guaranteed to be start order.)
#include <cuda_runtime.h>

#include <string>

#include "plan.h"

namespace nf4lora {
namespace cuda {
namespace {

// Wait until `done` (the number of finished shrink warps) reaches `count`. Lane 0 polls
// through a volatile load (L2, never a stale L1 line), then a fence orders the later
// reads of t after it; __syncwarp hands that order to the other lanes.
__device__ __forceinline__ void wait_for_shrink(const int* done, int count, int lane) {
  if (lane == 0) {
    while (*reinterpret_cast<const volatile int*>(done) < count) __nanosleep(64);
    __threadfence();
  }
  __syncwarp();
}

// Occupancy hint for ptxas (CUDA blocks per SM the registers must allow; 0 = none).
// Unhinted, ptxas for sm_80 spills a register at M = 4 and 6 to reach the next occupancy
// step (96 / 128 registers). With these, every M compiles with zero spills on sm_80 and
// sm_90 (scripts/check_cuda.sh): M = 4 in 128 registers (4 blocks), M = 5..7 in 170
// (3 blocks). M = 8 takes ~248 on sm_80 (168 on sm_90) and a cap would spill: no hint.
// The mixed-batch instances (kPerRow) fit the same hints without spills: M = 4 in 127
// (sm_80) / 126 (sm_90), M = 5..7 in 162-168; M = 8 in 238 (sm_80) / 167-168 (sm_90).
constexpr int gemv_min_blocks_per_sm(int M) { return M == 4 ? 4 : (M >= 5 && M <= 7 ? 3 : 0); }

template <class T, int M, bool kPerRow>
__global__ void __launch_bounds__(kGemvWarps * kWarp, gemv_min_blocks_per_sm(M))
    gemv_4bit_lora_kernel(const __grid_constant__ GemvParams p,
                          const __grid_constant__ CodeTable table, int* counters,
                          int shrink_blocks) {
  constexpr int R = gemv_rows_per_warp(M);
  __shared__ float lut_s[16];
  __shared__ int ticket_s;
  if (threadIdx.x < 16) lut_s[threadIdx.x] = table.level[threadIdx.x];
  if (threadIdx.x == 0) ticket_s = shrink_blocks > 0 ? atomicAdd(&counters[0], 1) : (int)blockIdx.x;
  __syncthreads();
  const int64_t block = ticket_s;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;

  if (block < shrink_blocks) {  // LoRA shrink: t for S rows of x and one row j of A
    constexpr int S = gemv_shrink_rows(M, kPerRow);
    const int u = (int)block * kGemvWarps + warp;
    if (u >= gemv_shrink_warps(M, p.rank, kPerRow)) return;
    float acc[S][1];
    shrink_lane_dot<T, M, kPerRow>(p, u, lane, acc);
#pragma unroll
    for (int s = 0; s < S; ++s) acc[s][0] = warp_reduce(acc[s][0], SumOp{});
    shrink_lane_store<T, M, kPerRow>(p, u, lane, acc);
    __threadfence();  // each lane's t store is visible device-wide ...
    __syncwarp();
    if (lane == 0) atomicAdd(&counters[1], 1);  // ... before the warp reports its part done
    return;
  }

  const int64_t row0 = ((block - shrink_blocks) * kGemvWarps + warp) * R;
  if (row0 >= p.N) return;  // the whole warp
  float acc[M][R];
  gemv_lane_dot<T, M>(p, lut_s, row0, lane, acc);
  if (p.rank > 0) {
    wait_for_shrink(counters + 1, gemv_shrink_warps(M, p.rank, kPerRow), lane);
    gemv_lane_expand<T, M, kPerRow>(p, row0, lane, acc);
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = warp_reduce(acc[m][r], SumOp{});
  gemv_lane_store<T, M>(p, row0, lane, acc);
}

// gemv_4bit_lora and multi_lora_gemv_4bit (adapters: null for one adapter).
void launch_gemv(const LoraGemvArgs& args, const AdapterRows* adapters, void* workspace,
                        void* stream_ptr, const char* name) {
  const GemvPlan plan = plan_gemv(args, adapters, workspace);
  if (plan.empty) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (plan.counters != nullptr) {
    const cudaError_t err = cudaMemsetAsync(plan.counters, 0, 2 * sizeof(int), stream);
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("nf4lora CUDA ") + name + ": " + cudaGetErrorString(err));
  }
  with_half_type(args.dtype, [&](auto t) {
    using T = decltype(t);
    with_rows(args.M, [&](auto m) {
      constexpr int M = decltype(m)::value;
      with_bool(plan.per_row, [&](auto per_row) {
        gemv_4bit_lora_kernel<T, M, decltype(per_row)::value>
            <<<(unsigned)plan.grid.blocks, kGemvWarps * kWarp, 0, stream>>>(
                plan.params, plan.table, plan.counters, (int)plan.grid.shrink_blocks);
      });
    });
  });
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("nf4lora CUDA ") + name + ": " + cudaGetErrorString(err));
}

}  // namespace

void gemv_4bit_lora(const LoraGemvArgs& args, void* workspace, void* stream) {
  launch_gemv(args, nullptr, workspace, stream, "gemv_4bit_lora");
}

void multi_lora_gemv_4bit(const LoraGemvArgs& args, const AdapterRows& adapters, void* workspace,
                          void* stream) {
  launch_gemv(args, &adapters, workspace, stream, "multi_lora_gemv_4bit");
}

}  // namespace cuda
}  // namespace nf4lora
