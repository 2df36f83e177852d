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
