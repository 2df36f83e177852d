"""PEFT interoperation: `peft.get_peft_model` on a model whose linears are nf4lora Linear4bit.

    import nf4lora.integrations.peft          # registers nf4lora's LoRA layer with PEFT
    model = nf4lora.replace_linear(model)
    model = peft.get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))

PEFT picks the LoRA layer class per target module through its dispatchers; nf4lora's
Linear4bit is an nn.Linear subclass, so without registration PEFT would wrap it in its
dense `lora.Linear`: the forward would still work (base(x) + adapter), but merging would
add a float delta to the packed 4-bit bytes. `register()` plugs `LoraLinear4bitPeft` in
through PEFT's custom-module hook (`LoraConfig._register_custom_module`, consulted before
PEFT's own dispatchers) for every LoraConfig created afterwards; importing this module
calls it.

`LoraLinear4bitPeft` follows PEFT's bitsandbytes layer (`peft/tuners/lora/bnb.py`):
same parameter names (`lora_A.<adapter>.weight`, ...), same adapter bookkeeping (inherited
from PEFT's LoraLayer), so adapters saved from a bitsandbytes model load here and back.
What differs is the forward: with one active adapter and no active dropout it is a single
`nf4lora.lora_matmul_4bit` call (base and adapter fused); a mixed batch (`adapter_names=`)
is a single `nf4lora.multi_lora_matmul_4bit` call (the base once, each sample's adapter per
row, inside the kernels on the Triton and C++ CPU backends) where PEFT's loop runs the
base, then each adapter on its sub-batch; otherwise it is base(x) plus the sum of the
adapters, as PEFT computes it. And the merge: it re-quantizes (as PEFT's
bitsandbytes layer does) through nf4lora.merge, which reports the error per layer, refuses
a merge over a bound and offers an error-minimizing re-quantization; PEFT's
merge_and_unload() takes those options from `nf4lora.merge.merge_options(...)` around it.
PEFT's add_weighted_adapter (linear, cat, ties, svd, dare_*) needs nothing more.

Other PEFT methods on nf4lora Linear4bit layers (tests/test_peft_methods.py):

- LoRA: `LoraLinear4bitPeft` (above). DoRA (`use_dora=True`): `Dora4bitVariant`, PEFT's
  parameter (`lora_magnitude_vector.<adapter>.weight`) and math, its norms from the packed
  weight and, when one adapter is active without dropout, one `dora_matmul_4bit` call.
  The other LoRA variants are refused at get_peft_model time with a ValueError that says why.
- AdaLoRA, IA3: PEFT wraps Linear4bit in its dense layers (SVDLinear, ia3.Linear). Those
  only call the base layer's forward and add to (or scale) its input/output, which works
  on a 4-bit layer; nothing to register. Their merge is not supported on 4-bit layers (as on
  bitsandbytes'): PEFT's dense merge writes into the packed weight, which fails on a shape
  mismatch (or, for IA3 on feedforward modules alone, breaks the layer). PEFT refuses to
  merge IA3 when the model is flagged `is_loaded_in_4bit`, which
  `prepare_model_for_kbit_training` below sets.
- Prefix tuning, prompt tuning: no layer is wrapped (virtual tokens / past key values).
- LoHa, LoKr: PEFT's dense layers read the base weight's *shape* (LoHa sizes its factors
  from `base_layer.weight.shape`; both reshape the delta weight to it), which on a 4-bit
  layer is the packed bytes' [out*in/2, 1]: a shape error deep in a matmul, the same on
  bitsandbytes' Linear4bit (PEFT has no 4-bit LoHa/LoKr layer). `LoHaLinear4bitPeft` and
  `LoKrLinear4bitPeft` are PEFT's Linear layers with the logical [out, in] shape instead,
  and a merge that re-quantizes, as LoRA's; `register()` puts them in
  `LoHaModel.layers_mapping` / `LoKrModel.layers_mapping`.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import torch

from . import _quiet_imports

with _quiet_imports():   # PEFT's import pulls in torchao and bitsandbytes, which log at import
    import peft  # noqa: F401
from peft import LoraConfig  # noqa: E402
from peft.tuners.loha import LoHaModel
from peft.tuners.loha.layer import Linear as _PeftLoHaLinear
from peft.tuners.loha.layer import make_weight as _hadamard_weight
from peft.tuners.lokr import LoKrModel
from peft.tuners.lokr.layer import Linear as _PeftLoKrLinear
from peft.tuners.lokr.layer import make_kron as _kronecker_weight
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from .._weight import contents_key
from ..autograd import (dora_row_norms_4bit, lora_matmul_4bit, matmul_4bit,
                        multi_lora_matmul_4bit, pad_adapters)
from ..merge import (MergeReport, dora_factor, dora_merge_delta, dora_unmerge_delta, merge_into,
                     resolve_options)
from ..nn.linear4bit import Linear4bit, in_dtype
from ..nn.lora import DoraNormCache

__all__ = [
    "Dora4bitVariant",
    "LoHaLinear4bitPeft",
    "LoKrLinear4bitPeft",
    "LoraLinear4bitPeft",
    "prepare_model_for_kbit_training",
    "register",
]

# init_lora_weights values this layer supports. The others (PiSSA, OLoRA, LoftQ, EVA, ...)
# rewrite the base weight or read it through PEFT's bitsandbytes helpers, which do not know
# nf4lora's QuantState.
_SUPPORTED_INITS = (True, False, "gaussian")


def _check_4bit_base(layer: nn.Module) -> None:
    if not isinstance(layer.get_base_layer(), Linear4bit):
        raise TypeError(f"base_layer must be a nf4lora Linear4bit, got "
                        f"{type(layer.get_base_layer()).__name__}")


class _Requantize4bit:
    """Merging into the base layer's 4-bit weight: dequantize, add, quantize again
    (nf4lora.merge.merge_into), with a report per adapter merged.

    Lossy, as in PEFT's bitsandbytes layer: the merged weight is rounded to the 4-bit grid
    again, so outputs differ slightly from base + adapter (and unmerge does not give the
    original bytes back). Each merge measures that rounding (nf4lora.merge.MergeReport:
    weight and probe-output errors against W + delta), logs it through the `nf4lora`
    logger and keeps it as `layer.merge_report`. A subclass names its method and says
    which adapters it holds; a LoRA adapter with `lora_bias` also moves the base bias."""

    _method = "LoRA"

    def _holds(self, adapter: str) -> bool:
        return adapter in self.lora_A

    def _bias_delta(self, adapter: str) -> Optional[Tensor]:
        """What merging `adapter` adds to the base layer's bias (None: nothing)."""
        return None

    def _merged_delta(self, adapter: str, delta: Tensor, merging: bool):
        """What merge_into adds for `adapter` (its delta weight; a subclass may make it a
        function of W, as DoRA's row rescaling is)."""
        return delta

    @property
    def merge_report(self) -> Optional[MergeReport]:
        """The report of the latest merge or unmerge into this layer's 4-bit weight (also
        a refused one), None before any."""
        return getattr(self.get_base_layer(), "merge_report", None)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None, *,
              requantize: Optional[str] = None, max_error: Optional[float] = None,
              probe_rows: Optional[int] = None) -> None:
        """W' = quantize(dequantize(W) + delta) per adapter.

        safe_merge: PEFT's check for non-finite values before writing anything.
        requantize ("plain" | "search"), max_error (refuse an adapter whose merged weight is
        off W + delta by more, with MergeRefusedError, writing nothing for it), probe_rows:
        as nf4lora's LoraLinear4bit.merge; left None, they come from an enclosing
        nf4lora.merge.merge_options, the way to set them for PEFT's merge_and_unload(),
        which passes only safe_merge and adapter_names. A refusal inside merge_and_unload
        stops it there, as PEFT's own safe_merge error does: layers before it are merged
        and unloaded, this one and the rest keep their adapters.
        """
        options = resolve_options(requantize, max_error, probe_rows)
        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if not self._holds(adapter):
                continue
            warnings.warn(f"Merging a {self._method} adapter into a 4-bit weight re-quantizes it: "
                          "outputs may differ slightly (rounding errors).", stacklevel=2)
            delta = self.get_delta_weight(adapter)
            bias_delta = self._bias_delta(adapter)
            if bias_delta is not None and base.bias is None:
                raise RuntimeError(f"Impossible to merge {self._method} with `lora_bias=True` "
                                   "because the base layer has no bias.")
            if safe_merge and not (torch.isfinite(delta).all() and (
                    bias_delta is None or torch.isfinite(bias_delta).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} "
                                 "seems to be broken")
            merge_into(base, self._merged_delta(adapter, delta, merging=True), options,
                       adapter=adapter)
            if bias_delta is not None:
                base.bias.data += bias_delta.to(base.bias.dtype)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self, *, requantize: Optional[str] = None, probe_rows: Optional[int] = None) -> None:
        """Take merged adapters back out (lossy too: one more re-quantization each, reported
        as merges are; never refused)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        options = dataclasses.replace(resolve_options(requantize, None, probe_rows), max_error=None)
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters[-1]
            if self._holds(adapter):
                warnings.warn(f"Unmerging a {self._method} adapter from a 4-bit weight "
                              "re-quantizes it: outputs may differ slightly (rounding errors).",
                              stacklevel=2)
                merge_into(base, self._merged_delta(adapter, self.get_delta_weight(adapter),
                                                    merging=False),
                           options, sign=-1.0, adapter=adapter)
                bias_delta = self._bias_delta(adapter)
                if bias_delta is not None:
                    base.bias.data -= bias_delta.to(base.bias.dtype)
            self.merged_adapters.pop()


class LoraLinear4bitPeft(_Requantize4bit, nn.Module, LoraLayer):
    """PEFT LoRA layer around a nf4lora Linear4bit (PEFT's conventions: several adapters,
    `set_adapter`, `disable_adapters`, merge/unmerge, `adapter_names` mixed batches)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
        # kwargs: what PEFT passes every layer (target_name, loaded_in_4bit, ...); unused here.
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        _check_4bit_base(self)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                          target_name=kwargs.get("target_name", ""))

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig,
                     **kwargs) -> None:
        if config.init_lora_weights not in _SUPPORTED_INITS:
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is not supported on "
                             f"nf4lora Linear4bit layers; use one of {_SUPPORTED_INITS}")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): Dora4bitVariant}

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        # PEFT's LoraLayer would reject the other variants with "Invalid or unsupported
        # variant combination"; say which layer and why instead.
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as error:
            raise ValueError(f"nf4lora's PEFT layer supports plain LoRA, rsLoRA and DoRA only, "
                             f"not this LoRA variant on nf4lora 4-bit layers: {error}") from None

    # -- forward -----------------------------------------------------------------------------

    def _fusable_adapter(self) -> Optional[str]:
        """The one active adapter when the layer can run as one lora_matmul_4bit call, else None.

        Fused only when the adapter sees the same input as the base (no dropout, or eval
        mode) and has no bias (lora_bias=True adds a term the fused op does not have). A
        DoRA adapter runs as one dora_matmul_4bit call.
        """
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or not self._fusable_term(active[0]):
            return None
        return active[0]

    def _fusable_term(self, name: str) -> bool:
        """Adapter `name` sees the base layer's input (no dropout, or eval mode) and has no
        bias (lora_bias=True adds a term the fused ops do not have)."""
        if self.lora_bias.get(name, False):
            return False
        # PEFT uses nn.Identity for lora_dropout=0
        return not (self.training and isinstance(self.lora_dropout[name], nn.Dropout))

    def _fused_forward(self, x: Tensor, adapter: str) -> Tensor:
        """base(x) + scaling * B A x in one call, as nf4lora's LoraLinear4bit does: in the
        base layer's compute dtype, the float32 adapter weights cast to it (gradients still
        reach them through the cast)."""
        base = self.get_base_layer()
        dtype = base.prepare(x)   # restore/quantize the weight, fix the compute dtype, cast the bias
        # (read from `_modules` / `_parameters`, as LoraLinear4bit.forward does, and why)
        modules = self._modules
        lora_A = modules["lora_A"][adapter]._parameters["weight"]
        lora_B = modules["lora_B"][adapter]._parameters["weight"]
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        args = (in_dtype(x, dtype), weight, weight.quant_state, in_dtype(lora_A, dtype),
                in_dtype(lora_B, dtype), self.scaling[adapter])
        if adapter in self.lora_variant:        # DoRA, the only variant resolve_lora_variant allows
            norms = self.__dict__.setdefault("_dora_norms", {})
            y = norms.setdefault(adapter, DoraNormCache())(
                *args, self.lora_magnitude_vector[adapter].weight, bias, base.row_sq_norms(),
                (lora_A, lora_B))
        else:
            y = lora_matmul_4bit(*args, bias)
        return in_dtype(y, x.dtype)

    def _mixed_batch_plain(self, adapter_names) -> bool:
        """Whether a mixed batch can run as one multi_lora_matmul_4bit call: each adapter it
        names that this layer holds is fusable (_fusable_term: PEFT's loop drops out each
        sub-batch's input on its own) and plain LoRA, without a variant (DoRA rescales each
        adapter's rows by its own norms; PEFT refuses DoRA with adapter_names anyway).
        "__base__" and adapters of other layers add nothing."""
        return all(name not in self.lora_A
                   or (name not in self.lora_variant and self._fusable_term(name))
                   for name in set(adapter_names))

    def _mixed_batch_forward(self, x: Tensor, *args: Any, adapter_names: list[str],
                             **kwargs: Any) -> Tensor:
        """PEFT's `adapter_names=` forward (each sample of the batch its own adapter,
        "__base__" none) as one nf4lora.multi_lora_matmul_4bit call: the 4-bit weight read
        once for the whole batch, each row's adapter added to it. PEFT's own loop (the base
        layer, then each adapter on its sub-batch) stays for what the op cannot express:
        see _mixed_batch_plain, and extra forward arguments.

        Like _fused_forward, in the base layer's compute dtype, the adapter weights cast to
        it (gradients reach them through the casts); the batch's adapters are zero-padded
        to its largest rank (pad_adapters: exact), and kept between calls when no graph is
        recorded (_stacked_adapters). The index is built on the CPU, where the op checks
        its range without a GPU sync."""
        if args or any(value is not None for value in kwargs.values()) \
                or not self._mixed_batch_plain(adapter_names):
            return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        used = sorted({name for name in adapter_names if name in self.lora_A})
        if not used:
            return self.base_layer(x)
        base = self.get_base_layer()
        dtype = base.prepare(x)         # restore/quantize the weight, fix the compute dtype
        position = {name: i for i, name in enumerate(used)}
        # one adapter per sample (x's first dim), the same for all of its tokens
        index = torch.tensor([position.get(name, -1) for name in adapter_names])
        index = index.reshape(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1])
        lora_A, lora_B = self._stacked_adapters(used, dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        y = multi_lora_matmul_4bit(x.to(dtype), base.weight, base.weight.quant_state, lora_A,
                                   lora_B, [self.scaling[name] for name in used], index, bias)
        return y.to(x.dtype)

    def _stacked_adapters(self, used: list[str], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(lora_A [n, r, in], lora_B [n, out, r]): the adapters `used`, in `dtype`,
        zero-padded to their largest rank. Stacking casts and copies every weight of the
        batch's adapters each call (4096x4096, 8 adapters of rank 16: 4 MB of float32 read,
        2 MB written, per layer), so outside autograd (inference, generate) the stack of the
        last call is kept on the layer and reused while the same adapters' weights are
        unchanged: the key holds each weight's storage address and version counter, which
        every in-place write (optimizer step, load_state_dict, merge) bumps. It holds
        n r (in + out) values of `dtype` per layer until the next mixed batch replaces it.
        When a graph is recorded the stack is built anew, so gradients reach the weights."""
        weights = [(self.lora_A[name].weight, self.lora_B[name].weight) for name in used]
        if torch.is_grad_enabled() and any(w.requires_grad for pair in weights for w in pair):
            return pad_adapters([A.to(dtype) for A, _ in weights], [B.to(dtype) for _, B in weights])
        key = (tuple(used), dtype, contents_key(*(w for pair in weights for w in pair)))
        cached = getattr(self, "_nf4lora_adapter_stack", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, pad_adapters([A.to(dtype) for A, _ in weights],
                                            [B.to(dtype) for _, B in weights]))
            self._nf4lora_adapter_stack = cached
        return cached[1]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)

        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)

        adapter = self._fusable_adapter()
        if adapter is not None and not args and not kwargs:
            return self._fused_forward(x, adapter)

        # General case, PEFT's bitsandbytes layer: base, then each adapter in its own
        # (float32) dtype, cast back and added. (No defensive .clone() of the base output as
        # there: nothing below writes into it in place.)
        result = self.base_layer(x, *args, **kwargs)
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            scaling = self.scaling[active_adapter]
            requires_conversion = not torch.is_autocast_enabled()
            if requires_conversion:
                expected_dtype = result.dtype
                x = self._cast_input_dtype(x, lora_A.weight.dtype)
            if active_adapter in self.lora_variant:      # DoRA: returns result + its term
                output = self.lora_variant[active_adapter].forward(
                    self, active_adapter=active_adapter, x=x, result=result)
                result = output.to(expected_dtype) if requires_conversion else output
                continue
            output = lora_B(lora_A(dropout(x))) * scaling
            if requires_conversion:
                output = output.to(expected_dtype)
            result = result + output
        return result

    # -- merging -----------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> Tensor:
        """scaling * B @ A, [out, in], in float32 (it is added to a float32 dequantization)."""
        A = self.lora_A[adapter].weight.float()
        B = self.lora_B[adapter].weight.float()
        return (B @ A) * self.scaling[adapter]

    def _merged_delta(self, adapter: str, delta: Tensor, merging: bool):
        """DoRA: W' = m / ||W + delta||_row * (W + delta), PEFT's merge, with the factor
        kept for the unmerge (W = W' / factor - delta), as PEFT keeps the norm."""
        if adapter not in self.lora_variant:
            return delta
        factors = self.__dict__.setdefault("_dora_factors", {})
        if merging:
            factors[adapter] = dora_factor(self.get_base_layer(),
                                           self.lora_magnitude_vector[adapter].weight, delta)
            return dora_merge_delta(factors[adapter], delta)
        return dora_unmerge_delta(factors.pop(adapter), delta)

    def _bias_delta(self, adapter: str) -> Optional[Tensor]:
        if not self.lora_bias[adapter]:
            return None
        return self.lora_B[adapter].bias * self.scaling[adapter]

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Dora4bitVariant(LoraVariant):
    """DoRA (PEFT's DoraLinearVariant) on a nf4lora Linear4bit. PEFT's own variant reads the
    base weight through its bitsandbytes helpers (a dense dequantized copy per forward);
    this one keeps PEFT's parameter (a DoraLinearLayer under `lora_magnitude_vector`, so
    DoRA adapters load on bitsandbytes and dense models and back) and its math, with the
    norms from the packed weight: ||W + s B A||_row = dora_row_norms_4bit (one 4-bit matmul
    with lora_A as the activations, ||W_o||^2 cached by the base layer). One active adapter
    without dropout never gets here: LoraLinear4bitPeft runs it as one dora_matmul_4bit
    call. Merging: LoraLinear4bitPeft._merged_delta."""

    @staticmethod
    def init(module: LoraLinear4bitPeft, adapter_name: str, **kwargs) -> None:
        if not module.lora_magnitude_vector:   # PEFT: the first DoRA adapter makes m trainable
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        dora = DoraLinearLayer(fan_in_fan_out=False)
        dora.weight = nn.Parameter(Dora4bitVariant.norms(module, adapter_name), requires_grad=True)
        module.lora_magnitude_vector[adapter_name] = dora

    @staticmethod
    def norms(module: LoraLinear4bitPeft, adapter: str) -> Tensor:
        """||W + s B A||_row, float32 [out], detached, in float32 adapter arithmetic."""
        base = module.get_base_layer()
        sq_norms = base.row_sq_norms()               # quantizes the base if it is not yet
        return dora_row_norms_4bit(base.weight, base.weight.quant_state,
                                   module.lora_A[adapter].weight.detach().float(),
                                   module.lora_B[adapter].weight.detach().float(),
                                   module.scaling[adapter], sq_norms)

    @staticmethod
    def forward(module: LoraLinear4bitPeft, active_adapter: str, x: Tensor, result: Tensor,
                **kwargs) -> Tensor:
        """PEFT's DoraLinearLayer.forward: result + (m/norm - 1) * base + m/norm * s B A x, with
        base = result - bias (no dropout or eval) or the base product of dropout(x)."""
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        base = module.get_base_layer()
        scale = (module.lora_magnitude_vector[active_adapter].weight
                 / Dora4bitVariant.norms(module, active_adapter)).view(1, -1)
        if isinstance(dropout, nn.Identity) or not module.training:
            base_result = result if base.bias is None else result - base.bias
        else:
            x = dropout(x)
            dtype = base.prepare(x)
            base_result = matmul_4bit(x.to(dtype), base.weight.t(), base.weight.quant_state)
        return result + (scale - 1) * base_result + scale * lora_B(lora_A(x)) * scaling


# -- LoHa and LoKr ---------------------------------------------------------------------------------
#
# PEFT's LoHa/LoKr Linear layers are right for a 4-bit base layer except where they read
# `base_layer.weight.shape` as the layer's [out, in] (the packed bytes' [out*in/2, 1] here) and
# where they merge by adding to `base_layer.weight.data` (the packed codes here). The
# subclasses below replace exactly those places; forward, adapter bookkeeping, parameter
# names and initialization stay PEFT's, so their adapters load on dense models and back.

def _drop_rows(weight: Tensor, rate: float, rescale: bool) -> Tensor:
    """PEFT's LyCORIS rank dropout of a delta weight [out, in]: zero whole output rows with
    probability `rate`, optionally rescaled by the kept fraction."""
    keep = (torch.rand(weight.shape[0]) > rate).to(weight.dtype)
    if rescale:
        keep = keep / keep.mean()
    return weight * keep.to(weight.device).unsqueeze(1)


class _LycorisLinear4bit(_Requantize4bit):
    """Shared by LoHaLinear4bitPeft and LoKrLinear4bitPeft: the 4-bit base check and merging
    (lossy, as LoraLinear4bitPeft's: the merged weight is rounded to the 4-bit grid again)."""

    def _check_linear_adapter(self, adapter_name: str, conv_only: tuple[str, ...]) -> None:
        for name in conv_only:
            if adapter_name in getattr(self, name):
                raise RuntimeError(f"adapter {adapter_name!r} has {name}, which PEFT creates for "
                                   "convolutions only; a nf4lora Linear4bit has none")

    def _holds(self, adapter: str) -> bool:
        return adapter in self._available_adapters


class LoHaLinear4bitPeft(_LycorisLinear4bit, _PeftLoHaLinear):
    """PEFT's LoHa Linear layer around a nf4lora Linear4bit."""

    _method = "LoHa"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0,
                 alpha: float = 0.0, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config, r=r, alpha=alpha, **kwargs)
        _check_4bit_base(self)

    def create_adapter_parameters(self, adapter_name: str, r: int, shape: tuple[int, ...]) -> None:
        # PEFT's update_layer passes the base weight's shape: the packed [out*in/2, 1] here.
        super().create_adapter_parameters(adapter_name, r, (self.out_features, self.in_features))

    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> Tensor:
        """scaling * (w1_a w1_b) * (w2_a w2_b), [out, in] (PEFT's, without its reshape to the
        base weight's shape, which is the packed one here)."""
        self._check_linear_adapter(adapter_name, ("hada_t1", "hada_t2"))
        weight = _hadamard_weight(self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name],
                                  self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name],
                                  scale=torch.tensor(self.scaling[adapter_name]))
        if apply_rank_dropout:
            weight = _drop_rows(weight, self.rank_dropout[adapter_name], rescale=True)
        return weight


class LoKrLinear4bitPeft(_LycorisLinear4bit, _PeftLoKrLinear):
    """PEFT's LoKr Linear layer around a nf4lora Linear4bit (its factors are already sized
    from in_features/out_features)."""

    _method = "LoKr"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0,
                 alpha: float = 0.0, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config, r=r, alpha=alpha, **kwargs)
        _check_4bit_base(self)

    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> Tensor:
        """scaling * kron(w1, w2), [out, in] (PEFT's, without its reshape to the base weight's
        shape, which is the packed one here)."""
        self._check_linear_adapter(adapter_name, ("lokr_t2",))
        if adapter_name in self.lokr_w1:
            w1 = self.lokr_w1[adapter_name]
        else:
            w1 = self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]
        if adapter_name in self.lokr_w2:
            w2 = self.lokr_w2[adapter_name]
        else:
            w2 = self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]
        weight = _kronecker_weight(w1, w2, self.scaling[adapter_name])
        if apply_rank_dropout:
            weight = _drop_rows(weight, self.rank_dropout[adapter_name],
                                rescale=bool(self.rank_dropout_scale[adapter_name]))
        return weight


# -- registration ------------------------------------------------------------------------------

_MAPPING = {Linear4bit: LoraLinear4bitPeft}
_LYCORIS_MAPPING = ((LoHaModel, LoHaLinear4bitPeft), (LoKrModel, LoKrLinear4bitPeft))


def _register_lycoris() -> None:
    # LoHa and LoKr have no per-config custom-module hook as LoRA has; their tuners pick the
    # layer class from the class attribute `layers_mapping` (first isinstance match wins, and
    # Linear4bit is an nn.Linear), so Linear4bit goes first in a new dict. Only Linear4bit
    # targets are affected.
    for tuner, layer_cls in _LYCORIS_MAPPING:
        if next(iter(tuner.layers_mapping.items()), None) != (Linear4bit, layer_cls):
            rest = {k: v for k, v in tuner.layers_mapping.items() if k is not Linear4bit}
            tuner.layers_mapping = {Linear4bit: layer_cls, **rest}


def register(config: Optional[LoraConfig] = None) -> Optional[LoraConfig]:
    """Make PEFT use LoraLinear4bitPeft (and LoHaLinear4bitPeft, LoKrLinear4bitPeft for
    LoHa/LoKr) for nf4lora Linear4bit layers. Idempotent.

    Every LoraConfig created from now on carries the mapping (LoraConfig.__post_init__ is
    wrapped once), including the ones PeftModel.from_pretrained builds from
    adapter_config.json. A config created earlier can be passed in: it is registered in
    place and returned. The mapping is not serialized (PEFT keeps it out of to_dict).
    """
    post_init = LoraConfig.__post_init__
    if not getattr(post_init, "_nf4lora", False):
        def __post_init__(self, *args, **kwargs):
            post_init(self, *args, **kwargs)
            self._register_custom_module(_MAPPING)
        __post_init__._nf4lora = True
        __post_init__.__wrapped__ = post_init
        LoraConfig.__post_init__ = __post_init__
    _register_lycoris()
    if config is not None:
        config._register_custom_module(_MAPPING)
    return config


def _has_4bit_layers(model: nn.Module) -> bool:
    return any(isinstance(m, Linear4bit) for m in model.modules())


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    **kwargs) -> nn.Module:
    """peft.prepare_model_for_kbit_training for a model with nf4lora Linear4bit layers.

    PEFT's function already leaves nf4lora's 4-bit weights alone (it skips parameters whose
    class is named Params4bit when upcasting to float32), but it enables gradient
    checkpointing and input gradients only for models flagged `is_loaded_in_4bit`, which
    transformers' bitsandbytes loader sets and replace_linear does not. This sets the flag
    (on a model that has Linear4bit layers) and calls PEFT's function.
    """
    from peft import prepare_model_for_kbit_training as peft_prepare

    if _has_4bit_layers(model):
        model.is_loaded_in_4bit = True
    return peft_prepare(model, use_gradient_checkpointing=use_gradient_checkpointing,
                        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)


register()
