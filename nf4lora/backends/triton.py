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


def dequantize_4bit(weight, out):
    kernels = _kernels.dequantize_4bit
    n = out.numel()
    if n == 0:
        return
    (packed, absmax, table, nested_code, nested_absmax, blocksize_log2, nested_log2,
     nested_offset) = _weight_args(weight, out.device)
    config = kernels.launch_config(weight.nested is not None)
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


# --------------------------------------------------------------------------------------
# The matmul ops: lora_matmul_4bit and lora_matmul_4bit_grad_input (see
# nf4lora.backends for the contract). Which kernel runs is decided by
# triton_kernels.lora_matmul.choose_path: the split-K GEMV for M <= 16, the fused
# tensor-core kernel up to the roofline threshold FUSED_MAX_M, and above it (or for odd
# in_features) the composite path, dequantize into a buffer + torch's matmul.
# --------------------------------------------------------------------------------------

_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The interpreter has no SMs; the split heuristic gets a small nominal count so that
# interpreted launches stay few programs.
INTERPRETER_NUM_SMS = 4


def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _weight_args(weight, device: torch.device) -> tuple:
    """The kernels' weight arguments: (packed, absmax, table, nested_code, nested_absmax,
    blocksize_log2, nested_blocksize_log2, nested_offset). Without double quantization the
    nested slots get the table (never read) and zeros."""
    table = _table(weight.quant_type, device)
    nested = weight.nested
    if nested is None:
        absmax = weight.absmax.reshape(-1).float()
        nested_code, nested_absmax, nested_offset, nested_log2 = table, table, 0.0, 0
    else:
        absmax = weight.absmax.reshape(-1).view(torch.uint8)
        nested_code = nested.code.float().contiguous()
        nested_absmax = nested.absmax.reshape(-1).float()
        nested_offset = float(nested.offset)
        nested_log2 = _log2_of_power_of_two(nested.blocksize, "nested blocksize")
    return (weight.packed.reshape(-1).view(torch.uint8), absmax, table, nested_code,
            nested_absmax, _log2_of_power_of_two(weight.blocksize, "blocksize"), nested_log2,
            nested_offset)


def _matmul_weight_args(weight, device: torch.device) -> tuple:
    """The matmul kernels' weight arguments: `_weight_args` with the row bytes and block
    count after nested_absmax."""
    (packed, absmax, table, nested_code, nested_absmax, blocksize_log2, nested_log2,
     nested_offset) = _weight_args(weight, device)
    n, k = weight.out_features, weight.in_features
    return (packed, absmax, table, nested_code, nested_absmax, k // 2,
            num_blocks(n * k, weight.blocksize), blocksize_log2, nested_log2, nested_offset)


def _composite():
    """(the composite module, this backend module): dequantize + torch's matmul."""
    import sys
    from . import composite
    return composite, sys.modules[__name__]


def _check_path(path: str, m: int, k: int) -> None:
    paths = _kernels.lora_matmul
    if path not in (paths.PATH_GEMV, paths.PATH_FUSED, paths.PATH_COMPOSITE):
        raise ValueError(f"path must be one of gemv, fused, composite; got {path!r}")
    if path != paths.PATH_COMPOSITE and k % 2:
        raise ValueError(f"the {path} kernel needs an even in_features, got {k}")
    if path == paths.PATH_GEMV and m > paths.GEMV_MAX_M:
        raise ValueError(f"the gemv kernel takes M <= {paths.GEMV_MAX_M} rows, got {m}")


def lora_matmul_4bit(x, weight, lora_A, lora_B, scaling, bias, *, path=None, splits=None):
    """(y [M, out], h [M, r]) = (x @ W^T + scaling * h @ lora_B^T + bias, x @ lora_A^T).

    `path` forces a kernel ("gemv", "fused", "composite") and `splits` the GEMV's split
    count; both are for tests and benchmarks, the default is the dispatcher's choice."""
    kernels = _kernels.lora_matmul
    m, k = x.shape
    n = weight.out_features
    path = path or kernels.choose_path(m, n, k, _capability(x.device))
    _check_path(path, m, k)
    if path == kernels.PATH_COMPOSITE:
        composite, backend = _composite()
        return composite.lora_matmul_4bit(backend, x, weight, lora_A, lora_B, scaling, bias)
    r = 0 if lora_A is None else lora_A.shape[0]
    bias = None if bias is None else bias.contiguous()   # the ops check its shape, not strides
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, r), dtype=x.dtype, device=x.device)
    (packed, absmax, table, nested_code, nested_absmax, row_bytes, blocks, blocksize_log2,
     nested_log2, nested_offset) = _matmul_weight_args(weight, x.device)
    x_type = _TYPE_NAMES[x.dtype]
    nested = weight.nested is not None
    with _on(x.device):
        if path == kernels.PATH_GEMV:
            gemv = _kernels.gemv
            config = gemv.launch_config(gemv.block_m_for(m), x_type, nested)
            tiles = -(-n // config["BLOCK_N"]) - (-r // config["BLOCK_N"])  # ceil divisions
            if splits is None:
                splits, k_per_split = gemv.num_splits(m, k, tiles, _num_sms(x.device),
                                                      config["BLOCK_K"])
            else:
                splits, k_per_split = gemv.split_k(k, splits, config["BLOCK_K"])
            partial = torch.empty((splits, m, n + r), dtype=torch.float32, device=x.device)
            gemv.gemv_split_k_kernel[gemv.grid(n, r, splits, config)](
                x, packed, absmax, table, nested_code, nested_absmax,
                x if lora_A is None else lora_A, partial, m, n, k, r, row_bytes, blocks,
                blocksize_log2, nested_log2, nested_offset, k_per_split, **config)
            config = gemv.epilogue_config(lora_A is not None, bias is not None)
            gemv.gemv_epilogue_kernel[gemv.epilogue_grid(n, config)](
                partial, y if lora_B is None else lora_B, y if bias is None else bias, y,
                y if lora_A is None else h, m, n, r, splits, float(scaling), **config)
        else:
            # h by a separate small matmul, the kernel adds h @ B^T in its epilogue
            # (why: triton_kernels/lora_matmul.py's docstring).
            if lora_A is not None:
                h = torch.nn.functional.linear(x, lora_A)
            config = kernels.launch_config(x_type, nested, lora_A is not None, bias is not None)
            kernels.lora_matmul_kernel[kernels.grid(m, n, config)](
                x, packed, absmax, table, nested_code, nested_absmax,
                x if lora_A is None else h, x if lora_B is None else lora_B,
                x if bias is None else bias, y, m, n, k, r, row_bytes, blocks,
                blocksize_log2, nested_log2, nested_offset, float(scaling), **config)
    return y, h


def lora_matmul_4bit_grad_input(grad, weight, lora_A, grad_h, *, path=None):
    """dx [M, in] = grad @ W + grad_h @ lora_A, W read packed (fused) up to the forward's
    threshold; above it the composite path. `path` forces "fused" or "composite"."""
    kernels = _kernels.lora_matmul
    m, n = grad.shape
    k = weight.in_features
    path = path or kernels.choose_path(m, n, k, _capability(grad.device))
    if path == kernels.PATH_GEMV:  # no split-K variant of the backward: the fused kernel
        path = kernels.PATH_FUSED
    _check_path(path, m, k)
    if path == kernels.PATH_COMPOSITE:
        composite, backend = _composite()
        return composite.lora_matmul_4bit_grad_input(backend, grad, weight, lora_A, grad_h)
    backward = _kernels.lora_matmul_backward
    r = 0 if lora_A is None else lora_A.shape[0]
    dx = torch.empty((m, k), dtype=grad.dtype, device=grad.device)
    (packed, absmax, table, nested_code, nested_absmax, row_bytes, blocks, blocksize_log2,
     nested_log2, nested_offset) = _matmul_weight_args(weight, grad.device)
    config = backward.launch_config(_TYPE_NAMES[grad.dtype], weight.nested is not None,
                                    lora_A is not None)
    with _on(grad.device):
        backward.lora_matmul_grad_input_kernel[backward.grid(m, k, config)](
            grad, packed, absmax, table, nested_code, nested_absmax,
            grad if lora_A is None else lora_A, grad if grad_h is None else grad_h, dx,
            m, n, k, r, row_bytes, blocks, blocksize_log2, nested_log2, nested_offset,
            **config)
    return dx
