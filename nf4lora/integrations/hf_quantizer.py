"""nf4lora as a transformers quantization method: switching from bitsandbytes is one line.

    from transformers import AutoModelForCausalLM
    from nf4lora import NF4LoraConfig

    model = AutoModelForCausalLM.from_pretrained(
        "path/to/bf16-checkpoint",
        quantization_config=NF4LoraConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16))
    model.generate(...); peft.get_peft_model(model, ...); Trainer(model, ...)
    model.save_pretrained("out/")      # a bitsandbytes-4bit folder: loads with BitsAndBytesConfig too

    model = nf4lora.from_pretrained("out/")   # a bitsandbytes-4bit folder, with nf4lora's kernels

`NF4LoraConfig` takes BitsAndBytesConfig's 4-bit fields (same names, same defaults) and
`NF4LoraQuantizer` is the transformers `HfQuantizer` behind it (registered with
`register_quantization_config` / `register_quantizer` under "nf4lora" the first time either
is imported from nf4lora). The quantizer does what transformers' bitsandbytes 4-bit method
does, with nf4lora's Linear4bit: the same linears are swapped (transformers' own skip rule:
lm_head, tied and `_keep_in_fp32_modules` layers, `llm_int8_skip_modules`), each weight is
quantized as transformers hands it over, one tensor at a time, so the bytes equal what
bitsandbytes writes for the same tensor.

Serialization: the checkpoint format *is* bitsandbytes', so `NF4LoraConfig.to_dict()` is the
BitsAndBytesConfig dict a bitsandbytes 4-bit model writes (quant_method "bitsandbytes",
load_in_4bit). A folder saved from an nf4lora model is therefore an ordinary bitsandbytes
folder. transformers refuses to load such a folder with a config of another class
(`merge_quantization_configs`), which is why `from_pretrained` below exists: it rewrites the
folder's quantization_config into nf4lora's in memory and loads through this quantizer,
without re-quantizing.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import nn

from . import _quiet_imports

with _quiet_imports():   # transformers' quantizers import torchao, which logs at import
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.quantizers_utils import should_convert_module
    from transformers.utils.quantization_config import BitsAndBytesConfig, QuantizationConfigMixin

from .. import backends, functional
from ..nn.linear4bit import Linear4bit, Params4bit
from ..quant_state import dtype_name
from . import checkpoints
from .transformers import _conv1d_type, replace_linear

__all__ = ["NF4LoraConfig", "NF4LoraQuantizer", "from_pretrained"]

QUANT_METHOD = "nf4lora"


def _dtype(value, name: str, default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"{name}={value!r} is not a torch dtype")
    return resolved


@register_quantization_config(QUANT_METHOD)
class NF4LoraConfig(QuantizationConfigMixin):
    """transformers quantization config for nf4lora: BitsAndBytesConfig's 4-bit fields with
    its names and defaults, plus nf4lora's own.

    bnb_4bit_quant_type: "fp4" (bitsandbytes' default) or "nf4".
    bnb_4bit_use_double_quant: quantize the block constants too (8-bit, blocks of 256).
    bnb_4bit_compute_dtype: dtype of the matmul (default float32, as bitsandbytes).
    bnb_4bit_quant_storage: dtype the packed codes are stored as (default uint8).
    llm_int8_skip_modules / modules_to_not_convert: modules left in full precision (names,
        dotted suffixes or regexes, transformers' rule). None keeps transformers' defaults
        for bitsandbytes: lm_head (the output embedding), tied weights, the last module and
        the model's `_keep_in_fp32_modules`. A list replaces the defaults, as in bitsandbytes.
    blocksize: elements per absmax block (64, bitsandbytes' 4-bit default).
    backend: nf4lora backend to force once the model is loaded ("cpu", "cuda", "triton",
        "reference"; process-wide, as `nf4lora.set_backend`); None chooses by device.

    8-bit (`load_in_8bit=True`) is bitsandbytes' LLM.int8(), which nf4lora does not implement:
    ValueError. Serialized (`to_dict`) as the BitsAndBytesConfig a bitsandbytes 4-bit model
    writes, since the checkpoint format is bitsandbytes'.
    """

    def __init__(self, bnb_4bit_quant_type: str = "fp4", bnb_4bit_use_double_quant: bool = False,
                 bnb_4bit_compute_dtype: Union[torch.dtype, str, None] = None,
                 bnb_4bit_quant_storage: Union[torch.dtype, str, None] = None,
                 llm_int8_skip_modules: Optional[list[str]] = None,
                 modules_to_not_convert: Optional[list[str]] = None,
                 blocksize: int = functional.DEFAULT_BLOCKSIZE, backend: Optional[str] = None,
                 load_in_4bit: bool = True, load_in_8bit: bool = False, **kwargs):
        self.quant_method = QUANT_METHOD
        if load_in_8bit:
            raise ValueError("NF4LoraConfig: load_in_8bit=True asks for bitsandbytes' 8-bit LLM.int8(), "
                             "which nf4lora does not implement; use BitsAndBytesConfig(load_in_8bit=True), "
                             "or 4-bit (the default)")
        if not load_in_4bit:
            raise ValueError("NF4LoraConfig: load_in_4bit=False: nf4lora only quantizes to 4 bits")
        if bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"NF4LoraConfig: bnb_4bit_quant_type must be 'nf4' or 'fp4', "
                             f"got {bnb_4bit_quant_type!r}")
        if not isinstance(bnb_4bit_use_double_quant, bool):
            raise TypeError("NF4LoraConfig: bnb_4bit_use_double_quant must be a bool")
        if llm_int8_skip_modules is not None and modules_to_not_convert is not None \
                and list(llm_int8_skip_modules) != list(modules_to_not_convert):
            raise ValueError("NF4LoraConfig: give llm_int8_skip_modules or modules_to_not_convert, not both")
        skip = modules_to_not_convert if modules_to_not_convert is not None else llm_int8_skip_modules
        if skip is not None and (isinstance(skip, str) or not all(isinstance(s, str) for s in skip)):
            raise TypeError("NF4LoraConfig: llm_int8_skip_modules must be a list of strings")
        if not isinstance(blocksize, int) or blocksize <= 0:
            raise ValueError(f"NF4LoraConfig: blocksize must be a positive int, got {blocksize!r}")
        if backend is not None:
            reason = backends.availability(backend)
            if reason is not None:
                raise ValueError(f"NF4LoraConfig: backend {backend!r} is not available: {reason}")
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_compute_dtype = _dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", torch.float32)
        self.bnb_4bit_quant_storage = _dtype(bnb_4bit_quant_storage, "bnb_4bit_quant_storage", torch.uint8)
        self.llm_int8_skip_modules = None if skip is None else list(skip)
        self.blocksize = blocksize
        self.backend = backend
        # Set when a loaded model is saved: the full names of the linears it keeps dense, so
        # the folder's BitsAndBytesConfig describes exactly this model (see to_dict).
        self._dense_linears: Optional[list[str]] = None
        # kwargs: the rest of a bitsandbytes dict (llm_int8_threshold, quant_method, ...),
        # which means nothing for 4-bit.

    @property
    def modules_to_not_convert(self) -> Optional[list[str]]:
        return self.llm_int8_skip_modules

    @property
    def load_in_4bit(self) -> bool:
        return True

    @property
    def load_in_8bit(self) -> bool:
        return False

    def to_bitsandbytes(self) -> BitsAndBytesConfig:
        """The BitsAndBytesConfig that loads what this config produces (same fields)."""
        skip = self._dense_linears if self._dense_linears is not None else self.llm_int8_skip_modules
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype,
            bnb_4bit_quant_storage=dtype_name(self.bnb_4bit_quant_storage),
            llm_int8_skip_modules=None if skip is None else list(skip))

    def to_dict(self) -> dict[str, Any]:
        # config.json: bitsandbytes' dict, so plain transformers + bitsandbytes load the folder.
        return self.to_bitsandbytes().to_dict()

    def to_nf4lora_dict(self) -> dict[str, Any]:
        """This config under quant_method "nf4lora" (what transformers dispatches to this quantizer)."""
        return {"quant_method": QUANT_METHOD, "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
                "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
                "bnb_4bit_compute_dtype": dtype_name(self.bnb_4bit_compute_dtype),
                "bnb_4bit_quant_storage": dtype_name(self.bnb_4bit_quant_storage),
                "llm_int8_skip_modules": self.llm_int8_skip_modules, "blocksize": self.blocksize,
                "backend": self.backend}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_nf4lora_dict().items() if k != "quant_method")
        return f"NF4LoraConfig({fields})"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        # Either form: nf4lora's (quant_method "nf4lora") or a bitsandbytes 4-bit dict.
        config_dict = {k.removeprefix("_"): v for k, v in config_dict.items()}
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


# -- weight conversion ops: called by transformers' loader, one layer at a time --------------

class _Quantize(ConversionOps):
    """A full-precision weight -> the layer's Params4bit (quantized here, on its device)."""

    def __init__(self, hf_quantizer: "NF4LoraQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        result = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            layer_name = key.rpartition(".")[0]
            layer = model.get_submodule(layer_name)
            if layer_name in self.hf_quantizer.conv1d_layers:   # Conv1D stores [in, out]
                value = value.t()
            settings = layer.weight
            weight = Params4bit(value.contiguous(), requires_grad=False, blocksize=settings.blocksize,
                                compress_statistics=settings.compress_statistics,
                                quant_type=settings.quant_type, quant_storage=settings.quant_storage,
                                module=layer)
            try:
                weight._quantize(value.device)
            except ValueError as error:     # NaN/Inf: name the tensor, not just the block
                raise ValueError(f"quantizing {key!r}: {error}") from None
            result[key] = weight
        return result


class _AsSaved(ConversionOps):
    """Saving: the tensors are written under the keys they were read from (Linear4bit's state
    dict already has bitsandbytes' keys), so the reverse of loading changes nothing."""

    def convert(self, input_dict, **kwargs):
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return _AsSaved()


class _Deserialize(ConversionOps):
    """A pre-quantized layer's `weight` + `weight.*` quant-state tensors -> its Params4bit,
    packed bytes used as saved. The entries were checked before loading began (see
    NF4LoraQuantizer._check_prequantized), so an error here means the files changed."""

    def __init__(self, hf_quantizer: "NF4LoraQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        if len(input_dict) == 1:     # a plain `*.weight` (a norm, an embedding): not ours
            return input_dict
        entries = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        weight = entries.pop("weight")
        layer = model.get_submodule(full_layer_name.rpartition(".")[0])
        new = Params4bit.from_prequantized(weight, entries, device=weight.device, module=layer)
        layer.quant_storage = new.quant_storage
        return {"weight": new}

    @property
    def reverse_op(self) -> ConversionOps:
        # save_pretrained reverses the conversions a model was loaded with (transformers'
        # bitsandbytes op has none, so its pre-quantized models cannot be saved again)
        return _AsSaved()


@register_quantizer(QUANT_METHOD)
class NF4LoraQuantizer(HfQuantizer):
    """transformers HfQuantizer for NF4LoraConfig: nf4lora Linear4bit layers, bitsandbytes'
    format. Quantizes a full-precision checkpoint while it loads (pre_quantized=False) or
    loads a bitsandbytes 4-bit one as saved (pre_quantized=True, see `from_pretrained`)."""

    requires_calibration = False
    quantization_config: NF4LoraConfig
    # The checkpoint names of one 4-bit weight (bitsandbytes' keys; nf4_format.md section 4).
    serialized_names = {"weight": ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                   "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
                                   "weight.quant_state.bitsandbytes__fp4"]}

    def __init__(self, quantization_config: NF4LoraConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.conv1d_layers: set[str] = set()
        self.modules_to_not_convert: list[str] = []

    # -- environment ---------------------------------------------------------------------

    def validate_environment(self, *args, **kwargs):
        try:
            import accelerate  # noqa: F401  (transformers' meta-device loading)
        except ImportError:
            raise ImportError("nf4lora's transformers quantizer needs accelerate: pip install accelerate") from None

    def update_device_map(self, device_map):
        # As transformers does for bitsandbytes: load straight onto the accelerator (or CPU),
        # so each weight is quantized where it will live.
        if device_map is None:
            device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        return device_map

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        layer_name, _, attr = param_name.rpartition(".")
        if attr != "weight":
            return False
        try:
            return isinstance(model.get_submodule(layer_name), Linear4bit)
        except AttributeError:
            return False

    def get_quantize_ops(self):
        return _Quantize(self)

    def get_load_operations(self):
        return {"deserialize": _Deserialize}

    # -- before loading: swap the linears (the model is on meta) ---------------------------

    def _process_model_before_weight_loading(self, model, device_map=None, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        settings = dict(quant_type=config.bnb_4bit_quant_type, compute_dtype=config.bnb_4bit_compute_dtype,
                        compress_statistics=config.bnb_4bit_use_double_quant,
                        quant_storage=config.bnb_4bit_quant_storage)
        conv1d = _conv1d_type()
        linears = checkpoints._linear_names(model)
        if self.pre_quantized:
            targets = self._check_prequantized(model, linears, checkpoint_files or [])
        else:
            # transformers' rule for bitsandbytes, so the same layers stay dense.
            self.modules_to_not_convert = self.get_modules_to_not_convert(
                model, config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None))
            targets = {name: config.bnb_4bit_quant_type for name, module in linears.items()
                       if (type(module) is nn.Linear or (conv1d is not None and isinstance(module, conv1d)))
                       and should_convert_module(name, self.modules_to_not_convert)}
        if not targets:
            raise ValueError(f"NF4LoraConfig: {type(model).__name__} has no nn.Linear/Conv1D layer to "
                             f"quantize (linears: {checkpoints._listing(linears) or 'none'}; kept in full "
                             f"precision: {sorted(self.modules_to_not_convert)})")
        self.conv1d_layers = {name for name in targets if conv1d is not None and isinstance(linears[name], conv1d)}
        for quant_type in sorted(set(targets.values())):
            replace_linear(model, skip_modules=[n for n in linears if targets.get(n) != quant_type],
                           progress=False, **{**settings, "quant_type": quant_type})
        for name in targets:
            layer = model.get_submodule(name)
            layer.weight.blocksize = config.blocksize
            layer.requires_grad_(False)     # as transformers does for bitsandbytes layers
        return model

    def _check_prequantized(self, model, linears: dict[str, nn.Module], files: list[str]) -> dict[str, str]:
        """The layers a bitsandbytes checkpoint quantized ({name: quant type}), each one's
        quant state checked against the model before any weight is read: a malformed or
        mismatched entry raises ValueError naming the layer and key."""
        safetensors = [f for f in files if str(f).endswith(".safetensors")]
        if not safetensors:
            raise ValueError(f"nf4lora loads pre-quantized checkpoints from safetensors files only, got {files}")
        key_files = checkpoints._checkpoint_keys(safetensors)
        quantized = checkpoints._quantized_layers(key_files)
        if not quantized:
            raise ValueError("the checkpoint's config says bitsandbytes 4-bit but no tensor has a "
                             f"'*{checkpoints._PACKED_MARK}nf4|fp4' quant state")
        not_linear = sorted(name for name in quantized if name not in linears)
        if not_linear:
            raise ValueError(f"the checkpoint quantizes modules that are not Linear/Conv1D layers of "
                             f"{type(model).__name__}: {checkpoints._listing(not_linear)}")
        checkpoints._check_quant_states(key_files, quantized, linears)
        return quantized

    # -- after loading ---------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model, **kwargs):
        # Nothing half-loaded: every swapped layer must hold its 4-bit weight by now.
        pending = sorted(name for name, m in model.named_modules()
                         if isinstance(m, Linear4bit) and not getattr(m.weight, "bnb_quantized", False))
        if pending:
            raise ValueError(f"nf4lora: the checkpoint did not provide the weights of the 4-bit layers "
                             f"{checkpoints._listing(pending)} (missing keys?)")
        if self.quantization_config.backend is not None:
            backends.set_backend(self.quantization_config.backend)
        model.is_loaded_in_4bit = True
        return model

    def get_state_dict_and_metadata(self, model):
        # save_pretrained: bitsandbytes' keys come from Linear4bit's state dict; the config
        # records exactly which linears are dense (full names), as save_pretrained_4bit does.
        layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
        self.quantization_config._dense_linears = sorted(
            name for name in checkpoints._linear_names(model) if name not in layers) or None
        return checkpoints._state_dict_to_save(model), {}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        for name, layer in list(model.named_modules()):
            if isinstance(layer, Linear4bit):
                dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  device="meta")
                dense.weight = nn.Parameter(layer.dequantized_weight(dtype), requires_grad=False)
                if layer.bias is not None:
                    dense.bias = layer.bias
                model.set_submodule(name, dense)
        model.is_loaded_in_4bit = False
        return model


def from_pretrained(path: Union[str, os.PathLike], quantization_config: Optional[NF4LoraConfig] = None,
                    model_cls=None, **kwargs) -> nn.Module:
    """`model_cls.from_pretrained(path, **kwargs)` (default AutoModelForCausalLM) through
    nf4lora's quantizer, whatever the checkpoint holds:

    - a bitsandbytes 4-bit folder (`quant_method: bitsandbytes`, `load_in_4bit`, e.g. one
      saved by transformers + bitsandbytes or by an nf4lora model): loaded as saved, no
      re-quantizing; `quantization_config` may only set `backend`;
    - a full-precision checkpoint: quantized while loading with `quantization_config`
      (default NF4LoraConfig()), as `from_pretrained(path, quantization_config=...)`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_cls = AutoModelForCausalLM if model_cls is None else model_cls
    config = kwargs.pop("config", None)
    if config is None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return model_cls.from_pretrained(path, config=config,
                                         quantization_config=quantization_config or NF4LoraConfig(), **kwargs)
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    if saved.get("quant_method") != "bitsandbytes" or not saved.get("load_in_4bit", saved.get("_load_in_4bit")):
        raise ValueError(f"{os.fspath(path)!r} is quantized with {saved.get('quant_method')!r} "
                         f"(load_in_4bit={saved.get('load_in_4bit')!r}); nf4lora loads bitsandbytes 4-bit "
                         "checkpoints and full-precision ones")
    loaded = NF4LoraConfig.from_dict(saved)
    if quantization_config is not None:
        loaded.backend = quantization_config.backend
    config.quantization_config = loaded.to_nf4lora_dict()   # dispatches to NF4LoraQuantizer
    return model_cls.from_pretrained(path, config=config, **kwargs)
