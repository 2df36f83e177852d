"""The reference backend: `nf4lora.reference` (the spec) behind the backend interface.

It would also run a 4-bit code book the chosen backend's kernels did not take (see
takes_format in nf4lora/backends/__init__.py; today every backend takes every format); its
table comes from the weight's format key (nf4lora.codebook.table)."""
from __future__ import annotations

from .. import reference

DEVICE_TYPES = ("cpu", "cuda")


def takes_format(quant_type: str) -> bool:
    return True   # the spec reads any table from its format key


def availability() -> str | None:
    return None


def quantize_4bit(A, blocksize, quant_type):
    return reference.quantize_4bit(A, blocksize, quant_type)


def dequantize_4bit(weight, out):
    absmax = weight.absmax
    if weight.nested is not None:
        nested = weight.nested
        absmax = reference.dequantize_absmax(absmax, nested.absmax, nested.code, nested.offset,
                                             nested.blocksize)
    out.copy_(reference.dequantize_4bit(weight.packed, absmax, weight.blocksize, weight.quant_type,
                                        out.shape, out.dtype))


def quantize_blockwise(A, code, blocksize):
    return reference.quantize_blockwise(A, code, blocksize)


def dequantize_blockwise(codes, absmax, code, blocksize, out):
    out.copy_(reference.dequantize_blockwise(codes, absmax, code, blocksize, out.dtype)
              .reshape(out.shape))
