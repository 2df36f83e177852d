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
`nf4lora.lora_matmul_4bit` call (base and adapter fused); otherwise it is base(x) plus the
sum of the adapters, as PEFT computes it.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge

from ..autograd import lora_matmul_4bit
from ..nn.linear4bit import Linear4bit

__all__ = ["LoraLinear4bitPeft", "register", "prepare_model_for_kbit_training"]

# init_lora_weights values this layer supports. The others (PiSSA, OLoRA, LoftQ, EVA, ...)
# rewrite the base weight or read it through PEFT's bitsandbytes helpers, which do not know
# nf4lora's QuantState.
_SUPPORTED_INITS = (True, False, "gaussian")


class LoraLinear4bitPeft(nn.Module, LoraLayer):
    """PEFT LoRA layer around a nf4lora Linear4bit (PEFT's conventions: several adapters,
    `set_adapter`, `disable_adapters`, merge/unmerge, `adapter_names` mixed batches)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
        # kwargs: what PEFT passes every layer (target_name, loaded_in_4bit, ...); unused here.
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if not isinstance(self.get_base_layer(), Linear4bit):
            raise TypeError(f"base_layer must be a nf4lora Linear4bit, got {type(base_layer).__name__}")
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

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        # PEFT's LoraLayer would reject DoRA & co. with "Invalid or unsupported variant
        # combination"; say which layer and why instead.
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as error:
            raise ValueError(f"nf4lora's PEFT layer supports plain LoRA (and rsLoRA) only: {error}") from None

    # -- forward -----------------------------------------------------------------------------

    def _fusable_adapter(self) -> Optional[str]:
        """The one active adapter when the layer can run as one lora_matmul_4bit call, else None.

        Fused only when the adapter sees the same input as the base (no dropout, or eval
        mode) and has no bias (lora_bias=True adds a term the fused op does not have).
        """
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if self.lora_bias.get(name, False):
            return None
        if self.training and isinstance(self.lora_dropout[name], nn.Dropout):
            return None     # PEFT uses nn.Identity for lora_dropout=0
        return name

    def _fused_forward(self, x: Tensor, adapter: str) -> Tensor:
        """base(x) + scaling * B A x in one call, as nf4lora's LoraLinear4bit does: in the
        base layer's compute dtype, the float32 adapter weights cast to it (gradients still
        reach them through the cast)."""
        base = self.get_base_layer()
        dtype = base.prepare(x)         # restore/quantize the weight, fix the compute dtype
        bias = None if base.bias is None else base.bias.to(dtype)
        y = lora_matmul_4bit(x.to(dtype), base.weight, base.weight.quant_state,
                             self.lora_A[adapter].weight.to(dtype),
                             self.lora_B[adapter].weight.to(dtype),
                             self.scaling[adapter], bias)
        return y.to(x.dtype)

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

    def _requantize(self, dense: Tensor) -> None:
        """Quantize `dense` [out, in] into the base weight with its own settings (blocksize,
        quant type, double quantization, quant storage) and original dtype."""
        weight = self.get_base_layer().weight
        weight._quantize_from(dense.to(weight.quant_state.dtype))

    def _dequantized_base(self) -> Tensor:
        base = self.get_base_layer()
        base._fix_quant_state()
        if not base.weight.bnb_quantized:
            base.weight._quantize(base.weight.device)
        return base.dequantized_weight(torch.float32)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the 4-bit weight: W' = quantize(dequantize(W) + scaling * B A).

        Lossy, as in PEFT's bitsandbytes layer: the merged weight is rounded to the 4-bit
        grid again, so outputs differ slightly from base + adapter (and unmerge does not give
        the original bytes back). safe_merge: check for non-finite values before writing.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            warnings.warn("Merging a LoRA adapter into a 4-bit weight re-quantizes it: outputs "
                          "may differ slightly (rounding errors).", stacklevel=2)
            base = self.get_base_layer()
            merged = self._dequantized_base() + self.get_delta_weight(adapter)
            new_bias = None
            if self.lora_bias[adapter]:
                if base.bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the "
                                       "base layer has no bias.")
                new_bias = base.bias + self.lora_B[adapter].bias * self.scaling[adapter]
            if safe_merge and not (torch.isfinite(merged).all()
                                   and (new_bias is None or torch.isfinite(new_bias).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} "
                                 "seems to be broken")
            self._requantize(merged)
            if new_bias is not None:
                base.bias.data = new_bias.to(base.bias.dtype)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take merged adapters back out (lossy too: one more re-quantization each)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            warnings.warn("Unmerging a LoRA adapter from a 4-bit weight re-quantizes it: outputs "
                          "may differ slightly (rounding errors).", stacklevel=2)
            self._requantize(self._dequantized_base() - self.get_delta_weight(adapter))
            if self.lora_bias[adapter]:
                base = self.get_base_layer()
                base.bias.data -= (self.lora_B[adapter].bias * self.scaling[adapter]).to(base.bias.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# -- registration ------------------------------------------------------------------------------

_MAPPING = {Linear4bit: LoraLinear4bitPeft}


def register(config: Optional[LoraConfig] = None) -> Optional[LoraConfig]:
    """Make PEFT use LoraLinear4bitPeft for nf4lora Linear4bit layers. Idempotent.

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
