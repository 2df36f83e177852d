// The public CPU API (kernels.h): argument checks, ISA choice, and the OpenMP split.
//
// Threads get contiguous ranges of quantization blocks: one statically assigned range
// each, or (dequantize_4bit) chunks taken in turn. Blocks are independent (each has
// its own absmax and its own bytes: blocksize is even, so no packed byte straddles two
// blocks), so the output does not depend on the number of threads or on the split.
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <atomic>
#include <stdexcept>
#include <vector>

#include "interleave.h"
#include "isa.h"

namespace nf4lora {
namespace cpu {
namespace {

// Below this many elements one thread does it all: an OpenMP fork/join costs a few
// microseconds, as much as dequantizing ~30k elements.
constexpr int64_t kMinElementsPerThread = 1 << 15;
// Elements per chunk of a dynamically scheduled op (parallel_blocks).
constexpr int64_t kChunkElements = 1 << 16;

std::atomic<int> g_num_threads{0};

bool cpu_has(const char* isa) {
  __builtin_cpu_init();
  if (strcmp(isa, "scalar") == 0) return true;
  // F16C and FMA are on every AVX2 CPU made, but check them: the AVX2 path uses
  // vcvtph2ps and vfmadd.
  if (strcmp(isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("fma");
  if (strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (strcmp(isa, "avx512bf16") == 0)
    return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512vnni");  // its integer GEMV (isa_avx512.cpp)
  return false;
}

const char* const kIsaNames[] = {"scalar", "avx2", "avx512", "avx512bf16"};  // worst to best

const IsaKernels& kernels_for(const char* name) {
  if (strcmp(name, "avx512bf16") == 0) return avx512bf16::kernels();
  if (strcmp(name, "avx512") == 0) return avx512::kernels();
  if (strcmp(name, "avx2") == 0) return avx2::kernels();
  return scalar::kernels();
}

// Read NF4LORA_CPU_ISA at every call (a getenv is ~100 ns) so tests can switch paths.
const IsaKernels& select_kernels() {
  const char* requested = getenv("NF4LORA_CPU_ISA");
  if (requested != nullptr && requested[0] != '\0' && strcmp(requested, "auto") != 0) {
    for (const char* name : kIsaNames) {
      if (strcmp(requested, name) == 0) {
        if (!cpu_has(name))
          throw std::runtime_error(std::string("NF4LORA_CPU_ISA=") + requested +
                                   ": this CPU does not support it");
        return kernels_for(name);
      }
    }
    throw std::runtime_error(std::string("NF4LORA_CPU_ISA=") + requested +
                             ": expected one of auto, scalar, avx2, avx512, avx512bf16");
  }
  static const IsaKernels* best = [] {
    const IsaKernels* k = &scalar::kernels();
    for (const char* name : kIsaNames)
      if (cpu_has(name)) k = &kernels_for(name);
    return k;
  }();
  return *best;
}

// Run fn(b0, b1) over [0, blocks): one contiguous range per thread, or, with
// chunk_blocks > 0, chunks of that many blocks handed out in order to whichever thread
// is free. On a shared machine a static split finishes only when its slowest thread
// does, and a thread that loses its core waits a whole scheduler slice: with one busy
// process beside a 2-thread 4096x4096 dequantize, the median call took 8.0 ms static
// and 6.1 ms with chunks (1.5-2.1 ms alone either way).
template <class Fn>
void parallel_blocks(int64_t blocks, int64_t elements, Fn fn, int64_t chunk_blocks = 0) {
  int64_t threads = num_threads();
  if (threads > elements / kMinElementsPerThread) threads = elements / kMinElementsPerThread;
  if (threads > blocks) threads = blocks;
  if (threads <= 1) {
    fn(int64_t(0), blocks);
    return;
  }
  if (chunk_blocks > 0) {
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads((int)threads)
    for (int64_t b0; (b0 = next.fetch_add(chunk_blocks, std::memory_order_relaxed)) < blocks;)
      fn(b0, b0 + chunk_blocks < blocks ? b0 + chunk_blocks : blocks);
    return;
  }
#pragma omp parallel num_threads((int)threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    fn(blocks * t / nt, blocks * (t + 1) / nt);
  }
}

// Large outputs are usually fresh allocations (torch.empty -> mmap) whose first touch
// faults in one 4 KiB page at a time. On the VMs this was tuned on a fault costs ~3 us,
// so writing a 33.5 MB output took 45 ms of faults against ~5 ms of kernel. Asking for
// transparent huge pages first (what torch does itself under THP_MEM_ALLOC_ENABLE=1)
// makes that 16 faults of 2 MiB. Advisory only: errors are ignored, pages already
// present are untouched, and NF4LORA_CPU_HUGEPAGES=0 turns it off.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kMinBytes = int64_t(4) << 20;  // at least two huge pages' worth
  if (bytes < kMinBytes) return;
  const char* env = getenv("NF4LORA_CPU_HUGEPAGES");
  if (env != nullptr && strcmp(env, "0") == 0) return;
  const uintptr_t page = 4096;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + uintptr_t(bytes)) & ~(page - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

int64_t dtype_size(int dtype) { return dtype == kF32 ? 4 : 2; }

// Non-temporal (streaming) stores for dequantize outputs too large to stay in the last
// level cache: a plain store first reads the line it writes (read for ownership), so a
// bf16 output costs 4 bytes of memory traffic per element instead of 2. Cold
// 4096x4096 bf16 on 2 Zen 3 cores: 1.9-2.0 ms streaming, 2.4 ms plain. The threshold is
// half a 32 MiB L3: looping one cache-resident output, plain stores were 15-25% faster
// at 12 MiB and neither kind consistently faster at 16-24 MiB (noise of +-30%).
// Needs every vector store aligned: out on 64 bytes and blocks of 64-byte multiples.
// NF4LORA_CPU_STREAM=0 never streams, =1 streams whenever aligned (for tests).
bool stream_output(const void* out, int64_t bytes, int64_t block_bytes) {
  constexpr int64_t kMinBytes = int64_t(16) << 20;
  const bool aligned = reinterpret_cast<uintptr_t>(out) % 64 == 0 && block_bytes % 64 == 0;
  const char* env = getenv("NF4LORA_CPU_STREAM");
  if (env != nullptr && strcmp(env, "0") == 0) return false;
  if (env != nullptr && strcmp(env, "1") == 0) return aligned;
  return aligned && bytes >= kMinBytes;
}

int64_t num_blocks(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

void check(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

// Either float32 absmax or the arrays of double quantization, whichever the weight uses.
void check_block_constants(const PackedWeight& w) {
  if (w.is_nested()) {
    check(w.nested.absmax2 && w.nested.code2, "null pointer in nested absmax");
    check(w.nested.blocksize > 0, "nested blocksize must be > 0");
  } else {
    check(w.absmax != nullptr, "null absmax");
  }
}

void check_common(int64_t n, int64_t blocksize, int dtype, const char* dtype_name) {
  check(n >= 0, "n must be >= 0");
  check(blocksize > 0, "blocksize must be > 0");
  check(dtype == kF32 || dtype == kF16 || dtype == kBF16, dtype_name);
}

// lora_gemv_4bit hands out output rows in chunks, first come first served: a static
// split makes the call wait for a descheduled thread (seen on the shared 2-core machines:
// 10x slower with a busy neighbour). A chunk is kGemvRowsPerChunk rows (halved down to
// kGemvMinRowsPerChunk while the threads would get fewer than two chunks each): each
// thread streams that much contiguous W before jumping over the other threads' chunks.
// Chunks of 16 rows (32 KiB of a 4096-wide layer) broke the streams: two Zen 4 threads,
// W cold, M = 1, interleaved in one process, 16 -> 128 rows: 4096x4096 0.46 -> 0.37 ms,
// 11008x4096 1.09 -> 0.89, 2048x2048 0.24 -> 0.16, 5632x2048 0.46 -> 0.36 (64 rows was
// 0.8-0.9x of those gains, 256 no better; one thread unchanged). With the interleaved
// copy's far prefetch (gemv_interleaved.h), which runs 12 KiB past a chunk's end into rows
// the other thread may take, 512 rows were faster, in one process against 128 and 256, two
// threads, W cold, M = 1, quiet: 11008x4096 0.92-0.99x (256: 0.95-0.99x), 4096x4096
// 0.98x, 2048x5632 / 5632x2048 / 2048x2048 0.98-1.00x (their N halves the chunk), M = 2, 4
// 0.96-0.99x; AVX2 copy 0.91x (11008x4096); row layout 0.95-0.99x (AVX-512, AVX2: one run
// 1.12x, its rerun 0.97x); with a busy process on one core 0.94-0.95x (256: 0.83-0.93x):
// chunks of 512 rows still balance a thread that loses its core; one thread unchanged.
constexpr int64_t kGemvRowsPerChunk = 512;
constexpr int64_t kGemvMinRowsPerChunk = 16;

// Whether none of the n elements at x (of dtype) is an Inf or NaN: all exponent bits set.
// A plain loop the compiler vectorizes; at M = 1, K = 4096 it reads 8 KiB (~1 us).
bool all_finite(const void* x, int dtype, int64_t n) {
  if (dtype == kF32) {
    const uint32_t* v = static_cast<const uint32_t*>(x);
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad |= (v[i] & 0x7f800000u) == 0x7f800000u;
    return bad == 0;
  }
  const uint16_t* v = static_cast<const uint16_t*>(x);
  const uint16_t exponent = dtype == kBF16 ? 0x7f80 : 0x7c00;
  uint16_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (v[i] & exponent) == exponent;
  return bad == 0;
}

// Whether the fused GEMV multiplies 16-bit integers (gemv_body.h, on ISAs with an integer
// decoder: avx2, avx512, avx512bf16) instead of floats. NF4LORA_CPU_GEMV=integer|float
// (read at every call) forces one; "auto" (the default) is the faster one measured:
// TSC ticks per 32 weights, 4096x4096, W in cache, one thread, AMD EPYC Zen 4, a busy
// second core (+-30%):
//                                   M = 1        2          4          8
//   avx2, bf16 x: float / integer   7.9 / 3.9   12.1 / 5.3             39.9 / 22.6
//   avx512, bf16 x                                10.1 / 5.2  19.9 / 8.9  38.4 / 17.3
//   avx512bf16, fp16 x (float32)   11.1 / 3.5               21.7 / 12.1  38.9 / 29.6
//   avx512bf16, bf16 x (vdpbf16ps)  5.3 / 3.4    6.5 / 5.1   8.3 / 10.7  17.8 / 28.1
// and after the AVX-512 integer decoder took 128 weights per step (M = 1 .. 8, the same
// machine, W in L3, one thread, the ticks of the two decoders interleaved):
//   avx512bf16, bf16 x (vdpbf16ps)  M = 1: 5.2 / 2.7   2: 6.1 / 4.1   3: 7.2 / 5.1
//                                       4: 8.9 / 8.7   6: 12.7 / 14.5  8: 17.5 / 23.7
// so integer sums everywhere but for bf16 x on avx512bf16 beyond kIntegerOverBf16MaxM rows
// (M = 4 is a tie).
// NF4LORA_CPU_GEMV=int8 (opt-in, never chosen by auto: less exact than the dense bf16
// baseline) takes the int8 decoder (isa_avx512.cpp GemvInt8Decoder, AVX512-VNNI
// vpdpbusd; on a weight's interleaved copy the copy's int8 sums, interleaved_sums) on
// avx512bf16, the one build with VNNI; on avx2 and avx512 it gives what
// "integer" gives (the int16 decoder, more exact), on scalar and for float32 x float.
// Measured (one Zen 4 thread, 4096x4096 in cache, bf16 x, interleaved, noisy), int8 /
// int16 / bf16 decoder, us: M = 1 1184 / 981 / 1440, M = 4 2026 / 2262 / 2463, M = 8
// 4006 / 4230 / 4526 (dense bf16 3828): 1.05-1.15x int16 from M = 4, slower below, and
// mean |error| vs float64 ~4x dense bf16's (README "CPU matmul"), so auto never takes it.
// Either way only when every element of x is finite: an Inf or NaN has no integer level
// (the float decoders give what float math gives).
constexpr int64_t kIntegerOverBf16MaxM = 3;

enum class GemvEnv { kAuto, kInteger, kInt8, kFloat };
GemvEnv gemv_env() {  // NF4LORA_CPU_GEMV, read at every call
  const char* env = getenv("NF4LORA_CPU_GEMV");
  if (env == nullptr || env[0] == '\0' || strcmp(env, "auto") == 0) return GemvEnv::kAuto;
  if (strcmp(env, "integer") == 0) return GemvEnv::kInteger;
  if (strcmp(env, "int8") == 0) return GemvEnv::kInt8;
  if (strcmp(env, "float") == 0) return GemvEnv::kFloat;
  throw std::runtime_error(std::string("NF4LORA_CPU_GEMV=") + env +
                           ": expected one of auto, integer, int8, float");
}

GemvSums gemv_wants_sums(int64_t M, int dtype, const IsaKernels& isa) {
  const GemvEnv env = gemv_env();
  if (dtype == kF32 || strcmp(isa.name, "scalar") == 0) return GemvSums::kFloat;
  const bool bf16_isa = strcmp(isa.name, "avx512bf16") == 0;
  switch (env) {
    case GemvEnv::kAuto:
      return M <= kIntegerOverBf16MaxM || dtype != kBF16 || !bf16_isa ? GemvSums::kInt16 : GemvSums::kFloat;
    case GemvEnv::kInteger: return GemvSums::kInt16;
    case GemvEnv::kInt8: return bf16_isa ? GemvSums::kInt8 : GemvSums::kInt16;
    default: return GemvSums::kFloat;
  }
}

// The interleaved copy (weight.h, gemv_interleaved.h) is read where the ISA has its
// kernel, x is 16-bit, K and the blocksize are whole groups of 64, and NF4LORA_CPU_GEMV
// leaves the integer arithmetic to the dispatcher (auto) or asks for integer sums (integer,
// int8: interleaved_sums); float names the row layout's float decoders. It takes every M up
// to the fused path's crossover (backends/cpu.py FUSED_MAX_M_INTERLEAVED), on AVX-512: one
// Zen 4 thread, 4096x4096, TSC ticks per 32 weights with W in cache, interleaved int16 /
// the row layout's best: M = 1 1.25 / 2.5 (integer), M = 4 3.6 / 8.9 (bf16), M = 8 6.6 /
// 17.5 (bf16) (prototype; README "CPU matmul" has the bench); W streamed, in one process,
// time of the copy against the row layout's best: bf16 x M = 1, 4, 8: 0.71, 0.46, 0.48x;
// fp16 x (levels within 8191, a fold every 16 columns): 0.87, 0.56, 0.35x. And on AVX2:
// one thread of an AVX2-only AMD EPYC (Zen 1), W streamed, in one process, time of the
// copy against the row layout's integer decoder: bf16 x M = 1 0.63x, 2 0.79, 3 0.75, 4
// 0.75, 5 0.83, 6 0.83, 8 0.77, 16 0.78, 32 0.79 (gemv_interleaved.h).
bool reads_interleaved(int dtype, const IsaKernels& isa) {
  if (isa.gemv_interleaved_tiles == nullptr || dtype == kF32) return false;
  return gemv_env() != GemvEnv::kFloat;
}

// The copy's sums: int8 where NF4LORA_CPU_GEMV=int8 gets the int8 decoder (avx512bf16:
// gemv_wants_sums), int16 otherwise. Measured, one Zen 4 thread, 4096x4096, bf16 x, W
// streamed, in one process, int8 / int16 time on the copy: see gemv_interleaved.h.
GemvSums interleaved_sums(const LoraGemvArgs& op, const IsaKernels& isa) {
  return gemv_wants_sums(op.M, op.dtype, isa) == GemvSums::kInt8 ? GemvSums::kInt8 : GemvSums::kInt16;
}

bool wants_interleaved(const LoraGemvArgs& op, const IsaKernels& isa) {
  return op.interleaved != nullptr && interleavable(op.K, op.weight.blocksize) &&
         reads_interleaved(op.dtype, isa);
}

GemvSums gemv_sums(const LoraGemvArgs& op, const IsaKernels& isa) {
  const GemvSums sums = gemv_wants_sums(op.M, op.dtype, isa);
  return sums == GemvSums::kFloat || all_finite(op.x, op.dtype, op.M * op.K) ? sums : GemvSums::kFloat;
}

// AMX's tile state (XTILEDATA, 8 KiB per thread) is off for a Linux process until it asks
// once (arch_prctl ARCH_REQ_XCOMP_PERM, Linux >= 5.16); a tile instruction before that
// faults. The permission is the process's, so asking again (oneDNN does too) is harmless.
bool amx_granted() {
#if defined(__linux__) && defined(__x86_64__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023, kXFeatureXTileData = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXFeatureXTileData) == 0;
#else
  return false;
#endif
}

// How the tile GEMMs cut W (gemm_tiles.h). A chunk of W's reduction dimension (forward:
// columns, grad-input: rows) is sized so that the tiles of `a` (x or grad) it meets take
// kTileAChunkBytes, 2 bytes per element (to stay in L2 while the panel's W tiles pass over
// them: 2 MiB per core on Sapphire Rapids), and a panel's decoded chunk stays near 512 KiB:
// forward 128 rows x at most kTileMaxColumnChunk columns, grad-input kTileGradColumns
// columns (or a block) x at most kTileMaxRowChunk rows, decoded and then again as pairs.
// The AMX side is not yet tuned on an AMX CPU. The rest of the work (decode, repacks, the
// pairs, the write-out) was timed here with the tile operations made no-ops, one Zen 4
// thread, 4096x4096, ms, in one process (first version -> now): forward M = 64 2.9 -> 1.7,
// M = 512 12.1 -> 3.9 (prefetched rows, y written along its rows, x repacked a tile at a
// time); grad-input M = 64 6.8 -> 2.8, M = 512 9.6 -> 3.8 (prefetched rows, vector
// write-out, then panels of 256 -> 512 columns and chunks of 512 -> 256 rows: 0.86x).
// For scale: dequantizing all of W to bf16 takes 1.5 ms; the dequantize + GEMM path
// (oneDNN's bf16 GEMM, no AMX here) forward 13.4 / 81.7 ms, grad-input 15.8 / 90.3.
constexpr int64_t kTileAChunkBytes = 512 << 10;
constexpr int64_t kTileMaxColumnChunk = 2048;
constexpr int64_t kTileMaxRowChunk = 256;
constexpr int64_t kTileGradColumns = 512;

int64_t tile_a_chunk(int64_t a_tiles, int64_t granule, int64_t largest) {
  int64_t chunk = kTileAChunkBytes / (a_tiles * kTileRows * 2);
  if (chunk > largest) chunk = largest;
  chunk = chunk / granule * granule;
  return chunk < granule ? granule : chunk;
}

int64_t round_up(int64_t n, int64_t granule) { return (n + granule - 1) / granule * granule; }

}  // namespace

bool has_amx() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return cpu_has("avx512bf16") && __builtin_cpu_supports("amx-tile") &&
           __builtin_cpu_supports("amx-bf16") && amx_granted();
  }();
  return yes;
}

// NF4LORA_CPU_GEMM, read at every call. auto takes no tile GEMM: the AMX kernel has not yet
// run on an AMX CPU, so it has not been measured against what auto does now (dequantize +
// oneDNN's AMX GEMM); `python -m bench.bench_matmul` times both there (nf4lora-amx).
std::string tile_gemm() {
  const char* env = getenv("NF4LORA_CPU_GEMM");
  if (env == nullptr || env[0] == '\0' || strcmp(env, "auto") == 0 || strcmp(env, "dequantize") == 0)
    return "";
  if (strcmp(env, "amx-emulated") == 0) return env;
  if (strcmp(env, "amx") == 0) {
    if (!has_amx())
      throw std::runtime_error(
          "NF4LORA_CPU_GEMM=amx: this CPU has no AMX-BF16, or the OS did not grant the tile state "
          "(Linux >= 5.16); amx-emulated runs the same kernel without AMX");
    const IsaKernels& k = select_kernels();
    if (k.gemm_tiles_amx == nullptr)
      throw std::runtime_error(std::string("NF4LORA_CPU_GEMM=amx: the ") + k.name +
                               " path has no AMX kernel (avx512bf16 has)");
    return env;
  }
  throw std::runtime_error(std::string("NF4LORA_CPU_GEMM=") + env +
                           ": expected one of auto, amx, amx-emulated, dequantize");
}

bool native_16bit_gemm(int dtype) {
  __builtin_cpu_init();
  if (dtype == kBF16) return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  if (dtype == kF16) return __builtin_cpu_supports("avx512fp16");
  return true;
}

int num_threads() {
  const int k = g_num_threads.load();
  return k > 0 ? k : omp_get_max_threads();
}

void set_num_threads(int k) { g_num_threads.store(k > 0 ? k : 0); }

std::string active_isa() { return select_kernels().name; }

std::string gemv_decoder(int64_t M, int dtype) {
  const IsaKernels& isa = select_kernels();
  const GemvSums sums = gemv_wants_sums(M, dtype, isa);
  if (sums == GemvSums::kInt8) return "int8";
  if (sums == GemvSums::kInt16) return "integer";
  if (dtype == kBF16 && strcmp(isa.name, "avx512bf16") == 0) return "bf16";
  return "float";
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* name : kIsaNames)
    if (cpu_has(name)) out.push_back(name);
  return out;
}

void quantize_4bit(const void* A, int dtype, int64_t n, int64_t blocksize,
                   const CodeEncoder& encoder, uint8_t* packed, float* absmax) {
  check_common(n, blocksize, dtype, "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  check(blocksize % 2 == 0, "4-bit blocksize must be even");
  if (n == 0) return;
  check(A && packed && absmax, "null pointer");
  const IsaKernels& k = select_kernels();
  advise_huge_pages(packed, (n + 1) / 2);
  const Quant4Args args{A, dtype, n, blocksize, encoder, packed, absmax};
  parallel_blocks(num_blocks(n, blocksize), n,
                  [&](int64_t b0, int64_t b1) { k.quantize_4bit(args, b0, b1); });
}

void dequantize_4bit(const PackedWeight& weight, void* out, int out_dtype) {
  const int64_t n = weight.n, blocksize = weight.blocksize;
  check_common(n, blocksize, out_dtype,
               "out_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  check(blocksize % 2 == 0, "4-bit blocksize must be even");
  if (n == 0) return;
  check(weight.packed && out, "null pointer");
  check_block_constants(weight);
  const IsaKernels& k = select_kernels();
  const int64_t out_bytes = n * dtype_size(out_dtype);
  advise_huge_pages(out, out_bytes);
  const bool stream = stream_output(out, out_bytes, blocksize * dtype_size(out_dtype));
  const Dequant4Args args{weight, out, out_dtype, stream};
  // chunks of 64 Ki elements: ~10 us of work each, so the hand-out costs < 1% (256 Ki and
  // 512 Ki, interleaved in one process, W streamed, bf16 out, Zen 4: within 0-5% at one and
  // two threads, 2048x2048 to 11008x4096; two threads already write ~32 GB/s here)
  const int64_t chunk = blocksize < kChunkElements ? kChunkElements / blocksize : 1;
  parallel_blocks(weight.blocks(), n,
                  [&](int64_t b0, int64_t b1) { k.dequantize_4bit(args, b0, b1); }, chunk);
}

void quantize_blockwise(const void* A, int dtype, const float* code, int64_t n,
                        int64_t blocksize, uint8_t* q, float* absmax) {
  check_common(n, blocksize, dtype, "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  if (n == 0) return;
  check(A && code && q && absmax, "null pointer");
  const IsaKernels& k = select_kernels();
  advise_huge_pages(q, n);
  const Quant8Args args{A, dtype, code, n, blocksize, q, absmax};
  parallel_blocks(num_blocks(n, blocksize), n,
                  [&](int64_t b0, int64_t b1) { k.quantize_blockwise(args, b0, b1); });
}

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                          int64_t blocksize, void* out, int out_dtype) {
  check_common(n, blocksize, out_dtype,
               "out_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  if (n == 0) return;
  check(q && absmax && code && out, "null pointer");
  const IsaKernels& k = select_kernels();
  advise_huge_pages(out, n * dtype_size(out_dtype));
  const Dequant8Args args{q, absmax, code, n, blocksize, out, out_dtype};
  parallel_blocks(num_blocks(n, blocksize), n,
                  [&](int64_t b0, int64_t b1) { k.dequantize_blockwise(args, b0, b1); });
}

// What both fused matmul kernels (the forward's GEMV and the grad-input) require of their
// shapes: M activation rows against an N x K weight whose rows start on block boundaries.
static void check_fused_shapes(int64_t M, int64_t K, int64_t N, int64_t rank,
                               const PackedWeight& weight, int dtype) {
  check_common(M * K, weight.blocksize, dtype,
               "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  check(M >= 0 && K >= 0 && N >= 0 && rank >= 0, "M, K, N and rank must be >= 0");
  check(weight.n == N * K, "the weight must have N * K elements");
  check(weight.blocksize % 32 == 0, "blocksize must be a multiple of 32");
  check(K % weight.blocksize == 0,
        "K must be a multiple of blocksize (rows start on block boundaries)");
}

// lora_gemv_4bit, and multi_lora_gemv_4bit with `adapters` (the index and scalings of
// each row's adapter; null: one adapter for every row).
static void run_lora_gemv_4bit(const LoraGemvArgs& op, const AdapterRows* adapters) {
  const int64_t M = op.M, K = op.K, N = op.N, rank = op.rank;
  check_fused_shapes(M, K, N, rank, op.weight, op.dtype);
  if (M == 0) return;
  check(op.x && op.y && (N == 0 || K == 0 || op.weight.packed), "null pointer");
  check(rank == 0 || (op.lora_A && op.lora_B && op.h), "null LoRA pointer");
  if (N > 0 && K > 0) check_block_constants(op.weight);
  if (adapters != nullptr) {
    check(adapters->index && adapters->scalings, "null adapter index or scalings");
    check(adapters->count >= 1, "a mixed batch needs at least one adapter");
    for (int64_t m = 0; m < M; ++m)  // the kernel reads lora_A and lora_B at the index
      check(adapters->index[m] >= -1 && adapters->index[m] < adapters->count,
            "adapter index out of range: each must lie in [-1, adapters)");
  }
  const IsaKernels& k = select_kernels();
  // (an Inf or NaN in x has no integer level: the row layout's float decoders take it)
  const bool interleaved = wants_interleaved(op, k) && all_finite(op.x, op.dtype, M * K);
  // x_paired: + a decoder step's missing half (gemv_body.h paired_columns); the int8
  // decoders' x (the row layout's: 1 byte per column plus 64 per 128-column step; the
  // copy's: 1 byte per column plus 4 per 64 columns) takes less than this
  // x_paired is read by 64-byte loads at multiples of 64 bytes from its start: aligned, none
  // straddles two cache lines (a split load takes two of L1's load slots, and at M = 8 the
  // bf16 decoder issues one x load per vdpbf16ps)
  constexpr int64_t kAlignFloats = 64 / sizeof(float);
  std::vector<float> x_paired_storage(M * (K + kGemvXGroup) + kAlignFloats), x_natural(rank > 0 ? M * K : 0),
      h_scaled(M * rank), x_scales(M * (K / kGemvXGroup + 1));
  float* x_paired = reinterpret_cast<float*>(
      (reinterpret_cast<uintptr_t>(x_paired_storage.data()) + 63) & ~uintptr_t(63));
  GemvWork args{op, x_paired, rank > 0 ? x_natural.data() : nullptr, h_scaled.data(),
                x_scales.data(), interleaved ? interleaved_sums(op, k) : gemv_sums(op, k)};
  if (!interleaved) args.interleaved = nullptr;
  const GemvXPhase prepare = interleaved ? k.gemv_interleaved_prepare : k.gemv_prepare;
  const GemvWPhase rows = interleaved ? k.gemv_interleaved_tiles : k.gemv_rows;
  // rows of W per work item: interleaved, whole tiles of kInterleavedRows
  const int64_t granule = interleaved ? kInterleavedRows : 1;
  if (adapters != nullptr) {
    args.adapter_index = adapters->index;
    args.scalings = adapters->scalings;
  }
  int64_t threads = num_threads();
  if (threads > N * K / kMinElementsPerThread) threads = N * K / kMinElementsPerThread;
  int64_t rows_per_chunk = kGemvRowsPerChunk;
  while (rows_per_chunk > kGemvMinRowsPerChunk && N < 2 * threads * rows_per_chunk) rows_per_chunk /= 2;
  const int64_t units = (N + granule - 1) / granule;
  int64_t units_per_chunk = rows_per_chunk / granule;
  int64_t chunks = (units + units_per_chunk - 1) / units_per_chunk;
  if (threads > chunks) threads = chunks;
  if (threads > 1 && chunks % threads != 0) {
    // as many chunks as a multiple of the threads, a little smaller: 11 chunks of 512
    // rows (N = 5632) left one of two threads a whole chunk (1/11 of W) to itself at the
    // end. 5632x2048, two threads, W streamed, in one process (AVX2-only EPYC Zen 1), time
    // against 11 chunks: interleaved copy M = 1 0.95x, M = 4 0.94x; row layout M = 1
    // 0.95x, M = 4 0.93x; 2048x2048 and 11008x4096 (already even) 1.00x
    const int64_t even = (chunks + threads - 1) / threads * threads;
    units_per_chunk = (units + even - 1) / even;
    chunks = (units + units_per_chunk - 1) / units_per_chunk;
  }
  if (threads < 1) threads = 1;
  // One parallel region, three work-shared loops (each ends in a barrier): x to float32,
  // then h (needs all of x), then the rows of y (need all of h).
#pragma omp parallel num_threads((int)threads)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) prepare(args, m);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * rank; ++i) k.gemv_lora_h(args, i / rank, i % rank);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t u0 = c * units_per_chunk;
      rows(args, u0, u0 + units_per_chunk < units ? u0 + units_per_chunk : units);
    }
  }
}

void lora_gemv_4bit(const LoraGemvArgs& op) { run_lora_gemv_4bit(op, nullptr); }

bool has_interleaved_gemv() { return select_kernels().gemv_interleaved_tiles != nullptr; }

bool reads_interleaved(int dtype) { return reads_interleaved(dtype, select_kernels()); }

// Scalar: it runs once per weight (4096x4096: ~6 ms on one Zen 4 thread, a dozen calls'
// worth of the GEMV it speeds up). Threads take tiles (interleave.h).
void interleave_4bit(const PackedWeight& w, int64_t N, int64_t K, uint8_t* out) {
  check(N >= 0 && K >= 0 && w.n == N * K, "the weight must have N * K elements");
  check(interleavable(K, w.blocksize), "K and the blocksize must be multiples of 64");
  if (N == 0 || K == 0) return;
  check(w.packed && out, "null pointer");
  check_block_constants(w);
  // huge pages for the copy (it is read as one stream at every call): W streamed, M = 1,
  // interleaved in one process, one / two Zen 4 threads: 5632x2048 0.92 / 0.93-0.94x the
  // time, 4096x4096 0.99 / 0.96x, 2048x5632 0.99 / 1.01x
  advise_huge_pages(out, interleaved_bytes(N, K));
  const int64_t tiles = interleaved_tiles(N);
  int64_t threads = num_threads();
  if (threads > N * K / kMinElementsPerThread) threads = N * K / kMinElementsPerThread;
  if (threads < 1) threads = 1;
#pragma omp parallel for num_threads((int)threads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) interleave_tiles(w, N, K, t, t + 1, out);
}

void multi_lora_gemv_4bit(const LoraGemvArgs& op, const AdapterRows& adapters) {
  run_lora_gemv_4bit(op, &adapters);
}

void tile_gemm_4bit(const TileGemmArgs& op) {
  const int64_t M = op.M, N = op.N, K = op.K, blocksize = op.weight.blocksize;
  check_fused_shapes(M, K, N, 0, op.weight, kBF16);
  const int64_t columns = op.grad_input ? K : N, length = op.grad_input ? N : K;  // of out; summed
  if (M == 0 || columns == 0) return;
  check(op.out != nullptr, "null pointer");
  check(op.out_dtype == kBF16 || op.out_dtype == kF32, "the tile GEMM writes bfloat16 or float32");
  if (length == 0) {  // empty sums (a has no elements)
    memset(op.out, 0, M * columns * dtype_size(op.out_dtype));
    return;
  }
  check(op.a && op.weight.packed, "null pointer");
  check_block_constants(op.weight);
  const std::string path = tile_gemm();
  check(!path.empty(), "no tile GEMM chosen: NF4LORA_CPU_GEMM=amx or amx-emulated");
  const IsaKernels& k = select_kernels();
  const TileGemmPanel run_panel = path == "amx" ? k.gemm_tiles_amx : k.gemm_tiles_emulated;
  TileGemmWork work{op, nullptr, (M + kTileRows - 1) / kTileRows, 0, 0, 0};
  const int64_t a_rows = work.a_tiles * kTileRows;
  if (op.grad_input) {
    work.a_stride = round_up(N, 2 * kTileRows);
    work.chunk = tile_a_chunk(work.a_tiles, 2 * kTileRows, kTileMaxRowChunk);
    if (work.chunk > work.a_stride) work.chunk = work.a_stride;
    work.panel = kTileGradColumns > blocksize ? kTileGradColumns / blocksize * blocksize : blocksize;
    if (work.panel > K) work.panel = K;
  } else {
    work.a_stride = K / 2;  // pairs per row of x
    work.chunk = tile_a_chunk(work.a_tiles, blocksize, kTileMaxColumnChunk);
    if (work.chunk > K) work.chunk = K;
    work.panel = kTilePanelRows;
  }
  // a repacked (gemm_tiles.h): grad's rows padded with zeros to a_stride bf16; x as bf16
  // pairs, repacked[t][p][j] = pair p of row 16 t + j; zeros past M
  std::vector<uint32_t> repacked(op.grad_input ? a_rows * work.a_stride / 2 : a_rows * work.a_stride);
  work.a_repacked = repacked.data();
  const int64_t panels = (columns + work.panel - 1) / work.panel;
  int64_t threads = num_threads();
  if (threads > panels) threads = panels;
  const int64_t scratch_bytes = round_up(tile_scratch_bytes(work), 64);
  std::vector<uint8_t> scratch_all(threads * scratch_bytes + 64);
  uint8_t* const scratch = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(scratch_all.data()) + 63) & ~uintptr_t(63));
#pragma omp parallel num_threads((int)threads)
  {
    if (op.grad_input) {
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m)
        memcpy(reinterpret_cast<uint16_t*>(repacked.data()) + m * work.a_stride,
               static_cast<const uint16_t*>(op.a) + m * N, N * sizeof(uint16_t));
    } else {
      // a tile's 16 rows at a time, so that its 64-byte rows are written whole (row by row,
      // one 4-byte store per 64-byte line: perf put the repack at 2.6% of a 4096x4096
      // M = 512 call with no-op tiles, 2.2% this way)
      const uint32_t* const x = static_cast<const uint32_t*>(op.a);  // bf16 pairs: K is even
      const int64_t pairs = work.a_stride;
#pragma omp for schedule(static)
      for (int64_t t = 0; t < work.a_tiles; ++t) {
        const int64_t rows = M - t * kTileRows < kTileRows ? M - t * kTileRows : kTileRows;
        const uint32_t* tile_x = x + t * kTileRows * pairs;
        uint32_t* out = repacked.data() + t * pairs * kTileRows;
        for (int64_t p = 0; p < pairs; ++p)
          for (int64_t j = 0; j < rows; ++j) out[p * kTileRows + j] = tile_x[j * pairs + p];
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; ++p) run_panel(work, p, scratch + omp_get_thread_num() * scratch_bytes);
  }
}

// The fused grad-input's panels (columns of W per work item): the accumulators a panel
// updates for every row of W (`slab`, M x width float32, gemv_body.h
// grad_input_panel_impl) should stay in the 32 KiB L1D beside the rows of W going past:
// kGradPanelFloats (16 KiB; its second buffer, `total`, is touched once per 64 rows). At
// M = 1 that is 4096 columns, whole rows of a 4096-wide W read in order: one Zen 4
// thread, bf16, 4096x4096, W cold, 1.63-1.71 ms against 2.00 with 2048 (rows read in two
// halves); at M = 4-8 the two were within this machine's noise. A panel is never narrower
// than a block. Panels are also cut so that every thread gets at least two (handed out
// first come first served, as the GEMV's rows: a descheduled thread holds up only its
// panel).
constexpr int64_t kGradPanelFloats = 4096;

void lora_grad_input_4bit(const GradInputArgs& op) {
  const int64_t M = op.M, K = op.K, N = op.N, rank = op.rank, blocksize = op.weight.blocksize;
  check_fused_shapes(M, K, N, rank, op.weight, op.dtype);
  if (M == 0 || K == 0) return;
  check(op.grad && op.dx && (N == 0 || op.weight.packed), "null pointer");
  check(rank == 0 || (op.lora_A && op.grad_h), "null LoRA pointer");
  if (N > 0) check_block_constants(op.weight);
  const IsaKernels& k = select_kernels();
  // grad and grad_h as float32 (M * N: 11008 elements at M = 1, a few microseconds)
  std::vector<float> grad_f(M * N), grad_h_f(M * rank);
  auto widen = [&](const void* src, int64_t n, float* dst) {
    if (op.dtype == kF32) {
      memcpy(dst, src, n * sizeof(float));
    } else {
      const uint16_t* v = static_cast<const uint16_t*>(src);
      if (op.dtype == kBF16)
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(v[i]);
      else
        for (int64_t i = 0; i < n; ++i) dst[i] = fp16_bits_to_float(v[i]);
    }
  };
  widen(op.grad, M * N, grad_f.data());
  if (rank > 0) widen(op.grad_h, M * rank, grad_h_f.data());
  int64_t threads = num_threads();
  if (threads > N * K / kMinElementsPerThread) threads = N * K / kMinElementsPerThread;
  if (threads < 1) threads = 1;
  const int64_t blocks_per_row = K / blocksize;
  int64_t panel = kGradPanelFloats / M / blocksize;  // in blocks
  const int64_t per_thread = blocks_per_row / (2 * threads);
  if (threads > 1 && panel > per_thread) panel = per_thread;
  if (panel > kGradPanelMaxBlocks) panel = kGradPanelMaxBlocks;
  if (panel < 1) panel = 1;
  const int64_t panels = (blocks_per_row + panel - 1) / panel;
  if (threads > panels) threads = panels;
  const GradInputWork args{op, grad_f.data(), grad_h_f.data(), panel * blocksize};
  const int64_t scratch = 2 * M * panel * blocksize;
  std::vector<float> scratch_all(threads * scratch);
#pragma omp parallel for schedule(dynamic, 1) num_threads((int)threads)
  for (int64_t c = 0; c < panels; ++c) {
    const int64_t c0 = c * panel * blocksize;
    const int64_t c1 = c0 + panel * blocksize < K ? c0 + panel * blocksize : K;
    k.grad_input_panel(args, c0, c1, scratch_all.data() + omp_get_thread_num() * scratch);
  }
}

}  // namespace cpu
}  // namespace nf4lora
