"""Blockwise 8-bit quantization with a 256-entry code (the dynamic map), and its inverse.

Double quantization compresses the float32 4-bit absmax with these (blocksize 256):
spec `nf4lora.reference.quantize_blockwise` / `dequantize_blockwise`, bit for bit.
The quantizer shares the tile loading and scaling of the 4-bit quantizer (codec.py);
only the encoder differs: bitsandbytes' binary search instead of a threshold count.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codec import (absmax_and_scale, encode_dynamic, load_block_pairs, lookup_table,
                    to_output_dtype)

# Quantize: the binary search keeps pivot, lower, upper and the value live per element
# through 7 dependent gathers. 2048-element tiles over 8 warps = 8 elements per thread
# (16 for the 4096 blocksize, whose tile is one block) compile to 40-48 registers with
# no spills on sm_80/sm_90. At 4 warps x 1024 or 16 warps x 4096, ptxas squeezed to 32
# registers and spilled 8 bytes (measured with compile_report).
QUANTIZE_ELEMENTS_PER_PROGRAM = 2048
QUANTIZE_NUM_WARPS = 8
# Dequantize: 2048 codes per program over 4 warps = 16 per thread (one 16-byte load).
DEQUANTIZE_ELEMENTS_PER_PROGRAM = 2048
DEQUANTIZE_NUM_WARPS = 4
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_TYPES = ("fp32", "fp16", "bf16")


@triton.jit
def quantize_blockwise_kernel(
    # pointers
    x_ptr,        # fp32/fp16/bf16 [n], flat
    code_ptr,     # fp32 [256], sorted ascending
    codes_ptr,    # uint8 [n]
    absmax_ptr,   # fp32 [ceil(n / BLOCKSIZE)]
    # sizes
    n,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    first_block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
    x, offsets = load_block_pairs(x_ptr, n, first_block, BLOCKS_PER_PROGRAM, BLOCKSIZE)
    absmax, scaled = absmax_and_scale(x)
    first_element = first_block * BLOCKSIZE
    tl.store(codes_ptr + first_element + offsets, encode_dynamic(scaled, code_ptr),
             mask=offsets < n - first_element)

    block_offsets = tl.arange(0, BLOCKS_PER_PROGRAM)
    num_blocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    tl.store(absmax_ptr + first_block + block_offsets, absmax,
             mask=block_offsets < num_blocks - first_block)


@triton.jit(do_not_specialize=["blocksize_log2"])  # a shift: one binary for all
def dequantize_blockwise_kernel(
    # pointers
    codes_ptr,    # uint8 [n]
    absmax_ptr,   # fp32 [ceil(n / blocksize)]
    code_ptr,     # fp32 [256]
    out_ptr,      # fp32/fp16/bf16 [n]
    # sizes
    n,
    blocksize_log2,   # blocksizes are powers of 2: a shift, not an integer division
    # meta-parameters
    ELEMENTS_PER_PROGRAM: tl.constexpr,
):
    """out = code[q] * absmax[i >> log2(blocksize)], float32, rounded once to out's dtype."""
    first_element = tl.program_id(0).to(tl.int64) * ELEMENTS_PER_PROGRAM
    offsets = tl.arange(0, ELEMENTS_PER_PROGRAM)
    in_range = offsets < n - first_element
    q = tl.load(codes_ptr + first_element + offsets, mask=in_range, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + ((first_element + offsets) >> blocksize_log2),
                     mask=in_range, other=0.0)
    out = to_output_dtype(lookup_table(code_ptr, q) * absmax, out_ptr.dtype.element_ty)
    tl.store(out_ptr + first_element + offsets, out, mask=in_range)


def quantize_launch_config(blocksize: int) -> dict:
    elements = max(blocksize, QUANTIZE_ELEMENTS_PER_PROGRAM)
    return dict(BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=elements // blocksize,
                num_warps=QUANTIZE_NUM_WARPS)


def quantize_grid(n: int, config: dict) -> tuple:
    return (triton.cdiv(n, config["BLOCKS_PER_PROGRAM"] * config["BLOCKSIZE"]),)


def dequantize_launch_config() -> dict:
    return dict(ELEMENTS_PER_PROGRAM=DEQUANTIZE_ELEMENTS_PER_PROGRAM,
                num_warps=DEQUANTIZE_NUM_WARPS)


def dequantize_grid(n: int, config: dict) -> tuple:
    return (triton.cdiv(n, config["ELEMENTS_PER_PROGRAM"]),)


def quantize_compile_targets():
    for x_type in FLOAT_TYPES:
        for blocksize in BLOCKSIZES:
            signature = {"x_ptr": f"*{x_type}", "code_ptr": "*fp32", "codes_ptr": "*u8",
                         "absmax_ptr": "*fp32", "n": "i32"}
            yield f"x={x_type} bs={blocksize}", signature, quantize_launch_config(blocksize)


def dequantize_compile_targets():
    for out_type in FLOAT_TYPES:
        signature = {"codes_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                     "out_ptr": f"*{out_type}", "n": "i32", "blocksize_log2": "i32"}
        yield f"out={out_type}", signature, dequantize_launch_config()
