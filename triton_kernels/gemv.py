"""Split-K 4-bit GEMV with LoRA for decode, M <= 16 tokens.

    y = x @ W^T + scaling * h @ B^T + bias,   h = x @ A^T
    x [M, K], W 4-bit [N, K], A [R, K], B [N, R]

Spec: `nf4lora.backends.composite.lora_matmul_4bit`. At decode sizes a 4096x4096 layer
is 8.4 MB of weight, 2.5 us at H100 bandwidth: the weight must be streamed by every SM
at once, and N / BLOCK_N = 64 output tiles cannot do that alone. So K is split too:

  pass 1, gemv_split_k_kernel, grid (N tiles + R tiles, splits): each program reduces
    its K slice of BLOCK_N outputs into fp32 partial sums at partial[split, :, cols].
    The R tiles are the LoRA shrink: programs past the last W tile treat rows of A as
    more rows of the weight (dense, in x's dtype), so h = x @ A^T is computed once, in
    the same launch, with no per-rank binary; its partials sit in columns N..N+R-1.
  pass 2, lora_matmul.split_k_reduce_kernel with H_FROM_PARTIALS, grid (N / 128): sums
    the splits in a fixed order, sums h's splits, rounds h to x's dtype (stored once),
    adds scaling * h @ B^T and the bias, and rounds y once: the fused kernel's split-K
    reduction, with h taken from the workspace.

Deterministic by design, not atomics: fp32 atomic adds land in whatever order the
programs finish, so y would change bit-wise from run to run (a decode that diverges
between identical requests, a test that cannot be exact); Triton also has no bf16
atomic_add, so atomics would need the same fp32 workspace, plus a zeroing pass. The
price of the second pass is the workspace, splits * M * (N + R) * 4 bytes written and
read once; the split heuristic keeps it under a quarter of the weight's bytes, and at
4096 outputs it is 16 KB per token per split, L2-resident on A100/H100.

Mixed-adapter batches (PER_ROW, lora_matmul.py's docstring): row m's h is x[m] A_i^T with
its own adapter i = index[m]. The shrink programs are then rank tiles x adapter slots:
slot s of a row tile takes the s-th adapter among the tile's rows (lora_matmul.next_adapter)
and stores its product for that adapter's rows only, so each adapter present is read and
multiplied once per K slice, by programs of its own that run beside the W tiles (one
program walking every adapter in turn would take n times as long as a W tile and end the
kernel last). Pass 2 is the reduction with the per-row LoRA term. With N = 0 (no W tiles)
and grid axis 2 over tiles of 16 rows, the same programs are the fused path's shrink for
any M (the launcher's h, then lora_matmul_kernel's per-row epilogue).

M == 1 (one sequence decoding) runs on CUDA cores: the decoded tile times x, summed
along K, in fp32 without rounding W to x's dtype first (one rounding fewer than torch,
two instructions per weight fewer). 2 <= M <= 16 pads M to 16 and uses tensor cores;
the padding is free while the kernel is memory-bound.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codec import to_float32, to_output_dtype
from .lora_matmul import (NO_ADAPTER, WEIGHT_DO_NOT_SPECIALIZE, dot_accumulate,
                          load_weight_tile, next_adapter, store_split_partial, weight_signature)

# Tiles per (BLOCK_M, x dtype): (BLOCK_N, BLOCK_K, num_warps).
# BLOCK_M = 1: a [64, 128] tile is 4 KB of packed weight per step; with 8 warps, 32
# decoded floats per thread and 64-80 registers (4 warps: 128-180 registers, two
# programs per SM, too few loads in flight for a kernel that only streams).
# BLOCK_M = 16: lora_matmul's tensor-core tile with BLOCK_N halved to double the
# programs; fp32 (bf16x6) at BLOCK_K = 32 as there (4 warps spilled 2 words on sm_90).
TILES = {(1, "fp32"): (64, 128, 8), (1, "fp16"): (64, 128, 8), (1, "bf16"): (64, 128, 8),
         (16, "fp32"): (64, 32, 8), (16, "fp16"): (64, 64, 8), (16, "bf16"): (64, 64, 8)}
BLOCK_MS = (1, 16)
X_TYPES = ("fp32", "fp16", "bf16")

# Split heuristic. Enough programs to keep every SM streaming (several per SM to hide
# DRAM latency), but each split's K slice at least 64 * M long: the workspace a split
# adds (M * N * 4 bytes, written and read) then stays <= 1/4 of the weight bytes it
# reads (N * K_split / 2).
PROGRAMS_PER_SM = 4
MIN_K_PER_SPLIT_PER_ROW = 64


def num_splits(m: int, k: int, tiles: int, num_sms: int, block_k: int) -> tuple[int, int]:
    """(splits, k_per_split) for `tiles` programs per split; k_per_split is a multiple
    of block_k and every split is non-empty."""
    k_tiles = triton.cdiv(k, block_k)
    min_tiles_per_split = triton.cdiv(MIN_K_PER_SPLIT_PER_ROW * m, block_k)
    wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms, tiles)
    splits = max(1, min(wanted, k_tiles // max(1, min_tiles_per_split)))
    return split_k(k, splits, block_k)


def split_k(k: int, splits: int, block_k: int) -> tuple[int, int]:
    """(splits, k_per_split) for at most `splits` slices of whole BLOCK_K steps."""
    k_tiles = triton.cdiv(k, block_k)
    k_per_split = triton.cdiv(k_tiles, max(1, min(splits, k_tiles))) * block_k
    return triton.cdiv(k, k_per_split), k_per_split


@triton.jit
def _accumulate(acc, x, w, X_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, DENSE: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + x [BLOCK_M, BLOCK_K] @ w^T, w [BLOCK_N, BLOCK_K]: a decoded
    fp32 weight tile, or rows of A in x's dtype (DENSE)."""
    if BLOCK_M == 1:
        # CUDA cores: products in fp32, summed along K. tl.reduce with tl.sum's own
        # combine function, not tl.sum: that is a library @jit the interpreter cannot
        # call when triton was imported before TRITON_INTERPRET=1 was set (codec.py),
        # while the interpreter runs this combine function as one np.sum (any other is
        # called once per element in Python, ~20x slower here). Compiled, it is tl.sum.
        products = to_float32(w) * to_float32(x)
        partial = tl.reduce(products, 1, tl.standard._sum_combine)
        acc = acc + tl.reshape(partial, [1, w.shape[0]])
    else:
        if not DENSE:
            w = to_output_dtype(w, X_DTYPE)  # W rounded once to x's dtype, as torch's path
        acc = dot_accumulate(x, tl.trans(w), acc)
    return acc


@triton.jit
def _partial_products(x_ptr, w_ptr, absmax_ptr, table_ptr, nested_code_ptr,
                      nested_absmax_ptr, row_bytes, num_blocks, blocksize_log2,
                      nested_blocksize_log2, nested_offset, row0, rows_limit, M, K, k_begin,
                      k_end, NESTED: tl.constexpr, DENSE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N]: x[:, k_begin:k_end] @ W[row0 : row0 + BLOCK_N, k_begin:k_end]^T
    with W the packed weight (w_ptr and the other weight arguments), or the dense
    [rows_limit, K] matrix at w_ptr (DENSE)."""
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows_m = tl.arange(0, BLOCK_M)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None] * K + ks[None, :],
                    mask=(rows_m < M)[:, None] & (ks < K)[None, :], other=0.0)
        if DENSE:
            rows = row0 + tl.arange(0, BLOCK_N)
            w = tl.load(w_ptr + rows[:, None] * K + ks[None, :],
                        mask=(rows < rows_limit)[:, None] & (ks < K)[None, :], other=0.0)
        else:
            w = load_weight_tile(w_ptr, absmax_ptr, table_ptr, nested_code_ptr,
                                 nested_absmax_ptr, row_bytes, num_blocks, blocksize_log2,
                                 nested_blocksize_log2, nested_offset, row0, k0, rows_limit,
                                 NESTED, BLOCK_N, BLOCK_K)
        acc = _accumulate(acc, x, w, X_DTYPE, BLOCK_M, DENSE)
    return acc


@triton.jit(do_not_specialize=WEIGHT_DO_NOT_SPECIALIZE)
def gemv_split_k_kernel(
    x_ptr,              # fp32/fp16/bf16 [M, K]
    # the weight arguments of W [N, K] (lora_matmul.weight_signature)
    packed_ptr, absmax_ptr, table_ptr, nested_code_ptr, nested_absmax_ptr,
    row_bytes, num_blocks, blocksize_log2, nested_blocksize_log2, nested_offset,
    lora_A_ptr,         # x's dtype [R, K] (R > 0 only), or the stack [n, R, K] (PER_ROW)
    index_ptr,          # int32 [M]: each row's adapter, -1 none (PER_ROW only)
    partial_ptr,        # fp32 [splits, M, N + R]
    # sizes
    M, N, K, R,
    k_per_split,            # a multiple of BLOCK_K
    # meta-parameters
    NESTED: tl.constexpr,
    PER_ROW: tl.constexpr,  # the shrink per row, each with its own adapter's A
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    # Tiles of BLOCK_M rows along grid axis 2: one for the GEMV (M <= 16); the fused path's
    # mixed-adapter shrink (N = 0, no W tiles) runs here for any M.
    if BLOCK_M == 1:   # M == 1: one tile (saves ptxas the registers it spilled on sm_90)
        m0 = 0
    else:
        m0 = tl.program_id(2) * BLOCK_M
    x_tile_ptr = x_ptr + m0 * K
    M_tile = M - m0
    rows_m = tl.arange(0, BLOCK_M)
    rows_ok = rows_m < M_tile
    w_tiles = (N + BLOCK_N - 1) // BLOCK_N
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if pid_n < w_tiles:
        row0 = pid_n * BLOCK_N
        acc = _partial_products(x_tile_ptr, packed_ptr, absmax_ptr, table_ptr, nested_code_ptr,
                                nested_absmax_ptr, row_bytes, num_blocks, blocksize_log2,
                                nested_blocksize_log2, nested_offset, row0, N, M_tile, K,
                                k_begin, k_end, NESTED, False, BLOCK_M, BLOCK_N, BLOCK_K)
        rows_limit = N
        first_col = row0
    else:  # LoRA shrink: rows of A, written after the N columns of W
        lora_program = pid_n - w_tiles
        r_tiles = (R + BLOCK_N - 1) // BLOCK_N
        row0 = (lora_program % r_tiles) * BLOCK_N
        a_ptr = lora_A_ptr
        if PER_ROW:
            # Program slot s takes the tile's s-th adapter (next_adapter from the smallest
            # up) and stores its rows only; a slot past the tile's adapters walks no K step
            # and stores nothing. The launcher gives each row tile min(n, rows) slots, so
            # every adapter present has programs of its own, reading only its A.
            index = tl.load(index_ptr + m0 + rows_m, mask=rows_ok, other=-1)
            adapter = next_adapter(index, -1)
            for _ in range(lora_program // r_tiles):
                adapter = next_adapter(index, adapter)
            present = adapter < NO_ADAPTER
            rows_ok = index == adapter
            a_ptr = lora_A_ptr + tl.where(present, adapter, 0).to(tl.int64) * R * K
            k_end = tl.where(present, k_end, k_begin)
        acc = _partial_products(x_tile_ptr, a_ptr, absmax_ptr, table_ptr, nested_code_ptr,
                                nested_absmax_ptr, row_bytes, num_blocks, blocksize_log2,
                                nested_blocksize_log2, nested_offset, row0, R, M_tile, K,
                                k_begin, k_end, NESTED, True, BLOCK_M, BLOCK_N, BLOCK_K)
        rows_limit = R
        first_col = N + row0
    rows_n = tl.arange(0, BLOCK_N)
    store_split_partial(partial_ptr, acc, m0 + rows_m, first_col + rows_n, M, N + R,
                        rows_ok[:, None] & (row0 + rows_n < rows_limit)[None, :])


def block_m_for(m: int) -> int:
    return 1 if m == 1 else 16


def launch_config(block_m: int, x_type: str, nested: bool, per_row: bool = False) -> dict:
    """Pass 1's constexprs and launch options; per_row: a mixed-adapter batch's shrink.
    enable_fp_fusion=False as in lora_matmul.launch_config (the M == 1 products and sums
    stay unfused, as in the interpreter)."""
    block_n, block_k, num_warps = TILES[(block_m, x_type)]
    return dict(NESTED=nested, PER_ROW=per_row, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_K=block_k, num_warps=num_warps, enable_fp_fusion=False)


def adapter_slots(m: int, adapters: int, config: dict) -> int:
    """Shrink programs per rank tile and row tile of a mixed-adapter batch: one per adapter
    a tile's rows can hold, min(n, rows per tile)."""
    return max(1, min(adapters, m, config["BLOCK_M"]))


def grid(n: int, r: int, splits: int, config: dict, m: int = 1, slots: int = 1) -> tuple:
    """(W tiles + rank tiles x slots, splits, row tiles); one row tile for M <= BLOCK_M."""
    return (triton.cdiv(n, config["BLOCK_N"]) + triton.cdiv(r, config["BLOCK_N"]) * slots,
            splits, triton.cdiv(m, config["BLOCK_M"]))


def compile_targets():
    """Every (signature, config) pass 1 can run with: BLOCK_M x x dtype x nested x per-row
    shrink (the LoRA shrink is extra programs of the same binary, the rank a runtime
    bound)."""
    for block_m in BLOCK_MS:
        for x_type in X_TYPES:
            for nested in (False, True):
                for per_row in (False, True):
                    signature = {"x_ptr": f"*{x_type}", **weight_signature(nested),
                                 "lora_A_ptr": f"*{x_type}", "index_ptr": "*i32",
                                 "partial_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                                 "R": "i32", "k_per_split": "i32"}
                    label = f"M_block={block_m} x={x_type} nested={nested}"
                    yield (label + " per_row" if per_row else label, signature,
                           launch_config(block_m, x_type, nested, per_row))
