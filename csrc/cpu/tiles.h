// tiles.h: the tile-matrix vocabulary the tile GEMMs (gemm_tiles.h) are written in, with two
// implementations of the same five operations:
//
//   AmxTiles       Intel AMX (AMX-TILE + AMX-BF16: Sapphire Rapids and later Xeons):
//                  ldtilecfg, tileloadd, tilestored, tilezero, tdpbf16ps, tilerelease
//   EmulatedTiles  the same operations in plain C++, following the Intel SDM's pseudocode
//                  (the tile registers are a per-thread array), so the kernel's tiling,
//                  padding and indexing run and are tested on every CPU
//                  (NF4LORA_CPU_GEMM=amx-emulated; 0.4 ns per multiply-add on one Zen 4
//                  thread, a few hundred times slower than AMX at its peak: tests only)
//
// A tile is up to 16 rows of up to 64 bytes; palette 1 has 8 of them (tmm0..tmm7).
// dot_bf16<C, A, B>: C [16 x 16 float32] += A [16 x 32 bf16] . B, where B holds the
// products' other operand as bf16 PAIRS: row k of B is (b[2k][n], b[2k + 1][n]) for
// n = 0..15, so C[m][n] += sum_k A[m][2k] * b[2k][n] + A[m][2k + 1] * b[2k + 1][n].
//
// AmxTiles is written as inline assembly, not as gcc's _tile_* intrinsics: those are
// macros that paste the tile number into the instruction text (#dst), so they cannot take
// a template parameter. Callers must have the OS's permission to use the tile state
// (dispatch.cpp amx_usable: Linux's arch_prctl(ARCH_REQ_XCOMP_PERM)); without it the first
// tile instruction faults.
#pragma once

#include <stdint.h>
#include <string.h>

namespace nf4lora::cpu {

constexpr int kTileRows = 16;      // rows of a tile (palette 1)
constexpr int kTileRowBytes = 64;  // bytes of a tile row (palette 1)

// LDTILECFG's 64-byte operand (palette 1). Tiles left at 0 rows are not configured.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t row_bytes[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

struct AmxTiles {
  static void configure(const TileConfig& config) { __asm__ volatile("ldtilecfg %0" ::"m"(config)); }
  static void release() { __asm__ volatile("tilerelease" ::: "memory"); }
  template <int T>
  static void zero() {
    __asm__ volatile("tilezero %%tmm%c0" ::"i"(T));
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int C, int A, int B>
  static void dot_bf16() {  // AT&T operand order: B, A, C (Intel: tdpbf16ps C, A, B)
    __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
};

struct EmulatedTiles {
  struct State {
    TileConfig config;
    alignas(64) uint8_t tile[8][kTileRows * kTileRowBytes];
  };
  static State& state() {
    static thread_local State s;
    return s;
  }
  static void configure(const TileConfig& config) {
    State& s = state();
    s.config = config;
    memset(s.tile, 0, sizeof(s.tile));  // LDTILECFG zeroes every tile
  }
  static void release() { configure(TileConfig{}); }
  template <int T>
  static void zero() {
    memset(state().tile[T], 0, sizeof(state().tile[T]));
  }
  template <int T>
  static void load(const void* p, int64_t stride) {  // the rows past the configured ones: 0
    State& s = state();
    zero<T>();
    for (int r = 0; r < s.config.rows[T]; ++r)
      memcpy(s.tile[T] + r * kTileRowBytes, static_cast<const uint8_t*>(p) + r * stride,
             s.config.row_bytes[T]);
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    const State& s = state();
    for (int r = 0; r < s.config.rows[T]; ++r)
      memcpy(static_cast<uint8_t*>(p) + r * stride, s.tile[T] + r * kTileRowBytes, s.config.row_bytes[T]);
  }
  // The SDM's TDPBF16PS: per element two float32 additions in pair order, each rounded to
  // nearest even; bf16 inputs that are subnormal count as 0 (DAZ) and subnormal sums are
  // flushed to 0 (FTZ). (A bf16 product is exact in float32: 8 x 8 significand bits.)
  template <int C, int A, int B>
  static void dot_bf16() {
    State& s = state();
    const int rows = s.config.rows[C], columns = s.config.row_bytes[C] / 4, pairs = s.config.row_bytes[A] / 4;
    for (int m = 0; m < rows; ++m) {
      float* c = reinterpret_cast<float*>(s.tile[C] + m * kTileRowBytes);
      const uint16_t* a = reinterpret_cast<const uint16_t*>(s.tile[A] + m * kTileRowBytes);
      for (int k = 0; k < pairs; ++k) {
        const uint16_t* b = reinterpret_cast<const uint16_t*>(s.tile[B] + k * kTileRowBytes);
        for (int n = 0; n < columns; ++n) {
          c[n] = flush(c[n] + widen(a[2 * k]) * widen(b[2 * n]));
          c[n] = flush(c[n] + widen(a[2 * k + 1]) * widen(b[2 * n + 1]));
        }
      }
    }
  }

 private:
  static float widen(uint16_t bits) {  // bf16 -> float32, subnormals as 0
    const uint32_t u = (bits & 0x7f80u) == 0 ? uint32_t(bits & 0x8000u) << 16 : uint32_t(bits) << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
  }
  static float flush(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
    memcpy(&x, &u, sizeof(x));
    return x;
  }
};

}  // namespace nf4lora::cpu
