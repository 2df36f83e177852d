"""PEFT on nf4lora Linear4bit models: registration, the fused forward, adapters, merging,
prepare_model_for_kbit_training, and adapters moving between bitsandbytes and nf4lora models.

Tiny Llama models from configs with random weights; nothing is downloaded. The bitsandbytes
side is made the way users make it: transformers' from_pretrained with a BitsAndBytesConfig
(bitsandbytes >= 0.46 quantizes on CPU), and run with its 4-bit layers decoded by the spec
(tests/oracles.py `spec_twin`): bitsandbytes' CPU kernels give CPU-dependent results.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import nf4lora
from nf4lora.nn import Linear4bit

from conftest import assert_peft_merge_requantizes
from oracles import SpecLinear, max_abs_tolerance, spec_twin

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model

    import nf4lora.integrations.peft as nf4peft
    from nf4lora.integrations.checkpoints import load_pretrained_4bit, save_pretrained_4bit
    from nf4lora.integrations.peft import LoraLinear4bitPeft

TARGETS = ["q_proj", "v_proj", "down_proj"]
N_LAYERS = 2


pytestmark = pytest.mark.usefixtures("one_thread", "quiet_eager")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of nf4lora.lora_matmul_4bit made by the PEFT layer."""
    calls = []
    original = nf4peft.lora_matmul_4bit

    def spy(*args, **kwargs):
        calls.append(args[3].shape)            # lora_A
        return original(*args, **kwargs)
    monkeypatch.setattr(nf4peft, "lora_matmul_4bit", spy)
    return calls


def _llama(seed=0, dtype=torch.float32):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _nf4_llama(seed=0):
    return nf4lora.replace_linear(_llama(seed), compute_dtype=torch.float32, progress=False)


def _ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits.float()


def _config(seed=None, **kwargs):
    # init_lora_weights=False: B is random too, so adapters change the output
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **kwargs}
    if seed is not None:
        torch.manual_seed(seed)
    return LoraConfig(**kwargs)


def _layer_reference(layer, x, adapters):
    """base(x) + sum of scaling * B A x over `adapters`, in float64 from the dequantized weight."""
    base = layer.get_base_layer()
    xd = x.double()
    y = F.linear(xd, base.dequantized_weight(torch.float32).double(),
                 None if base.bias is None else base.bias.double())
    for name in adapters:
        A, B = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        y = y + F.linear(F.linear(xd, A), B) * layer.scaling[name]
    return y


# -- registration ------------------------------------------------------------------------------

def test_register_is_idempotent_and_not_serialized():
    nf4peft.register()
    nf4peft.register()
    post_init = peft.LoraConfig.__post_init__
    assert post_init._nf4lora and not getattr(post_init.__wrapped__, "_nf4lora", False)
    config = LoraConfig(r=2)
    assert config._custom_modules == {Linear4bit: LoraLinear4bitPeft}
    assert nf4peft.register(config) is config and len(config._custom_modules) == 1
    assert "_custom_modules" not in config.to_dict()


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        get_peft_model(_nf4_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="plain LoRA, rsLoRA and DoRA only"):
        get_peft_model(_nf4_llama(), LoraConfig(r=2, target_modules=["q_proj"],
                                                use_bdlora={"target_modules_bd_a": ["q_proj"]}))


# -- forward -----------------------------------------------------------------------------------

def test_get_peft_model_runs_the_fused_path(fused_calls):
    model = _nf4_llama()
    base_logits = _logits(model)
    pm = get_peft_model(model, _config(seed=1, lora_dropout=0.1))
    wrapped = {n: m for n, m in pm.named_modules() if isinstance(m, LoraLinear4bitPeft)}
    assert len(wrapped) == N_LAYERS * len(TARGETS)
    assert all(isinstance(m.base_layer, Linear4bit) for m in wrapped.values())
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}.default.weight" for n in wrapped for ab in "AB"}

    pm.eval()                                   # eval: dropout off, one fused call per layer
    logits = _logits(pm)
    assert len(fused_calls) == len(wrapped)
    assert (logits - base_logits).abs().max() > 1e-2          # the adapters do something
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _layer_reference(layer, x, ["default"]),
                                   rtol=1e-5, atol=1e-5)

    fused_calls.clear()                         # training with dropout: base + adapter apart
    pm.train()
    torch.manual_seed(0)
    pm(input_ids=_ids(), labels=_ids()).loss.backward()
    assert not fused_calls
    assert layer.lora_A["default"].weight.grad is not None


def test_fused_and_unfused_training_agree(fused_calls, monkeypatch):
    """Without dropout, training runs fused; loss and gradients match the unfused sum."""
    def loss_and_grads():
        pm = get_peft_model(_nf4_llama(), _config(seed=1)).train()
        loss = pm(input_ids=_ids(), labels=_ids()).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    loss_fused, grads_fused = loss_and_grads()
    assert len(fused_calls) == N_LAYERS * len(TARGETS)
    monkeypatch.setattr(LoraLinear4bitPeft, "_fusable_adapter", lambda self: None)
    fused_calls.clear()
    loss_plain, grads_plain = loss_and_grads()
    assert not fused_calls
    assert loss_fused == pytest.approx(loss_plain, rel=1e-5)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-6)


def test_multiple_adapters_disable_and_rslora(fused_calls):
    model = _nf4_llama()
    base_logits = _logits(model)
    pm = get_peft_model(model, _config(seed=1)).eval()
    pm.add_adapter("second", _config(seed=2, r=2, lora_alpha=4, use_rslora=True))
    layer = pm.base_model.model.model.layers[1].mlp.down_proj
    assert layer.scaling == {"default": 8 / 4, "second": 4 / math.sqrt(2)}
    x = torch.randn(4, 128)

    default = _logits(pm)
    pm.set_adapter("second")
    assert pm.active_adapters == ["second"]
    second = _logits(pm)
    assert (second - default).abs().max() > 1e-2
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _layer_reference(layer, x, ["second"]),
                                   rtol=1e-5, atol=1e-5)
    assert fused_calls and all(shape[0] == 2 for shape in fused_calls[-N_LAYERS * len(TARGETS):])

    with pm.disable_adapter():                 # the base model's output exactly
        torch.testing.assert_close(_logits(pm), base_logits, rtol=0, atol=0)

    fused_calls.clear()                         # two active adapters: base + both, unfused
    pm.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _layer_reference(layer, x, ["default", "second"]),
                                   rtol=1e-5, atol=1e-5)
    assert not fused_calls

    # mixed batch: each row its own adapter (PEFT's adapter_names)
    pm.set_adapter("default")
    with torch.no_grad():
        mixed = pm(input_ids=_ids(), adapter_names=["second", "__base__"]).logits
    torch.testing.assert_close(mixed[0], second[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base_logits[1], rtol=1e-5, atol=1e-5)


def test_lora_bias_runs_unfused_and_merges(fused_calls):
    pm = get_peft_model(_nf4_llama(), _config(seed=1, lora_bias=True)).eval()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].bias, std=0.1)
    x = torch.randn(3, 64)
    expected = _layer_reference(layer, x, ["default"]) + \
        layer.lora_B["default"].bias.double() * layer.scaling["default"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert not fused_calls                      # the fused op has no adapter bias
    layer.base_layer.bias = torch.nn.Parameter(torch.zeros(64))
    layer.merge()
    with torch.no_grad():                       # merged bias = scaling * lora_B.bias
        torch.testing.assert_close(layer.base_layer.bias.double(),
                                   layer.lora_B["default"].bias.double() * layer.scaling["default"])


# -- merging -----------------------------------------------------------------------------------

def test_merge_unmerge_requantizes_with_the_same_settings():
    model = nf4lora.replace_linear(_llama(), quant_type="fp4", compute_dtype=torch.float32,
                                   compress_statistics=False, quant_storage=torch.bfloat16,
                                   progress=False)
    pm = get_peft_model(model, _config(seed=1)).eval()
    layer = pm.base_model.model.model.layers[0].self_attn.v_proj
    base = layer.get_base_layer()
    assert_peft_merge_requantizes(layer, torch.randn(5, 64))
    # re-quantized with the same settings, the module's quant state following the weight's
    state = base.weight.quant_state
    assert (state.quant_type, state.nested, base.weight.dtype) == ("fp4", False, torch.bfloat16)
    assert base.quant_state is state


def test_merge_and_unload_then_save_for_bitsandbytes(tmp_path):
    pm = get_peft_model(_nf4_llama(), _config(seed=1)).eval()
    with_adapter = _logits(pm)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, LoraLinear4bitPeft) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, Linear4bit)
    merged_logits = _logits(merged)
    # lossy (4-bit rounding of the merged weight), but much closer than dropping the adapter
    assert (merged_logits - with_adapter).abs().max() < 0.2 * (_logits(_nf4_llama()) - with_adapter).abs().max()
    save_pretrained_4bit(merged, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert isinstance(theirs.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    torch.testing.assert_close(_logits(spec_twin(theirs)), merged_logits, rtol=1e-5, atol=1e-5)


# -- prepare_model_for_kbit_training ------------------------------------------------------------

def test_prepare_model_for_kbit_training():
    model = nf4lora.replace_linear(_llama(dtype=torch.bfloat16), progress=False)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    # PEFT's own function: 4-bit weights untouched, dense bf16 parameters upcast to float32
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model.model.norm.weight.dtype == torch.float32
    for name, param in model.named_parameters():
        assert not param.requires_grad
        if name in packed:
            assert param.dtype == torch.uint8 and torch.equal(param, packed[name])
    # nf4lora's wrapper also flags the model as 4-bit, so PEFT enables gradient checkpointing
    nf4peft.prepare_model_for_kbit_training(model)
    assert model.is_loaded_in_4bit and model.is_gradient_checkpointing
    pm = get_peft_model(model, _config(seed=1)).train()
    pm(input_ids=_ids(), labels=_ids()).loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# -- adapters between bitsandbytes and nf4lora ---------------------------------------------------

@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """A bitsandbytes-4bit checkpoint made by transformers (fp32 compute)."""
    dense = tmp_path_factory.mktemp("dense")
    _llama().save_pretrained(dense)
    path = tmp_path_factory.mktemp("bnb")
    with torch._dynamo.config.patch(disable=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        transformers.AutoModelForCausalLM.from_pretrained(
            dense, quantization_config=bnb_config, device_map="cpu").save_pretrained(path)
    return path


def _bnb_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    return model


def _set_compute_dtype(model, dtype):
    for module in model.modules():
        if isinstance(module, (Linear4bit, SpecLinear)):
            module.compute_dtype, module.compute_type_is_set = dtype, True


def test_adapter_from_bitsandbytes_loads_on_nf4lora(bnb_checkpoint, tmp_path, fused_calls):
    theirs = get_peft_model(_bnb_model(bnb_checkpoint), _config(seed=3, lora_dropout=0.05)).eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(load_pretrained_4bit(bnb_checkpoint), tmp_path).eval()
    assert isinstance(ours.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear4bitPeft)
    weights_theirs = peft.get_peft_model_state_dict(theirs)
    weights_ours = peft.get_peft_model_state_dict(ours)
    assert weights_theirs.keys() == weights_ours.keys()
    assert all(torch.equal(weights_theirs[k], weights_ours[k]) for k in weights_theirs)

    # float32 compute: same 4-bit bytes, same adapter; the outputs agree to float32 rounding
    # with PEFT's bitsandbytes layers over the spec's decoding of the same bytes
    theirs = spec_twin(theirs)
    expected32 = _logits(theirs)
    fused_calls.clear()
    got32 = _logits(ours)
    assert len(fused_calls) == N_LAYERS * len(TARGETS)
    assert (got32 - expected32).abs().max().item() <= max_abs_tolerance(expected32, torch.float32)

    # bf16 compute: the bound is derived from the same-dtype baseline's own bf16 run (PEFT's
    # layer, base in bf16 as bitsandbytes computes it), whose distance to the float32 run is
    # the bf16 rounding noise of this model. nf4lora's bf16 run must be as close to the
    # float32 result within a small factor: it rounds a little more, since the fused call
    # runs the adapter in bf16 where PEFT's layer runs it in float32 beside the base
    # (about 1-2x the baseline's error over seeds and adapter sizes here; 3x allowed).
    _set_compute_dtype(theirs, torch.bfloat16)
    _set_compute_dtype(ours, torch.bfloat16)
    theirs16, ours16 = _logits(theirs), _logits(ours)
    noise = (theirs16 - expected32).abs().max().item()
    assert 0 < noise < 0.1 * expected32.abs().max().item()
    assert (ours16 - expected32).abs().max().item() <= 3 * noise


def test_adapter_from_nf4lora_loads_on_bitsandbytes(bnb_checkpoint, tmp_path):
    ours = get_peft_model(load_pretrained_4bit(bnb_checkpoint), _config(seed=4, use_rslora=True)).eval()
    ours.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(_bnb_model(bnb_checkpoint), tmp_path).eval()
    assert type(theirs.base_model.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert theirs.base_model.model.model.layers[0].mlp.down_proj.scaling["default"] == 8 / 2
    expected = _logits(ours)
    got = _logits(spec_twin(theirs))
    assert (got - expected).abs().max().item() <= max_abs_tolerance(expected, torch.float32)


def test_dora_adapter_moves_between_bitsandbytes_and_nf4lora(bnb_checkpoint, tmp_path):
    """A DoRA adapter made by PEFT on bitsandbytes' layers (its magnitude initialized from
    bitsandbytes' dequantization of the same bytes) loads on nf4lora's layers with the
    same keys and values, gives the output of PEFT's DoRA over the spec's decoding of the
    bytes, and one made on nf4lora's layers loads back on bitsandbytes'."""
    with torch._dynamo.config.patch(disable=True):
        theirs = get_peft_model(_bnb_model(bnb_checkpoint), _config(seed=5, use_dora=True)).eval()
    fresh = get_peft_model(load_pretrained_4bit(bnb_checkpoint), _config(seed=5, use_dora=True))
    magnitudes = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items()
                  if "lora_magnitude_vector" in k}
    assert len(magnitudes) == N_LAYERS * len(TARGETS)
    ours_init = peft.get_peft_model_state_dict(fresh)
    for key, value in magnitudes.items():        # nf4lora's own init from the same bytes
        torch.testing.assert_close(ours_init[key], value, rtol=4e-6, atol=0, msg=key)
    with torch.no_grad():   # as if trained: magnitudes away from the norms
        for name, param in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.linspace(0.6, 1.4, param.numel()))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(load_pretrained_4bit(bnb_checkpoint), tmp_path / "theirs").eval()
    weights_theirs = peft.get_peft_model_state_dict(theirs)
    weights_ours = peft.get_peft_model_state_dict(ours)
    assert weights_theirs.keys() == weights_ours.keys()
    assert all(torch.equal(weights_theirs[k], weights_ours[k]) for k in weights_theirs)
    expected = _logits(spec_twin(theirs))
    assert (_logits(ours) - expected).abs().max().item() <= max_abs_tolerance(expected, torch.float32)

    ours.save_pretrained(tmp_path / "ours")
    with torch._dynamo.config.patch(disable=True):
        back = PeftModel.from_pretrained(_bnb_model(bnb_checkpoint), tmp_path / "ours").eval()
    back_weights = peft.get_peft_model_state_dict(back)
    assert all(torch.equal(back_weights[k], weights_ours[k]) for k in weights_ours)
