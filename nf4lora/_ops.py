"""The op registry: every nf4lora op declared once with torch.library.

Each op has a schema (from the type hints), a fake function (shapes only, so
torch.compile traces it as one graph node) and one implementation that checks its
arguments and hands them to the backend chosen for the tensor's device
(`nf4lora.backends`). Checks live here, at the one door every caller goes through,
because the native kernels take raw pointers and trust their sizes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .backends import NestedAbsmax, backend_for
from .codebook import QUANT_TYPES
from .quant_state import BLOCKSIZES, FLOAT_DTYPES


def packed_bytes(n) -> int:
    """Bytes holding n 4-bit codes (two per byte, an odd tail padded)."""
    return (n + 1) // 2


def blocks_of(n, blocksize: int):
    return (n + blocksize - 1) // blocksize


def _check(condition: bool, error: type, message: str) -> None:
    if not condition:
        raise error(message)


def check_quant_args(blocksize: int, quant_type: str) -> None:
    _check(blocksize in BLOCKSIZES, ValueError,
           f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    _check(quant_type in QUANT_TYPES, ValueError,
           f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_float(name: str, tensor: Tensor) -> None:
    _check(isinstance(tensor, Tensor), TypeError, f"{name} must be a tensor, got {type(tensor).__name__}")
    _check(tensor.dtype in FLOAT_DTYPES, ValueError,
           f"{name} must be one of {FLOAT_DTYPES}, got {tensor.dtype}")


def _check_tensor(name: str, tensor: Tensor, dtype: torch.dtype, numel: int, device) -> None:
    _check(isinstance(tensor, Tensor), TypeError, f"{name} must be a tensor, got {type(tensor).__name__}")
    _check(tensor.dtype == dtype, ValueError, f"{name} must be {dtype}, got {tensor.dtype}")
    _check(tensor.numel() == numel, ValueError,
           f"{name} must have {numel} elements, got {tensor.numel()} (shape {tuple(tensor.shape)})")
    _check(tensor.device == device, ValueError, f"{name} is on {tensor.device}, expected {device}")


def _nested(absmax: Tensor, blocks: int, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
            nested_offset: Optional[Tensor], nested_blocksize: int, device) -> Optional[NestedAbsmax]:
    """Check the absmax arguments and bundle the double-quantization level, if any.

    The offset travels as a 0-d tensor, not a float, so that torch.compile can trace
    callers without reading its value (a graph break)."""
    if nested_absmax is None:
        _check(nested_code is None and nested_offset is None, ValueError,
               "nested_code/nested_offset given without nested_absmax")
        _check_tensor("absmax", absmax, torch.float32, blocks, device)
        return None
    _check(nested_code is not None and nested_offset is not None, ValueError,
           "nested_absmax needs nested_code and nested_offset")
    _check(nested_blocksize > 0, ValueError, f"nested_blocksize must be positive, got {nested_blocksize}")
    _check_tensor("absmax (8-bit codes when nested)", absmax, torch.uint8, blocks, device)
    _check_tensor("nested_absmax", nested_absmax, torch.float32, blocks_of(blocks, nested_blocksize), device)
    _check_tensor("nested_code", nested_code, torch.float32, 256, device)
    _check(nested_offset.numel() == 1, ValueError,
           f"nested_offset must hold one value, got shape {tuple(nested_offset.shape)}")
    offset = float(nested_offset)
    _check(math.isfinite(offset), ValueError, f"nested_offset must be finite, got {offset}")
    return NestedAbsmax(nested_absmax.contiguous(), nested_code.contiguous(), offset, nested_blocksize)


@torch.library.custom_op("nf4lora::quantize_4bit", mutates_args=())
def quantize_4bit(A: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """-> (packed uint8 [ceil(n/2)], absmax float32 [ceil(n/blocksize)])."""
    check_float("A", A)
    check_quant_args(blocksize, quant_type)
    return backend_for(A.device).quantize_4bit(A.contiguous(), blocksize, quant_type)


@quantize_4bit.register_fake
def _(A, blocksize, quant_type):
    n = A.numel()
    return (A.new_empty((packed_bytes(n),), dtype=torch.uint8),
            A.new_empty((blocks_of(n, blocksize),), dtype=torch.float32))


def _dequantize_4bit_into(out: Tensor, A: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                          nested_absmax, nested_code, nested_offset, nested_blocksize) -> None:
    check_quant_args(blocksize, quant_type)
    check_float("out", out)
    _check(out.is_contiguous(), ValueError, "out must be contiguous")
    n = out.numel()
    _check(A.dtype == torch.uint8, ValueError, f"A (packed codes) must be uint8, got {A.dtype}")
    _check(A.numel() >= packed_bytes(n), ValueError,
           f"A holds {A.numel()} bytes, fewer than the {packed_bytes(n)} that {n} 4-bit codes need")
    nested = _nested(absmax, blocks_of(n, blocksize), nested_absmax, nested_code,
                     nested_offset, nested_blocksize, out.device)
    backend_for(out.device).dequantize_4bit(A.contiguous().reshape(-1), absmax.contiguous(), blocksize,
                                           quant_type, out, nested)


@torch.library.custom_op("nf4lora::dequantize_4bit", mutates_args=())
def dequantize_4bit(A: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape: list[int],
                    dtype: torch.dtype, nested_absmax: Optional[Tensor] = None,
                    nested_code: Optional[Tensor] = None, nested_offset: Optional[Tensor] = None,
                    nested_blocksize: int = 256) -> Tensor:
    """table[code] * absmax, to `dtype` and `shape`. With nested_*, absmax holds uint8 codes
    and is decoded first as nested_code[q] * nested_absmax[i // nested_blocksize] + nested_offset."""
    _check(dtype in FLOAT_DTYPES, ValueError, f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    out = torch.empty(shape, dtype=dtype, device=A.device)
    _dequantize_4bit_into(out, A, absmax, blocksize, quant_type, nested_absmax, nested_code,
                          nested_offset, nested_blocksize)
    return out


@dequantize_4bit.register_fake
def _(A, absmax, blocksize, quant_type, shape, dtype, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256):
    return A.new_empty(shape, dtype=dtype)


@torch.library.custom_op("nf4lora::dequantize_4bit_out", mutates_args=("out",))
def dequantize_4bit_out(A: Tensor, absmax: Tensor, blocksize: int, quant_type: str, out: Tensor,
                        nested_absmax: Optional[Tensor] = None, nested_code: Optional[Tensor] = None,
                        nested_offset: Optional[Tensor] = None, nested_blocksize: int = 256) -> None:
    """dequantize_4bit into an existing contiguous tensor (its shape and dtype are the output's)."""
    _dequantize_4bit_into(out, A, absmax, blocksize, quant_type, nested_absmax, nested_code,
                          nested_offset, nested_blocksize)


@dequantize_4bit_out.register_fake
def _(A, absmax, blocksize, quant_type, out, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256):
    return None


def _check_code(code: Tensor, device) -> None:
    _check_tensor("code", code, torch.float32, 256, device)


@torch.library.custom_op("nf4lora::quantize_blockwise", mutates_args=())
def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit: -> (codes uint8 [n], absmax float32 [ceil(n/blocksize)])."""
    check_float("A", A)
    _check_code(code, A.device)
    _check(blocksize > 0, ValueError, f"blocksize must be positive, got {blocksize}")
    codes, absmax = backend_for(A.device).quantize_blockwise(A.contiguous(), code.contiguous(), blocksize)
    return codes.reshape(A.shape), absmax


@quantize_blockwise.register_fake
def _(A, code, blocksize):
    n = A.numel()
    return (A.new_empty(A.shape, dtype=torch.uint8),
            A.new_empty((blocks_of(n, blocksize),), dtype=torch.float32))


@torch.library.custom_op("nf4lora::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
                         dtype: torch.dtype) -> Tensor:
    """8-bit: code[q] * absmax[block], to `dtype`, in A's shape."""
    _check(A.dtype == torch.uint8, ValueError, f"A (8-bit codes) must be uint8, got {A.dtype}")
    _check(dtype in FLOAT_DTYPES, ValueError, f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    _check(blocksize > 0, ValueError, f"blocksize must be positive, got {blocksize}")
    _check_code(code, A.device)
    _check_tensor("absmax", absmax, torch.float32, blocks_of(A.numel(), blocksize), A.device)
    out = torch.empty(A.shape, dtype=dtype, device=A.device)
    backend_for(A.device).dequantize_blockwise(A.contiguous(), absmax.contiguous(), code.contiguous(),
                                               blocksize, out)
    return out


@dequantize_blockwise.register_fake
def _(A, absmax, code, blocksize, dtype):
    return A.new_empty(A.shape, dtype=dtype)
