"""The C++ CPU backend: launch glue for `nf4lora._C` (csrc/cpu).

The kernels take raw addresses (`tensor.data_ptr()`), element counts and dtype ids, and
run with the GIL released, OpenMP across blocks, on the best SIMD path the CPU has
(`nf4lora._C.isa()`; the environment variable NF4LORA_CPU_ISA=scalar|avx2|avx512 forces
one; `nf4lora._C.supported_isas()` lists what the CPU can run). Threads:
`nf4lora._C.set_num_threads(k)`, default torch's/OpenMP's thread count. Callers
(nf4lora._ops) have validated dtypes, sizes and devices; here only cheap asserts guard
what would otherwise read or write out of bounds.
"""
from __future__ import annotations

import torch

from ..codebook import QUANT_TYPES

DEVICE_TYPES = ("cpu",)

try:
    from .. import _C
    _IMPORT_ERROR: str | None = None
except ImportError as error:  # not built: `pip install -e .` builds it
    _C = None
    _IMPORT_ERROR = f"the C++ extension nf4lora._C is not importable ({error}); build it with `pip install -e .`"

_DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_QUANT_TYPE_IDS = {name: i for i, name in enumerate(QUANT_TYPES)}  # nf4 0, fp4 1


def availability() -> str | None:
    return _IMPORT_ERROR


def _blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def _check_input(t: torch.Tensor, name: str) -> None:
    assert t.device.type == "cpu", f"{name} must be a CPU tensor, got {t.device}"
    assert t.is_contiguous(), f"{name} must be contiguous"


def quantize_4bit(A, blocksize, quant_type):
    _check_input(A, "A")
    n = A.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(_blocks(n, blocksize), dtype=torch.float32)
    _C.quantize_4bit(A.data_ptr(), _DTYPE_IDS[A.dtype], n, blocksize,
                     _QUANT_TYPE_IDS[quant_type], packed.data_ptr(), absmax.data_ptr())
    return packed, absmax


def dequantize_4bit(packed, absmax, blocksize, quant_type, out, nested):
    n = out.numel()
    blocks = _blocks(n, blocksize)
    _check_input(packed, "packed")
    _check_input(absmax, "absmax")
    _check_input(out, "out")
    assert packed.dtype == torch.uint8 and packed.numel() >= (n + 1) // 2, "packed too small"
    qt, out_dtype = _QUANT_TYPE_IDS[quant_type], _DTYPE_IDS[out.dtype]
    if nested is None:
        assert absmax.dtype == torch.float32 and absmax.numel() >= blocks, "absmax: f32 [blocks]"
        _C.dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), n, blocksize, qt,
                           out.data_ptr(), out_dtype)
        return
    code = nested.code.float().contiguous()  # 256 entries: a no-op when already float32
    _check_input(nested.absmax, "nested.absmax")
    assert absmax.dtype == torch.uint8 and absmax.numel() >= blocks, "nested absmax: u8 [blocks]"
    assert nested.absmax.dtype == torch.float32
    assert nested.absmax.numel() >= _blocks(blocks, nested.blocksize), "nested.absmax too small"
    assert code.numel() == 256, "nested.code must have 256 entries"
    _C.dequantize_4bit_nested(packed.data_ptr(), absmax.data_ptr(), nested.absmax.data_ptr(),
                              code.data_ptr(), float(nested.offset), nested.blocksize, n,
                              blocksize, qt, out.data_ptr(), out_dtype)


def quantize_blockwise(A, code, blocksize):
    _check_input(A, "A")
    code = code.float().contiguous()
    assert code.numel() == 256, "code must have 256 entries"
    n = A.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(_blocks(n, blocksize), dtype=torch.float32)
    _C.quantize_blockwise(A.data_ptr(), _DTYPE_IDS[A.dtype], code.data_ptr(), n, blocksize,
                          codes.data_ptr(), absmax.data_ptr())
    return codes, absmax


def dequantize_blockwise(codes, absmax, code, blocksize, out):
    n = out.numel()
    _check_input(codes, "codes")
    _check_input(absmax, "absmax")
    _check_input(out, "out")
    code = code.float().contiguous()
    assert codes.dtype == torch.uint8 and codes.numel() >= n, "codes: u8 [n]"
    assert absmax.dtype == torch.float32 and absmax.numel() >= _blocks(n, blocksize)
    assert code.numel() == 256, "code must have 256 entries"
    _C.dequantize_blockwise(codes.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize,
                            out.data_ptr(), _DTYPE_IDS[out.dtype])
