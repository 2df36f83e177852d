// plan.h (host only): from a launch.h call to what a kernel launch needs: validated
// arguments, the kernel's parameter struct, and the grid. Shared by the real launchers
// (*.cu) and the host test driver (csrc/cuda_host), so the tests also cover argument
// checks, the choice between the 16-byte and element-wise paths, and the grid size.
#pragma once

#include <stdexcept>
#include <type_traits>

#include "launch.h"
#include "thread_work.cuh"

namespace nf4lora {
namespace cuda {

inline void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CUDA caps gridDim.x at 2^31 - 1.
inline void require_grid(int64_t blocks) {
  require(blocks <= 0x7fffffffLL, "tensor too large for one launch (grid > 2^31 - 1 blocks)");
}

// fn(F32{}) / fn(F16{}) / fn(BF16{}) for a dtype id.
template <class Fn>
void with_float_type(int dtype, Fn&& fn) {
  switch (dtype) {
    case kF32: fn(F32{}); return;
    case kF16: fn(F16{}); return;
    case kBF16: fn(BF16{}); return;
    default: throw std::invalid_argument("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
}

// The same for float16 / bfloat16 only (the GEMV): no float32 instance is compiled.
template <class Fn>
void with_half_type(int dtype, Fn&& fn) {
  require(dtype == kF16 || dtype == kBF16, "GEMV dtype must be 1 (float16) or 2 (bfloat16)");
  with_float_type(dtype, [&](auto t) {
    if constexpr (!std::is_same_v<decltype(t), F32>) fn(t);
  });
}

// fn(std::bool_constant<b>{}): a run-time flag as a template argument.
template <class Fn>
void with_bool(bool b, Fn&& fn) {
  if (b)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

// fn(std::integral_constant<int, M>{}) for M in 1..8.
template <class Fn>
void with_rows(int64_t M, Fn&& fn) {
  switch (M) {
    case 1: fn(std::integral_constant<int, 1>{}); return;
    case 2: fn(std::integral_constant<int, 2>{}); return;
    case 3: fn(std::integral_constant<int, 3>{}); return;
    case 4: fn(std::integral_constant<int, 4>{}); return;
    case 5: fn(std::integral_constant<int, 5>{}); return;
    case 6: fn(std::integral_constant<int, 6>{}); return;
    case 7: fn(std::integral_constant<int, 7>{}); return;
    case 8: fn(std::integral_constant<int, 8>{}); return;
    default: throw std::invalid_argument("GEMV: M (rows of x) must be 1..8");
  }
}

// 4-bit dequantize and GEMV: a thread's 32 elements must lie in one block.
inline int blocksize_shift_4bit(int64_t blocksize) {
  const int shift = log2_exact(blocksize);
  require(shift >= 5, "4-bit blocksize must be a power of two >= 32");
  return shift;
}

// The block constants of `w` as the kernels read them.
inline Scales make_scales(const PackedWeight& w) {
  Scales s;
  if (!w.is_nested()) {
    require(w.absmax != nullptr, "null absmax");
    s.absmax = w.absmax;
    return s;
  }
  require(w.nested.absmax2 && w.nested.code2, "null pointer in nested absmax");
  require(w.nested.blocksize > 0, "nested blocksize must be > 0");
  s.nested = w.nested;
  s.nested_shift = log2_exact(w.nested.blocksize);
  require(s.nested_shift >= 0 || (w.blocks() <= 0xffffffffLL && w.nested.blocksize <= 0xffffffffLL),
          "nested blocksize that is not a power of two: at most 2^32 blocks");
  return s;
}

// Threads of `per_thread` elements each over n elements, in CUDA blocks of kDequantThreads.
template <class Plan>
void cover_elements(Plan& plan, int64_t n, int per_thread) {
  plan.threads = ceil_div(n, per_thread);
  plan.grid = ceil_div(plan.threads, kDequantThreads);
  require_grid(plan.grid);
}

// ---- quantize (4-bit and 8-bit): one warp per quantization block ------------------
struct QuantPlan {
  QuantParams params;
  int64_t quant_blocks;  // = warps
  int64_t grid;          // CUDA blocks of kQuantWarps warps
};

inline QuantPlan plan_quantize(const void* A, int64_t n, int64_t blocksize, uint8_t* out,
                               float* absmax, bool four_bit) {
  require(n >= 0, "n must be >= 0");
  require(blocksize > 0, "blocksize must be > 0");
  require(!four_bit || blocksize % 2 == 0, "4-bit blocksize must be even");
  require(n == 0 || (A && out && absmax), "null pointer");
  QuantPlan plan{QuantParams{A, n, blocksize, out, absmax}, ceil_div(n, blocksize), 0};
  plan.grid = ceil_div(plan.quant_blocks, kQuantWarps);
  require_grid(plan.grid);
  return plan;
}

// ---- dequantize 4-bit: one thread per 32 elements ---------------------------------
struct Dequant4Plan {
  Dequant4Params params;
  CodeTable table;  // the weight's levels, a kernel parameter (staged to shared memory)
  int64_t threads;  // ceil(n / 32)
  int64_t grid;     // CUDA blocks of kDequantThreads
};

inline Dequant4Plan plan_dequantize_4bit(const PackedWeight& w, void* out) {
  require(w.n >= 0, "n must be >= 0");
  Dequant4Plan plan{};
  plan.params.n = w.n;
  plan.params.blocksize_shift = blocksize_shift_4bit(w.blocksize);
  plan.table = w.table;
  if (w.n == 0) return plan;
  require(w.packed && out, "null pointer");
  plan.params.packed = w.packed;
  plan.params.scales = make_scales(w);
  plan.params.out = out;
  plan.params.vector_ok = aligned16(w.packed) && aligned16(out);
  cover_elements(plan, w.n, kDequant4PerThread);
  return plan;
}

// ---- dequantize 8-bit: one thread per 16 codes -----------------------------------
struct Dequant8Plan {
  Dequant8Params params;
  int64_t threads;
  int64_t grid;
};

inline Dequant8Plan plan_dequantize_blockwise(const uint8_t* q, const float* absmax,
                                              const float* code, int64_t n, int64_t blocksize,
                                              void* out) {
  require(n >= 0, "n must be >= 0");
  require(blocksize > 0, "blocksize must be > 0");
  Dequant8Plan plan{Dequant8Params{q, absmax, n, blocksize, out, false}, 0, 0};
  if (n == 0) return plan;
  require(q && absmax && code && out, "null pointer");
  plan.params.vector_ok = aligned16(q) && aligned16(out) && blocksize % kDequant8PerThread == 0;
  cover_elements(plan, n, kDequant8PerThread);
  return plan;
}

// ---- GEMV + LoRA --------------------------------------------------------------------
struct GemvPlan {
  GemvParams params;
  CodeTable table;  // the weight's levels, a kernel parameter (staged to shared memory)
  GemvGrid grid;
  int* counters;  // [2] in the workspace: block tickets, finished shrink warps
  bool per_row;   // a mixed-adapter batch: the kernel's kPerRow
  bool empty;     // nothing to launch: N == 0 and no LoRA (with LoRA h is still written)
};

// `adapters`: null for one adapter (lora_gemv_4bit), else a mixed batch's (the kernel's
// kPerRow), with a.lora_A / a.lora_B the stacks. The index's values are the caller's to
// check (the host cannot read device memory; nf4lora._ops checks them).
inline GemvPlan plan_gemv(const LoraGemvArgs& a, const AdapterRows* adapters, void* workspace) {
  const PackedWeight& w = a.weight;
  require(a.M >= 1 && a.M <= kGemvMaxM, "GEMV: M (rows of x) must be 1..8");
  require(a.dtype == kF16 || a.dtype == kBF16, "GEMV dtype must be 1 (float16) or 2 (bfloat16)");
  require(a.N >= 0 && a.K >= 0, "GEMV: N and K must be >= 0");
  require(w.n == a.N * a.K, "GEMV: the weight must have N * K elements");
  require(a.rank >= 0 && a.rank <= 0x7fffffff, "GEMV: rank must be >= 0");
  GemvPlan plan{};
  plan.table = w.table;
  GemvParams& p = plan.params;
  p.blocksize_shift = blocksize_shift_4bit(w.blocksize);
  plan.empty = a.N == 0 && a.rank == 0;
  if (plan.empty) return plan;
  require(a.x != nullptr || a.K == 0, "GEMV: null x");
  require(a.y != nullptr || a.N == 0, "GEMV: null y");
  require(w.packed != nullptr || w.n == 0, "GEMV: null weight");
  if (a.rank > 0) {
    // (an empty tensor may have a null address: lora_A when K == 0, lora_B when N == 0)
    require((a.lora_A || a.K == 0) && (a.lora_B || a.N == 0) && a.h,
            "GEMV: rank > 0 needs lora_A, lora_B and h");
    require(workspace != nullptr, "GEMV: rank > 0 needs a workspace (gemv_workspace_bytes)");
  }
  plan.per_row = adapters != nullptr;
  if (plan.per_row) {
    require(adapters->count >= 1, "GEMV: a mixed batch needs at least one adapter");
    require(a.rank == 0 || (adapters->index && adapters->scalings),
            "GEMV: a mixed batch needs adapter_index and scalings");
    // the shrink warps are counted in an int (M * rank of them)
    require(a.M * a.rank <= 0x7fffffff, "GEMV: M * rank must be < 2^31 for a mixed batch");
    p.adapter_index = adapters->index;
    p.scalings = adapters->scalings;
  }
  p.x = a.x;
  p.packed = w.packed;
  p.scales = w.n > 0 ? make_scales(w) : Scales{};
  p.lora_A = a.lora_A;
  p.lora_B = a.lora_B;
  p.scaling = a.scaling;
  p.rank = (int)a.rank;
  p.bias = a.bias;
  plan.counters = a.rank > 0 ? static_cast<int*>(workspace) : nullptr;
  p.t = a.rank > 0 ? reinterpret_cast<float*>(static_cast<char*>(workspace) + 8) : nullptr;
  p.h = a.h;
  p.y = a.y;
  p.N = a.N;
  p.K = a.K;
  // K % 32 == 0 puts every row, and every lane's 32-weight chunk, on a 16-byte boundary
  // of the packed weight and of x and A (64 bytes of fp16/bf16; every adapter's A of a
  // stack too, rank * K elements after the previous one's).
  p.vector_ok = a.K % kGemvChunk == 0 && aligned16(a.x) && aligned16(w.packed) &&
                (a.rank == 0 || aligned16(a.lora_A));
  plan.grid = gemv_grid((int)a.M, a.N, (int)a.rank, plan.per_row);
  require_grid(plan.grid.blocks);
  return plan;
}

}  // namespace cuda
}  // namespace nf4lora
