"""The specification of the nf4lora format and ops, in plain PyTorch.

Every backend (C++ CPU, CUDA, Triton) is tested against these functions, and the format
functions are tested against bitsandbytes. They are written to be read, not to be
fast. Where bitsandbytes' CPU path and its CUDA kernels disagree, this follows the
CUDA kernels (the format most checkpoints were written with); each such place says so.

Conventions shared by every function here:
  * the input is flattened row-major; a block is `blocksize` consecutive elements and
    may straddle rows; the last block may be partial and has its own absmax;
  * all arithmetic is float32, one IEEE operation at a time (no fused multiply-add):
    scaled = x * (1 / absmax), decoded = table[code] * absmax;
  * two 4-bit codes per byte, the first element in the high nibble;
  * a 4-bit format is named by its format key (nf4lora.codebook: "nf4", "fp4", "af4", ...,
    or a custom code book's key) and decodes as codebook.table(key)[code] * absmax.
"""
from __future__ import annotations

import math

import torch

from .codebook import FP4_ABS_THRESHOLDS, FP4_CODE_BY_RANK, get_4bit_type, table


def num_blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def _as_padded_blocks(values: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 view [blocks, blocksize] of a flat tensor, the tail padded with zeros."""
    flat = values.reshape(-1).float()
    blocks = num_blocks(flat.numel(), blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - flat.numel()))
    return padded.view(blocks, blocksize)


def _scale_blocks(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1] by its reciprocal.

    Padding zeros are scaled too (they become the low nibble of an odd-length tail).
    An all-zero block has absmax 0, reciprocal inf, and scaled values 0 * inf = NaN,
    as in bitsandbytes' CUDA kernel; the encoders map NaN to a fixed code.
    A NaN anywhere in a block makes its absmax NaN (amax propagates it), which is
    how callers detect bad input.
    """
    blocks = _as_padded_blocks(values, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax).unsqueeze(1)
    return absmax, scaled


def midpoints(levels: torch.Tensor) -> torch.Tensor:
    """The 15 float32 midpoints (levels[i] + levels[i+1]) / 2 of 16 sorted float32 levels."""
    return (levels[:-1] + levels[1:]) / 2


def nf4_thresholds(device=None) -> torch.Tensor:
    """The 15 float32 midpoints between consecutive NF4 values.

    bitsandbytes' CUDA encoder hard-codes these as literals in a decision tree; each
    literal equals the float32 midpoint computed here (checked in the tests).
    """
    return midpoints(get_4bit_type("nf4", device))


def encode_sorted(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest level of a sorted 16-entry table, ties to the lower level; NaN gives code 0.

    The code is the number of float32 midpoints strictly below x: a value exactly on a
    midpoint is not above it, so it stays with the lower level, and NaN (an all-zero
    block: 0 * inf) is above nothing, so it gets code 0, as in bitsandbytes' CUDA kernel
    (its CPU path gives NF4 code 7). Where the float32 midpoint is the exact midpoint
    rounded up, a value equal to it counts as a tie although it is a hair nearer the upper
    level. (15 compare-and-add passes: 3-5x faster on CPU than torch.bucketize here.)
    """
    codes = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for midpoint in midpoints(levels.to(scaled.device)):
        codes += scaled > midpoint
    return codes


def encode_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code, ties to the lower code; NaN gives code 0 (CUDA semantics):
    `encode_sorted` with the NF4 table (its midpoints are bitsandbytes' CUDA thresholds)."""
    return encode_sorted(scaled, get_4bit_type("nf4", scaled.device))


def encode_fp4(scaled: torch.Tensor) -> torch.Tensor:
    """FP4 code: sign bit 0b1000 for x < 0, magnitude from CUDA's thresholds on |x|.

    -0.0 and NaN are not below zero, so they get a clear sign bit; a tiny negative
    value gets 0b1000 (negative zero).
    """
    thresholds = torch.tensor(FP4_ABS_THRESHOLDS, dtype=torch.float32, device=scaled.device)
    rank = (scaled.abs().unsqueeze(-1) > thresholds).sum(-1)
    magnitude = torch.tensor(FP4_CODE_BY_RANK, dtype=torch.uint8, device=scaled.device)[rank]
    return magnitude | ((scaled < 0).to(torch.uint8) << 3)


def encode(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes of scaled values in the format `quant_type` (a format key): FP4 by its
    own sign/magnitude rule, every other format by the nearest level of its sorted table."""
    if quant_type == "fp4":
        return encode_fp4(scaled)
    return encode_sorted(scaled, table(quant_type, scaled.device))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[2k] codes -> [k] bytes, the first code of each pair in the high nibble."""
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit codes of a flat uint8 tensor, high nibble first."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)[:n]


def quantize_4bit(values: torch.Tensor, blocksize: int = 64,
                  quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization.

    Returns (packed uint8 [ceil(n/2)], absmax float32 [ceil(n/blocksize)]).
    For odd n the last byte's low nibble encodes a padding zero with the last block's
    scale (the code nearest 0: NF4 7, FP4 0; an all-zero last block: code 0).
    `quant_type` is a format key (nf4lora.codebook.format_key).
    """
    n = values.numel()
    absmax, scaled = _scale_blocks(values, blocksize)
    codes = encode(scaled, quant_type).reshape(-1)[: 2 * ((n + 1) // 2)]
    return pack_nibbles(codes), absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                    quant_type: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """table[code] * absmax[block], rounded once to `dtype` (round to nearest even);
    `quant_type` is a format key (nf4lora.codebook.format_key)."""
    n = math.prod(shape)
    codes = unpack_nibbles(packed.reshape(-1).view(torch.uint8), n)
    levels = table(quant_type, packed.device)
    # levels[codes], by index_select: ~10x faster than advanced indexing on CPU
    decoded = torch.index_select(levels, 0, codes.int())
    decoded = _as_padded_blocks(decoded, blocksize) * absmax.float().unsqueeze(1)
    return decoded.reshape(-1)[:n].to(dtype).reshape(shape)


def encode_dynamic(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest index in a sorted 256-entry code, exactly as bitsandbytes' CUDA dQuantize.

    A 7-step binary search (start at 127, steps 64..1, move up while x > code[pivot])
    leaves x bracketed by code[lower] < x <= code[upper] with the final pivot between.
    The nearest of the three wins, using float32 midpoints; a value exactly on a
    midpoint goes to the pivot. NaN moves down every step and ends at index 0.
    bitsandbytes' CPU path instead reads a 65536-bin lookup table, an approximation
    that differs near midpoints.
    """
    pivot = torch.full(scaled.shape, 127, dtype=torch.long, device=scaled.device)
    lower = torch.zeros_like(pivot)
    upper = torch.full_like(pivot, 255)
    step = 64
    while step > 0:
        up = scaled > code[pivot]
        lower = torch.where(up, pivot, lower)
        upper = torch.where(up, upper, pivot)
        pivot = torch.where(up, pivot + step, pivot - step)
        step //= 2
    value = code[pivot]
    above = scaled > value
    toward_upper = scaled > (code[upper] + value) * 0.5
    toward_lower = scaled < (code[lower] + value) * 0.5
    index = torch.where(above, torch.where(toward_upper, upper, pivot),
                        torch.where(toward_lower, lower, pivot))
    return index.to(torch.uint8)


def quantize_blockwise(values: torch.Tensor, code: torch.Tensor,
                       blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a 256-entry code (the dynamic map).

    Returns (codes uint8 in values' shape, absmax float32 [ceil(n/blocksize)]).
    """
    n = values.numel()
    absmax, scaled = _scale_blocks(values, blocksize)
    codes = encode_dynamic(scaled, code.float()).reshape(-1)[:n]
    return codes.reshape(values.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code[q] * absmax[block], rounded once to `dtype`."""
    n = codes.numel()
    decoded = _as_padded_blocks(code.float()[codes.reshape(-1).long()], blocksize)
    decoded = decoded * absmax.float().unsqueeze(1)
    return decoded.reshape(-1)[:n].to(dtype).reshape(codes.shape)


def double_quantize(absmax: torch.Tensor, code: torch.Tensor, nested_blocksize: int = 256):
    """Compress float32 absmax to 8 bits: subtract the mean, then quantize blockwise.

    Returns (qabsmax uint8, nested_absmax float32, offset float32 0-d tensor). The
    offset is torch's float32 mean, the very reduction bitsandbytes uses, so both
    libraries start from the same bits. An empty absmax has offset 0 (not NaN).
    """
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    qabsmax, nested_absmax = quantize_blockwise(absmax - offset, code, nested_blocksize)
    return qabsmax, nested_absmax, offset


def dequantize_absmax(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor,
                      offset: float, nested_blocksize: int = 256) -> torch.Tensor:
    """absmax = code[q] * nested_absmax[i // nested_blocksize] + offset: two float32
    roundings, in this order, never fused."""
    scaled = dequantize_blockwise(qabsmax, nested_absmax, code, nested_blocksize)
    return scaled + torch.as_tensor(offset, dtype=torch.float32, device=scaled.device)


# --- the LoRA matmul: nf4lora::lora_matmul_4bit and its gradients ------------------------
# W is the 4-bit weight dequantized (dequantize_4bit above) to the activations' dtype,
# [out, in]. A backend's fused kernel may sum in another order and round less often; its
# tests bound the difference by the same computation's own error against float64.

def lora_matmul_4bit(x: torch.Tensor, W: torch.Tensor, lora_A, lora_B, scaling: float, bias,
                     row_scale=None):
    """(y, h) for x [M, in]: h = x @ lora_A^T [M, r] ([M, 0] without LoRA) and
    y = x @ W^T + bias + scaling * h @ lora_B^T, the LoRA term added in one addmm (one
    rounding of the sum, as a kernel accumulating both products into one tile does).
    row_scale [out] (DoRA's m / ||W + s B A||_row): y = row_scale * (x @ W^T + scaling *
    h @ lora_B^T) + bias, the product before it rounded to x's dtype."""
    y = torch.nn.functional.linear(x, W, None if row_scale is not None else bias)
    if lora_A is None:
        h = x.new_empty((x.shape[0], 0))
    else:
        h = torch.nn.functional.linear(x, lora_A)
        y = torch.addmm(y, h, lora_B.t(), alpha=scaling)
    if row_scale is not None:
        y = y * row_scale if bias is None else torch.addcmul(bias, y, row_scale)
    return y, h


def _rows_and_scales(scalings: torch.Tensor, adapter_index: torch.Tensor, dtype):
    """(each row's adapter, -1 read as 0; each row's scale [M, 1] in dtype, 0 where -1)."""
    rows = adapter_index.clamp(min=0)
    scale = scalings.index_select(0, rows).masked_fill(adapter_index < 0, 0.0)
    return rows, scale.to(dtype).unsqueeze(1)


def _own_blocks(adapter_index: torch.Tensor, n: int, dtype) -> torch.Tensor:
    """[M, n, 1]: 1 at each row's own adapter, 0 elsewhere (everywhere for -1 rows)."""
    own = torch.nn.functional.one_hot(adapter_index.clamp(min=0), n) * (adapter_index >= 0)[:, None]
    return own.to(dtype).unsqueeze(2)


def _stacked(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapters side by side: A [n r, in] (a view) and B [out, n r] (a copy), adapter i
    in rows (columns) i r .. i r + r - 1. Plain mm on these, not einsum over [n, r, .]:
    einsum's own plans took 2.1 against 0.39 ms (M = 8, n = 8, 4096x4096, r = 16, bf16,
    one thread)."""
    n, r, in_features = lora_A.shape
    return (lora_A.reshape(n * r, in_features),
            lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], n * r))


def dora_row_norms(W: torch.Tensor, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """DoRA's weight norm, [out]: ||W + scaling * lora_B @ lora_A||_2 of each output row
    (PEFT's DoraLinearLayer.get_weight_norm), in the operands' dtype."""
    return torch.linalg.vector_norm(W + scaling * (lora_B @ lora_A), dim=1)


def dora_matmul_4bit(x: torch.Tensor, W: torch.Tensor, lora_A, lora_B, scaling: float,
                     magnitude, bias=None) -> torch.Tensor:
    """DoRA (Liu et al. 2024, PEFT's definition): y = m / ||W + s B A||_row * (x @ W^T +
    s (x @ A^T) @ B^T) + bias, the norm detached (DoRA section 4.3: it gets no gradient).
    The row scale m / norm is taken in x's dtype, as lora_matmul_4bit's row_scale.
    A row whose norm is 0 divides by 0, as in PEFT."""
    norm = dora_row_norms(W, lora_A.detach(), lora_B.detach(), scaling).detach()
    row_scale = (magnitude / norm).to(x.dtype)
    return lora_matmul_4bit(x, W, lora_A, lora_B, scaling, bias, row_scale=row_scale)[0]


def row_sq_norms(W: torch.Tensor) -> torch.Tensor:
    """||W_o||^2 of each row of W [out, in], float32 (nf4lora::row_sq_norms_4bit on the
    dequantized weight; summed in float64 here, the kernels sum float32 chunks)."""
    return W.double().square().sum(1).float()


def multi_lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scalings: torch.Tensor, adapter_index: torch.Tensor) -> torch.Tensor:
    """The adapters' term of a mixed-adapter batch, [M, out] for x [M, in]: row m gets
    scalings[i] * (x[m] @ lora_A[i]^T) @ lora_B[i]^T with i = adapter_index[m], or 0 where
    i = -1 (the base model only). lora_A [n, r, in], lora_B [n, out, r] (adapters of
    smaller rank zero-padded to r: nf4lora.pad_adapters), scalings [n] float32. h [M, r]
    in x's dtype, then the product with B, scaled once.

    Evaluated in one of two forms, equal but for rounding, whichever reads fewer adapter
    values: per row for M <= n (each row gathers its own adapter, the BGMV form of
    Punica / S-LoRA: M r (in + out) values gathered), per adapter for M > n (every
    adapter's h for every row in one GEMM, each row keeping its own block, then one GEMM
    through the stacked B: n r (in + out) values and n times the rank-r work, in memory
    O(M n r) where the gather's is O(M r (in + out)): a prefill of 4096 rows at in = out =
    4096, r = 16 would gather 0.5 GB of A and B)."""
    rows, scale = _rows_and_scales(scalings, adapter_index, x.dtype)
    if x.shape[0] <= lora_A.shape[0]:
        h = torch.einsum("mi,mri->mr", x, lora_A.index_select(0, rows))
        delta = torch.einsum("mr,mor->mo", h, lora_B.index_select(0, rows))
    else:
        A, B = _stacked(lora_A, lora_B)
        h = (x @ A.T).view(x.shape[0], *lora_A.shape[:2]) * _own_blocks(adapter_index,
                                                                         lora_A.shape[0], x.dtype)
        delta = h.flatten(1) @ B.T
    return delta * scale


def multi_lora_delta_grad(grad: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                          lora_B: torch.Tensor, scalings: torch.Tensor,
                          adapter_index: torch.Tensor, need_x: bool = True,
                          need_A: bool = True, need_B: bool = True):
    """(dx [M, in], dlora_A [n, r, in], dlora_B [n, out, r]) of multi_lora_delta for grad
    [M, out] (None where not needed), in the same form as the forward: with g = grad *
    each row's scale and h as there, grad_h = g @ B_i per row, dx = grad_h @ A_i, and
    adapter i's dA and dB sum grad_h^T x and g^T h over its rows (rows with i = -1 have
    g = 0 and add nothing). Per row: gathered, the rows of one adapter summed by
    index_add; per adapter: grad_h of every adapter masked to each row's own block, then
    one GEMM each for dx, dA and dB, nothing of size M r (in + out)."""
    rows, scale = _rows_and_scales(scalings, adapter_index, grad.dtype)
    g = grad * scale
    dx = dA = dB = None
    if x.shape[0] <= lora_A.shape[0]:
        A_rows, B_rows = lora_A.index_select(0, rows), lora_B.index_select(0, rows)
        grad_h = torch.einsum("mo,mor->mr", g, B_rows)
        if need_x:
            dx = torch.einsum("mr,mri->mi", grad_h, A_rows)
        if need_A:
            dA = torch.zeros_like(lora_A).index_add_(0, rows, torch.einsum("mr,mi->mri", grad_h, x))
        if need_B:
            h = torch.einsum("mi,mri->mr", x, A_rows)
            dB = torch.zeros_like(lora_B).index_add_(0, rows, torch.einsum("mo,mr->mor", g, h))
        return dx, dA, dB
    n, r = lora_A.shape[:2]
    A, B = _stacked(lora_A, lora_B)
    own = _own_blocks(adapter_index, n, x.dtype)
    grad_h = ((g @ B).view(-1, n, r) * own).flatten(1)                    # [M, n r]
    if need_x:
        dx = grad_h @ A
    if need_A:
        dA = (grad_h.T @ x).view(lora_A.shape)
    if need_B:
        h = ((x @ A.T).view(-1, n, r) * own).flatten(1)
        dB = (g.T @ h).view(-1, n, r).permute(1, 0, 2).contiguous()      # [out, n r] -> [n, out, r]
    return dx, dA, dB


def multi_lora_matmul_4bit(x: torch.Tensor, W: torch.Tensor, lora_A, lora_B, scalings,
                           adapter_index, bias=None) -> torch.Tensor:
    """y = x @ W^T + bias + multi_lora_delta(...): one base product for the whole batch,
    each row's own adapter added to it."""
    return torch.nn.functional.linear(x, W, bias) + multi_lora_delta(x, lora_A, lora_B, scalings,
                                                                     adapter_index)


def lora_matmul_4bit_grad_input(grad: torch.Tensor, W: torch.Tensor, lora_A, grad_h):
    """dL/dx [M, in] = grad @ W + grad_h @ lora_A, with grad_h = scaling * grad @ lora_B
    (None without LoRA). The only gradient that reads W, so the only one with a kernel."""
    dx = grad @ W
    return dx if grad_h is None else torch.addmm(dx, grad_h, lora_A)


def lora_matmul_4bit_grad_adapters(grad: torch.Tensor, x, h, lora_B: torch.Tensor,
                                   scaling: float):
    """(grad_h, dL/dlora_A [r, in], dL/dlora_B [out, r]) for grad [M, out], x [M, in] and
    h = x @ lora_A^T from the forward: grad_h = scaling * grad @ lora_B, dA = grad_h^T @ x,
    dB = scaling * grad^T @ h (None where x or h is None: that gradient is not wanted).
    Small matrices (rank r): plain torch ops on every backend."""
    grad_h = (grad @ lora_B) * scaling
    dA = None if x is None else grad_h.t() @ x
    dB = None if h is None else (grad.t() @ h) * scaling
    return grad_h, dA, dB



# --- merge-aware re-quantization: each block's scale searched for the least error ---------
# Merging an adapter re-quantizes W + s B A (nf4lora.merge). The plain quantization scales
# each block by its absmax, which puts the largest value exactly on the outermost level but
# is not the scale with the least error for the rest of the block; this tries a few
# neighbouring scales. The format is unchanged: only the stored absmax (and so the codes)
# differ, so bitsandbytes and every nf4lora backend decode the result as before.
# nf4lora.merge.quantize_4bit_search is the vectorized implementation merging uses.
#
# The grid: the plain scale and 8 others, SEARCH_STEPS steps of the stored scale's own grid
# away from it: steps of SEARCH_STEP x absmax for a float32 absmax (factors 1.015, 1.0075,
# 1, 0.9925, 0.985, 0.97, 0.9475, 0.9175), steps of one 8-bit code for a double-quantized
# one (0.25-2.75% of the absmax on MiniLM, 10th-90th percentile, median 1.07%). Fine near 1
# and coarser below, because the best scale depends on how far W + s B A is from W's grid.
# MSE factor plain / search on MiniLM's 37 linear layers (NF4, blocksize 64), for
# ||s B A|| = 1.7%, 3.4%, 6.7% of ||W|| and a fresh quantization of W (README "Merging";
# `python -m bench.bench_merge --fresh`, other grids with --steps/--step):
#   double-quantized absmax, this grid: 1.134 1.142 1.127 1.110; codes q - 16..q + 3 (20
#     candidates): 1.137 1.147 1.135 1.126; codes q - 5..q + 2: 1.133 1.139 1.118 1.088;
#   float32 absmax, this grid: 1.137 1.146 1.133 1.119; all 93 scales 0.80-1.03 x absmax
#     in 0.25% steps: 1.156 1.155 1.143 1.148; factors 1 - 0.02 k, k = 0..7 (shrinking
#     only): 1.055 1.105 1.113 1.128; 1 + 0.0075 j, j = -5..2: 1.138 1.147 1.127 1.078.
# Scales above the absmax win in about a quarter of the blocks (among those 93, at 3.4%):
# the absmax fits the largest value exactly, the bulk of the block may prefer a wider grid.
# With double quantization the search is over the 8-bit codes under the plain offset and
# nested absmax, so every candidate is a scale as it will be decoded and the plain one is
# among them: no block comes out worse than plain. Searching float scales and then
# double-quantizing the chosen ones as usual (a new offset and nested absmax, each scale
# rounded to its nearest 8-bit code) gave 1.144 1.148 1.133 1.120, 0.5-1% more in total,
# but left 24% (at 1.7%) to 4% (fresh) of the blocks worse than plain (a one-off count,
# with the codes re-encoded for the rounded scales, which moved the factors by < 0.1%).
SEARCH_STEPS = (2, 1, 0, -1, -2, -4, -7, -11)
SEARCH_STEP = 0.0075


def search_scale_factors(steps=SEARCH_STEPS, step: float = SEARCH_STEP) -> torch.Tensor:
    """float32 [len(steps)]: the candidate float32 scales as fractions of the block absmax,
    1 + j * step for j in steps (each a Python float, rounded once)."""
    return torch.tensor([1.0 + j * step for j in steps], dtype=torch.float32)


def block_squared_error(codes: torch.Tensor, scale: torch.Tensor, blocks: torch.Tensor, n: int,
                        quant_type: str) -> torch.Tensor:
    """float64 [blocks]: each block's sum of (table[code] * scale - x)^2 over its elements.

    codes uint8 and blocks float32 are [blocks, blocksize] (the values padded with zeros),
    scale float32 [blocks]. The decoded value and the difference are float32, as decoding
    rounds them; squares and sums are float64. The padding after the n-th element is not an
    element and does not count."""
    decoded = table(quant_type, blocks.device)[codes.long()] * scale.unsqueeze(1)
    diff = (decoded - blocks).reshape(-1)
    diff[n:] = 0
    return diff.view(blocks.shape).double().square().sum(1)


def quantize_4bit_search(values: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                         nested_code=None, nested_blocksize: int = 256,
                         steps=SEARCH_STEPS, step: float = SEARCH_STEP):
    """Blockwise 4-bit quantization with each block's scale chosen for the least squared error.

    Candidates for a block with absmax a (the error of each: block_squared_error):
      * the plain quantization: quantize_4bit's codes, decoded with the scale a is stored
        as (a itself, or its double-quantized value);
      * for each j in steps, a scale s_j as it will be decoded, with the codes of
        x * (1 / s_j): without double quantization s_j = a * (1 + j * step) (float32,
        search_scale_factors); with it (nested_code: the 8-bit map), s_j is what the 8-bit
        code q + j decodes to (q: the plain code of a, the index clamped to 0..255), under
        the offset and nested absmax of the plain double_quantize(a), kept as they are: the
        stored offset need not be the mean of the stored scales, decoders read it and
        nothing recomputes it. A scale that is not positive is no candidate.
    The least error wins; ties go to the earlier candidate, the plain one first, so a block
    the plain quantization fits best keeps its plain codes and stored scale.

    Returns (packed uint8 [ceil(n/2)], absmax float32 [blocks]: the scale each block
    decodes with, double): double is None without nested_code, else (qabsmax uint8,
    nested_absmax float32, offset float32 0-d), which dequantize_absmax decodes to exactly
    `absmax`.
    """
    n = values.numel()
    blocks = _as_padded_blocks(values, blocksize)
    plain_packed, absmax = quantize_4bit(values, blocksize, quant_type)
    stored_codes = 2 * ((n + 1) // 2)           # with an odd n, the padding zero's code too
    plain_codes = torch.zeros(blocks.numel(), dtype=torch.uint8, device=values.device)
    plain_codes[:stored_codes] = unpack_nibbles(plain_packed, stored_codes)
    plain_codes = plain_codes.view(blocks.shape)

    if nested_code is None:
        stored = None
        plain_scale = absmax
        scales = absmax.unsqueeze(1) * search_scale_factors(steps, step).to(values.device)
    else:
        qabsmax, nested_absmax, offset = double_quantize(absmax, nested_code, nested_blocksize)
        offsets = torch.tensor(steps, dtype=torch.long, device=values.device)
        stored = (qabsmax.long().unsqueeze(1) + offsets).clamp(0, 255).to(torch.uint8)
        decode = lambda q: dequantize_absmax(q, nested_absmax, nested_code, offset,  # noqa: E731
                                             nested_blocksize)
        plain_scale = decode(qabsmax)
        scales = torch.stack([decode(q) for q in stored.unbind(1)], 1)
        stored = torch.cat([qabsmax.unsqueeze(1), stored], 1)

    candidates = [(plain_codes, plain_scale)] + [
        (encode(blocks * (1.0 / s).unsqueeze(1), quant_type), s) for s in scales.unbind(1)]
    errors = torch.stack([block_squared_error(c, s, blocks, n, quant_type)
                          for c, s in candidates], 1)
    errors[:, 1:][scales <= 0] = math.inf
    best = errors.argmin(1)        # the first least error: plain (index 0) wins a tie
    rows = torch.arange(best.numel(), device=values.device)
    codes = torch.stack([c for c, _ in candidates], 1)[rows, best]
    scale = torch.stack([s for _, s in candidates], 1)[rows, best]
    packed = pack_nibbles(codes.reshape(-1)[:stored_codes])
    double = None if stored is None else (stored[rows, best], nested_absmax, offset)
    return packed, scale, double
