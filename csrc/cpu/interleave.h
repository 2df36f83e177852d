// interleave.h: a matmul weight's interleaved copy (weight.h kInterleaved*), built from
// its bitsandbytes-layout bytes. Scalar and portable: the dispatcher (interleave_4bit)
// and the SIMDe check's harness (scripts/avx512_emulated/cmp_gemv.cpp) build it the same way.
#pragma once

#include <stdint.h>
#include <string.h>

#include "../weight.h"

namespace nf4lora {
namespace cpu {

// Tiles [t0, t1) of w [N, K] into out (interleaved_bytes(N, K) bytes in all); needs
// interleavable(K, w.blocksize).
inline void interleave_tiles(const PackedWeight& w, int64_t N, int64_t K, int64_t t0, int64_t t1,
                             uint8_t* out) {
  const int64_t groups = K / kInterleavedColumns;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* group = out + (t * groups + g) * kInterleavedGroupBytes;
      uint16_t words[kInterleavedChunks][2 * kInterleavedRows] = {};
      float constants[kInterleavedRows] = {};
      for (int64_t j = 0; j < kInterleavedRows; ++j) {
        const int64_t n = t * kInterleavedRows + j;
        if (n >= N) break;  // padding rows: code 0, constant 0
        const int64_t first = n * K + g * kInterleavedColumns;  // element index
        constants[j] = w.constant(first / w.blocksize);
        const uint8_t* row = w.packed + first / 2;
        for (int64_t c = 0; c < kInterleavedChunks; ++c) {
          // columns 8c..8c+7: 4 bytes, high nibble first, so the even columns (h = 0) are
          // the high nibbles and the odd ones (h = 1) the low; column 8c + 2s + h goes to
          // bits 4s..4s+3 of word 2j + h
          uint32_t v;
          memcpy(&v, row + 4 * c, 4);
          const uint32_t high = (v >> 4) & 0x0F0F0F0Fu, low = v & 0x0F0F0F0Fu;
          for (int h = 0; h < 2; ++h) {
            const uint32_t nibbles = h == 0 ? high : low;  // byte s: column 8c + 2s + h
            words[c][2 * j + h] = static_cast<uint16_t>((nibbles & 0xF) | ((nibbles >> 4) & 0xF0) |
                                                        ((nibbles >> 8) & 0xF00) | ((nibbles >> 12) & 0xF000));
          }
        }
      }
      memcpy(group, words, sizeof(words));
      memcpy(group + sizeof(words), constants, sizeof(constants));
    }
  }
}

}  // namespace cpu
}  // namespace nf4lora
