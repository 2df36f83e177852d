// Full lora GEMV (prepare, lora_h, rows) of scalar / avx2 (native) / avx512 (SIMDe
// emulated) kernels, each against a double-precision reference computed here; one adapter,
// or each row its own of a stack (a mixed-adapter batch).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "cpu/interleave.h"
#include "cpu/isa.h"
#include "formats.h"
#include "values.h"
using namespace nf4lora;
using namespace nf4lora::cpu;

using namespace harness;

struct Stats { double max_excess[3] = {0, 0, 0}; long over1[3] = {0, 0, 0}; double max_err[3] = {0, 0, 0}; long checked[3] = {0, 0, 0}; long fails = 0; long cases = 0; long interleaved = 0; };

static const double kRelTol = 1e-5;

// err metric: f32: |out-ref| / scale ; 16-bit: |out - round(ref)| in ulps, minus slack
// extra: an absolute error the path may add on top (the integer decoders' rounding of x and
// of the table to int16 levels, bounded per term in run_case)
static bool check_val(int dt, double out, double ref, double scale, Stats& st, const char* what,
                      const char* desc, int64_t m, int64_t idx, double extra = 0.0) {
  bool ok;
  double metric;
  if (dt == kF32) {
    metric = fabs(out - ref) / (scale > 0 ? scale : 1e-30);
    ok = fabs(out - ref) <= kRelTol * scale + 1e-30;
  } else {
    float r = round_to(dt, ref);
    double u = ulp_of(dt, r);
    metric = fabs(out - r) / u;
    ok = fabs(out - r) <= u + kRelTol * scale + extra;  // one output ulp (+ float32 sum slack)
    if (fabs(out - r) > u) { st.over1[dt]++; double ex = (fabs(out - r) - u) / scale; if (ex > st.max_excess[dt]) st.max_excess[dt] = ex; }
  }
  if (!(metric <= 1e300)) ok = false;  // NaN
  if (metric > st.max_err[dt]) st.max_err[dt] = metric;
  st.checked[dt]++;
  if (!ok && st.fails++ < 12)
    printf("  FAIL %s %s m=%lld idx=%lld out=%.9g ref=%.9g scale=%.3g\n", what, desc,
           (long long)m, (long long)idx, out, ref, scale);
  return ok;
}

static const uint32_t kCanary = 0xA5A5A5A5u;

static void run_case(const IsaKernels& K_, int64_t M, int64_t K, int64_t N, int64_t bs, int qt,
                     const harness::Format& format, int nested_bs, int64_t rank, bool has_bias,
                     int dt, Stats& st) {
  rng = 0x9E3779B9u ^ (uint32_t)(M * 1000003 + K * 10007 + N * 101 + bs * 7 + qt * 3 + nested_bs * 13 + rank * 17 + has_bias * 19 + dt * 23);
  for (int i = 0; i < 4; ++i) rnd();
  // every other case with LoRA is a mixed-adapter batch: 3 adapters stacked, row m's
  // adapter (m * 5 + 2) % 4 - 1 (-1: none), each its own scaling (isa.h GemvWork::adapter)
  const bool mixed = rank > 0 && (st.cases / 2) % 2 == 0;
  char desc[200];
  snprintf(desc, sizeof desc, "[%s M=%lld K=%lld N=%lld bs=%lld %s nbs=%d r=%lld bias=%d dt=%d mixed=%d case=%ld]",
           K_.name, (long long)M, (long long)K, (long long)N, (long long)bs, format.name, nested_bs,
           (long long)rank, has_bias, dt, mixed, st.cases);
  const int es = es_of(dt);
  const int64_t blocks = N * K / bs;
  const int64_t adapters = mixed ? 3 : 1;
  std::vector<int64_t> index(M, 0);
  if (mixed)
    for (int64_t m = 0; m < M; ++m) index[m] = (m * 5 + 2) % (adapters + 1) - 1;
  const float adapter_scalings[3] = {0.75f, 1.5f, -0.5f};
  std::vector<uint8_t> x(M * K * es), A(adapters * rank * K * es + 4),
      B(adapters * N * rank * es + 4), bias(N * es);
  for (int64_t i = 0; i < M * K; ++i) put(x.data(), dt, i, rndf());
  for (int64_t i = 0; i < adapters * rank * K; ++i) put(A.data(), dt, i, rndf() * 0.5f);
  for (int64_t i = 0; i < adapters * N * rank; ++i) put(B.data(), dt, i, rndf() * 0.5f);
  for (int64_t i = 0; i < N; ++i) put(bias.data(), dt, i, rndf());
  std::vector<uint8_t> packed(N * K / 2 + 64);
  for (auto& b : packed) b = rnd();
  std::vector<float> absmax(blocks + 1);
  for (auto& a : absmax) a = 0.05f + 1.5f * fabsf(rndf());
  std::vector<float> code2(256);
  for (int i = 0; i < 256; ++i) code2[i] = (i - 127.5f) / 127.5f;
  std::vector<uint8_t> q(blocks + 1);
  for (auto& b : q) b = rnd();
  const int64_t nb2 = nested_bs ? (blocks + nested_bs - 1) / nested_bs : 1;
  std::vector<float> absmax2(nb2 + 1);
  for (auto& a : absmax2) a = 0.2f + fabsf(rndf());
  const float offset = 0.9f, scaling = 0.75f;

  // outputs with canaries
  std::vector<uint8_t> y(M * N * es + 64), h(M * rank * es + 64);
  memset(y.data(), 0xA5, y.size()); memset(h.data(), 0xA5, h.size());
  // workspaces with canaries
  const int64_t slack = 64;
  std::vector<float> x_paired(M * K + slack), x_natural(M * K + slack), h_scaled(M * rank + slack),
      x_scales(M * (K / kGemvXGroup) + slack);
  auto fillc = [](std::vector<float>& v) { for (auto& f : v) memcpy(&f, &kCanary, 4); };
  fillc(x_paired); fillc(x_natural); fillc(h_scaled); fillc(x_scales);
  // 16-bit x: one case in four takes the int16 integer decoder (where the ISA has one), as
  // the dispatcher's default does for few rows, one in four the int8 one (avx512bf16;
  // int16 on the ISAs without it, as gemv_body.h with_decoder falls back); the rest the
  // float decoders
  const GemvSums sums = dt == kF32 || st.cases % 2 != 0 ? GemvSums::kFloat
                        : st.cases % 4 == 0             ? GemvSums::kInt16
                                                        : GemvSums::kInt8;
  const bool integer_sums = sums != GemvSums::kFloat;

  PackedWeight w;
  w.packed = packed.data(); w.absmax = absmax.data(); w.n = N * K; w.blocksize = bs; w.table = format.table;
  if (nested_bs) {
    w.nested.q = q.data(); w.nested.absmax2 = absmax2.data(); w.nested.code2 = code2.data();
    w.nested.offset = offset; w.nested.blocksize = nested_bs;
  }
  LoraGemvArgs op{x.data(), dt, M, N, K, w, rank ? A.data() : nullptr, rank ? B.data() : nullptr,
                  rank, scaling, has_bias ? bias.data() : nullptr, y.data(), rank ? h.data() : nullptr};
  // half of the integer cases (int16 and int8) read the weight's interleaved copy where the
  // ISA has that kernel (as the dispatcher does when the call brings one: dispatch.cpp
  // wants_interleaved)
  const bool interleaved = integer_sums && K_.gemv_interleaved_tiles != nullptr && dt != kF32 &&
                           interleavable(K, bs) && (st.cases / 4) % 2 == 0;
  std::vector<uint8_t> interleaved_copy(interleaved ? interleaved_bytes(N, K) : 0);
  if (interleaved) {
    interleave_tiles(w, N, K, 0, interleaved_tiles(N), interleaved_copy.data());
    op.interleaved = interleaved_copy.data();
    st.interleaved++;
  }
  GemvWork args{op, x_paired.data(), rank > 0 ? x_natural.data() : nullptr, h_scaled.data(),
                x_scales.data(), sums};
  if (mixed) {
    args.adapter_index = index.data();
    args.scalings = adapter_scalings;
  }
  for (int64_t m = 0; m < M; ++m) (interleaved ? K_.gemv_interleaved_prepare : K_.gemv_prepare)(args, m);
  for (int64_t i = 0; i < M * rank; ++i) K_.gemv_lora_h(args, i / rank, i % rank);
  // rows (tiles of 16 rows, interleaved) in three ranges, out of order
  const int64_t units = interleaved ? interleaved_tiles(N) : N;
  const int64_t c1 = units / 3, c2 = (2 * units) / 3;
  const GemvWPhase rows = interleaved ? K_.gemv_interleaved_tiles : K_.gemv_rows;
  rows(args, c2, units);
  rows(args, 0, c1);
  rows(args, c1, c2);
  st.cases++;

  // canaries
  auto canary_ok = [&](const uint8_t* p, size_t n) { for (size_t i = 0; i < n; ++i) if (p[i] != 0xA5) return false; return true; };
  if (!canary_ok(y.data() + M * N * es, 64)) { st.fails++; printf("  FAIL y overrun %s\n", desc); }
  if (!canary_ok(h.data() + M * rank * es, 64)) { st.fails++; printf("  FAIL h overrun %s\n", desc); }
  auto wcan = [&](std::vector<float>& v, int64_t used, const char* nm) {
    for (int64_t i = used; i < (int64_t)v.size(); ++i) { uint32_t u; memcpy(&u, &v[i], 4);
      if (u != kCanary) { st.fails++; printf("  FAIL workspace %s overrun %s\n", nm, desc); return; } } };
  wcan(x_paired, M * K, "x_paired"); wcan(x_natural, rank ? M * K : 0, "x_natural"); wcan(h_scaled, M * rank, "h_scaled");
  wcan(x_scales, M * (K / kGemvXGroup), "x_scales");

  // reference
  const float* table = format.table.level;
  // the vdpbf16ps path (bf16 activations, blocksize a multiple of its 64-weight step)
  // multiplies by bf16(table[code] * absmax): dequantize_4bit's bf16 weights
  const bool bf16_weights =
      strcmp(K_.name, "avx512bf16") == 0 && dt == kBF16 && bs % 64 == 0 && !integer_sums;
  std::vector<double> W(N * K), block_constant(blocks);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = n * K + k, b = e / bs;
      const uint8_t byte = packed[e / 2];
      const int code = (e % 2 == 0) ? byte >> 4 : byte & 15;
      // the block constant as the library defines it (float32 ops, nf4_codec.h)
      double am = nested_bs ? (double)decode_nested_absmax(code2.data(), q[b], absmax2[b / nested_bs], offset)
                            : absmax[b];
      W[e] = table[code] * am;
      block_constant[b] = fabs(am);
      if (bf16_weights) W[e] = bf16_bits_to_float(float_to_bf16_bits((float)((float)table[code] * am)));
    }
  for (int64_t m = 0; m < M; ++m) {
    const int64_t a = index[m];  // row m's adapter (-1: none: h = 0, no LoRA term)
    const double row_scaling = mixed && a >= 0 ? adapter_scalings[a] : scaling;
    for (int64_t j = 0; j < rank; ++j) {
      double s = 0, sa = 0;
      for (int64_t k = 0; k < K && a >= 0; ++k) {
        double t = (double)get(x.data(), dt, m * K + k) * get(A.data(), dt, (a * rank + j) * K + k);
        s += t; sa += fabs(t);
      }
      check_val(dt, get(h.data(), dt, m * rank + j), s, sa, st, "h", desc, m, j);
    }
    // the integer decoders: x within 0.5 / L of its group's max |x|, each table value
    // within 0.5 / L (times the block constant), L = 16383 (int16) or 127 (int8)
    const bool integer = integer_sums && strcmp(K_.name, "scalar") != 0 && bs % kGemvXGroup == 0;
    // (x's and W's: the interleaved kernel's W levels are smaller)
    const bool int8 = sums == GemvSums::kInt8 && strcmp(K_.name, "avx512bf16") == 0;
    const double level_scale = int8 ? kGemvInt8LevelScale : kGemvLevelScale;
    const double w_level_scale = !interleaved || int8 ? level_scale
                                 : dt == kBF16 ? kInterleavedLevelScaleBf16 : kInterleavedLevelScaleFp16;
    std::vector<double> group_max(K / kGemvXGroup + 1, 0.0);
    for (int64_t k = 0; k < K; ++k)
      group_max[k / kGemvXGroup] = fmax(group_max[k / kGemvXGroup], fabs(get(x.data(), dt, m * K + k)));
    for (int64_t n = 0; n < N; ++n) {
      double s = 0, sa = 0, bound = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double xk = get(x.data(), dt, m * K + k);
        double t = xk * W[n * K + k];
        s += t; sa += fabs(t);
        if (integer) {
          const double g = group_max[k / kGemvXGroup], c = block_constant[(n * K + k) / bs];
          bound += 0.5 / level_scale * g * fabs(W[n * K + k]) + 0.5 / w_level_scale * fabs(xk) * c +
                   0.25 / (level_scale * w_level_scale) * g * c;
        }
      }
      for (int64_t j = 0; j < rank && a >= 0; ++j) {  // epilogue uses the kernel's rounded h
        double t = (double)get(h.data(), dt, m * rank + j) * row_scaling *
                   get(B.data(), dt, (a * N + n) * rank + j);
        s += t; sa += fabs(t);
      }
      if (has_bias) { double t = get(bias.data(), dt, n); s += t; sa += fabs(t); }
      check_val(dt, get(y.data(), dt, m * N + n), s, sa, st, "y", desc, m, n, bound);
    }
  }
}

int main(int argc, char** argv) {
  const IsaKernels* sets[] = {&scalar::kernels(), &avx2::kernels(), &avx512::kernels(),
                              &avx512bf16::kernels()};
  int num_formats;
  const harness::Format* formats = harness::formats(&num_formats);
  int total_fails = 0;
  for (const IsaKernels* ks : sets) {
    if (argc > 1 && strcmp(argv[1], ks->name) != 0) continue;
    Stats st;
    for (int64_t M : {1, 2, 3, 5, 8, 9, 16, 17})
      for (int64_t K : {32, 64, 96, 256, 512, 1088})  // 1088: K in slices (gemv_tile)
        for (int64_t N : {1, 7, 33})
          for (int64_t bs : {32, 64, 128, 256}) {
            if (K % bs) continue;
            for (int qt = 0; qt < 3; ++qt)  // nf4, fp4, custom (formats.h)
              for (int nbs : {0, 4, 256})
                for (int64_t rank : {0, 5, 16, 24})
                  for (int bias : {0, 1})
                    for (int dt : {kF32, kF16, kBF16}) {
                      // thin the largest combos a little: keep all for M <= 9
                      if (M > 9 && (((M * 7 + K * 3 + N + bs + qt * 5 + nbs + rank * 11 + bias + dt) % 4) == 0)) continue;
                      // the custom table on half of the cases: what differs is only its levels
                      if (qt == 2 && ((M + K / 32 + N + bs / 32 + nbs + rank + bias + dt) % 2) == 0) continue;
                      run_case(*ks, M, K, N, bs, qt, formats[qt], nbs, rank, bias, dt, st);
                    }
          }
    printf("%-7s cases=%ld (interleaved copy: %ld) fails=%ld\n  f32: max |out-ref|/sum|terms| = %.3g over %ld values\n", ks->name, st.cases, st.interleaved, st.fails, st.max_err[kF32], st.checked[kF32]);
    for (int d : {kF16, kBF16})
      printf("  %s: max |out-round(ref)| = %.3g ulp over %ld values; %ld values > 1 ulp (cancellation), their max (excess over 1 ulp)/sum|terms| = %.3g\n",
             d == kF16 ? "f16 " : "bf16", st.max_err[d], st.checked[d], st.over1[d], st.max_excess[d]);
    total_fails += st.fails;
  }
  printf(total_fails ? "FAILED\n" : "ALL OK\n");
  return total_fails ? 1 : 0;
}
