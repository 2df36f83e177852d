"""Blockwise 4-bit (NF4/FP4) dequantization, the nested absmax decoded in the same kernel.

Spec: `nf4lora.reference.dequantize_4bit` (and `dequantize_absmax` when NESTED):
out = table[code] * absmax[block], float32, rounded once to the output dtype, where
absmax is either stored float32 or, with double quantization, decoded per byte as
code2[q] * absmax2[block >> log2(256)] + offset (two roundings). One kernel serves both
through the NESTED constexpr; the unused pointers are never read.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codec import decode_nested_absmax, lookup_table, to_output_dtype, unpack_nibbles

# Packed bytes per program: 1024 bytes -> 2048 outputs, the same 8 bytes (16 outputs)
# per thread as bitsandbytes' kDequantizeBlockwise, here with 4 warps = 128 threads.
# A 4096x4096 weight gets 8192 programs, about 76 per SM on a 108-SM A100.
BYTES_PER_PROGRAM = 1024
NUM_WARPS = 4
OUT_TYPES = ("fp32", "fp16", "bf16")


# The shifts gain nothing from Triton's divisible-by-16 specialization: one binary for all.
@triton.jit(do_not_specialize=["blocksize_log2", "nested_blocksize_log2"])
def dequantize_4bit_kernel(
    # pointers
    packed_ptr,         # uint8 [ceil(n / 2)]
    absmax_ptr,         # fp32 [blocks], or uint8 codes [blocks] when NESTED
    table_ptr,          # fp32 [16], the 4-bit code book
    nested_code_ptr,    # fp32 [256] (NESTED only)
    nested_absmax_ptr,  # fp32 [ceil(blocks / nested blocksize)] (NESTED only)
    out_ptr,            # fp32/fp16/bf16 [n]
    # sizes
    n,
    num_bytes,              # ceil(n / 2), its own argument so Triton can see it divisible by 16
    blocksize_log2,         # blocksizes are powers of 2: a shift, not an integer division
    nested_blocksize_log2,
    nested_offset,          # fp32 scalar (NESTED only)
    # meta-parameters
    NESTED: tl.constexpr,
    BYTES_PER_PROGRAM: tl.constexpr,
):
    first_byte = tl.program_id(0).to(tl.int64) * BYTES_PER_PROGRAM
    byte_offsets = tl.arange(0, BYTES_PER_PROGRAM)
    byte_in_range = byte_offsets < num_bytes - first_byte
    packed = tl.load(packed_ptr + first_byte + byte_offsets, mask=byte_in_range, other=0)
    # Both elements of a byte share a block (blocksizes are even): one absmax per byte.
    block_index = (first_byte + byte_offsets) >> (blocksize_log2 - 1)
    if NESTED:
        absmax = decode_nested_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                                      nested_offset, block_index, nested_blocksize_log2,
                                      byte_in_range)
    else:
        absmax = tl.load(absmax_ptr + block_index, mask=byte_in_range, other=0.0)

    # [BYTES, 2]: each byte's two outputs side by side (register-only unpack), then
    # flattened so the store sees 2048 contiguous elements and writes 16-byte vectors;
    # that one layout change is the kernel's 2-4 KB of shared memory.
    values = lookup_table(table_ptr, unpack_nibbles(packed))
    out = to_output_dtype(values * absmax[:, None], out_ptr.dtype.element_ty)
    out = tl.reshape(out, [2 * BYTES_PER_PROGRAM])

    first_element = 2 * first_byte
    element_offsets = tl.arange(0, 2 * BYTES_PER_PROGRAM)
    tl.store(out_ptr + first_element + element_offsets, out,
             mask=element_offsets < n - first_element)


def launch_config(nested: bool) -> dict:
    return dict(NESTED=nested, BYTES_PER_PROGRAM=BYTES_PER_PROGRAM, num_warps=NUM_WARPS)


def grid(n: int, config: dict) -> tuple:
    return (triton.cdiv(triton.cdiv(n, 2), config["BYTES_PER_PROGRAM"]),)


def compile_targets():
    """Every (signature, config) the launcher can choose, for the compile report.

    NF4 and FP4 share one binary: the code book is data (table_ptr), and the blocksize
    a runtime shift, so the variants are nested x output dtype.
    """
    for nested in (False, True):
        for out_type in OUT_TYPES:
            signature = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
                         "table_ptr": "*fp32", "nested_code_ptr": "*fp32",
                         "nested_absmax_ptr": "*fp32", "out_ptr": f"*{out_type}",
                         "n": "i32", "num_bytes": "i32", "blocksize_log2": "i32",
                         "nested_blocksize_log2": "i32", "nested_offset": "fp32"}
            yield f"nested={nested} out={out_type}", signature, launch_config(nested)
