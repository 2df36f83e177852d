"""The matmul ops for a backend without a fused kernel: dequantize W, then torch's matmul.

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

from . import PackedWeight


def dense_weight(backend, weight: PackedWeight, dtype: torch.dtype) -> Tensor:
    out = torch.empty((weight.out_features, weight.in_features), dtype=dtype,
                      device=weight.packed.device)
    backend.dequantize_4bit(weight.packed, weight.absmax, weight.blocksize, weight.quant_type,
                            out, weight.nested)
    return out


def lora_matmul_4bit(backend, x: Tensor, weight: PackedWeight, lora_A: Optional[Tensor],
                     lora_B: Optional[Tensor], scaling: float, bias: Optional[Tensor]):
    y = torch.nn.functional.linear(x, dense_weight(backend, weight, x.dtype), bias)
    if lora_A is None:
        return y, x.new_empty((x.shape[0], 0))
    h = torch.nn.functional.linear(x, lora_A)
    # y + scaling * h @ B^T in one addmm: one rounding of the sum, as a fused kernel
    # accumulating both products into the same output tile does.
    return torch.addmm(y, h, lora_B.t(), alpha=scaling), h


def lora_matmul_4bit_grad_input(backend, grad: Tensor, weight: PackedWeight,
                                lora_A: Optional[Tensor], grad_h: Optional[Tensor]) -> Tensor:
    dx = grad @ dense_weight(backend, weight, grad.dtype)
    return dx if grad_h is None else torch.addmm(dx, grad_h, lora_A)
