// The AVX-512 codec kernels (SIMDe-emulated, see scripts/check_avx512_emulated.sh) vs the scalar path, byte for byte, on every entry.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <vector>
#include "cpu/isa.h"
#include "formats.h"
using namespace nf4lora; using namespace nf4lora::cpu;
static uint32_t rng = 1;
static uint32_t rnd() { rng = rng * 1664525u + 1013904223u; return rng >> 8; }
static float rndf() { return (rnd() % 2000001) / 1000000.0f - 1.0f; }
int fails = 0;
// equal bytes, or both NaN (payloads may differ: nf4_codec.h)
static bool is_nan_bits(uint32_t x, int es) {
  return es == 4 ? (x & 0x7fffffffu) > 0x7f800000u : es == 2 ? false : false;
}
static bool same(const uint8_t* a, const uint8_t* b, int64_t n, int es, int dt) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t x = 0, y = 0; memcpy(&x, a + i * es, es); memcpy(&y, b + i * es, es);
    if (x == y) continue;
    bool nx, ny;
    if (dt == kF32) { nx = (x & 0x7fffffffu) > 0x7f800000u; ny = (y & 0x7fffffffu) > 0x7f800000u; }
    else if (dt == kBF16) { nx = (x & 0x7fffu) > 0x7f80u; ny = (y & 0x7fffu) > 0x7f80u; }
    else { nx = (x & 0x7fffu) > 0x7c00u; ny = (y & 0x7fffu) > 0x7c00u; }
    if (!(nx && ny)) return false;
  }
  return true;
}
void expect(bool ok, const char* what, int64_t a, int64_t b, int c) { if (!ok && fails++ < 20) printf("FAIL %s %lld %lld %d\n", what, (long long)a, (long long)b, c); }
int main() {
  const IsaKernels& S = scalar::kernels(); const IsaKernels& V = avx512::kernels();
  int num_formats; const harness::Format* formats = harness::formats(&num_formats);
  std::vector<float> code(256); for (int i = 0; i < 256; ++i) code[i] = (i - 127.5f) / 127.5f;
  int64_t sizes[] = {0, 1, 2, 63, 64, 65, 127, 4097, 3 * 4096 + 7, 100000};
  int64_t bss[] = {32, 64, 128, 256, 1024, 4096};
  for (int64_t n : sizes) for (int64_t bs : bss) {
    int64_t blocks = (n + bs - 1) / bs;
    // 64-byte aligned buffers with slack
    std::vector<uint8_t> packed((n + 1) / 2 + 64); for (auto& b : packed) b = rnd();
    std::vector<float> absmax(blocks + 1); for (int64_t i = 0; i < blocks; ++i) {
      int k = rnd() % 12; uint32_t pay = k == 10 ? 0x7fffffffu : 0xff80ffffu; float pn; memcpy(&pn, &pay, 4); absmax[i] = k >= 10 ? pn : k == 0 ? NAN : k == 1 ? INFINITY : k == 2 ? -INFINITY : k == 3 ? 0.0f : k == 4 ? 1e-40f : k == 5 ? 3e38f : fabsf(rndf()) * 10; }
    std::vector<uint8_t> q(blocks + 1); for (auto& b : q) b = rnd();
    std::vector<float> absmax2(blocks / 4 + 2); for (auto& a : absmax2) a = fabsf(rndf());
    if (absmax2.size() > 3) absmax2[1] = NAN;
    // decoding reads only the table: the scrambled encoder's table is the custom one
    for (int nested_bs : {0, 4, 256}) for (int qt = 0; qt < num_formats - 1; ++qt) for (int dt : {kF32, kF16, kBF16}) for (int stream : {0, 1}) {
      int es = dt == kF32 ? 4 : 2;
      if (stream && (bs * es) % 64) continue;
      Dequant4Args a{}; a.weight.packed = packed.data(); a.weight.absmax = absmax.data();
      if (nested_bs) { a.weight.nested.q = q.data(); a.weight.nested.absmax2 = absmax2.data(); a.weight.nested.code2 = code.data(); a.weight.nested.offset = 0.03f; a.weight.nested.blocksize = nested_bs; }
      a.weight.n = n; a.weight.blocksize = bs; a.weight.table = formats[qt].table; a.out_dtype = dt; a.stream = stream;
      uint8_t* o1 = (uint8_t*)aligned_alloc(64, n * es + 64); uint8_t* o2 = (uint8_t*)aligned_alloc(64, n * es + 64);
      memset(o1, 0x5a, n * es + 64); memset(o2, 0x5a, n * es + 64);
      a.out = o1; S.dequantize_4bit(a, 0, blocks);
      a.out = o2; int64_t mid = blocks / 3; V.dequantize_4bit(a, 0, mid); V.dequantize_4bit(a, mid, blocks);
      expect(same(o1, o2, n, es, dt) && memcmp(o1 + n * es, o2 + n * es, 64) == 0, "dequantize_4bit", n, bs, qt * 100 + dt * 10 + stream + nested_bs * 1000);
      if (!same(o1, o2, n, es, dt) && fails < 6) for (int64_t i = 0; i < n * es + 64; i += es) if (memcmp(o1 + i, o2 + i, es)) {
        uint32_t x = 0, y = 0; memcpy(&x, o1 + i, es); memcpy(&y, o2 + i, es); int64_t e = i / es, b = e / bs;
        uint32_t ab; memcpy(&ab, &absmax[b], 4); uint32_t a2b; memcpy(&a2b, &absmax2[b / (nested_bs ? nested_bs : 1)], 4);
        printf("  elem %lld block %lld scalar %08x vec %08x absmax %08x absmax2 %08x q %d\n", (long long)e, (long long)b, x, y, ab, nested_bs ? a2b : 0, q[b]); break; }
      free(o1); free(o2);
    }
    // quantize 4-bit and 8-bit: a few inputs
    for (int dt : {kF32, kF16, kBF16}) {
      int es = dt == kF32 ? 4 : 2;
      std::vector<uint8_t> in(n * es + 64);
      for (int64_t i = 0; i < n; ++i) { float f = rndf() * 5; if (rnd() % 1000 == 0) f = NAN;
        if (dt == kF32) memcpy(&in[i * 4], &f, 4); else { uint16_t h = dt == kBF16 ? float_to_bf16_bits(f) : float_to_fp16_bits(f); memcpy(&in[i * 2], &h, 2); } }
      for (int qt = 0; qt < num_formats; ++qt) {
        // float32, a whole first block: absmax 1.0, so the scaled values are the inputs: the
        // format's thresholds, one float above and below each, -0.0, +-tiny, +-inf-free
        if (dt == kF32 && n >= bs && bs >= 64) {
          float* x = reinterpret_cast<float*>(in.data());
          const float* t = formats[qt].encoder.threshold;
          for (int i = 0; i < 15; ++i) { x[1 + i] = t[i]; x[16 + i] = nextafterf(t[i], 2.0f); x[31 + i] = nextafterf(t[i], -2.0f); }
          x[0] = 1.0f; x[46] = -0.0f; x[47] = 0x1p-149f; x[48] = -0x1p-149f; x[49] = -1.0f;
          for (int64_t i = 50; i < bs; ++i) x[i] = rndf();
        }
        std::vector<uint8_t> p1((n + 1) / 2 + 1), p2((n + 1) / 2 + 1); std::vector<float> a1(blocks + 1), a2(blocks + 1);
        Quant4Args qa{in.data(), dt, n, bs, formats[qt].encoder, p1.data(), a1.data()}; S.quantize_4bit(qa, 0, blocks);
        qa.packed = p2.data(); qa.absmax = a2.data(); V.quantize_4bit(qa, 0, blocks);
        expect(p1 == p2 && memcmp(a1.data(), a2.data(), 4 * blocks) == 0, "quantize_4bit", n, bs, qt * 10 + dt);
      }
      std::vector<uint8_t> c1(n + 1), c2(n + 1); std::vector<float> a1(blocks + 1), a2(blocks + 1);
      Quant8Args q8{in.data(), dt, code.data(), n, bs, c1.data(), a1.data()}; S.quantize_blockwise(q8, 0, blocks);
      q8.q = c2.data(); q8.absmax = a2.data(); V.quantize_blockwise(q8, 0, blocks);
      expect(c1 == c2 && memcmp(a1.data(), a2.data(), 4 * blocks) == 0, "quantize_blockwise", n, bs, dt);
      std::vector<uint8_t> o1(n * es + 8), o2(n * es + 8);
      Dequant8Args d8{c1.data(), absmax.data(), code.data(), n, bs, o1.data(), dt}; S.dequantize_blockwise(d8, 0, blocks);
      d8.out = o2.data(); V.dequantize_blockwise(d8, 0, blocks);
      expect(same(o1.data(), o2.data(), n, es, dt), "dequantize_blockwise", n, bs, dt);
    }
  }
  printf("%s (%d failures)\n", fails ? "FAILED" : "all equal", fails);
  return fails != 0;
}
