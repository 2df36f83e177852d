"""Merging an adapter into a 4-bit weight, with numbers.

Merging re-quantizes: W' = quantize(dequantize(W) + s B A). Every merge here (nf4lora's
`LoraLinear4bit.merge`, `nf4lora.merge_lora`, PEFT's `merge`/`merge_and_unload` on nf4lora
layers) goes through `merge_into`, which

  * re-quantizes with the weight's own settings, by one of two methods: "plain" (the
    quantization every 4-bit weight gets: each block scaled by its absmax) or "search"
    (each block's scale picked from a small grid for the least squared error,
    `quantize_4bit_search`; same format, bitsandbytes reads it);
  * measures the result against the exact W + s B A: a `MergeReport`;
  * refuses, writing nothing, when a bound (`max_error`) is given and exceeded;
  * writes the new weight, stores the report on the 4-bit layer (`layer.merge_report`) and
    logs it through the `nf4lora` logger (INFO).

PEFT's `merge_and_unload()` passes no options through, so the options can also come from a
context: `with merge_options(requantize="search", max_error=0.05): model.merge_and_unload()`.
`merge_reports(model)` collects the reports of every merged (or refused) 4-bit layer by name.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from . import functional, reference
from .codebook import format_key

__all__ = [
    "MergeOptions",
    "MergeRefusedError",
    "MergeReport",
    "MergeSummary",
    "PROBE_ROWS",
    "REQUANTIZE_METHODS",
    "measure_merge",
    "merge_into",
    "merge_options",
    "merge_reports",
    "probe_batch",
    "quantize_4bit_search",
    "requantize",
    "resolve_options",
]

logger = logging.getLogger(__name__)

REQUANTIZE_METHODS = ("plain", "search")
# The probe batch: PROBE_ROWS rows of N(0, 1) inputs from a generator seeded with PROBE_SEED,
# the same for every layer of a width. 16 rows: over 20 seeds, the relative output error of
# a merged MiniLM 384 x 384 layer stayed within 6% of its mean (4 rows: 16%, 64 rows: 4%).
# A report (weight statistics and probe, float64) took 1.6 s for a 4096 x 4096 layer on the
# shared 2-core AMD EPYC.
PROBE_ROWS = 16
PROBE_SEED = 0
# Error statistics are accumulated over row chunks of about this many weights, so that
# the float64 copies they need stay near 32 MiB whatever the layer's size.
_STATS_CHUNK = 1 << 22


# -- options -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """How merges re-quantize and what they refuse.

    requantize: "plain" or "search" (see the module docstring).
    max_error: refuse (raise MergeRefusedError, write nothing) when the re-quantized
        weight's largest absolute error against W + s B A exceeds this; None: no bound.
    probe_rows: rows of the probe batch the output error is measured on (>= 1).
    """
    requantize: str = "plain"
    max_error: Optional[float] = None
    probe_rows: int = PROBE_ROWS

    def __post_init__(self):
        if self.requantize not in REQUANTIZE_METHODS:
            raise ValueError(f"requantize must be one of {REQUANTIZE_METHODS}, got {self.requantize!r}")
        if self.max_error is not None and not (isinstance(self.max_error, (int, float))
                                               and not isinstance(self.max_error, bool)
                                               and self.max_error >= 0):
            raise ValueError(f"max_error must be a number >= 0 (or None for no bound), "
                             f"got {self.max_error!r}")
        if isinstance(self.probe_rows, bool) or not isinstance(self.probe_rows, int) \
                or self.probe_rows < 1:
            raise ValueError(f"probe_rows must be an int >= 1, got {self.probe_rows!r}")


_OPTIONS: contextvars.ContextVar[MergeOptions] = contextvars.ContextVar(
    "nf4lora_merge_options", default=MergeOptions())


@contextlib.contextmanager
def merge_options(requantize: str = "plain", max_error: Optional[float] = None,
                  probe_rows: int = PROBE_ROWS) -> Iterator[MergeOptions]:
    """The options of every merge inside the block that does not pass its own (PEFT's
    merge_and_unload, for one, passes none). Checked on entry."""
    token = _OPTIONS.set(MergeOptions(requantize, max_error, probe_rows))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


def resolve_options(requantize: Optional[str] = None, max_error: Optional[float] = None,
                    probe_rows: Optional[int] = None) -> MergeOptions:
    """The options of one merge call: its arguments, each None falling back to the
    enclosing merge_options (or the defaults). Checked here, before anything is written."""
    context = _OPTIONS.get()
    return MergeOptions(context.requantize if requantize is None else requantize,
                        context.max_error if max_error is None else max_error,
                        context.probe_rows if probe_rows is None else probe_rows)


# -- reports -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MergeReport:
    """What one merge (or unmerge) did to one 4-bit layer, against the exact weight
    W + s B A (W - s B A for an unmerge) computed from the dequantized W (measure_merge).

    max_abs_error, mean_abs_error, mse: of the re-quantized weight, per element.
    output_max_abs_error, output_relative_error: of the layer's output on the probe batch
        (probe_rows rows of N(0, 1), `probe_batch`), bias excluded (it cancels):
        max |x (W' - exact)^T| and ||x (W' - exact)^T|| / ||x exact^T||.
    merged: False when the merge was refused (reason says why) and nothing was written.
    name: the module's name where the caller knew it (merge_lora, merge_reports), else "".
    """
    shape: tuple[int, ...]
    quant_type: str
    requantize: str
    max_abs_error: float
    mean_abs_error: float
    mse: float
    output_max_abs_error: float
    output_relative_error: float
    probe_rows: int
    merged: bool = True
    reason: str = ""
    operation: str = "merge"
    adapter: str = ""
    name: str = ""

    def __str__(self) -> str:
        what = " ".join(p for p in (self.name or "layer", f"[{'x'.join(map(str, self.shape))}]",
                                    self.quant_type, self.operation, self.adapter and
                                    f"adapter {self.adapter!r}", f"({self.requantize})") if p)
        numbers = (f"weight max |err| {self.max_abs_error:.3g}, mean |err| "
                   f"{self.mean_abs_error:.3g}, MSE {self.mse:.3g}; output on a "
                   f"{self.probe_rows}-row probe: max |err| {self.output_max_abs_error:.3g}, "
                   f"relative {self.output_relative_error:.3g}")
        status = "" if self.merged else f" -- REFUSED, nothing written: {self.reason}"
        return f"{what}: {numbers}{status}"


class MergeRefusedError(ValueError):
    """A merge exceeded its max_error bound; nothing was written. `.report` has the numbers."""

    def __init__(self, report: MergeReport):
        super().__init__(str(report))
        self.report = report


class MergeSummary(list):
    """MergeReports of several layers (a list), printed as a table."""

    COLUMNS = ("layer", "shape", "requantize", "max |err|", "mean |err|", "MSE",
               "out max |err|", "out rel err", "merged")

    @property
    def refused(self) -> list[str]:
        """Names of the layers whose merge was refused (they keep their adapter)."""
        return [report.name for report in self if not report.merged]

    def __str__(self) -> str:
        if not self:
            return "no merged 4-bit layers"
        rows = [[r.name or "?", "x".join(map(str, r.shape)), r.requantize,
                 f"{r.max_abs_error:.3g}", f"{r.mean_abs_error:.3g}", f"{r.mse:.3g}",
                 f"{r.output_max_abs_error:.3g}", f"{r.output_relative_error:.3g}",
                 "yes" if r.merged else "REFUSED"] for r in self]
        widths = [max(len(row[i]) for row in rows + [list(self.COLUMNS)])
                  for i in range(len(self.COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                 for row in [list(self.COLUMNS)] + rows]
        probes = sorted({r.probe_rows for r in self})
        lines.append(f"output errors on a probe batch of {'/'.join(map(str, probes))} rows "
                     f"of N(0, 1) inputs (seed {PROBE_SEED})")
        return "\n".join(lines)


def merge_reports(model: nn.Module) -> MergeSummary:
    """The latest merge report of every 4-bit layer in `model` that has one (merged, or
    refused and still wrapped), named by module (an adapter wrapper's name, not its
    `.base_layer`), in module order."""
    summary = MergeSummary()
    for name, module in model.named_modules():
        report = module.__dict__.get("merge_report")
        if isinstance(report, MergeReport):
            summary.append(dataclasses.replace(report, name=name.removesuffix(".base_layer")))
    return summary


def probe_batch(rows: int, in_features: int) -> Tensor:
    """The probe batch: float64 [rows, in_features] of N(0, 1), seeded with PROBE_SEED."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(rows, in_features, generator=generator, dtype=torch.float64)


@torch.no_grad()
def measure_merge(merged: Tensor, W: Tensor, delta: Tensor, sign: float = 1.0,
                  probe_rows: int = PROBE_ROWS) -> dict:
    """MergeReport's numbers (max_abs_error, mean_abs_error, mse, output_max_abs_error,
    output_relative_error) for `merged` (the re-quantized weight decoded, float [out, in])
    against W + sign * delta.

    The exact weight and the error are float32 (the sum is the tensor merging quantizes;
    its float32 rounding, ~6e-8 relative, is far below a 4-bit step), the sums and the
    probe matmuls float64, accumulated over row chunks."""
    out_features, in_features = merged.shape
    x = probe_batch(probe_rows, in_features).to(merged.device)
    chunk = max(1, _STATS_CHUNK // max(1, in_features))
    max_abs = sum_abs = sum_sq = 0.0
    y_max = y_err_sq = y_sq = 0.0
    for start in range(0, out_features, chunk):
        rows = slice(start, start + chunk)
        exact = W[rows].float() + sign * delta[rows].float()
        error = (merged[rows].float() - exact).double()
        exact = exact.double()
        max_abs = max(max_abs, error.abs().max().item())
        sum_abs += error.abs().sum().item()
        sum_sq += error.square().sum().item()
        y_error = x @ error.t()
        y_max = max(y_max, y_error.abs().max().item())
        y_err_sq += y_error.square().sum().item()
        y_sq += (x @ exact.t()).square().sum().item()
    n = merged.numel()
    return dict(max_abs_error=max_abs, mean_abs_error=sum_abs / n if n else 0.0,
                mse=sum_sq / n if n else 0.0, output_max_abs_error=y_max,
                output_relative_error=math.sqrt(y_err_sq / y_sq) if y_sq else 0.0)


# -- re-quantization -----------------------------------------------------------------------------

def quantize_4bit_search(A: Tensor, *, steps=reference.SEARCH_STEPS,
                         step: float = reference.SEARCH_STEP, **quantize_args):
    """functional.quantize_4bit with each block's scale searched for the least squared error:
    the same arguments (quantize_args: blocksize, compress_statistics, quant_type, code,
    quant_storage), the same format and checks; only the stored absmax and the codes differ.

    The definition, and the grid (the plain scale and one per entry of `steps`: that many
    steps of `step` x absmax from it, or of one 8-bit code with double quantization), is
    nf4lora.reference.quantize_4bit_search; this computes the same bytes without holding
    every candidate at once: the plain quantization comes from the backend's kernel, then
    the candidates are tried one at a time over all blocks, each block keeping the best so
    far (only a strictly smaller error replaces it, so ties keep the earlier candidate, as
    the spec's argmin does). Work: one encode + decode pass over the weight per candidate
    (len(steps), 8 by default); memory: a few float32 copies of the weight.
    """
    steps = tuple(steps) if isinstance(steps, (list, tuple)) else steps
    if not isinstance(steps, tuple) or not steps or any(
            isinstance(j, bool) or not isinstance(j, int) for j in steps):
        raise ValueError(f"steps must be a non-empty sequence of ints (steps from the plain "
                         f"scale), got {steps!r}")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 <= step \
            or 1 + min(steps) * step <= 0:
        raise ValueError(f"step must be a number >= 0 with 1 + min(steps) * step > 0 (every "
                         f"candidate float scale positive), got step={step!r}, steps={steps}")
    stored_plain, plain = functional.quantize_4bit(A, **quantize_args)   # checks every argument
    A = A.detach()
    n, blocksize = A.numel(), plain.blocksize
    key = format_key(plain.quant_type, plain.code)
    blocks = reference._as_padded_blocks(A, blocksize)

    if plain.nested:
        state2 = plain.state2
        code8, nested_absmax = state2.code.float(), state2.absmax
        group = torch.arange(blocks.shape[0], device=A.device) // state2.blocksize
        offsets = torch.tensor(steps, dtype=torch.long, device=A.device)
        neighbours = (plain.absmax.long().unsqueeze(1) + offsets).clamp(0, 255).to(torch.uint8)
        stored = torch.cat([plain.absmax.unsqueeze(1), neighbours], 1)  # [blocks, 1 + steps]
        scales = code8[stored.long()] * nested_absmax[group].unsqueeze(1) + plain.offset
    else:
        absmax = plain.absmax                   # float32, from the kernel
        factors = reference.search_scale_factors(steps, step).to(A.device)
        stored = scales = torch.cat([absmax.unsqueeze(1), absmax.unsqueeze(1) * factors], 1)

    stored_codes = 2 * ((n + 1) // 2)           # with an odd n, the padding zero's code too
    best_codes = torch.zeros(blocks.numel(), dtype=torch.uint8, device=A.device)
    best_codes[:stored_codes] = reference.unpack_nibbles(stored_plain.reshape(-1).view(torch.uint8),
                                                         stored_codes)
    best_codes = best_codes.view(blocks.shape)
    best_error = reference.block_squared_error(best_codes, scales[:, 0], blocks, n, key)
    best = torch.zeros(blocks.shape[0], dtype=torch.long, device=A.device)
    for k in range(1, scales.shape[1]):
        scale = scales[:, k]
        codes = reference.encode(blocks * (1.0 / scale).unsqueeze(1), key)
        error = reference.block_squared_error(codes, scale, blocks, n, key)
        better = (error < best_error) & (scale > 0)
        best_error = torch.where(better, error, best_error)
        best_codes = torch.where(better.unsqueeze(1), codes, best_codes)
        best = torch.where(better, k, best)

    packed = reference.pack_nibbles(best_codes.reshape(-1)[:stored_codes])
    chosen = stored.gather(1, best.unsqueeze(1)).squeeze(1)
    state = functional.QuantState(absmax=chosen, shape=plain.shape, code=plain.code,
                                  blocksize=blocksize, quant_type=plain.quant_type,
                                  dtype=plain.dtype, offset=plain.offset, state2=plain.state2)
    return functional._store_as(packed, stored_plain.dtype), state


def requantize(weight, dense: Tensor, method: str):
    """(stored, QuantState) of `dense` [out, in] quantized with the settings of `weight` (a
    quantized Params4bit: blocksize, format, double quantization, storage, original dtype)
    by `method` ("plain" | "search"). Nothing is written to `weight`."""
    args = dict(blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
                quant_storage=weight.quant_storage, **weight.format_args())
    dense = dense.to(weight.quant_state.dtype).contiguous()
    if method == "plain":
        return functional.quantize_4bit(dense, **args)
    return quantize_4bit_search(dense, **args)


def _ensure_quantized(layer) -> None:
    """A 4-bit layer whose weight a wrapper dropped the state of, or that was never
    quantized (built on meta, first used here), gets its state, as a forward would."""
    layer._fix_quant_state()
    if not layer.weight.bnb_quantized:
        layer.weight._quantize(layer.weight.device)


# DoRA merged into the weight (PEFT's DoraLinearVariant): W' = f * (W + delta) per row,
# f = magnitude / ||W + delta||_row from the weight before the merge; unmerging needs that
# same f (W = W' / f - delta), so the caller keeps it. As functions of the dequantized W
# for merge_into, merging with sign +1 and unmerging with sign -1.

@torch.no_grad()
def dora_factor(layer, magnitude: Tensor, delta: Tensor) -> Tensor:
    """magnitude / ||W + delta||_row, float32 [out], W the 4-bit layer's dequantized weight."""
    _ensure_quantized(layer)
    W = layer.dequantized_weight(torch.float32)
    return magnitude.detach().float().to(W.device) / torch.linalg.vector_norm(
        W + delta.float().to(W.device), dim=1)


def dora_merge_delta(factor: Tensor, delta: Tensor):
    """W -> f W + f delta - W (merge_into with sign +1 then writes f * (W + delta))."""
    f, delta = factor.unsqueeze(1), delta.float()
    return lambda W: (f - 1) * W + f * delta.to(W.device)


def dora_unmerge_delta(factor: Tensor, delta: Tensor):
    """W' -> W' - W' / f + delta (merge_into with sign -1 then writes W' / f - delta)."""
    f, delta = factor.unsqueeze(1), delta.float()
    return lambda W: W - W / f + delta.to(W.device)


@torch.no_grad()
def merge_into(layer, delta, options: MergeOptions, *, sign: float = 1.0,
               adapter: str = "", name: str = "") -> MergeReport:
    """Re-quantize the 4-bit `layer`'s weight to W + sign * delta (delta: float [out, in],
    or a function of the dequantized float32 W giving it, as DoRA's rescaled rows need),
    measure it, and write it unless options.max_error is exceeded (then raise
    MergeRefusedError, the layer untouched). The report goes on `layer.merge_report` either
    way, and to the `nf4lora` logger."""
    _ensure_quantized(layer)
    weight = layer.weight
    state = weight.quant_state
    W = layer.dequantized_weight(torch.float32)
    if callable(delta):
        delta = delta(W)
    delta = delta.detach().to(W.device)
    if delta.shape != W.shape:
        raise ValueError(f"the adapter's delta weight is {tuple(delta.shape)}, the 4-bit "
                         f"layer's weight {tuple(W.shape)}")
    stored, new_state = requantize(weight, W + sign * delta.float(), options.requantize)
    merged = functional.dequantize_4bit(stored.reshape(-1), new_state,
                                        out=torch.empty(W.shape, dtype=torch.float32,
                                                        device=W.device))
    report = MergeReport(shape=tuple(W.shape), quant_type=state.quant_type,
                         requantize=options.requantize, probe_rows=options.probe_rows,
                         operation="merge" if sign > 0 else "unmerge", adapter=adapter,
                         name=name, **measure_merge(merged, W, delta, sign, options.probe_rows))
    if options.max_error is not None and report.max_abs_error > options.max_error:
        report = dataclasses.replace(report, merged=False, reason=(
            f"max |error| {report.max_abs_error:.3g} exceeds max_error={options.max_error:g}"))
        layer.merge_report = report
        logger.info("%s", report)      # the caller hears of it: the exception, merge_lora's warning
        raise MergeRefusedError(report)
    weight._set_quantized(stored, new_state)
    layer.merge_report = report
    logger.info("%s", report)
    return report
