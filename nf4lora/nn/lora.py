"""LoraLinear4bit: a LoRA adapter on a frozen Linear4bit (QLoRA), PEFT's math and init.

    y = base(x) + lora_B(lora_A(dropout(x))) * scaling,   scaling = lora_alpha / r
                                                          (lora_alpha / sqrt(r) with rsLoRA)

Without dropout (or in eval mode) the whole layer is one `lora_matmul_4bit` call, so the
fused kernel, when there is one, runs base and adapter together. With active dropout the
adapter sees dropout(x) while the base sees x, which one fused call cannot express: the
base then runs through `matmul_4bit` and the adapter through two small matmuls.

Precision, unlike PEFT: the adapter weights are stored in float32 (as PEFT keeps them) but
are cast to the layer's compute dtype for the matmul, so the adapter branch runs in the
compute dtype (bf16, typically) rather than in float32. That is what a fused kernel does;
gradients still reach the float32 parameters through the cast.

DoRA (`use_dora=True`, Liu et al. 2024, PEFT's definition): each output row is rescaled
by a trained magnitude over the row norm of the adapted weight,

    y = m / ||W + scaling B A||_row * (base(x) - b + scaling B A x) + b,

the norm detached. It is one `dora_matmul_4bit` call (one pass over the 4-bit W for the
output and the norms; ||W_o||^2 is cached by the base layer, and the whole norm while the
adapter's weights do not change: DoraNormCache). m starts as ||W + s B A||_row,
so a fresh DoRA layer is its base layer. With active dropout, as PEFT: the DoRA term is
computed on dropout(x), the base on x (three passes over W instead of one).

Parameter names are `lora_A.weight`, `lora_B.weight` (nn.Linear submodules) and, with
DoRA, `lora_magnitude_vector.weight`, with the 4-bit layer under `base_layer` as in PEFT.
PEFT itself nests one more level per adapter name (`lora_A.default.weight`); mapping to
and from that is the PEFT integration's job.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._weight import contents_key
from ..autograd import dora_matmul_4bit, dora_row_norms_4bit, lora_matmul_4bit, matmul_4bit
from ..merge import (MergeReport, dora_factor, dora_merge_delta, dora_unmerge_delta, merge_into,
                     resolve_options)
from .linear4bit import Linear4bit, Params4bit, in_dtype

__all__ = ["DoraMagnitude", "DoraNormCache", "LoraLinear4bit"]


class DoraNormCache:
    """DoRA's detached norm ||W + s B A||_row for one adapter, kept while W, A, B and s are
    unchanged: between the micro-batches of gradient accumulation and in evaluation a
    forward then reads W for x's rows only (nf4lora.dora_matmul_4bit's weight_norm), not
    for A's r rows too: at M = 1 on a CPU that is r times the compute of x's one row.
    Unchanged means: the same adapter parameters (storage and version counter, which every
    in-place write through autograd's view bumps: optimizer steps, load_state_dict, init),
    the same scaling and the same ||W_o||^2 tensor (Linear4bit.row_sq_norms makes a new one
    when W changes). Not part of any state dict."""

    def __init__(self):
        self._key = None
        self._norm = None

    def __call__(self, x, weight, quant_state, lora_A, lora_B, scaling, magnitude, bias,
                 weight_sq_norms, parameters):
        """dora_matmul_4bit with the kept norm when still valid, else computing and keeping it;
        `parameters`: the adapter tensors the norm depends on (the trained ones, before any
        cast to the compute dtype)."""
        key = (contents_key(*parameters), scaling, weight_sq_norms)
        valid = (self._key is not None and self._key[:2] == key[:2]
                 and self._key[2] is weight_sq_norms)
        if valid:
            return dora_matmul_4bit(x, weight, quant_state, lora_A, lora_B, scaling, magnitude,
                                    bias, weight_sq_norms, weight_norm=self._norm)
        y, self._norm = dora_matmul_4bit(x, weight, quant_state, lora_A, lora_B, scaling,
                                         magnitude, bias, weight_sq_norms, return_norm=True)
        self._key = key
        return y


class DoraMagnitude(nn.Module):
    """DoRA's trained magnitude m [out_features], float32 (PEFT's lora_magnitude_vector
    holds it as `.weight` in the same way)."""

    def __init__(self, magnitude: Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude.detach().float().clone())

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


class LoraLinear4bit(nn.Module):
    """A LoRA adapter (rank r) around a Linear4bit. Only lora_A and lora_B train."""

    def __init__(self, base: Linear4bit, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False):
        super().__init__()
        if not isinstance(base, Linear4bit):
            raise TypeError(f"base must be a nf4lora Linear4bit, got {type(base).__name__}")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.use_dora = bool(use_dora)
        self._dora_norm = DoraNormCache()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A Kaiming-uniform (a=sqrt(5), nn.Linear's own init), B zero,
        so a fresh adapter leaves the base layer's output unchanged."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:   # m = ||W + s B A||_row: the layer starts as its base layer
            sq_norms = self.base_layer.row_sq_norms()      # quantizes the base if it is not yet
            self.lora_magnitude_vector = DoraMagnitude(dora_row_norms_4bit(
                self.weight, self.weight.quant_state, self.lora_A.weight.detach(),
                self.lora_B.weight.detach(), self.scaling, sq_norms))

    # Read-through to the base layer, for code that expects a Linear's attributes.
    @property
    def weight(self) -> Params4bit:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"use_dora={self.use_dora}, merged={self.merged}")

    def forward(self, x: Tensor) -> Tensor:
        # (submodules and parameters are read from `_modules` / `_parameters`, and casts
        # skipped where the dtype is already right: each `Module.__getattr__` costs ~1.8 us
        # and a no-op `.to()` ~3 us on a 2-core EPYC Zen 1, and this runs on every call)
        modules = self._modules
        base = modules["base_layer"]
        if self.merged:
            return base(x)
        dtype = base.prepare(x)    # quantize on first use, fix the compute dtype, cast the bias
        xc = in_dtype(x, dtype)
        bias = base._parameters["bias"]
        lora_A = in_dtype(modules["lora_A"]._parameters["weight"], dtype)
        lora_B = in_dtype(modules["lora_B"]._parameters["weight"], dtype)
        weight = base._parameters["weight"]
        state = weight.quant_state
        dropout = self.training and isinstance(modules["lora_dropout"], nn.Dropout)
        if self.use_dora:
            def dora(x, bias):
                return self._dora_norm(x, weight, state, lora_A, lora_B, self.scaling,
                                       self.lora_magnitude_vector.weight, bias,
                                       base.row_sq_norms(),
                                       (self.lora_A.weight, self.lora_B.weight))
            if not dropout:
                y = dora(xc, bias)
            else:   # PEFT: base(x) + (m/norm - 1) base(xd) + m/norm s B A xd, xd = dropout(x)
                xd = self.lora_dropout(xc)
                y = (matmul_4bit(xc, weight.t(), state, bias=bias) + dora(xd, None)
                     - matmul_4bit(xd, weight.t(), state))
        elif dropout:
            y = matmul_4bit(xc, weight.t(), state, bias=bias)
            y = y + F.linear(F.linear(self.lora_dropout(xc), lora_A), lora_B) * self.scaling
        else:
            y = lora_matmul_4bit(xc, weight, state, lora_A, lora_B, self.scaling, bias)
        return in_dtype(y, x.dtype)

    # -- merging ---------------------------------------------------------------------------

    def _delta(self) -> Tensor:
        """scaling * B @ A in float32 [out, in]."""
        return (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()) * self.scaling

    @property
    def merge_report(self) -> Optional[MergeReport]:
        """The report of the latest merge or unmerge of this adapter's 4-bit weight (also
        a refused one), None before any: nf4lora.merge.MergeReport."""
        return getattr(self.base_layer, "merge_report", None)

    @torch.no_grad()
    def merge(self, *, requantize: Optional[str] = None, max_error: Optional[float] = None,
              probe_rows: Optional[int] = None) -> float:
        """Fold the adapter into the 4-bit weight: W' = quantize(dequantize(W) + scaling * B @ A)
        (with DoRA, W' = quantize(m / ||W + s B A||_row * (W + s B A)), PEFT's DoRA merge).

        requantize: "plain" (each block scaled by its absmax, as any quantization) or
            "search" (each block's scale searched for the least squared error;
            nf4lora.merge.quantize_4bit_search).
        max_error: refuse when the re-quantized weight's largest absolute error against
            W + scaling * B @ A exceeds it: MergeRefusedError (a ValueError), the layer
            left unmerged and byte for byte as it was.
        probe_rows: rows of the probe batch the report's output error is measured on.
        Arguments left None come from an enclosing nf4lora.merge.merge_options (defaults:
        "plain", no bound, 16 rows).

        Returns the largest absolute error the re-quantization introduced against the exact
        merged weight; the full report (errors, output error on the probe batch) is
        `self.merge_report`, also logged by the `nf4lora` logger. After merging, forward is
        the base layer alone.
        """
        if self.merged:
            raise RuntimeError("the adapter is already merged")
        options = resolve_options(requantize, max_error, probe_rows)
        delta = self._delta()
        if self.use_dora:   # W' = m / ||W + delta||_row * (W + delta); unmerge needs the factor
            factor = dora_factor(self.base_layer, self.lora_magnitude_vector.weight, delta)
            report = merge_into(self.base_layer, dora_merge_delta(factor, delta), options)
            self._dora_factor = factor
        else:
            report = merge_into(self.base_layer, delta, options)
        self.merged = True
        return report.max_abs_error

    @torch.no_grad()
    def unmerge(self, *, requantize: Optional[str] = None,
                probe_rows: Optional[int] = None) -> float:
        """Take the adapter back out: W = quantize(dequantize(W') - scaling * B @ A).

        Lossy: each merge and unmerge rounds the weight to the 4-bit grid again, so after
        merge + unmerge the weight is close to, but not byte-identical with, the original.
        Never refused (a bound applies to merges only). Returns the largest absolute error
        this re-quantization introduced (float32); the report is `self.merge_report`.
        """
        if not self.merged:
            raise RuntimeError("the adapter is not merged")
        options = dataclasses.replace(resolve_options(requantize, None, probe_rows), max_error=None)
        delta = self._delta()
        if self.use_dora:
            delta = dora_unmerge_delta(self.__dict__.pop("_dora_factor"), delta)
        report = merge_into(self.base_layer, delta, options, sign=-1.0)
        self.merged = False
        return report.max_abs_error
