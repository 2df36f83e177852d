// bindings_common.h: what nf4lora._C (csrc/bindings.cpp) and nf4lora._C_cuda
// (csrc/cuda/bindings_cuda.cpp) share.
//
// Neither module includes or links libtorch, so tensors are read through their Python
// attributes: `data_ptr()` for the address, `dtype` for the dtype id (by name: weight.h
// kDTypeNames), `numel()` / `shape` for sizes. A packed 4-bit weight arrives as
// nf4lora._weight.PackedWeight and becomes weight.h's PackedWeight in ONE place,
// packed_weight() below, which also guards the weight's reads; its format arrives as data
// (PackedWeight.codec, nf4lora.codebook.KernelCodec), never as a name. nf4lora/backends/{cpu,cuda}.py
// have validated the other tensors (dtypes, shapes, devices, contiguity); the kernels
// check what would otherwise be undefined behaviour.
//
// The ops both modules have (4-bit and 8-bit quantize / dequantize, the fused GEMV, the
// mixed-adapter GEMV: only _C_cuda's so far) are defined once, at the bottom: the shared
// Python arguments, then the module's own trailing ones (CUDA: a workspace tensor, the
// stream as an integer).
#pragma once

#include <pybind11/pybind11.h>

#include <stdint.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "weight.h"

namespace nf4lora {
namespace bindings {

namespace py = pybind11;

// ---- reading torch objects ---------------------------------------------------------
// Every op call reads ~40 attributes of its arguments. Names made from C strings on each
// read, bound methods allocated per call and dtypes compared as strings cost ~6.4 us of
// an M = 1 call (its arguments alone, N = 256, Zen 4): a decode step makes 154 such calls.
// So names are interned once, methods called without a bound method
// (PyObject_CallMethodNoArgs) and dtypes compared by identity with torch's own objects.

// An attribute name as an interned Python string, made once and kept for the process.
#define NF4LORA_NAME(identifier)                                          \
  ([]() -> PyObject* {                                                    \
    static PyObject* const interned = PyUnicode_InternFromString(#identifier); \
    return interned;                                                      \
  }())

inline py::object checked(PyObject* result) {
  if (result == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(result);
}

inline py::object get(py::handle obj, PyObject* name) {
  return checked(PyObject_GetAttr(obj.ptr(), name));
}

// obj.name()
inline py::object call(py::handle obj, PyObject* name) {
  return checked(PyObject_CallMethodNoArgs(obj.ptr(), name));
}

// torch.<name> (a torch.dtype), looked up once per name and kept for the process.
inline PyObject* torch_dtype(const char* name) {
  static std::vector<std::pair<std::string, PyObject*>> known;
  for (const auto& [known_name, dtype] : known)
    if (known_name == name) return dtype;
  PyObject* dtype = py::object(py::module_::import("torch").attr(name)).release().ptr();
  known.emplace_back(name, dtype);
  return dtype;
}

// The tensor's first element (`tensor.data_ptr()`), or null for None.
template <class T = void>
T* data(py::handle tensor) {
  if (tensor.is_none()) return nullptr;
  const py::object address = call(tensor, NF4LORA_NAME(data_ptr));
  return reinterpret_cast<T*>(address.cast<uintptr_t>());
}

inline int64_t numel(py::handle tensor) { return call(tensor, NF4LORA_NAME(numel)).cast<int64_t>(); }

inline int64_t dim(py::handle tensor, int i) {
  return get(tensor, NF4LORA_NAME(shape)).cast<py::tuple>()[i].cast<int64_t>();
}

// torch.float32 / torch.float16 / torch.bfloat16 -> its DType id; ValueError otherwise.
inline int dtype_id(py::handle dtype) {
  for (int id = 0; id < kNumDTypes; ++id)
    if (dtype.ptr() == torch_dtype(kDTypeNames[id])) return id;
  throw py::value_error("dtype must be torch.float32, torch.float16 or torch.bfloat16, got " +
                        std::string(py::str(dtype)));
}

inline int float_dtype(py::handle tensor) { return dtype_id(get(tensor, NF4LORA_NAME(dtype))); }

// The address of a tensor the kernels read as `count` contiguous elements of
// torch.<dtype>; ValueError naming it otherwise. (PackedWeight's constructors check sizes,
// dtypes and devices once; this guards the reads of one assembled by hand or sliced, and
// of the other operands a kernel indexes by their values: `reader` says whose count.)
template <class T>
const T* checked_data(py::handle tensor, const std::string& name, const char* dtype,
                      int64_t count, const char* reader = "the weight") {
  const py::object actual = get(tensor, NF4LORA_NAME(dtype));
  if (actual.ptr() != torch_dtype(dtype))
    throw py::value_error(name + " must be torch." + dtype + ", got " + std::string(py::str(actual)));
  const py::object contiguous = call(tensor, NF4LORA_NAME(is_contiguous));
  if (!contiguous.cast<bool>())
    throw py::value_error(name + " must be contiguous");
  if (numel(tensor) < count)
    throw py::value_error(name + " holds " + std::to_string(numel(tensor)) +
                          " elements, " + reader + " needs " + std::to_string(count));
  return data<const T>(tensor);
}

// The two sizes of a 2-D `shape` (a tensor's, or a matmul PackedWeight's [out_features,
// in_features]), read once; ValueError naming `what` otherwise.
inline std::pair<int64_t, int64_t> shape_2d(py::handle obj, const char* what) {
  const py::object shape = get(obj, NF4LORA_NAME(shape));
  const py::tuple dims = shape.cast<py::tuple>();
  if (dims.size() != 2)
    throw py::value_error(std::string(what) + " must be 2-D, got shape " + std::string(py::str(shape)));
  return {dims[0].cast<int64_t>(), dims[1].cast<int64_t>()};
}

// ---- formats: nf4lora.codebook.KernelCodec -> CodeTable / CodeEncoder -----------------
// A format reaches the kernels as data only (nf4_codec.h): codebook.kernel_codec(key)
// builds it once per format (Python caches it) from the validated format key. Here only
// what the kernels index is checked: the sizes, and every code within 0..15.

inline py::object codec_field(py::handle codec, const char* field) {
  PyObject* value = PyObject_GetAttrString(codec.ptr(), field);
  if (value == nullptr) {
    PyErr_Clear();
    throw py::value_error(std::string("codec must be an nf4lora.codebook.KernelCodec "
                                      "(codebook.kernel_codec(format key)), got ") +
                          std::string(py::str(py::type::of(codec).attr("__name__"))));
  }
  return py::reinterpret_steal<py::object>(value);
}

// The kCount numbers of codec.<field> (a tuple; any sequence is converted to one), as T.
// A tuple's items are read without new references: the 16 levels cost ~0.3 us per call.
template <class T, int kCount>
void read_numbers(py::handle codec, const char* field, T (&out)[kCount]) {
  const py::tuple values(codec_field(codec, field));
  if (py::len(values) != kCount)
    throw py::value_error(std::string("codec.") + field + " must hold " + std::to_string(kCount) +
                          " values, got " + std::to_string(py::len(values)));
  for (int i = 0; i < kCount; ++i) out[i] = values[i].cast<T>();
}

// codec.levels: the 16 values the codes decode to.
inline CodeTable code_table(py::handle codec) {
  CodeTable table;
  read_numbers(codec, "levels", table.level);
  return table;
}

// codec.thresholds (15, ascending) and codec.codes (the code of each count, 16).
inline CodeEncoder code_encoder(py::handle codec) {
  CodeEncoder encoder;
  read_numbers(codec, "thresholds", encoder.threshold);
  int codes[16];
  read_numbers(codec, "codes", codes);
  encoder.code_of_count = 0;
  for (int count = 0; count < 16; ++count) {
    if (codes[count] < 0 || codes[count] > 15)
      throw py::value_error("codec.codes must be 4-bit codes (0..15), got " +
                            std::to_string(codes[count]));
    encoder.code_of_count |= uint64_t(codes[count]) << (4 * count);
  }
  return encoder;
}

// nf4lora._weight.PackedWeight -> PackedWeight. The tensors stay owned by the Python
// object, which the caller holds for the call; nested.offset must be a float already
// (PackedWeight.with_offset_read()).
inline PackedWeight packed_weight(py::handle weight) {
  PackedWeight w;
  w.n = get(weight, NF4LORA_NAME(numel)).cast<int64_t>();
  w.blocksize = get(weight, NF4LORA_NAME(blocksize)).cast<int64_t>();
  w.table = code_table(get(weight, NF4LORA_NAME(codec)));
  if (w.n < 0 || w.blocksize <= 0) throw py::value_error("weight: bad shape or blocksize");
  w.packed = checked_data<uint8_t>(get(weight, NF4LORA_NAME(packed)), "packed weight", "uint8",
                                   (w.n + 1) / 2);
  const py::object nested = get(weight, NF4LORA_NAME(nested));
  const py::object absmax = get(weight, NF4LORA_NAME(absmax));
  if (nested.is_none()) {
    w.absmax = checked_data<float>(absmax, "absmax", "float32", w.blocks());
    return w;
  }
  w.nested.blocksize = get(nested, NF4LORA_NAME(blocksize)).cast<int64_t>();
  if (w.nested.blocksize <= 0) throw py::value_error("nested blocksize must be > 0");
  w.nested.q = checked_data<uint8_t>(absmax, "absmax (8-bit codes when nested)", "uint8", w.blocks());
  const int64_t groups = (w.blocks() + w.nested.blocksize - 1) / w.nested.blocksize;
  w.nested.absmax2 = checked_data<float>(get(nested, NF4LORA_NAME(absmax)), "nested absmax",
                                         "float32", groups);
  w.nested.code2 = checked_data<float>(get(nested, NF4LORA_NAME(code)), "nested code", "float32", 256);
  w.nested.offset = get(nested, NF4LORA_NAME(offset)).cast<float>();
  return w;
}

// The fused GEMV's operands: x [M, K], the weight [N, K], lora_A [rank, K] or None,
// lora_B [N, rank] or None, bias [N] or None, y [M, N], h [M, rank].
inline LoraGemvArgs lora_gemv_args(py::handle x, py::handle weight, py::handle lora_A,
                                   py::handle lora_B, float scaling, py::handle bias,
                                   py::handle y, py::handle h) {
  LoraGemvArgs a;
  a.x = data(x);
  a.dtype = float_dtype(x);
  std::tie(a.M, a.K) = shape_2d(x, "x");
  a.weight = packed_weight(weight);
  int64_t in_features;
  std::tie(a.N, in_features) = shape_2d(weight, "a matmul weight");
  if (in_features != a.K)
    throw py::value_error("x has " + std::to_string(a.K) + " features, the weight's shape is [" +
                          std::to_string(a.N) + ", " + std::to_string(in_features) + "]");
  a.lora_A = data(lora_A);
  a.lora_B = data(lora_B);
  a.rank = lora_A.is_none() ? 0 : dim(lora_A, 0);
  a.scaling = scaling;
  a.bias = data(bias);
  a.y = data(y);
  a.h = data(h);
  // the CPU kernels' interleaved copy (PackedWeight.interleaved), when the weight has one
  const py::object interleaved = get(weight, NF4LORA_NAME(interleaved));
  if (!interleaved.is_none())
    a.interleaved = checked_data<uint8_t>(interleaved, "interleaved weight", "uint8",
                                          interleaved_bytes(a.N, a.K));
  return a;
}

// A mixed-adapter batch's operands: lora_gemv_args with lora_A [n, r, K] and lora_B [n, N, r]
// stacked (rank: r), and `adapters` read from adapter_index (int64 [M], -1: none) and
// scalings (float32 [n]). The index's values are the kernel's contract (launch.h): the
// CUDA one cannot read them from the host, so nf4lora._ops checks them.
inline LoraGemvArgs multi_lora_gemv_args(py::handle x, py::handle weight, py::handle lora_A,
                                         py::handle lora_B, py::handle scalings,
                                         py::handle adapter_index, py::handle bias, py::handle y,
                                         py::handle h, AdapterRows& adapters) {
  if (lora_A.is_none() || lora_B.is_none())
    throw py::value_error("a mixed-adapter batch needs lora_A [n, r, K] and lora_B [n, N, r]");
  LoraGemvArgs a = lora_gemv_args(x, weight, lora_A, lora_B, 1.0f, bias, y, h);
  a.rank = dim(lora_A, 1);
  adapters.count = dim(lora_A, 0);
  adapters.index = checked_data<int64_t>(adapter_index, "adapter_index", "int64", a.M, "the batch");
  adapters.scalings = checked_data<float>(scalings, "scalings", "float32", adapters.count,
                                          "the adapter stack");
  return a;
}

// A module's own trailing arguments, as its kernels take them.
inline void* native(py::handle tensor) { return data(tensor); }                      // workspace
inline void* native(uintptr_t stream) { return reinterpret_cast<void*>(stream); }  // cudaStream_t

// kernel(args...) with the GIL released. The arguments were read from the Python objects
// before the call, with the GIL held.
template <class Kernel, class... Args>
void released(Kernel kernel, const Args&... args) {
  py::gil_scoped_release release;
  kernel(args...);
}

// The dtype ids, for Python to read (never to spell again).
inline void def_ids(py::module_& m) {
  py::dict dtypes;
  for (int id = 0; id < kNumDTypes; ++id) dtypes[kDTypeNames[id]] = id;
  m.attr("DTYPE_IDS") = dtypes;
}

// ---- the ops of both modules ---------------------------------------------------------
// Each op takes the Python arguments both modules share, then the module's own (Extra:
// CUDA's workspace and stream), and calls `kernel` with what it read from them and
// native(extra)..., with the GIL released.
namespace ops {

template <auto kernel, class... Extra>
void quantize_4bit(py::handle A, int64_t blocksize, py::handle codec, py::handle packed,
                   py::handle absmax, Extra... extra) {
  released(kernel, data<const void>(A), float_dtype(A), numel(A), blocksize, code_encoder(codec),
           data<uint8_t>(packed), data<float>(absmax), native(extra)...);
}

template <auto kernel, class... Extra>
void dequantize_4bit(py::handle weight, py::handle out, Extra... extra) {
  released(kernel, packed_weight(weight), data(out), float_dtype(out), native(extra)...);
}

template <auto kernel, class... Extra>
void quantize_blockwise(py::handle A, py::handle code, int64_t blocksize, py::handle q,
                        py::handle absmax, Extra... extra) {
  released(kernel, data<const void>(A), float_dtype(A), data<const float>(code), numel(A),
           blocksize, data<uint8_t>(q), data<float>(absmax), native(extra)...);
}

template <auto kernel, class... Extra>
void dequantize_blockwise(py::handle q, py::handle absmax, py::handle code, int64_t blocksize,
                          py::handle out, Extra... extra) {
  released(kernel, data<const uint8_t>(q), data<const float>(absmax), data<const float>(code),
           numel(out), blocksize, data(out), float_dtype(out), native(extra)...);
}

template <auto kernel, class... Extra>
void lora_gemv_4bit(py::handle x, py::handle weight, py::handle lora_A, py::handle lora_B,
                    float scaling, py::handle bias, py::handle y, py::handle h, Extra... extra) {
  released(kernel, lora_gemv_args(x, weight, lora_A, lora_B, scaling, bias, y, h),
           native(extra)...);
}

template <auto kernel, class... Extra>
void multi_lora_gemv_4bit(py::handle x, py::handle weight, py::handle lora_A, py::handle lora_B,
                          py::handle scalings, py::handle adapter_index, py::handle bias,
                          py::handle y, py::handle h, Extra... extra) {
  AdapterRows adapters;
  const LoraGemvArgs a =
      multi_lora_gemv_args(x, weight, lora_A, lora_B, scalings, adapter_index, bias, y, h, adapters);
  released(kernel, a, adapters, native(extra)...);
}

}  // namespace ops

// Defines the four codec ops on m with the module's kernels; Extra: the types of the
// module's own trailing arguments, named by `names` (CUDA: uintptr_t, py::arg("stream")).
template <auto quantize_4bit_kernel, auto dequantize_4bit_kernel, auto quantize_blockwise_kernel,
          auto dequantize_blockwise_kernel, class... Extra, class... Names>
void def_codec_ops(py::module_& m, const Names&... names) {
  m.def("quantize_4bit", &ops::quantize_4bit<quantize_4bit_kernel, Extra...>, py::arg("A"),
        py::arg("blocksize"), py::arg("codec"), py::arg("packed"), py::arg("absmax"), names...,
        "packed[ceil(n/2)] u8, absmax[ceil(n/blocksize)] f32 <- A[n] (float32/16, bfloat16), "
        "encoded by codec (nf4lora.codebook.kernel_codec(format key))");
  m.def("dequantize_4bit", &ops::dequantize_4bit<dequantize_4bit_kernel, Extra...>,
        py::arg("weight"), py::arg("out"), names...,
        "out[weight.numel] <- weight (nf4lora._weight.PackedWeight) dequantized, in out's dtype");
  m.def("quantize_blockwise", &ops::quantize_blockwise<quantize_blockwise_kernel, Extra...>,
        py::arg("A"), py::arg("code"), py::arg("blocksize"), py::arg("q"), py::arg("absmax"),
        names..., "q[n] u8, absmax f32 <- A[n], with the sorted 256-entry f32 code");
  m.def("dequantize_blockwise", &ops::dequantize_blockwise<dequantize_blockwise_kernel, Extra...>,
        py::arg("q"), py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("out"),
        names..., "out[n] <- code[q] * absmax[i / blocksize], in out's dtype");
}

// Defines lora_gemv_4bit on m, as def_codec_ops (CUDA: also a workspace tensor).
template <auto kernel, class... Extra, class... Names>
void def_lora_gemv_4bit(py::module_& m, const Names&... names) {
  m.def("lora_gemv_4bit", &ops::lora_gemv_4bit<kernel, Extra...>, py::arg("x"), py::arg("weight"),
        py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"), py::arg("bias"), py::arg("y"),
        py::arg("h"), names...,
        "y[M,N] = x @ W^T + scaling * h @ lora_B^T + bias, h[M,rank] = x @ lora_A^T (W: weight, a "
        "PackedWeight [N, K]; lora_A/lora_B None: no LoRA; bias None: none)");
}

// Defines multi_lora_gemv_4bit on m, as def_lora_gemv_4bit.
template <auto kernel, class... Extra, class... Names>
void def_multi_lora_gemv_4bit(py::module_& m, const Names&... names) {
  m.def("multi_lora_gemv_4bit", &ops::multi_lora_gemv_4bit<kernel, Extra...>, py::arg("x"),
        py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scalings"),
        py::arg("adapter_index"), py::arg("bias"), py::arg("y"), py::arg("h"), names...,
        "lora_gemv_4bit with each row m of x its own adapter i = adapter_index[m] (int64 [M], -1: "
        "none) of lora_A [n, r, K], lora_B [n, N, r], scaled by scalings[i] (float32 [n]); h[M,r] "
        "each row's own (0 for -1)");
}

}  // namespace bindings
}  // namespace nf4lora
