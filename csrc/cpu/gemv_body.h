// gemv_body.h: the fused 4-bit matmul for a few rows of activations (decode and small
// batches; the cpu backend uses it up to M = 32, its measured crossover),
//
//     y = x @ W^T + (scaling * (x @ A^T)) @ B^T + bias        h = x @ A^T (returned)
//
// with W [N, K] 4-bit in any format (its code table is data, nested absmax decoded on the
// fly), x [M, K], lora_A [r, K], lora_B [N, r], bias [N], y [M, N], h [M, r], all
// activations in one dtype; or, for a mixed-adapter batch, each row of x its own adapter
// of a stack (isa.h GemvWork::adapter: phase 2 and gemv_finish_row read that adapter's
// rows of A and B; the single adapter is adapter 0 for every row). Included
// by every ISA translation unit after kernel_body.h, like it (no include guard); it
// uses the same primitives plus:
//
//   fmadd(a, b, c)                a * b + c (one rounding where the ISA has FMA)
//   hsum(F)                       sum of the kW lanes in a fixed order
//   GemvDecoderFor<T>::type       the decoder for activations of type T (a Decoder below)
//   kGemvAccumulators             accumulators a tile may keep (registers to spare)
//   block_constants(w, b0, n, out)  the float constants of blocks [b0, b0 + n) of w
//
// A Decoder turns packed bytes into weight vectors and multiplies them with x:
//   kGroup, kVectors              weights per step (from kGroup / 2 bytes), vectors per step
//   X, Weights                    element type of the x copy; type of a weight vector
//   to_x(v)                       one activation as X (exact)
//   source(j)                     position j of a group holds element source(j)
//   Decoder(table)                per call, from the weight's CodeTable
//   Table, table(scale)           what decoding a block needs, from its constant
//   decoder(t, p, w)              the group at p into w[kVectors], in source() order
//   madd(w, x, acc)               acc + w . x, x the kGroup / kVectors X at that pointer
// GemvDecoder (every ISA) makes float32 weights level[code] * scale and madd is an
// FMA; AVX512-BF16's bf16 decoder (isa_avx512.cpp) makes bf16 weights and uses
// vdpbf16ps. Its blocksize must be a multiple of its kGroup, or GemvDecoder runs.
//
// Integer decoders (kIntegerSums; 16-bit activations on AVX2 and AVX-512) multiply
// 16-bit integers: the table's levels as int16 (isa.h int16_levels) and x per group
// of 64 (kGemvXGroup) as int16 with one float scale (gemv_prepare_rows). A step's products
// are summed exactly in int32 lanes (Sum; madd is vpmaddwd + add, or AVX512-VNNI
// vpdpwssd), then folded once into the float32 accumulators with the block constant times
// x's scale (Decoder::fold: AVX-512's step of 128 covers two groups of 64, half the lanes
// each; a blocksize must be a multiple of 64, and a row's last step may be half empty):
// the per-block scale costs one multiply per 64 weights, not one per weight, and the
// table is the same for every block. Error: each weight's level within 0.5 / 16383 and
// each x within 0.5 / 16383 of its group's max |x| (3e-5), against bf16's 2^-9 = 2e-3
// per element: more exact than the dense bf16 baseline (tests/test_cpu_matmul.py). They
// run when the dispatcher says so (GemvWork::sums: 16-bit activations, every element of
// x finite, and the rows of x few enough for them to win) and the ISA has one
// (kHasIntegerDecoder, GemvIntegerDecoder). float32 activations keep the float decoder:
// 3e-5 would be far above float32's own error.
// The opt-in int8 decoder (isa_avx512.cpp GemvInt8Decoder, NF4LORA_CPU_GEMV=int8,
// kHasInt8Decoder) is the same walk with int8 levels (x 127) and a Sum that starts at a
// per-row, per-step value stored after the step's x (Decoder::start, start_values,
// kStartColumns): less exact than dense bf16, so the dispatcher never picks it itself.
//
// Why this shape: at M = 1 the op reads 0.52 bytes of W per 2 FLOPs, so it is bound by
// memory bandwidth, and W must be decoded in registers, never written out. Each
// weight is table[code] * absmax, exactly what dequantize_4bit to float32 computes (to
// bfloat16 for the bf16 decoder), so the only difference from dequantize + matmul is
// the summation order. Accumulation is float32 for every activation dtype.
//
// x is copied once, as X, in the decoder's order (x_paired: per group of kGroup
// elements, position j holds element source(j); the rows of a tile interleaved by
// group), so the decoded vectors multiply x with plain loads. K is a multiple of the
// blocksize (the caller checks), and the blocksize (a multiple of 32) of a float
// decoder's kGroup, so every row of W starts on a block boundary and every block is whole
// groups (integer decoders: whole scale groups, see above).
//
// Determinism: each output element is computed by one thread in a fixed order, so the
// bytes do not depend on the thread count or on which thread takes which rows.

// Tiles of up to kMaxTile rows of x share one decode of W (8 accumulators; the decoder's
// tables and temporaries take the rest of AVX2's 16 registers, or spill to L1).
constexpr int kMaxTile = 8;

// The decoder for activations of type T and this call's blocksize; fn(Decoder()).
template <class T, class Fn>
void with_decoder(const GemvWork& a, Fn fn) {
  if constexpr (kHasIntegerDecoder && !std::is_same_v<T, float>) {
    if (a.sums != GemvSums::kFloat && a.weight.blocksize % kGemvXGroup == 0) {
      if constexpr (kHasInt8Decoder)
        if (a.sums == GemvSums::kInt8) return fn(GemvInt8Decoder(a.weight.table));
      return fn(GemvIntegerDecoder(a.weight.table));
    }
  }
  using Special = typename GemvDecoderFor<T>::type;
  if (a.weight.blocksize % Special::kGroup == 0) fn(Special(a.weight.table));
  else fn(GemvDecoder(a.weight.table));
}

// ---- phase 1, per row m of x: copies (float32 in natural order for h, X in the
// decoder's order for W).
// X elements of x_paired per row and step: the step's kGroup, then (integer decoders with
// kStartColumns) the start values of the row's Sum for that step.
template <class Decoder>
constexpr int64_t x_stride() {
  if constexpr (Decoder::kIntegerSums) return Decoder::kGroup + Decoder::kStartColumns;
  else return Decoder::kGroup;
}

// X elements of x_paired per row: K rounded up to whole decoder groups (an integer decoder's
// step may cover two x scale groups, of which the last one of a row can be missing: its
// positions hold x = 0, so whatever the decoder reads there adds nothing), x_stride() each.
template <class Decoder>
int64_t paired_columns(int64_t K) {
  return (K + Decoder::kGroup - 1) / Decoder::kGroup * x_stride<Decoder>();
}

template <class In, class Decoder>
void gemv_prepare_rows(const GemvWork& a, int64_t m) {
  using X = typename Decoder::X;
  const In* x = static_cast<const In*>(a.x) + m * a.K;
  // Tile-interleaved: the tile's rows of one group are adjacent, so the inner loop
  // reads x at constant offsets from one pointer (a base register per row of x ran out
  // of registers at 8 rows and spilled).
  constexpr int kGroup = Decoder::kGroup;
  constexpr int64_t kStride = x_stride<Decoder>();
  const int64_t m0 = m - m % kMaxTile, Kp = paired_columns<Decoder>(a.K);
  const int64_t tile = a.M - m0 < kMaxTile ? a.M - m0 : kMaxTile;
  X* paired = reinterpret_cast<X*>(a.x_paired) + m0 * Kp + (m - m0) * kStride;
  if constexpr (Decoder::kIntegerSums) {
    static_assert(kGroup % kGemvXGroup == 0, "whole activation scale groups per step");
    constexpr int kScales = kGroup / kGemvXGroup;
    float* scales = a.x_scales + m * (a.K / kGemvXGroup);
    const int64_t columns = (a.K + kGroup - 1) / kGroup * kGroup;  // whole steps
    for (int64_t g = 0; g < columns; g += kGroup) {
      // the step's levels in natural order, vectorized (scalar, with fp16 converted in
      // software and lrintf a libm call, this was ~20 us of an M = 1 call at K = 4096:
      // the whole GEMV of a 64 x 4096 W), then placed in the decoder's order
      alignas(64) int32_t level[kGroup];
      for (int s = 0; s < kScales; ++s) {
        const int64_t e0 = g + s * kGemvXGroup;
        int32_t* out = level + s * kGemvXGroup;
        if (e0 >= a.K) {  // the missing half of a row's last step: x = 0
          memset(out, 0, kGemvXGroup * sizeof(int32_t));
          continue;
        }
        const float max_abs = Decoder::x_levels(x + e0, out);
        // x's level times this times a weight's level is their product: both level scales
        // come out here (once per 64 elements, so the fold is one multiply per block)
        scales[e0 / kGemvXGroup] = static_cast<float>(
            double(max_abs) / (double(Decoder::kLevelScale) * double(Decoder::kLevelScale)));
      }
      X* step = paired + g / kGroup * tile * kStride;
      for (int j = 0; j < kGroup; ++j) step[j] = static_cast<X>(level[Decoder::source(j)]);
      Decoder::start_values(step, step + kGroup);
    }
  } else {
    for (int64_t g = 0; g < a.K; g += kGroup)
      for (int j = 0; j < kGroup; ++j)
        paired[g * tile + j] = Decoder::to_x(x[g + Decoder::source(j)]);
  }
  if (a.x_natural != nullptr) {  // K is a multiple of the blocksize, hence of kW
    for (int64_t k = 0; k < a.K; k += kW) store_out<float>(a.x_natural + m * a.K + k, load(x + k));
  }
}

template <class In>
void gemv_prepare_impl(const GemvWork& a, int64_t m) {
  with_decoder<In>(a, [&](auto decoder) { gemv_prepare_rows<In, decltype(decoder)>(a, m); });
}

// ---- phase 2, per (m, j): h[m, j] = x[m] . A[j] with A row m's adapter, rounded to the
// activation dtype as the h that backward saves; the epilogue uses that rounded value
// times the adapter's scaling. A row without adapter (-1) gets h = 0, and no LoRA term.
template <class T>
void gemv_lora_h_impl(const GemvWork& a, int64_t m, int64_t j) {
  const int64_t adapter = a.adapter(m);
  if (adapter < 0) {
    static_cast<T*>(a.h)[m * a.rank + j] = from_float<T>(0.0f);
    a.h_scaled[m * a.rank + j] = 0.0f;
    return;
  }
  const float* x = a.x_natural + m * a.K;
  const T* row = static_cast<const T*>(a.lora_A) + (adapter * a.rank + j) * a.K;
  // Four chains: a quarter of the FMA latency per element, and sums a quarter as long
  // (one chain was 6x torch's float32 error at K = 1088).
  F acc[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
  int64_t k = 0;
  for (; k + 4 * kW <= a.K; k += 4 * kW)
    for (int c = 0; c < 4; ++c) acc[c] = fmadd(load(x + k + c * kW), load(row + k + c * kW), acc[c]);
  for (; k + kW <= a.K; k += kW) acc[0] = fmadd(load(x + k), load(row + k), acc[0]);
  float sum = hsum(add(add(acc[0], acc[1]), add(acc[2], acc[3])));
  for (; k < a.K; ++k) sum = add_rn(sum, mul_rn(x[k], to_float(row[k])));
  const T rounded = from_float<T>(sum);
  static_cast<T*>(a.h)[m * a.rank + j] = rounded;
  a.h_scaled[m * a.rank + j] = mul_rn(to_float(rounded), a.scaling_of(adapter));
}

// ---- phase 3: rows [n0, n1) of y for MT consecutive rows of x starting at m0. -------

// y[m0 + m, n] from the finished accumulators: LoRA term, bias, rounding to T.
template <class T, int MT, int kChains>
void gemv_finish_row(const GemvWork& a, const F (&acc)[MT][kChains], int64_t m0, int64_t n) {
  const T* bias = static_cast<const T*>(a.bias);
  for (int m = 0; m < MT; ++m) {
    F sum_v = acc[m][0];
    for (int c = 1; c < kChains; ++c) sum_v = add(sum_v, acc[m][c]);
    // LoRA: sum_j (scaling * h[m, j]) * B[n, j] with B row m's adapter, folded into the
    // same lanes (none for a row without adapter: its y is the base's, bit for bit).
    const int64_t adapter = a.rank > 0 ? a.adapter(m0 + m) : -1;
    const int64_t rank = adapter < 0 ? 0 : a.rank;
    const T* b_row = rank > 0 ? static_cast<const T*>(a.lora_B) + (adapter * a.N + n) * rank : nullptr;
    const float* hs = a.h_scaled + (m0 + m) * a.rank;
    int64_t j = 0;
    for (; j + kW <= rank; j += kW) sum_v = fmadd(load(hs + j), load(b_row + j), sum_v);
    float sum = hsum(sum_v);
    for (; j < rank; ++j) sum = add_rn(sum, mul_rn(hs[j], to_float(b_row[j])));
    if (bias != nullptr) sum = add_rn(sum, to_float(bias[n]));
    static_cast<T*>(a.y)[(m0 + m) * a.N + n] = from_float<T>(sum);
  }
}

// An 8-row tile walks W in slices of K (k_slice columns) so that its slice of x stays
// in L1 while up to kSliceRows rows of W go past it. Without the slices it streams its
// whole x (8 x 4096 float32 = 128 KiB) from L2 for every row of W, 1 KiB per 32 weights
// against L2's 32 bytes a cycle. Smaller tiles read W row by row: their x costs L2 less,
// and the short strided pieces of W that slicing makes defeat the hardware prefetcher.
// Measured (bf16, AVX2, TSC ticks per 32 weights, one thread): M = 8, 4096x4096 with W
// in cache 25.9 -> 22.5; cold W (16384x11008) 29.6-31.1 -> 28.2-30.8; M = 1 cold
// 8.4-9.6 unsliced, 10.4-13.8 sliced. Two threads, cold: within this machine's noise
// (+-15%) of unsliced at M = 8, slower at M = 1-4.
// Every accumulator sees the same FMAs in the same order either way (the slices only
// interleave rows), so the bytes do not depend on the slicing.
constexpr int kMinSlicedTile = 8;
constexpr int64_t kSliceRows = 16;
constexpr int64_t kSliceBytes = 16 << 10;  // of x per slice: half a 32 KiB L1

// One row of W, columns [k0, k1), against the tile's MT rows of x (xg: the tile's x at
// k0; p: the packed bytes at k0; constants: the float constants of its blocks from k0),
// into acc. Float decoders: an FMA (or vdpbf16ps) per vector and row.
template <int MT, int kChains, class Decoder>
void walk_float(const GemvWork& a, const Decoder& decode, const float* constants, const uint8_t* p,
                const typename Decoder::X* xg, int64_t k0, int64_t k1, F (&acc)[MT][kChains]) {
  constexpr int kGroup = Decoder::kGroup, kVectors = Decoder::kVectors, kStep = kGroup / kVectors;
  const int64_t blocksize = a.weight.blocksize;
  // local accumulators: acc (a reference) might alias constants[] for all the compiler
  // knows, which made it store and reload all of them at every group
  F chains[MT][kChains];
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < kChains; ++c) chains[m][c] = acc[m][c];
  for (int64_t k = k0, b = 0; k < k1; k += blocksize, ++b) {
    const typename Decoder::Table table = decode.table(constants[b]);
    for (int64_t g = 0; g < blocksize; g += kGroup, p += kGroup / 2, xg += MT * kGroup) {
      typename Decoder::Weights w[kVectors];
      decode(table, p, w);
      for (int m = 0; m < MT; ++m)
        for (int v = 0; v < kVectors; ++v)
          chains[m][v % kChains] =
              Decoder::madd(w[v], xg + m * kGroup + v * kStep, chains[m][v % kChains]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < kChains; ++c) acc[m][c] = chains[m][c];
}

// Integer decoders: per step and row, exact int32 sums, then one FMA that folds them in
// with fold = (block constant) * (x's scale), per scale group of kGemvXGroup columns
// (Decoder::fold: the factor of each int32 lane; a step may cover two scale groups). The
// fold factors of a chunk of kFoldColumns are computed first, vectorized, so the inner
// loop only loads them. Consecutive steps alternate chains (the fold is the loop-carried
// dependency).
constexpr int64_t kFoldColumns = 4096;  // a multiple of every blocksize and decoder step
constexpr int64_t kFoldScales = kFoldColumns / kGemvXGroup;

// How far ahead of the step being decoded W is prefetched (16 steps at AVX-512's 64 bytes).
// Cold W (4096x4096 and 11008x4096 rotated through > 256 MB), M = 1, one Zen 4 thread,
// interleaved against the build without it: 0.65-0.99x the time at 1 KiB (4 runs, load
// average 1-5); 256 B and 4 KiB were not better. Re-measured at the decode shapes
// (2048x2048, 5632x2048, 2048x5632, 4096x4096; one and two threads, W in cache and
// streamed): 512 B, 2, 4 and 8 KiB all within +-4% of 1 KiB, as close as two builds of
// the same source.
constexpr int64_t kPrefetchBytes = 1024;

// Rows of few blocks: the integer walk gets each row's block constants ready (`ready`)
// and computes the next row's (from block `next_block`, into `next`) halfway through its
// own steps, where they overlap with the steps, instead of between two rows, where a
// row's constants (the nested lookup: ~26 TSC ticks of ~80 a row costs beyond its steps at
// K = 2048) waited for nothing else. One Zen 4 thread, M = 1, NF4 + double quant,
// blocksize 64, old and new builds interleaved in one process, time with W in cache /
// streamed: K = 1536 0.90 / 0.91x, 2048 0.90-0.91 / 0.90-0.95x (two threads 0.90-0.92 /
// 0.93-0.95x), 2560 0.95 / 0.98x, 3072 0.84-0.95 / 0.88-0.98x; but 3584 1.02 / 1.06x and
// 4096 1.00 / 1.00-1.09x: up to 48 blocks (3 lookups of 16 mid-row), not beyond (cutting
// the next row's constants into pieces of 32 or 16 blocks spread over the steps, to reach
// K = 4096, was 1.2-1.6x slower even at K = 2048: the step loop's code got worse around
// it; the one test at steps / 2 leaves it alone). M = 2-3:
// 0.96-1.02x. Bit-identical either way (the same constants, the same sums). AVX-512 only:
// AVX2's walk (64-weight steps, gathered constants) has not been timed on an AVX2 CPU.
constexpr int64_t kPipelinedMaxBlocks = 48;
// ready: the row's constants of [k0, k1) (the whole row, one chunk); next_block >= 0: the
// next row's first block, whose constants go to `next`.
struct NextRow {
  const float* ready = nullptr;
  int64_t next_block = -1;
  float* next = nullptr;
};

template <int MT, int kChains, class Decoder>
void walk_integer(const GemvWork& a, const Decoder& decode, int64_t block, const uint8_t* p,
                  const typename Decoder::X* xg, const float* x_scales, int64_t k0, int64_t k1,
                  F (&acc)[MT][kChains], const NextRow& pipe = NextRow()) {
  constexpr int kGroup = Decoder::kGroup, kVectors = Decoder::kVectors, kStep = kGroup / kVectors;
  constexpr int kScales = kGroup / kGemvXGroup;
  constexpr int64_t kStride = x_stride<Decoder>();
  const int64_t scales_per_block = a.weight.blocksize / kGemvXGroup, scales_per_row = a.K / kGemvXGroup;
  alignas(64) float own_scale[kFoldScales];
  alignas(64) float fold[MT][kFoldScales + kScales];  // + the missing half of a last step
  F chains[MT][kChains];
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < kChains; ++c) chains[m][c] = acc[m][c];
  // the prefetches stay inside W: past its end one can hit memory that is not mapped, a
  // failed page walk each (gemv_interleaved.h far_prefetch_distance)
  const uint8_t* const last_ahead = a.weight.packed + (a.weight.n + 1) / 2 - kPrefetchBytes;
  for (int64_t c0 = k0; c0 < k1; c0 += kFoldColumns) {
    const int64_t columns = k1 - c0 < kFoldColumns ? k1 - c0 : kFoldColumns;
    const int64_t scales = columns / kGemvXGroup, blocks = columns / a.weight.blocksize;
    const int64_t steps = (columns + kGroup - 1) / kGroup;
    const float* block_scale = pipe.ready;
    if (block_scale == nullptr) {
      block_constants(a.weight, block, blocks, own_scale);
      block_scale = own_scale;
    }
    block += blocks;
    for (int m = 0; m < MT; ++m) {
      Decoder::fold_factors(block_scale, x_scales + m * scales_per_row + c0 / kGemvXGroup, scales,
                            scales_per_block, fold[m]);
      for (int64_t s = scales; s % kScales != 0; ++s) fold[m][s] = 0.0f;  // x = 0 there too
    }
    // step j goes to chain j % kChains (constant indices keep the chains in registers)
    for (int64_t j0 = 0; j0 < steps; j0 += kChains) {
      for (int c = 0; c < kChains && j0 + c < steps; ++c, p += kGroup / 2, xg += MT * kStride) {
        typename Decoder::Weights w[kVectors];
        __builtin_prefetch(p < last_ahead ? p + kPrefetchBytes : p);
        if (pipe.next_block >= 0 && j0 + c == steps / 2)
          block_constants(a.weight, pipe.next_block, blocks, pipe.next);
        if (kScales > 1 && (j0 + c + 1) * kGroup > columns) {
          // a row's last step with only its first scale group: read that half into a
          // zeroed copy (the bytes after it are the next row's, or past the end of W)
          alignas(64) uint8_t half[kGroup / 2] = {};
          memcpy(half, p, (columns % kGroup) / 2);
          decode(0.0f, half, w);
        } else {
          decode(0.0f, p, w);
        }
        for (int m = 0; m < MT; ++m) {
          const typename Decoder::X* xm = xg + m * kStride;
          typename Decoder::Sum sum = Decoder::start(xm + kGroup);
          for (int v = 0; v < kVectors; ++v) sum = Decoder::madd(w[v], xm + v * kStep, sum);
          chains[m][c] = fmadd(Decoder::sum_to_float(sum), Decoder::fold(fold[m] + (j0 + c) * kScales),
                               chains[m][c]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < kChains; ++c) acc[m][c] = chains[m][c];
}

template <class T, int MT, class Decoder>
void gemv_tile(const GemvWork& a, const Decoder& decode, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int kGroup = Decoder::kGroup, kVectors = Decoder::kVectors;
  using X = typename Decoder::X;
  // Independent accumulator chains per row of x: an FMA has 4 cycles of latency and a
  // group issues kVectors of them per row, so small tiles split them over up to
  // kVectors chains, at most half of kGemvAccumulators (8 of AVX2's 16 registers), and
  // kGemvAccumulators in all; half of that for a decoder of more vectors than that (its
  // weights take the registers: AVX2's 64-weight float step, 8 vectors, spilled 6 of 8
  // chains to the stack at M = 1, and 4 per row at M = 2 took 1.09x the time of 2).
  constexpr bool kWide = kVectors > kGemvAccumulators / 2;
  constexpr int kRowChains = kWide ? kGemvAccumulators / 2 : kVectors;
  constexpr int kBudget = kWide ? kGemvAccumulators / 2 : kGemvAccumulators;
  constexpr int kChains = MT * kRowChains <= kBudget ? kRowChains : (MT * 2 <= kBudget ? 2 : 1);
  const int64_t blocksize = a.weight.blocksize;
  const int64_t blocks_per_row = a.K / blocksize;
  // slices end where both a block and a decoder step end
  const int64_t granule = blocksize % kGroup == 0 ? blocksize : std::lcm(blocksize, int64_t(kGroup));
  // (x's bytes per column: sizeof(X), times x_stride / kGroup with start values)
  int64_t k_slice = kSliceBytes * kGroup / (MT * int64_t(sizeof(X)) * x_stride<Decoder>()) / granule * granule;
  // integer decoders: whole vectors of fold factors per slice (fold_factors' scalar tail
  // was 16% of an int8 M = 8 call's cycles with 1280-column slices; 1024-column ones: int8
  // 6.0 -> 4.0 ms, int16 6.1 -> 4.2 ms, one Zen 4 thread, 4096x4096 in cache, noisy)
  if constexpr (Decoder::kIntegerSums) {
    const int64_t whole = std::lcm(granule, int64_t(kW * kGemvXGroup));
    if (k_slice >= whole) k_slice = k_slice / whole * whole;
  }
  if (k_slice < granule) k_slice = granule;
  if (MT < kMinSlicedTile) k_slice = a.K;
  const X* x = reinterpret_cast<const X*>(a.x_paired) + m0 * paired_columns<Decoder>(a.K);
  F saved[kSliceRows][MT][kChains];  // accumulators between slices
  // the integer walk's rows' constants, this row's and the next (see kPipelinedMaxBlocks):
  // AVX-512, unsliced tiles, rows of one fold chunk and few blocks
  alignas(64) float pipe_scale[2][kFoldScales];
  const bool pipelined = kW == 16 && MT < kMinSlicedTile && a.K <= kFoldColumns &&
                         blocks_per_row <= kPipelinedMaxBlocks;
  // Float decoders: the block constants of kSliceRows whole rows in one call (each row's
  // blocks follow the previous row's). A call per row and slice, with the 256-entry nested
  // code loaded into registers each time, cost ~150 TSC ticks, as much as 16 of the M = 8
  // tile's 64-weight groups. (The integer walk at M = 1 was faster so with W in cache, but
  // 1.2-1.3x slower with W streamed from memory, as was keeping its chains in registers by
  // rotating them, and forcing these helpers inline: measured, not understood. Re-measured
  // alone, one Zen 4 thread, M = 1, old and new builds interleaved in one process: with W
  // in cache 0.86-0.90x the time at K = 2048 and 5632, 1.0x at 4096; with W streamed
  // 0.94-1.08x at K = 2048 and 5632 and 1.18x at 4096x4096. Constants per 4 or 8 rows,
  // and prefetching the group's next 3-7 KiB of W before them, were no better. What a row
  // costs beyond its steps at K = 2048 is ~80 TSC ticks, a third of its time (2.96 ticks
  // per 32 weights in cache, the step loop alone ~1.7): the nested lookup ~26 (10 + 0.45 a
  // block, against float32 absmax), the rest the fold factors, the row's setup and sums;
  // finishing 16 rows' sums at once (bit-identical, no row waiting on its own reduction)
  // changed nothing measurable. Walking two rows of W at once (step by step, x loaded once
  // for both, bit-identical): 0.95-1.03x in cache, but 1.3-1.9x the time with W streamed:
  // the two interleaved streams, K / 2 bytes apart, defeat the prefetchers that one
  // sequential row at a time keeps busy.)
  std::vector<float> constants(Decoder::kIntegerSums ? 0 : kSliceRows * blocks_per_row);
  for (int64_t r0 = n0; r0 < n1; r0 += kSliceRows) {
    const int64_t r1 = r0 + kSliceRows < n1 ? r0 + kSliceRows : n1;
    if constexpr (!Decoder::kIntegerSums)
      block_constants(a.weight, r0 * blocks_per_row, (r1 - r0) * blocks_per_row, constants.data());
    for (int64_t k0 = 0; k0 < a.K; k0 += k_slice) {
      const int64_t k1 = k0 + k_slice < a.K ? k0 + k_slice : a.K;
      for (int64_t n = r0; n < r1; ++n) {
        F acc[MT][kChains];
        for (int m = 0; m < MT; ++m)
          for (int c = 0; c < kChains; ++c) acc[m][c] = k0 == 0 ? splat(0.0f) : saved[n - r0][m][c];
        const int64_t block = n * blocks_per_row + k0 / blocksize;  // W's block at k0
        const uint8_t* p = a.weight.packed + (n * a.K + k0) / 2;
        const float* x_scales = a.x_scales + m0 * (a.K / kGemvXGroup);
        if constexpr (Decoder::kIntegerSums) {
          NextRow pipe;
          if (pipelined) {
            if (n == n0) block_constants(a.weight, block, blocks_per_row, pipe_scale[n & 1]);
            pipe.ready = pipe_scale[n & 1];
            if (n + 1 < n1) {
              pipe.next_block = block + blocks_per_row;
              pipe.next = pipe_scale[(n + 1) & 1];
            }
          }
          walk_integer<MT, kChains>(a, decode, block, p, x + k0 / kGroup * MT * x_stride<Decoder>(),
                                    x_scales, k0, k1, acc, pipe);
        } else
          walk_float<MT, kChains>(a, decode, constants.data() + (block - r0 * blocks_per_row), p,
                                  x + k0 * MT, k0, k1, acc);
        if (k1 == a.K) {
          gemv_finish_row<T, MT, kChains>(a, acc, m0, n);
        } else {
          for (int m = 0; m < MT; ++m)
            for (int c = 0; c < kChains; ++c) saved[n - r0][m][c] = acc[m][c];
        }
      }
    }
  }
}

// fn(std::integral_constant<int, MT>()) for a tile of MT = min(rows, kMaxTile) rows of x:
// the tile's row count as a template argument.
template <class Fn>
void with_tile_rows(int64_t rows, Fn fn) {
  switch (rows < kMaxTile ? rows : kMaxTile) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    case 4: return fn(std::integral_constant<int, 4>());
    case 5: return fn(std::integral_constant<int, 5>());
    case 6: return fn(std::integral_constant<int, 6>());
    case 7: return fn(std::integral_constant<int, 7>());
    default: return fn(std::integral_constant<int, kMaxTile>());
  }
}

template <class T, class Decoder>
void gemv_rows_tiles(const GemvWork& a, const Decoder& decode, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < a.M; m0 += kMaxTile)
    with_tile_rows(a.M - m0, [&](auto mt) { gemv_tile<T, decltype(mt)::value>(a, decode, m0, n0, n1); });
}

template <class T>
void gemv_rows_impl(const GemvWork& a, int64_t n0, int64_t n1) {
  with_decoder<T>(a, [&](auto decoder) { gemv_rows_tiles<T>(a, decoder, n0, n1); });
}

// ---- the backward's grad-input, dx = grad @ W + grad_h @ lora_A, for a few rows. ------
// The transpose of the GEMV: each output column k of dx sums down a column of W, so a
// work item is a panel of columns [c0, c1) (a multiple of the blocksize; the dispatcher
// hands panels to threads: no reduction across threads) that walks every row n of W,
// decodes W[n, c0:c1] with the float GEMV decoder (weights exactly their float32
// dequantization) and adds grad[m, n] * W[n, c0:c1] into float32 accumulators dx[m, c0:c1]
// kept in L1 (`slab`, in the decoder's source() order, unpermuted at the end). Reading W
// row by row keeps its bytes contiguous (c1 - c0 halves of a byte per row) for the
// prefetcher, where a register-resident column walk would read 16 bytes per row at a
// stride of K / 2.
//
// grad_rows() rows of W go through the accumulators at once (their decoded weights in
// registers: 4 x 2 of AVX-512's vectors, 2 x 4 of AVX2's), so each accumulator vector is
// loaded and stored once per grad_rows() FMAs, not once per FMA.
//
// Summation: rows go into `slab` in slabs of kGradSlabRows, which is added to `total` and
// cleared after each slab: each element of dx is a sum of N / 64 slab sums of <= 64 terms
// (error ~ (64 + N / 64) float32 ulps against N for one chain; torch's float32 GEMM sums
// in k-blocks of a few hundred). The order is fixed per element (rows ascending, slabs
// from row 0), whatever the panel width or thread, so the bytes do not depend on the
// thread count.
constexpr int64_t kGradSlabRows = 64;

template <class Decoder>
constexpr int grad_rows() {
  constexpr int rows = kGemvAccumulators / Decoder::kVectors;
  return rows < 1 ? 1 : (rows > 4 ? 4 : rows);
}

// rows [n, n + R) of W, columns [c0, c1), into slab [M][c1 - c0]
template <int R, class Decoder>
void grad_input_rows(const GradInputWork& a, const Decoder& decode, int64_t n, int64_t c0,
                     int64_t c1, float* slab) {
  constexpr int kGroup = Decoder::kGroup, kVectors = Decoder::kVectors, kStep = kGroup / kVectors;
  const int64_t blocksize = a.weight.blocksize, width = c1 - c0;
  // the block constants first: R scalar walkers live through the decode loop took the
  // registers of its pointers (spilled to xmm and back; AVX2, one thread, 4096x4096 M = 1,
  // W in cache: 3.65 -> 1.67 ms; AVX-512 unchanged)
  const int64_t blocks = width / blocksize;
  float constants[R][kGradPanelMaxBlocks];
  const uint8_t* p[R];
  for (int r = 0; r < R; ++r) {
    block_constants(a.weight, ((n + r) * a.K + c0) / blocksize, blocks, constants[r]);
    p[r] = a.weight.packed + ((n + r) * a.K + c0) / 2;
  }
  const float* g = a.grad_f + n;
  for (int64_t k = 0, b = 0; k < width; k += blocksize, ++b) {
    typename Decoder::Table table[R];
    for (int r = 0; r < R; ++r) table[r] = decode.table(constants[r][b]);
    for (int64_t j = k; j < k + blocksize; j += kGroup) {
      typename Decoder::Weights w[R][kVectors];
      for (int r = 0; r < R; ++r) {
        decode(table[r], p[r], w[r]);
        p[r] += kGroup / 2;
      }
      float* acc = slab + j;
      for (int64_t m = 0; m < a.M; ++m, acc += width) {
        const float* gm = g + m * a.N;
        for (int v = 0; v < kVectors; ++v) {
          F sum = load(acc + v * kStep);
          for (int r = 0; r < R; ++r) sum = fmadd(w[r][v], splat(gm[r]), sum);
          store_out<float>(acc + v * kStep, sum);
        }
      }
    }
  }
}

template <class T, class Decoder>
void grad_input_panel_impl(const GradInputWork& a, const Decoder& decode, int64_t c0, int64_t c1,
                           float* scratch) {
  constexpr int R = grad_rows<Decoder>(), kGroup = Decoder::kGroup;
  const int64_t width = c1 - c0, count = a.M * width;
  float* slab = scratch;
  float* total = scratch + count;
  for (int64_t i = 0; i < count; ++i) total[i] = 0.0f;
  for (int64_t n0 = 0; n0 < a.N; n0 += kGradSlabRows) {
    const int64_t n1 = n0 + kGradSlabRows < a.N ? n0 + kGradSlabRows : a.N;
    for (int64_t i = 0; i < count; ++i) slab[i] = 0.0f;
    int64_t n = n0;
    for (; n + R <= n1; n += R) grad_input_rows<R>(a, decode, n, c0, c1, slab);
    for (; n < n1; ++n) grad_input_rows<1>(a, decode, n, c0, c1, slab);
    int64_t i = 0;
    for (; i + kW <= count; i += kW) store_out<float>(total + i, add(load(total + i), load(slab + i)));
    for (; i < count; ++i) total[i] = add_rn(total[i], slab[i]);
  }
  // per row of dx: unpermute into slab (natural order), add the LoRA term, round once
  for (int64_t m = 0; m < a.M; ++m) {
    const float* from = total + m * width;
    float* row = slab;
    for (int64_t g = 0; g < width; g += kGroup)
      for (int j = 0; j < kGroup; ++j) row[g + Decoder::source(j)] = from[g + j];
    const T* lora_A = static_cast<const T*>(a.lora_A) + c0;
    for (int64_t r = 0; r < a.rank; ++r) {
      const F gh = splat(a.grad_h_f[m * a.rank + r]);
      const T* A = lora_A + r * a.K;
      for (int64_t k = 0; k < width; k += kW) store_out<float>(row + k, fmadd(gh, load(A + k), load(row + k)));
    }
    T* dx = static_cast<T*>(a.dx) + m * a.K + c0;
    for (int64_t k = 0; k < width; k += kW) store_out<T>(dx + k, load(row + k));
  }
}

// ---- Entry points: pick the instance for the activation dtype. ----------------------
void gemv_prepare_entry(const GemvWork& a, int64_t m) {
  with_dtype(a.dtype, [&](auto x) { gemv_prepare_impl<decltype(x)>(a, m); });
}

void gemv_lora_h_entry(const GemvWork& a, int64_t m, int64_t j) {
  with_dtype(a.dtype, [&](auto x) { gemv_lora_h_impl<decltype(x)>(a, m, j); });
}

void gemv_rows_entry(const GemvWork& a, int64_t n0, int64_t n1) {
  with_dtype(a.dtype, [&](auto x) { gemv_rows_impl<decltype(x)>(a, n0, n1); });
}

void grad_input_panel_entry(const GradInputWork& a, int64_t c0, int64_t c1, float* scratch) {
  // the float decoder for every dtype: the integer decoders quantize their x (here grad)
  // to int16, and vdpbf16ps sums pairs of adjacent columns where dx needs rows summed
  with_dtype(a.dtype, [&](auto x) {
    grad_input_panel_impl<decltype(x)>(a, GemvDecoder(a.weight.table), c0, c1, scratch);
  });
}

// The interleaved layout's phases (gemv_interleaved.h), where the ISA has them.
#if defined(NF4LORA_GEMV_INTERLEAVED) && NF4LORA_GEMV_INTERLEAVED
#include "gemv_interleaved.h"
#else
constexpr GemvXPhase kGemvInterleavedPrepare = nullptr;
constexpr GemvWPhase kGemvInterleavedTiles = nullptr;
#endif
