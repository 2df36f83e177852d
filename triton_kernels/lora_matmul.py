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
nf4lora.backends.triton. The backward kernel splits its reduction axis (N) the same way
and shares the reduction kernel.

The helpers `load_weight_tile` and `dot_accumulate` are shared with gemv.py and
lora_matmul_backward.py.
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
                     nested_offset, row0, k0, N, row_bytes, num_blocks, blocksize_log2,
                     nested_blocksize_log2, NESTED: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """float32 W[row0 : row0 + BLOCK_ROWS, k0 : k0 + BLOCK_K], decoded from packed bytes.

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


@triton.jit
def lora_chunk(lora, h, lora_ptr, cols_n, ranks, N, R, stride_n, stride_r):
    """lora + h @ L[cols_n, ranks]^T for one chunk of 16 ranks, element (n, r) of L at
    lora_ptr + n * stride_n + r * stride_r; h [BLOCK_M, 16] is zero past R. The kernels
    walk R in these chunks, so one binary serves every rank."""
    tile = tl.load(lora_ptr + cols_n[:, None] * stride_n + ranks[None, :] * stride_r,
                   mask=(cols_n < N)[:, None] & (ranks < R)[None, :], other=0.0)
    return dot_accumulate(h, tl.trans(tile), lora)


@triton.jit
def lora_expand_chunk(lora, h, lora_B_ptr, cols_n, ranks, N, R):
    """lora + h @ B[cols_n, ranks]^T, B [N, R] row-major (lora_chunk)."""
    return lora_chunk(lora, h, lora_B_ptr, cols_n, ranks, N, R, R, 1)


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


# The shifts gain nothing from Triton's divisible-by-16 specialization, nor k_per_split
# (unused without SPLIT_K; with it the slice start is declared a multiple of BLOCK_K
# below): one binary for all.
@triton.jit(do_not_specialize=["blocksize_log2", "nested_blocksize_log2", "k_per_split"])
def lora_matmul_kernel(
    # pointers
    x_ptr,              # fp32/fp16/bf16 [M, K]
    packed_ptr,         # uint8 [ceil(N * K / 2)]
    absmax_ptr,         # fp32 [blocks], or uint8 codes [blocks] when NESTED
    table_ptr,          # fp32 [16], the 4-bit code book
    nested_code_ptr,    # fp32 [256] (NESTED only)
    nested_absmax_ptr,  # fp32 [ceil(blocks / nested blocksize)] (NESTED only)
    h_ptr,              # x's dtype [M, R], h = x @ A^T (HAS_LORA only)
    lora_B_ptr,         # x's dtype [N, R] (HAS_LORA only)
    bias_ptr,           # x's dtype [N] (HAS_BIAS only)
    y_ptr,              # x's dtype [M, N] (not SPLIT_K)
    partial_ptr,        # fp32 [splits, M, N] (SPLIT_K only)
    # sizes
    M, N, K, R,
    row_bytes,              # K // 2, its own argument so Triton can see it divisible by 16
    num_blocks,             # ceil(N * K / blocksize)
    blocksize_log2,
    nested_blocksize_log2,
    nested_offset,          # fp32 (NESTED only)
    scaling,                # fp32 (HAS_LORA only)
    k_per_split,            # a multiple of BLOCK_K (SPLIT_K only)
    # meta-parameters
    NESTED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,  # grid (tiles, splits): fp32 partials, no epilogue (LoRA, bias)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # The M tiles of one N tile are neighbours in launch order, so the second decodes
    # a W tile the first just pulled into L2.
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_m = pid % tiles_m
    pid_n = pid // tiles_m
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    if SPLIT_K:
        # A multiple of BLOCK_K: said so, or the compiler cannot prove the x and W loads
        # aligned, drops cp.async and the 3-stage pipeline (sm_90 bf16: 141 registers
        # and 18 KB of shared memory instead of 74 and 38 KB).
        k_begin = tl.multiple_of(tl.program_id(1) * k_per_split, BLOCK_K)
        k_end = tl.minimum(k_begin + k_per_split, K)
    else:
        k_begin = 0
        k_end = K

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None] * K + ks[None, :],
                    mask=(rows_m < M)[:, None] & (ks < K)[None, :], other=0.0)
        w = load_weight_tile(packed_ptr, absmax_ptr, table_ptr, nested_code_ptr,
                             nested_absmax_ptr, nested_offset, pid_n * BLOCK_N, k0, N,
                             row_bytes, num_blocks, blocksize_log2, nested_blocksize_log2,
                             NESTED, BLOCK_N, BLOCK_K)
        # W rounded once to x's dtype, as the composite path's dequantize_4bit does.
        acc = dot_accumulate(x, tl.trans(to_output_dtype(w, X_DTYPE)), acc)

    mask = (rows_m < M)[:, None] & (cols_n < N)[None, :]
    if SPLIT_K:
        tl.store(partial_ptr + (tl.program_id(1) * M + rows_m[:, None]) * N + cols_n[None, :],
                 acc, mask=mask)
    else:
        if HAS_LORA:
            # y + s * (h @ B^T): the chunks' sum is kept apart and scaled once, as
            # torch.addmm(y, h, B^T, alpha=s) does.
            lora = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
            for r0 in range(0, R, LORA_CHUNK):
                ranks = r0 + tl.arange(0, LORA_CHUNK)
                h = tl.load(h_ptr + rows_m[:, None] * R + ranks[None, :],
                            mask=(rows_m < M)[:, None] & (ranks < R)[None, :], other=0.0)
                lora = lora_expand_chunk(lora, h, lora_B_ptr, cols_n, ranks, N, R)
            acc = acc + scaling * lora
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols_n, mask=cols_n < N, other=0.0)
            acc = acc + to_float32(bias)[None, :]
        tl.store(y_ptr + rows_m[:, None] * N + cols_n[None, :], to_output_dtype(acc, X_DTYPE),
                 mask=mask)


@triton.jit
def split_k_reduce_kernel(
    # pointers
    partial_ptr,        # fp32 [splits, M, N]
    h_ptr,              # out's dtype [M, R] (HAS_LORA only)
    lora_ptr,           # out's dtype, L[n, r] at n * lora_stride_n + r * lora_stride_r (HAS_LORA)
    bias_ptr,           # out's dtype [N] (HAS_BIAS only)
    out_ptr,            # fp32/fp16/bf16 [M, N]
    # sizes
    M, N, R,
    num_splits,
    lora_stride_n,
    lora_stride_r,
    scaling,            # fp32 (HAS_LORA only)
    # meta-parameters
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out = sum of the split-K partials (in split order) + scaling * h @ L^T + bias,
    rounded once. Forward: out = y, L = lora_B [N, R] (strides R, 1). Backward: out = dx
    [M, K], N = K, h = grad_h, L = lora_A^T (strides 1, K), scaling 1."""
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    rows_m = (pid % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_n = (pid // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows_m < M
    mask = row_ok[:, None] & (cols_n < N)[None, :]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for split in range(num_splits):  # in order: the same bits every run
        acc += tl.load(partial_ptr + (split * M + rows_m[:, None]) * N + cols_n[None, :],
                       mask=mask, other=0.0)
    if HAS_LORA:
        lora = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for r0 in range(0, R, LORA_CHUNK):
            ranks = r0 + tl.arange(0, LORA_CHUNK)
            h = tl.load(h_ptr + rows_m[:, None] * R + ranks[None, :],
                        mask=row_ok[:, None] & (ranks < R)[None, :], other=0.0)
            lora = lora_chunk(lora, h, lora_ptr, cols_n, ranks, N, R, lora_stride_n,
                              lora_stride_r)
        acc = acc + scaling * lora
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols_n, mask=cols_n < N, other=0.0)
        acc = acc + to_float32(bias)[None, :]
    tl.store(out_ptr + rows_m[:, None] * N + cols_n[None, :],
             to_output_dtype(acc, out_ptr.dtype.element_ty), mask=mask)


def launch_config(x_type: str, nested: bool, has_lora: bool, has_bias: bool,
                  split_k: bool = False) -> dict:
    """The constexprs and launch options the launcher uses for one call; x_type is
    "fp32", "fp16" or "bf16". With split_k the LoRA term and the bias belong to the
    reduction (reduce_config), so the split binary is one per x dtype and nesting.

    enable_fp_fusion=False: the epilogue's y + s * lora stays a multiply and an add, as
    in the interpreter the tests run (numpy never fuses), and the compile report's
    no-fma rule holds for every kernel; the MMAs are unaffected.
    """
    block_m, block_n, block_k, num_warps = TILES[x_type]
    return dict(NESTED=nested, HAS_LORA=has_lora and not split_k,
                HAS_BIAS=has_bias and not split_k, SPLIT_K=split_k, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                num_stages=NUM_STAGES, enable_fp_fusion=False)


def grid(m: int, n: int, config: dict, splits: int = 1) -> tuple:
    return (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]), splits)


# The reduction: [16, 128] tiles of 4 warps, gemv.py's epilogue tile (the partials are
# read 512 contiguous bytes per row; 16 rows is the smallest tl.dot M for the LoRA term).
REDUCE_BLOCK_M = 16
REDUCE_BLOCK_N = 128
REDUCE_NUM_WARPS = 4


def reduce_config(has_lora: bool, has_bias: bool) -> dict:
    return dict(HAS_LORA=has_lora, HAS_BIAS=has_bias, BLOCK_M=REDUCE_BLOCK_M,
                BLOCK_N=REDUCE_BLOCK_N, num_warps=REDUCE_NUM_WARPS, enable_fp_fusion=False)


def reduce_grid(m: int, n: int, config: dict) -> tuple:
    return (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)


def compile_targets():
    """Every (signature, config) the launcher can choose, for the compile report.

    NF4 and FP4 share one binary (the code book is data), the blocksize is a runtime
    shift and the rank a runtime loop bound, so the variants are x dtype x nested x
    (LoRA x bias, or split-K). Without split-K the launcher passes y as the (unused)
    partial pointer."""
    for x_type in X_TYPES:
        for nested in (False, True):
            variants = [(False, has_lora, has_bias) for has_lora in (False, True)
                        for has_bias in (False, True)] + [(True, False, False)]
            for split_k, has_lora, has_bias in variants:
                signature = {"x_ptr": f"*{x_type}", "packed_ptr": "*u8",
                             "absmax_ptr": "*u8" if nested else "*fp32",
                             "table_ptr": "*fp32", "nested_code_ptr": "*fp32",
                             "nested_absmax_ptr": "*fp32", "h_ptr": f"*{x_type}",
                             "lora_B_ptr": f"*{x_type}", "bias_ptr": f"*{x_type}",
                             "y_ptr": f"*{x_type}",
                             "partial_ptr": "*fp32" if split_k else f"*{x_type}",
                             "M": "i32", "N": "i32", "K": "i32",
                             "R": "i32", "row_bytes": "i32", "num_blocks": "i32",
                             "blocksize_log2": "i32", "nested_blocksize_log2": "i32",
                             "nested_offset": "fp32", "scaling": "fp32",
                             "k_per_split": "i32"}
                label = (f"x={x_type} nested={nested} split_k" if split_k else
                         f"x={x_type} nested={nested} lora={has_lora} bias={has_bias}")
                yield label, signature, launch_config(x_type, nested, has_lora, has_bias,
                                                      split_k)


def reduce_compile_targets():
    """Every (signature, config) of the reduction: out dtype x LoRA x bias."""
    for out_type in X_TYPES:
        for has_lora in (False, True):
            for has_bias in (False, True):
                signature = {"partial_ptr": "*fp32", "h_ptr": f"*{out_type}",
                             "lora_ptr": f"*{out_type}", "bias_ptr": f"*{out_type}",
                             "out_ptr": f"*{out_type}", "M": "i32", "N": "i32", "R": "i32",
                             "num_splits": "i32", "lora_stride_n": "i32",
                             "lora_stride_r": "i32", "scaling": "fp32"}
                yield (f"out={out_type} lora={has_lora} bias={has_bias}", signature,
                       reduce_config(has_lora, has_bias))
