"""The Triton backend: launch glue for `nf4lora.triton_kernels` (grid, block sizes, dtypes).

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter,
how the tests run it on machines without a GPU). The kernels and their block-size
choices live in triton_kernels/ (one op per file); this module only allocates outputs
and launches. Inputs are validated by the caller (see nf4lora.backends).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os

import torch

from ..codebook import get_4bit_type
from ..reference import num_blocks

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE_TYPES = ("cuda", "cpu") if INTERPRETING else ("cuda",)


def _import_kernels():
    """(kernels package, None) or (None, why not).

    Installed, the kernels are `nf4lora.triton_kernels`; in a source checkout without an
    install they are the top-level `triton_kernels` folder beside `nf4lora/`. That name
    is also used by other distributions, so the fallback must carry our marker.
    """
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed (pip install triton)"
    try:
        return importlib.import_module("nf4lora.triton_kernels"), None
    except ModuleNotFoundError as error:
        if error.name != "nf4lora.triton_kernels":
            return None, f"importing nf4lora.triton_kernels failed: {error}"
    except ImportError as error:
        return None, f"importing nf4lora.triton_kernels failed: {error}"
    try:
        import triton_kernels
    except ImportError as error:
        return None, f"importing the triton_kernels source folder failed: {error}"
    if not getattr(triton_kernels, "NF4LORA_TRITON_KERNELS", False):
        return None, (f"the importable triton_kernels ({triton_kernels.__file__}) is another "
                      "distribution's, and nf4lora.triton_kernels is not installed")
    return triton_kernels, None


_kernels, _unavailable_reason = _import_kernels()


def availability() -> str | None:
    if _unavailable_reason is not None:
        return _unavailable_reason
    if not INTERPRETING and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return None


@functools.lru_cache(maxsize=None)
def _table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry float32 code book on `device`, uploaded once per device."""
    return get_4bit_type(quant_type, device=device)


def _log2_of_power_of_two(value: int, name: str) -> int:
    if value < 2 or value & (value - 1):
        raise ValueError(f"{name} must be a power of 2 (the kernels shift by its log2), "
                         f"got {value}")
    return value.bit_length() - 1


def _check_quantize_blocksize(blocksize: int, allowed) -> None:
    if blocksize not in allowed:
        raise ValueError(f"blocksize must be one of {allowed} for the triton backend, "
                         f"got {blocksize}")


def _on(device: torch.device):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def _contiguous_output(out: torch.Tensor):
    """Yield a flat contiguous buffer the kernel fills, copied into `out` if needed."""
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype,
                                                         device=out.device)
    yield target.view(-1)
    if target is not out:
        out.copy_(target)


def quantize_4bit(A, blocksize, quant_type):
    kernels = _kernels.quantize_4bit
    _check_quantize_blocksize(blocksize, kernels.BLOCKSIZES)
    x = A.reshape(-1).contiguous()
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=x.device)
    if n:
        config = kernels.launch_config(blocksize, quant_type)
        with _on(x.device):
            kernels.quantize_4bit_kernel[kernels.grid(n, config)](
                x, packed, absmax, n, packed.numel(), **config)
    return packed, absmax


def dequantize_4bit(packed, absmax, blocksize, quant_type, out, nested):
    kernels = _kernels.dequantize_4bit
    blocksize_log2 = _log2_of_power_of_two(blocksize, "blocksize")
    packed = packed.reshape(-1).view(torch.uint8)
    n = out.numel()
    if n == 0:
        return
    table = _table(quant_type, out.device)
    if nested is None:
        absmax = absmax.reshape(-1).float()
        nested_code, nested_absmax, nested_offset, nested_log2 = table, table, 0.0, 0
    else:
        absmax = absmax.reshape(-1).view(torch.uint8)
        nested_code = nested.code.float().contiguous()
        nested_absmax = nested.absmax.reshape(-1).float()
        nested_offset = float(nested.offset)
        nested_log2 = _log2_of_power_of_two(nested.blocksize, "nested blocksize")
    config = kernels.launch_config(nested is not None)
    with _contiguous_output(out) as flat_out, _on(out.device):
        kernels.dequantize_4bit_kernel[kernels.grid(n, config)](
            packed, absmax, table, nested_code, nested_absmax, flat_out,
            n, (n + 1) // 2, blocksize_log2, nested_log2, nested_offset, **config)


def quantize_blockwise(A, code, blocksize):
    kernels = _kernels.blockwise_8bit
    _check_quantize_blocksize(blocksize, kernels.BLOCKSIZES)
    x = A.reshape(-1).contiguous()
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=x.device)
    if n:
        config = kernels.quantize_launch_config(blocksize)
        with _on(x.device):
            kernels.quantize_blockwise_kernel[kernels.quantize_grid(n, config)](
                x, code.float().contiguous(), codes, absmax, n, **config)
    return codes, absmax


def dequantize_blockwise(codes, absmax, code, blocksize, out):
    kernels = _kernels.blockwise_8bit
    blocksize_log2 = _log2_of_power_of_two(blocksize, "blocksize")
    n = out.numel()
    if n == 0:
        return
    config = kernels.dequantize_launch_config()
    with _contiguous_output(out) as flat_out, _on(out.device):
        kernels.dequantize_blockwise_kernel[kernels.dequantize_grid(n, config)](
            codes.reshape(-1).contiguous(), absmax.reshape(-1).float(),
            code.float().contiguous(), flat_out, n, blocksize_log2, **config)
