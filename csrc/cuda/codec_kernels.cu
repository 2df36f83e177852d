// The codec kernels of nf4lora._C_cuda: 4-bit quantize, 8-bit blockwise quantize (the
// nested absmax), 4-bit dequantize (nested absmax decoded in the same kernel) and 8-bit
// dequantize. Each __global__ function is a shell: it stages a table in shared memory
// if it needs one, turns blockIdx/threadIdx into the explicit indices of the per-thread
// functions in thread_work.cuh, and (quantize) combines the lanes with a warp shuffle.
// Everything else runs on the CPU in tests/test_cuda_host.py through the same source.
#include <cuda_runtime.h>

#include <string>

#include "plan.h"

namespace nf4lora {
namespace cuda {
namespace {

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("nf4lora CUDA ") + what + ": " + cudaGetErrorString(err));
}

// Copy a float table (global memory or kernel parameters) to shared memory.
__device__ __forceinline__ void stage(float* dst, const float* src, int count) {
  for (int i = threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i];
  __syncthreads();
}

// ---- quantize: warp w of CUDA block b handles quantization block b * kQuantWarps + w --
template <class In, class Encode>
__device__ __forceinline__ void quantize_warp(const QuantParams& p, const Encode& encode,
                                              int64_t quant_blocks) {
  const int lane = threadIdx.x % kWarp;
  const int64_t block = (int64_t)blockIdx.x * kQuantWarps + threadIdx.x / kWarp;
  if (block >= quant_blocks) return;  // the whole warp: the shuffles need all 32 lanes
  const float absmax = warp_reduce(quantize_lane_absmax<In>(p, block, lane), MaxOp{});
  quantize_lane_encode<In>(p, encode, block, lane, absmax);
}

template <class In>
__global__ void __launch_bounds__(kQuantWarps * kWarp)
    quantize_4bit_kernel(const __grid_constant__ QuantParams p,
                         const __grid_constant__ CodeEncoder encoder, int64_t quant_blocks) {
  quantize_warp<In>(p, Encode4{encoder}, quant_blocks);
}

template <class In>
__global__ void __launch_bounds__(kQuantWarps * kWarp)
    quantize_8bit_kernel(const __grid_constant__ QuantParams p, const float* __restrict__ code,
                         int64_t quant_blocks) {
  // The binary search reads 8 dependent entries per element: from shared memory.
  __shared__ float code_s[256];
  stage(code_s, code, 256);
  quantize_warp<In>(p, Encode8{code_s}, quant_blocks);
}

// ---- dequantize: one thread per 32 (4-bit) or 16 (8-bit) elements -------------------
template <class Out>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_4bit_kernel(const __grid_constant__ Dequant4Params p,
                           const __grid_constant__ CodeTable table) {
  __shared__ float lut_s[16];
  stage(lut_s, table.level, 16);
  dequantize_4bit_thread<Out>(p, lut_s, (int64_t)blockIdx.x * kDequantThreads + threadIdx.x);
}

template <class Out>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_8bit_kernel(const __grid_constant__ Dequant8Params p, const float* __restrict__ code) {
  __shared__ float code_s[256];
  stage(code_s, code, 256);
  dequantize_8bit_thread<Out>(p, code_s, (int64_t)blockIdx.x * kDequantThreads + threadIdx.x);
}

// kernel_for(T{}) is the __global__ function for element type T, the type of `dtype`:
// launch it with `grid` CUDA blocks of `threads` threads on `stream`.
template <class KernelFor, class... Args>
void launch(const char* what, int dtype, int64_t grid, int threads, void* stream,
            KernelFor kernel_for, const Args&... args) {
  with_float_type(dtype, [&](auto t) {
    if (grid > 0) kernel_for(t)<<<(unsigned)grid, threads, 0, as_stream(stream)>>>(args...);
  });
  check_launch(what);
}

}  // namespace

void quantize_4bit(const void* A, int dtype, int64_t n, int64_t blocksize,
                   const CodeEncoder& encoder, uint8_t* packed, float* absmax, void* stream) {
  const QuantPlan plan = plan_quantize(A, n, blocksize, packed, absmax, /*four_bit=*/true);
  launch("quantize_4bit", dtype, plan.grid, kQuantWarps * kWarp, stream,
         [](auto in) { return quantize_4bit_kernel<decltype(in)>; }, plan.params, encoder,
         plan.quant_blocks);
}

void quantize_blockwise(const void* A, int dtype, const float* code, int64_t n,
                        int64_t blocksize, uint8_t* q, float* absmax, void* stream) {
  const QuantPlan plan = plan_quantize(A, n, blocksize, q, absmax, /*four_bit=*/false);
  require(n == 0 || code != nullptr, "null code");
  launch("quantize_blockwise", dtype, plan.grid, kQuantWarps * kWarp, stream,
         [](auto in) { return quantize_8bit_kernel<decltype(in)>; }, plan.params, code,
         plan.quant_blocks);
}

void dequantize_4bit(const PackedWeight& weight, void* out, int out_dtype, void* stream) {
  const Dequant4Plan plan = plan_dequantize_4bit(weight, out);
  launch("dequantize_4bit", out_dtype, plan.grid, kDequantThreads, stream,
         [](auto o) { return dequantize_4bit_kernel<decltype(o)>; }, plan.params, plan.table);
}

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                          int64_t blocksize, void* out, int out_dtype, void* stream) {
  const Dequant8Plan plan = plan_dequantize_blockwise(q, absmax, code, n, blocksize, out);
  launch("dequantize_blockwise", out_dtype, plan.grid, kDequantThreads, stream,
         [](auto o) { return dequantize_8bit_kernel<decltype(o)>; }, plan.params, code);
}

std::string runtime_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return std::string("CUDA runtime: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
  }
  return "ok: " + std::to_string(count) + " device(s)";
}

}  // namespace cuda
}  // namespace nf4lora
