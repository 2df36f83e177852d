// nf4lora._C: the CPU kernels for Python. Tensors and the packed weight cross as Python
// objects read by csrc/bindings_common.h (shared with nf4lora._C_cuda), so the extension
// neither links nor includes libtorch. nf4lora/backends/cpu.py validates and allocates;
// the kernels run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdint.h>

#include "bindings_common.h"
#include "cpu/kernels.h"
#include "nf4_codec.h"

namespace py = pybind11;
namespace cpu = nf4lora::cpu;
namespace b = nf4lora::bindings;

namespace {

// The header's scalar float32 -> fp16/bf16 conversion over an array (tests compare it
// with torch's `.to()` on edge cases; the CUDA kernels use the same functions).
void convert_float(const float* src, int64_t n, uint16_t* dst, int out_dtype) {
  if (out_dtype != nf4lora::kF16 && out_dtype != nf4lora::kBF16)
    throw std::invalid_argument("out must be float16 or bfloat16");
  for (int64_t i = 0; i < n; ++i)
    dst[i] = out_dtype == nf4lora::kF16 ? nf4lora::float_to_fp16_bits(src[i])
                                        : nf4lora::float_to_bf16_bits(src[i]);
}

// tile_gemm_4bit / tile_grad_input_4bit: out = a @ W^T (a = x [M, K], out [M, N]) or
// a @ W (a = grad [M, N], out = dx [M, K]).
void tile_gemm(py::handle a, py::handle weight, py::handle out, bool grad_input) {
  cpu::TileGemmArgs args;
  const char* a_name = grad_input ? "grad" : "x";
  if (b::float_dtype(a) != nf4lora::kBF16)
    throw py::value_error(std::string("the tile GEMM takes a bfloat16 ") + a_name);
  args.out_dtype = b::float_dtype(out);
  if (args.out_dtype == nf4lora::kF16)
    throw py::value_error("the tile GEMM writes bfloat16 or float32");
  args.weight = b::packed_weight(weight);
  std::tie(args.N, args.K) = b::shape_2d(weight, "a matmul weight");
  int64_t a_columns;
  std::tie(args.M, a_columns) = b::shape_2d(a, a_name);
  const int64_t reduced = grad_input ? args.N : args.K, produced = grad_input ? args.K : args.N;
  if (a_columns != reduced)
    throw py::value_error(std::string(a_name) + " has " + std::to_string(a_columns) +
                          " columns, the weight's shape is [" + std::to_string(args.N) + ", " +
                          std::to_string(args.K) + "]");
  if (b::shape_2d(out, "out") != std::make_pair(args.M, produced))
    throw py::value_error(std::string(grad_input ? "dx must be [M, K]" : "y must be [M, N]"));
  args.a = b::data(a);
  args.out = b::data(out);
  args.grad_input = grad_input;
  b::released(cpu::tile_gemm_4bit, args);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nf4lora CPU kernels (see nf4lora/backends/cpu.py)";
  b::def_ids(m);
  b::def_codec_ops<cpu::quantize_4bit, cpu::dequantize_4bit, cpu::quantize_blockwise,
                   cpu::dequantize_blockwise>(m);
  b::def_lora_gemv_4bit<cpu::lora_gemv_4bit>(m);
  b::def_multi_lora_gemv_4bit<cpu::multi_lora_gemv_4bit>(m);

  m.def(
      "lora_grad_input_4bit",
      [](py::handle grad, py::handle weight, py::handle lora_A, py::handle grad_h, py::handle dx) {
        nf4lora::GradInputArgs a;
        a.grad = b::data(grad);
        a.dtype = b::float_dtype(grad);
        std::tie(a.M, a.N) = b::shape_2d(grad, "grad");
        a.weight = b::packed_weight(weight);
        int64_t out_features;
        std::tie(out_features, a.K) = b::shape_2d(weight, "a matmul weight");
        if (out_features != a.N)
          throw py::value_error("grad has " + std::to_string(a.N) + " columns, the weight's shape is [" +
                                std::to_string(out_features) + ", " + std::to_string(a.K) + "]");
        a.lora_A = b::data(lora_A);
        a.grad_h = b::data(grad_h);
        a.rank = lora_A.is_none() ? 0 : b::dim(lora_A, 0);
        a.dx = b::data(dx);
        b::released(cpu::lora_grad_input_4bit, a);
      },
      py::arg("grad"), py::arg("weight"), py::arg("lora_A"), py::arg("grad_h"), py::arg("dx"),
      "dx[M,K] = grad[M,N] @ W + grad_h[M,rank] @ lora_A[rank,K] (W: weight, a PackedWeight "
      "[N, K], read packed; lora_A/grad_h None: no LoRA term); all of grad's dtype, "
      "contiguous (the caller checks)");

  m.def(
      "interleave_4bit",
      [](py::handle weight, py::handle out) {
        const nf4lora::PackedWeight w = b::packed_weight(weight);
        int64_t N, K;
        std::tie(N, K) = b::shape_2d(weight, "a matmul weight");
        uint8_t* o = const_cast<uint8_t*>(b::checked_data<uint8_t>(
            out, "out", "uint8", nf4lora::interleaved_bytes(N, K), "the interleaved copy"));
        b::released(cpu::interleave_4bit, w, N, K, o);
      },
      py::arg("weight"), py::arg("out"),
      "out[interleaved_bytes(N, K)] u8 <- the interleaved copy of weight (a PackedWeight [N, K], "
      "K and blocksize multiples of 64) that lora_gemv_4bit reads where has_interleaved_gemv()");
  m.def("has_interleaved_gemv", &cpu::has_interleaved_gemv,
        "Whether the active ISA's fused GEMV reads a weight's interleaved copy (AVX2, AVX-512).");
  m.def(
      "reads_interleaved",
      [](py::handle dtype) { return cpu::reads_interleaved(b::dtype_id(dtype)); }, py::arg("dtype"),
      "Whether a fused call with finite x of a torch dtype reads the interleaved copy its weight "
      "brings (AVX2, AVX-512; 16-bit x; NF4LORA_CPU_GEMV auto, integer or int8).");
  m.def(
      "interleavable", [](int64_t K, int64_t blocksize) { return nf4lora::interleavable(K, blocksize); },
      py::arg("K"), py::arg("blocksize"),
      "Whether a weight with rows of K elements in blocks of blocksize can have an interleaved "
      "copy (csrc/weight.h: both multiples of 64).");
  m.def(
      "interleaved_bytes",
      [](int64_t N, int64_t K) { return nf4lora::interleaved_bytes(N, K); }, py::arg("N"), py::arg("K"),
      "Bytes of the interleaved copy of an N x K weight (csrc/weight.h).");

  m.def(
      "tile_gemm_4bit",
      [](py::handle x, py::handle weight, py::handle y) { tile_gemm(x, weight, y, false); },
      py::arg("x"), py::arg("weight"), py::arg("y"),
      "y[M,N] = x[M,K] @ W^T (W: weight, a PackedWeight [N, K], decoded into bf16 tiles in "
      "cache), bfloat16 x, bfloat16 or float32 y, contiguous; by the tile GEMM tile_gemm() names");
  m.def(
      "tile_grad_input_4bit",
      [](py::handle grad, py::handle weight, py::handle dx) { tile_gemm(grad, weight, dx, true); },
      py::arg("grad"), py::arg("weight"), py::arg("dx"),
      "dx[M,K] = grad[M,N] @ W (W: weight, a PackedWeight [N, K], decoded into bf16 tiles in "
      "cache), bfloat16 grad, bfloat16 or float32 dx, contiguous; by the tile GEMM tile_gemm() names");
  m.def("tile_gemm", &cpu::tile_gemm,
        "The tile GEMM of bf16 matmuls from M = 16 and past the fused kernel (backends/cpu.py "
        "route): amx, amx-emulated (tests) or '' (none); NF4LORA_CPU_GEMM=auto|amx|amx-emulated|dequantize.");
  m.def("has_amx", &cpu::has_amx,
        "Whether this CPU runs AMX-BF16 tile instructions in this process (CPU and OS).");

  m.def(
      "native_16bit_gemm",
      [](py::handle dtype) { return cpu::native_16bit_gemm(b::dtype_id(dtype)); }, py::arg("dtype"),
      "Whether this CPU has native GEMM instructions for a torch dtype (bfloat16: AVX512-BF16 / "
      "AMX; float16: AVX512-FP16; float32: always).");

  m.def("isa", &cpu::active_isa,
        "The SIMD path the next call will use: scalar, avx2, avx512 or avx512bf16 "
        "(NF4LORA_CPU_ISA picks another supported one).");
  m.def("supported_isas", &cpu::supported_isas, "The paths this CPU can run, best last.");
  m.def(
      "gemv_decoder",
      [](int64_t M, py::handle dtype) { return cpu::gemv_decoder(M, b::dtype_id(dtype)); },
      py::arg("M"), py::arg("dtype"),
      "The fused GEMV's decoder for M rows of x of a torch dtype: integer, bf16 or float "
      "(NF4LORA_CPU_GEMV=auto|integer|float overrides the measured default).");
  m.def("num_threads", &cpu::num_threads, "OpenMP threads the kernels use.");
  m.def("set_num_threads", &cpu::set_num_threads, py::arg("k"),
        "Fix the kernels' thread count (0: follow omp_get_max_threads()).");
  m.def(
      "convert_float",
      [](py::handle src, py::handle dst) {
        b::released(convert_float, b::data<const float>(src), b::numel(src),
                    b::data<uint16_t>(dst), b::float_dtype(dst));
      },
      py::arg("src"), py::arg("dst"),
      "dst (float16 / bfloat16) <- src (float32), with the codec's scalar rounding (for tests).");
}
