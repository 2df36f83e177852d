"""Blockwise 4-bit (NF4/FP4) quantization: x -> (packed uint8 [ceil(n/2)], absmax f32 [blocks]).

Spec: `nf4lora.reference.quantize_4bit`; the bytes are identical. One program owns
BLOCKS_PER_PROGRAM whole quantization blocks as a [BLOCKS, BLOCKSIZE / 2, 2] tile (the
trailing 2 is one packed byte's pair), so the absmax reduction stays inside the program
and each packed byte is written once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codec import (ENCODINGS, NUM_THRESHOLDS, absmax_and_scale, encode_4bit,
                    load_block_pairs, pack_nibbles)

# Elements per program. 4096 is the largest blocksize, so every blocksize fits whole
# blocks; a 4096x4096 weight then has 4096 programs, about 38 per SM on a 108-SM A100,
# enough to hide load latency. Smaller tiles would only add programs.
ELEMENTS_PER_PROGRAM = 4096
# 8 warps = 256 threads hold the 4096-element tile as 16 floats per thread (the encode
# keeps a float and an int32 code per element); 4 warps would need 32 each.
NUM_WARPS = 8
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


# fp4_magnitude_codes is a table, not a size: its divisibility by 16 means nothing.
@triton.jit(do_not_specialize=["fp4_magnitude_codes"])
def quantize_4bit_kernel(
    # pointers
    x_ptr,            # fp32/fp16/bf16 [n], flat
    packed_ptr,       # uint8 [ceil(n / 2)]
    absmax_ptr,       # fp32 [ceil(n / BLOCKSIZE)]
    # the format (codec.ENCODINGS)
    thresholds,           # tuple of float32, ascending: NUM_THRESHOLDS[encoding] of them
    fp4_magnitude_codes,  # int32, codec.pack_fp4_magnitude_codes (ENCODING fp4 only)
    # sizes
    n,
    num_bytes,        # ceil(n / 2), its own argument so Triton can see it divisible by 16
    # meta-parameters
    ENCODING: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    # int64: pid * 4096 overflows int32 past 2**31 elements (a 4 GiB bf16 tensor).
    first_block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
    x, _ = load_block_pairs(x_ptr, n, first_block, BLOCKS_PER_PROGRAM, BLOCKSIZE)
    absmax, scaled = absmax_and_scale(x)

    # Padding past n was loaded as 0.0 and is encoded with its block's scale, so for
    # odd n the last byte's low nibble is the reference's padding code.
    packed = pack_nibbles(encode_4bit(scaled, thresholds, fp4_magnitude_codes, ENCODING))
    first_byte = first_block * (BLOCKSIZE // 2)
    byte_offsets = (tl.arange(0, BLOCKS_PER_PROGRAM)[:, None] * (BLOCKSIZE // 2)
                    + tl.arange(0, BLOCKSIZE // 2)[None, :])
    tl.store(packed_ptr + first_byte + byte_offsets, packed,
             mask=byte_offsets < num_bytes - first_byte)

    block_offsets = tl.arange(0, BLOCKS_PER_PROGRAM)
    num_blocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    tl.store(absmax_ptr + first_block + block_offsets, absmax,
             mask=block_offsets < num_blocks - first_block)


def launch_config(blocksize: int, encoding: str) -> dict:
    """The constexprs and launch options the launcher uses for one call; encoding is a
    key of codec.ENCODINGS."""
    return dict(ENCODING=ENCODINGS[encoding], BLOCKSIZE=blocksize,
                BLOCKS_PER_PROGRAM=max(1, ELEMENTS_PER_PROGRAM // blocksize),
                num_warps=NUM_WARPS)


def grid(n: int, config: dict) -> tuple:
    return (triton.cdiv(n, config["BLOCKS_PER_PROGRAM"] * config["BLOCKSIZE"]),)


def compile_targets():
    """Every (signature, config) the launcher can choose, for the compile report."""
    for encoding in ENCODINGS:
        for x_type in ("fp32", "fp16", "bf16"):
            for blocksize in BLOCKSIZES:
                signature = {"x_ptr": f"*{x_type}", "packed_ptr": "*u8", "absmax_ptr": "*fp32",
                             "thresholds": ("fp32",) * NUM_THRESHOLDS[encoding],
                             "fp4_magnitude_codes": "i32", "n": "i32", "num_bytes": "i32"}
                label = f"{encoding} x={x_type} bs={blocksize}"
                yield label, signature, launch_config(blocksize, encoding)
