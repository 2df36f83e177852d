"""nf4lora.merge_lora: every LoraLinear4bit of `add_lora` folded into its 4-bit weight and
unwrapped (PEFT's merge_and_unload), on a tiny random Llama built from its config.

The oracle for the merged weight is the spec: nf4lora.reference's quantize then dequantize
of the exact W + scaling * B @ A, with the layer's settings (double quantization included).
The merged model must match a dense model holding those weights to float rounding; against
the unmerged model it may differ only by that re-quantization, bounded per layer.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from oracles import SpecLinear, decoded_absmax, max_abs_tolerance, spec_dequantize
from safetensors import safe_open

import nf4lora
from nf4lora import reference
from nf4lora.nn import Linear4bit, LoraLinear4bit

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
# (quant_type, compress_statistics, quant_storage): the settings merge must keep.
SETTINGS = [("nf4", True, torch.uint8), ("fp4", False, torch.bfloat16)]


def _tiny_llama():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()   # float32


def _model_with_adapters(quant_type, compress_statistics, quant_storage):
    model = nf4lora.replace_linear(_tiny_llama(), quant_type=quant_type, compute_dtype=torch.float32,
                                   compress_statistics=compress_statistics,
                                   quant_storage=quant_storage)
    model = nf4lora.add_lora(model, r=4, lora_alpha=8, target_modules=TARGETS)
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, LoraLinear4bit):       # a fresh adapter is a no-op: train-like B
            torch.nn.init.normal_(module.lora_B.weight, std=0.05)
    return model.eval()


@torch.no_grad()
def _reference_requantized(layer: LoraLinear4bit) -> torch.Tensor:
    """dequantize(quantize(W + scaling * B @ A)) by nf4lora.reference, in float32: W is the
    spec's dequantization of the base weight; the sum is rounded to the weight's dtype
    first, as the weight was (merge re-quantizes from the weight's original dtype)."""
    state = layer.base_layer.weight.quant_state
    W = spec_dequantize(layer.base_layer.weight, state, torch.float32)
    delta = (layer.lora_B.weight.double() @ layer.lora_A.weight.double()).float() * layer.scaling
    exact = (W + delta).to(state.dtype)
    packed, absmax = reference.quantize_4bit(exact.reshape(-1), state.blocksize, state.quant_type)
    if state.state2 is not None:   # double quantization: codes from the float32 absmax, as stored
        code = state.state2.code
        qabsmax, nested, offset = reference.double_quantize(absmax, code, state.state2.blocksize)
        absmax = reference.dequantize_absmax(qabsmax, nested, code, float(offset), state.state2.blocksize)
    return reference.dequantize_4bit(packed, absmax, state.blocksize, state.quant_type,
                                     tuple(state.shape), torch.float32)


def _inputs(model):
    torch.manual_seed(2)
    return torch.randint(model.config.vocab_size, (2, 24))


@pytest.mark.parametrize("quant_type,compress_statistics,quant_storage", SETTINGS)
def test_merge_lora_requantizes_each_layer_and_unwraps_it(quant_type, compress_statistics,
                                                         quant_storage):
    model = _model_with_adapters(quant_type, compress_statistics, quant_storage)
    ids = _inputs(model)
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)}
    assert len(adapters) == 2 * len(TARGETS)
    expected = {name: _reference_requantized(m) for name, m in adapters.items()}
    exact = {name: m.base_layer.dequantized_weight(torch.float32) + m._delta()
             for name, m in adapters.items()}
    bases = {name: (m.base_layer, m.base_layer.bias) for name, m in adapters.items()}

    # Each adapter layer's own input, and its output before merging.
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(
        name, (args[0].detach(), out.detach()))) for name, m in adapters.items()]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    # The oracle model: every adapter layer replaced by a dense layer holding the spec's
    # dequantize(quantize(W + sBA)), computing in float32 as the layers do.
    oracle = copy.deepcopy(model)
    for name, m in list(oracle.named_modules()):
        if isinstance(m, LoraLinear4bit):
            parent, _, child = name.rpartition(".")
            setattr(oracle.get_submodule(parent), child,
                    SpecLinear(expected[name], m.base_layer.bias, torch.float32))

    assert nf4lora.merge_lora(model) is model

    assert not any(isinstance(m, LoraLinear4bit) for m in model.modules())
    assert not any("lora" in key or "base_layer" in key for key in model.state_dict())
    for name, (base, bias) in bases.items():
        layer = model.get_submodule(name)
        assert type(layer) is Linear4bit and layer is base and layer.bias is bias
        state = layer.weight.quant_state
        assert (state.quant_type, state.state2 is not None) == (quant_type, compress_statistics)
        assert layer.weight.dtype == quant_storage and state.dtype == torch.float32
        assert state.blocksize == 64 and layer.compute_dtype == torch.float32
        assert not layer.weight.requires_grad
        # the merged bytes decode (by the spec) to the spec's re-quantization
        torch.testing.assert_close(spec_dequantize(layer.weight, state, torch.float32),
                                   expected[name], rtol=1.3e-6, atol=1e-7)
        # Per layer: off the adapter's output by at most the re-quantization error,
        # |x| @ |Q(W + sBA) - (W + sBA)|^T, plus float32 rounding of the two matmuls.
        x, y_adapter = seen[name]
        with torch.no_grad():
            y = layer(x)
        bound = x.abs() @ (expected[name] - exact[name]).abs().t()
        rounding = max_abs_tolerance(y_adapter, torch.float32, factor=64)
        assert ((y - y_adapter).abs() <= bound + rounding).all(), name
        assert (expected[name] - exact[name]).abs().max() > 0     # the bound is not vacuous

    with torch.no_grad():
        merged, want = model(ids).logits, oracle(ids).logits
    torch.testing.assert_close(merged, want, rtol=0, atol=max_abs_tolerance(want, torch.float32, 64))


def test_merged_checkpoint_has_no_lora_keys_and_loads(tmp_path):
    model = _model_with_adapters("nf4", True, torch.uint8)
    ids = _inputs(model)
    nf4lora.merge_lora(model)
    with torch.no_grad():
        want = model(ids).logits

    nf4lora.save_pretrained_4bit(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in keys
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"

    loaded = nf4lora.load_pretrained_4bit(tmp_path)
    for name, layer in model.named_modules():
        if isinstance(layer, Linear4bit):
            twin = loaded.get_submodule(name)
            assert torch.equal(twin.weight.view(torch.uint8), layer.weight.view(torch.uint8)), name
            torch.testing.assert_close(decoded_absmax(twin.weight.quant_state),
                                       decoded_absmax(layer.weight.quant_state), rtol=0, atol=0)
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_merge_lora_keeps_a_hand_merged_layer_and_leaves_other_modules():
    model = _model_with_adapters("nf4", True, torch.uint8)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    layer.merge()                                   # merged once by hand: not merged again
    packed = layer.base_layer.weight.detach().clone()
    others = {name: m for name, m in model.named_modules()
              if not isinstance(m, (LoraLinear4bit, Linear4bit)) and "lora_" not in name}
    nf4lora.merge_lora(model)
    assert torch.equal(model.get_submodule("model.layers.0.self_attn.q_proj").weight, packed)
    assert {name: m for name, m in model.named_modules() if name in others} == others
    assert nf4lora.merge_lora(model) is model       # nothing left to merge: a no-op
    with pytest.raises(ValueError, match="wrap it"):
        nf4lora.merge_lora(layer)


def test_merge_lora_is_exported():
    assert nf4lora.merge_lora is nf4lora.integrations.merge_lora
    assert "merge_lora" in nf4lora.integrations.__all__
