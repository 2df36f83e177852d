// nf4lora._C_cuda: the CUDA kernels for Python. Like nf4lora._C it neither includes nor
// links libtorch: tensors cross as integer device addresses (`tensor.data_ptr()`), sizes,
// dtype ids (0 float32, 1 float16, 2 bfloat16) and the stream as an integer
// (`torch.cuda.current_stream().cuda_stream`). nf4lora/backends/cuda.py validates,
// allocates and picks the device; launches are asynchronous on that stream.
//
// The argument lists match csrc/cuda_host/host_driver.cpp (the CPU replay used by the
// tests) name for name, so the tests drive nf4lora/backends/cuda.py's glue through it.
#include <pybind11/pybind11.h>

#include <stdint.h>

#include "launch.h"

namespace py = pybind11;
namespace cu = nf4lora::cuda;

namespace {

template <class T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void* as_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

cu::Nested make_nested(uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2, float offset,
                       int64_t nested_blocksize) {
  cu::Nested nested;
  nested.q = as_ptr<const uint8_t>(qabsmax);
  nested.absmax2 = as_ptr<const float>(absmax2);
  nested.code2 = as_ptr<const float>(code2);
  nested.offset = offset;
  nested.blocksize = nested_blocksize;
  return nested;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "nf4lora CUDA kernels (raw device pointers + stream; see nf4lora/backends/cuda.py)";

  m.def(
      "quantize_4bit",
      [](uintptr_t A, int dtype, int64_t n, int64_t blocksize, int quant_type, uintptr_t packed,
         uintptr_t absmax, uintptr_t stream) {
        py::gil_scoped_release release;
        cu::quantize_4bit(as_ptr<const void>(A), dtype, n, blocksize, quant_type,
                          as_ptr<uint8_t>(packed), as_ptr<float>(absmax), as_stream(stream));
      },
      py::arg("A"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("quant_type"),
      py::arg("packed"), py::arg("absmax"), py::arg("stream"),
      "packed[ceil(n/2)] u8, absmax[ceil(n/blocksize)] f32 <- A[n] of dtype");

  m.def(
      "quantize_blockwise",
      [](uintptr_t A, int dtype, uintptr_t code, int64_t n, int64_t blocksize, uintptr_t q,
         uintptr_t absmax, uintptr_t stream) {
        py::gil_scoped_release release;
        cu::quantize_blockwise(as_ptr<const void>(A), dtype, as_ptr<const float>(code), n,
                               blocksize, as_ptr<uint8_t>(q), as_ptr<float>(absmax),
                               as_stream(stream));
      },
      py::arg("A"), py::arg("dtype"), py::arg("code"), py::arg("n"), py::arg("blocksize"),
      py::arg("q"), py::arg("absmax"), py::arg("stream"),
      "q[n] u8, absmax f32 <- A[n] of dtype, code[256] f32 (the dynamic map)");

  m.def(
      "dequantize_4bit",
      [](uintptr_t packed, uintptr_t absmax, int64_t n, int64_t blocksize, int quant_type,
         uintptr_t out, int out_dtype, uintptr_t stream) {
        py::gil_scoped_release release;
        cu::dequantize_4bit(as_ptr<const uint8_t>(packed), as_ptr<const float>(absmax), nullptr,
                            n, blocksize, quant_type, as_ptr<void>(out), out_dtype,
                            as_stream(stream));
      },
      py::arg("packed"), py::arg("absmax"), py::arg("n"), py::arg("blocksize"),
      py::arg("quant_type"), py::arg("out"), py::arg("out_dtype"), py::arg("stream"),
      "out[n] of out_dtype <- packed u8, absmax f32");

  m.def(
      "dequantize_4bit_nested",
      [](uintptr_t packed, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2, float offset,
         int64_t nested_blocksize, int64_t n, int64_t blocksize, int quant_type, uintptr_t out,
         int out_dtype, uintptr_t stream) {
        const cu::Nested nested = make_nested(qabsmax, absmax2, code2, offset, nested_blocksize);
        py::gil_scoped_release release;
        cu::dequantize_4bit(as_ptr<const uint8_t>(packed), nullptr, &nested, n, blocksize,
                            quant_type, as_ptr<void>(out), out_dtype, as_stream(stream));
      },
      py::arg("packed"), py::arg("qabsmax"), py::arg("absmax2"), py::arg("code2"),
      py::arg("offset"), py::arg("nested_blocksize"), py::arg("n"), py::arg("blocksize"),
      py::arg("quant_type"), py::arg("out"), py::arg("out_dtype"), py::arg("stream"),
      "dequantize_4bit, each block's absmax decoded in the kernel from its 8-bit code");

  m.def(
      "dequantize_blockwise",
      [](uintptr_t q, uintptr_t absmax, uintptr_t code, int64_t n, int64_t blocksize,
         uintptr_t out, int out_dtype, uintptr_t stream) {
        py::gil_scoped_release release;
        cu::dequantize_blockwise(as_ptr<const uint8_t>(q), as_ptr<const float>(absmax),
                                 as_ptr<const float>(code), n, blocksize, as_ptr<void>(out),
                                 out_dtype, as_stream(stream));
      },
      py::arg("q"), py::arg("absmax"), py::arg("code"), py::arg("n"), py::arg("blocksize"),
      py::arg("out"), py::arg("out_dtype"), py::arg("stream"), "out[n] <- code[q] * absmax");

  m.def(
      "gemv_4bit_lora",
      [](uintptr_t x, int dtype, int64_t M, int64_t N, int64_t K, uintptr_t packed,
         uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2, float offset,
         int64_t nested_blocksize, int64_t blocksize, int quant_type, uintptr_t lora_A,
         uintptr_t lora_B, int64_t rank, float scaling, uintptr_t bias, uintptr_t workspace,
         uintptr_t y, uintptr_t stream) {
        const cu::Nested nested = make_nested(qabsmax, absmax2, code2, offset, nested_blocksize);
        cu::GemvArgs a;
        a.x = as_ptr<const void>(x);
        a.dtype = dtype;
        a.M = M;
        a.N = N;
        a.K = K;
        a.packed = as_ptr<const uint8_t>(packed);
        a.absmax = as_ptr<const float>(absmax);
        a.nested = qabsmax != 0 ? &nested : nullptr;
        a.blocksize = blocksize;
        a.quant_type = quant_type;
        a.lora_A = as_ptr<const void>(lora_A);
        a.lora_B = as_ptr<const void>(lora_B);
        a.rank = rank;
        a.scaling = scaling;
        a.bias = as_ptr<const void>(bias);
        a.workspace = as_ptr<void>(workspace);
        a.y = as_ptr<void>(y);
        py::gil_scoped_release release;
        cu::gemv_4bit_lora(a, as_stream(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("packed"),
      py::arg("absmax"), py::arg("qabsmax"), py::arg("absmax2"), py::arg("code2"),
      py::arg("offset"), py::arg("nested_blocksize"), py::arg("blocksize"),
      py::arg("quant_type"), py::arg("lora_A"), py::arg("lora_B"), py::arg("rank"),
      py::arg("scaling"), py::arg("bias"), py::arg("workspace"), py::arg("y"), py::arg("stream"),
      "y[M,N] = x @ W^T + (scaling * x @ A^T) @ B^T + bias, M <= 8 (qabsmax 0: absmax is f32; "
      "bias 0: none; rank 0: no LoRA)");

  m.def("gemv_workspace_bytes", &cu::gemv_workspace_bytes, py::arg("M"), py::arg("rank"),
        "Bytes of device workspace gemv_4bit_lora needs.");
  m.def("runtime_status", &cu::runtime_status,
        "'ok: N device(s)' or the CUDA runtime's error (no driver / no device).");
}
