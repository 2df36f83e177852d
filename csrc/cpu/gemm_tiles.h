// gemm_tiles.h: the tile GEMM, y [M, N] = x [M, K] @ W^T for bf16 x and larger M, with W
// read packed and decoded into bf16 tiles in cache, never materialized (the dequantize +
// GEMM path writes all of W in bf16 to a 16 MiB workspace and reads it back). Written once
// against tiles.h's vocabulary: Tiles = AmxTiles (AMX-BF16 CPUs) or EmulatedTiles (any
// CPU, for the tests). Like kernel_body.h, NOT a normal header: each ISA translation unit
// includes it after kernel_body.h, inside its namespace, and gets the W decoder of its own
// dequantize (the same bytes on every ISA, `dequantize_4bit(..., bfloat16)`).
//
// Roles: W is the tile multiply's A operand (16 rows of W, 32 columns of K, as decoded),
// x its B operand, repacked once per call as bf16 pairs (dispatch.cpp: x_pairs[t][k/2][j]
// = (x[16t + j][k], x[16t + j][k + 1]), zero past M), so a C tile is y^T: 16 rows of W x
// 16 rows of x, float32.
//
// A work item is a panel of kTilePanelRows rows of W. Per chunk of k_chunk columns (the
// dispatcher sizes it so that every tile of x's chunk stays in L2 while the panel's tiles
// pass over it), the panel's rows are decoded into `w` (bf16, rows kTileWPad elements
// longer than the chunk: a stride of a multiple of 4 KiB would put a tile's 16 rows in
// one L1 set), and every 2 x 2 block of C tiles (tmm0-3: 2 tiles of W rows, tmm4-5, times
// 2 tiles of x rows, tmm6-7) walks the chunk, its sums kept in `acc` between chunks.
// Every element of y is one float32 sum over k in order, rounded once to bf16: the bytes
// do not depend on the thread count or on which panel a thread takes.

template <class Tiles, int kWTiles, int kXTiles>
void gemm_tiles_block(const bf16* w, int64_t w_stride, const uint32_t* xp, int64_t x_tile_stride,
                      float* acc, int64_t acc_w_stride, int64_t columns, bool first) {
  constexpr int64_t kTileFloats = kTileRows * kTileRows;
  // C tile (i, j) = tmm(2i + j): W tile i (tmm4 + i) times x tile j (tmm6 + j)
  float* const c00 = acc;
  float* const c01 = acc + kTileFloats;
  float* const c10 = acc + acc_w_stride;
  float* const c11 = acc + acc_w_stride + kTileFloats;
  if (first) {
    Tiles::template zero<0>();
    if (kXTiles == 2) Tiles::template zero<1>();
    if (kWTiles == 2) Tiles::template zero<2>();
    if (kWTiles == 2 && kXTiles == 2) Tiles::template zero<3>();
  } else {
    Tiles::template load<0>(c00, kTileRowBytes);
    if (kXTiles == 2) Tiles::template load<1>(c01, kTileRowBytes);
    if (kWTiles == 2) Tiles::template load<2>(c10, kTileRowBytes);
    if (kWTiles == 2 && kXTiles == 2) Tiles::template load<3>(c11, kTileRowBytes);
  }
  const int64_t w_row_bytes = w_stride * int64_t(sizeof(bf16));
  for (int64_t k = 0; k < columns; k += 2 * kTileRows) {  // 32 columns: one tile row of bf16
    const uint32_t* x_step = xp + (k / 2) * kTileRows;
    Tiles::template load<4>(w + k, w_row_bytes);
    if (kWTiles == 2) Tiles::template load<5>(w + kTileRows * w_stride + k, w_row_bytes);
    Tiles::template load<6>(x_step, kTileRowBytes);
    if (kXTiles == 2) Tiles::template load<7>(x_step + x_tile_stride, kTileRowBytes);
    Tiles::template dot_bf16<0, 4, 6>();
    if (kXTiles == 2) Tiles::template dot_bf16<1, 4, 7>();
    if (kWTiles == 2) Tiles::template dot_bf16<2, 5, 6>();
    if (kWTiles == 2 && kXTiles == 2) Tiles::template dot_bf16<3, 5, 7>();
  }
  Tiles::template store<0>(c00, kTileRowBytes);
  if (kXTiles == 2) Tiles::template store<1>(c01, kTileRowBytes);
  if (kWTiles == 2) Tiles::template store<2>(c10, kTileRowBytes);
  if (kWTiles == 2 && kXTiles == 2) Tiles::template store<3>(c11, kTileRowBytes);
}

template <class Tiles>
void gemm_tiles_panel_impl(const TileGemmWork& a, int64_t panel, uint8_t* scratch) {
  constexpr int64_t kTileFloats = kTileRows * kTileRows;
  const int64_t K = a.K, N = a.N, M = a.M, blocksize = a.weight.blocksize;
  const int64_t n0 = panel * kTilePanelRows;
  const int64_t rows = N - n0 < kTilePanelRows ? N - n0 : kTilePanelRows;
  const int64_t w_tiles = (rows + kTileRows - 1) / kTileRows, x_tiles = a.x_tiles;
  const int64_t w_stride = tile_w_stride(a.k_chunk), x_tile_stride = (K / 2) * kTileRows;
  const int64_t acc_w_stride = x_tiles * kTileFloats;  // floats from one W tile's sums to the next
  bf16* const w = reinterpret_cast<bf16*>(scratch);
  float* const acc = reinterpret_cast<float*>(scratch + tile_w_bytes(a.k_chunk));
  // the last tile's rows past N are zeros (their sums are never written out)
  memset(static_cast<void*>(w + rows * w_stride), 0, (w_tiles * kTileRows - rows) * w_stride * sizeof(bf16));

  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTileRows;
    config.row_bytes[t] = kTileRowBytes;
  }
  Tiles::configure(config);
  for (int64_t k0 = 0; k0 < K; k0 += a.k_chunk) {
    const int64_t columns = K - k0 < a.k_chunk ? K - k0 : a.k_chunk;  // a multiple of the blocksize
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b0 = ((n0 + r) * K + k0) / blocksize;
      dequantize_4bit_blocks<bf16, false>(a.weight, b0, b0 + columns / blocksize, w + r * w_stride);
    }
    const uint32_t* const xp = a.x_pairs + (k0 / 2) * kTileRows;
    for (int64_t j = 0; j < x_tiles; j += 2) {
      for (int64_t i = 0; i < w_tiles; i += 2) {
        const bf16* wi = w + i * kTileRows * w_stride;
        const uint32_t* xj = xp + j * x_tile_stride;
        float* c = acc + i * acc_w_stride + j * kTileFloats;
        const bool two_w = i + 1 < w_tiles, two_x = j + 1 < x_tiles;
        if (two_w && two_x)
          gemm_tiles_block<Tiles, 2, 2>(wi, w_stride, xj, x_tile_stride, c, acc_w_stride, columns, k0 == 0);
        else if (two_w)
          gemm_tiles_block<Tiles, 2, 1>(wi, w_stride, xj, x_tile_stride, c, acc_w_stride, columns, k0 == 0);
        else if (two_x)
          gemm_tiles_block<Tiles, 1, 2>(wi, w_stride, xj, x_tile_stride, c, acc_w_stride, columns, k0 == 0);
        else
          gemm_tiles_block<Tiles, 1, 1>(wi, w_stride, xj, x_tile_stride, c, acc_w_stride, columns, k0 == 0);
      }
    }
  }
  Tiles::release();

  // y[m][n] = the sum in C tile (n / 16, m / 16) at row n % 16, column m % 16
  bf16* const y = static_cast<bf16*>(a.y);
  for (int64_t i = 0; i < w_tiles; ++i)
    for (int64_t j = 0; j < x_tiles; ++j) {
      const float* c = acc + i * acc_w_stride + j * kTileFloats;
      for (int64_t r = 0; r < kTileRows && i * kTileRows + r < rows; ++r)
        for (int64_t s = 0; s < kTileRows && j * kTileRows + s < M; ++s)
          y[(j * kTileRows + s) * N + n0 + i * kTileRows + r] = from_float<bf16>(c[r * kTileRows + s]);
    }
}

void gemm_tiles_emulated_entry(const TileGemmWork& a, int64_t panel, uint8_t* scratch) {
  gemm_tiles_panel_impl<EmulatedTiles>(a, panel, scratch);
}

// The native entry where the translation unit may hold AMX code (isa_avx512.cpp with
// AVX512-BF16, which every AMX CPU has); dispatch.cpp calls it only where the CPU has
// AMX-BF16 and the OS granted the tile state.
#if defined(NF4LORA_TILE_GEMM_AMX)
void gemm_tiles_amx_entry(const TileGemmWork& a, int64_t panel, uint8_t* scratch) {
  gemm_tiles_panel_impl<AmxTiles>(a, panel, scratch);
}
constexpr TileGemmPanel kGemmTilesAmx = &gemm_tiles_amx_entry;
#else
constexpr TileGemmPanel kGemmTilesAmx = nullptr;
#endif
