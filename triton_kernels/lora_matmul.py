"""Fused 4-bit dequantize-matmul with LoRA, for 16 < M <= FUSED_MAX_M tokens
(the routing: nf4lora.backends.triton.matmul_path).

    y = x @ W^T + scaling * h @ B^T + bias,   h = x @ A^T
    x [M, K], W 4-bit [N, K] (N = out_features, K = in_features), A [R, K], B [N, R]

Spec: `nf4lora.backends.composite.lora_matmul_4bit` over `nf4lora.reference.dequantize_4bit`
(W rounded once to x's dtype, fp32 accumulation). One program owns a [BLOCK_M, BLOCK_N]
tile of y and walks the whole K axis: each step loads BLOCK_K / 2 packed bytes of
BLOCK_N rows of W, decodes them in registers (16-entry table lookup, absmax decoded from
its 8-bit code in the same step when nested) and feeds them to the tensor cores. The
LoRA expand term and the bias are added to the fp32 accumulator in the epilogue, so y is
rounded once and written once (the composite path rounds twice: F.linear, then addmm).

h comes from a tiny separate matmul (torch, before the launch), not from the K loop:
  * every one of the N / BLOCK_N programs would recompute the same x @ A^T, R / BLOCK_N
    more MMA work (25% at r = 16, 100% at r = 64) and N / BLOCK_N reads of A from L2;
  * an h accumulator live through the K loop costs R / 2 registers per thread at
    BLOCK_M = 64 (32 at r = 64) on top of the 32 of the main accumulator;
  * the epilogue walks R in chunks of 16, so one binary serves every rank; an in-loop
    h tile would need one per padded rank.
The price is one launch and one more read of x (M*K*2 bytes: 6% of the weight's bytes
at M = 64, K = 4096). The decode path (gemv.py, M <= 16), where a launch is comparable
to the whole kernel, computes h inside its single pass instead.

Split-K (SPLIT_K): at N = 4096 the [64, 64] tiles are 64 programs, too few for 132 SMs,
and (by estimate, not yet measured) the kernel's time is mostly issue slots decoding W,
which idle SMs do not help with.
Then the launcher splits K into slices: program (tile, split) reduces its slice into fp32
partials at partial[split, rows, cols], and split_k_reduce_kernel sums the slices in a
fixed order (the same bits every run; gemv.py's docstring says why not atomics), adds
the LoRA term and the bias and rounds y once. How many slices: fused_splits in
nf4lora.backends.triton. The backward kernel splits its reduction axis (N) the same way,
and the GEMV always splits K: both share the reduction kernel.

Mixed-adapter batches (PER_ROW; the op nf4lora::multi_lora_matmul_4bit): row m of x has
its own adapter i = index[m] (-1: none) from stacks lora_A [n, R, K], lora_B [n, N, R]
(smaller ranks zero-padded), and scalings [n]. The base product is the same one pass over
W for the whole batch; h [M, R] holds each row's own x[m] A_i^T (computed per row by the
GEMV's shrink programs, gemv.py), and the epilogue (lora_term) adds scalings[i] h[m] B_i^T
per row: it walks the adapters present in the tile's rows, each once (next_adapter), and
for each runs the rank chunks with h masked to that adapter's rows and B_i's tile, so a
tile costs one rank-R epilogue per distinct adapter among its rows, on tensor cores, and
reads only those adapters' B (the BGMV of Punica / S-LoRA, grouped by adapter per tile).

The @triton.jit helpers below (the weight decode, the MMA, the output tile and the
reduction's slice, the split-K workspace, the LoRA term and the rounded store) are shared
with gemv.py and lora_matmul_backward.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codec import (INTERPRETING, decode_nested_absmax, lookup_table, to_float32,
                    to_output_dtype, unpack_nibbles)

# ----------------------------------------------------------------------------------------
# Shared @triton.jit helpers.
# ----------------------------------------------------------------------------------------

# A chunk of 32 consecutive elements of a row (16 packed bytes) meets at most two
# quantization blocks, because no blocksize is smaller than 32: the decode below loads
# two absmax per chunk and picks one per byte. With K % blocksize == 0 (every real
# layer with blocksize <= 64) both are the same block and the pick is a no-op; with
# blocks straddling rows (K % blocksize != 0) it is what keeps the kernels exact.
CHUNK_ELEMENTS = tl.constexpr(32)
CHUNK_BYTES = tl.constexpr(16)
# The LoRA epilogues walk the rank in chunks of 16, the smallest tl.dot K.
LORA_CHUNK = tl.constexpr(16)

# fp32 inputs use the "bf16x6" MMA: each operand split exactly into three bf16 pieces
# (8 + 8 + 8 significand bits = fp32's 24) and the six products down to 2^-24 relative
# are summed in fp32, fp32-class accuracy on tensor cores. "ieee" would run as FMA on
# CUDA cores (16x the work at a padded M = 16, and fma instructions the compile report
# rejects); "tf32x3" drops to ~2^-21 per product.
FP32_DOT_PRECISION = tl.constexpr("bf16x6")

# Mixed-adapter batches: past every adapter index (int32), "no adapter left".
NO_ADAPTER = tl.constexpr(2**31 - 1)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def next_adapter(index, after):
    """The smallest adapter in `index` (int32 [rows], -1 for none) greater than `after`,
    NO_ADAPTER when there is none: from after = -1 on, each adapter of the rows once, in
    order. tl.reduce with our own combine function, not tl.min (codec.py says why)."""
    return tl.reduce(tl.where(index > after, index, NO_ADAPTER), 0, _minimum)


@triton.jit
def _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset, block,
                  mask, nested_blocksize_log2, NESTED: tl.constexpr):
    """float32 absmax of quantization blocks `block` (any shape), 0 (+ offset) where masked."""
    if NESTED:
        absmax = decode_nested_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                                      nested_offset, block, nested_blocksize_log2, mask)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def load_weight_tile(packed_ptr, absmax_ptr, table_ptr, nested_code_ptr, nested_absmax_ptr,
                     row_bytes, num_blocks, blocksize_log2, nested_blocksize_log2,
                     nested_offset, row0, k0, N, NESTED: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 W[row0 : row0 + BLOCK_ROWS, k0 : k0 + BLOCK_K], decoded from packed bytes.
    Its first ten arguments are the weight arguments (weight_signature), as the kernels
    take them.

    W is [N, K] row-major, flattened into blocks and packed two codes per byte with the
    earlier element in the high nibble; K is even, so row n starts at byte n * row_bytes
    and each byte holds two elements of one row. k0 is a multiple of BLOCK_K, itself a
    multiple of 32. Rows >= N and columns >= K are garbage (code 0 times some absmax,
    finite): callers multiply them by zero-masked operands or never store them.

    The tile is loaded as [ROWS, CHUNKS, 16] bytes, 16 contiguous bytes per chunk, so a
    thread's share is one vector (sm_90 PTX: 16-byte ld.global.v4 in the GEMV, 8-byte
    cp.async per thread per pipeline stage in the 8-warp tensor-core kernels). The 1-byte
    nested absmax codes cannot ride cp.async (4 bytes minimum) and are a synchronous,
    mostly L1-hit load each step; prefetching them a step ahead is left to do.
    """
    CHUNKS: tl.constexpr = BLOCK_K // CHUNK_ELEMENTS
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    row_in_range = rows < N
    chunk_byte = k0 // 2 + tl.arange(0, CHUNKS) * CHUNK_BYTES              # [C]
    byte_in_chunk = tl.arange(0, CHUNK_BYTES)                               # [16]
    col_byte = chunk_byte[:, None] + byte_in_chunk[None, :]                 # [C, 16]
    # int64: a row's first byte passes 2**31 in weights of more than 4G elements.
    row_first_byte = rows.to(tl.int64) * row_bytes                          # [R]
    packed = tl.load(packed_ptr + row_first_byte[:, None, None] + col_byte[None, :, :],
                     mask=row_in_range[:, None, None] & (col_byte < row_bytes)[None, :, :],
                     other=0)

    # The two blocks each chunk can touch, and where (element offset in the chunk) the
    # second begins; <= 0 when the chunk lies in one block.
    chunk_first = 2 * (row_first_byte[:, None] + chunk_byte[None, :])      # [R, C] element
    first_block = chunk_first >> blocksize_log2
    last_block = (chunk_first + (CHUNK_ELEMENTS - 1)) >> blocksize_log2
    first_absmax = _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                                 nested_offset, first_block,
                                 row_in_range[:, None] & (first_block < num_blocks),
                                 nested_blocksize_log2, NESTED)
    last_absmax = _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                                nested_offset, last_block,
                                row_in_range[:, None] & (last_block < num_blocks),
                                nested_blocksize_log2, NESTED)
    second_block_start = (last_block << blocksize_log2) - chunk_first       # [R, C]
    # Both elements of a byte share a block (blocksizes are even, bytes start even).
    in_last = (2 * byte_in_chunk)[None, None, :] >= second_block_start[:, :, None]
    absmax = tl.where(in_last, last_absmax[:, :, None], first_absmax[:, :, None])

    values = lookup_table(table_ptr, unpack_nibbles(packed)) * absmax[:, :, :, None]
    return tl.reshape(values, [BLOCK_ROWS, BLOCK_K])


@triton.jit
def dot_accumulate(a, b, acc):
    """acc + a @ b, float32 accumulator; a and b fp16/bf16 (tensor cores) or fp32 (bf16x6)."""
    if INTERPRETING:
        # Triton 3.9's interpreter computes tl.dot of two bf16 tiles wrongly (numpy has
        # no bfloat16; fp16 and fp32 are right). Widening is exact and a bf16 x bf16
        # product is exact in fp32, so the fp32 dot is what the MMA computes. The
        # interpreter knows no "bf16x6" and multiplies fp32 in numpy's fp32 anyway.
        # The compiled kernel never takes this branch.
        if a.dtype == tl.bfloat16:
            a = to_float32(a)
            b = to_float32(b)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=FP32_DOT_PRECISION)
    else:
        acc = tl.dot(a, b, acc)
    return acc


# The packed weight W [N, K] reaches every matmul kernel as ten arguments, in this order,
# which go to load_weight_tile unchanged ("the weight arguments"):
#   packed_ptr             uint8 [ceil(N * K / 2)]
#   absmax_ptr             fp32 [blocks], or uint8 codes [blocks] when NESTED
#   table_ptr              fp32 [16], the 4-bit code book
#   nested_code_ptr        fp32 [256] (NESTED only)
#   nested_absmax_ptr      fp32 [ceil(blocks / nested blocksize)] (NESTED only)
#   row_bytes              K // 2, its own argument so Triton can see it divisible by 16
#   num_blocks             ceil(N * K / blocksize)
#   blocksize_log2, nested_blocksize_log2   powers of 2: shifts, not integer divisions
#   nested_offset          fp32 (NESTED only)
def weight_signature(nested: bool) -> dict:
    """The compile report's types of the weight arguments."""
    return {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
            "table_ptr": "*fp32", "nested_code_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
            "row_bytes": "i32", "num_blocks": "i32", "blocksize_log2": "i32",
            "nested_blocksize_log2": "i32", "nested_offset": "fp32"}


# The shifts gain nothing from Triton's divisible-by-16 specialization: one binary for all.
WEIGHT_DO_NOT_SPECIALIZE = ["blocksize_log2", "nested_blocksize_log2"]


@triton.jit
def output_tile(M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, first column, columns) of this program's [BLOCK_M, BLOCK_N] output tile.
    The M tiles of one column tile are neighbours in launch order, so the second decodes
    a W tile the first just pulled into L2."""
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    rows = (pid % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    first_col = (pid // tiles_m) * BLOCK_N
    return rows, first_col, first_col + tl.arange(0, BLOCK_N)


@triton.jit
def reduction_range(length, per_split, SPLIT_K: tl.constexpr, STEP: tl.constexpr):
    """[begin, end) of the reduction axis (of `length`, walked in steps of STEP) that this
    program reduces: slice program_id(1) of `per_split` (a multiple of STEP) with SPLIT_K,
    else all of it. The slice start is declared a multiple of STEP, or the compiler cannot
    prove the loads aligned and drops cp.async and the 3-stage pipeline (sm_90 bf16
    forward: 141 registers and 18 KB of shared memory instead of 74 and 38 KB)."""
    if SPLIT_K:
        begin = tl.multiple_of(tl.program_id(1) * per_split, STEP)
        end = tl.minimum(begin + per_split, length)
    else:
        begin = 0
        end = length
    return begin, end


# Split-K workspaces are fp32 [splits, M, width]: split s's partial sums of output row m,
# column c at (s * M + m) * width + c. Written by the split programs, summed in split
# order by split_k_reduce_kernel (gemv.py's docstring says why not atomics).

@triton.jit
def store_split_partial(partial_ptr, acc, rows_m, cols, M, width, mask):
    """Write this program's fp32 partial sums acc [rows_m, cols] as split program_id(1).
    The split's and the rows' offsets go into the pointer before the columns' (the GEMV's
    sm_80 tensor-core variant held 10 registers more with one summed offset)."""
    tl.store(partial_ptr + tl.program_id(1) * M * width + rows_m[:, None] * width + cols[None, :],
             acc, mask=mask)


@triton.jit
def sum_split_partials(partial_ptr, rows_m, cols, M, width, num_splits, mask,
                       BLOCK_M: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_COLS]: the splits' partial sums at [rows_m, cols], added in
    split order (the same bits every run); 0 where masked."""
    acc = tl.full([BLOCK_M, BLOCK_COLS], 0.0, tl.float32)
    for split in range(num_splits):
        acc += tl.load(partial_ptr + (split * M + rows_m[:, None]) * width + cols[None, :],
                       mask=mask, other=0.0)
    return acc


@triton.jit
def lora_chunk(lora, h, lora_ptr, cols_n, ranks, N, R, stride_n, stride_r):
    """lora + h @ L[cols_n, ranks]^T for one chunk of 16 ranks, element (n, r) of L at
    lora_ptr + n * stride_n + r * stride_r; h [BLOCK_M, 16] is zero past R. The kernels
    walk R in these chunks, so one binary serves every rank."""
    tile = tl.load(lora_ptr + cols_n[:, None] * stride_n + ranks[None, :] * stride_r,
                   mask=(cols_n < N)[:, None] & (ranks < R)[None, :], other=0.0)
    return dot_accumulate(h, tl.trans(tile), lora)


@triton.jit
def _h_chunk(h_ptr, rows_m, ranks, rows_ok, first_col, M, N, R, partial_ptr, partial_width,
             num_splits, H_FROM_PARTIALS: tl.constexpr, STORE_H: tl.constexpr,
             BLOCK_M: tl.constexpr):
    """h[rows_m, ranks] in the output's dtype, 0 where not rows_ok or past R: loaded from
    h_ptr, or summed from the split-K partials' columns N + ranks and rounded
    (H_FROM_PARTIALS), then also stored at h_ptr by the first column tile (STORE_H)."""
    # h_ptr + (row offset + rank): the row's pointer first, one per row, then broadcast
    # over the ranks (summing the offsets first cost the fused kernel 9 registers).
    h_ptrs = h_ptr + rows_m[:, None] * R + ranks[None, :]
    h_mask = rows_ok[:, None] & (ranks < R)[None, :]
    if H_FROM_PARTIALS:
        h = to_output_dtype(sum_split_partials(partial_ptr, rows_m, N + ranks, M, partial_width,
                                               num_splits, h_mask, BLOCK_M, LORA_CHUNK),
                            h_ptr.dtype.element_ty)
        if STORE_H:
            if first_col == 0:
                tl.store(h_ptrs, h, mask=h_mask)
    else:
        h = tl.load(h_ptrs, mask=h_mask, other=0.0)
    return h


@triton.jit
def lora_term(h_ptr, lora_ptr, rows_m, first_col, cols_n, M, N, R, partial_ptr,
              partial_width, num_splits, index_ptr, scalings_ptr,
              H_FROM_PARTIALS: tl.constexpr, L_IS_A_TRANSPOSED: tl.constexpr,
              PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 h @ L^T on this output tile, h [M, R] in the output's dtype, R walked in chunks
    of 16 (lora_chunk). L is lora_B [N, R] (the forward's h @ B^T), or with
    L_IS_A_TRANSPOSED lora_A^T, lora_A [R, N] (the backward's grad_h @ A). Either way one
    of its strides is 1 at compile time: the tile loads vectorize (with both strides
    runtime values, the GEMV's pass 2 compiled to twice the registers, 126 against 64).

    h is loaded from h_ptr, or, with H_FROM_PARTIALS (the GEMV), summed from the split-K
    partials' columns N .. N + R - 1 and rounded once to the output's dtype, as torch's
    F.linear(x, A) returns it; the first column tile's programs then also store it at
    h_ptr (the backward pass uses it for dB). The caller scales the sum once, as
    torch.addmm(y, h, B^T, alpha=s) does, rather than each chunk.

    PER_ROW (mixed-adapter batches, the module docstring): L is the stack lora_B [n, N, R]
    and row m takes adapter i = index[m]. Each chunk of h is fetched once, then each
    adapter of the tile's rows multiplies its own rows of it (the others zeroed) with its
    B_i chunk, into the one accumulator (the rows are disjoint); at the end each row is
    scaled by its scalings[i] (0 for -1 rows), so the caller's scale is 1. h is not
    stored: the op's backward recomputes it. (Adapters outside, chunks inside, summed h
    once per adapter and spilled 1-2 words on sm_80 at 72 registers.)"""
    lora = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    if PER_ROW:
        index = tl.load(index_ptr + rows_m, mask=rows_m < M, other=-1)
    for r0 in range(0, R, LORA_CHUNK):
        ranks = r0 + tl.arange(0, LORA_CHUNK)
        if PER_ROW:
            h = _h_chunk(h_ptr, rows_m, ranks, index >= 0, first_col, M, N, R, partial_ptr,
                         partial_width, num_splits, H_FROM_PARTIALS, False, BLOCK_M)
            adapter = next_adapter(index, -1)
            while adapter < NO_ADAPTER:
                own_rows = tl.where((index == adapter)[:, None], h, 0.0)
                lora = lora_chunk(lora, own_rows, lora_ptr + adapter.to(tl.int64) * N * R,
                                  cols_n, ranks, N, R, R, 1)
                adapter = next_adapter(index, adapter)
        else:
            h = _h_chunk(h_ptr, rows_m, ranks, rows_m < M, first_col, M, N, R, partial_ptr,
                         partial_width, num_splits, H_FROM_PARTIALS, H_FROM_PARTIALS, BLOCK_M)
            if L_IS_A_TRANSPOSED:
                lora = lora_chunk(lora, h, lora_ptr, cols_n, ranks, N, R, 1, N)
            else:
                lora = lora_chunk(lora, h, lora_ptr, cols_n, ranks, N, R, R, 1)
    if PER_ROW:
        lora = lora * tl.load(scalings_ptr + index, mask=index >= 0, other=0.0)[:, None]
    return lora


@triton.jit
def store_output_tile(acc, bias_ptr, out_ptr, rows_m, cols_n, M, N, HAS_BIAS: tl.constexpr):
    """out[rows_m, cols_n] = acc (+ bias[cols_n] with HAS_BIAS), rounded once to out's
    dtype; rows >= M and columns >= N are not written."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols_n, mask=cols_n < N, other=0.0)
        acc = acc + to_float32(bias)[None, :]
    tl.store(out_ptr + rows_m[:, None] * N + cols_n[None, :],
             to_output_dtype(acc, out_ptr.dtype.element_ty),
             mask=(rows_m < M)[:, None] & (cols_n < N)[None, :])


# ----------------------------------------------------------------------------------------
# The fused kernel.
# ----------------------------------------------------------------------------------------

# Tiles per x dtype: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps). 8 warps: with 4, ptxas
# held the fp16/bf16 tile at 168 registers on sm_80 (126 with 8, 2 programs per SM).
# fp32's bf16x6 MMA keeps three bf16 pieces of each operand live: [64, 64, 64] spilled
# on sm_80, [64, 64, 32] fit at 206 (forward) and 251-255 (backward, whose W tile is
# the same [BLOCK_N, BLOCK_K] with the roles swapped); [64, 32, 32] gives ~170 on sm_80
# and ~120 on sm_90 with M still one tile (compile_report --all-sizes).
TILES = {"fp32": (64, 32, 32, 8), "fp16": (64, 64, 64, 8), "bf16": (64, 64, 64, 8)}
NUM_STAGES = 3
X_TYPES = ("fp32", "fp16", "bf16")


# k_per_split is unused without SPLIT_K, and with it the slice start is declared a
# multiple of BLOCK_K (reduction_range): no specialization on it either.
@triton.jit(do_not_specialize=WEIGHT_DO_NOT_SPECIALIZE + ["k_per_split"])
def lora_matmul_kernel(
    x_ptr,              # fp32/fp16/bf16 [M, K]
    # the weight arguments of W [N, K] (weight_signature)
    packed_ptr, absmax_ptr, table_ptr, nested_code_ptr, nested_absmax_ptr,
    row_bytes, num_blocks, blocksize_log2, nested_blocksize_log2, nested_offset,
    h_ptr,              # x's dtype [M, R], h = x @ A^T (HAS_LORA only; PER_ROW: each row's own)
    lora_B_ptr,         # x's dtype [N, R] (HAS_LORA only), or [n, N, R] (PER_ROW)
    index_ptr,          # int32 [M]: each row's adapter, -1 none (PER_ROW only)
    scalings_ptr,       # fp32 [n] (PER_ROW only)
    bias_ptr,           # x's dtype [N] (HAS_BIAS only)
    y_ptr,              # x's dtype [M, N] (not SPLIT_K)
    partial_ptr,        # fp32 [splits, M, N] (SPLIT_K only)
    # sizes
    M, N, K, R,
    scaling,                # fp32 (HAS_LORA only; 1 with PER_ROW)
    k_per_split,            # a multiple of BLOCK_K (SPLIT_K only)
    # meta-parameters
    NESTED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    PER_ROW: tl.constexpr,  # each row its own adapter (the module docstring)
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,  # grid (tiles, splits): fp32 partials, no epilogue (LoRA, bias)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows_m, first_col, cols_n = output_tile(M, BLOCK_M, BLOCK_N)
    k_begin, k_end = reduction_range(K, k_per_split, SPLIT_K, BLOCK_K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None] * K + ks[None, :],
                    mask=(rows_m < M)[:, None] & (ks < K)[None, :], other=0.0)
        w = load_weight_tile(packed_ptr, absmax_ptr, table_ptr, nested_code_ptr,
                             nested_absmax_ptr, row_bytes, num_blocks, blocksize_log2,
                             nested_blocksize_log2, nested_offset, first_col, k0, N,
                             NESTED, BLOCK_N, BLOCK_K)
        # W rounded once to x's dtype, as the composite path's dequantize_4bit does.
        acc = dot_accumulate(x, tl.trans(to_output_dtype(w, x_ptr.dtype.element_ty)), acc)

    if SPLIT_K:
        store_split_partial(partial_ptr, acc, rows_m, cols_n, M, N,
                            (rows_m < M)[:, None] & (cols_n < N)[None, :])
    else:
        if HAS_LORA:
            acc = acc + scaling * lora_term(h_ptr, lora_B_ptr, rows_m, first_col, cols_n, M, N,
                                            R, partial_ptr, N, 1, index_ptr, scalings_ptr,
                                            H_FROM_PARTIALS=False, L_IS_A_TRANSPOSED=False,
                                            PER_ROW=PER_ROW, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        store_output_tile(acc, bias_ptr, y_ptr, rows_m, cols_n, M, N, HAS_BIAS)


@triton.jit
def split_k_reduce_kernel(
    # pointers
    partial_ptr,        # fp32 [splits, M, partial_width]
    h_ptr,              # out's dtype [M, R] (HAS_LORA only): read, or written (H_FROM_PARTIALS)
    lora_ptr,           # out's dtype, lora_B [N, R], or lora_A [R, N] (HAS_LORA only), or
                        # the stack lora_B [n, N, R] (PER_ROW)
    index_ptr,          # int32 [M]: each row's adapter, -1 none (PER_ROW only)
    scalings_ptr,       # fp32 [n] (PER_ROW only)
    bias_ptr,           # out's dtype [N] (HAS_BIAS only)
    out_ptr,            # fp32/fp16/bf16 [M, N]
    # sizes
    M, N, R,
    num_splits,
    partial_width,      # N, or N + R with H_FROM_PARTIALS
    scaling,            # fp32 (HAS_LORA only; 1 with PER_ROW)
    # meta-parameters
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    H_FROM_PARTIALS: tl.constexpr,
    L_IS_A_TRANSPOSED: tl.constexpr,
    PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out = sum of the split-K partials (in split order) + scaling * h @ L^T + bias,
    rounded once (lora_term). Forward: out = y, L = lora_B. GEMV (gemv.py's pass 2): the
    same, h summed from the partials (H_FROM_PARTIALS). Backward: out = dx [M, K], N = K,
    h = grad_h, L = lora_A^T (L_IS_A_TRANSPOSED), scaling 1. Mixed-adapter batches: L_i =
    lora_B[index[m]] per row (PER_ROW), with h given or from the partials."""
    rows_m, first_col, cols_n = output_tile(M, BLOCK_M, BLOCK_N)
    acc = sum_split_partials(partial_ptr, rows_m, cols_n, M, partial_width, num_splits,
                             (rows_m < M)[:, None] & (cols_n < N)[None, :], BLOCK_M, BLOCK_N)
    if HAS_LORA:
        acc = acc + scaling * lora_term(h_ptr, lora_ptr, rows_m, first_col, cols_n, M, N, R,
                                        partial_ptr, partial_width, num_splits, index_ptr,
                                        scalings_ptr, H_FROM_PARTIALS, L_IS_A_TRANSPOSED,
                                        PER_ROW, BLOCK_M, BLOCK_N)
    store_output_tile(acc, bias_ptr, out_ptr, rows_m, cols_n, M, N, HAS_BIAS)


def launch_config(x_type: str, nested: bool, has_lora: bool, has_bias: bool,
                  split_k: bool = False, per_row: bool = False) -> dict:
    """The constexprs and launch options the launcher uses for one call; x_type is
    "fp32", "fp16" or "bf16"; per_row: a mixed-adapter batch's LoRA term. With split_k the
    LoRA term and the bias belong to the reduction (reduce_config), so the split binary is
    one per x dtype and nesting.

    enable_fp_fusion=False: the epilogue's y + s * lora stays a multiply and an add, as
    in the interpreter the tests run (numpy never fuses), and the compile report's
    no-fma rule holds for every kernel; the MMAs are unaffected.
    """
    block_m, block_n, block_k, num_warps = TILES[x_type]
    return dict(NESTED=nested, HAS_LORA=has_lora and not split_k,
                PER_ROW=per_row and has_lora and not split_k,
                HAS_BIAS=has_bias and not split_k, SPLIT_K=split_k, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                num_stages=NUM_STAGES, enable_fp_fusion=False)


def grid(m: int, n: int, config: dict, splits: int = 1) -> tuple:
    return (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]), splits)


# The reduction: [16, 128] tiles of 4 warps (the partials are read 512 contiguous bytes per
# row; 16 rows is the smallest tl.dot M for the LoRA term, and all of the GEMV's M <= 16).
REDUCE_BLOCK_M = 16
REDUCE_BLOCK_N = 128
REDUCE_NUM_WARPS = 4


# What the reduction's LoRA term is, per caller: none, h @ B^T with h given (the fused
# forward), h @ B^T with h in the workspace (the GEMV), grad_h @ A (the backward, no bias);
# the two forward ones also per row, for mixed-adapter batches (PER_ROW).
LORA_TERMS = ("none", "B", "B_h_from_partials", "A", "B_per_row", "B_h_from_partials_per_row")


def reduce_config(lora_term: str, has_bias: bool) -> dict:
    """The reduction's constexprs and launch options; lora_term is one of LORA_TERMS."""
    return dict(HAS_LORA=lora_term != "none", HAS_BIAS=has_bias,
                H_FROM_PARTIALS=lora_term.startswith("B_h_from_partials"),
                L_IS_A_TRANSPOSED=lora_term == "A", PER_ROW=lora_term.endswith("_per_row"),
                BLOCK_M=REDUCE_BLOCK_M,
                BLOCK_N=REDUCE_BLOCK_N, num_warps=REDUCE_NUM_WARPS, enable_fp_fusion=False)


def reduce_grid(m: int, n: int, config: dict) -> tuple:
    return (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)


def compile_targets():
    """Every (signature, config) the launcher can choose, for the compile report.

    NF4 and FP4 share one binary (the code book is data), the blocksize is a runtime
    shift and the rank a runtime loop bound, so the variants are x dtype x nested x
    (LoRA: none, one adapter or per row, x bias; or split-K). Without split-K the launcher
    passes y as the (unused) partial pointer."""
    for x_type in X_TYPES:
        for nested in (False, True):
            variants = [(False, lora, bias) for lora in (False, True, "per_row")
                        for bias in (False, True)] + [(True, False, False)]
            for split_k, lora, has_bias in variants:
                signature = {"x_ptr": f"*{x_type}", **weight_signature(nested),
                             "h_ptr": f"*{x_type}", "lora_B_ptr": f"*{x_type}",
                             "index_ptr": "*i32", "scalings_ptr": "*fp32",
                             "bias_ptr": f"*{x_type}", "y_ptr": f"*{x_type}",
                             "partial_ptr": "*fp32" if split_k else f"*{x_type}",
                             "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                             "scaling": "fp32", "k_per_split": "i32"}
                label = (f"x={x_type} nested={nested} split_k" if split_k else
                         f"x={x_type} nested={nested} lora={lora} bias={has_bias}")
                yield label, signature, launch_config(x_type, nested, bool(lora), has_bias,
                                                      split_k, per_row=lora == "per_row")


def reduce_compile_targets():
    """Every (signature, config) of the reduction: out dtype x LoRA term x bias (the
    backward's grad_h @ A comes without bias)."""
    for out_type in X_TYPES:
        for lora_term in LORA_TERMS:
            for has_bias in (False, True) if lora_term != "A" else (False,):
                signature = {"partial_ptr": "*fp32", "h_ptr": f"*{out_type}",
                             "lora_ptr": f"*{out_type}", "index_ptr": "*i32",
                             "scalings_ptr": "*fp32", "bias_ptr": f"*{out_type}",
                             "out_ptr": f"*{out_type}", "M": "i32", "N": "i32", "R": "i32",
                             "num_splits": "i32", "partial_width": "i32", "scaling": "fp32"}
                yield (f"out={out_type} lora={lora_term} bias={has_bias}", signature,
                       reduce_config(lora_term, has_bias))
