// thread_work.cuh: what ONE CUDA thread (or one lane of a warp) does, for every kernel,
// as __host__ __device__ functions of explicit indices (tid, block, lane).
//
// The __global__ kernels (codec_kernels.cu, gemv_kernel.cu) compute those indices from
// blockIdx/threadIdx and call these functions; csrc/cuda_host/host_driver.cpp calls them
// over the whole grid on the CPU. What cannot run on a host thread stays in the kernels
// and is kept tiny: copying a table into shared memory (+ __syncthreads), the warp
// butterfly (shuffles; the driver replays it over an array: common.cuh), and the GEMV's
// block ordering.
//
// Layouts as in csrc/cpu/kernels.h: flat row-major; n elements; blocks of `blocksize`
// consecutive elements (the last may be partial); 4-bit codes two per byte, element 2j in
// the high nibble of byte j.
#pragma once

#include "common.cuh"

namespace nf4lora {
namespace cuda {

NF4K_HD int64_t block_length(int64_t block, int64_t blocksize, int64_t n) {
  const int64_t left = n - block * blocksize;
  return left < blocksize ? left : blocksize;
}

// =================================================================================
// Quantize (4-bit in any format, and 8-bit with the dynamic map for the nested absmax).
// One warp per quantization block: the lanes take the block's max |x| together (a warp
// max), then each lane encodes and writes every 32nd output byte. The whole block is
// read twice (absmax, then encode), the second time from L1. Quantization runs once per
// weight, so this favours simplicity: for blocksize 32 half the lanes idle.
// =================================================================================
constexpr int kQuantWarps = 8;  // 256 threads per CUDA block, one quantization block per warp

struct QuantParams {
  const void* A;      // [n] input, float32 / float16 / bfloat16
  int64_t n;
  int64_t blocksize;  // any positive; even for 4-bit (no byte straddles two blocks)
  uint8_t* out;       // 4-bit: [ceil(n/2)] packed; 8-bit: [n] codes
  float* absmax;      // [ceil(n/blocksize)]
};

// How one output byte is made from scaled values.
struct Encode4 {
  static constexpr int kPerByte = 2;  // two codes, the first in the high nibble
  const CodeEncoder& encoder;  // the format (a kernel parameter on the device)
  NF4K_HD uint8_t operator()(const float* scaled) const {
    return pack_nibbles(encode_4bit(encoder, scaled[0]), encode_4bit(encoder, scaled[1]));
  }
};

struct Encode8 {
  static constexpr int kPerByte = 1;
  const float* code;  // the sorted 256-entry code (shared memory on the device)
  NF4K_HD uint8_t operator()(const float* scaled) const {
    return (uint8_t)encode_dynamic(code, scaled[0]);
  }
};

// Phase 1, per lane: max |x| over this lane's elements (every 32nd) of `block`.
// The warp combines the 32 partials with MaxOp (common.cuh).
template <class In>
NF4K_HD float quantize_lane_absmax(const QuantParams& p, int64_t block, int lane) {
  const auto* x = static_cast<const typename In::Storage*>(p.A) + block * p.blocksize;
  const int64_t len = block_length(block, p.blocksize, p.n);
  float m = 0.0f;
  for (int64_t i = lane; i < len; i += kWarp) m = nan_max(m, abs_f(In::widen(x[i])));
  return m;
}

// Phase 2, per lane, with the warp's absmax: scaled = x * (1 / absmax) (an IEEE
// reciprocal, then a multiply, as the reference), encode, write every 32nd byte.
// An all-zero block has reciprocal inf and scaled 0 * inf = NaN: every encoder maps it
// to code 0 (bitsandbytes' CUDA semantics). A NaN block has absmax NaN (callers report it).
template <class In, class Encode>
NF4K_HD void quantize_lane_encode(const QuantParams& p, const Encode& encode, int64_t block,
                                  int lane, float absmax) {
  constexpr int kPer = Encode::kPerByte;
  const auto* x = static_cast<const typename In::Storage*>(p.A) + block * p.blocksize;
  const int64_t len = block_length(block, p.blocksize, p.n);
  if (lane == 0) p.absmax[block] = absmax;
  const float r = div_rn(1.0f, absmax);
  uint8_t* out = p.out + block * p.blocksize / kPer;
  const int64_t bytes = (len + kPer - 1) / kPer;
  for (int64_t k = lane; k < bytes; k += kWarp) {
    float scaled[kPer];
    NF4K_UNROLL
    for (int e = 0; e < kPer; ++e) {
      const int64_t i = k * kPer + e;
      // Odd n (4-bit): the last low nibble encodes a padding 0.0 with this block's scale.
      scaled[e] = mul_rn(i < len ? In::widen(x[i]) : 0.0f, r);
    }
    out[k] = encode(scaled);
  }
}

// =================================================================================
// Dequantize 4-bit: one thread per 32 elements = one 16-byte load of packed codes.
// blocksize is a power of two >= 32, so the 32 elements share one block: one scale per
// thread, decoded right here from the nested 8-bit absmax when double-quantized (no
// separate absmax pass, no absmax buffer). Per element: a nibble extract, one LDS from
// the weight's 16 levels in shared memory (the kernel copies its CodeTable parameter
// there: 32 lanes reading 16 distinct words hit 16 distinct banks, no conflicts), one
// multiply (the reference's level * absmax, rounded once), a conversion. fp16/bf16 output
// is 4 16-byte stores, fp32 is 8.
// =================================================================================
constexpr int kDequantThreads = 256;
constexpr int kDequant4PerThread = 32;
constexpr int kDequant8PerThread = 16;

struct Dequant4Params {
  const uint8_t* packed;  // [ceil(n/2)]
  Scales scales;
  int64_t n;
  int blocksize_shift;    // log2(blocksize), >= 5
  void* out;              // [n] of Out
  bool vector_ok;         // packed and out 16-byte aligned: the 16-byte load/store path
};

template <class Out>
NF4K_HD void dequantize_4bit_thread(const Dequant4Params& p, const float* lut, int64_t tid) {
  const int64_t e0 = tid * kDequant4PerThread;
  if (e0 >= p.n) return;
  const float scale = p.scales(e0 >> p.blocksize_shift);
  auto* out = static_cast<typename Out::Storage*>(p.out) + e0;
  if (p.vector_ok && e0 + kDequant4PerThread <= p.n) {
    const Vec16 packed = load16_stream(p.packed + e0 / 2);
    NF4K_UNROLL
    for (int w = 0; w < 4; ++w) {  // 4 bytes = 8 elements per word
      int codes[8];
      unpack8(packed.w[w], codes);
      float v[8];
      NF4K_UNROLL
      for (int j = 0; j < 8; ++j) v[j] = mul_rn(lut[codes[j]], scale);
      store8<Out>(out + 8 * w, v);
    }
    return;
  }
  // The tail of an n that is not a multiple of 32, or unaligned pointers.
  const int64_t len = p.n - e0 < kDequant4PerThread ? p.n - e0 : kDequant4PerThread;
  for (int64_t i = 0; i < len; ++i)
    out[i] = Out::round(mul_rn(lut[unpack_code(p.packed, e0 + i)], scale));
}

// =================================================================================
// Dequantize 8-bit (blockwise with a 256-entry code): one thread per 16 codes (one
// 16-byte load). The code table sits in shared memory (1 KB).
// =================================================================================
struct Dequant8Params {
  const uint8_t* q;       // [n]
  const float* absmax;    // [ceil(n/blocksize)]
  int64_t n;
  int64_t blocksize;      // any positive
  void* out;              // [n] of Out
  bool vector_ok;         // q, out 16-byte aligned and 16 | blocksize (one block per thread)
};

template <class Out>
NF4K_HD void dequantize_8bit_thread(const Dequant8Params& p, const float* code, int64_t tid) {
  const int64_t e0 = tid * kDequant8PerThread;
  if (e0 >= p.n) return;
  auto* out = static_cast<typename Out::Storage*>(p.out) + e0;
  if (p.vector_ok && e0 + kDequant8PerThread <= p.n) {
    const float scale = p.absmax[e0 / p.blocksize];
    const Vec16 q = load16_stream(p.q + e0);
    NF4K_UNROLL
    for (int h = 0; h < 2; ++h) {
      float v[8];
      NF4K_UNROLL
      for (int j = 0; j < 8; ++j) v[j] = mul_rn(code[(q.w[2 * h + j / 4] >> (8 * (j % 4))) & 0xffu], scale);
      store8<Out>(out + 8 * h, v);
    }
    return;
  }
  const int64_t len = p.n - e0 < kDequant8PerThread ? p.n - e0 : kDequant8PerThread;
  for (int64_t i = 0; i < len; ++i)
    out[i] = Out::round(mul_rn(code[p.q[e0 + i]], p.absmax[(e0 + i) / p.blocksize]));
}

// =================================================================================
// GEMV with LoRA, M <= 8 rows of activations (decode):
//   y[m, n] = sum_k x[m, k] W[n, k] + sum_j t[m, j] B[n, j] + bias[n],
//   t = scaling * (x @ A^T)   (the LoRA shrink, [M, rank], float32)
//   h = x @ A^T rounded to T  (returned: backward needs it for lora_B's gradient)
// W is 4-bit [N, K]; x, A [rank, K], B [N, rank], bias [N], y [M, N] and h [M, rank] are
// fp16 or bf16; every product is accumulated in float32 (FMA), each output rounded once.
//
// A mixed-adapter batch (multi_lora_gemv_4bit) is the same kernel with kPerRow = true: row
// m uses adapter i = adapter_index[m] of the stacks A [adapters, rank, K], B [adapters, N,
// rank], and scalings[i]: t[m, j] = scalings[i] * x[m] . A_i[j], y[m, n] += sum_j t[m, j]
// B_i[n, j]. A row with i = -1 has t = h = 0 and no LoRA term (its y: the bytes of the
// matmul without LoRA). One adapter (lora_gemv_4bit) is kPerRow = false: adapter 0 and
// `scaling` on every row, known at compile time, so that instance is the code it was
// before per-row adapters existed (its PTX identical up to register names, 16 more bytes of
// parameters; scripts/check_cuda.sh: the same registers, sm_80 and sm_90).
//
// Work split: a warp owns R = gemv_rows_per_warp(M) rows of W (or one row of A: the
// shrink is the same dot product with a dense row, done in the same launch and the same
// loop over x). Lane l takes the chunks k0 = 32 l + 1024 s of 32 consecutive k: one
// 16-byte load of 4-bit weights per row, 8 x values per 16-byte load. After the K loop
// each lane adds its share of the expand (j = l, l + 32, ...), the warp sums the
// partials (butterfly), and lane m*R + r writes y[m, row0 + r] (+ bias).
//
// Why R rows per warp: each x value a lane loads is used for R rows, so the on-chip
// traffic for x is 2M/R bytes per weight (vs 0.52 B of HBM traffic per weight). With
// R = 1 (bitsandbytes' design) M = 8 needs 16 B of L1 per weight, far over L1's
// 128 B/clk/SM; R = 4 brings it to 4 B. The FMAs themselves (M per weight, on CUDA
// cores) are then the limit for M >= 4 (see nf4lora/backends/cuda.py: roofline).
// =================================================================================
constexpr int kGemvWarps = 4;     // 128 threads per CUDA block
constexpr int kGemvChunk = 32;    // consecutive k per lane per step: 16 bytes of weights
constexpr int kGemvMaxM = 8;

NF4K_HD constexpr int gemv_rows_per_warp(int M) { return M == 1 ? 1 : (M <= 3 ? 2 : 4); }

struct GemvParams {
  const void* x;          // [M, K] T
  const uint8_t* packed;  // W [N, K] 4-bit, flat row-major (a row may start mid-byte)
  Scales scales;
  int blocksize_shift;    // log2(blocksize), blocksize a power of two >= 32
  const void* lora_A;     // [rank, K] T; kPerRow: [adapters, rank, K]
  const void* lora_B;     // [N, rank] T; kPerRow: [adapters, N, rank]
  float scaling;          // one adapter's (kPerRow: unused)
  int rank;               // 0: no LoRA
  const void* bias;       // [N] T, or null
  float* t;               // [M, rank] float32 workspace: scaling * (x @ A^T)
  void* h;                // [M, rank] T: x @ A^T, rounded (returned for backward)
  void* y;                // [M, N] T
  int64_t N, K;
  bool vector_ok;         // K % 32 == 0 and x, A, W 16-byte aligned: the vector path
  // A mixed-adapter batch (kPerRow) only; last, so that the fields before keep their
  // offsets in the kernel's parameter block.
  const int64_t* adapter_index;  // [M], row m's adapter in [-1, adapters)
  const float* scalings;         // [adapters]
};

// Rows of the 4-bit weight as a source for lane_dot: a chunk is R 16-byte loads plus R
// block scales (K % 32 == 0 on this path, so a chunk never straddles a block).
template <int R>
struct PackedRows {
  static constexpr int kRows = R;
  const GemvParams& p;
  const float* lut;  // the weight's 16 levels, shared memory on the device
  int64_t row0;

  struct Chunk {
    Vec16 w[R];
    float scale[R];
  };

  NF4K_HD Chunk load(int64_t k0) const {
    Chunk c;
    NF4K_UNROLL
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      if (row < p.N) {
        const int64_t e = row * p.K + k0;
        c.w[r] = load16_stream(p.packed + e / 2);
        c.scale[r] = p.scales(e >> p.blocksize_shift);
      } else {  // rows past N (last warp): zeros, never written out
        c.w[r] = Vec16{{0u, 0u, 0u, 0u}};
        c.scale[r] = 0.0f;
      }
    }
    return c;
  }
  // The 8 dequantized weights of row r, sub-chunk s (k0 + 8s .. k0 + 8s + 7): exactly
  // the reference's level[code] * absmax.
  NF4K_HD void values(const Chunk& c, int r, int s, float w[8]) const {
    int codes[8];
    unpack8(c.w[r].w[s], codes);
    NF4K_UNROLL
    for (int j = 0; j < 8; ++j) w[j] = mul_rn(lut[codes[j]], c.scale[r]);
  }
  // One weight, for the element-wise path (any K, any alignment).
  NF4K_HD float value(int r, int64_t k) const {
    const int64_t row = row0 + r;
    if (row >= p.N) return 0.0f;
    const int64_t e = row * p.K + k;
    return mul_rn(lut[unpack_code(p.packed, e)], p.scales(e >> p.blocksize_shift));
  }
};

// One dense row of T (a row of LoRA A) as a source for lane_dot.
template <class T>
struct DenseRow {
  static constexpr int kRows = 1;
  const typename T::Storage* a;  // [K]

  struct Chunk {
    Vec16 raw[4];
  };
  NF4K_HD Chunk load(int64_t k0) const {
    Chunk c;
    NF4K_UNROLL
    for (int s = 0; s < 4; ++s) c.raw[s] = load16(a + k0 + 8 * s);
    return c;
  }
  NF4K_HD void values(const Chunk& c, int, int s, float w[8]) const { widen8<T>(c.raw[s], w); }
  NF4K_HD float value(int, int64_t k) const { return T::widen(a[k]); }
};

// One lane's partial dot products of the source's rows with M rows of x (x [M, K]), over
// the lane's chunks, in increasing k (the host driver replays the same order).
template <class T, int M, class Rows>
NF4K_HD void lane_dot(const GemvParams& p, const typename T::Storage* x, const Rows& rows,
                      int lane, float (&acc)[M][Rows::kRows]) {
  constexpr int R = Rows::kRows;
  NF4K_UNROLL
  for (int m = 0; m < M; ++m)
    NF4K_UNROLL
    for (int r = 0; r < R; ++r) acc[m][r] = 0.0f;
  for (int64_t k0 = (int64_t)lane * kGemvChunk; k0 < p.K; k0 += kWarp * kGemvChunk) {
    if (p.vector_ok) {  // K % 32 == 0: every chunk is whole
      const typename Rows::Chunk chunk = rows.load(k0);
      NF4K_UNROLL
      for (int s = 0; s < kGemvChunk / 8; ++s) {
        float xv[M][8];
        NF4K_UNROLL
        for (int m = 0; m < M; ++m) widen8<T>(load16(x + m * p.K + k0 + 8 * s), xv[m]);
        NF4K_UNROLL
        for (int r = 0; r < R; ++r) {
          float w[8];
          rows.values(chunk, r, s, w);
          NF4K_UNROLL
          for (int j = 0; j < 8; ++j)
            NF4K_UNROLL
            for (int m = 0; m < M; ++m) acc[m][r] = fma_rn(xv[m][j], w[j], acc[m][r]);
        }
      }
    } else {  // element-wise: K not a multiple of 32, or unaligned pointers
      const int64_t end = k0 + kGemvChunk < p.K ? k0 + kGemvChunk : p.K;
      for (int64_t k = k0; k < end; ++k) {
        float xv[M];
        NF4K_UNROLL
        for (int m = 0; m < M; ++m) xv[m] = T::widen(x[m * p.K + k]);
        NF4K_UNROLL
        for (int r = 0; r < R; ++r) {
          const float w = rows.value(r, k);
          NF4K_UNROLL
          for (int m = 0; m < M; ++m) acc[m][r] = fma_rn(xv[m], w, acc[m][r]);
        }
      }
    }
  }
}

// t is written by other warps (other CUDA blocks) of the same launch: read it from L2,
// never from a possibly stale L1 line.
NF4K_HD float load_coherent(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// Row m's adapter: adapter_index[m] in a mixed batch (-1: none), else adapter 0.
template <bool kPerRow>
NF4K_HD int64_t row_adapter(const GemvParams& p, int m) {
  return kPerRow ? p.adapter_index[m] : 0;
}

// --- the shrink: one warp per row j of A and group of rows of x -------------------
// One adapter: warp j takes all M rows of x (one A row, loaded once for all of them). A
// mixed batch: warp u takes row m = u / rank of x and row j = u % rank of that row's
// adapter's A, so M * rank warps (a row's own A row is the whole point; the x row is the
// one reused, and it stays in L1/L2: 8 KB at K = 4096).
NF4K_HD constexpr int gemv_shrink_rows(int M, bool per_row) { return per_row ? 1 : M; }
NF4K_HD constexpr int gemv_shrink_warps(int M, int rank, bool per_row) {
  return rank * (M / gemv_shrink_rows(M, per_row));
}

// What shrink warp u (0 <= u < gemv_shrink_warps) computes.
struct ShrinkWarp {
  int m0;  // its first row of x (whose adapter is the warp's)
  int j;   // its row of A
};

template <bool kPerRow>
NF4K_HD ShrinkWarp shrink_warp(const GemvParams& p, int u) {
  return kPerRow ? ShrinkWarp{u / p.rank, u % p.rank} : ShrinkWarp{0, u};
}

// The dot products of the warp's rows of x with row j of their adapter's A. A row without
// adapter (-1) dots with adapter 0's row and its store writes 0 instead: branching around
// the dot instead made ptxas spill at M = 1 on sm_80 (20 bytes, a 16-byte stack frame;
// 40 registers), and the row it reads (K * 2 bytes, 8 KB at K = 4096) is likely in L2.
template <class T, int M, bool kPerRow>
NF4K_HD void shrink_lane_dot(const GemvParams& p, int u, int lane,
                             float (&acc)[gemv_shrink_rows(M, kPerRow)][1]) {
  constexpr int S = gemv_shrink_rows(M, kPerRow);
  const ShrinkWarp w = shrink_warp<kPerRow>(p, u);
  const int64_t adapter = row_adapter<kPerRow>(p, w.m0);
  const auto* A = static_cast<const typename T::Storage*>(p.lora_A);
  const DenseRow<T> row{A + ((adapter < 0 ? 0 : adapter) * p.rank + w.j) * p.K};
  lane_dot<T, S>(p, static_cast<const typename T::Storage*>(p.x) + (int64_t)w.m0 * p.K, row, lane,
                 acc);
}

// After the warp sum (every lane holds all sums): lane s writes t[m0 + s, j], the scaled
// float32 sum the expand uses, and h[m0 + s, j], the same sum rounded to T (both 0 on a
// row without adapter).
template <class T, int M, bool kPerRow>
NF4K_HD void shrink_lane_store(const GemvParams& p, int u, int lane,
                               const float (&sum)[gemv_shrink_rows(M, kPerRow)][1]) {
  constexpr int S = gemv_shrink_rows(M, kPerRow);
  const ShrinkWarp w = shrink_warp<kPerRow>(p, u);
  auto* h = static_cast<typename T::Storage*>(p.h);
  const int64_t adapter = row_adapter<kPerRow>(p, w.m0);
  const float scaling = !kPerRow ? p.scaling : adapter < 0 ? 0.0f : p.scalings[adapter];
  NF4K_UNROLL
  for (int s = 0; s < S; ++s)
    if (lane == s) {
      const int m = w.m0 + s;
      const float v = adapter < 0 ? 0.0f : sum[s][0];
      p.t[m * p.rank + w.j] = mul_rn(scaling, v);
      h[m * p.rank + w.j] = T::round(v);
    }
}

// --- the main GEMV: warp owns rows row0 .. row0 + R - 1 --------------------------
template <class T, int M>
NF4K_HD void gemv_lane_dot(const GemvParams& p, const float* lut, int64_t row0, int lane,
                           float (&acc)[M][gemv_rows_per_warp(M)]) {
  const PackedRows<gemv_rows_per_warp(M)> rows{p, lut, row0};
  lane_dot<T, M>(p, static_cast<const typename T::Storage*>(p.x), rows, lane, acc);
}

// The expand, this lane's share (j = lane, lane + 32, ...), added to the partials before
// the warp sum, so one butterfly reduces both. Needs all of t: on the device, after the
// wait on the shrink warps (gemv_kernel.cu). Row m reads its adapter's B; a row without
// adapter reads none and adds nothing (its t is 0, but 0 * an Inf in some B is NaN). One
// adapter loads B[row, j] once for all M rows. Why `if constexpr` and not one generic
// per-row load that folds to the same thing for adapter 0: that form changed LLVM's
// unrolling of the j loop in the one-adapter instances (their PTX differed at M = 3..6);
// this one leaves their PTX as it was.
template <class T, int M, bool kPerRow>
NF4K_HD void gemv_lane_expand(const GemvParams& p, int64_t row0, int lane,
                              float (&acc)[M][gemv_rows_per_warp(M)]) {
  constexpr int R = gemv_rows_per_warp(M);
  const auto* B = static_cast<const typename T::Storage*>(p.lora_B);
  const typename T::Storage* B_of[M];  // row m's adapter's B, null: none
  NF4K_UNROLL
  for (int m = 0; m < M; ++m) {
    const int64_t adapter = row_adapter<kPerRow>(p, m);
    B_of[m] = adapter < 0 ? nullptr : B + adapter * p.N * p.rank;
  }
  for (int j = lane; j < p.rank; j += kWarp) {
    float t[M];
    NF4K_UNROLL
    for (int m = 0; m < M; ++m) t[m] = load_coherent(p.t + m * p.rank + j);
    NF4K_UNROLL
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      if (row >= p.N) continue;
      float b = kPerRow ? 0.0f : T::widen(B[row * p.rank + j]);
      NF4K_UNROLL
      for (int m = 0; m < M; ++m) {
        if constexpr (kPerRow) {
          if (B_of[m] == nullptr) continue;
          b = T::widen(B_of[m][row * p.rank + j]);
        }
        acc[m][r] = fma_rn(t[m], b, acc[m][r]);
      }
    }
  }
}

// After the warp sum: lane m*R + r adds the bias and writes y[m, row0 + r]. (A lane
// cannot index its registers with a run-time value, so every lane walks all M*R
// compile-time slots and stores the one that is its own.)
template <class T, int M>
NF4K_HD void gemv_lane_store(const GemvParams& p, int64_t row0, int lane,
                             const float (&sum)[M][gemv_rows_per_warp(M)]) {
  constexpr int R = gemv_rows_per_warp(M);
  auto* y = static_cast<typename T::Storage*>(p.y);
  const auto* bias = static_cast<const typename T::Storage*>(p.bias);
  NF4K_UNROLL
  for (int m = 0; m < M; ++m)
    NF4K_UNROLL
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      if (lane != m * R + r || row >= p.N) continue;
      const float v = bias != nullptr ? add_rn(sum[m][r], T::widen(bias[row])) : sum[m][r];
      y[m * p.N + row] = T::round(v);
    }
}

// Launch geometry. CUDA blocks [0, shrink_blocks) compute t (warp w of block b: shrink
// warp b * kGemvWarps + w, see shrink_warp); the rest compute y (warp w of block b: rows
// ((b - shrink_blocks) * kGemvWarps + w) * R ...). On the device "block b" is the order
// in which blocks START (an atomic ticket), not blockIdx: see gemv_kernel.cu.
struct GemvGrid {
  int64_t shrink_blocks;
  int64_t blocks;  // total
};

NF4K_HD GemvGrid gemv_grid(int M, int64_t N, int rank, bool per_row) {
  const int R = gemv_rows_per_warp(M);
  const int64_t groups = (N + R - 1) / R;
  const int64_t shrink = ((int64_t)gemv_shrink_warps(M, rank, per_row) + kGemvWarps - 1) / kGemvWarps;
  return GemvGrid{shrink, shrink + (groups + kGemvWarps - 1) / kGemvWarps};
}

}  // namespace cuda
}  // namespace nf4lora
