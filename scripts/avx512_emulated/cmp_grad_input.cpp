// The fused grad-input (gemv_body.h grad_input_panel_impl) of scalar / avx2 (native) /
// avx512 and avx512bf16 (SIMDe emulated) kernels, each against a double-precision
// reference computed here: dx = grad @ W + grad_h @ lora_A, float32 within 1e-5 of the sum
// of |terms|, 16-bit within one output ulp (+ the same float32 slack). Panels are cut three
// ways (one block, three blocks, the whole row) and run out of order: the bytes must not
// depend on the cut (each element sums its rows in one fixed order).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "cpu/isa.h"
#include "formats.h"
#include "values.h"
using namespace nf4lora;
using namespace nf4lora::cpu;

using namespace harness;

struct Stats { long cases = 0, fails = 0, values = 0; double max_f32 = 0, max_ulp = 0; };

static void run_case(const IsaKernels& isa, int64_t M, int64_t K, int64_t N, int64_t bs,
                     const harness::Format& format, int nested_bs, int64_t rank, int dt, Stats& st) {
  rng = 0x9E3779B9u ^ (uint32_t)(M * 1000003 + K * 10007 + N * 101 + bs * 7 + nested_bs * 13 + rank * 17 + dt * 23);
  char desc[200];
  snprintf(desc, sizeof desc, "[%s M=%lld K=%lld N=%lld bs=%lld %s nbs=%d r=%lld dt=%d]", isa.name,
           (long long)M, (long long)K, (long long)N, (long long)bs, format.name, nested_bs, (long long)rank, dt);
  const int es = es_of(dt);
  const int64_t blocks = N * K / bs;
  std::vector<uint8_t> grad(M * N * es), A(rank * K * es + 4), grad_h(M * rank * es + 4);
  for (int64_t i = 0; i < M * N; ++i) put(grad.data(), dt, i, rndf());
  for (int64_t i = 0; i < rank * K; ++i) put(A.data(), dt, i, rndf() * 0.5f);
  for (int64_t i = 0; i < M * rank; ++i) put(grad_h.data(), dt, i, rndf());
  std::vector<uint8_t> packed(N * K / 2 + 64);
  for (auto& b : packed) b = rnd();
  std::vector<float> absmax(blocks + 1), code2(256);
  for (auto& a : absmax) a = 0.05f + 1.5f * fabsf(rndf());
  for (int i = 0; i < 256; ++i) code2[i] = (i - 127.5f) / 127.5f;
  std::vector<uint8_t> q(blocks + 1);
  for (auto& b : q) b = rnd();
  std::vector<float> absmax2((nested_bs ? (blocks + nested_bs - 1) / nested_bs : 1) + 1);
  for (auto& a : absmax2) a = 0.2f + fabsf(rndf());
  PackedWeight w;
  w.packed = packed.data(); w.absmax = absmax.data(); w.n = N * K; w.blocksize = bs; w.table = format.table;
  if (nested_bs) {
    w.nested.q = q.data(); w.nested.absmax2 = absmax2.data(); w.nested.code2 = code2.data();
    w.nested.offset = 0.9f; w.nested.blocksize = nested_bs;
  }
  std::vector<float> grad_f(M * N), grad_h_f(M * rank + 1);
  for (int64_t i = 0; i < M * N; ++i) grad_f[i] = get(grad.data(), dt, i);
  for (int64_t i = 0; i < M * rank; ++i) grad_h_f[i] = get(grad_h.data(), dt, i);

  // reference
  std::vector<double> ref(M * K, 0.0), mag(M * K, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = n * K + k, b = e / bs;
      const int code = e % 2 == 0 ? packed[e / 2] >> 4 : packed[e / 2] & 15;
      const double am = nested_bs ? (double)decode_nested_absmax(code2.data(), q[b], absmax2[b / nested_bs], 0.9f)
                                  : absmax[b];
      const double wv = format.table.level[code] * am;
      for (int64_t m = 0; m < M; ++m) {
        ref[m * K + k] += grad_f[m * N + n] * wv;
        mag[m * K + k] += fabs(grad_f[m * N + n] * wv);
      }
    }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < rank; ++j)
      for (int64_t k = 0; k < K; ++k) {
        const double t = (double)grad_h_f[m * rank + j] * get(A.data(), dt, j * K + k);
        ref[m * K + k] += t;
        mag[m * K + k] += fabs(t);
      }

  std::vector<uint8_t> first;
  const int64_t blocks_per_row = K / bs;
  for (int64_t panel : {int64_t(1), int64_t(3), blocks_per_row}) {
    if (panel > kGradPanelMaxBlocks) continue;
    std::vector<uint8_t> dx(M * K * es + 64);
    memset(dx.data(), 0xA5, dx.size());
    GradInputArgs op;
    op.grad = grad.data(); op.dtype = dt; op.M = M; op.N = N; op.K = K; op.weight = w;
    op.lora_A = rank ? A.data() : nullptr; op.grad_h = rank ? grad_h.data() : nullptr; op.rank = rank;
    op.dx = dx.data();
    const GradInputWork args{op, grad_f.data(), grad_h_f.data(), panel * bs};
    const int64_t scratch_floats = 2 * M * panel * bs;
    std::vector<float> scratch(scratch_floats + 64, -7.0f);
    const int64_t panels = (blocks_per_row + panel - 1) / panel;
    for (int64_t i = panels; i-- > 0;) {  // last panel first
      const int64_t c0 = i * panel * bs, c1 = c0 + panel * bs < K ? c0 + panel * bs : K;
      isa.grad_input_panel(args, c0, c1, scratch.data());
    }
    st.cases++;
    for (int64_t i = 0; i < 64; ++i)
      if (dx[M * K * es + i] != 0xA5) { st.fails++; printf("  FAIL dx overrun %s\n", desc); break; }
    for (int64_t i = scratch_floats; i < (int64_t)scratch.size(); ++i)
      if (scratch[i] != -7.0f) { st.fails++; printf("  FAIL scratch overrun %s\n", desc); break; }
    if (first.empty()) first = dx;
    else if (memcmp(first.data(), dx.data(), M * K * es) != 0) {
      st.fails++;
      printf("  FAIL bytes depend on the panel width (%lld blocks) %s\n", (long long)panel, desc);
    }
    for (int64_t i = 0; i < M * K; ++i) {
      const double out = get(dx.data(), dt, i), r = ref[i], slack = 1e-5 * mag[i] + 1e-30;
      bool ok;
      if (dt == kF32) {
        ok = fabs(out - r) <= slack;
        if (mag[i] > 0) st.max_f32 = fmax(st.max_f32, fabs(out - r) / mag[i]);
      } else {
        const float rr = round_to(dt, r);
        const double u = ulp_of(dt, rr);
        ok = fabs(out - rr) <= u + slack;
        st.max_ulp = fmax(st.max_ulp, fabs(out - rr) / u);
      }
      st.values++;
      if (!(ok) && st.fails++ < 12)
        printf("  FAIL %s m=%lld k=%lld out=%.9g ref=%.9g\n", desc, (long long)(i / K), (long long)(i % K), out, r);
    }
  }
}

int main(int argc, char** argv) {
  const IsaKernels* sets[] = {&scalar::kernels(), &avx2::kernels(), &avx512::kernels(), &avx512bf16::kernels()};
  int num_formats;
  const harness::Format* formats = harness::formats(&num_formats);
  long total_fails = 0;
  for (const IsaKernels* ks : sets) {
    if (argc > 1 && strcmp(argv[1], ks->name) != 0) continue;
    Stats st;
    for (int64_t M : {1, 2, 3, 5, 9, 16})
      for (int64_t K : {32, 96, 256, 1088})
        for (int64_t N : {1, 7, 70, 130})  // 70, 130: slabs of 64 rows, rows not a multiple of 4
          for (int64_t bs : {32, 64, 256}) {
            if (K % bs) continue;
            for (int qt = 0; qt < 3; ++qt)
              for (int nbs : {0, 4, 256})
                for (int64_t rank : {0, 5})
                  for (int dt : {kF32, kF16, kBF16}) {
                    if ((M * 3 + K / 32 + N + bs / 32 + qt + nbs + rank + dt) % 3 == 0) continue;  // thin
                    run_case(*ks, M, K, N, bs, formats[qt], nbs, rank, dt, st);
                  }
          }
    printf("%-10s cases=%ld fails=%ld values=%ld  f32 max |out-ref|/sum|terms| = %.3g; 16-bit max %.3g ulp\n",
           ks->name, st.cases, st.fails, st.values, st.max_f32, st.max_ulp);
    total_fails += st.fails;
  }
  printf(total_fails ? "FAILED\n" : "ALL OK\n");
  return total_fails ? 1 : 0;
}
