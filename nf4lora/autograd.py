"""Autograd Functions over 4-bit weights: `matmul_4bit` and `lora_matmul_4bit`, and the
mixed-adapter batch `multi_lora_matmul_4bit` (each row its own adapter, through the op
`nf4lora::multi_lora_matmul_4bit`).

    y = x @ W^T + scaling * (x @ A^T) @ B^T + bias          W = dequantize_4bit(weight) [out, in]

Only the packed weight is kept for backward, never a dequantized copy: W is dequantized
again there (QLoRA's memory saving; dequantization is cheap next to the matmul). The 4-bit
weight gets no gradient; x, lora_A, lora_B and bias do when they require it.

The weight becomes a `PackedWeight` (nf4lora/_weight.py) once per call, which checks it
against its QuantState; everything that touches W then goes through the ops
`nf4lora::lora_matmul_4bit` and `nf4lora::lora_matmul_4bit_grad_input` (nf4lora/_ops.py,
which checks the activations); each backend runs them with its fused kernels, or with
the composite path (dequantize, then torch matmuls in x.dtype) where it has none. The
math of both is specified in nf4lora/reference.py.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _ops, functional, reference
from ._weight import PackedWeight, check_float, check_tensor

__all__ = ["matmul_4bit", "lora_matmul_4bit", "dora_matmul_4bit", "dora_row_norms_4bit",
           "row_sq_norms_4bit", "multi_lora_matmul_4bit", "pad_adapters"]


# --------------------------------------------------------------------------------------
# The autograd Function (one for both entry points: lora_A/lora_B None means no adapter).
# --------------------------------------------------------------------------------------

class _Matmul4bit(torch.autograd.Function):
    """On 2-D x [M, in] only. Callers reshape outside the Function: a view created inside a
    custom Function may not be modified in place (PEFT's AdaLoRA adds to the output in
    place), while a view of its output made outside is tracked by autograd as usual."""

    @staticmethod
    def forward(ctx, x2, weight: PackedWeight, lora_A, lora_B, scaling, bias, row_scale=None):
        if row_scale is None:
            y, h = _ops.call_lora_matmul_4bit(x2, weight, lora_A, lora_B, scaling, bias)
            unscaled = None
        else:  # the unscaled product is row_scale's gradient's other factor
            unscaled, h = _ops.call_lora_matmul_4bit(x2, weight, lora_A, lora_B, scaling, None)
            y = _ops.scale_rows(unscaled, row_scale, bias)
        # The packed weight, not W: W is dequantized again in backward. Its bytes go through
        # save_for_backward, so saved-tensor hooks (offloading, checkpointing) see them; the
        # small block constants stay on the descriptor. The activations only when a
        # gradient needs them: x for dA, h = x @ A^T for dB.
        ctx.weight = weight._replace(packed=None)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        _, _, need_A, need_B, _, _, need_scale = ctx.needs_input_grad
        ctx.save_for_backward(x2 if need_A else None, weight.packed, lora_A, lora_B,
                              h if need_B else None, row_scale,
                              unscaled if need_scale else None)
        return y

    @staticmethod
    def backward(ctx, g2):
        x2, packed, lora_A, lora_B, h, row_scale, unscaled = ctx.saved_tensors
        need_x, *_, need_bias, need_scale = ctx.needs_input_grad
        dx, dA, dB, dbias, dscale = _backward(ctx, g2, x2, packed, lora_A, lora_B, h, row_scale,
                                              unscaled if need_scale else None, need_x, need_bias)
        return dx, None, dA, dB, None, dbias, dscale


def _backward(ctx, g2, x2, packed, lora_A, lora_B, h, row_scale, unscaled, need_x, need_bias):
    """(dx, dA, dB, dbias, drow_scale) of y = row_scale * (x W^T + s h B^T) + bias (no row
    scale when it is None) for dL/dy = g2; a gradient is None where its input (x2 for dA,
    h for dB, unscaled for the row scale) was not saved or need_* says it is not wanted."""
    dx = dA = dB = dbias = grad_h = dscale = None
    if need_bias and ctx.has_bias:
        dbias = g2.sum(0)
    if row_scale is not None:  # through y = row_scale * unscaled + bias
        if unscaled is not None:
            dscale = (g2 * unscaled).sum(0)
        g2 = g2 * row_scale
    if lora_A is not None:
        grad_h, dA, dB = reference.lora_matmul_4bit_grad_adapters(g2, x2, h, lora_B, ctx.scaling)
    if need_x:
        dx = _ops.call_lora_matmul_4bit_grad_input(g2, ctx.weight._replace(packed=packed),
                                                    lora_A, grad_h)
    return dx, dA, dB, dbias, dscale


def _apply(x: Tensor, weight: PackedWeight, lora_A, lora_B, scaling: float,
           bias: Optional[Tensor], row_scale: Optional[Tensor] = None) -> Tensor:
    """y [..., out] for x [..., in]; the reshapes stay outside the autograd Function."""
    x2 = x.reshape(-1, x.shape[-1])
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias, row_scale))
    if needs_graph:
        y = _Matmul4bit.apply(x2, weight, lora_A, lora_B, scaling, bias, row_scale)
    else:  # no graph to record: skip the Function (and its saved tensors)
        y = _ops.call_lora_matmul_4bit(x2, weight, lora_A, lora_B, scaling, bias, row_scale)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------------------
# Public entry points: the weight checked against its state once, the activations' last
# dimension (needed to reshape them), then the op, which checks the rest.
# --------------------------------------------------------------------------------------

def _weight_of(B: Tensor, quant_state) -> PackedWeight:
    if quant_state is None:
        raise ValueError("quant_state is required (the weight's QuantState)")
    weight = PackedWeight.from_state(B, quant_state, "weight")
    if len(weight.shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D [out_features, in_features], got "
                         f"{list(weight.shape)}")
    return weight


def _check_x(x: Tensor, in_features: int) -> None:
    check_float("x", x)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension in_features={in_features} (from "
                         f"quant_state.shape), got shape {tuple(x.shape)}")


def matmul_4bit(A: Tensor, B: Tensor, quant_state, out: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tensor:
    """A @ W^T + bias for a 4-bit W, bitsandbytes' signature and convention.

    B is the packed weight, usually passed transposed (`layer.weight.t()`); either
    orientation works since quant_state.shape ([out, in]) is the source of truth.
    A has any leading dims; the result has A's dtype. A weight quantized from an [in, out]
    tensor (A's last dim matches quant_state.shape[0], not [1]) still works, with a
    DeprecationWarning, as in bitsandbytes.
    """
    weight = _weight_of(B, quant_state)
    if _is_in_out_oriented(A, *weight.shape):
        return _matmul_in_out_oriented(A, B, quant_state, weight, out, bias)
    _check_x(A, weight.in_features)
    result = _apply(A, weight, None, None, 1.0, bias)
    return out.copy_(result) if out is not None else result


def _is_in_out_oriented(A, rows: int, cols: int) -> bool:
    """bitsandbytes' rule: a state of shape [K, N] with K = A's last dim and K != N was
    quantized from an [in, out] tensor (a square weight is taken as [out, in])."""
    return isinstance(A, Tensor) and A.dim() > 0 and A.shape[-1] == rows and rows != cols


def _matmul_in_out_oriented(A: Tensor, B: Tensor, quant_state, weight: PackedWeight, out,
                            bias) -> Tensor:
    """A @ W for W [in, out]: dequantize and F.linear, as bitsandbytes does for this legacy
    layout (no fused kernel: the kernels read W as [out, in] rows)."""
    if not torch.compiler.is_compiling():
        warnings.warn(f"matmul_4bit: the weight was quantized from an [in, out] tensor "
                      f"(quant_state.shape={list(weight.shape)}); re-quantize it as "
                      "[out_features, in_features]. This will be an error in a future version.",
                      DeprecationWarning, stacklevel=3)
    check_float("A", A)
    W = functional.dequantize_4bit(B.reshape(-1), quant_state).to(A.dtype)    # [in, out]
    result = torch.nn.functional.linear(A, W.t(), bias)
    return out.copy_(result) if out is not None else result


def lora_matmul_4bit(x: Tensor, weight: Tensor, quant_state, lora_A: Tensor, lora_B: Tensor,
                     scaling: float, bias: Optional[Tensor] = None,
                     row_scale: Optional[Tensor] = None) -> Tensor:
    """x @ W^T + scaling * (x @ lora_A^T) @ lora_B^T + bias; with row_scale [out] (DoRA's
    magnitude over the row norms), row_scale * (x @ W^T + scaling * ...) + bias.

    weight: packed 4-bit [out*in/2, 1] (any quant_storage), W = its dequantization [out, in];
    lora_A [r, in], lora_B [out, r] and bias [out] in x's dtype; x has any leading dims.
    Gradients flow to x, lora_A, lora_B and bias (when they require grad), never to weight.
    """
    packed = _weight_of(weight, quant_state)
    _check_x(x, packed.in_features)
    if lora_A is None or lora_B is None:
        raise ValueError("lora_A and lora_B are required (matmul_4bit is the call without LoRA)")
    return _apply(x, packed, lora_A, lora_B, _check_scaling(scaling), bias, row_scale)


# --------------------------------------------------------------------------------------
# DoRA: the LoRA matmul with each output row scaled by magnitude / ||W + s B A||_row.
# --------------------------------------------------------------------------------------
# The norm needs all of W, but never W itself in full precision:
#     ||W_o + s (BA)_o||^2 = ||W_o||^2 + 2 s (W_o . (BA)_o) + s^2 ||(BA)_o||^2
# ||W_o||^2 belongs to the frozen weight (row_sq_norms_4bit: one chunked pass, cached by
# the layers); W_o . (BA)_o = sum_r B[o, r] (A W^T)[r, o] is a 4-bit matmul with lora_A as
# the activations, r more rows for the fused kernel. The forward therefore runs x's rows
# and A's rows through ONE lora_matmul_4bit call (one pass over W: on a GPU M + r rows
# cost what M rows cost up to M ~ 64). That call returns G = A (W + s B A)^T for A's rows,
# so G's dot with B is W_o . (BA)_o + s ||(BA)_o||^2, and
#     norm^2 = ||W_o||^2 + 2 s (B . G^T)_o - s^2 ||(BA)_o||^2,   ||(BA)_o||^2 = B_o (A A^T) B_o^T
# all O(out r^2) in float32. G is rounded to x's dtype once (PEFT rounds every element of
# W + s B A to it instead), so the norm is at least as exact as the dense computation.

def _dora_norms(weight_sq_norms: Tensor, G: Tensor, lora_A: Tensor, lora_B: Tensor,
                scaling: float) -> Tensor:
    """||W + s B A||_row, float32 [out], from ||W_o||^2 and G = A (W + s B A)^T [r, out]."""
    A, B = lora_A.detach().float(), lora_B.detach().float()
    cross = (B * G.t().float()).sum(1)
    ba_sq = ((B @ (A @ A.t())) * B).sum(1)
    return (weight_sq_norms + (2.0 * scaling) * cross - (scaling * scaling) * ba_sq).clamp_min(0).sqrt()


def _dora_forward(x2, weight: PackedWeight, lora_A, lora_B, scaling, weight_sq_norms,
                  weight_norm=None):
    """(x W^T + s h B^T [M, out], h [M, r], ||W + s B A||_row float32 [out]): one pass over W.
    A weight_norm the caller kept (A and B unchanged since) is used as is: x's rows only."""
    M = x2.shape[0]
    lora_A, lora_B = lora_A.detach(), lora_B.detach()
    if weight_norm is not None:
        out, h = _ops.call_lora_matmul_4bit(x2, weight, lora_A, lora_B, scaling, None)
        return out, h, weight_norm
    rows = torch.cat([x2, lora_A])
    out, h = _ops.call_lora_matmul_4bit(rows, weight, lora_A, lora_B, scaling, None)
    return out[:M], h[:M], _dora_norms(weight_sq_norms, out[M:], lora_A, lora_B, scaling)


class _Dora4bit(torch.autograd.Function):
    """y = magnitude / ||W + s B A||_row * (x W^T + s (x A^T) B^T) + bias on 2-D x, the norm
    detached (DoRA section 4.3; PEFT does the same): the magnitude's gradient is
    sum_m dy * unscaled / norm, and x, A, B get _Matmul4bit's row-scaled gradients."""

    @staticmethod
    def forward(ctx, x2, weight: PackedWeight, lora_A, lora_B, scaling, bias, magnitude,
                weight_sq_norms, weight_norm):
        unscaled, h, norm = _dora_forward(x2, weight, lora_A, lora_B, scaling, weight_sq_norms,
                                          weight_norm)
        row_scale = (magnitude / norm).to(x2.dtype)
        y = _ops.scale_rows(unscaled, row_scale, bias)
        ctx.weight = weight._replace(packed=None)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.magnitude_dtype = magnitude.dtype
        _, _, need_A, need_B, _, _, need_m, _, _ = ctx.needs_input_grad
        ctx.save_for_backward(x2 if need_A else None, weight.packed, lora_A, lora_B,
                              h if need_B else None, row_scale, unscaled if need_m else None, norm)
        ctx.mark_non_differentiable(norm)
        return y, norm

    @staticmethod
    def backward(ctx, g2, _):
        x2, packed, lora_A, lora_B, h, row_scale, unscaled, norm = ctx.saved_tensors
        need_x, *_, need_bias, need_m, _, _ = ctx.needs_input_grad
        dx, dA, dB, dbias, _ = _backward(ctx, g2, x2, packed, lora_A, lora_B, h, row_scale, None,
                                         need_x, need_bias)
        dm = None
        if need_m:
            dm = (_column_dots(g2, unscaled) / norm).to(ctx.magnitude_dtype)
        return dx, None, dA, dB, None, dbias, dm, None, None


def _column_dots(a: Tensor, b: Tensor) -> Tensor:
    """sum_m a[m, o] * b[m, o], float32 [out]: products and sums in float32 (PEFT's DoRA takes
    the magnitude's gradient in float32), over row chunks of <= 2^18 elements so that the
    float32 copies stay ~1 MiB each (whole, they were 3 x 8 MiB at M = 512, out = 4096)."""
    rows = max(1, (1 << 18) // max(a.shape[1], 1))
    out = torch.zeros(a.shape[1], dtype=torch.float32, device=a.device)
    for m0 in range(0, a.shape[0], rows):
        out += (a[m0:m0 + rows].float() * b[m0:m0 + rows].float()).sum(0)
    return out


def _check_vector(name: str, t, out_features: int, device, dtype=None) -> None:
    """A per-output-row vector [out]: any float dtype, or exactly `dtype` when given."""
    check_float(name, t) if dtype is None else check_tensor(name, t, dtype)
    if tuple(t.shape) != (out_features,):
        raise ValueError(f"{name} must have shape [out_features={out_features}], got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the activations on {device}")


def _check_scaling(scaling) -> float:
    if isinstance(scaling, Tensor) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python number, got {type(scaling).__name__}")
    return float(scaling)


def row_sq_norms_4bit(weight: Tensor, quant_state) -> Tensor:
    """||W_o||^2 of every row of the 4-bit weight W [out, in]: float32 [out], computed from
    the packed bytes in row chunks (a bounded workspace, never all of W in float). The
    frozen weight's part of DoRA's norm: layers compute it once and pass it back as
    `weight_sq_norms`."""
    return _ops.call_row_sq_norms_4bit(_weight_of(weight, quant_state))


def dora_row_norms_4bit(weight: Tensor, quant_state, lora_A: Tensor, lora_B: Tensor,
                        scaling: float, weight_sq_norms: Optional[Tensor] = None) -> Tensor:
    """DoRA's weight norm ||W + scaling * lora_B @ lora_A||_row, float32 [out], without a
    dense W: one 4-bit matmul with lora_A's rows as the activations (see above), in their
    dtype (pass float32 adapters for a float32 G). DoRA's magnitude starts as this norm."""
    packed = _weight_of(weight, quant_state)
    scaling = _check_scaling(scaling)
    if weight_sq_norms is None:
        weight_sq_norms = _ops.call_row_sq_norms_4bit(packed)
    _check_vector("weight_sq_norms", weight_sq_norms, packed.out_features, lora_A.device,
                  torch.float32)
    with torch.no_grad():
        G, _ = _ops.call_lora_matmul_4bit(lora_A.detach(), packed, lora_A.detach(),
                                          lora_B.detach(), scaling, None)
        return _dora_norms(weight_sq_norms, G, lora_A, lora_B, scaling)


def dora_matmul_4bit(x: Tensor, weight: Tensor, quant_state, lora_A: Tensor, lora_B: Tensor,
                     scaling: float, magnitude: Tensor, bias: Optional[Tensor] = None,
                     weight_sq_norms: Optional[Tensor] = None, weight_norm: Optional[Tensor] = None,
                     return_norm: bool = False):
    """DoRA on a 4-bit weight, PEFT's definition:

        y = magnitude / ||W + s B A||_row * (x @ W^T + s (x @ lora_A^T) @ lora_B^T) + bias

    with the norm detached (it gets no gradient: DoRA section 4.3). weight, quant_state,
    lora_A [r, in], lora_B [out, r], bias and x's leading dims as lora_matmul_4bit;
    magnitude [out] in any float dtype (PEFT keeps it float32); weight_sq_norms
    (row_sq_norms_4bit of this weight, float32 [out]) saves one chunked pass over W per
    call when given. One pass over W for the output and the norm together; gradients flow
    to x, lora_A, lora_B, magnitude and bias. Spec: nf4lora.reference.dora_matmul_4bit.

    weight_norm: ||W + s B A||_row (float32 [out]) from an earlier call with the same W, A, B
    and s (return_norm=True returns (y, that norm)): the call then reads W for x's rows only,
    not A's r rows too, which on a CPU at M = 1 is most of the cost. A norm of other adapter
    weights gives a wrong row scale: nf4lora.nn.lora.DoraNormCache keeps one only while they
    are unchanged (gradient accumulation, evaluation).
    """
    packed = _weight_of(weight, quant_state)
    _check_x(x, packed.in_features)
    scaling = _check_scaling(scaling)
    if lora_A is None or lora_B is None:
        raise ValueError("lora_A and lora_B are required")
    _check_vector("magnitude", magnitude, packed.out_features, x.device)
    if weight_sq_norms is None:
        weight_sq_norms = _ops.call_row_sq_norms_4bit(packed)
    _check_vector("weight_sq_norms", weight_sq_norms, packed.out_features, x.device,
                  torch.float32)
    if weight_norm is not None:
        _check_vector("weight_norm", weight_norm, packed.out_features, x.device, torch.float32)
        weight_norm = weight_norm.detach()
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, lora_A, lora_B, bias, magnitude)):
        y, norm = _Dora4bit.apply(x2, packed, lora_A, lora_B, scaling, bias, magnitude,
                                  weight_sq_norms, weight_norm)
    else:
        unscaled, _, norm = _dora_forward(x2, packed, lora_A, lora_B, scaling, weight_sq_norms,
                                          weight_norm)
        y = _ops.scale_rows(unscaled, (magnitude / norm).to(x.dtype), bias)
    y = y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
    return (y, norm) if return_norm else y


# --------------------------------------------------------------------------------------
# Mixed-adapter batches: one 4-bit pass for the whole batch, each row its own adapter.
# --------------------------------------------------------------------------------------

class _MultiLoraMatmul4bit(torch.autograd.Function):
    """The mixed-adapter batch on 2-D x [M, in]: forward through the op
    `nf4lora::multi_lora_matmul_4bit` (the backend's kernel), backward composite: dx's base
    term through the grad_input op (W read packed, as for lora_matmul_4bit), the adapters'
    terms by the spec's gradient of the gathered form (reference.multi_lora_delta_grad,
    torch ops; it recomputes h = x A_m^T, M r in multiply-adds against the base product's
    M in out, rather than keeping a per-row h from the forward)."""

    @staticmethod
    def forward(ctx, x2, weight: PackedWeight, lora_A, lora_B, scalings, index, bias):
        y = _ops.call_multi_lora_matmul_4bit(x2, weight, lora_A, lora_B, scalings, index, bias)
        ctx.weight = weight._replace(packed=None)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, weight.packed, lora_A, lora_B, scalings,
                              index.to(x2.device, non_blocking=True))
        return y

    @staticmethod
    def backward(ctx, g2):
        x2, packed, lora_A, lora_B, scalings, index = ctx.saved_tensors
        need_x, _, need_A, need_B, _, _, need_bias = ctx.needs_input_grad
        dx, dA, dB = reference.multi_lora_delta_grad(g2, x2, lora_A, lora_B, scalings, index,
                                                     need_x, need_A, need_B)
        if need_x:
            dx = dx + _ops.call_lora_matmul_4bit_grad_input(
                g2, ctx.weight._replace(packed=packed), None, None)
        dbias = g2.sum(0) if need_bias and ctx.has_bias else None
        return dx, None, dA, dB, None, None, dbias


def multi_lora_matmul_4bit(x: Tensor, weight: Tensor, quant_state, lora_A: Tensor,
                           lora_B: Tensor, scalings, adapter_index: Tensor,
                           bias: Optional[Tensor] = None) -> Tensor:
    """x @ W^T + bias, plus for each row m of x its own adapter i = adapter_index[m]:
    scalings[i] * (x[m] @ lora_A[i]^T) @ lora_B[i]^T (i = -1: the base model only).

    x [..., in] (M rows over its leading dims); lora_A [n, r, in] and lora_B [n, out, r] in
    x's dtype (adapters of different ranks zero-padded to the largest: pad_adapters; the
    zeros add exactly nothing); scalings: n numbers or a [n] tensor; adapter_index [...]
    integers matching x's leading dims, on x's device or the CPU (its range is checked: free
    on the CPU, a sync per call on a GPU). The op `nf4lora::multi_lora_matmul_4bit` runs it: the Triton kernels compute
    each row's adapter inside the 4-bit pass (the GEMV's shrink programs and the shared
    LoRA epilogue, per row), and so does the CPU's fused GEMV (each row's h and epilogue
    read its adapter); the CUDA backend, and the CPU beyond the fused kernel's rows, run
    their matmul once for the whole batch, then the adapters gathered per row with torch's
    batched GEMMs (nf4lora.reference.multi_lora_delta). Gradients flow to x, lora_A, lora_B
    and bias.
    PEFT's `adapter_names=` forward on nf4lora layers calls it (nf4lora.integrations.peft).
    """
    packed = _weight_of(weight, quant_state)
    _check_x(x, packed.in_features)
    if not isinstance(lora_A, Tensor) or not isinstance(lora_B, Tensor):
        raise TypeError("lora_A [n, r, in] and lora_B [n, out, r] must be tensors (stack the "
                        "adapters; pad_adapters pads different ranks)")
    scalings = torch.as_tensor(scalings, dtype=torch.float32, device=x.device).reshape(-1)
    if not isinstance(adapter_index, Tensor):
        raise TypeError("adapter_index must be an integer tensor (one adapter per row, -1: none)")
    if tuple(adapter_index.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"adapter_index must have x's leading shape {list(x.shape[:-1])}, got "
                         f"{list(adapter_index.shape)}")
    index = adapter_index.reshape(-1)
    x2 = x.reshape(-1, x.shape[-1])
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias))
    if needs_graph:
        y = _MultiLoraMatmul4bit.apply(x2, packed, lora_A, lora_B, scalings, index, bias)
    else:
        y = _ops.call_multi_lora_matmul_4bit(x2, packed, lora_A, lora_B, scalings, index, bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def pad_adapters(lora_As, lora_Bs) -> tuple[Tensor, Tensor]:
    """Stack adapters of any ranks for multi_lora_matmul_4bit: (lora_A [n, r_max, in],
    lora_B [n, out, r_max]), each zero-padded from its own rank r_i to r_max. A padded row
    of A meets a padded column of B only, so the padding adds exactly zero."""
    lora_As, lora_Bs = list(lora_As), list(lora_Bs)
    if not lora_As or len(lora_As) != len(lora_Bs):
        raise ValueError(f"pad_adapters needs as many lora_A as lora_B (at least one), got "
                         f"{len(lora_As)} and {len(lora_Bs)}")
    rank = max(A.shape[0] for A in lora_As)
    A = lora_As[0].new_zeros((len(lora_As), rank, lora_As[0].shape[1]))
    B = lora_Bs[0].new_zeros((len(lora_Bs), lora_Bs[0].shape[0], rank))
    for i, (a, b) in enumerate(zip(lora_As, lora_Bs)):
        if a.shape[0] != b.shape[1] or a.shape[1] != A.shape[2] or b.shape[0] != B.shape[1]:
            raise ValueError(f"adapter {i}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do "
                             f"not fit [r, in={A.shape[2]}] and [out={B.shape[1]}, r]")
        A[i, : a.shape[0]] = a
        B[i, :, : b.shape[1]] = b
    return A, B
