// nf4lora._C: the CPU kernels for Python. Tensors cross as integer addresses
// (`tensor.data_ptr()`) plus sizes and dtype ids (0 float32, 1 float16, 2 bfloat16),
// so the extension neither links nor includes libtorch. nf4lora/backends/cpu.py
// validates and allocates; the kernels run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdint.h>

#include "cpu/kernels.h"
#include "nf4_codec.h"

namespace py = pybind11;
namespace cpu = nf4lora::cpu;

namespace {

template <class T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// The codec's constants, for tests to compare with nf4lora.codebook / reference.
py::dict codec_constants() {
  const float nf4[16] = {NF4LORA_NF4_VALUES};
  const float fp4[16] = {NF4LORA_FP4_VALUES};
  const float nf4_thr[15] = {NF4LORA_NF4_THRESHOLDS};
  const float fp4_thr[7] = {NF4LORA_FP4_ABS_THRESHOLDS};
  const int by_rank[8] = {NF4LORA_FP4_CODE_BY_RANK};
  py::dict d;
  d["nf4"] = std::vector<float>(nf4, nf4 + 16);
  d["fp4"] = std::vector<float>(fp4, fp4 + 16);
  d["nf4_thresholds"] = std::vector<float>(nf4_thr, nf4_thr + 15);
  d["fp4_abs_thresholds"] = std::vector<float>(fp4_thr, fp4_thr + 7);
  d["fp4_code_by_rank"] = std::vector<int>(by_rank, by_rank + 8);
  return d;
}

// The header's scalar float32 -> fp16/bf16 conversion over an array (tests compare it
// with torch's `.to()` on edge cases; the CUDA kernels use the same functions).
void convert_float(uintptr_t src, int64_t n, uintptr_t dst, int out_dtype) {
  const float* s = as_ptr<const float>(src);
  uint16_t* d = as_ptr<uint16_t>(dst);
  if (out_dtype != nf4lora::kF16 && out_dtype != nf4lora::kBF16)
    throw std::invalid_argument("out_dtype must be 1 (float16) or 2 (bfloat16)");
  for (int64_t i = 0; i < n; ++i)
    d[i] = out_dtype == nf4lora::kF16 ? nf4lora::float_to_fp16_bits(s[i])
                                      : nf4lora::float_to_bf16_bits(s[i]);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nf4lora CPU kernels (raw pointers; see nf4lora/backends/cpu.py)";

  m.def(
      "quantize_4bit",
      [](uintptr_t A, int dtype, int64_t n, int64_t blocksize, int quant_type, uintptr_t packed,
         uintptr_t absmax) {
        py::gil_scoped_release release;
        cpu::quantize_4bit(as_ptr<const void>(A), dtype, n, blocksize, quant_type,
                           as_ptr<uint8_t>(packed), as_ptr<float>(absmax));
      },
      py::arg("A"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("quant_type"),
      py::arg("packed"), py::arg("absmax"),
      "packed[ceil(n/2)] u8, absmax[ceil(n/blocksize)] f32 <- A[n] of dtype");

  m.def(
      "dequantize_4bit",
      [](uintptr_t packed, uintptr_t absmax, int64_t n, int64_t blocksize, int quant_type,
         uintptr_t out, int out_dtype) {
        py::gil_scoped_release release;
        cpu::dequantize_4bit(as_ptr<const uint8_t>(packed), as_ptr<const float>(absmax), nullptr,
                             n, blocksize, quant_type, as_ptr<void>(out), out_dtype);
      },
      py::arg("packed"), py::arg("absmax"), py::arg("n"), py::arg("blocksize"),
      py::arg("quant_type"), py::arg("out"), py::arg("out_dtype"),
      "out[n] of out_dtype <- packed u8, absmax f32");

  m.def(
      "dequantize_4bit_nested",
      [](uintptr_t packed, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2, float offset,
         int64_t nested_blocksize, int64_t n, int64_t blocksize, int quant_type, uintptr_t out,
         int out_dtype) {
        cpu::NestedAbsmax nested;
        nested.q = as_ptr<const uint8_t>(qabsmax);
        nested.absmax2 = as_ptr<const float>(absmax2);
        nested.code2 = as_ptr<const float>(code2);
        nested.offset = offset;
        nested.blocksize = nested_blocksize;
        py::gil_scoped_release release;
        cpu::dequantize_4bit(as_ptr<const uint8_t>(packed), nullptr, &nested, n, blocksize,
                             quant_type, as_ptr<void>(out), out_dtype);
      },
      py::arg("packed"), py::arg("qabsmax"), py::arg("absmax2"), py::arg("code2"),
      py::arg("offset"), py::arg("nested_blocksize"), py::arg("n"), py::arg("blocksize"),
      py::arg("quant_type"), py::arg("out"), py::arg("out_dtype"),
      "dequantize_4bit with absmax[i] = code2[qabsmax[i]] * absmax2[i // nested_blocksize] + offset");

  m.def(
      "quantize_blockwise",
      [](uintptr_t A, int dtype, uintptr_t code, int64_t n, int64_t blocksize, uintptr_t q,
         uintptr_t absmax) {
        py::gil_scoped_release release;
        cpu::quantize_blockwise(as_ptr<const void>(A), dtype, as_ptr<const float>(code), n,
                                blocksize, as_ptr<uint8_t>(q), as_ptr<float>(absmax));
      },
      py::arg("A"), py::arg("dtype"), py::arg("code"), py::arg("n"), py::arg("blocksize"),
      py::arg("q"), py::arg("absmax"), "q[n] u8, absmax f32 <- A[n] of dtype, code[256] f32");

  m.def(
      "dequantize_blockwise",
      [](uintptr_t q, uintptr_t absmax, uintptr_t code, int64_t n, int64_t blocksize,
         uintptr_t out, int out_dtype) {
        py::gil_scoped_release release;
        cpu::dequantize_blockwise(as_ptr<const uint8_t>(q), as_ptr<const float>(absmax),
                                  as_ptr<const float>(code), n, blocksize, as_ptr<void>(out),
                                  out_dtype);
      },
      py::arg("q"), py::arg("absmax"), py::arg("code"), py::arg("n"), py::arg("blocksize"),
      py::arg("out"), py::arg("out_dtype"), "out[n] of out_dtype <- code[q] * absmax");

  m.def(
      "lora_gemv_4bit",
      [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, uintptr_t packed,
         uintptr_t absmax, uintptr_t absmax2, uintptr_t code2, float offset,
         int64_t nested_blocksize, int64_t blocksize, int quant_type, uintptr_t lora_A,
         uintptr_t lora_B, int64_t rank, float scaling, uintptr_t bias, uintptr_t y,
         uintptr_t h) {
        cpu::NestedAbsmax nested;
        nested.q = as_ptr<const uint8_t>(absmax);
        nested.absmax2 = as_ptr<const float>(absmax2);
        nested.code2 = as_ptr<const float>(code2);
        nested.offset = offset;
        nested.blocksize = nested_blocksize;
        const bool is_nested = absmax2 != 0;
        py::gil_scoped_release release;
        cpu::lora_gemv_4bit(as_ptr<const void>(x), dtype, M, K, N, as_ptr<const uint8_t>(packed),
                            is_nested ? nullptr : as_ptr<const float>(absmax),
                            is_nested ? &nested : nullptr, blocksize, quant_type,
                            as_ptr<const void>(lora_A), as_ptr<const void>(lora_B), rank, scaling,
                            as_ptr<const void>(bias), as_ptr<void>(y), as_ptr<void>(h));
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("K"), py::arg("N"),
      py::arg("packed"), py::arg("absmax"), py::arg("absmax2"), py::arg("code2"),
      py::arg("offset"), py::arg("nested_blocksize"), py::arg("blocksize"),
      py::arg("quant_type"), py::arg("lora_A"), py::arg("lora_B"), py::arg("rank"),
      py::arg("scaling"), py::arg("bias"), py::arg("y"), py::arg("h"),
      "y[M,N] = x @ W^T + scaling * h @ lora_B^T + bias, h[M,rank] = x @ lora_A^T; absmax2 = 0: "
      "absmax is float32, else absmax holds the 8-bit codes of double quantization; bias = 0: none");
  m.def(
      "native_16bit_gemm", &cpu::native_16bit_gemm, py::arg("dtype"),
      "Whether this CPU has native GEMM instructions for dtype (2 bf16: AVX512-BF16/AMX; 1 fp16: "
      "AVX512-FP16; 0 float32: always).");

  m.def("isa", &cpu::active_isa,
        "The SIMD path the next call will use: scalar, avx2 or avx512 (NF4LORA_CPU_ISA picks "
        "another supported one).");
  m.def("supported_isas", &cpu::supported_isas, "The paths this CPU can run, best last.");
  m.def("num_threads", &cpu::num_threads, "OpenMP threads the kernels use.");
  m.def("set_num_threads", &cpu::set_num_threads, py::arg("k"),
        "Fix the kernels' thread count (0: follow omp_get_max_threads()).");
  m.def("codec_constants", &codec_constants, "The tables of nf4_codec.h.");
  m.def(
      "convert_float",
      [](uintptr_t src, int64_t n, uintptr_t dst, int out_dtype) {
        py::gil_scoped_release release;
        convert_float(src, n, dst, out_dtype);
      },
      py::arg("src"), py::arg("n"), py::arg("dst"), py::arg("out_dtype"),
      "The codec's scalar float32 -> fp16/bf16 rounding over an array (for tests).");
}
