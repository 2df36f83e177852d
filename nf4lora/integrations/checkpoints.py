"""bitsandbytes-4bit checkpoints as transformers writes them: load without re-quantizing, save.

    model = load_pretrained_4bit("path/to/checkpoint")        # AutoModelForCausalLM by default
    save_pretrained_4bit(model, "path/to/out")                # loads in transformers + bitsandbytes

A transformers bitsandbytes-4bit checkpoint is a directory with config.json (carrying a
`quantization_config` with quant_method "bitsandbytes" and load_in_4bit) and safetensors
files holding, per quantized linear, the packed `weight` and its quant state (`weight.absmax`,
`weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__nf4|fp4`; see
shared/reference/nf4_format.md section 4). Loading builds the model from its config with
empty (meta) parameters, swaps exactly the linears the checkpoint quantized for nf4lora
Linear4bit, checks that the checkpoint's keys are exactly the model's, and only then reads
the tensors and assigns them (load_state_dict strict, assign=True): the packed codes are
used as they are.

Only local directories and safetensors files are read (no hub download, no pickle).
"""
from __future__ import annotations

import copy
import json
import os
import sys
from collections import Counter
from typing import Any, Optional, Union

import torch
from torch import nn

from ..codebook import QUANT_TYPES
from ..nn.linear4bit import Linear4bit
from ..quant_state import dtype_name
from .transformers import _conv1d_type, replace_linear

__all__ = ["load_pretrained_4bit", "save_pretrained_4bit"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# The key that marks a quantized layer: "<layer>.weight.quant_state.bitsandbytes__nf4".
_PACKED_MARK = ".weight.quant_state.bitsandbytes__"
# The quant-state entries a Linear4bit needs (besides the packed-state key) and may have.
_REQUIRED_STATE = ("weight", "weight.absmax", "weight.quant_map")
_NESTED_STATE = ("weight.nested_absmax", "weight.nested_quant_map")


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# -- reading a checkpoint ----------------------------------------------------------------------

def _checkpoint_dir(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    if os.path.isfile(path):        # a .safetensors file: its config.json sits beside it
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a checkpoint directory (only local checkpoints "
                                "are read; download hub models first)")
    return path


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(directory, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    others = sorted(name for name in os.listdir(directory) if name.endswith((".bin", ".pt", ".pth")))
    hint = f" (found {others}: re-save it with safe_serialization=True)" if others else ""
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {directory!r}{hint}")


def _quantization_settings(directory: str) -> dict[str, Any]:
    """replace_linear's arguments from config.json's quantization_config; ValueError when the
    checkpoint is not a bitsandbytes 4-bit one."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {directory!r}")
    with open(config_path) as f:
        qc = json.load(f).get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{config_path} has no quantization_config: not a bitsandbytes 4-bit "
                         "checkpoint (load a dense checkpoint with from_pretrained and "
                         "nf4lora.replace_linear)")
    method, in_4bit = qc.get("quant_method"), qc.get("load_in_4bit", qc.get("_load_in_4bit"))
    if method != "bitsandbytes" or not in_4bit:
        raise ValueError(f"{config_path}: quantization_config is quant_method={method!r}, "
                         f"load_in_4bit={in_4bit!r}; expected a bitsandbytes 4-bit checkpoint")

    def dtype(key: str, default: str) -> torch.dtype:
        name = qc.get(key) or default
        value = getattr(torch, str(name).removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"{config_path}: quantization_config {key}={name!r} is not a torch dtype")
        return value

    return {
        # bitsandbytes' defaults where the config is silent (BitsAndBytesConfig's own)
        "quant_type": qc.get("bnb_4bit_quant_type") or "fp4",
        "compute_dtype": dtype("bnb_4bit_compute_dtype", "float32"),
        "compress_statistics": bool(qc.get("bnb_4bit_use_double_quant", False)),
        "quant_storage": dtype("bnb_4bit_quant_storage", "uint8"),
    }


def _checkpoint_keys(files: list[str]) -> dict[str, str]:
    """key -> file, from the safetensors headers only (no tensor data read)."""
    from safetensors import safe_open

    keys: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                keys[key] = file
    return keys


def _quantized_layers(keys) -> dict[str, str]:
    """{layer name: quant type} of the layers a checkpoint stores in 4 bits (those with a
    `<layer>.weight.quant_state.bitsandbytes__<type>` key)."""
    return {key[:key.index(_PACKED_MARK)]: key.rsplit("__", 1)[1] for key in keys if _PACKED_MARK in key}


def _check_quant_states(key_files: dict[str, str], quantized: dict[str, str],
                        modules: dict[str, nn.Module]) -> None:
    """Check each 4-bit layer's quant state against its module (nn.Linear / Conv1D / Linear4bit,
    possibly on meta) before anything large is read: only the small `weight.*` entries are
    read, the packed `weight` is judged from its safetensors header. ValueError names the
    layer and the key (transformers' loader would otherwise only log a per-tensor error)."""
    from safetensors import safe_open

    conv1d = _conv1d_type()
    handles: dict[str, Any] = {}
    # transformers calls its quantizers inside `with torch.device("meta")`: these reads are real.
    with torch.device("cpu"):
        _check_each(key_files, quantized, modules, conv1d, handles, safe_open)


def _check_each(key_files, quantized, modules, conv1d, handles, safe_open) -> None:
    from ..nn.linear4bit import _check_packed
    from ..quant_state import QuantState

    try:
        def handle(file):
            if file not in handles:
                handles[file] = safe_open(file, framework="pt")
            return handles[file]

        for name, quant_type in sorted(quantized.items()):
            module = modules[name]
            shape = tuple(module.weight.shape)
            if conv1d is not None and isinstance(module, conv1d):    # Conv1D stores [in, out]
                shape = shape[::-1]
            elif isinstance(module, Linear4bit):
                shape = (module.out_features, module.in_features)
            missing = [f"{name}.{key}" for key in _REQUIRED_STATE if f"{name}.{key}" not in key_files]
            nested = [f"{name}.{key}" for key in _NESTED_STATE if f"{name}.{key}" in key_files]
            if missing:
                raise ValueError(f"checkpoint layer {name!r} ({quant_type}) is missing {missing}")
            if nested and len(nested) != len(_NESTED_STATE):
                raise ValueError(f"checkpoint layer {name!r} has {nested} but not all of "
                                 f"{[f'{name}.{k}' for k in _NESTED_STATE]}")
            prefix = f"{name}.weight."
            stats = {"weight." + key[len(prefix):]: handle(file).get_tensor(key)
                     for key, file in key_files.items() if key.startswith(prefix)}
            try:
                state = QuantState.from_dict(stats, device="cpu")
            except (ValueError, TypeError) as error:
                raise ValueError(f"checkpoint layer {name!r}: bad quant state ({prefix}*): {error}") from None
            if tuple(state.shape) != shape:
                raise ValueError(f"checkpoint layer {name!r}: {prefix}quant_state describes shape "
                                 f"{list(state.shape)}, the model's layer is [out, in] = {list(shape)}")
            header = handle(key_files[f"{name}.weight"]).get_slice(f"{name}.weight")
            dtype = getattr(torch, _SAFETENSORS_DTYPES.get(header.get_dtype(), ""), None)
            if dtype is None:
                raise ValueError(f"checkpoint key {name}.weight: packed codes of dtype "
                                 f"{header.get_dtype()!r} are not a 4-bit storage dtype")
            try:
                _check_packed(torch.empty(header.get_shape(), dtype=dtype, device="meta"), state,
                              f"{name}.weight")
            except ValueError as error:
                raise ValueError(f"checkpoint key {name}.weight: {error}") from None
    finally:
        handles.clear()


# safetensors' dtype names -> torch's (the storage dtypes a packed weight can have)
_SAFETENSORS_DTYPES = {"U8": "uint8", "I8": "int8", "F16": "float16", "BF16": "bfloat16",
                       "F32": "float32", "F64": "float64", "I16": "int16", "I32": "int32", "I64": "int64"}


# -- building the model --------------------------------------------------------------------------

def _empty_model(directory: str, model_cls, trust_remote_code: bool) -> nn.Module:
    """The model from its config, parameters on meta (no memory, no init), buffers real:
    non-persistent buffers such as rotary tables are computed at init, not saved."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_cls = AutoModelForCausalLM if model_cls is None else model_cls
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        if hasattr(model_cls, "from_config"):        # the Auto* classes
            kwargs = {"trust_remote_code": trust_remote_code} if trust_remote_code else {}
            model = model_cls.from_config(config, **kwargs)
        else:
            model = model_cls(config)
    # init_empty_weights re-creates each parameter on meta, which unties tied embeddings;
    # tie them again so the tied names are known (and loaded once).
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _aliases(model: nn.Module) -> list[list[str]]:
    """Groups of names of one shared (tied) parameter, e.g. [embed_tokens.weight, lm_head.weight]."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _linear_names(model: nn.Module) -> dict[str, nn.Module]:
    conv1d = _conv1d_type()
    kinds = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}


def _expected_keys(model: nn.Module, quantized: dict[str, str]) -> tuple[set[str], set[str]]:
    """(required, optional) checkpoint keys of a model whose quantized layers are Linear4bit;
    quantized: layer name -> quant type."""
    required, optional = set(model.state_dict().keys()), set()
    for name, quant_type in quantized.items():
        required.update(f"{name}.{key}" for key in _REQUIRED_STATE)
        required.add(f"{name}{_PACKED_MARK}{quant_type}")
        optional.update(f"{name}.{key}" for key in _NESTED_STATE)
    return required, optional


def load_pretrained_4bit(path: Union[str, os.PathLike], model_cls=None, *,
                         dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                         progress: Optional[bool] = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a transformers-saved bitsandbytes-4bit checkpoint into a transformers model with
    nf4lora Linear4bit layers, without re-quantizing (the packed bytes are used as saved).

    path: the checkpoint directory (or one of its .safetensors files).
    model_cls: what to build from the config: an Auto class (default AutoModelForCausalLM,
        via from_config) or a model class (called with the config).
    dtype: cast the checkpoint's dense floating tensors (norms, embeddings, lm_head, biases)
        to this dtype; None keeps them as saved. 4-bit weights are never cast.
    device: where the tensors are loaded.
    progress: tqdm bar over the tensors read; None shows it only when stderr is a terminal.

    Raises ValueError (before any tensor is read) when the checkpoint is not bitsandbytes
    4-bit, or its keys do not match the model's: missing and unexpected keys are listed.
    Layers are quantized exactly where the checkpoint has a quant state; compute dtype
    comes from quantization_config (bnb_4bit_compute_dtype). Returns the model in eval mode.
    """
    directory = _checkpoint_dir(path)
    settings = _quantization_settings(directory)
    files = _weight_files(directory)
    key_files = _checkpoint_keys(files)
    quantized = _quantized_layers(key_files)
    if not quantized:
        raise ValueError(f"{directory!r}: config.json says bitsandbytes 4-bit but no tensor has a "
                         f"'*{_PACKED_MARK}nf4|fp4' quant state: not a pre-quantized checkpoint")

    model = _empty_model(directory, model_cls, trust_remote_code)
    linears = _linear_names(model)
    not_linear = sorted(name for name in quantized if name not in linears)
    if not_linear:
        raise ValueError(f"the checkpoint quantizes modules that are not Linear/Conv1D layers of "
                         f"{type(model).__name__}: {_listing(not_linear)}")
    # Swap exactly the layers the checkpoint quantized (full names as skip patterns are exact).
    replace_linear(model, skip_modules=[name for name in linears if name not in quantized],
                   progress=False, **settings)

    # Check the keys before reading any tensor. A tied parameter is present when any of its
    # names is (transformers saves one of them).
    required, optional = _expected_keys(model, quantized)
    present = set(key_files)
    aliases = _aliases(model)
    for group in aliases:
        if present & set(group):
            present |= set(group)
    missing, unexpected = required - present, set(key_files) - required - optional
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        raise ValueError(f"checkpoint {directory!r} does not match {type(model).__name__} with "
                         f"4-bit layers {_listing(quantized, 3)}: " + "; ".join(problems))

    state_dict = _read_tensors(key_files, device, progress)
    for group in aliases:                           # fill tied names from the saved one
        source = next(name for name in group if name in state_dict)
        for name in group:
            state_dict.setdefault(name, state_dict[source])
    if dtype is not None:
        # Not the 4-bit weights nor their quant states (`<layer>.weight` and `<layer>.weight.*`).
        four_bit = tuple(f"{name}.weight" for name in quantized)
        for key, value in state_dict.items():
            is_4bit = key in four_bit or key.startswith(tuple(p + "." for p in four_bit))
            if not is_4bit and value.is_floating_point():
                state_dict[key] = value.to(dtype)

    # assign=True: the parameters are on meta, so copying into them would be a no-op.
    model.load_state_dict(state_dict, strict=True, assign=True)
    for group in aliases:                           # assign made separate Parameters: re-tie
        shared = model.get_parameter(group[0])
        for name in group[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    return model.eval()


def _read_tensors(key_files: dict[str, str], device, progress: Optional[bool]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from tqdm.auto import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    state_dict = {}
    by_file: dict[str, list[str]] = {}
    for key, file in key_files.items():
        by_file.setdefault(file, []).append(key)
    with tqdm(total=len(key_files), desc="nf4lora: loading", unit="tensor", disable=not progress) as bar:
        for file, keys in by_file.items():
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in keys:
                    state_dict[key] = f.get_tensor(key)
                    bar.update()
    return state_dict


# -- saving ------------------------------------------------------------------------------------

def _quantization_config(model: nn.Module, layers: dict[str, Linear4bit]) -> dict[str, Any]:
    """config.json's quantization_config for `layers`, as transformers' BitsAndBytesConfig
    writes it. Linears left dense go to llm_int8_skip_modules (full names), so transformers
    does not turn them into Linear4bit on load."""
    from transformers import BitsAndBytesConfig

    settings = Counter((l.weight.quant_type, bool(l.weight.compress_statistics), l.weight.dtype)
                       for l in layers.values())
    (quant_type, double_quant, storage), _ = settings.most_common(1)[0]
    if len(settings) > 1:
        import warnings
        warnings.warn(f"the 4-bit layers use different settings {sorted(map(str, settings))}; "
                      "quantization_config records the most common one (each layer's own quant "
                      "state is saved with it and is what loaders use)", stacklevel=3)
    compute = Counter(l.compute_dtype for l in layers.values() if l.compute_dtype is not None)
    compute_dtype = compute.most_common(1)[0][0] if compute else torch.float32
    dense = sorted(name for name in _linear_names(model) if name not in layers)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=dtype_name(storage),
        llm_int8_skip_modules=dense or None,
    ).to_dict()


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * units[unit])
    return int(text)


def _state_dict_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, tied parameters once (under their first name, as transformers
    keeps e.g. embed_tokens over lm_head), every tensor contiguous and owning its memory:
    safetensors refuses tensors that share storage (a quant map shared between layers)."""
    skip = {name for group in _aliases(model) for name in group[1:]}
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        value = value.detach().contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen and value.numel():
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    return tensors


def save_pretrained_4bit(model: nn.Module, save_directory: Union[str, os.PathLike],
                         max_shard_size: Union[int, str] = "5GB") -> None:
    """Save a transformers model with nf4lora Linear4bit layers as a bitsandbytes-4bit
    checkpoint: config.json with a bitsandbytes quantization_config and safetensors weights
    with bitsandbytes' keys, loadable by transformers' from_pretrained (with bitsandbytes)
    and by load_pretrained_4bit. Sharded, with an index, above max_shard_size.

    The model must be plain: LoRA wrappers (nf4lora's or PEFT's) are refused, since their
    keys are not a base model's; merge and unload them first, or save the adapter apart.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError("save_pretrained_4bit saves transformers models (it needs model.config); "
                         "for another module, save model.state_dict() with safetensors")
    wrapped = sorted(name for name, m in model.named_modules() if hasattr(m, "base_layer"))
    if wrapped:
        raise ValueError(f"the model has LoRA layers ({_listing(wrapped, 3)}): their keys "
                         "(base_layer.*, lora_*) are not a base model's. Merge them "
                         "(nf4lora.merge_lora(model); PEFT: merge_and_unload()) or save the "
                         "adapter separately")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError("the model has no nf4lora Linear4bit layer (call nf4lora.replace_linear first)")
    pending = sorted(name for name, m in layers.items() if not m.weight.bnb_quantized)
    if pending:
        raise ValueError(f"Linear4bit layers not quantized yet (they quantize on their first "
                         f".to(device) or forward): {_listing(pending)}")
    code_books = sorted(f"{name} ({m.weight.quant_type})" for name, m in layers.items()
                        if m.weight.quant_type not in QUANT_TYPES)
    if code_books:
        raise ValueError(f"a bitsandbytes checkpoint holds {' and '.join(QUANT_TYPES)} layers only; these "
                         f"use nf4lora code books that bitsandbytes cannot decode: "
                         f"{_listing(code_books, 3)}. Save model.state_dict() (safetensors) and "
                         "load it with load_state_dict into a model with the same Linear4bit layers")

    from safetensors.torch import save_file

    quantization_config = _quantization_config(model, layers)
    tensors = _state_dict_to_save(model)
    os.makedirs(save_directory, exist_ok=True)

    # Greedy sharding in key order, as transformers does.
    limit, shards, size = _parse_size(max_shard_size), [{}], 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(save_directory, SAFE_WEIGHTS_NAME), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(save_directory, name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        with open(os.path.join(save_directory, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    # A copy: saving should not turn the caller's model config into a quantized one.
    config = copy.deepcopy(config)
    config.quantization_config = quantization_config
    config.save_pretrained(save_directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "save_pretrained"):
        generation_config.save_pretrained(save_directory)
