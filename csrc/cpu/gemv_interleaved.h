// gemv_interleaved.h: the fused small-M matmul of gemv_body.h on a weight's interleaved
// copy (weight.h kInterleaved*: 16 rows of W per tile, one row per int32 lane), for
// AVX-512 and AVX2. Included at the end of gemv_body.h where the ISA file defines
// NF4LORA_GEMV_INTERLEAVED to the rows of a tile one vector holds: 16 (isa_avx512.cpp) or
// 8 (isa_avx2.cpp, which walks a tile's two halves; see its interleaved_tile below). No
// include guard. It shares gemv_body.h's phase 2 (h = x @ A^T) and epilogue
// (gemv_finish_row); the dispatcher runs its two entries in place of gemv_prepare and
// gemv_rows when the call brings an interleaved copy (dispatch.cpp wants_interleaved).
// AVX-512 with VNNI also sums in int8 on the copy when NF4LORA_CPU_GEMV=int8 asks for it
// (opt-in, less exact than dense bf16: see the AVX-512 tile).
//
// Why a second layout: on the bitsandbytes layout a thread walks one row of W at a time,
// and each row pays a fixed cost beyond its steps (its block constants with the nested
// lookup, the fold factors, the horizontal sum): ~80 TSC ticks at K = 2048, a third of
// its time (gemv_body.h kPipelinedMaxBlocks), and walking several rows at once broke the
// prefetchers' one stream. Here a 64-byte load holds 8 columns of 16 rows, each lane
// sums its own row, so the fixed costs are paid once per 16 rows, x is broadcast (one
// 32-bit pair of x per vpdpwssd, a memory operand), the block constants are float32
// vectors stored beside their codes (decoded once, when the copy is built), and the tile
// is still one sequential stream. Prototype, one Zen 4 thread, M = 1, TSC ticks per 32
// weights, W in cache / streamed: 4096x4096 1.25 / 1.92 (row layout 2.5 / 3.1),
// 5632x2048 1.31 / 2.07 (2.96 in cache); M = 8 4096x4096 6.6 / 8.8 (bf16 decoder ~17).
// This kernel against the row layout's, in one process, one thread, us with W in cache /
// streamed: 4096x4096 M = 1 298 / 436 vs 610 / 631, M = 8 1474 / 1730 vs 2276 / 3173;
// 5632x2048 M = 1 215 / 285 vs 495 / 508 (before the prefetches below made it faster
// streamed: 4096x4096 M = 1 0.80-0.84x of that).
//
// Arithmetic: the integer decoder's (gemv_body.h), with the levels of W at a smaller
// scale. A lane sums kFoldChunks chunks (8 columns each) of its row before the fold (one
// cvt + FMA per 16 rows), so their products must fit int32: with x levels within 16383
// (kGemvLevelScale), bf16 x takes W levels within 2047 and folds once per group of 64
// columns (64 * 16383 * 2047 < 2^31), fp16 x levels within 8191 folded every 16 columns
// (16 * 16383 * 8191 < 2^31). Why two: fp16's own rounding is 8x finer than bf16's, and
// the error must stay below the dense same-dtype baseline's (tests/test_cpu_matmul.py:
// mean |error| <= floor + half of what the baseline adds). Simulated, 512x4096, mean
// |error| vs float64, floor / dense baseline / W levels 16383, 8191, 4095, 2047:
//   NF4, bf16 x: 0.0723 / 0.114 / 0.0725, 0.0727, 0.0728, 0.0753 (bound 0.093)
//   NF4, fp16 x: 0.0088 / 0.0142 / 0.0095, 0.0102, 0.0117, 0.0184 (bound 0.0115)
//   FP4, fp16 x: 0.0091 / 0.0146 / 0.0100, 0.0112, 0.0154, 0.0232 (bound 0.0118)
// (16383 would fold every 8 columns, 4 times as often as fp16 does.)

// Determinism: each output element is one lane of one thread's tile, summed in column
// order; the bytes do not depend on the thread count.

// The level scale of W and the chunks between folds, per activation type (above).
template <class T> struct InterleavedLevels {
  static constexpr int kScale = int(kInterleavedLevelScaleBf16), kFoldChunks = 8;
};
template <> struct InterleavedLevels<fp16> {
  static constexpr int kScale = int(kInterleavedLevelScaleFp16), kFoldChunks = 2;
};
// The opt-in int8 sums (NF4LORA_CPU_GEMV=int8, AVX512-VNNI only: NF4LORA_GEMV_INT8): W's
// and x's levels within 127, a lane sums its whole group (bound below at the tile).
struct InterleavedInt8Levels {
  static constexpr int kScale = int(kGemvInt8LevelScale), kFoldChunks = 8;
};
static_assert(int64_t(8) * InterleavedInt8Levels::kFoldChunks * (255 * 127 + 128 * 127) < (int64_t(1) << 31),
              "a lane's int8 products (weights as level + 128) and its start must fit int32");
template <class T>
constexpr bool fits_int32() {
  return int64_t(8) * InterleavedLevels<T>::kFoldChunks * int64_t(kGemvLevelScale) * InterleavedLevels<T>::kScale <
         (int64_t(1) << 31);
}
static_assert(fits_int32<bf16>() && fits_int32<fp16>(), "a lane's products between folds must fit int32");
static_assert(kInterleavedColumns == kGemvXGroup && NF4LORA_GEMV_INTERLEAVED == kW &&
                  kInterleavedRows % kW == 0,
              "a group is one x scale group, a tile one or two vectors of rows");

// The order of x's levels in x_paired within each chunk of 8 columns: AVX-512 broadcasts
// column pairs (8c + 2s, 8c + 2s + 1) in column order; AVX2's lanes hold a row's codes
// of columns (8c + h, 8c + 4 + h) and (8c + 2 + h, 8c + 6 + h), h = 0, 1 (below).
// The int8 sums read a row's 4 bytes of a chunk as AVX2 does (low nibbles: columns 8c,
// 8c + 4, 8c + 1, 8c + 5; high nibbles: 8c + 2, 8c + 6, 8c + 3, 8c + 7), 4 bytes of x a
// broadcast.
constexpr int kInterleavedNibbleOrder[8] = {0, 4, 1, 5, 2, 6, 3, 7};
#if NF4LORA_GEMV_INTERLEAVED == 16
constexpr int kInterleavedXOrder[8] = {0, 1, 2, 3, 4, 5, 6, 7};
#else
constexpr const int* kInterleavedXOrder = kInterleavedNibbleOrder;
#endif

// Phase 1, per row m of x: its levels as int16 in kInterleavedXOrder (AVX-512: column
// order, so a pair of adjacent columns is one int32 to broadcast) at x_paired + m * K / 2
// floats, its scales per group
// (max |x| / (16383 * W's level scale): both level scales come out in the fold), and x_natural as
// gemv_prepare_rows writes it (phase 2 reads it).
template <class In>
void interleaved_prepare_rows(const GemvWork& a, int64_t m) {
  const In* x = static_cast<const In*>(a.x) + m * a.K;
  int16_t* levels = reinterpret_cast<int16_t*>(a.x_paired) + m * a.K;
  float* scales = a.x_scales + m * (a.K / kGemvXGroup);
  alignas(64) int32_t level[kGemvXGroup];
  for (int64_t e0 = 0; e0 < a.K; e0 += kGemvXGroup) {
    const float max_abs = IntegerGemvDecoder::x_levels(x + e0, level);
    for (int j = 0; j < kGemvXGroup; ++j)
      levels[e0 + j] = static_cast<int16_t>(level[j - j % 8 + kInterleavedXOrder[j % 8]]);
    scales[e0 / kGemvXGroup] = static_cast<float>(
        double(max_abs) / (double(kGemvLevelScale) * double(InterleavedLevels<In>::kScale)));
  }
  if (a.x_natural != nullptr)
    for (int64_t k = 0; k < a.K; k += kW) store_out<float>(a.x_natural + m * a.K + k, load(x + k));
}

#if NF4LORA_GEMV_INT8
// Phase 1 of the int8 sums, per row m of x: its levels as int8 in kInterleavedNibbleOrder,
// group-major (row m's group g at byte (g * M + m) * 64 of x_paired, so that a tile reads
// its rows of x at constant offsets from one pointer: 8 row pointers spilled), after all
// of them the start value of each (group, row) sum in the same order (int32: -128 times
// the sum of the group's x levels, see interleaved_tile), its scales per group (max |x| /
// 127^2), and x_natural (phase 2).
inline int32_t* interleaved_int8_starts(const GemvWork& a) {
  return reinterpret_cast<int32_t*>(reinterpret_cast<int8_t*>(a.x_paired) + a.M * a.K);
}
template <class In>
void interleaved_prepare_rows_int8(const GemvWork& a, int64_t m) {
  const In* x = static_cast<const In*>(a.x) + m * a.K;
  int8_t* levels = reinterpret_cast<int8_t*>(a.x_paired);
  const int64_t groups = a.K / kGemvXGroup;
  float* scales = a.x_scales + m * groups;
  int32_t* starts = interleaved_int8_starts(a);
  alignas(64) int32_t level[kGemvXGroup];
  for (int64_t g = 0; g < groups; ++g) {
    const float max_abs = GemvInt8Decoder::x_levels(x + g * kGemvXGroup, level);
    int8_t* out = levels + (g * a.M + m) * kGemvXGroup;
    int32_t sum = 0;
    for (int j = 0; j < kGemvXGroup; ++j) {
      out[j] = static_cast<int8_t>(level[j - j % 8 + kInterleavedNibbleOrder[j % 8]]);
      sum += level[j];
    }
    starts[g * a.M + m] = -128 * sum;
    scales[g] = static_cast<float>(double(max_abs) / (double(kGemvInt8LevelScale) * double(kGemvInt8LevelScale)));
  }
  if (a.x_natural != nullptr)
    for (int64_t k = 0; k < a.K; k += kW) store_out<float>(a.x_natural + m * a.K + k, load(x + k));
}
#endif

// Prefetching. A tile is one sequential stream, but the hardware prefetcher alone let a
// thread wait on memory: one Zen 4 thread, M = 1, 4096x4096 took 436 us streamed against
// 298 in cache, where its 9.4 MB at one thread's probed read bandwidth (29.5 GB/s) take
// ~320. Asking for every line of a group 12 KiB ahead into L2 (`prefetcht1`: L2 tracks
// more misses than L1; a prefetch past the copy's end does not fault) closes most of that.
// This kernel against the one before (one line 1 KiB ahead into L1 at M <= 2), in one
// process, W streamed, bf16 x, medians of 11, time new / old, one thread | two threads:
//   M =           1     2     3     4     6     8  |  1     2     3     4     6     8
//   4096x4096   0.84  0.72  0.78  0.83  0.93  0.97 | 0.83  0.79  0.81  0.86  0.95  0.95
//   11008x4096  0.82  0.69        0.84        0.98 | 0.99  0.79        0.85        0.97
//   2048x5632   0.79  0.66        0.79        0.98 | 0.96  0.80        0.87        0.98
//   5632x2048   0.96  0.94        0.86        0.97 | 0.97  0.94        0.88        0.99
//   2048x2048   0.89  0.89        0.91        0.97 | 1.00  0.98        0.96        0.98
// fp16 x, 4096x4096, M = 1 / 4: 0.80 / 0.89 | 0.92 / 0.88. M = 8 runs the code it ran
// before (0.95-0.99 is this measurement's own bias): with the far prefetch it took
// 1.03-1.04x (compute-bound), hence kFarPrefetchMaxRows. Two threads at M = 1 gain little
// where both already saturate memory (11008x4096: 31 GB/s). Bit-identical. The distance
// (one thread, M = 1, against the old kernel): 4 KiB 1.13x, 6 KiB 0.82x, 8-32 KiB
// 0.74-0.76x; every line into L1 (prefetcht0) 4 KiB ahead 1.05x. The near prefetch (every
// line two groups ahead into L1, from MT = 3) stays beside it: it had made M = 3 0.86x and
// M = 4-8 0.62-0.70x.
constexpr int64_t kFarPrefetchBytes = 12 << 10;
constexpr int kFarPrefetchMaxRows = 7;
// How far ahead tile t prefetches: kFarPrefetchBytes where every group's lines that far
// ahead lie inside the copy, else 0 (its own lines, on their way already; a distance kept
// in a register leaves the loop as it was, where a branch on it had gcc write the loop
// twice). Past the copy's end a prefetch may land on memory that is not mapped, where the
// page walk finds nothing and is not kept, and every call walks again (`perf annotate` of
// a 384x384 layer, one thread: ~40% of its tile time on them). Against prefetching past
// the end, in one process, bf16 x, W in cache (AVX2-only EPYC Zen 1): 384x384 one thread
// M = 1 / 3 / 5 0.72 / 0.81 / 0.87x the time, two threads M = 1 / 2 0.70 / 0.75x;
// 256x2048 one thread M = 1 0.84x, two threads M = 1 / 2 0.76 / 0.83x; W streamed
// (2048x2048 to 5632x2048, the copies back to back) 0.99-1.01x; a 1B decode step, two
// threads, 0.97-0.98x (two pairs of runs). Where the memory past the end happens to be
// mapped it changes nothing. Larger copies lose the far prefetch on their last tile only.
inline int64_t far_prefetch_distance(const GemvWork& a, int64_t t, int64_t groups) {
  return (t + 1) * groups * kInterleavedGroupBytes + kFarPrefetchBytes <= interleaved_bytes(a.N, a.K)
             ? kFarPrefetchBytes
             : 0;
}
// (The AVX-512 and AVX2 tiles below each write out this prefetch. Shared as an inline
// helper, together with an earlier shared per-row epilogue, it made the same kernels
// slower streamed, in one process, one thread, 4096x4096: AVX-512 M = 1 0.96x the old
// kernel's time against 0.81x, M = 2 0.80 against 0.71x; AVX2 M = 1 0.83x the row
// layout's against 0.78x. Re-measure before folding it in. The vector epilogue below is
// shared, and was measured so on AVX2 only.)

// The epilogue of kW rows of W from r0 (one vector's lanes, `sums[m]` for each row m of x
// from m0): y[m0 + m, r0 .. r0 + kW). Without a LoRA term, a vector at a time: + 0.0f
// (what gemv_finish_row's horizontal sum of the lane and zeros does: -0 becomes +0), + the
// bias, one rounding to T: the same bytes as gemv_finish_row per row, which a last tile
// still takes where its rows pass N. Per row it had cost its lane alone in a
// vector, a horizontal sum and a scalar rounding, for each of a tile's 16 rows: at K = 2048
// a tile's steps are short enough for that to show. Against the per-row epilogue, in one
// process, bf16 x, W streamed (AVX2-only EPYC Zen 1, the one CPU that timed it), time:
// one thread M = 1 2048x2048 0.94x, 5632x2048 0.92x, 1024x1024 (W in cache) 0.92x,
// 4096x4096 0.98x, M = 2 2048x2048 0.95x, M = 4 / 8 4096x4096 0.96 / 0.99x; two threads
// M = 1 5632x2048 0.95x, 2048x5632 0.98x, 256x2048 0.97x. Bit-identical.
//
// With a LoRA term the rows are a vector at a time too, in gemv_finish_row's order for a
// lane alone: that adds the term into a vector whose lane 0 is the row's sum and the rest
// +0 (one FMA per kW ranks: lane l takes ranks j + l), sums its lanes by hsum's tree (the
// upper half onto the lower, down to one lane), then the ranks past the last whole kW
// one by one (a multiply, an add), the bias, one rounding. Here part[l] holds lane l of
// kW rows, and the same operations run on the parts (B's kW x kW blocks read through a
// transposing copy), so the bytes are the per-row epilogue's: 600 random calls (ranks
// 1-33, a mixed-adapter batch, bias, bf16 and fp16 x) natively, and SIMDe's AVX-512
// (cmp_gemv's outputs, every case) against the build before. Per row it had cost a
// store and reload of its lane, a horizontal sum and a scalar rounding. Rank 16, bf16 x,
// W in cache, in one process, against the per-row epilogue (AVX2-only EPYC Zen 1): one
// thread M = 1 0.90x the time at 256x2048, 2048x2048 and 5632x2048, 0.97x at 2048x5632,
// M = 4 0.96-0.98x; two threads M = 1 0.91-0.95x; without LoRA 0.99-1.01x.
template <class T, int MT>
inline void finish_interleaved_rows(const GemvWork& a, const F (&sums)[MT], int64_t m0, int64_t r0) {
  const T* bias = static_cast<const T*>(a.bias);
  if (r0 + kW <= a.N) {
    for (int m = 0; m < MT; ++m) {
      const int64_t adapter = a.rank > 0 ? a.adapter(m0 + m) : -1;
      const int64_t rank = adapter < 0 ? 0 : a.rank;
      F v;
      if (rank == 0) {
        v = add(sums[m], splat(0.0f));
      } else {
        const T* b = static_cast<const T*>(a.lora_B) + (adapter * a.N + r0) * rank;  // [kW rows, rank]
        const float* hs = a.h_scaled + (m0 + m) * a.rank;
        F part[kW];
        part[0] = sums[m];
        for (int l = 1; l < kW; ++l) part[l] = splat(0.0f);
        alignas(64) float column[kW][kW];  // column[l][i] = B[r0 + i, j + l]
        int64_t j = 0;
        for (; j + kW <= rank; j += kW) {
          for (int i = 0; i < kW; ++i)
            for (int l = 0; l < kW; ++l) column[l][i] = to_float(b[i * rank + j + l]);
          for (int l = 0; l < kW; ++l) part[l] = fmadd(splat(hs[j + l]), load(column[l]), part[l]);
        }
        for (int width = kW / 2; width >= 1; width /= 2)
          for (int l = 0; l < width; ++l) part[l] = add(part[l], part[l + width]);
        v = part[0];
        for (; j < rank; ++j) {
          for (int i = 0; i < kW; ++i) column[0][i] = to_float(b[i * rank + j]);
          v = add(v, mul(splat(hs[j]), load(column[0])));
        }
      }
      if (bias != nullptr) v = add(v, load(bias + r0));
      store_out<T>(static_cast<T*>(a.y) + (m0 + m) * a.N + r0, v);
    }
    return;
  }
  alignas(64) float lanes[MT][kW];
  for (int m = 0; m < MT; ++m) NF4LORA_MM(store_ps)(lanes[m], sums[m]);
  for (int64_t j = 0; j < kW && r0 + j < a.N; ++j) {
    F one[MT][1];
    for (int m = 0; m < MT; ++m) {
      alignas(64) float lane[kW] = {};
      lane[0] = lanes[m][j];
      one[m][0] = load(lane);
    }
    gemv_finish_row<T, MT, 1>(a, one, m0, r0 + j);
  }
}

#if NF4LORA_GEMV_INTERLEAVED == 16
// The 16 levels of W as int16, repeated in words 16-31 (vpermw reads 5 index bits). Passed
// by value: the tile took 1.08x the time streamed (M = 1, 4096x4096, one thread) with it
// read through a reference, for reasons the code gcc emitted does not show (the same loop).
using InterleavedLookup = I;
inline InterleavedLookup interleaved_lookup(const CodeTable& table, float scale) {
  alignas(64) int16_t level[32];
  integer_levels(table, scale, level);
  memcpy(level + 16, level, 16 * sizeof(int16_t));
  return _mm512_load_si512(level);
}
#if NF4LORA_GEMV_INT8
// The int8 sums' levels: the 16 levels within 127, + 128 as bytes, in every 128-bit lane.
inline InterleavedLookup interleaved_int8_lookup(const CodeTable& table) { return GemvInt8Decoder(table).levels; }
#endif

// Phase 3: tile t (rows 16 t .. 16 t + 15 of W) against MT rows of x from m0. Per chunk
// (64 bytes: 8 columns of 16 rows), vpermw of each word shifted by 0, 4, 8 and 12 bits
// gives 4 vectors of 16 lanes x (2 columns) of levels (bit 4 of an index is the next
// code's low bit: the 16 levels repeated in lanes 16-31), and each goes into a vpdpwssd
// per row of x with that column pair of x broadcast. Chains: a vpdpwssd has ~4 cycles of
// latency, so at MT = 1 the four vectors go to four sums, at MT = 2-4 to two (M = 3, 4:
// 0.86-0.93x the time with one, W in cache; the same bytes: the sums are exact). gcc emits
// each pair as a vpbroadcastd and a register vpdpwssd; forcing vpdpwssd's embedded
// broadcast ({1to16}, inline asm) measured 0.92-0.98x the time (one and two threads, W
// streamed): not kept, for inline asm in a file the SIMDe check compiles without AVX-512.
//
// The int8 sums (kInt8; opt-in NF4LORA_CPU_GEMV=int8, AVX512-VNNI): a chunk's low and
// high nibbles (and, shift + and) looked up by vpshufb in the 16 levels + 128 as bytes make
// 2 vectors of 16 lanes x 4 columns (kInterleavedNibbleOrder), each multiplied with 4
// bytes of x by one vpdpbusd (u8 x s8, 64 products): half the multiply instructions of
// int16. A lane's sum over its group starts at -128 times the sum of the group's x levels
// (x-only, the same for every lane: interleaved_prepare_rows_int8), so it ends exactly at
// the sum of level x x; bounds per lane and group: 64 products of at most 255 * 127 plus
// a start of at most 128 * 64 * 127, < 2^22; the sum itself at most 64 * 127^2 < 2^24,
// exact in float. Less exact than the dense bf16 baseline, like the row layout's int8
// decoder (README "CPU matmul"). Time int8 / int16, one Zen 4 thread, 4096x4096, bf16 x,
// W streamed, in one process: M = 1 1.12-1.25 (memory-bound either way), 2 0.82-0.90, 3 0.69,
// 4 0.62-0.67, 8 0.65-0.78, 16 0.64, 32 0.58, 64 0.59.
//
// Code position: an earlier draft of this function with an 8-byte longer prologue (x's
// offset written as a.K * (kInt8 ? 1 : 2) / 4) ran the same int16 M = 1 loop 1.14-1.28x
// slower streamed, one thread, and no slower with W in cache. Over 8 builds that loop was
// fast where it started at 8 mod 16 bytes and slow at 0 mod 16 (gdb's disassembly: the
// target of its backward jump): an effect of where the code lies, in the front end or
// an instruction-indexed prefetcher. After an edit here, time M = 1 streamed against a
// kept build, or at least check where that loop starts.

// sum + the products of w and x's 32 bits: int16 pairs (vpdpwssd, or vpmaddwd + vpaddd
// without VNNI), or bytes (int8: vpdpbusd, VNNI only)
template <bool kInt8>
inline I interleaved_dot(I sum, I w, I x) {
#if NF4LORA_AVX512_BF16  // (the build with AVX512-VNNI)
  if constexpr (kInt8) return _mm512_dpbusd_epi32(sum, w, x);
  return _mm512_dpwssd_epi32(sum, w, x);
#else
  static_assert(!kInt8, "int8 sums: AVX512-VNNI only");
  return _mm512_add_epi32(sum, _mm512_madd_epi16(w, x));
#endif
}

template <class T, int MT, bool kInt8>
void interleaved_tile(const GemvWork& a, InterleavedLookup levels, int64_t m0, int64_t t) {
  constexpr int kChains = MT == 1 ? 4 : (MT <= 4 ? 2 : 1);
  using Levels = std::conditional_t<kInt8, InterleavedInt8Levels, InterleavedLevels<T>>;
  constexpr int kFoldChunks = Levels::kFoldChunks;
  const int64_t groups = a.K / kInterleavedColumns;
  const uint8_t* p = a.interleaved + t * groups * kInterleavedGroupBytes;
  const int32_t* x = reinterpret_cast<const int32_t*>(a.x_paired) + m0 * (a.K / 2);  // (int16)
  const float* x_scales = a.x_scales + m0 * groups;
  [[maybe_unused]] const int32_t* starts = nullptr;
#if NF4LORA_GEMV_INT8
  if constexpr (kInt8) starts = interleaved_int8_starts(a) + m0;
#else
  static_assert(!kInt8, "int8 sums: AVX512-VNNI only");
#endif
  const int64_t far = far_prefetch_distance(a, t, groups);
  F acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = splat(0.0f);
  for (int64_t g = 0; g < groups; ++g, p += kInterleavedGroupBytes) {
    // Prefetch, two kinds (see kFarPrefetchBytes): every line of the group far ahead into
    // L2, and, from MT = 3, every line two groups ahead into L1. The fence (no instruction)
    // keeps the far ones ahead of the group's loads: where gcc spread them among the first
    // chunk's instructions, M = 1 / 2 / 4 took 1.07 / 1.21 / 1.04x the time.
    if constexpr (MT <= kFarPrefetchMaxRows) {
      for (int64_t line = 0; line < kInterleavedGroupBytes; line += 64) __builtin_prefetch(p + far + line, 0, 2);
      __atomic_signal_fence(__ATOMIC_SEQ_CST);  // a compiler barrier, no instruction
    }
    if constexpr (MT >= 3)
      for (int64_t line = 0; line < kInterleavedGroupBytes; line += 64)
        __builtin_prefetch(p + 2 * kInterleavedGroupBytes + line);
    const F constants = _mm512_loadu_ps(reinterpret_cast<const float*>(p + kInterleavedChunks * 64));
    F fold[MT];
    for (int m = 0; m < MT; ++m) fold[m] = mul(constants, splat(x_scales[m * groups + g]));
    const int32_t* xg = x + g * (kInterleavedColumns / 2);
#pragma GCC unroll 8
    for (int c0 = 0; c0 < kInterleavedChunks; c0 += kFoldChunks) {
      I sum[MT][kChains];
      for (int m = 0; m < MT; ++m)
        for (int c = 0; c < kChains; ++c) sum[m][c] = splat_i(0);
      if constexpr (kInt8) {
        for (int m = 0; m < MT; ++m) sum[m][0] = _mm512_set1_epi32(starts[g * a.M + m]);
        const int32_t* xg8 = reinterpret_cast<const int32_t*>(a.x_paired) + (g * a.M + m0) * (kGemvXGroup / 4);
#pragma GCC unroll 8
        for (int c = c0; c < c0 + kFoldChunks; ++c) {
          const I q = _mm512_loadu_si512(p + 64 * c), nibble = _mm512_set1_epi8(0x0F);
          const I w[2] = {_mm512_shuffle_epi8(levels, _mm512_and_si512(q, nibble)),
                          _mm512_shuffle_epi8(levels, _mm512_and_si512(_mm512_srli_epi16(q, 4), nibble))};
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m)
            for (int v = 0; v < 2; ++v)
              sum[m][(2 * c + v) % kChains] = interleaved_dot<true>(sum[m][(2 * c + v) % kChains], w[v],
                                                                    _mm512_set1_epi32(xg8[m * (kGemvXGroup / 4) + 2 * c + v]));
        }
      } else {
#pragma GCC unroll 8
        for (int c = c0; c < c0 + kFoldChunks; ++c) {
          const I q = _mm512_loadu_si512(p + 64 * c);
          const I w[4] = {_mm512_permutexvar_epi16(q, levels),
                          _mm512_permutexvar_epi16(_mm512_srli_epi16(q, 4), levels),
                          _mm512_permutexvar_epi16(_mm512_srli_epi16(q, 8), levels),
                          _mm512_permutexvar_epi16(_mm512_srli_epi16(q, 12), levels)};
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
            for (int v = 0; v < 4; ++v) {
              const I pair = _mm512_set1_epi32(xg[m * (a.K / 2) + 4 * c + v]);
              sum[m][v % kChains] = interleaved_dot<false>(sum[m][v % kChains], w[v], pair);
            }
        }
      }
      for (int m = 0; m < MT; ++m) {
        I total = sum[m][0];
        for (int c = 1; c < kChains; ++c) total = _mm512_add_epi32(total, sum[m][c]);
        acc[m] = fmadd(_mm512_cvtepi32_ps(total), fold[m], acc[m]);
      }
    }
  }
  finish_interleaved_rows<T, MT>(a, acc, m0, t * kInterleavedRows);
}

#else
// The 16 levels of W as int16, split into byte planes (low and high bytes) for pshufb.
using InterleavedLookup = BytePlanes;
inline InterleavedLookup interleaved_lookup(const CodeTable& table, float scale) {
  int16_t level[16];
  integer_levels(table, scale, level);
  return BytePlanes(level);
}

// Phase 3 for AVX2: the same copy, the same sums. AVX2 has no 16-bit permute and 8 int32
// lanes, so a tile is walked as two halves of 8 rows (rows 0-7: the first 32 bytes of each
// chunk, words 0-15; then rows 8-15, whose lines the first half brought into L2), and a
// 32-byte half chunk is decoded the way the row layout's AVX2 decoder decodes 64 codes
// (a 16-bit shift and two ands make one code per byte, 4 pshufb look up the low and high
// bytes of its level, 4 unpacks make the words). Byte 2w of the half is word w's bits 0-7
// (codes s = 0, 1), byte 2w + 1 its bits 8-15 (s = 2, 3), and word w = 2j + h holds row
// j's columns 8c + 2s + h; unpacking within 128-bit lanes leaves in each int32 lane one
// word's (s = 0, s = 2) levels (low nibbles) or (s = 1, s = 3) (high nibbles), for words
// {0-3, 8-11} (vector A) and {4-7, 12-15} (B): rows {0, 0, 1, 1, 4, 4, 5, 5} and
// {2, 2, 3, 3, 6, 6, 7, 7}, h alternating. So x is read as 4 int16 per chunk and nibble
// plane (kInterleavedXOrder: x(8c), x(8c + 4), x(8c + 1), x(8c + 5) for the low nibbles)
// broadcast as one 64-bit value, and vphaddd(A, B) adds each row's two lanes into rows
// 0-7 in order. Each fold's int32 sum of a row is then exactly the AVX-512 kernel's, and
// the fold is the same: the two kernels give the same bytes (tested).
//
// Up to kAvx2BothHalvesMaxRows rows of x the two halves are walked together (each chunk's
// 64 bytes in one pass, 4 int32 sums per row of x); beyond, their sums and fold factors
// would not fit 16 registers, and the halves go one after the other (the second finds its
// lines in L2). Measured on an AVX2-only AMD EPYC (Zen 1: a 256-bit instruction is two
// 128-bit halves; vpmaddwd runs on one pipe, 2 cycles per ymm: 4 cycles per 32 weights and
// row of x, as much as its 4 pshufb + 4 unpacks take on the two shuffle pipes), one thread,
// 4096x4096, W streamed, in one process, time against the kernel before (halves one by one,
// chunk adds reassociated by gcc: see the barrier below): M = 1 0.84x (5.0 TSC ticks per 32
// weights, ~7.3 core cycles), 2 0.88x, 3 0.80x, 4 0.81x. Bit-identical. The limit, in one
// process (noisier, +-7%): both halves together up to 1 / 2 / 3 rows, M = 2 0.99 / 1.00 /
// 0.98x, M = 3 1.00 / 1.00 / 1.10x (spills). Decode-free and
// multiply-free variants of the same loop (wrong sums, timing only) took 0.81x and 0.96x at
// M = 1: neither the lookups nor the multiplies alone bound it. On Zen 1 this kernel beats
// the row layout at every M measured (1-32: dispatch.cpp reads_interleaved); under
// NF4LORA_CPU_ISA=avx2 on a Zen 4, before the barrier, M = 5-8 had been 1.06-1.25x slower
// than the row layout (spills).
constexpr int kAvx2BothHalvesMaxRows = 2;
template <class T, int MT, bool kInt8>
void interleaved_tile(const GemvWork& a, InterleavedLookup planes, int64_t m0, int64_t t) {
  static_assert(!kInt8, "int8 sums: AVX512-VNNI only");
  constexpr int kFoldChunks = InterleavedLevels<T>::kFoldChunks;
  constexpr int kHalves = kInterleavedRows / kW;
  constexpr int kPass = MT <= kAvx2BothHalvesMaxRows ? kHalves : 1;  // halves walked together
  const int64_t groups = a.K / kInterleavedColumns;
  const uint8_t* tile = a.interleaved + t * groups * kInterleavedGroupBytes;
  const int64_t* x = reinterpret_cast<const int64_t*>(a.x_paired) + m0 * (a.K / 4);
  const float* x_scales = a.x_scales + m0 * groups;
  const I nibble = _mm256_set1_epi8(0x0F);
  const int64_t n0 = t * kInterleavedRows;
  const int64_t far = far_prefetch_distance(a, t, groups);
  for (int half0 = 0; half0 < kHalves; half0 += kPass) {
    F acc[MT][kPass];
    for (int m = 0; m < MT; ++m)
      for (int h = 0; h < kPass; ++h) acc[m][h] = splat(0.0f);
    const uint8_t* p = tile + half0 * 32;
    for (int64_t g = 0; g < groups; ++g, p += kInterleavedGroupBytes) {
      if constexpr (MT <= kFarPrefetchMaxRows) {  // (a second pass finds its lines in L2)
        if (half0 == 0)
          for (int64_t line = 0; line < kInterleavedGroupBytes; line += 64) __builtin_prefetch(p + far + line, 0, 2);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);  // a compiler barrier, no instruction
      }
      F fold[MT][kPass];
      for (int h = 0; h < kPass; ++h) {
        const F constants = _mm256_loadu_ps(
            reinterpret_cast<const float*>(p - half0 * 32 + kInterleavedChunks * 64) + (half0 + h) * kW);
        for (int m = 0; m < MT; ++m) fold[m][h] = mul(constants, splat(x_scales[m * groups + g]));
      }
      const int64_t* xg = x + g * (kInterleavedColumns / 4);
#pragma GCC unroll 8
      for (int c0 = 0; c0 < kInterleavedChunks; c0 += kFoldChunks) {
        I sum_a[MT][kPass], sum_b[MT][kPass];
        for (int m = 0; m < MT; ++m)
          for (int h = 0; h < kPass; ++h) sum_a[m][h] = sum_b[m][h] = splat_i(0);
#pragma GCC unroll 8
        for (int c = c0; c < c0 + kFoldChunks; ++c) {
#pragma GCC unroll 2
          for (int h = 0; h < kPass; ++h) {
            const I q = _mm256_loadu_si256(reinterpret_cast<const I*>(p + 64 * c + 32 * h));
            const I low = _mm256_and_si256(q, nibble), high = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
            const I low_lo = _mm256_shuffle_epi8(planes.lo, low), low_hi = _mm256_shuffle_epi8(planes.hi, low);
            const I high_lo = _mm256_shuffle_epi8(planes.lo, high), high_hi = _mm256_shuffle_epi8(planes.hi, high);
            const I low_a = _mm256_unpacklo_epi8(low_lo, low_hi), low_b = _mm256_unpackhi_epi8(low_lo, low_hi);
            const I high_a = _mm256_unpacklo_epi8(high_lo, high_hi), high_b = _mm256_unpackhi_epi8(high_lo, high_hi);
#pragma GCC unroll 8
            for (int m = 0; m < MT; ++m) {
              const I x_low = _mm256_set1_epi64x(xg[m * (a.K / 4) + 2 * c]);
              const I x_high = _mm256_set1_epi64x(xg[m * (a.K / 4) + 2 * c + 1]);
              sum_a[m][h] = _mm256_add_epi32(sum_a[m][h], _mm256_add_epi32(_mm256_madd_epi16(low_a, x_low),
                                                                           _mm256_madd_epi16(high_a, x_high)));
              sum_b[m][h] = _mm256_add_epi32(sum_b[m][h], _mm256_add_epi32(_mm256_madd_epi16(low_b, x_low),
                                                                           _mm256_madd_epi16(high_b, x_high)));
              // (no instruction) keeps each chunk's products added as they come: gcc
              // otherwise reassociates the unrolled integer adds into a tree whose leaves
              // spill (2 stores per ymm on Zen 1); M = 1 took 1.13x the time, M = 4 1.25x
              __asm__("" : "+x"(sum_a[m][h]), "+x"(sum_b[m][h]));
            }
          }
        }
        for (int m = 0; m < MT; ++m)
          for (int h = 0; h < kPass; ++h)
            acc[m][h] = fmadd(_mm256_cvtepi32_ps(_mm256_hadd_epi32(sum_a[m][h], sum_b[m][h])), fold[m][h], acc[m][h]);
      }
    }
    for (int h = 0; h < kPass; ++h) {
      F sums[MT];
      for (int m = 0; m < MT; ++m) sums[m] = acc[m][h];
      finish_interleaved_rows<T, MT>(a, sums, m0, n0 + (half0 + h) * kW);
    }
  }
}
#endif

template <class T, bool kInt8>
void interleaved_tiles_impl(const GemvWork& a, int64_t t0, int64_t t1) {
#if NF4LORA_GEMV_INT8
  const InterleavedLookup lookup = kInt8 ? interleaved_int8_lookup(a.weight.table)
                                         : interleaved_lookup(a.weight.table, float(InterleavedLevels<T>::kScale));
#else
  const InterleavedLookup lookup = interleaved_lookup(a.weight.table, float(InterleavedLevels<T>::kScale));
#endif
  for (int64_t m0 = 0; m0 < a.M; m0 += kMaxTile)
    with_tile_rows(a.M - m0, [&](auto mt) {
      for (int64_t t = t0; t < t1; ++t) interleaved_tile<T, decltype(mt)::value, kInt8>(a, lookup, m0, t);
    });
}

template <class T>
void interleaved_tiles_impl(const GemvWork& a, int64_t t0, int64_t t1) {
#if NF4LORA_GEMV_INT8
  if (a.sums == GemvSums::kInt8) return interleaved_tiles_impl<T, true>(a, t0, t1);
#endif
  interleaved_tiles_impl<T, false>(a, t0, t1);
}

void gemv_interleaved_prepare_entry(const GemvWork& a, int64_t m) {
  with_dtype(a.dtype, [&](auto x) {
    using In = decltype(x);
    if constexpr (!std::is_same_v<In, float>) {
#if NF4LORA_GEMV_INT8
      if (a.sums == GemvSums::kInt8) return interleaved_prepare_rows_int8<In>(a, m);
#endif
      interleaved_prepare_rows<In>(a, m);
    }
  });
}

void gemv_interleaved_tiles_entry(const GemvWork& a, int64_t t0, int64_t t1) {
  with_dtype(a.dtype, [&](auto x) {
    if constexpr (!std::is_same_v<decltype(x), float>) interleaved_tiles_impl<decltype(x)>(a, t0, t1);
  });
}
constexpr GemvXPhase kGemvInterleavedPrepare = &gemv_interleaved_prepare_entry;
constexpr GemvWPhase kGemvInterleavedTiles = &gemv_interleaved_tiles_entry;
