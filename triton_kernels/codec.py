"""The per-element math of the format, as `@triton.jit` helpers shared by every kernel.

Each helper mirrors one function of `nf4lora.reference` operation for operation, so a
kernel built from them is bit-exact with the spec:

  load_block_pairs     reference._as_padded_blocks
  absmax_and_scale     reference._scale_blocks   max|x| per block, x * (1 / absmax)
  encode_4bit          reference.encode_nf4/_fp4 count of thresholds strictly below x
  pack_nibbles         reference.pack_nibbles    first code of a pair in the high nibble
  unpack_nibbles       reference.unpack_nibbles
  lookup_table         table[code]
  encode_dynamic       reference.encode_dynamic  7-step binary search + midpoint rule
  decode_nested_absmax reference.dequantize_absmax  code2[q] * absmax2 + offset, unfused
  to_output_dtype      `.to(dtype)`              one round-to-nearest-even from float32
  to_float32           `.float()`                exact widening of the input

This package imports nothing from nf4lora (nf4lora imports it): every table and
threshold of a format is data the launcher (nf4lora.backends.triton) passes in, the
4-bit and 8-bit code books as pointers, the encoder's thresholds as scalar arguments.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton decides interpreter-or-compiler when `@triton.jit` runs, i.e. at this module's
# import; read the same variable at the same moment so the two always agree.
# Triton's own @jit library functions (tl.zeros, tl.sum, tl.max, tl.cdiv, ...) were
# decided when triton was first imported: if that came before TRITON_INTERPRET=1 (pytest's
# conftest imports bitsandbytes, which imports triton), the interpreter cannot call them
# ("Cannot call @triton.jit'd outside of the scope of a kernel"). The helpers here use
# builtins only (tl.full, tl.reduce with our combine function).
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# How a 4-bit encoder turns a scaled value into a code, as named kernel modes (constexpr),
# never bare ints at call sites. Each takes its thresholds as data: `thresholds`, a tuple of
# float32 scalar kernel arguments, which the compares read from the kernel's parameter
# space, no load (as many SASS instructions as with the thresholds as immediates):
#   MIDPOINTS  a table of 16 ascending levels (NF4): the code is the number of its 15
#              midpoints strictly below x.
#   FP4        bitsandbytes' FP4: |x| against 7 thresholds gives a rank, `fp4_magnitude_codes`
#              the 3-bit magnitude code of each rank, and bit 3 is the sign.
ENCODE_MIDPOINTS = tl.constexpr(0)
ENCODE_FP4 = tl.constexpr(1)
ENCODINGS = {"midpoints": ENCODE_MIDPOINTS.value, "fp4": ENCODE_FP4.value}
NUM_THRESHOLDS = {"midpoints": 15, "fp4": 7}
FP4_SIGN_BIT = tl.constexpr(0b1000)
# fp4_magnitude_codes holds the code of rank r in bits 4r..4r+3 (8 ranks in one int32):
# a register-held table, one shift and one mask per element.
FP4_BITS_PER_RANK = tl.constexpr(4)


def pack_fp4_magnitude_codes(code_by_rank) -> int:
    """The `fp4_magnitude_codes` kernel argument holding a rank -> magnitude code table."""
    return sum(code << (FP4_BITS_PER_RANK.value * rank) for rank, code in enumerate(code_by_rank))


# The dynamic 8-bit map has 256 sorted entries; bitsandbytes' search starts at the
# middle (127) and halves its step 64, 32, ..., 1: seven steps, log2(128).
DYNAMIC_SEARCH_START = tl.constexpr(127)
DYNAMIC_SEARCH_STEPS = tl.constexpr(7)


@triton.jit
def _maximum_propagating_nan(a, b):
    # The default max (PTX max.f32) returns the non-NaN operand; max.NaN.f32 keeps it,
    # so a NaN anywhere in a block reaches absmax as it does in torch.amax.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def absmax_and_scale(x):
    """x: float32 [BLOCKS, BLOCKSIZE // 2, 2], padding already 0. Returns (absmax
    [BLOCKS], scaled, shaped like x) with scaled = x * (1 / absmax).

    The reciprocal is an IEEE division (div.rn.f32, not the approximate div.full.f32),
    then one multiply per element: the reference's two roundings. An all-zero block
    gives 1/0 = inf and 0 * inf = NaN, which the encoders map to code 0 (CUDA semantics).
    """
    absmax = tl.reduce(tl.reduce(tl.abs(x), 2, _maximum_propagating_nan), 1,
                       _maximum_propagating_nan)
    reciprocal = tl.math.div_rn(1.0, absmax)
    return absmax, x * reciprocal[:, None, None]


@triton.jit
def _rank(value, thresholds):
    """How many of the ascending `thresholds` lie strictly below `value` (int32). `value > t`
    is false for NaN and for a value exactly on t: NaN gets rank 0 and a tie stays with
    the lower rank, as in the reference's `(x > thresholds).sum()`."""
    rank = tl.full(value.shape, 0, tl.int32)
    for i in tl.static_range(len(thresholds)):
        rank += (value > thresholds[i]).to(tl.int32)
    return rank


@triton.jit
def encode_4bit(scaled, thresholds, fp4_magnitude_codes, ENCODING: tl.constexpr):
    """int32 4-bit codes of float32 values scaled into [-1, 1] (NaN -> 0); see ENCODINGS."""
    if ENCODING == ENCODE_MIDPOINTS:
        code = _rank(scaled, thresholds)
    else:
        rank = _rank(tl.abs(scaled), thresholds)
        magnitude = (fp4_magnitude_codes >> (rank * FP4_BITS_PER_RANK)) & 0b111
        # -0.0 and NaN are not below zero, so their sign bit stays clear.
        code = magnitude | tl.where(scaled < 0, FP4_SIGN_BIT, 0)
    return code


@triton.jit
def pack_nibbles(code_pairs):
    """int32 codes [..., 2] (element 2j, element 2j+1) -> uint8 [...], 2j in the high nibble.

    Tiles keep each byte's two elements in a trailing dimension of 2 that one thread
    holds, so splitting and joining pairs is free; flattening instead would move the
    tile through shared memory (8 KB per program, measured on the compile report).
    """
    high, low = tl.split(code_pairs)
    return ((high << 4) | low).to(tl.uint8)


@triton.jit
def unpack_nibbles(packed):
    """uint8 [...] -> int32 codes [..., 2], the high nibble (the earlier element) first."""
    packed = packed.to(tl.int32)
    return tl.join(packed >> 4, packed & 0x0F)


@triton.jit
def lookup_table(table_ptr, codes):
    """table[code] from a float32 code table in global memory, every code in range
    (4-bit codes into the 16-entry table, 8-bit codes into the 256-entry dynamic map).

    The 4-bit table is 64 bytes, one cache line, so a warp's 32 lookups are one L1 wavefront;
    a register select tree would cost 15 selects per element instead. Compiled, the
    gather is inline `ld.global.nc.f32` rather than tl.load: Triton gives each tl.load
    its own coalesced layout, and for this gather it chose one element per thread, so
    the dequantize kernel moved the [1024, 2] tensor of 8-byte addresses through shared
    memory and back (4 KB scratch; compile_report). Inline asm is elementwise and keeps
    the codes' layout. The codes are in range by construction, so no mask, and the table
    is read-only while the kernel runs (.nc).
    """
    if INTERPRETING:
        values = tl.load(table_ptr + codes)
    else:
        addresses = (table_ptr + codes).to(tl.int64, bitcast=True)
        values = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [addresses],
                                           dtype=tl.float32, is_pure=True, pack=1)
    return values


@triton.jit
def encode_dynamic(scaled, code_ptr):
    """uint8 index of the nearest entry of a sorted 256-entry code, bitsandbytes' CUDA
    dQuantize step for step (see reference.encode_dynamic): NaN ends at index 0, a value
    exactly on a midpoint goes to the final pivot.

    The reference carries `lower` (the last pivot the search moved up from) and `upper`
    (the last it moved down from); here both follow from the final pivot p. After the
    last up-move, from q by step s, every move is down by s/2, s/4, ..., 1, which sums
    to s - 1, so p = q + 1: lower = p - 1; likewise upper = p + 1. With no up-move the
    search went down to p = 0 and lower kept its start 0; with no down-move it ended at
    p = 254 and upper kept 255 = p + 1. So lower = max(p - 1, 0), upper = p + 1 (the
    tests compare every code value and midpoint). Not carrying them saves two registers
    per element: with them, ptxas held the 8-bit quantizer at 32 registers and spilled
    8 bytes on sm_90 (compile_report --all-sizes).
    """
    pivot = tl.full(scaled.shape, DYNAMIC_SEARCH_START, tl.int32)
    for i in tl.static_range(DYNAMIC_SEARCH_STEPS):
        step = (DYNAMIC_SEARCH_START + 1) >> (i + 1)  # 64, 32, ..., 1
        up = scaled > lookup_table(code_ptr, pivot)
        pivot = tl.where(up, pivot + step, pivot - step)
    lower = tl.maximum(pivot - 1, 0)
    upper = pivot + 1
    value = lookup_table(code_ptr, pivot)
    toward_upper = scaled > (lookup_table(code_ptr, upper) + value) * 0.5
    toward_lower = scaled < (lookup_table(code_ptr, lower) + value) * 0.5
    index = tl.where(scaled > value, tl.where(toward_upper, upper, pivot),
                     tl.where(toward_lower, lower, pivot))
    return index.to(tl.uint8)


@triton.jit
def multiply_add_unfused(a, b, c):
    """a * b + c in float32 with two roundings, never one fused multiply-add.

    With Triton's default enable_fp_fusion=True, `a * b + c` compiles to fma.rn.f32
    (checked: sm_80 and sm_90 PTX), which rounds once and differs from the reference in
    the last bit. PTX mul/add with an explicit .rn are never contracted by ptxas, and
    inline asm is opaque to LLVM; neither carries .ftz, so denormals survive. The
    interpreter runs numpy, which never fuses, and cannot run inline asm.
    """
    if INTERPRETING:
        result = a * b + c
    else:
        result = tl.inline_asm_elementwise(
            "{ .reg .f32 product; mul.rn.f32 product, $1, $2; add.rn.f32 $0, product, $3; }",
            "=r,r,r,r", [a, b, c], dtype=tl.float32, is_pure=True, pack=1)
    return result


@triton.jit
def decode_nested_absmax(qabsmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
                         block_index, nested_blocksize_log2, mask):
    """absmax[i] = code2[q[i]] * absmax2[i >> log2(nested blocksize)] + offset, float32,
    two roundings in this order (reference.dequantize_absmax); 0 + offset where masked."""
    q = tl.load(qabsmax_ptr + block_index, mask=mask, other=0).to(tl.int32)
    nested_absmax = tl.load(nested_absmax_ptr + (block_index >> nested_blocksize_log2),
                            mask=mask, other=0.0)
    return multiply_add_unfused(lookup_table(nested_code_ptr, q), nested_absmax, nested_offset)


@triton.jit
def to_output_dtype(value, OUT_DTYPE: tl.constexpr):
    """float32 -> OUT_DTYPE, rounded once to nearest even (torch's `.to(dtype)`).

    Compiled, this is one cvt.rn instruction. Triton 3.9's interpreter truncates
    float32 -> bfloat16 instead (interpreter.py cast_impl passes no rounding mode), so
    there the rounding is done on the bits: add 0x7FFF plus the lowest kept bit, keep the
    high half; a carry rolls into the exponent, and past the largest bfloat16 into inf,
    as RTNE should. NaN is mapped to torch's quiet NaN 0x7FC0 (the +0x7FFF could carry a
    NaN's payload into the sign).
    """
    if INTERPRETING and OUT_DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)
        result = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = value.to(OUT_DTYPE)
    return result


@triton.jit
def to_float32(value):
    """fp32/fp16/bf16 -> float32, exact. Triton 3.9's interpreter mangles bfloat16
    denormals on the way up (its bit-level converter renormalizes them wrongly), so
    there a bfloat16 becomes the high half of a float32's bits, which is exact for every
    value including denormals, Inf and NaN. Compiled, it is the native conversion."""
    if INTERPRETING and value.dtype == tl.bfloat16:
        bits = value.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        result = bits.to(tl.float32, bitcast=True)
    else:
        result = value.to(tl.float32)
    return result


@triton.jit
def load_block_pairs(x_ptr, n, first_block, BLOCKS: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """float32 [BLOCKS, BLOCKSIZE // 2, 2] tile of the quantization blocks starting at
    `first_block` (int64), zeros past n, and each element's offset from the tile start.
    The trailing 2 holds the two elements of one packed byte (see pack_nibbles)."""
    first_element = first_block * BLOCKSIZE
    offsets = (tl.arange(0, BLOCKS)[:, None, None] * BLOCKSIZE
               + tl.arange(0, BLOCKSIZE // 2)[None, :, None] * 2
               + tl.arange(0, 2)[None, None, :])
    x = tl.load(x_ptr + first_element + offsets, mask=offsets < n - first_element, other=0.0)
    return to_float32(x), offsets
