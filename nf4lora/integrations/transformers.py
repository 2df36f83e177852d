"""Model-level helpers: quantize a (transformers) model's linear layers, add LoRA adapters.

    model = replace_linear(model, quant_type="nf4", compute_dtype=torch.bfloat16)
    model = add_lora(model, r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    ...train...
    model = merge_lora(model)      # adapters folded into the 4-bit weights, plain Linear4bit again
    print(nf4lora.merge.merge_reports(model))     # per layer: weight and output errors

`replace_linear` does what transformers' bitsandbytes quantizer does on the fly (swap each
nn.Linear / Conv1D for a Linear4bit and quantize its existing weight, skipping lm_head),
on a model that is already loaded. Nothing here imports transformers at module level:
Conv1D is recognised only if transformers is installed.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..merge import MergeRefusedError, MergeSummary, merge_reports, resolve_options
from ..nn.linear4bit import Linear4bit, Params4bit
from ..nn.lora import LoraLinear4bit

__all__ = ["replace_linear", "add_lora", "merge_lora"]

logger = logging.getLogger(__name__)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _name_matches(name: str, pattern: str) -> bool:
    """`pattern` is a run of whole dotted components of `name` ("lm_head", "mlp.down_proj")."""
    return f".{pattern}." in f".{name}."


def quantizable_layers(model: nn.Module, skip_modules: Union[str, Iterable[str]] = ("lm_head",)
                       ) -> dict[str, nn.Module]:
    """name -> module, in model order, of the nn.Linear and transformers Conv1D layers that
    `replace_linear` quantizes (and `nf4lora analyze` measures): all but those named by
    skip_modules, those already Linear4bit, and those whose weight is shared with another
    module (tied embeddings), since quantizing one would untie them. transformers'
    bitsandbytes loader leaves the same layers dense."""
    skip_modules = (skip_modules,) if isinstance(skip_modules, str) else tuple(skip_modules)
    conv1d = _conv1d_type()
    kinds = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {name: module for name, module in model.named_modules()
            if isinstance(module, kinds) and not isinstance(module, Linear4bit)
            and not any(_name_matches(name, skip) for skip in skip_modules)
            and owners.get(id(module.weight), 0) <= 1}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _to_linear4bit(module: nn.Module, is_conv1d: bool, quant_type: str,
                   compute_dtype: Optional[torch.dtype], compress_statistics: bool,
                   quant_storage: torch.dtype) -> Linear4bit:
    weight = module.weight.detach()
    if is_conv1d:                       # Conv1D stores [in, out] and computes x @ W + b
        weight = weight.t()
    out_features, in_features = weight.shape
    # Built on meta: no point initializing a weight about to be replaced.
    layer = Linear4bit(in_features, out_features, bias=module.bias is not None,
                       compute_dtype=compute_dtype, compress_statistics=compress_statistics,
                       quant_type=quant_type, quant_storage=quant_storage, device="meta")
    layer.weight = Params4bit(weight.contiguous(), requires_grad=False,
                              compress_statistics=compress_statistics, quant_type=quant_type,
                              quant_storage=quant_storage, module=layer)
    if module.bias is not None:
        layer.bias = module.bias        # the same Parameter: optimizers and ties keep working
    if weight.device.type != "meta":    # an empty-initialized model quantizes on its first .to()
        layer.weight._quantize(weight.device)
    layer.train(module.training)
    return layer


def replace_linear(model: nn.Module, quant_type: str = "nf4",
                   compute_dtype: Optional[torch.dtype] = torch.bfloat16,
                   compress_statistics: bool = True, quant_storage: torch.dtype = torch.uint8,
                   skip_modules: Iterable[str] = ("lm_head",),
                   progress: Optional[bool] = None) -> nn.Module:
    """Swap every nn.Linear (and transformers' Conv1D, transposed) in `model` for a
    Linear4bit holding its quantized weight, in place; returns the model.

    skip_modules: names (or dotted runs of names) to leave alone, e.g. "lm_head" or
    "mlp.down_proj". Layers whose weight is shared with another module (tied embeddings)
    are left alone too, since quantizing one would untie them.
    progress: show a tqdm bar; None shows it only when stderr is a terminal.
    """
    conv1d = _conv1d_type()
    targets = list(quantizable_layers(model, skip_modules).items())
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm.auto import tqdm
    for name, module in tqdm(targets, desc="nf4lora: quantizing", unit="layer", disable=not progress):
        if not name:
            raise ValueError("model is itself a Linear layer; wrap it in a module first")
        is_conv1d = conv1d is not None and isinstance(module, conv1d)
        _set_submodule(model, name, _to_linear4bit(module, is_conv1d, quant_type, compute_dtype,
                                                   compress_statistics, quant_storage))
    if targets:
        # Marked as transformers marks a bitsandbytes-loaded model: PEFT then refuses the
        # merges that would multiply or add float deltas into the packed bytes (IA3's
        # merge_and_unload would otherwise silently broadcast them into a [n/2, in] tensor).
        model.is_loaded_in_4bit = True
    return model


def _target_matches(name: str, target: str, regex: bool) -> bool:
    # PEFT's rule: a string is a regex matched against the full name; a list entry matches
    # the name itself or its suffix after a dot.
    if regex:
        return re.fullmatch(target, name) is not None
    return name == target or name.endswith("." + target)


def add_lora(model: nn.Module, r: int, lora_alpha: float,
             target_modules: Union[str, Iterable[str]], lora_dropout: float = 0.0,
             use_rslora: bool = False, use_dora: bool = False) -> nn.Module:
    """Wrap the Linear4bit layers named by `target_modules` in LoraLinear4bit, in place,
    and freeze everything else; returns the model. use_dora: DoRA adapters (a trained
    magnitude per output row, PEFT's LoraConfig(use_dora=True); see LoraLinear4bit).

    target_modules: a list of names matched by suffix ("q_proj" matches
    "model.layers.0.self_attn.q_proj"), or one string used as a regex on the full name,
    as in PEFT. Each list entry must match at least one Linear4bit; otherwise ValueError
    lists the candidate names.
    """
    regex = isinstance(target_modules, str)
    targets = [target_modules] if regex else list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty")
    quantized = {name: module for name, module in model.named_modules()
                 if isinstance(module, Linear4bit) and not name.endswith("base_layer")}

    for target in targets:
        if not any(_target_matches(name, target, regex) for name in quantized):
            others = sorted({type(m).__name__ for n, m in model.named_modules()
                             if n and _target_matches(n, target, regex)})
            why = (f" (it matches {others} modules, which are not Linear4bit: call "
                   "replace_linear first, or check skip_modules)") if others else ""
            candidates = sorted({name.rsplit(".", 1)[-1] for name in quantized})
            raise ValueError(f"target module {target!r} matches no Linear4bit layer{why}. "
                             f"Candidates: {candidates}")

    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in quantized.items():
        if any(_target_matches(name, t, regex) for t in targets):
            lora = LoraLinear4bit(module, r, lora_alpha, lora_dropout, use_rslora, use_dora)
            lora.train(module.training)
            _set_submodule(model, name, lora)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module, *, requantize: Optional[str] = None,
               max_error: Optional[float] = None, probe_rows: Optional[int] = None) -> nn.Module:
    """Fold every LoraLinear4bit adapter (from `add_lora`) into its 4-bit weight and put the
    plain Linear4bit back in its place, in place (PEFT's merge_and_unload); returns the model.

    Each weight becomes quantize(dequantize(W) + scaling * B @ A) with the layer's own quant
    type, blocksize, double quantization, storage, compute dtype and bias: lossy by one
    4-bit re-quantization, so outputs move by that rounding, not more. The result has
    only a base model's keys and can be saved with `save_pretrained_4bit`. For a PEFT model
    use PEFT's own `merge_and_unload()`.

    requantize: "plain" or "search" (each block's scale searched for the least squared
        error: nf4lora.merge.quantize_4bit_search; same format).
    max_error: a layer whose re-quantized weight is off W + scaling * B @ A by more than this
        (largest absolute error) is not merged: it stays a LoraLinear4bit, its 4-bit weight
        byte for byte as it was, and a warning names it. The other layers are merged.
    probe_rows: rows of the probe batch each report's output error is measured on.
    Left None, these come from an enclosing nf4lora.merge.merge_options, else "plain", no
    bound, 16 rows. Every layer's report (refused ones too) is logged, as a table at INFO
    level through the `nf4lora` logger, and kept: `nf4lora.merge.merge_reports(model)`.
    """
    if isinstance(model, LoraLinear4bit):
        raise ValueError("model is itself a LoraLinear4bit; wrap it in a module first")
    options = resolve_options(requantize, max_error, probe_rows)   # checked before any write
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)]
    refused = []
    for name, layer in layers:
        if not layer.merged:        # a layer merged by hand already holds W + scaling * B @ A
            try:                    # LoraLinear4bit.merge: the one place the merge is decided
                layer.merge(requantize=options.requantize, max_error=options.max_error,
                            probe_rows=options.probe_rows)
            except MergeRefusedError:
                refused.append(name)
                continue
        base = layer.base_layer
        base.train(layer.training)
        _set_submodule(model, name, base)
    names = {name for name, _ in layers}
    summary = MergeSummary(r for r in merge_reports(model) if r.name in names)
    if summary:
        logger.info("nf4lora.merge_lora:\n%s", summary)
    if refused:
        logger.warning("nf4lora.merge_lora: %d layer(s) not merged, their error exceeds "
                       "max_error=%g; they keep their adapters: %s", len(refused),
                       options.max_error, ", ".join(refused))
    return model
