// gemm_tiles.h: the tile GEMMs for bf16 and larger M, with W read packed and decoded into
// bf16 tiles in cache, never materialized (the dequantize + GEMM path writes W in bf16 to
// a 16 MiB workspace and reads it back):
//   forward      y [M, N] = x [M, K] @ W^T
//   grad-input   dx [M, K] = grad [M, N] @ W
// Written once against tiles.h's vocabulary: Tiles = AmxTiles (AMX-BF16 CPUs) or
// EmulatedTiles (any CPU, for the tests). Like kernel_body.h, NOT a normal header: each ISA
// translation unit includes it after kernel_body.h, inside its namespace, and decodes W
// with its own dequantize (the same bytes on every ISA: `dequantize_4bit(..., bfloat16)`).
//
// A tile multiply is C [16 x 16] += A [16 rows x 32 bf16] . B [16 rows of 16 bf16 pairs]:
// A's rows are read as they lie in memory, B must hold the reduction's consecutive pairs.
//   forward: A = 16 rows of W as decoded (a row's K runs along the tile row), B = x
//            repacked once per call as pairs over K (dispatch.cpp), so a C tile is y^T:
//            16 rows of W x 16 rows of x.
//   grad-input: A = 16 rows of grad (N along the tile row; copied once per call into rows
//            padded to whole tiles), B = W's rows taken in pairs (w[n][k], w[n + 1][k]),
//            interleaved after the decode, so a C tile is dx: 16 rows of grad x 16 columns.
// A work item (`panel`) owns a slice of the output: forward kTilePanelRows rows of W (y's
// columns), grad-input `panel` columns of W (dx's). It walks W's other dimension in
// chunks (sized by the dispatcher so that a chunk's decoded W and the tiles of `a` it
// meets stay in L2), decodes the chunk, and lets every 2 x 2 block of C tiles (tmm0-3:
// 2 A tiles tmm4-5 times 2 B tiles tmm6-7) walk it; the float32 sums wait in `sums`
// between chunks. Every output element is one float32 sum in reduction order, rounded once
// to the output's dtype (bf16, or float32: no rounding): the bytes do not depend on the
// thread count or on which thread takes a panel.

// C (i, j) += A i . B j over `length` reduction elements for i < kATiles, j < kBTiles: A
// tile i at a + 16 i rows (a_stride elements a row), B tile j at b + j b_tile_stride; a
// step of 32 moves A 32 elements along its rows and B 16 rows of pairs. C (i, j) lies at
// sums + i sums_stride + j 256 floats (16 rows of 64 bytes).
template <class Tiles, int kATiles, int kBTiles>
void tiles_block(const bf16* a, int64_t a_stride, const uint32_t* b, int64_t b_tile_stride,
                 float* sums, int64_t sums_stride, int64_t length, bool first) {
  constexpr int64_t kTileFloats = kTileRows * kTileRows;
  float* const c00 = sums;
  float* const c01 = sums + kTileFloats;
  float* const c10 = sums + sums_stride;
  float* const c11 = sums + sums_stride + kTileFloats;
  if (first) {
    Tiles::template zero<0>();
    if (kBTiles == 2) Tiles::template zero<1>();
    if (kATiles == 2) Tiles::template zero<2>();
    if (kATiles == 2 && kBTiles == 2) Tiles::template zero<3>();
  } else {
    Tiles::template load<0>(c00, kTileRowBytes);
    if (kBTiles == 2) Tiles::template load<1>(c01, kTileRowBytes);
    if (kATiles == 2) Tiles::template load<2>(c10, kTileRowBytes);
    if (kATiles == 2 && kBTiles == 2) Tiles::template load<3>(c11, kTileRowBytes);
  }
  const int64_t a_row_bytes = a_stride * int64_t(sizeof(bf16));
  for (int64_t k = 0; k < length; k += 2 * kTileRows) {  // 32: one tile row of bf16
    const uint32_t* b_step = b + (k / 2) * kTileRows;
    Tiles::template load<4>(a + k, a_row_bytes);
    if (kATiles == 2) Tiles::template load<5>(a + kTileRows * a_stride + k, a_row_bytes);
    Tiles::template load<6>(b_step, kTileRowBytes);
    if (kBTiles == 2) Tiles::template load<7>(b_step + b_tile_stride, kTileRowBytes);
    Tiles::template dot_bf16<0, 4, 6>();
    if (kBTiles == 2) Tiles::template dot_bf16<1, 4, 7>();
    if (kATiles == 2) Tiles::template dot_bf16<2, 5, 6>();
    if (kATiles == 2 && kBTiles == 2) Tiles::template dot_bf16<3, 5, 7>();
  }
  Tiles::template store<0>(c00, kTileRowBytes);
  if (kBTiles == 2) Tiles::template store<1>(c01, kTileRowBytes);
  if (kATiles == 2) Tiles::template store<2>(c10, kTileRowBytes);
  if (kATiles == 2 && kBTiles == 2) Tiles::template store<3>(c11, kTileRowBytes);
}

// Every 2 x 2 block of C tiles of an a_tiles x b_tiles grid over one chunk.
template <class Tiles>
void tiles_grid(const bf16* a, int64_t a_stride, int64_t a_tiles, const uint32_t* b, int64_t b_tile_stride,
                int64_t b_tiles, float* sums, int64_t length, bool first) {
  const int64_t sums_stride = b_tiles * kTileRows * kTileRows;
  for (int64_t j = 0; j < b_tiles; j += 2) {
    for (int64_t i = 0; i < a_tiles; i += 2) {
      const bf16* ai = a + i * kTileRows * a_stride;
      const uint32_t* bj = b + j * b_tile_stride;
      float* c = sums + i * sums_stride + j * kTileRows * kTileRows;
      const bool two_a = i + 1 < a_tiles, two_b = j + 1 < b_tiles;
      if (two_a && two_b)
        tiles_block<Tiles, 2, 2>(ai, a_stride, bj, b_tile_stride, c, sums_stride, length, first);
      else if (two_a)
        tiles_block<Tiles, 2, 1>(ai, a_stride, bj, b_tile_stride, c, sums_stride, length, first);
      else if (two_b)
        tiles_block<Tiles, 1, 2>(ai, a_stride, bj, b_tile_stride, c, sums_stride, length, first);
      else
        tiles_block<Tiles, 1, 1>(ai, a_stride, bj, b_tile_stride, c, sums_stride, length, first);
    }
  }
}

// out[index + c] = from[c] for c < count, float32 sums rounded to the output's dtype (the
// ISA's vector rounding: the scalar one's bytes)
template <class Out>
void store_run(Out* out, const float* from, int64_t count) {
  int64_t c = 0;
  for (; c + kW <= count; c += kW) store_out<Out>(out + c, load(from + c));
  for (; c < count; ++c) out[c] = from_float<Out>(from[c]);
}
inline void store_sums(const TileGemmWork& a, int64_t index, const float* from, int64_t count) {
  if (a.out_dtype == kF32)
    store_run(static_cast<float*>(a.out) + index, from, count);
  else
    store_run(static_cast<bf16*>(a.out) + index, from, count);
}

inline TileConfig every_tile_full() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTileRows;
    config.row_bytes[t] = kTileRowBytes;
  }
  return config;
}

// Columns [k0, k0 + columns) of W's rows [n0, n0 + rows) in bf16, row r at out + r stride
// (k0 and columns whole blocks: K is a multiple of the blocksize).
// The rows' pieces lie K / 2 bytes apart, a stride the hardware prefetchers do not follow
// (a piece is 256 bytes in the grad-input): each row's piece, and its 8-bit block codes,
// are asked for kDecodeRowsAhead rows before they are decoded. With the tile operations
// made no-ops (one Zen 4 thread, 4096x4096, M = 64, then 128-byte pieces) the grad-input
// took 3.5 ms instead of 6.8 (dispatch.cpp has the other steps).
constexpr int64_t kDecodeRowsAhead = 4;
inline void decode_rows(const PackedWeight& w, int64_t K, int64_t n0, int64_t rows, int64_t k0, int64_t columns,
                        bf16* out, int64_t stride) {
  const int64_t blocks = columns / w.blocksize;
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kDecodeRowsAhead < rows) {
      const int64_t ahead = (n0 + r + kDecodeRowsAhead) * K + k0;
      for (int64_t byte = 0; byte < columns / 2; byte += 64) __builtin_prefetch(w.packed + ahead / 2 + byte);
      if (w.is_nested()) __builtin_prefetch(w.nested.q + ahead / w.blocksize);
    }
    const int64_t b0 = ((n0 + r) * K + k0) / w.blocksize;
    dequantize_4bit_blocks<bf16, false>(w, b0, b0 + blocks, out + r * stride);
  }
}

// forward: y[:, n0:n0 + rows] for the panel of W's rows from n0
template <class Tiles>
void forward_panel(const TileGemmWork& a, int64_t panel, uint8_t* scratch) {
  constexpr int64_t kTileFloats = kTileRows * kTileRows;
  const int64_t K = a.K, N = a.N, M = a.M;
  const int64_t n0 = panel * a.panel;
  const int64_t rows = N - n0 < a.panel ? N - n0 : a.panel;
  const int64_t w_tiles = (rows + kTileRows - 1) / kTileRows, x_tiles = a.a_tiles;
  const int64_t w_stride = tile_w_stride(a), x_tile_stride = (K / 2) * kTileRows;
  bf16* const w = reinterpret_cast<bf16*>(scratch);
  float* const sums = reinterpret_cast<float*>(scratch + tile_sums_offset(a));
  // the last tile's rows past N are zeros (their sums are never written out)
  memset(static_cast<void*>(w + rows * w_stride), 0, (w_tiles * kTileRows - rows) * w_stride * sizeof(bf16));
  const uint32_t* const x_pairs = static_cast<const uint32_t*>(a.a_repacked);
  Tiles::configure(every_tile_full());
  for (int64_t k0 = 0; k0 < K; k0 += a.chunk) {
    const int64_t columns = K - k0 < a.chunk ? K - k0 : a.chunk;
    decode_rows(a.weight, K, n0, rows, k0, columns, w, w_stride);
    tiles_grid<Tiles>(w, w_stride, w_tiles, x_pairs + (k0 / 2) * kTileRows, x_tile_stride, x_tiles, sums,
                      columns, k0 == 0);
  }
  Tiles::release();
  // y[m][n0 + n] = C tile (n / 16, m / 16) at row n % 16, column m % 16, gathered into a
  // row of y and written along it (written down C's columns, element by element, a
  // 4096x4096 M = 512 call spent more on the write-out than on the decode)
  alignas(64) float line[kTilePanelRows];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t i = 0; i < w_tiles; ++i) {
      const float* c = sums + (i * x_tiles + m / kTileRows) * kTileFloats + m % kTileRows;
      for (int64_t r = 0; r < kTileRows; ++r) line[i * kTileRows + r] = c[r * kTileRows];
    }
    store_sums(a, m * N + n0, line, rows);
  }
}

// grad-input: dx[:, c0:c0 + columns] for the panel of W's columns from c0
template <class Tiles>
void grad_input_panel(const TileGemmWork& a, int64_t panel, uint8_t* scratch) {
  constexpr int64_t kTileFloats = kTileRows * kTileRows;
  const int64_t K = a.K, N = a.N, M = a.M;
  const int64_t c0 = panel * a.panel;
  const int64_t columns = K - c0 < a.panel ? K - c0 : a.panel;  // whole blocks, a multiple of 32
  const int64_t c_tiles = columns / kTileRows, g_tiles = a.a_tiles;
  // decoded rows (row-major, a.panel columns each), then the same as pairs of rows:
  // pairs[t][p][q] = (w[2p][16 t + q], w[2p + 1][16 t + q]), a tile of 16 pairs per step
  bf16* const w = reinterpret_cast<bf16*>(scratch);
  uint32_t* const pairs = reinterpret_cast<uint32_t*>(scratch + a.chunk * a.panel * sizeof(bf16));
  const int64_t pair_tile_stride = (a.chunk / 2) * kTileRows;
  float* const sums = reinterpret_cast<float*>(scratch + tile_sums_offset(a));
  const bf16* const grad = static_cast<const bf16*>(a.a_repacked);
  Tiles::configure(every_tile_full());
  for (int64_t n0 = 0; n0 < N; n0 += a.chunk) {
    const int64_t rows = N - n0 < a.chunk ? N - n0 : a.chunk;
    const int64_t length = (rows + 2 * kTileRows - 1) / (2 * kTileRows) * (2 * kTileRows);
    decode_rows(a.weight, K, n0, rows, c0, columns, w, a.panel);
    // rows past N: zeros (grad's columns past N are zeros too: no Inf * 0 from padding)
    memset(static_cast<void*>(w + rows * a.panel), 0, (length - rows) * a.panel * sizeof(bf16));
    for (int64_t p = 0; p < length / 2; ++p) {
      const uint16_t* even = &w[2 * p * a.panel].bits;
      const uint16_t* odd = even + a.panel;
      for (int64_t t = 0; t < c_tiles; ++t) {
        uint32_t* out = pairs + t * pair_tile_stride + p * kTileRows;
        for (int64_t q = 0; q < kTileRows; ++q)
          out[q] = uint32_t(even[t * kTileRows + q]) | uint32_t(odd[t * kTileRows + q]) << 16;
      }
    }
    tiles_grid<Tiles>(grad + n0, a.a_stride, g_tiles, pairs, pair_tile_stride, c_tiles, sums, length, n0 == 0);
  }
  Tiles::release();
  // dx[m][c0 + c] = C tile (m / 16, c / 16) at row m % 16, column c % 16
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < c_tiles; ++j)
      store_sums(a, m * K + c0 + j * kTileRows,
                 sums + (m / kTileRows * c_tiles + j) * kTileFloats + m % kTileRows * kTileRows, kTileRows);
}

template <class Tiles>
void gemm_tiles_panel(const TileGemmWork& a, int64_t panel, uint8_t* scratch) {
  if (a.grad_input)
    grad_input_panel<Tiles>(a, panel, scratch);
  else
    forward_panel<Tiles>(a, panel, scratch);
}

void gemm_tiles_emulated_entry(const TileGemmWork& a, int64_t panel, uint8_t* scratch) {
  gemm_tiles_panel<EmulatedTiles>(a, panel, scratch);
}

// The native entry where the translation unit may hold AMX code (isa_avx512.cpp with
// AVX512-BF16, which every AMX CPU has); dispatch.cpp calls it only where the CPU has
// AMX-BF16 and the OS granted the tile state.
#if defined(NF4LORA_TILE_GEMM_AMX)
void gemm_tiles_amx_entry(const TileGemmWork& a, int64_t panel, uint8_t* scratch) {
  gemm_tiles_panel<AmxTiles>(a, panel, scratch);
}
constexpr TileGemmPanel kGemmTilesAmx = &gemm_tiles_amx_entry;
#else
constexpr TileGemmPanel kGemmTilesAmx = nullptr;
#endif
