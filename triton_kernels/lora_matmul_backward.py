"""Input gradient of the 4-bit LoRA matmul, with W read packed:

    dx = dy @ W + grad_h @ A,   grad_h = scaling * dy @ B (computed by the caller)
    dy [M, N], W 4-bit [N, K], A [R, K], dx [M, K]

Spec: `nf4lora.backends.composite.lora_matmul_4bit_grad_input`. Nothing dense of W
exists between calls (the autograd Function saves the packed weight and its state only);
this kernel decodes W tile by tile where the composite path writes and re-reads a
dense [N, K] copy.

The access pattern is the forward's transposed: W is stored [out, in] row-major with
its quantization blocks running along `in`, and dx's reduction runs over `out`. One
program owns a [BLOCK_M, BLOCK_K] tile of dx (BLOCK_K input features) and walks down
the rows of W: each step reads BLOCK_N rows x BLOCK_K / 2 bytes, a 32-byte segment per
row (one DRAM sector; 16 bytes for fp32's narrower tile, the other half read by the
neighbouring program from L2) at a stride of K / 2 bytes, decodes the [BLOCK_N, BLOCK_K] tile
with the same helper as the forward, and feeds it to the MMA untransposed
(dy tile [BLOCK_M, BLOCK_N] @ W tile [BLOCK_N, BLOCK_K]). Two absmax per 32-element
chunk of a row are decoded per tile (lora_matmul.load_weight_tile), never one per element.

The LoRA term is the epilogue: grad_h [M, R] @ A[:, k tile], R in chunks of 16, into
the same fp32 accumulator, so dx is rounded once (the composite path rounds after
dy @ W and again after the addmm).

Split-K (SPLIT_K), as the forward's (lora_matmul.py): at in_features = 4096 the dx tiles
are 64 programs for 132 SMs, so the reduction over N is cut into slices, each program
(tile, split) writes fp32 partials, and lora_matmul.split_k_reduce_kernel sums them in
order and adds grad_h @ A (as h @ L^T with L = A^T: strides 1, K; scaling 1).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codec import to_output_dtype
from .lora_matmul import (LORA_CHUNK, NUM_STAGES, TILES, WEIGHT_DO_NOT_SPECIALIZE,
                          dot_accumulate, load_weight_tile, output_tile, reduction_range,
                          store_split_partial, weight_signature)

X_TYPES = ("fp32", "fp16", "bf16")


# n_per_split is unused without SPLIT_K, and with it the slice start is declared a
# multiple of BLOCK_N (lora_matmul.reduction_range): no specialization on it either.
@triton.jit(do_not_specialize=WEIGHT_DO_NOT_SPECIALIZE + ["n_per_split"])
def lora_matmul_grad_input_kernel(
    grad_ptr,           # fp32/fp16/bf16 [M, N], dy
    # the weight arguments of W [N, K] (lora_matmul.weight_signature)
    packed_ptr, absmax_ptr, table_ptr, nested_code_ptr, nested_absmax_ptr,
    row_bytes, num_blocks, blocksize_log2, nested_blocksize_log2, nested_offset,
    lora_A_ptr,         # dy's dtype [R, K] (HAS_LORA only)
    grad_h_ptr,         # dy's dtype [M, R] (HAS_LORA only)
    dx_ptr,             # dy's dtype [M, K] (not SPLIT_K)
    partial_ptr,        # fp32 [splits, M, K] (SPLIT_K only)
    # sizes
    M, N, K, R,
    n_per_split,            # a multiple of BLOCK_N (SPLIT_K only)
    # meta-parameters
    NESTED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    SPLIT_K: tl.constexpr,   # grid (tiles, splits): fp32 partials, no LoRA term
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,   # the reduction step, over rows of W
    BLOCK_K: tl.constexpr,   # dx columns per program
):
    rows_m, first_col, cols_k = output_tile(M, BLOCK_M, BLOCK_K)
    row_ok = rows_m < M
    DY_DTYPE: tl.constexpr = grad_ptr.dtype.element_ty
    n_begin, n_end = reduction_range(N, n_per_split, SPLIT_K, BLOCK_N)
    acc = tl.full([BLOCK_M, BLOCK_K], 0.0, tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        # Rows of dy past N are zero: they cancel the garbage rows of a partial W tile.
        dy = tl.load(grad_ptr + rows_m[:, None] * N + ns[None, :],
                     mask=row_ok[:, None] & (ns < N)[None, :], other=0.0)
        w = load_weight_tile(packed_ptr, absmax_ptr, table_ptr, nested_code_ptr,
                             nested_absmax_ptr, row_bytes, num_blocks, blocksize_log2,
                             nested_blocksize_log2, nested_offset, n0, first_col, N,
                             NESTED, BLOCK_N, BLOCK_K)
        # W rounded once to dy's dtype, as the composite path's dequantize_4bit does.
        acc = dot_accumulate(dy, to_output_dtype(w, DY_DTYPE), acc)

    mask = row_ok[:, None] & (cols_k < K)[None, :]
    if SPLIT_K:
        store_split_partial(partial_ptr, acc, rows_m, cols_k, M, K, mask)
    else:
        if HAS_LORA:
            # grad_h @ A into the same accumulator, chunk by chunk (not lora_matmul's
            # lora_term, which keeps the forward's h @ B^T apart to scale it once).
            for r0 in range(0, R, LORA_CHUNK):
                ranks = r0 + tl.arange(0, LORA_CHUNK)
                grad_h = tl.load(grad_h_ptr + rows_m[:, None] * R + ranks[None, :],
                                 mask=row_ok[:, None] & (ranks < R)[None, :], other=0.0)
                lora_A = tl.load(lora_A_ptr + ranks[:, None] * K + cols_k[None, :],
                                 mask=(ranks < R)[:, None] & (cols_k < K)[None, :], other=0.0)
                acc = dot_accumulate(grad_h, lora_A, acc)
        tl.store(dx_ptr + rows_m[:, None] * K + cols_k[None, :],
                 to_output_dtype(acc, DY_DTYPE), mask=mask)


def launch_config(x_type: str, nested: bool, has_lora: bool, split_k: bool = False) -> dict:
    """The forward's tiles (lora_matmul.TILES) with BLOCK_N and BLOCK_K in their roles
    swapped: BLOCK_K is the output width here, BLOCK_N the reduction step. Each W tile
    is [BLOCK_N, BLOCK_K] either way. enable_fp_fusion=False as in the forward. With
    split_k the LoRA term belongs to the reduction (lora_matmul.reduce_config)."""
    block_m, block_n, block_k, num_warps = TILES[x_type]
    return dict(NESTED=nested, HAS_LORA=has_lora and not split_k, SPLIT_K=split_k,
                BLOCK_M=block_m, BLOCK_N=block_k, BLOCK_K=block_n, num_warps=num_warps,
                num_stages=NUM_STAGES, enable_fp_fusion=False)


def grid(m: int, k: int, config: dict, splits: int = 1) -> tuple:
    return (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(k, config["BLOCK_K"]), splits)


def compile_targets():
    """Every (signature, config) the launcher can choose: dy dtype x nested x (LoRA, or
    split-K). Without split-K the launcher passes dx as the (unused) partial pointer."""
    for x_type in X_TYPES:
        for nested in (False, True):
            for split_k, has_lora in ((False, False), (False, True), (True, False)):
                signature = {"grad_ptr": f"*{x_type}", **weight_signature(nested),
                             "lora_A_ptr": f"*{x_type}", "grad_h_ptr": f"*{x_type}",
                             "dx_ptr": f"*{x_type}",
                             "partial_ptr": "*fp32" if split_k else f"*{x_type}",
                             "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                             "n_per_split": "i32"}
                label = (f"dy={x_type} nested={nested} split_k" if split_k else
                         f"dy={x_type} nested={nested} lora={has_lora}")
                yield label, signature, launch_config(x_type, nested, has_lora, split_k)
