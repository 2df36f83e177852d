"""What the tests compare against, and why: the spec for values, bitsandbytes for the format.

bitsandbytes is the oracle for bytes, codes and quant-state dicts. Its *compute* is not: on
CPUs with AVX-512 its native CPU dequantize treats a block that spans two rows as two blocks
(64x96 NF4, blocksize 64: max error 2.2 against the spec, on an AMD EPYC with AVX512-BF16),
and on CPUs with AVX512-BF16 an eval-mode `Linear4bit` repacks its weight with bf16 block
constants. Which path runs depends on the machine, so a test that compared nf4lora with
bitsandbytes' outputs would pass on one CPU and fail on another.

So values are checked against:
  * `spec_dequantize`: nf4lora.reference (the spec), for any QuantState, either library's;
  * `bnb_reference_dequantize`: bitsandbytes' own flat-block formula (its pure-PyTorch
    `_dequantize_4bit_compute`, the semantics its CUDA kernel has) with the block constants
    decoded from its state. It must equal the spec bit for bit, which the format tests check;
  * `spec_twin(model)`: the model with every 4-bit linear (nf4lora's or bitsandbytes') replaced
    by a dense layer holding the spec's dequantization, computing in the layer's compute dtype
    as bitsandbytes' Linear4bit does (dequantize to the state's dtype, cast to the compute
    dtype, F.linear, cast back to the input's dtype).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nf4lora import reference
from nf4lora.codebook import format_key


def decoded_absmax(state) -> torch.Tensor:
    """float32 block constants of a 4-bit state (nf4lora's or bitsandbytes'), decoded by the
    spec's formula code[q] * absmax2[i // 256] + offset when double-quantized."""
    if state.state2 is None:
        return state.absmax.float()
    state2 = state.state2
    return reference.dequantize_absmax(state.absmax, state2.absmax, state2.code,
                                       float(state.offset), state2.blocksize)


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.detach().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def spec_dequantize(packed: torch.Tensor, state, dtype=None) -> torch.Tensor:
    """nf4lora.reference's dequantization of (packed, state) in `dtype` (default state.dtype);
    any 4-bit format, a custom code book's table taken from state.code."""
    return reference.dequantize_4bit(_packed_bytes(packed), decoded_absmax(state), state.blocksize,
                                     format_key(state.quant_type, state.code), tuple(state.shape),
                                     dtype or state.dtype)


def bnb_reference_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' reference semantics (its default-backend formula), CPU-independent."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(_packed_bytes(packed), decoded_absmax(state), code,
                                    state.blocksize, tuple(state.shape), state.dtype)


class SpecLinear(nn.Module):
    """A dense stand-in for a 4-bit linear: the spec's W, the layer's compute dtype."""

    def __init__(self, weight: torch.Tensor, bias, compute_dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


def is_4bit_linear(module: nn.Module) -> bool:
    """nf4lora's or bitsandbytes' Linear4bit (not the adapter layers that wrap one)."""
    return (isinstance(module, nn.Linear) and getattr(module.weight, "quant_state", None) is not None
            and hasattr(module, "compute_dtype"))


def spec_twin(model: nn.Module) -> nn.Module:
    """`model`, changed in place: every 4-bit linear becomes a SpecLinear of its weight."""
    for name, module in list(model.named_modules()):
        if not is_4bit_linear(module):
            continue
        state = module.weight.quant_state
        twin = SpecLinear(spec_dequantize(module.weight, state), module.bias, module.compute_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, twin)
    return model


def max_abs_tolerance(expected: torch.Tensor, dtype: torch.dtype, factor: float = 16) -> float:
    """`factor` ulps of `dtype` at the largest |expected|: the rounding of a matmul chain in
    `dtype` relative to the same chain summed in another order."""
    return factor * torch.finfo(dtype).eps * expected.abs().max().item()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(math.ulp(0)))
