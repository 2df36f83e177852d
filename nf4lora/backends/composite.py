"""The matmul ops for a backend without a fused kernel: dequantize W with the backend's
kernel, then the spec's matmul (nf4lora.reference.lora_matmul_4bit: torch's GEMMs).

This is also the right path for large M on every device: the dequantization (one pass
over 0.52 bytes per weight) is amortized over M rows of GEMM, and torch's GEMM (oneDNN,
cuBLAS) beats any hand-written fused kernel there (bitsandbytes found the same on H100).
W is dequantized straight into the compute dtype (fp32 products, one rounding), into a
fresh buffer that dies with the call: no dense copy of W outlives an op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._weight import PackedWeight


def dense_weight(backend, weight: PackedWeight, dtype: torch.dtype) -> Tensor:
    out = torch.empty((weight.out_features, weight.in_features), dtype=dtype,
                      device=weight.packed.device)
    backend.dequantize_4bit(weight, out)
    return out


def lora_matmul_4bit(backend, x: Tensor, weight: PackedWeight, lora_A: Optional[Tensor],
                     lora_B: Optional[Tensor], scaling: float, bias: Optional[Tensor]):
    W = dense_weight(backend, weight, x.dtype)
    return reference.lora_matmul_4bit(x, W, lora_A, lora_B, scaling, bias)


def lora_matmul_4bit_grad_input(backend, grad: Tensor, weight: PackedWeight,
                                lora_A: Optional[Tensor], grad_h: Optional[Tensor]) -> Tensor:
    W = dense_weight(backend, weight, grad.dtype)
    return reference.lora_matmul_4bit_grad_input(grad, W, lora_A, grad_h)


def multi_lora_matmul_4bit(backend, x: Tensor, weight: PackedWeight, lora_A: Tensor,
                           lora_B: Tensor, scalings: Tensor, adapter_index: Tensor,
                           bias: Optional[Tensor]) -> Tensor:
    """A mixed-adapter batch without a kernel of its own: the backend's fused matmul (the
    4-bit pass once for the whole batch, no adapter), then each row's adapter gathered
    with torch's batched GEMMs (reference.multi_lora_delta). A backend without a fused
    matmul (the reference backend) runs the spec on the dequantized W."""
    fused = getattr(backend, "lora_matmul_4bit", None)
    if fused is None:
        return reference.multi_lora_matmul_4bit(x, dense_weight(backend, weight, x.dtype), lora_A,
                                                lora_B, scalings, adapter_index, bias)
    y, _ = fused(x, weight, None, None, 1.0, bias)
    return y + reference.multi_lora_delta(x, lora_A, lora_B, scalings, adapter_index)


# The float32 rows one pass may decode at a time when it must see all of W but keep none of
# it: 1 Mi elements = 4 MiB (256 rows of a 4096-wide layer; 16 chunks of a 4096x4096 W, each
# one dequantize call, which costs ~1/16 of the pass anyway).
CHUNK_ELEMENTS = 1 << 20


def row_sq_norms_4bit(backend, weight: PackedWeight) -> Tensor:
    """||W_o||^2 of every row [out], float32: W decoded by the backend's kernel in row chunks
    of <= CHUNK_ELEMENTS into one reused buffer (the spec: nf4lora.reference.row_sq_norms).
    Double-quantized constants are decoded first (PackedWeight.with_absmax_decoded), so a
    chunk may start on any block boundary."""
    weight = weight.with_absmax_decoded()
    N, K = weight.shape
    out = torch.zeros(N, dtype=torch.float32, device=weight.device)
    if N == 0 or K == 0:
        return out
    granule = weight.row_granule
    rows = min(N, max(granule, CHUNK_ELEMENTS // K // granule * granule))
    buffer = torch.empty(rows * K, dtype=torch.float32, device=weight.device)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        chunk = buffer[: (n1 - n0) * K].view(n1 - n0, K)
        backend.dequantize_4bit(weight.rows(n0, n1), chunk)
        torch.sum(chunk.square_(), dim=1, out=out[n0:n1])
    return out
