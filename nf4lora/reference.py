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
  * two 4-bit codes per byte, the first element in the high nibble.
"""
from __future__ import annotations

import math

import torch

from .codebook import FP4_ABS_THRESHOLDS, FP4_CODE_BY_RANK, get_4bit_type


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


def nf4_thresholds(device=None) -> torch.Tensor:
    """The 15 float32 midpoints between consecutive NF4 values.

    bitsandbytes' CUDA encoder hard-codes these as literals in a decision tree; each
    literal equals the float32 midpoint computed here (checked in the tests).
    """
    table = get_4bit_type("nf4", device)
    return (table[:-1] + table[1:]) / 2


def encode_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code, ties to the lower code; NaN gives code 0 (CUDA semantics).

    The code is the number of midpoints strictly below x: a value exactly on a
    midpoint is not above it, so it stays with the lower code, and NaN is above
    nothing. bitsandbytes' CPU path maps an all-zero block (NaN here) to code 7.
    """
    return (scaled.unsqueeze(-1) > nf4_thresholds(scaled.device)).sum(-1).to(torch.uint8)


def encode_fp4(scaled: torch.Tensor) -> torch.Tensor:
    """FP4 code: sign bit 0b1000 for x < 0, magnitude from CUDA's thresholds on |x|.

    -0.0 and NaN are not below zero, so they get a clear sign bit; a tiny negative
    value gets 0b1000 (negative zero).
    """
    thresholds = torch.tensor(FP4_ABS_THRESHOLDS, dtype=torch.float32, device=scaled.device)
    rank = (scaled.abs().unsqueeze(-1) > thresholds).sum(-1)
    magnitude = torch.tensor(FP4_CODE_BY_RANK, dtype=torch.uint8, device=scaled.device)[rank]
    return magnitude | ((scaled < 0).to(torch.uint8) << 3)


ENCODERS = {"nf4": encode_nf4, "fp4": encode_fp4}


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
    scale (NF4: code 7, FP4: code 0; an all-zero last block: code 0).
    """
    n = values.numel()
    absmax, scaled = _scale_blocks(values, blocksize)
    codes = ENCODERS[quant_type](scaled).reshape(-1)[: 2 * ((n + 1) // 2)]
    return pack_nibbles(codes), absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                    quant_type: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """table[code] * absmax[block], rounded once to `dtype` (round to nearest even)."""
    n = math.prod(shape)
    codes = unpack_nibbles(packed.reshape(-1).view(torch.uint8), n)
    table = get_4bit_type(quant_type, packed.device)
    decoded = _as_padded_blocks(table[codes.long()], blocksize) * absmax.float().unsqueeze(1)
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

def lora_matmul_4bit(x: torch.Tensor, W: torch.Tensor, lora_A, lora_B, scaling: float, bias):
    """(y, h) for x [M, in]: h = x @ lora_A^T [M, r] ([M, 0] without LoRA) and
    y = x @ W^T + bias + scaling * h @ lora_B^T, the LoRA term added in one addmm (one
    rounding of the sum, as a kernel accumulating both products into one tile does)."""
    y = torch.nn.functional.linear(x, W, bias)
    if lora_A is None:
        return y, x.new_empty((x.shape[0], 0))
    h = torch.nn.functional.linear(x, lora_A)
    return torch.addmm(y, h, lora_B.t(), alpha=scaling), h


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
