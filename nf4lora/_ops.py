"""The op registry: every nf4lora op declared once with torch.library.

Each op has a schema (from the type hints), a fake function (shapes only, so
torch.compile traces it as one graph node) and one implementation that checks its
arguments and hands them to the backend chosen for the tensor's device
(`nf4lora.backends`). A packed weight arrives as a `PackedWeight` (nf4lora/_weight.py),
flattened into the schema's arguments by `PackedWeight.op_args()` and rebuilt, with the
same checks, by `PackedWeight.from_op_args`; this module is the only one that sees the
flat form. The activations are checked here, at the one door every caller goes through,
because the native kernels take raw pointers and trust their sizes. A weight's `quant_type`
is its format key (nf4lora.codebook.format_key): a custom code book crosses the schemas
inside that string, so the schemas have no table argument; the backend for a format is
`backend_for(device, quant_type)`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._weight import (FLOAT_DTYPES, DtypeError, PackedWeight, check_float, check_quant_args,
                      check_sized, check_tensor, num_blocks, packed_bytes)
from .backends import backend_for, composite


def _check_dtype_arg(dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise DtypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")


@torch.library.custom_op("nf4lora::quantize_4bit", mutates_args=())
def quantize_4bit(A: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """-> (packed uint8 [ceil(n/2)], absmax float32 [ceil(n/blocksize)])."""
    check_float("A", A)
    check_quant_args(blocksize, quant_type)
    return backend_for(A.device, quant_type).quantize_4bit(A.contiguous(), blocksize, quant_type)


@quantize_4bit.register_fake
def _(A, blocksize, quant_type):
    n = A.numel()
    return (A.new_empty((packed_bytes(n),), dtype=torch.uint8),
            A.new_empty((num_blocks(n, blocksize),), dtype=torch.float32))


def _dequantize_4bit_into(out: Tensor, weight: PackedWeight) -> None:
    check_float("out", out)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.numel() != weight.numel:
        raise ValueError(f"out has {out.numel()} elements, the weight's shape "
                         f"{list(weight.shape)} has {weight.numel}")
    if weight.device != out.device:
        raise ValueError(f"the packed weight is on {weight.device}, out on {out.device}")
    backend_for(out.device, weight.quant_type).dequantize_4bit(weight.with_offset_read(), out)


@torch.library.custom_op("nf4lora::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                    shape: list[int], nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                    nested_offset: Optional[Tensor], nested_blocksize: int,
                    dtype: torch.dtype) -> Tensor:
    """table[code] * absmax, to `dtype` and `shape`. With nested_*, absmax holds uint8 codes
    and is decoded first as nested_code[q] * nested_absmax[i // nested_blocksize] + nested_offset.
    The weight arguments are `PackedWeight.op_args()`."""
    _check_dtype_arg(dtype)
    weight = PackedWeight.from_op_args(packed, absmax, blocksize, quant_type, shape, nested_absmax,
                                       nested_code, nested_offset, nested_blocksize)
    out = torch.empty(weight.shape, dtype=dtype, device=packed.device)
    _dequantize_4bit_into(out, weight)
    return out


@dequantize_4bit.register_fake
def _(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, nested_offset,
      nested_blocksize, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("nf4lora::dequantize_4bit_out", mutates_args=("out",))
def dequantize_4bit_out(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                        shape: list[int], nested_absmax: Optional[Tensor],
                        nested_code: Optional[Tensor], nested_offset: Optional[Tensor],
                        nested_blocksize: int, out: Tensor) -> None:
    """dequantize_4bit into an existing contiguous tensor of the weight's size (its dtype is
    the output's)."""
    weight = PackedWeight.from_op_args(packed, absmax, blocksize, quant_type, shape, nested_absmax,
                                       nested_code, nested_offset, nested_blocksize)
    _dequantize_4bit_into(out, weight)


@dequantize_4bit_out.register_fake
def _(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, nested_offset,
      nested_blocksize, out):
    return None


def _check_code(code: Tensor, device) -> None:
    check_sized("code", code, torch.float32, 256, device)


@torch.library.custom_op("nf4lora::quantize_blockwise", mutates_args=())
def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit: -> (codes uint8 [n], absmax float32 [ceil(n/blocksize)])."""
    check_float("A", A)
    _check_code(code, A.device)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    codes, absmax = backend_for(A.device).quantize_blockwise(A.contiguous(), code.contiguous(), blocksize)
    return codes.reshape(A.shape), absmax


@quantize_blockwise.register_fake
def _(A, code, blocksize):
    n = A.numel()
    return (A.new_empty(A.shape, dtype=torch.uint8),
            A.new_empty((num_blocks(n, blocksize),), dtype=torch.float32))


@torch.library.custom_op("nf4lora::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
                         dtype: torch.dtype) -> Tensor:
    """8-bit: code[q] * absmax[block], to `dtype`, in A's shape."""
    check_tensor("A (8-bit codes)", A, torch.uint8)
    _check_dtype_arg(dtype)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    _check_code(code, A.device)
    check_sized("absmax", absmax, torch.float32, num_blocks(A.numel(), blocksize), A.device)
    out = torch.empty(A.shape, dtype=dtype, device=A.device)
    backend_for(A.device).dequantize_blockwise(A.contiguous(), absmax.contiguous(), code.contiguous(),
                                               blocksize, out)
    return out


@dequantize_blockwise.register_fake
def _(A, absmax, code, blocksize, dtype):
    return A.new_empty(A.shape, dtype=dtype)


def _check_operand(name: str, t: Optional[Tensor], shape: tuple, like: Tensor) -> None:
    """An activation-side operand: `shape`, `like`'s dtype and device (None passes)."""
    if t is None:
        return
    check_tensor(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != like.dtype:
        raise DtypeError(f"{name} must have the dtype of the activations, {like.dtype}, got "
                         f"{t.dtype} (cast it, e.g. {name}.to({like.dtype}))")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, the activations on {like.device}")


def _check_matmul_weight(weight: PackedWeight, like: Tensor) -> None:
    if len(weight.shape) != 2:
        raise ValueError(f"a matmul weight must be 2-D [out_features, in_features], got "
                         f"shape {list(weight.shape)}")
    if weight.device != like.device:
        raise ValueError(f"the packed weight is on {weight.device}, the activations on {like.device}")


def _check_activations(name: str, t: Tensor, weight: PackedWeight, width: int) -> tuple[int, int]:
    """`t` is [M, weight.shape[width]] in a float dtype, on the weight's device; returns
    (out_features, in_features)."""
    check_float(name, t)
    _check_matmul_weight(weight, t)
    features = weight.shape[width]
    label = ("out_features", "in_features")[width]
    if t.dim() != 2 or t.shape[1] != features:
        raise ValueError(f"{name} must be [M, {label}={features}], got {list(t.shape)}")
    return weight.shape


def _check_adapter(lora_A: Optional[Tensor], other_name: str, other: Optional[Tensor],
                   other_shape, like: Tensor, in_features: int):
    """lora_A [r, in] and its partner (lora_B [out, r] or grad_h [M, r]) come together, in
    the activations' dtype and device; returns both contiguous (or both None)."""
    if (lora_A is None) != (other is None):
        raise ValueError(f"lora_A and {other_name} go together")
    if lora_A is None:
        return None, None
    check_tensor("lora_A", lora_A)
    r = lora_A.shape[0] if lora_A.dim() == 2 else -1
    _check_operand("lora_A", lora_A, (r, in_features), like)
    _check_operand(other_name, other, other_shape(r), like)
    return lora_A.contiguous(), other.contiguous()


def _run(name: str, activations: Tensor, weight: PackedWeight, *args):
    """Call the backend's fused op, or the composite path when it has none (the reference
    backend has none; see backend_for)."""
    backend = backend_for(activations.device, weight.quant_type)
    fused = getattr(backend, name, None)
    if fused is None:
        return getattr(composite, name)(backend, activations, weight, *args)
    return fused(activations, weight, *args)


def lora_matmul_4bit_impl(x: Tensor, weight: PackedWeight, lora_A: Optional[Tensor],
                          lora_B: Optional[Tensor], scaling: float,
                          bias: Optional[Tensor], row_scale: Optional[Tensor] = None
                          ) -> tuple[Tensor, Tensor]:
    """y = x @ W^T + scaling * (x @ lora_A^T) @ lora_B^T + bias for x [M, in], W 4-bit [out, in].

    Returns (y [M, out], h = x @ lora_A^T [M, r]); h is [M, 0] without LoRA. h is returned
    because the backward pass needs it for lora_B's gradient and the kernel has it anyway.
    """
    out_features, in_features = _check_activations("x", x, weight, width=1)
    lora_A, lora_B = _check_adapter(lora_A, "lora_B", lora_B, lambda r: (out_features, r), x,
                                    in_features)
    _check_operand("bias", bias, (out_features,), x)
    _check_operand("row_scale", row_scale, (out_features,), x)
    if row_scale is None:
        return _run("lora_matmul_4bit", x.contiguous(), weight.with_offset_read(), lora_A,
                    lora_B, float(scaling), bias)
    y, h = _run("lora_matmul_4bit", x.contiguous(), weight.with_offset_read(), lora_A,
                lora_B, float(scaling), None)
    return scale_rows(y, row_scale, bias), h


def scale_rows(y: Tensor, row_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """row_scale * y + bias: the row_scale operand's epilogue (autograd applies it too, to
    keep the unscaled y for row_scale's gradient). On [M, out] it moves 4 M out bytes
    against the kernel's out * in / 2 of W, so it stays outside the backends' kernels:
    fused, it would save < 1% of a decode step's bytes at in >= 1024."""
    _check_operand("row_scale", row_scale, (y.shape[1],), y)
    return y * row_scale if bias is None else torch.addcmul(bias, y, row_scale)


@torch.library.custom_op("nf4lora::lora_matmul_4bit", mutates_args=())
def lora_matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                     shape: list[int], nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                     nested_offset: Optional[Tensor], nested_blocksize: int,
                     lora_A: Optional[Tensor], lora_B: Optional[Tensor], scaling: float,
                     bias: Optional[Tensor], row_scale: Optional[Tensor] = None
                     ) -> tuple[Tensor, Tensor]:
    """`lora_matmul_4bit_impl` with the weight as `PackedWeight.op_args()`."""
    weight = PackedWeight.from_op_args(packed, absmax, blocksize, quant_type, shape, nested_absmax,
                                       nested_code, nested_offset, nested_blocksize)
    return lora_matmul_4bit_impl(x, weight, lora_A, lora_B, scaling, bias, row_scale)


@lora_matmul_4bit.register_fake
def _(x, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, nested_offset,
      nested_blocksize, lora_A, lora_B, scaling, bias, row_scale=None):
    r = 0 if lora_A is None else lora_A.shape[0]
    return x.new_empty((x.shape[0], shape[0])), x.new_empty((x.shape[0], r))


def row_sq_norms_4bit_impl(weight: PackedWeight) -> Tensor:
    """||W_o||^2 of every row of the 2-D 4-bit weight, float32 [out] (DoRA's weight norm
    starts from it). Through the backend's own kernel if it has one, else the composite
    one: its dequantize kernel on row chunks, a bounded workspace, never all of W."""
    _check_matmul_weight(weight, weight.packed)
    backend = backend_for(weight.device, weight.quant_type)
    fused = getattr(backend, "row_sq_norms_4bit", None)
    if fused is None:
        return composite.row_sq_norms_4bit(backend, weight.with_offset_read())
    return fused(weight.with_offset_read())


@torch.library.custom_op("nf4lora::row_sq_norms_4bit", mutates_args=())
def row_sq_norms_4bit(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                      shape: list[int], nested_absmax: Optional[Tensor],
                      nested_code: Optional[Tensor], nested_offset: Optional[Tensor],
                      nested_blocksize: int) -> Tensor:
    """`row_sq_norms_4bit_impl` with the weight as `PackedWeight.op_args()`."""
    weight = PackedWeight.from_op_args(packed, absmax, blocksize, quant_type, shape, nested_absmax,
                                       nested_code, nested_offset, nested_blocksize)
    return row_sq_norms_4bit_impl(weight)


@row_sq_norms_4bit.register_fake
def _(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, nested_offset,
      nested_blocksize):
    return packed.new_empty((shape[0],), dtype=torch.float32)


def lora_matmul_4bit_grad_input_impl(grad: Tensor, weight: PackedWeight, lora_A: Optional[Tensor],
                                     grad_h: Optional[Tensor]) -> Tensor:
    """dx = grad @ W + grad_h @ lora_A for grad [M, out]; grad_h = scaling * grad @ lora_B [M, r].

    W is read packed: no dense copy of it is kept anywhere between calls.
    """
    _, in_features = _check_activations("grad", grad, weight, width=0)
    lora_A, grad_h = _check_adapter(lora_A, "grad_h", grad_h, lambda r: (grad.shape[0], r), grad,
                                    in_features)
    return _run("lora_matmul_4bit_grad_input", grad.contiguous(),
                weight.with_offset_read(), lora_A, grad_h)


@torch.library.custom_op("nf4lora::lora_matmul_4bit_grad_input", mutates_args=())
def lora_matmul_4bit_grad_input(grad: Tensor, packed: Tensor, absmax: Tensor, blocksize: int,
                                quant_type: str, shape: list[int], nested_absmax: Optional[Tensor],
                                nested_code: Optional[Tensor], nested_offset: Optional[Tensor],
                                nested_blocksize: int, lora_A: Optional[Tensor],
                                grad_h: Optional[Tensor]) -> Tensor:
    """`lora_matmul_4bit_grad_input_impl` with the weight as `PackedWeight.op_args()`."""
    weight = PackedWeight.from_op_args(packed, absmax, blocksize, quant_type, shape, nested_absmax,
                                       nested_code, nested_offset, nested_blocksize)
    return lora_matmul_4bit_grad_input_impl(grad, weight, lora_A, grad_h)


@lora_matmul_4bit_grad_input.register_fake
def _(grad, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code,
      nested_offset, nested_blocksize, lora_A, grad_h):
    return grad.new_empty((grad.shape[0], shape[1]))


# --------------------------------------------------------------------------------------
# Mixed-adapter batches: one pass over the 4-bit weight, each row of x its own adapter.
# --------------------------------------------------------------------------------------

INDEX_DTYPES = (torch.int32, torch.int64)


def _check_multi_lora(x: Tensor, weight: PackedWeight, lora_A: Tensor, lora_B: Tensor,
                      scalings: Tensor, adapter_index: Tensor, bias: Optional[Tensor]) -> None:
    """lora_A [n, r, in] and lora_B [n, out, r] (one rank: smaller ones zero-padded),
    scalings float32 [n], adapter_index integer [M] in [-1, n - 1], bias [out]."""
    out_features, in_features = _check_activations("x", x, weight, width=1)
    check_tensor("lora_A", lora_A)
    check_tensor("lora_B", lora_B)
    if lora_A.dim() != 3 or lora_A.shape[2] != in_features:
        raise ValueError(f"lora_A must be [n, r, in_features={in_features}] (n adapters), got "
                         f"{list(lora_A.shape)}")
    n, rank = lora_A.shape[0], lora_A.shape[1]
    if n == 0:
        raise ValueError("lora_A must hold at least one adapter ([n >= 1, r, in]); a batch "
                         "without adapters is matmul_4bit")
    if tuple(lora_B.shape) != (n, out_features, rank):
        raise ValueError(f"lora_B must be [n={n}, out_features={out_features}, r={rank}] to match "
                         f"lora_A, got {list(lora_B.shape)} (adapters of different ranks: "
                         "nf4lora.pad_adapters zero-pads them to one)")
    _check_operand("lora_A", lora_A, tuple(lora_A.shape), x)
    _check_operand("lora_B", lora_B, tuple(lora_B.shape), x)
    _check_operand("bias", bias, (out_features,), x)
    check_tensor("scalings", scalings, torch.float32)
    if scalings.numel() != n:
        raise ValueError(f"scalings must hold one number per adapter ({n}), got {scalings.numel()}")
    if scalings.device != x.device:
        raise ValueError(f"scalings is on {scalings.device}, the activations on {x.device}")
    check_tensor("adapter_index", adapter_index)
    if adapter_index.dtype not in INDEX_DTYPES:
        raise DtypeError(f"adapter_index must be an integer tensor ({INDEX_DTYPES}: one adapter "
                         f"per row, -1 for none), got {adapter_index.dtype}")
    if tuple(adapter_index.shape) != (x.shape[0],):
        raise ValueError(f"adapter_index must be [M={x.shape[0]}], one per row of x, got "
                         f"{list(adapter_index.shape)}")
    if adapter_index.device not in (x.device, torch.device("cpu")):
        raise ValueError(f"adapter_index must be on the activations' device ({x.device}) or the "
                         f"CPU, got {adapter_index.device}")
    # The kernels gather adapter i's weights at i * r * in: an index out of range would
    # read outside lora_A/lora_B. An index on the CPU (PEFT's, a server's scheduler's) is
    # checked for free; one on a GPU is read back, a sync per call.
    if adapter_index.numel():
        low, high = (int(v) for v in torch.aminmax(adapter_index))
        if low < -1 or high >= n:
            raise ValueError(f"adapter_index must lie in [-1, {n - 1}] (-1: base model only; "
                             f"{n} adapters), got values from {low} to {high}")


def multi_lora_matmul_4bit_impl(x: Tensor, weight: PackedWeight, lora_A: Tensor, lora_B: Tensor,
                                scalings: Tensor, adapter_index: Tensor,
                                bias: Optional[Tensor]) -> Tensor:
    """y [M, out] = x @ W^T + bias, plus on each row m with i = adapter_index[m] >= 0
    scalings[i] * (x[m] @ lora_A[i]^T) @ lora_B[i]^T (spec: reference.multi_lora_matmul_4bit).
    adapter_index may be on the CPU with x on a GPU (see _check_multi_lora).
    Backends without their own kernel run composite.multi_lora_matmul_4bit: their fused base
    matmul once, then the adapters gathered per row (reference.multi_lora_delta)."""
    _check_multi_lora(x, weight, lora_A, lora_B, scalings, adapter_index, bias)
    # non_blocking: a host index is staged and copied without waiting for the GPU's queue
    index = adapter_index.to(x.device, non_blocking=True).contiguous()
    return _run("multi_lora_matmul_4bit", x.contiguous(), weight.with_offset_read(),
                lora_A.contiguous(), lora_B.contiguous(), scalings.contiguous(), index,
                None if bias is None else bias.contiguous())


@torch.library.custom_op("nf4lora::multi_lora_matmul_4bit", mutates_args=())
def multi_lora_matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int,
                           quant_type: str, shape: list[int], nested_absmax: Optional[Tensor],
                           nested_code: Optional[Tensor], nested_offset: Optional[Tensor],
                           nested_blocksize: int, lora_A: Tensor, lora_B: Tensor,
                           scalings: Tensor, adapter_index: Tensor,
                           bias: Optional[Tensor]) -> Tensor:
    """`multi_lora_matmul_4bit_impl` with the weight as `PackedWeight.op_args()`."""
    weight = PackedWeight.from_op_args(packed, absmax, blocksize, quant_type, shape, nested_absmax,
                                       nested_code, nested_offset, nested_blocksize)
    return multi_lora_matmul_4bit_impl(x, weight, lora_A, lora_B, scalings, adapter_index, bias)


@multi_lora_matmul_4bit.register_fake
def _(x, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, nested_offset,
      nested_blocksize, lora_A, lora_B, scalings, adapter_index, bias):
    return x.new_empty((x.shape[0], shape[0]))


# --------------------------------------------------------------------------------------
# Eager fast path for the matmul ops.
# --------------------------------------------------------------------------------------
# Going through torch's dispatcher costs ~150 us per call for a Python custom op (the
# autograd, backend and dynamo-disable wrappers), 10-15% of a whole 4096x4096 M = 1
# matmul on the CPU. The op is what torch.compile, fake tensors, tensor subclasses
# (DTensor) and dispatch modes (FlopCounterMode) need to see; plain eager calls on
# plain tensors run the same function directly: same checks, same kernels.

def _direct(*tensors) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False    # (first: dynamo cannot trace the dispatch-stack query)
    for t in tensors:   # (a loop, not all() over a generator: 1 us less on a 2-core Zen 1)
        if type(t) is not Tensor:
            return False
    return True


def call_lora_matmul_4bit(x: Tensor, weight: PackedWeight, lora_A, lora_B, scaling,
                          bias, row_scale=None) -> tuple[Tensor, Tensor]:
    """lora_matmul_4bit, skipping the dispatcher where nothing needs to see the op."""
    if _direct(x, weight.packed):
        return lora_matmul_4bit_impl(x, weight, lora_A, lora_B, scaling, bias, row_scale)
    return lora_matmul_4bit(x, *weight.op_args(), lora_A, lora_B, scaling, bias, row_scale)


def call_lora_matmul_4bit_grad_input(grad: Tensor, weight: PackedWeight, lora_A, grad_h) -> Tensor:
    """lora_matmul_4bit_grad_input, skipping the dispatcher where nothing needs to see the op."""
    if _direct(grad, weight.packed):
        return lora_matmul_4bit_grad_input_impl(grad, weight, lora_A, grad_h)
    return lora_matmul_4bit_grad_input(grad, *weight.op_args(), lora_A, grad_h)


def call_multi_lora_matmul_4bit(x: Tensor, weight: PackedWeight, lora_A, lora_B, scalings,
                                adapter_index, bias) -> Tensor:
    """multi_lora_matmul_4bit, skipping the dispatcher where nothing needs to see the op."""
    if _direct(x, weight.packed):
        return multi_lora_matmul_4bit_impl(x, weight, lora_A, lora_B, scalings, adapter_index, bias)
    return multi_lora_matmul_4bit(x, *weight.op_args(), lora_A, lora_B, scalings, adapter_index,
                                  bias)


def call_row_sq_norms_4bit(weight: PackedWeight) -> Tensor:
    """row_sq_norms_4bit, skipping the dispatcher where nothing needs to see the op."""
    if _direct(weight.packed):
        return row_sq_norms_4bit_impl(weight)
    return row_sq_norms_4bit(*weight.op_args())
