"""Autograd Functions over 4-bit weights: `matmul_4bit` and `lora_matmul_4bit`.

    y = x @ W^T + scaling * (x @ A^T) @ B^T + bias          W = dequantize_4bit(weight) [out, in]

Only the packed weight and its QuantState are kept for backward, never a dequantized
copy: W is dequantized again there (QLoRA's memory saving; dequantization is cheap next to
the matmul). The 4-bit weight gets no gradient; x, lora_A, lora_B and bias do when they
require it.

Everything that touches W goes through the ops `nf4lora::lora_matmul_4bit` and
`nf4lora::lora_matmul_4bit_grad_input` (nf4lora/_ops.py), via `_forward` and `_grad_input`
below; each backend runs them with its fused kernels, or with the composite path
(dequantize, then torch matmuls in x.dtype, accumulating in fp32 for fp16/bf16 as torch
does) where it has none.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _ops, functional
from .quant_state import FLOAT_DTYPES

__all__ = ["matmul_4bit", "lora_matmul_4bit"]


# --------------------------------------------------------------------------------------
# The one place the kernels are called.
# --------------------------------------------------------------------------------------

def _weight_args(weight: Tensor, quant_state) -> tuple:
    """The packed weight and its state as the positional arguments of the matmul ops."""
    packed = weight.detach().reshape(-1)
    packed = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    nested = functional.nested_args(quant_state)
    out_features, in_features = quant_state.shape
    return (packed, quant_state.absmax, quant_state.blocksize, quant_state.quant_type,
            int(out_features), int(in_features), nested.get("nested_absmax"),
            nested.get("nested_code"), nested.get("nested_offset"),
            nested.get("nested_blocksize", 256))


def _forward(x2: Tensor, weight: Tensor, quant_state, lora_A: Optional[Tensor],
             lora_B: Optional[Tensor], scaling: float, bias: Optional[Tensor]):
    """-> (y [M, out], h = x @ A^T [M, r] or None). x2 is [M, in]."""
    y, h = _ops.call_lora_matmul_4bit(x2, *_weight_args(weight, quant_state), lora_A, lora_B,
                                      scaling, bias)
    return y, (h if lora_A is not None else None)


def _grad_input(g2: Tensor, weight: Tensor, quant_state, lora_A: Optional[Tensor],
                gBs: Optional[Tensor]) -> Tensor:
    """dL/dx [M, in] = g @ W + (scaling * g @ B) @ A, with gBs = scaling * g @ B given."""
    return _ops.call_lora_matmul_4bit_grad_input(g2, *_weight_args(weight, quant_state), lora_A,
                                                 gBs)


# --------------------------------------------------------------------------------------
# The autograd Function (one for both entry points: lora_A/lora_B None means no adapter).
# --------------------------------------------------------------------------------------

class _Matmul4bit(torch.autograd.Function):
    """On 2-D x [M, in] only. Callers reshape outside the Function: a view created inside a
    custom Function may not be modified in place (PEFT's AdaLoRA adds to the output in
    place), while a view of its output made outside is tracked by autograd as usual."""

    @staticmethod
    def forward(ctx, x2, weight, quant_state, lora_A, lora_B, scaling, bias):
        y, h = _forward(x2, weight, quant_state, lora_A, lora_B, scaling, bias)
        ctx.quant_state = quant_state
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        _, _, _, need_A, need_B, _, _ = ctx.needs_input_grad
        # The packed weight, not W: W is dequantized again in backward. The activations
        # only when a gradient needs them: x for dA, h = x @ A^T for dB.
        ctx.save_for_backward(x2 if need_A else None, weight, lora_A, lora_B,
                              h if need_B else None)
        return y

    @staticmethod
    def backward(ctx, g2):
        x2, weight, lora_A, lora_B, h = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _, need_bias = ctx.needs_input_grad
        dx = dA = dB = dbias = None
        gBs = None
        if lora_A is not None and (need_x or need_A):
            gBs = (g2 @ lora_B) * ctx.scaling                      # [M, r]
        if need_x:
            dx = _grad_input(g2, weight, ctx.quant_state, lora_A, gBs)
        if need_A:
            dA = gBs.t() @ x2                                       # [r, in]
        if need_B:
            dB = (g2.t() @ h) * ctx.scaling                         # [out, r]
        if need_bias and ctx.has_bias:
            dbias = g2.sum(0)
        return dx, None, None, dA, dB, None, dbias


def _apply(x: Tensor, weight: Tensor, quant_state, lora_A, lora_B, scaling: float,
           bias: Optional[Tensor]) -> Tensor:
    """y [..., out] for x [..., in]; the reshapes stay outside the autograd Function."""
    x2 = x.reshape(-1, x.shape[-1])
    y = _Matmul4bit.apply(x2, weight, quant_state, lora_A, lora_B, scaling, bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------------------
# Public entry points: check arguments (naming the bad one), then run.
# --------------------------------------------------------------------------------------

def _check_state(quant_state) -> tuple[int, int]:
    if quant_state is None:
        raise ValueError("quant_state is required (the weight's QuantState)")
    shape = getattr(quant_state, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D [out_features, in_features], got {shape}")
    return int(shape[0]), int(shape[1])


def _check_x(x: Tensor, in_features: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension in_features={in_features} (from "
                         f"quant_state.shape), got shape {tuple(x.shape)}. A weight quantized "
                         "from a [in, out] tensor must be re-quantized as [out, in].")


def _check_weight(weight: Tensor, quant_state, x: Tensor) -> None:
    functional.check_packed(weight, quant_state.shape, "weight")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")


def _check_operand(name: str, t: Optional[Tensor], shape: tuple, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype} "
                        f"(cast it, e.g. {name}.to(x.dtype))")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def matmul_4bit(A: Tensor, B: Tensor, quant_state, out: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tensor:
    """A @ W^T + bias for a 4-bit W, bitsandbytes' signature and convention.

    B is the packed weight, usually passed transposed (`layer.weight.t()`); either
    orientation works since quant_state.shape ([out, in]) is the source of truth.
    A has any leading dims; the result has A's dtype. A weight quantized from an [in, out]
    tensor (A's last dim matches quant_state.shape[0], not [1]) still works, with a
    DeprecationWarning, as in bitsandbytes.
    """
    out_features, in_features = _check_state(quant_state)
    if _is_in_out_oriented(A, out_features, in_features):
        return _matmul_in_out_oriented(A, B, quant_state, out, bias)
    _check_x(A, in_features)
    _check_weight(B, quant_state, A)
    _check_operand("bias", bias, (out_features,), A)
    if torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad)):
        result = _apply(A, B, quant_state, None, None, 1.0, bias)
    else:  # no graph to record: skip the Function (and its saved tensors)
        x2 = A.reshape(-1, in_features)
        result = _forward(x2, B, quant_state, None, None, 1.0, bias)[0]
        result = result.reshape(*A.shape[:-1], out_features)
    if out is not None:
        return out.copy_(result)
    return result


def _is_in_out_oriented(A, rows: int, cols: int) -> bool:
    """bitsandbytes' rule: a state of shape [K, N] with K = A's last dim and K != N was
    quantized from an [in, out] tensor (a square weight is taken as [out, in])."""
    return isinstance(A, Tensor) and A.dim() > 0 and A.shape[-1] == rows and rows != cols


def _matmul_in_out_oriented(A: Tensor, B: Tensor, quant_state, out, bias) -> Tensor:
    """A @ W for W [in, out]: dequantize and F.linear, as bitsandbytes does for this legacy
    layout (no fused kernel: the kernels read W as [out, in] rows)."""
    if not torch.compiler.is_compiling():
        warnings.warn(f"matmul_4bit: the weight was quantized from an [in, out] tensor "
                      f"(quant_state.shape={list(quant_state.shape)}); re-quantize it as "
                      "[out_features, in_features]. This will be an error in a future version.",
                      DeprecationWarning, stacklevel=3)
    in_features, out_features = (int(d) for d in quant_state.shape)
    _check_x(A, in_features)
    _check_weight(B, quant_state, A)
    _check_operand("bias", bias, (out_features,), A)
    W = functional.dequantize_4bit(B.reshape(-1), quant_state).to(A.dtype)    # [in, out]
    result = torch.nn.functional.linear(A, W.t(), bias)
    return out.copy_(result) if out is not None else result


def lora_matmul_4bit(x: Tensor, weight: Tensor, quant_state, lora_A: Tensor, lora_B: Tensor,
                     scaling: float, bias: Optional[Tensor] = None) -> Tensor:
    """x @ W^T + scaling * (x @ lora_A^T) @ lora_B^T + bias.

    weight: packed 4-bit [out*in/2, 1] (any quant_storage), W = its dequantization [out, in];
    lora_A [r, in], lora_B [out, r] and bias [out] in x's dtype; x has any leading dims.
    Gradients flow to x, lora_A, lora_B and bias (when they require grad), never to weight.
    """
    out_features, in_features = _check_state(quant_state)
    _check_x(x, in_features)
    _check_weight(weight, quant_state, x)
    if not isinstance(lora_A, Tensor) or lora_A.dim() != 2:
        raise ValueError(f"lora_A must be a 2-D tensor [r, in_features={in_features}], got "
                         f"{getattr(lora_A, 'shape', type(lora_A).__name__)}")
    r = lora_A.shape[0]
    _check_operand("lora_A", lora_A, (r, in_features), x)
    if lora_B is None:
        raise ValueError("lora_B is required")
    _check_operand("lora_B", lora_B, (out_features, r), x)
    _check_operand("bias", bias, (out_features,), x)
    if isinstance(scaling, Tensor) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python number, got {type(scaling).__name__}")
    return _apply(x, weight, quant_state, lora_A, lora_B, float(scaling), bias)
