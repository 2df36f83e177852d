// nf4lora._C_cuda: the CUDA kernels for Python. Like nf4lora._C it neither includes nor
// links libtorch: tensors and the packed weight cross as Python objects, read by
// csrc/bindings_common.h (the helpers and op definitions shared with nf4lora._C), and the
// stream as an integer (`torch.cuda.current_stream().cuda_stream`).
// nf4lora/backends/cuda.py validates, allocates and picks the device; launches are
// asynchronous on that stream.
//
// The kernels behind this file are launch.h's functions: the CUDA launchers in the real
// module; the CPU replay (csrc/cuda_host/host_driver.cpp) in the module that
// tests/test_cuda_host.py builds from this same file, so the tests run this code too.
#include <pybind11/pybind11.h>

#include <stdint.h>

#include "bindings_common.h"
#include "launch.h"

namespace py = pybind11;
namespace cu = nf4lora::cuda;
namespace b = nf4lora::bindings;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "nf4lora CUDA kernels, each launched on `stream` (see nf4lora/backends/cuda.py)";
  b::def_ids(m);
  b::def_codec_ops<cu::quantize_4bit, cu::dequantize_4bit, cu::quantize_blockwise,
                   cu::dequantize_blockwise, uintptr_t>(m, py::arg("stream"));
  // 1..8 rows of x, float16 or bfloat16; `workspace`: gemv_workspace_bytes(M, rank) bytes
  // (both GEMVs: one adapter, and a mixed-adapter batch)
  b::def_lora_gemv_4bit<cu::gemv_4bit_lora, py::handle, uintptr_t>(m, py::arg("workspace"),
                                                                    py::arg("stream"));
  b::def_multi_lora_gemv_4bit<cu::multi_lora_gemv_4bit, py::handle, uintptr_t>(
      m, py::arg("workspace"), py::arg("stream"));
  m.def("gemv_workspace_bytes", &cu::gemv_workspace_bytes, py::arg("M"), py::arg("rank"),
        "Bytes of device workspace lora_gemv_4bit needs.");
  m.def("runtime_status", &cu::runtime_status,
        "'ok: N device(s)' or the CUDA runtime's error (no driver / no device).");
}
