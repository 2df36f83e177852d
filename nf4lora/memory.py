"""`nf4lora memory`: how much memory inference and (Q)LoRA fine-tuning of a model take.

    nf4lora memory llama-65b --lora-rank 64 --gradient-checkpointing
    nf4lora memory path/to/model_folder --batch-size 4 --seq-len 1024 --quant none
    nf4lora memory tiny-llama --dtype float32 --measure

The model is a transformers config: a preset name (PRESETS; `nf4lora memory --help` lists
them), a local folder holding config.json, or a config JSON file. Nothing is downloaded and
no weight is allocated.

How each line is obtained (`MemoryPlan.assumptions` says the same in the output):

  parameters   counted by kind on the model's real module tree: transformers builds the model
               on the meta device, then `nf4lora.replace_linear` and `nf4lora.add_lora` run on
               it as on a real model, so the layers that get quantized (every Linear but lm_head
               and tied ones) and adapted are exactly those a real run picks, for any architecture.
  4-bit weights  the bytes of each layer's packed codes and block constants as nf4lora and
               bitsandbytes store them: 4 + 8/blocksize + 32/(256 blocksize) bits per weight with
               double quantization, 4 + 32/blocksize without, + each layer's code tables.
  training     weights + LoRA adapters + their gradients (float32, as PEFT and nf4lora keep them)
               + optimizer state + activations. Activations are traced, not modelled: the model's
               real forward and backward (transformers' code, nf4lora's LoRA layers and autograd
               Functions, gradient checkpointing if asked) run on fake tensors, and every tensor
               is counted from the op that creates it until it is freed. The line is the peak of
               that count, less the gradients (their own line). Attention is the fused SDPA kernel
               (flash attention: output and logsumexp kept, no seq x seq matrix), as torch picks on
               CPUs and current GPUs for these models, unless the config asks for eager attention.
  inference    weights x 1.2, the rule of thumb for framework buffers and one forward's
               activations (not traced), + the KV cache: 2 x layers x batch x seq x kv heads x
               head dim x bytes of the compute dtype.

`--measure` runs a few real QLoRA steps of the model on this machine, in a fresh process, and
prints the estimate beside the measured peak: the process's peak resident memory above what it
held before building the model on CPU, `torch.cuda.max_memory_allocated` on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import inspect
import json
import logging
import math
import multiprocessing
import os
import queue as queue_module
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union
from unittest import mock

import torch
from torch import Tensor, nn

from ._weight import BLOCKSIZES
from .functional import DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE, QuantState, quantize_4bit
from .integrations import _quiet_imports, add_lora, replace_linear
from .nn import Linear4bit, LoraLinear4bit, Params4bit

__all__ = ["estimate_memory", "measure_training", "load_config", "bits_per_weight",
           "optimizer_state_bytes", "MemoryPlan", "PlanOptions", "Row", "PRESETS"]

GIB = 1 << 30
MIB = 1 << 20

# Published shapes, so that a plan needs no download. LLaMA-1 (Touvron et al. 2023, table 2:
# the "33B" is the model often called 30B), Llama 2 70B and Llama 3 8B (grouped-query
# attention), and a small Llama that `--measure` trains in seconds on a CPU (the shipped
# example the tests run).
_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000,
              max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(_LLAMA, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, vocab_size=8192),
    "llama-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32),
    "llama-13b": dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40),
    "llama-33b": dict(_LLAMA, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52),
    "llama-65b": dict(_LLAMA, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64),
    "llama-2-70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
                        rms_norm_eps=1e-5),
    "llama-3-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
}

QUANT_TYPES = ("nf4", "fp4", "none")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
ALL_LINEAR = "all-linear"       # PEFT's name for: every linear layer but the output layer
# bitsandbytes' 8-bit optimizers: blockwise states with one float32 absmax per 256 values,
# and tensors under 4096 elements keep float32 states (its `min_8bit_size`).
ADAMW8BIT_BLOCKSIZE, ADAMW8BIT_MIN_SIZE = 256, 4096
OPTIMIZERS = {
    "adamw": "2 float32 states per trained parameter (torch AdamW)",
    "adamw8bit": (f"bitsandbytes AdamW8bit: 2 uint8 states + 2 float32 absmax per "
                  f"{ADAMW8BIT_BLOCKSIZE} values; float32 states for tensors under "
                  f"{ADAMW8BIT_MIN_SIZE} elements"),
    "sgd": "plain SGD without momentum: no state",
}
INFERENCE_RULE_OF_THUMB = 1.2     # weights x 1.2: framework buffers + one forward's activations
MEASURE_TOLERANCE = 0.15          # --measure's verdict: estimate within 15% of the measured peak


# --------------------------------------------------------------------------------------
# Inputs: the model config and the options
# --------------------------------------------------------------------------------------

def _transformers():
    try:
        with _quiet_imports():      # transformers' first imports log optional-package noise
            import transformers
            import transformers.modeling_utils  # noqa: F401
    except ImportError:
        raise ImportError("nf4lora memory builds the model with transformers: "
                          "`pip install transformers`") from None
    return transformers


@contextlib.contextmanager
def _quiet_model_code():
    """Around building and running the model: the import noise _quiet_imports drops, and
    transformers' own warnings about running a model (e.g. the default loss it picks), which
    say nothing about memory; restored afterwards."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with _quiet_imports():
            yield
    finally:
        logger.setLevel(level)


def _config_from_dict(values: dict, where: str):
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise ValueError(f"{where} is not a transformers config: it needs a \"model_type\" "
                         "entry (e.g. \"llama\")")
    values = dict(values)
    model_type = values.pop("model_type")
    transformers = _transformers()
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except ValueError as error:
        raise ValueError(f"{where}: transformers does not know model_type {model_type!r} "
                         f"({error})") from None


def load_config(source: Union[str, os.PathLike, dict, Any]):
    """A transformers config from a preset name, a folder holding config.json, a config JSON
    file, a dict of config values, or a config object (returned as is)."""
    if hasattr(source, "to_dict") and hasattr(source, "model_type"):
        return source
    if isinstance(source, dict):
        return _config_from_dict(source, "the config dict")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"config must be a preset name, a path or a transformers config, got "
                        f"{type(source).__name__}")
    if str(source) in PRESETS:
        return _config_from_dict(PRESETS[str(source)], f"preset {source!r}")
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json: pass a transformers "
                             "model folder or a config JSON file")
        path = path / "config.json"
    elif not path.exists():
        raise ValueError(f"{str(source)!r} is neither a preset ({', '.join(PRESETS)}) nor an "
                         "existing folder or JSON file")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON file ({error})") from None
    return _config_from_dict(values, str(path))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class PlanOptions:
    """What is being planned. `quant="none"` keeps the base weights in `dtype` (LoRA on a
    16-bit model); `dtype` is also the compute dtype (activations, KV cache) and that of the
    parameters that are not quantized. `lora_targets`: "all-linear" (every layer
    replace_linear quantizes, QLoRA's choice) or names matched as in PEFT ("q_proj")."""
    quant: str = "nf4"
    blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = True
    dtype: str = "bfloat16"
    lora_rank: int = 16
    lora_targets: Union[str, tuple[str, ...]] = ALL_LINEAR
    optimizer: str = "adamw"
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.quant not in QUANT_TYPES:
            raise ValueError(f"quant must be one of {QUANT_TYPES}, got {self.quant!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if isinstance(self.dtype, torch.dtype):       # accept torch.bfloat16 as well as "bf16"
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", str(DTYPES[self.dtype]).removeprefix("torch."))
        _positive_int("lora_rank", self.lora_rank)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")
        _positive_int("batch_size", self.batch_size)
        _positive_int("seq_len", self.seq_len)
        targets = self.lora_targets
        if not isinstance(targets, str):
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"lora_targets must be {ALL_LINEAR!r} or module names, got "
                                 f"{self.lora_targets!r}")
            object.__setattr__(self, "lora_targets", targets)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return self.torch_dtype.itemsize


# --------------------------------------------------------------------------------------
# The formulas
# --------------------------------------------------------------------------------------

def bits_per_weight(blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True) -> float:
    """Bits of a 4-bit weight with its share of the block constants: one absmax per block,
    stored as a uint8 code plus one float32 per 256 blocks with double quantization, as a
    float32 without (blocksize 64: 4.127 and 4.5 bits)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize


def optimizer_state_bytes(optimizer: str, tensor_numels: Sequence[int]) -> int:
    """Bytes of the optimizer state for trained tensors of these sizes (see OPTIMIZERS)."""
    if optimizer == "adamw":
        return sum(8 * n for n in tensor_numels)
    if optimizer == "adamw8bit":
        return sum(2 * n + 8 * math.ceil(n / ADAMW8BIT_BLOCKSIZE) if n >= ADAMW8BIT_MIN_SIZE
                   else 8 * n for n in tensor_numels)
    if optimizer == "sgd":
        return 0
    raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")


# --------------------------------------------------------------------------------------
# The model: built for real or on the meta device, the same way
# --------------------------------------------------------------------------------------

def _model_class(config, transformers):
    """The class config.json names (e.g. BertModel for an encoder), else a causal LM, else
    the bare model."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        with contextlib.suppress(ValueError, KeyError):
            return auto._model_mapping[type(config)]
    raise ValueError(f"transformers has no model class for {type(config).__name__}")


def _lora_target_names(model: nn.Module, targets) -> Union[list[str], tuple[str, ...]]:
    if targets != ALL_LINEAR:
        return targets
    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, Linear4bit)})
    if not names:
        raise ValueError("the model has no linear layer to quantize or adapt")
    return names


def _build_model(config, options: PlanOptions, device: Union[str, torch.device]) -> nn.Module:
    """The model as a QLoRA run builds it: transformers' class in `options.dtype`, every
    Linear but lm_head replaced by nf4lora's Linear4bit, LoRA on the targets, everything else
    frozen, in training mode. On a real device the weights are random and quantized; on
    "meta" they are not quantized (see _quantize_on_meta)."""
    transformers = _transformers()
    cls = _model_class(config, transformers)
    config = copy.deepcopy(config)          # from_config writes the dtype into it
    with _quiet_model_code(), torch.device(device):
        model = cls._from_config(config, dtype=options.torch_dtype)
    replace_linear(model, quant_type="fp4" if options.quant == "fp4" else "nf4",
                   compute_dtype=options.torch_dtype, compress_statistics=options.double_quant,
                   progress=False)
    add_lora(model, r=options.lora_rank, lora_alpha=2 * options.lora_rank,
             target_modules=_lora_target_names(model, options.lora_targets))
    if options.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{cls.__name__} does not support gradient checkpointing")
        # non-reentrant: works with frozen embeddings (no input that requires grad), and is
        # what torch recommends. transformers >= 5.x renamed the method (the old name warns).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


def _state_tensors(state: Optional[QuantState]) -> list[Tensor]:
    """Every tensor a quant state holds (absmax, tables, offset), nested state included."""
    if state is None:
        return []
    tensors = [v for v in vars(state).values() if isinstance(v, Tensor)]
    return tensors + _state_tensors(state.state2)


def _meta_state(template: QuantState, shape, blocks: int) -> QuantState:
    """`template`'s structure (fields, dtypes, tables, nesting) for a tensor of `blocks`
    blocks, on the meta device: absmax gets one entry per block, the nested absmax one per
    nested block."""
    fields = dict(vars(template))
    for name, value in fields.items():
        if isinstance(value, Tensor):
            fields[name] = torch.empty_like(value, device="meta")
    fields["absmax"] = torch.empty(blocks, dtype=template.absmax.dtype, device="meta")
    if template.state2 is not None:
        fields["state2"] = _meta_state(template.state2, template.state2.shape,
                                       math.ceil(blocks / template.state2.blocksize))
    fields["shape"] = shape
    return QuantState(**fields)


def _quantize_on_meta(model: nn.Module, blocksize: int) -> None:
    """Give every Linear4bit of a meta model a quantized weight of the right sizes.

    quantize_4bit cannot run on meta tensors (it checks the values for NaN), so the state's
    structure comes from quantizing one real block with the same settings, and the sizes
    from the layer: the packed codes are ceil(n/2) bytes, absmax one entry per block.
    """
    templates: dict[tuple, QuantState] = {}
    for module in model.modules():
        if not isinstance(module, Linear4bit) or module.weight.bnb_quantized:
            continue
        weight = module.weight
        key = (weight.quant_type, weight.compress_statistics, weight.dtype)
        if key not in templates:
            one_block = torch.ones(blocksize, dtype=weight.dtype)
            templates[key] = quantize_4bit(one_block, blocksize=blocksize,
                                           compress_statistics=weight.compress_statistics,
                                           quant_type=weight.quant_type)[1]
        numel = weight.numel()
        state = _meta_state(templates[key], weight.shape, math.ceil(numel / blocksize))
        packed = torch.empty(math.ceil(numel / 2), 1, dtype=torch.uint8, device="meta")
        module.weight = Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                                   compress_statistics=weight.compress_statistics,
                                   quant_type=weight.quant_type, quant_storage=torch.uint8,
                                   module=module, bnb_quantized=True)
        module.quant_state = state


def _takes_labels(model: nn.Module) -> bool:
    return "labels" in inspect.signature(model.forward).parameters


def _training_loss(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The loss of one training step: the model's own language-modelling loss when its
    forward takes labels (labels = the inputs), else the mean of its first output, a
    stand-in objective that backpropagates through every layer."""
    accepted = inspect.signature(model.forward).parameters
    kwargs = {"use_cache": False} if "use_cache" in accepted else {}
    if _takes_labels(model):
        return model(input_ids=input_ids, labels=input_ids, **kwargs).loss
    output = model(input_ids=input_ids, **kwargs)
    first = output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
    return first.float().mean()


# --------------------------------------------------------------------------------------
# Parameter counts by kind
# --------------------------------------------------------------------------------------

# kind -> what the table calls it
KINDS = {
    "quantized_linear": "linear weights that get quantized",
    "linear_bias": "biases of those layers",
    "embedding": "embeddings",
    "norm": "norms",
    "unquantized_linear": "linear layers kept unquantized",
    "other": "other parameters",
    "lora": "LoRA adapters",
}


def _kind(module: nn.Module, param_name: str) -> str:
    if isinstance(module, Linear4bit):
        return "linear_bias" if param_name == "bias" else "quantized_linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "norm" in type(module).__name__.lower():     # LayerNorm, LlamaRMSNorm, GroupNorm, ...
        return "norm"
    if isinstance(module, nn.Linear):
        return "unquantized_linear"
    return "other"


@dataclass
class _Census:
    """Parameters of the built model by kind: element counts, bytes, module names."""
    numel: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    nbytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    names: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    dtypes: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in KINDS})
    lora_numels: list[int] = field(default_factory=list)
    quantized_layers: int = 0
    buffer_bytes: int = 0


def _census(model: nn.Module) -> _Census:
    """Before _quantize_on_meta: Linear4bit weights still have their [out, in] shape."""
    census, seen = _Census(), set()
    lora_params = {id(p) for m in model.modules() if isinstance(m, LoraLinear4bit)
                   for p in (m.lora_A.weight, m.lora_B.weight)}
    for name, module in model.named_modules():
        census.quantized_layers += isinstance(module, Linear4bit)
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:               # tied weights count once
                continue
            seen.add(id(param))
            kind = "lora" if id(param) in lora_params else _kind(module, param_name)
            census.numel[kind] += param.numel()
            census.nbytes[kind] += param.numel() * param.element_size()
            census.dtypes[kind].add(str(param.dtype).removeprefix("torch."))
            if kind == "lora":
                census.lora_numels.append(param.numel())
            elif kind in ("unquantized_linear", "other") and name not in census.names[kind]:
                census.names[kind].append(name or param_name)
    census.buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    return census


# --------------------------------------------------------------------------------------
# The activation trace
# --------------------------------------------------------------------------------------

def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                     scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as the fused flash kernel: torch's own choice on CPU
    (and, with the same kept tensors, flash / memory-efficient attention on GPUs), which on
    meta tensors would fall back to the math path and keep seq x seq matrices. The kernel
    takes fewer key/value heads than query heads as they are (grouped-query attention)."""
    del enable_gqa
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of the tensors the traced code creates, from the op that returns a
    new storage until that storage is freed (a weak reference's callback). Keeps the peak,
    and the peak of the count less the gradients handed to parameters so far (`add_gradient`):
    the activations' own peak. Storages that exist before (parameters, quant states) are
    never counted."""

    def __init__(self, preexisting: Sequence[Tensor]):
        super().__init__()
        self._ignored = {t.untyped_storage()._cdata for t in preexisting}
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0
        self.gradients = 0
        self.activations_peak = 0

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key)
        self._refs.pop(key, None)

    def add_gradient(self, grad: Tensor) -> None:
        self.gradients += grad.untyped_storage().nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._ignored or key in self._sizes:
                continue                        # a view, or a parameter passed through
            self._sizes[key] = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            self.activations_peak = max(self.activations_peak, self.live - self.gradients)
        return out


def _repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks gradient checkpointing wraps (transformers' GradientCheckpointingLayer),
    else the longest ModuleList's entries."""
    with contextlib.suppress(ImportError):
        from transformers.modeling_layers import GradientCheckpointingLayer
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if layers:
            return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _trace_training_step(model: nn.Module, batch_size: int, seq_len: int) -> dict:
    """Live bytes of one forward + backward of a meta model (see _LiveBytes): the peak, what
    is kept at the end of forward, and how much of that the repeated layers keep."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    transformers = _transformers()
    # Fake tensors rather than bare meta ones: transformers skips its data-dependent checks
    # (mask shortcuts) for them, as it does under torch.compile.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    preexisting = list(model.parameters()) + list(model.buffers())
    preexisting += [t for m in model.modules() if isinstance(m, Linear4bit)
                    for t in _state_tensors(m.weight.quant_state)]
    # The fake mode converts each meta tensor an op reads into a fake tensor with a storage of
    # its own, once (it memoizes the conversion): convert them now, so that a parameter an op
    # passes through (detach, save_for_backward) is recognized as one, not counted.
    preexisting += [fake_mode.from_tensor(t) for t in preexisting]
    layers = _repeated_layers(model)
    at_layers: dict[str, int] = {}
    tracker = _LiveBytes(preexisting)
    hooks = []

    def note(moment):
        def hook(*_):       # returns None: a hook's return value would replace the layer's I/O
            at_layers.setdefault(moment, tracker.live)
        return hook

    if layers:
        hooks.append(layers[0].register_forward_pre_hook(note("before")))
        hooks.append(layers[-1].register_forward_hook(note("after")))
    hooks += [p.register_post_accumulate_grad_hook(lambda p: tracker.add_gradient(p.grad))
              for p in model.parameters() if p.requires_grad]
    # transformers looks for packed sequences by reading the position ids, which it cannot do
    # on fake tensors, and then builds a full mask (and expands grouped key/value heads for
    # it); the traced input is one unpadded sequence per row, so there are none, and the
    # causal mask is skipped for SDPA as in a real run. Both patches last for the trace only,
    # gradient checkpointing's recomputation in backward included.
    masking = getattr(transformers, "masking_utils", None)
    no_packed_sequences = contextlib.nullcontext()
    if hasattr(masking, "find_packed_sequence_indices"):
        no_packed_sequences = mock.patch.object(masking, "find_packed_sequence_indices",
                                                lambda *args, **kwargs: None)
    fused_attention = mock.patch.object(torch.nn.functional, "scaled_dot_product_attention",
                                        _fused_attention)
    try:
        with _quiet_model_code(), fake_mode, tracker, no_packed_sequences, fused_attention:
            input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
            loss = _training_loss(model, input_ids)
            after_forward = tracker.live
            loss.backward()
            del loss, input_ids
    except Exception as error:
        raise RuntimeError(f"tracing a training step of {type(model).__name__} on fake tensors "
                           f"failed ({type(error).__name__}: {error}); its activations cannot "
                           "be estimated this way") from error
    finally:
        for hook in hooks:
            hook.remove()
    per_layer = ((at_layers["after"] - at_layers["before"]) // len(layers)
                 if len(at_layers) == 2 else None)
    return dict(peak=tracker.peak, activations_peak=tracker.activations_peak,
                after_forward=after_forward, layers=len(layers), per_layer=per_layer,
                gradients=tracker.gradients, end_of_backward=tracker.live)


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of a plan: `bytes` and how it was obtained (`formula`, with its `inputs`)."""
    section: str          # "inference" | "training"
    item: str
    bytes: int
    formula: str
    inputs: dict = field(default_factory=dict)


@dataclass
class MemoryPlan:
    model: dict               # source, class, model_type, parameters
    options: PlanOptions
    parameters: dict          # kind -> element count
    rows: list[Row]
    activations: dict         # the trace: peak, kept after forward, per layer, ...
    assumptions: list[str]

    def section(self, name: str) -> list[Row]:
        return [row for row in self.rows if row.section == name]

    def total(self, section: str) -> int:
        return sum(row.bytes for row in self.section(section))

    def to_json(self) -> dict:
        return dict(model=self.model, options=asdict(self.options), parameters=self.parameters,
                    inference=dict(rows=[asdict(r) for r in self.section("inference")],
                                   total_bytes=self.total("inference")),
                    training=dict(rows=[asdict(r) for r in self.section("training")],
                                  total_bytes=self.total("training")),
                    activations=self.activations, assumptions=self.assumptions)


def _weight_rows(section: str, census: _Census, quantized_bytes: int,
                 options: PlanOptions) -> list[Row]:
    rows = []
    n = census.numel["quantized_linear"]
    if options.quant == "none":
        rows.append(Row(section, f"{KINDS['quantized_linear']} (kept in {options.dtype})",
                        census.nbytes["quantized_linear"], f"N x {options.dtype_bytes} bytes",
                        dict(N=n, layers=census.quantized_layers)))
    else:
        bpw = bits_per_weight(options.blocksize, options.double_quant)
        constants = (f"4 + 8/{options.blocksize} + 32/({options.blocksize}*{NESTED_BLOCKSIZE})"
                     if options.double_quant else f"4 + 32/{options.blocksize}")
        rows.append(Row(section, f"{KINDS['quantized_linear']} ({options.quant.upper()})",
                        quantized_bytes,
                        f"N x {bpw:.4g} bits ({constants}) + code tables per layer",
                        dict(N=n, layers=census.quantized_layers, bits_per_weight=bpw,
                             blocksize=options.blocksize, double_quant=options.double_quant)))
    for kind in ("linear_bias", "embedding", "norm", "unquantized_linear", "other"):
        if census.numel[kind]:
            inputs = dict(N=census.numel[kind], dtype=",".join(sorted(census.dtypes[kind])))
            if census.names[kind]:
                names = census.names[kind]
                inputs["modules"] = names[:8] + (["..."] if len(names) > 8 else [])
            rows.append(Row(section, KINDS[kind], census.nbytes[kind],
                            "N x bytes of dtype", inputs))
    if census.buffer_bytes:
        rows.append(Row(section, "buffers (e.g. rotary tables)", census.buffer_bytes,
                        "as the model registers them", {}))
    return rows


def _kv_cache_row(config, model: nn.Module, options: PlanOptions) -> Row:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if not can_generate or not layers or not heads:
        return Row("inference", "KV cache", 0, "none: not a generative decoder",
                   dict(model=type(model).__name__))
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    inputs = dict(layers=layers, batch=options.batch_size, seq=options.seq_len, kv_heads=kv_heads,
                  head_dim=head_dim, bytes=options.dtype_bytes)
    return Row("inference", f"KV cache ({options.dtype})", 2 * math.prod(inputs.values()),
               "2 (K, V) x layers x batch x seq x kv_heads x head_dim x bytes", inputs)


def _inference_rows(config, model, census: _Census, quantized_bytes: int,
                    options: PlanOptions) -> list[Row]:
    rows = _weight_rows("inference", census, quantized_bytes, options)
    weights = sum(r.bytes for r in rows)
    rows.append(Row("inference", "runtime overhead, rule of thumb (+20% of the weights)",
                    round(weights * (INFERENCE_RULE_OF_THUMB - 1)),
                    f"weights x {INFERENCE_RULE_OF_THUMB - 1:.1f} (the 'weights x "
                    f"{INFERENCE_RULE_OF_THUMB}' rule of thumb; not traced)",
                    dict(weights_bytes=weights)))
    rows.append(_kv_cache_row(config, model, options))
    return rows


def _training_rows(census: _Census, quantized_bytes: int, trace: dict,
                   options: PlanOptions) -> list[Row]:
    rows = _weight_rows("training", census, quantized_bytes, options)
    n_lora = census.numel["lora"]
    lora_bytes = census.nbytes["lora"]
    rows.append(Row("training", f"LoRA adapters (r={options.lora_rank}, float32)", lora_bytes,
                    "N x 4 bytes", dict(N=n_lora, tensors=len(census.lora_numels))))
    rows.append(Row("training", "LoRA gradients (float32)", lora_bytes, "N x 4 bytes", dict(N=n_lora)))
    rows.append(Row("training", f"optimizer state ({options.optimizer})",
                    optimizer_state_bytes(options.optimizer, census.lora_numels),
                    OPTIMIZERS[options.optimizer], dict(N=n_lora, tensors=len(census.lora_numels))))
    checkpointing = "on" if options.gradient_checkpointing else "off"
    activation_inputs = dict(batch=options.batch_size, seq=options.seq_len, dtype=options.dtype,
                             gradient_checkpointing=checkpointing, layers=trace["layers"],
                             kept_per_layer_bytes=trace["per_layer"],
                             kept_after_forward_bytes=trace["after_forward"],
                             activations_alone_peak_bytes=trace["activations_peak"],
                             peak_with_gradients_bytes=trace["peak"])
    # The gradients appear during backward while activations are freed: the trace's peak
    # is that of both together, and this line is that peak less the gradients' own line, so
    # that the total is the traced peak (activations_alone_peak says what they reach alone).
    rows.append(Row("training", "activations (traced peak, gradients excluded)",
                    max(trace["peak"] - lora_bytes, 0),
                    "traced peak of forward + backward (activations + gradients as they "
                    "appear) - the gradients' line; "
                    + ("kept: one input per layer (checkpoint) + one layer recomputed in backward"
                       if options.gradient_checkpointing else "kept: every layer's saved tensors"),
                    activation_inputs))
    return rows


def estimate_memory(config, **options) -> MemoryPlan:
    """The memory plan of `config` (a preset name, a model folder, a config JSON file or a
    transformers config) with PlanOptions(**options); see the module docstring."""
    source = (config if isinstance(config, (str, os.PathLike)) else
              "config dict" if isinstance(config, dict) else type(config).__name__)
    config = load_config(config)
    options = PlanOptions(**options)
    model = _build_model(config, options, "meta")
    census = _census(model)
    # Also with quant "none": the trace runs the 4-bit layers (see the assumptions), and its
    # weights line is then the census' dense bytes.
    _quantize_on_meta(model, options.blocksize)
    quantized_bytes = sum(m.weight.untyped_storage().nbytes() + sum(
        t.untyped_storage().nbytes() for t in _state_tensors(m.quant_state))
        for m in model.modules() if isinstance(m, Linear4bit))
    trace = _trace_training_step(model, options.batch_size, options.seq_len)

    rows = (_inference_rows(config, model, census, quantized_bytes, options)
            + _training_rows(census, quantized_bytes, trace, options))

    assumptions = [
        "parameters: counted on the model's module tree built on the meta device, after "
        "nf4lora.replace_linear (every Linear but lm_head and tied layers) and add_lora",
        "4-bit weights: packed codes + block constants + code tables, as stored",
        "LoRA adapters and their gradients in float32, as PEFT and nf4lora keep them",
        f"optimizer: {OPTIMIZERS[options.optimizer]}; its step's temporaries are not counted",
        "activations: traced on fake tensors (real forward + backward, attention as the fused "
        "SDPA/flash kernel); not counted: kernels' internal workspaces, allocator caching and "
        "fragmentation (a GPU's caching allocator reserves more than it allocates), the CUDA context",
        f"inference: weights x {INFERENCE_RULE_OF_THUMB} is a rule of thumb, not traced; "
        "KV cache in the compute dtype",
    ]
    if not _takes_labels(model):
        assumptions.append(f"{type(model).__name__} takes no labels: the traced step's loss is "
                           "the mean of its first output")
    if options.quant == "none":
        assumptions.append("quant none: activations traced on the 4-bit module tree; a frozen "
                           "dense Linear keeps the same tensors for backward (its input is not "
                           "needed: no weight gradient)")
    model_info = dict(source=str(source), model_type=config.model_type, cls=type(model).__name__,
                      parameters=sum(v for k, v in census.numel.items() if k != "lora"))
    return MemoryPlan(model=model_info, options=options,
                      parameters={KINDS[k]: v for k, v in census.numel.items()}, rows=rows,
                      activations=trace, assumptions=assumptions)


# --------------------------------------------------------------------------------------
# --measure: the real thing, in a fresh process
# --------------------------------------------------------------------------------------

def _return_freed_memory_to_os() -> None:
    """Pin glibc's mmap threshold at 128 KiB (its default before it adapts): freed tensors then
    go back to the OS, so the resident set follows the bytes in use, as
    torch.cuda.max_memory_allocated does on a GPU (it leaves out the caching allocator's
    reserve). Without the pin glibc raises the threshold up to 32 MiB after the first frees
    and keeps freed tensors of that size in its heap. No-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3                       # <malloc.h>
        libc.mallopt(m_mmap_threshold, 128 * 1024)


def _release_garbage() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Meter:
    """Current and peak memory of this process on `device`: resident set size on CPU (Linux
    /proc), allocated bytes on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            from .demo import rss
            self._rss = rss
            if rss()[0] is None:
                raise RuntimeError("measuring on CPU reads /proc/self/status (Linux)")
        elif device.type != "cuda":
            raise ValueError(f"--measure runs on cpu or cuda, not {device.type}")

    def current(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return self._rss()[0]

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS (Linux >= 4.0)

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._rss()[1]

    @property
    def method(self) -> str:
        return ("torch.cuda.max_memory_allocated above the allocation before building the model"
                if self.device.type == "cuda" else
                "peak resident set size (VmHWM) above the resident size before building the "
                "model; glibc's mmap threshold pinned so freed tensors return to the OS")


def _optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    with _quiet_imports():
        import bitsandbytes
    return bitsandbytes.optim.AdamW8bit(params, lr=1e-4)


def _train_steps(model: nn.Module, optimizer, batch_size: int, seq_len: int, steps: int) -> list[float]:
    """`steps` training steps on random tokens, as a training loop runs them (the model's
    outputs dropped before backward, gradients set to None after the step); seconds each."""
    vocab = model.get_input_embeddings().num_embeddings
    input_ids = torch.randint(vocab, (batch_size, seq_len), device=model.device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = _training_loss(model, input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        seconds.append(time.perf_counter() - start)
    return seconds


def _measure(spec: dict) -> dict:
    device = torch.device(spec["device"])
    if device.type == "cpu":
        _return_freed_memory_to_os()
    meter = _Meter(device)
    config = _config_from_dict(spec["config"], "the config")
    options = PlanOptions(**spec["options"])
    torch.manual_seed(0)
    # One step of a one-layer copy at the same batch x seq first: first-call costs are the
    # process's, not the model's memory (thread pools, the autograd engine's threads, the
    # CPU GEMM library's set-up: ~40 MB on the first matmul, a few MB on the first of each
    # shape).
    small = copy.deepcopy(config)
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    if hasattr(text, "num_hidden_layers"):
        text.num_hidden_layers = 1
    warm = _build_model(small, options, device)
    _train_steps(warm, _optimizer(options.optimizer, [p for p in warm.parameters() if p.requires_grad]),
                 options.batch_size, options.seq_len, 1)
    del warm
    _release_garbage()

    baseline = meter.current()
    model = _build_model(config, options, device)
    optimizer = _optimizer(options.optimizer, [p for p in model.parameters() if p.requires_grad])
    _release_garbage()      # the float weights replace_linear quantized are gone
    after_setup = meter.current()
    meter.reset_peak()
    seconds = _train_steps(model, optimizer, options.batch_size, options.seq_len, spec["steps"])
    peak = meter.peak()
    return dict(device=str(device), steps=spec["steps"], peak_bytes=peak - baseline,
                setup_bytes=after_setup - baseline, baseline_bytes=baseline,
                seconds_per_step=seconds, threads=torch.get_num_threads(), method=meter.method)


def _measure_in_child(spec: dict, queue) -> None:
    try:
        with _quiet_model_code():
            result = _measure(spec)
        queue.put(("ok", result))
    except BaseException as error:        # reported by the parent, with the child's message
        queue.put(("error", f"{type(error).__name__}: {error}"))


def _result_of(child, queue, timeout_s: float) -> tuple[str, Any]:
    """The child's (status, result), polling so that a child that dies without a word (killed
    for memory, or a crash while starting) does not leave the caller waiting for the timeout."""
    deadline = time.monotonic() + timeout_s
    while child.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(queue_module.Empty):
            return queue.get(timeout=1.0)
    with contextlib.suppress(queue_module.Empty):       # sent just before it exited
        return queue.get(timeout=1.0)
    timed_out = child.is_alive()
    child.kill()
    child.join()
    why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exit code {child.exitcode}"
    raise RuntimeError(f"the measuring process gave no result ({why})")


def measure_training(config, steps: int = 3, device: Optional[str] = None,
                     timeout_s: float = 1800, **options) -> dict:
    """Run `steps` real (Q)LoRA training steps of `config` with PlanOptions(**options) in a
    fresh process (so nothing this process holds hides in the numbers) and return its peak
    memory above what it held before building the model (`peak_bytes`), the memory held
    after building it (`setup_bytes`; the optimizer state appears at the first step),
    seconds per step and the method.
    The weights are random; the model is built as _build_model builds it for the estimate.
    device: "cpu" or "cuda" (default: cuda when available)."""
    config = load_config(config)
    options = PlanOptions(**options)
    _positive_int("steps", steps)
    if options.quant == "none":
        raise ValueError("--measure runs nf4lora's 4-bit QLoRA path: use --quant nf4 or fp4")
    if options.blocksize != DEFAULT_BLOCKSIZE:
        raise ValueError(f"--measure builds the model with nf4lora.replace_linear, which "
                         f"quantizes with blocksize {DEFAULT_BLOCKSIZE}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    spec = dict(config=config.to_dict(), options=asdict(options), steps=steps, device=device)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_measure_in_child, args=(spec, queue), daemon=True)
    child.start()
    status, result = _result_of(child, queue, timeout_s)
    child.join(timeout=60)
    if status != "ok":
        raise RuntimeError(f"the measuring process failed: {result}")
    return result


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------

def _unit(nbytes: int) -> tuple[str, int]:
    return ("GiB", GIB) if nbytes >= GIB else ("MiB", MIB)


def _inputs_text(inputs: dict) -> str:
    def value(key, v):
        if key.endswith("_bytes") and isinstance(v, int):
            unit, scale = _unit(v)
            return f"{v / scale:.2f} {unit}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return ",".join(v) if isinstance(v, list) else str(v)
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"
    return ", ".join(f"{k.removesuffix('_bytes')}={value(k, v)}" for k, v in inputs.items())


def format_plan(plan: MemoryPlan) -> str:
    """Both tables as `nf4lora memory` prints them: item, size, formula, and under the
    formula the values that went into it."""
    o = plan.options
    unit, scale = _unit(plan.total("training"))
    quant = ("none (" + o.dtype + ")" if o.quant == "none" else
             f"{o.quant.upper()}, blocksize {o.blocksize}, "
             f"{'double quantization' if o.double_quant else 'float32 absmax'}")
    targets = o.lora_targets if isinstance(o.lora_targets, str) else ",".join(o.lora_targets)
    lines = [f"{plan.model['cls']} ({plan.model['source']}): {plan.model['parameters'] / 1e9:.3f}B "
             f"parameters",
             f"quantization {quant}; compute {o.dtype}; LoRA r={o.lora_rank} on {targets}; "
             f"{o.optimizer}; batch {o.batch_size} x seq {o.seq_len}; gradient checkpointing "
             f"{'on' if o.gradient_checkpointing else 'off'}"]
    width = max(len(r.item) for r in plan.rows)
    for section in ("inference", "training"):
        lines += ["", f"{section:<{width}}  {unit:>9}  formula (inputs below)",
                  f"{'-' * width}  {'-' * 9}  {'-' * 22}"]
        for r in plan.section(section):
            lines.append(f"{r.item:<{width}}  {r.bytes / scale:9.2f}  {r.formula}")
            if r.inputs:
                lines.append(f"{'':<{width}}  {'':9}    {_inputs_text(r.inputs)}")
        lines.append(f"{'total':<{width}}  {plan.total(section) / scale:9.2f}")
    lines += [""] + [f"- {a}" for a in plan.assumptions]
    return "\n".join(lines)


def compare(plan: MemoryPlan, measured: dict) -> dict:
    estimate = plan.total("training")
    ratio = estimate / measured["peak_bytes"]
    return dict(estimate_bytes=estimate, measured_bytes=measured["peak_bytes"], ratio=ratio,
                tolerance=MEASURE_TOLERANCE, within_tolerance=abs(ratio - 1) <= MEASURE_TOLERANCE)


def _available_bytes() -> Optional[int]:
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return None


def _harness():
    from .cli import _load_bench     # bench/ ships as nf4lora.bench; a checkout has `bench`
    harness = _load_bench("harness")
    if harness is None:
        raise ImportError("nf4lora memory prints and saves through bench/harness.py, which is "
                          "not in this installation or checkout")
    return harness


def _parse_args(argv, harness):
    presets = "\n".join(f"  {name:<12} {values['num_hidden_layers']} layers, hidden "
                        f"{values['hidden_size']}, vocab {values['vocab_size']}"
                        for name, values in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="nf4lora memory", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog=f"presets:\n{presets}")
    parser.add_argument("config", help="a preset name, a model folder with config.json, or a "
                        "config JSON file")
    defaults = PlanOptions()
    parser.add_argument("--quant", choices=QUANT_TYPES, default=defaults.quant,
                        help="4-bit type of the linear weights, or none: keep them in --dtype")
    parser.add_argument("--blocksize", type=int, default=defaults.blocksize)
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="float32 block constants instead of double-quantized ones")
    parser.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPES),
                        help="compute dtype (activations, KV cache) and that of the parameters "
                        "not quantized")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    parser.add_argument("--lora-targets", default=defaults.lora_targets,
                        help=f"{ALL_LINEAR!r} or comma-separated module names (q_proj,v_proj)")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=defaults.optimizer)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--measure", action="store_true",
                        help="also run a few real training steps here and compare the peak")
    parser.add_argument("--steps", type=int, default=3, help="training steps --measure runs")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where --measure runs (default: cuda if available)")
    harness.add_out_flag(parser)
    args = parser.parse_args(argv)
    if args.lora_targets != ALL_LINEAR:
        args.lora_targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return args


def main(argv: Optional[list[str]] = None) -> int:
    try:
        harness = _harness()
    except ImportError as error:
        print(f"nf4lora memory: {error}", file=sys.stderr)
        return 2
    args = _parse_args(argv, harness)
    options = dict(quant=args.quant, blocksize=args.blocksize, double_quant=args.double_quant,
                   dtype=args.dtype, lora_rank=args.lora_rank, lora_targets=args.lora_targets,
                   optimizer=args.optimizer, batch_size=args.batch_size, seq_len=args.seq_len,
                   gradient_checkpointing=args.gradient_checkpointing)
    try:
        plan = estimate_memory(args.config, **options)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as error:
        print(f"nf4lora memory: {error}", file=sys.stderr)
        return 2
    print(format_plan(plan))

    measured = comparison = None
    if args.measure:
        available = _available_bytes()
        needed = plan.total("training")
        if args.device != "cuda" and available is not None and needed > available // 2:
            print(f"nf4lora memory: --measure would need about {needed / GIB:.1f} GiB here, and "
                  f"{available / GIB:.1f} GiB are available; measure a smaller model (e.g. "
                  "tiny-llama) or a smaller batch", file=sys.stderr)
            return 2
        try:
            measured = measure_training(args.config, steps=args.steps, device=args.device, **options)
        except (ValueError, RuntimeError, ImportError) as error:
            print(f"nf4lora memory: --measure: {error}", file=sys.stderr)
            return 2
        comparison = compare(plan, measured)
        unit = _unit(comparison["measured_bytes"])
        verdict = ("within" if comparison["within_tolerance"] else "NOT within")
        print(f"\nmeasured ({measured['device']}, {measured['steps']} steps, "
              f"{measured['threads']} threads, {min(measured['seconds_per_step']):.2f} s/step): "
              f"peak {comparison['measured_bytes'] / unit[1]:.2f} {unit[0]} "
              f"(the model alone after set-up {measured['setup_bytes'] / unit[1]:.2f} {unit[0]}); "
              f"estimate {comparison['estimate_bytes'] / unit[1]:.2f} {unit[0]}: "
              f"estimate / measured = {comparison['ratio']:.3f}, {verdict} "
              f"{MEASURE_TOLERANCE:.0%}")
        print(f"measured as: {measured['method']}")
    harness.save_run(args.out, "memory-plan", benchmark="memory-plan",
                     metadata=harness.metadata(benchmark="memory-plan"),
                     config=dict(model=args.config, steps=args.steps if args.measure else None),
                     argv=argv, plan=plan.to_json(), measured=measured, comparison=comparison)
    return 0
