"""The op registry: every nf4lora op declared once with torch.library.

Each op has a schema (from the type hints), a fake function (shapes only, so
torch.compile traces it as one graph node) and one implementation that checks its
arguments and hands them to the backend chosen for the tensor's device
(`nf4lora.backends`). Checks live here, at the one door every caller goes through,
because the native kernels take raw pointers and trust their sizes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .backends import NestedAbsmax, PackedWeight, backend_for, composite
from .codebook import QUANT_TYPES
from .quant_state import BLOCKSIZES, FLOAT_DTYPES


def packed_bytes(n) -> int:
    """Bytes holding n 4-bit codes (two per byte, an odd tail padded)."""
    return (n + 1) // 2


def blocks_of(n, blocksize: int):
    return (n + blocksize - 1) // blocksize


def check_quant_args(blocksize: int, quant_type: str) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_float(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {FLOAT_DTYPES}, got {tensor.dtype}")


def _check_tensor(name: str, tensor: Tensor, dtype: torch.dtype, numel: int, device) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {tensor.dtype}")
    if tensor.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {tensor.numel()} "
                         f"(shape {tuple(tensor.shape)})")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def _nested(absmax: Tensor, blocks: int, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
            nested_offset: Optional[Tensor], nested_blocksize: int, device) -> Optional[NestedAbsmax]:
    """Check the absmax arguments and bundle the double-quantization level, if any.

    The offset travels as a 0-d tensor, not a float, so that torch.compile can trace
    callers without reading its value (a graph break)."""
    if nested_absmax is None:
        if nested_code is not None or nested_offset is not None:
            raise ValueError("nested_code/nested_offset given without nested_absmax")
        _check_tensor("absmax", absmax, torch.float32, blocks, device)
        return None
    if nested_code is None or nested_offset is None:
        raise ValueError("nested_absmax needs nested_code and nested_offset")
    if nested_blocksize <= 0:
        raise ValueError(f"nested_blocksize must be positive, got {nested_blocksize}")
    _check_tensor("absmax (8-bit codes when nested)", absmax, torch.uint8, blocks, device)
    _check_tensor("nested_absmax", nested_absmax, torch.float32, blocks_of(blocks, nested_blocksize), device)
    _check_tensor("nested_code", nested_code, torch.float32, 256, device)
    if nested_offset.numel() != 1:
        raise ValueError(f"nested_offset must hold one value, got shape {tuple(nested_offset.shape)}")
    offset = float(nested_offset)
    if not math.isfinite(offset):
        raise ValueError(f"nested_offset must be finite, got {offset}")
    return NestedAbsmax(nested_absmax.contiguous(), nested_code.contiguous(), offset, nested_blocksize)


@torch.library.custom_op("nf4lora::quantize_4bit", mutates_args=())
def quantize_4bit(A: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """-> (packed uint8 [ceil(n/2)], absmax float32 [ceil(n/blocksize)])."""
    check_float("A", A)
    check_quant_args(blocksize, quant_type)
    return backend_for(A.device).quantize_4bit(A.contiguous(), blocksize, quant_type)


@quantize_4bit.register_fake
def _(A, blocksize, quant_type):
    n = A.numel()
    return (A.new_empty((packed_bytes(n),), dtype=torch.uint8),
            A.new_empty((blocks_of(n, blocksize),), dtype=torch.float32))


def _dequantize_4bit_into(out: Tensor, A: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                          nested_absmax, nested_code, nested_offset, nested_blocksize) -> None:
    check_quant_args(blocksize, quant_type)
    check_float("out", out)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    n = out.numel()
    if A.dtype != torch.uint8:
        raise ValueError(f"A (packed codes) must be uint8, got {A.dtype}")
    if A.numel() < packed_bytes(n):
        raise ValueError(f"A holds {A.numel()} bytes, fewer than the {packed_bytes(n)} that {n} "
                         "4-bit codes need")
    nested = _nested(absmax, blocks_of(n, blocksize), nested_absmax, nested_code,
                     nested_offset, nested_blocksize, out.device)
    backend_for(out.device).dequantize_4bit(A.contiguous().reshape(-1), absmax.contiguous(), blocksize,
                                           quant_type, out, nested)


@torch.library.custom_op("nf4lora::dequantize_4bit", mutates_args=())
def dequantize_4bit(A: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape: list[int],
                    dtype: torch.dtype, nested_absmax: Optional[Tensor] = None,
                    nested_code: Optional[Tensor] = None, nested_offset: Optional[Tensor] = None,
                    nested_blocksize: int = 256) -> Tensor:
    """table[code] * absmax, to `dtype` and `shape`. With nested_*, absmax holds uint8 codes
    and is decoded first as nested_code[q] * nested_absmax[i // nested_blocksize] + nested_offset."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    out = torch.empty(shape, dtype=dtype, device=A.device)
    _dequantize_4bit_into(out, A, absmax, blocksize, quant_type, nested_absmax, nested_code,
                          nested_offset, nested_blocksize)
    return out


@dequantize_4bit.register_fake
def _(A, absmax, blocksize, quant_type, shape, dtype, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256):
    return A.new_empty(shape, dtype=dtype)


@torch.library.custom_op("nf4lora::dequantize_4bit_out", mutates_args=("out",))
def dequantize_4bit_out(A: Tensor, absmax: Tensor, blocksize: int, quant_type: str, out: Tensor,
                        nested_absmax: Optional[Tensor] = None, nested_code: Optional[Tensor] = None,
                        nested_offset: Optional[Tensor] = None, nested_blocksize: int = 256) -> None:
    """dequantize_4bit into an existing contiguous tensor (its shape and dtype are the output's)."""
    _dequantize_4bit_into(out, A, absmax, blocksize, quant_type, nested_absmax, nested_code,
                          nested_offset, nested_blocksize)


@dequantize_4bit_out.register_fake
def _(A, absmax, blocksize, quant_type, out, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256):
    return None


def _check_code(code: Tensor, device) -> None:
    _check_tensor("code", code, torch.float32, 256, device)


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
            A.new_empty((blocks_of(n, blocksize),), dtype=torch.float32))


@torch.library.custom_op("nf4lora::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
                         dtype: torch.dtype) -> Tensor:
    """8-bit: code[q] * absmax[block], to `dtype`, in A's shape."""
    if A.dtype != torch.uint8:
        raise ValueError(f"A (8-bit codes) must be uint8, got {A.dtype}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    _check_code(code, A.device)
    _check_tensor("absmax", absmax, torch.float32, blocks_of(A.numel(), blocksize), A.device)
    out = torch.empty(A.shape, dtype=dtype, device=A.device)
    backend_for(A.device).dequantize_blockwise(A.contiguous(), absmax.contiguous(), code.contiguous(),
                                               blocksize, out)
    return out


@dequantize_blockwise.register_fake
def _(A, absmax, code, blocksize, dtype):
    return A.new_empty(A.shape, dtype=dtype)


def _packed_weight(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str, out_features: int,
                   in_features: int, nested_absmax, nested_code, nested_offset, nested_blocksize,
                   device) -> PackedWeight:
    check_quant_args(blocksize, quant_type)
    if (out_features < 0 and in_features >= 0):
        raise ValueError(f"weight shape must be non-negative, got [{out_features}, {in_features}]")
    n = out_features * in_features
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed weight must be uint8, got {packed.dtype}")
    if packed.numel() < packed_bytes(n):
        raise ValueError(f"packed weight holds {packed.numel()} bytes, fewer than the "
                         f"{packed_bytes(n)} that [{out_features}, {in_features}] needs")
    if packed.device != device:
        raise ValueError(f"packed weight is on {packed.device}, expected {device}")
    nested = _nested(absmax, blocks_of(n, blocksize), nested_absmax, nested_code, nested_offset,
                     nested_blocksize, device)
    return PackedWeight(packed.contiguous().reshape(-1), absmax.contiguous(), blocksize, quant_type,
                        out_features, in_features, nested)


def _check_matrix(name: str, t: Optional[Tensor], shape: tuple, like: Tensor) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} must be {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device}")


def _run(name: str, device, *args):
    """Call the backend's fused op, or the composite path when it has none."""
    backend = backend_for(device)
    fused = getattr(backend, name, None)
    return fused(*args) if fused is not None else getattr(composite, name)(backend, *args)


def _lora_matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                     out_features: int, in_features: int, nested_absmax: Optional[Tensor],
                     nested_code: Optional[Tensor], nested_offset: Optional[Tensor], nested_blocksize: int,
                     lora_A: Optional[Tensor], lora_B: Optional[Tensor], scaling: float,
                     bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """y = x @ W^T + scaling * (x @ lora_A^T) @ lora_B^T + bias for x [M, in], W 4-bit [out, in].

    Returns (y [M, out], h = x @ lora_A^T [M, r]); h is [M, 0] without LoRA. h is returned
    because the backward pass needs it for lora_B's gradient and the kernel has it anyway.
    """
    check_float("x", x)
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [M, in_features={in_features}], got {list(x.shape)}")
    weight = _packed_weight(packed, absmax, blocksize, quant_type, out_features, in_features,
                            nested_absmax, nested_code, nested_offset, nested_blocksize, x.device)
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B go together")
    if lora_A is not None:
        if lora_A.dim() != 2:
            raise ValueError(f"lora_A must be [r, in], got {list(lora_A.shape)}")
        r = lora_A.shape[0]
        _check_matrix("lora_A", lora_A, (r, in_features), x)
        _check_matrix("lora_B", lora_B, (out_features, r), x)
        lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
    _check_matrix("bias", bias, (out_features,), x)
    return _run("lora_matmul_4bit", x.device, x.contiguous(), weight, lora_A, lora_B, float(scaling),
                bias)


lora_matmul_4bit = torch.library.custom_op("nf4lora::lora_matmul_4bit", mutates_args=())(_lora_matmul_4bit)


@lora_matmul_4bit.register_fake
def _(x, packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax,
      nested_code, nested_offset, nested_blocksize, lora_A, lora_B, scaling, bias):
    r = 0 if lora_A is None else lora_A.shape[0]
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], r))


def _lora_matmul_4bit_grad_input(grad: Tensor, packed: Tensor, absmax: Tensor, blocksize: int,
                                quant_type: str, out_features: int, in_features: int,
                                nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                                nested_offset: Optional[Tensor], nested_blocksize: int,
                                lora_A: Optional[Tensor], grad_h: Optional[Tensor]) -> Tensor:
    """dx = grad @ W + grad_h @ lora_A for grad [M, out]; grad_h = scaling * grad @ lora_B [M, r].

    W is read packed: no dense copy of it is kept anywhere between calls.
    """
    check_float("grad", grad)
    if grad.dim() != 2 or grad.shape[1] != out_features:
        raise ValueError(f"grad must be [M, out_features={out_features}], got {list(grad.shape)}")
    weight = _packed_weight(packed, absmax, blocksize, quant_type, out_features, in_features,
                            nested_absmax, nested_code, nested_offset, nested_blocksize, grad.device)
    if (lora_A is None) != (grad_h is None):
        raise ValueError("lora_A and grad_h go together")
    if lora_A is not None:
        if lora_A.dim() != 2:
            raise ValueError(f"lora_A must be [r, in], got {list(lora_A.shape)}")
        _check_matrix("lora_A", lora_A, (lora_A.shape[0], in_features), grad)
        _check_matrix("grad_h", grad_h, (grad.shape[0], lora_A.shape[0]), grad)
        lora_A, grad_h = lora_A.contiguous(), grad_h.contiguous()
    return _run("lora_matmul_4bit_grad_input", grad.device, grad.contiguous(), weight, lora_A, grad_h)


lora_matmul_4bit_grad_input = torch.library.custom_op(
    "nf4lora::lora_matmul_4bit_grad_input", mutates_args=())(_lora_matmul_4bit_grad_input)


@lora_matmul_4bit_grad_input.register_fake
def _(grad, packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax,
      nested_code, nested_offset, nested_blocksize, lora_A, grad_h):
    return grad.new_empty((grad.shape[0], in_features))


# --------------------------------------------------------------------------------------
# Eager fast path for the matmul ops.
# --------------------------------------------------------------------------------------
# Going through torch's dispatcher costs ~150 us per call for a Python custom op (the
# autograd, backend and dynamo-disable wrappers), 10-15% of a whole 4096x4096 M = 1
# matmul on the CPU. The op is what torch.compile, fake tensors, tensor subclasses
# (DTensor) and dispatch modes (FlopCounterMode) need to see; plain eager calls on
# plain tensors run the same function directly: same checks, same kernels.

def _direct(*tensors) -> bool:
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(type(t) is Tensor for t in tensors))


def call_lora_matmul_4bit(x: Tensor, packed: Tensor, *args) -> tuple[Tensor, Tensor]:
    """lora_matmul_4bit, skipping the dispatcher where nothing needs to see the op."""
    return (_lora_matmul_4bit if _direct(x, packed) else lora_matmul_4bit)(x, packed, *args)


def call_lora_matmul_4bit_grad_input(grad: Tensor, packed: Tensor, *args) -> Tensor:
    """lora_matmul_4bit_grad_input, skipping the dispatcher where nothing needs to see the op."""
    op = _lora_matmul_4bit_grad_input if _direct(grad, packed) else lora_matmul_4bit_grad_input
    return op(grad, packed, *args)
