// The 4-bit formats the harnesses run the kernels with. The kernels take a format as data
// (nf4_codec.h CodeTable + CodeEncoder, built in Python by nf4lora.codebook.kernel_codec);
// these are the same values, built here in C++ the same way, plus two that only a
// data-driven kernel can have: a custom table and an encoder whose codes are a scramble of
// the counts (every entry of the code lookup is exercised, not just the identity).
#pragma once

#include <math.h>
#include <stdint.h>

#include "nf4_codec.h"

namespace harness {

using nf4lora::CodeEncoder;
using nf4lora::CodeTable;

struct Format {
  const char* name;
  CodeTable table;
  CodeEncoder encoder;
};

// nf4lora.codebook.NF4_CODE, and FP4 in bit-pattern order ([0, 1/16, 8, 12, 4, 6, 2, 3] / 12
// and their negatives).
constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
constexpr float kFP4Twelfths[8] = {0.0f, 0.0625f, 8.0f, 12.0f, 4.0f, 6.0f, 2.0f, 3.0f};
constexpr float kFP4AbsThresholds[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f,
                                        0.4166667f, 0.583333f, 0.8333333f};
constexpr int kFP4CodeByRank[8] = {0, 1, 6, 7, 4, 5, 2, 3};

inline uint64_t pack_codes(const int (&codes)[16]) {
  uint64_t packed = 0;
  for (int c = 0; c < 16; ++c) packed |= uint64_t(codes[c] & 15) << (4 * c);
  return packed;
}

// A table of 16 ascending levels: thresholds = the float32 midpoints, code = count.
inline Format sorted_format(const char* name, const float* levels) {
  Format f{name, {}, {}};
  int identity[16];
  for (int c = 0; c < 16; ++c) {
    f.table.level[c] = levels[c];
    identity[c] = c;
  }
  for (int i = 0; i < 15; ++i) f.encoder.threshold[i] = (levels[i] + levels[i + 1]) * 0.5f;
  f.encoder.code_of_count = pack_codes(identity);
  return f;
}

// FP4 as codebook.kernel_codec derives it: the 7 thresholds negated and one float lower,
// the negative float nearest zero, the 7 themselves; sign-magnitude codes per count.
inline Format fp4_format() {
  Format f{"fp4", {}, {}};
  for (int c = 0; c < 8; ++c) {
    f.table.level[c] = kFP4Twelfths[c] / 12.0f;
    f.table.level[c + 8] = -(kFP4Twelfths[c] / 12.0f);
  }
  int codes[16];
  for (int i = 0; i < 7; ++i) {
    f.encoder.threshold[i] = nextafterf(-kFP4AbsThresholds[6 - i], -INFINITY);
    f.encoder.threshold[8 + i] = kFP4AbsThresholds[i];
  }
  f.encoder.threshold[7] = -0x1p-149f;
  for (int count = 0; count < 8; ++count) {
    codes[count] = 8 | kFP4CodeByRank[7 - count];
    codes[8 + count] = kFP4CodeByRank[count];
  }
  f.encoder.code_of_count = pack_codes(codes);
  return f;
}

// NF4, FP4, a custom table (IQ4_NL's int8 levels / 127: uneven steps, no level at 0 or +1)
// and the custom table's thresholds with scrambled codes (count c -> code 7c + 3 mod 16).
inline const Format* formats(int* count) {
  static Format all[4];
  static bool built = false;
  if (!built) {
    const int iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
    float custom[16];
    for (int c = 0; c < 16; ++c) custom[c] = (float)iq4nl[c] / 127.0f;
    all[0] = sorted_format("nf4", kNF4);
    all[1] = fp4_format();
    all[2] = sorted_format("custom", custom);
    all[3] = sorted_format("scrambled", custom);
    int scrambled[16];
    for (int c = 0; c < 16; ++c) scrambled[c] = (7 * c + 3) % 16;
    all[3].encoder.code_of_count = pack_codes(scrambled);
    built = true;
  }
  *count = 4;
  return all;
}

}  // namespace harness
