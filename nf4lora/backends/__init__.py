"""Backend selection: which implementation runs an op for a tensor on a device.

Every backend module exposes the same functions, all taking what nf4lora._ops has
already checked (dtypes, sizes, devices, contiguity):

  quantize_4bit(A, blocksize, quant_type) -> (packed uint8 [ceil(n/2)], absmax f32 [blocks])
  dequantize_4bit(weight, out) -> None                                        (fills `out`)
  quantize_blockwise(A, code, blocksize) -> (codes uint8 [n], absmax f32 [blocks])
  dequantize_blockwise(codes, absmax, code, blocksize, out) -> None           (fills `out`)

`weight` is a `PackedWeight` (nf4lora/_weight.py), its nested offset already a float.
The matmul ops are optional per backend; a backend without them gets the composite
path of `nf4lora.backends.composite` (its own dequantize, then torch's matmul):

  lora_matmul_4bit(x, weight, lora_A, lora_B, scaling, bias) -> (y [M, out], h [M, r])
      y = x @ W^T + scaling * h @ lora_B^T + bias, h = x @ lora_A^T ([M, 0] without LoRA)
  lora_matmul_4bit_grad_input(grad, weight, lora_A, grad_h) -> dx [M, in]
      dx = grad @ W + grad_h @ lora_A, grad_h = scaling * grad @ lora_B (or None)
  multi_lora_matmul_4bit(x, weight, lora_A, lora_B, scalings, adapter_index, bias) -> y [M, out]
      y = x @ W^T + bias, plus on row m scalings[i] * (x[m] @ lora_A[i]^T) @ lora_B[i]^T
      for i = adapter_index[m] >= 0 (lora_A [n, r, in], lora_B [n, out, r])

with x / grad 2-D, contiguous, in the compute dtype (the spec: nf4lora.reference). Each
module also has `availability() -> str | None`: None when usable, otherwise the reason
it is not (shown to the user who asked for it).

Choice, first match wins: `set_backend(name)`, then the NF4LORA_BACKEND environment
variable, then the device's default ("cpu" for CPU tensors when the C++ extension is
built, else "reference"; "cuda" then "triton" for CUDA tensors). A backend that was
asked for but cannot run raises; it never falls back silently. One exception, by format
rather than by availability: a 4-bit code book the chosen backend's kernels do not take
(`takes_format`) would run on the reference backend; today every backend takes every
format, so it never applies.
"""
from __future__ import annotations

import importlib
import os
import warnings
import torch

from .._weight import NestedAbsmax, PackedWeight  # noqa: F401  (the backends' argument types)

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "NF4LORA_BACKEND"

# Which 4-bit formats a backend's kernels take: each backend module says so in
# `takes_format(quant_type)` (a format key, nf4lora.codebook). Every backend takes every
# format: the Triton kernels read the 16-entry table as data, and so do the C++ CPU and
# CUDA kernels (the table and encoder of nf4lora.codebook.kernel_codec, through
# PackedWeight.codec). A backend that lacked a format would send it to the reference
# backend, whose matmuls take the composite path (reference dequantize + torch GEMM):
# correct on any device but a full dense W per call (~6x the fused CPU time for a
# 4096x4096 layer at M = 1). backend_for is the one place that applies it.

_override: str | None = None


_loaded: dict = {}  # name -> the imported backend module


def _module(name: str):
    # kept after the first import: import_module costs ~1 us even for a loaded module, and
    # backend_for runs on every op call
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(f"nf4lora.backends.{name}")
    return module


def availability(name: str) -> str | None:
    """None if backend `name` can run here, else why not."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {BACKENDS}"
    try:
        return _module(name).availability()
    except ImportError as error:  # a backend whose own imports fail is unavailable
        return f"importing it failed: {error}"


def available_backends() -> list[str]:
    return [name for name in BACKENDS if availability(name) is None]


def set_backend(name: str | None) -> None:
    """Force one backend for every op (None restores automatic choice)."""
    if name is not None:
        reason = availability(name)
        if reason is not None:
            raise RuntimeError(f"nf4lora backend {name!r} is not available: {reason}")
    global _override
    _override = name


# os.environ.get costs ~0.75 us (it encodes the key and raises KeyError when the variable is
# unset), ~2% of a small layer's whole call; os.environ keeps its variables in a dict of
# bytes (CPython's os._Environ._data, which every write through os.environ updates), read
# here directly where it exists.
_ENVIRON_BYTES = getattr(os.environ, "_data", None)
_ENV_KEY = ENV_VAR.encode() if isinstance(_ENVIRON_BYTES, dict) and os.name == "posix" else None


def get_backend() -> str | None:
    """The forced backend, from `set_backend` or NF4LORA_BACKEND, or None."""
    if _override:
        return _override
    if _ENV_KEY is not None and _ENV_KEY not in _ENVIRON_BYTES:
        return None
    return os.environ.get(ENV_VAR) or None


_warned_reference_fallback = False


def _default_for(device_type: str) -> str:
    """The device's default backend, which is available (or a RuntimeError says why none is)."""
    global _warned_reference_fallback
    if device_type == "cuda":
        cuda = availability("cuda")
        if cuda is None:
            return "cuda"
        triton = availability("triton")
        if triton is None:
            return "triton"
        raise RuntimeError(f"no nf4lora backend runs CUDA tensors here (cuda: {cuda}; triton: "
                           f"{triton})")
    if availability("cpu") is None:
        return "cpu"
    if not _warned_reference_fallback:
        _warned_reference_fallback = True
        warnings.warn("nf4lora's C++ CPU extension is not built (" + str(availability("cpu"))
                      + "); using the slow pure-PyTorch reference backend.", stacklevel=3)
    return "reference"


def backend_for(device: torch.device, quant_type: str | None = None):
    """The backend module that runs ops on `device` for 4-bit format `quant_type` (a format
    key; None for the 8-bit ops). The chosen backend must be available even when the
    format sends the op to the reference backend, so a misconfiguration never hides."""
    # (on every op call: the default is available by construction, so only a requested
    # backend is checked)
    device_type = device.type
    name = get_backend()
    if name is None:
        name = _default_for(device_type)
    else:
        reason = availability(name)
        if reason is not None:
            raise RuntimeError(f"nf4lora backend {name!r} (requested via "
                               f"{'set_backend' if _override else ENV_VAR}) is not available: "
                               f"{reason}")
    module = _module(name)
    if quant_type is not None and not module.takes_format(quant_type):
        module = _module("reference")   # see takes_format above: its kernels lack this table
    if device_type not in module.DEVICE_TYPES:
        raise RuntimeError(f"nf4lora backend {name!r} runs on {module.DEVICE_TYPES} tensors, "
                           f"not {device_type}")
    return module
