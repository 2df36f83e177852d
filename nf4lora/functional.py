"""bitsandbytes' functional API for 4-bit and 8-bit blockwise quantization.

`import nf4lora.functional as F` where `import bitsandbytes.functional as F` was:
same names, signatures, defaults, returned shapes and bytes. Where this module
behaves differently it says so at the function (all are stricter checks or fixes
of degenerate cases, never a different format).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _ops
from ._weight import PackedWeight, check_float, check_quant_args
from .codebook import (CUSTOM, create_dynamic_map, create_fp8_map, create_linear_map,  # noqa: F401
                       create_normal_map, format_key, get_4bit_type, table)
from .quant_state import QuantState

__all__ = [
    "QuantState", "get_4bit_type", "create_normal_map", "create_dynamic_map",
    "create_linear_map", "create_fp8_map", "has_avx512bf16",
    "quantize_4bit", "dequantize_4bit", "quantize_nf4", "dequantize_nf4", "quantize_fp4",
    "dequantize_fp4", "quantize_blockwise", "dequantize_blockwise", "gemv_4bit",
]

DEFAULT_BLOCKSIZE = 64          # bitsandbytes' 4-bit default on every platform since 0.50
NESTED_BLOCKSIZE = 256          # double quantization: one float32 absmax2 per 256 absmax codes
DEFAULT_8BIT_BLOCKSIZE = 4096   # bitsandbytes' quantize_blockwise default


@functools.lru_cache(maxsize=None)
def _dynamic_map_on(device: torch.device) -> Tensor:
    return create_dynamic_map().to(device)


def dynamic_map(device) -> Tensor:
    """A fresh copy of the dynamic 8-bit map on `device` (states own their tables)."""
    return _dynamic_map_on(torch.device(device)).clone()


def _raise_on_nonfinite(absmax: Tensor, blocksize: int, name: str = "A") -> None:
    """absmax is NaN or Inf exactly for the blocks holding a NaN or Inf, so this check
    costs one pass over n/blocksize floats instead of one over the input."""
    bad = torch.nonzero(~torch.isfinite(absmax))
    if bad.numel():
        block = int(bad[0, 0])
        raise ValueError(f"{name} contains NaN or Inf: first in block {block} (flat elements "
                         f"{block * blocksize}..{(block + 1) * blocksize - 1}); "
                         f"{bad.shape[0]} bad block(s) in all")


def _store_as(packed: Tensor, quant_storage: torch.dtype) -> Tensor:
    """Packed bytes as a [k, 1] tensor of `quant_storage`, the same bytes reinterpreted.

    bitsandbytes allocates (n+1) // (2 * itemsize) elements and so drops the last bytes
    when they do not fill a whole element (e.g. 3 elements in bfloat16 storage); here the
    tail is zero-padded to a whole element instead, so no code is lost.
    """
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(f"quant_storage must be a torch.dtype, got {quant_storage!r}")
    if quant_storage == torch.uint8:
        return packed.unsqueeze(1)
    if quant_storage.is_complex or quant_storage == torch.bool:
        raise ValueError(f"quant_storage must be an integer or float dtype, got {quant_storage}")
    itemsize = quant_storage.itemsize
    padded = torch.nn.functional.pad(packed, (0, -packed.numel() % itemsize))
    return padded.view(quant_storage).unsqueeze(1)


def quantize_4bit(A: Tensor, absmax: Optional[Tensor] = None, out: Optional[Tensor] = None,
                  blocksize: Optional[int] = None, compress_statistics: bool = False,
                  quant_type: Optional[str] = None, quant_storage: torch.dtype = torch.uint8,
                  code=None) -> tuple[Tensor, QuantState]:
    """Quantize A (fp32/fp16/bf16, any shape) to 4 bits per element, blockwise.

    Returns (packed [(bytes) / itemsize, 1] of `quant_storage`, QuantState). With
    compress_statistics the float32 absmax is double-quantized: its mean is subtracted
    and the rest is stored as 8-bit dynamic-map codes with one float32 per 256 blocks.
    NaN or Inf in A raises ValueError naming the first bad block.
    `absmax` and `out`, if given, receive copies of the results (bitsandbytes' legacy
    out-parameters).

    The format (levels and sources in nf4lora/codebook.py; each block is scaled by
    1/absmax, then every value takes a level):
      quant_type "fp4" (the default, as in bitsandbytes) and "nf4": bitsandbytes' bytes,
        bit for bit. NF4: QLoRA's NormalFloat (Dettmers et al., arXiv:2305.14314).
      "af4": AbnormalFloat (Yoshida, arXiv:2306.06965), its blocksize-64 table.
      "bof4": block-wise optimal float (Blumenberg et al., arXiv:2505.06653), nf4lora's
        reproduction of the paper's MSE-optimal levels for Gaussian weights at blocksize 64,
        with -1, 0 and 1 kept exact (codebook.py says why, and what is not verified).
      "iq4nl": llama.cpp's IQ4_NL int8 levels (ggml-common.h kvalues_iq4nl) / 127.
      "int4": the integers -8..7 / 8.
      code=: any 16 levels instead (a tensor or sequence): finite, distinct, sorted
        ascending and within [-1, 1] (they need not reach +-1: the block's absmax element
        then takes the outermost level); the state's quant_type is then "custom" and its
        `code` holds the table. quant_type may be omitted or "custom".
    Every format but FP4 takes the nearest level, ties to the lower one: the code is the
    number of float32 midpoints between consecutive levels strictly below the scaled
    value (NF4's encoder always was this rule). FP4 keeps bitsandbytes' CUDA rule.
    Every backend's kernels take every format (the table and its encoder are data).
    """
    blocksize = DEFAULT_BLOCKSIZE if blocksize is None else blocksize
    check_float("A", A)
    if code is not None:
        if quant_type not in (None, CUSTOM):
            raise ValueError(f"give either quant_type ({quant_type!r}) or code=, not both "
                             f"(with code= the format is {CUSTOM!r})")
        quant_type = CUSTOM
    elif quant_type is None:
        quant_type = "fp4"
    elif quant_type == CUSTOM:
        raise ValueError(f"quant_type {CUSTOM!r} needs its code book: pass code=")
    key = format_key(quant_type, code, name="code") if quant_type == CUSTOM else quant_type
    check_quant_args(blocksize, key)
    # detached: quantization has no gradient, and a state whose absmax required grad would
    # make every later dequantization (and matmul) try to backpropagate into it
    packed, block_absmax = _ops.quantize_4bit(A.detach(), blocksize, key)
    _raise_on_nonfinite(block_absmax, blocksize)
    code = table(key, device=A.device)
    state = QuantState(absmax=block_absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                       code=code, quant_type=quant_type)
    if compress_statistics:
        state = double_quantize(state)
    stored = _store_as(packed, quant_storage)
    if absmax is not None:
        absmax.copy_(state.absmax)
    return (out.copy_(stored) if out is not None else stored), state


def double_quantize(state: QuantState) -> QuantState:
    """A new 4-bit state holding `state`'s float32 absmax double-quantized: the mean is
    subtracted and the rest stored as 8-bit dynamic-map codes with one float32 per 256
    blocks (what quantize_4bit stores with compress_statistics=True; the 4-bit codes do not
    change, they were chosen with the exact absmax). Other fields are shared."""
    if state.nested:
        raise ValueError("the state is already double-quantized (nested)")
    offset = _offset(state.absmax)
    qabsmax, state2 = quantize_blockwise(state.absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return QuantState(absmax=qabsmax, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                      code=state.code, quant_type=state.quant_type, offset=offset, state2=state2)


def _offset(absmax: Tensor) -> Tensor:
    """torch's float32 mean, the reduction bitsandbytes uses (0 for no blocks)."""
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    if not torch.isfinite(offset):
        # Block maxima near float32's limit (3.4e38) overflow the float32 sum; bitsandbytes
        # would silently store an infinite offset and decode garbage.
        raise ValueError("double quantization (compress_statistics/nested) cannot store these "
                         "block maxima: their float32 mean overflows; quantize without it")
    return offset


def dequantize_4bit(A: Tensor, quant_state: Optional[QuantState] = None,
                    absmax: Optional[Tensor] = None, out: Optional[Tensor] = None,
                    blocksize: Optional[int] = None, quant_type: str = "fp4") -> Tensor:
    """Dequantize packed 4-bit codes to quant_state.dtype and quant_state.shape.

    Without a quant_state, `absmax` (float32) and `out` (giving shape and dtype) are
    required, as in bitsandbytes. The nested absmax of a double-quantized state is
    decoded inside the same kernel pass, not materialized first.
    """
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        quant_state = QuantState(absmax=absmax, shape=out.shape, dtype=out.dtype,
                                 blocksize=DEFAULT_BLOCKSIZE if blocksize is None else blocksize,
                                 quant_type=quant_type)
    weight = PackedWeight.from_state(A, quant_state, "A")
    if out is None:
        out = _ops.dequantize_4bit(*weight.op_args(), quant_state.dtype)
    else:
        if out.numel() != weight.numel:
            raise ValueError(f"out has {out.numel()} elements, the state describes shape "
                             f"{list(weight.shape)}")
        _ops.dequantize_4bit_out(*weight.op_args(), out)
    # bitsandbytes' compatibility shim: a packed weight passed transposed, as [1, bytes],
    # comes back transposed. (bitsandbytes also does this for a [1, 1] input, i.e. a
    # 1- or 2-element tensor, which only scrambles tiny shapes; that case is left alone.)
    if A.dim() == 2 and A.shape[0] == 1 and A.shape[1] > 1 and out.dim() == 2:
        return out.t()
    return out


def quantize_nf4(A: Tensor, absmax: Optional[Tensor] = None, out: Optional[Tensor] = None,
                 blocksize: Optional[int] = None, compress_statistics: bool = False,
                 quant_storage: torch.dtype = torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(A: Tensor, absmax: Optional[Tensor] = None, out: Optional[Tensor] = None,
                 blocksize: Optional[int] = None, compress_statistics: bool = False,
                 quant_storage: torch.dtype = torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_nf4(A: Tensor, quant_state: Optional[QuantState] = None,
                   absmax: Optional[Tensor] = None, out: Optional[Tensor] = None,
                   blocksize: Optional[int] = None) -> Tensor:
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A: Tensor, quant_state: Optional[QuantState] = None,
                   absmax: Optional[Tensor] = None, out: Optional[Tensor] = None,
                   blocksize: Optional[int] = None) -> Tensor:
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def quantize_blockwise(A: Tensor, code: Optional[Tensor] = None, absmax: Optional[Tensor] = None,
                       out: Optional[Tensor] = None, blocksize: int = DEFAULT_8BIT_BLOCKSIZE,
                       nested: bool = False) -> tuple[Tensor, QuantState]:
    """8-bit blockwise quantization with a 256-entry code (default: the dynamic map).

    Encoding follows bitsandbytes' CUDA kernel (exact nearest code by binary search);
    its CPU build reads an approximate 65536-bin table instead and so can pick the
    neighbouring code for values near a midpoint.
    """
    check_float("A", A)
    code = dynamic_map(A.device) if code is None else code
    codes, block_absmax = _ops.quantize_blockwise(A.detach(), code, blocksize)   # no gradient
    _raise_on_nonfinite(block_absmax, blocksize)
    if nested:
        offset = _offset(block_absmax)
        qabsmax, state2 = quantize_blockwise(block_absmax - offset, blocksize=blocksize)
        state = QuantState(absmax=qabsmax, code=code.clone(), blocksize=blocksize, dtype=A.dtype,
                           offset=offset, state2=state2)
    else:
        state = QuantState(absmax=block_absmax, code=code, blocksize=blocksize, dtype=A.dtype)
    if absmax is not None:
        absmax.copy_(state.absmax)
    return (out.copy_(codes) if out is not None else codes), state


def dequantize_blockwise(A: Tensor, quant_state: Optional[QuantState] = None,
                         absmax: Optional[Tensor] = None, code: Optional[Tensor] = None,
                         out: Optional[Tensor] = None, blocksize: int = DEFAULT_8BIT_BLOCKSIZE,
                         nested: bool = False) -> Tensor:
    """code[q] * absmax[block] in quant_state.dtype (float32 without a state)."""
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        quant_state = QuantState(absmax=absmax, blocksize=blocksize, dtype=torch.float32,
                                 code=dynamic_map(A.device) if code is None else code)
    block_absmax = quant_state.absmax
    if quant_state.nested:
        block_absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2)
        block_absmax = block_absmax + quant_state.offset
    result = _ops.dequantize_blockwise(A, block_absmax.float(), quant_state.code,
                                       quant_state.blocksize, quant_state.dtype)
    return out.copy_(result) if out is not None else result


def gemv_4bit(A: Tensor, B: Tensor, out: Optional[Tensor] = None, transposed_A: bool = False,
              transposed_B: bool = False, state: Optional[QuantState] = None) -> Tensor:
    """A @ W^T for a 4-bit W (bitsandbytes passes B = packed_weight.t()).

    For now this is dequantize + torch's matmul; the fused kernels arrive with the
    matmul ops.
    """
    if state is None:
        raise ValueError("gemv_4bit needs the weight's quant state (state=...)")
    weight = dequantize_4bit(B.t() if B.dim() == 2 and B.shape[0] == 1 else B, state)
    result = torch.nn.functional.linear(A, weight.to(A.dtype))
    return out.copy_(result) if out is not None else result


@functools.lru_cache(maxsize=None)
def has_avx512bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (bitsandbytes' name; it gates its CPU gemv).

    The answer is the C++ extension's: the same CPU probe that picks the kernel path
    (`nf4lora._C.supported_isas()`, shown by `nf4lora info`), so the two never disagree.
    It also requires AVX512F and AVX512BW, which every AVX512-BF16 CPU has. Without the
    extension there is no native path to use it: False, as bitsandbytes answers without
    its native library."""
    from . import backends
    if backends.availability("cpu") is not None:
        return False
    from . import _C
    return "avx512bf16" in _C.supported_isas()
