"""PEFT's methods on nf4lora Linear4bit models, each against the same method on a dense model.

The dense reference is the same tiny Llama with every replaced nn.Linear holding the weight
nf4lora dequantizes from its 4-bit bytes, so the two models compute the same function and
differ only by rounding in the compute dtype: the bound is a small multiple of that dtype's
eps (see ULPS). Each method either trains (loss finite, every adapter parameter
moves, the 4-bit bytes and quant state do not, and the trained adapter gives the dense
model's output) or is refused at get_peft_model time with an error that says why.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import nf4lora
from nf4lora.nn import Linear4bit, Params4bit

from conftest import assert_peft_merge_requantizes

transformers = pytest.importorskip("transformers")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")
    from peft import (
        AdaLoraConfig,
        IA3Config,
        LoHaConfig,
        LoKrConfig,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        get_peft_model,
    )
    from peft.tuners.loha import LoHaModel
    from peft.tuners.lokr import LoKrModel

    import nf4lora.integrations.peft as nf4peft
    from nf4lora.integrations.peft import (
        LoHaLinear4bitPeft,
        LoKrLinear4bitPeft,
        LoraLinear4bitPeft,
    )

pytestmark = pytest.mark.usefixtures("one_thread", "quiet_eager")

# Square, wide and narrow layers: q_proj [64, 64], v_proj [32, 64], up_proj [128, 64],
# down_proj [64, 128] (a method that took the packed [out*in/2, 1] for [out, in] fails here).
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
STEPS = 3
# The bound on |nf4lora - dense|, in eps of the compute dtype times the largest |dense| value
# of the compared tensor (loss, each gradient, logits).
# float32: only the summation order differs (fused dequantize-matmul vs dense GEMM, over up
# to 128 terms, through two layers, forward and backward): measured under 13 eps here.
# bfloat16: each 4-bit matmul rounds its input and the dequantized weight to bf16 (the dense
# model's do not), which the next layers carry on: measured under 3.5 eps here.
ULPS = {torch.float32: 64, torch.bfloat16: 8}
# A trained adapter must move the logits by this many bounds, so that the agreement check
# would see an adapter applied wrongly.
SENSITIVITY = 4

# Non-identity initialization where PEFT offers one, so the adapters act from step 0 (AdaLoRA:
# _start_away_from_identity).
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                               task_type="CAUSAL_LM"),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                               use_dora=True, task_type="CAUSAL_LM"),
    "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS,
                                     total_step=STEPS + 1, task_type="CAUSAL_LM"),
    "ia3": lambda: IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"],
                             init_ia3_weights=False, task_type="CAUSAL_LM"),
    "loha": lambda: LoHaConfig(r=4, alpha=32, target_modules=TARGETS, init_weights=False,
                               task_type="CAUSAL_LM"),
    "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False,
                               task_type="CAUSAL_LM"),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
}


def _start_away_from_identity(method, model):
    """AdaLoRA has no random-init option (E = 0): draw its A, E, B, as if trained a while."""
    if method == "adalora":
        torch.manual_seed(2)
        with torch.no_grad():
            for name, param in _trainable(model).items():
                if any(f".lora_{x}." in name for x in "AEB"):
                    param.normal_(std=0.15)


# The wrapper PEFT must put around a targeted nf4lora Linear4bit (None: no layer is wrapped).
WRAPPER = {
    "lora": LoraLinear4bitPeft,
    "dora": LoraLinear4bitPeft,
    "adalora": peft.tuners.adalora.SVDLinear,
    "ia3": peft.tuners.ia3.Linear,
    "loha": LoHaLinear4bitPeft,
    "lokr": LoKrLinear4bitPeft,
    "prefix": None,
    "prompt": None,
}


def _llama(seed=0):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _batch(seed):
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed))


def _models(compute_dtype):
    """(nf4lora model, dense model whose Linear weights are nf4lora's dequantized ones)."""
    dense = _llama()
    nf4 = nf4lora.replace_linear(copy.deepcopy(dense), quant_type="nf4",
                                 compute_dtype=compute_dtype, progress=False)
    modules = dict(dense.named_modules())
    replaced = 0
    with torch.no_grad():
        for name, module in nf4.named_modules():
            if isinstance(module, Linear4bit):
                modules[name].weight.copy_(module.dequantized_weight(torch.float32))
                replaced += 1
    assert replaced == 2 * 7
    return nf4, dense


def _packed(model):
    """Every 4-bit layer's bytes and quant-state tensors, by layer (PEFT moves the layers
    under wrappers, so not by name)."""
    out = {}
    for module in model.modules():
        if isinstance(module, Linear4bit):
            state = module.weight.quant_state
            out[module] = [module.weight.data.clone(), state.absmax.clone()] + (
                [state.state2.absmax.clone()] if state.state2 is not None else [])
    return out


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _copy_adapter(src, dst):
    """Every non-4-bit parameter of src into dst by name (the adapters; the rest is equal)."""
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, param in src.named_parameters():
            if not isinstance(param, Params4bit) and name in dst_params:
                dst_params[name].copy_(param)


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone()
                                   for n, p in _trainable(model).items()}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _bound(compute_dtype, expected):
    return ULPS[compute_dtype] * torch.finfo(compute_dtype).eps * expected.abs().max().item()


def _check_close(got, expected, bound, what):
    error = (got - expected).abs().max().item()
    assert error <= bound, f"{what}: off by {error:.3g}, bound {bound:.3g}"


# -- the methods that train ------------------------------------------------------------------------

@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_method_trains_on_nf4lora_like_on_dense(method, compute_dtype):
    nf4, dense = _models(compute_dtype)
    packed = _packed(nf4)
    torch.manual_seed(1)
    pm = get_peft_model(nf4, CONFIGS[method]())
    torch.manual_seed(1)
    ref = get_peft_model(dense, CONFIGS[method]())

    # Wrapped as on a dense model: the 4-bit layers themselves are kept, the adapters have the
    # dense model's names and shapes (so adapters move between the two).
    q_proj = pm.get_base_model().model.layers[0].self_attn.q_proj
    if WRAPPER[method] is None:
        assert isinstance(q_proj, Linear4bit)
    else:
        assert type(q_proj) is WRAPPER[method] and isinstance(q_proj.get_base_layer(), Linear4bit)
    trainable = _trainable(pm)
    # (PEFT makes AdaLoRA's `ranknum` trainable when the base layer's dtype is not float32: it
    # casts it to bitsandbytes'/nf4lora's compute_dtype through a ParameterDict, which
    # re-wraps it as a Parameter that requires grad. The same on bitsandbytes' Linear4bit.)
    assert trainable and {n: p.shape for n, p in trainable.items() if ".ranknum." not in n} == \
        {n: p.shape for n, p in _trainable(ref).items()}
    _start_away_from_identity(method, pm)
    _copy_adapter(pm, ref)
    pm.train()
    ref.train()

    # One step's loss and gradients, as the dense model's (forward and backward through 4 bits).
    ids = _batch(0)
    expected_loss, expected_grads = _loss_and_grads(ref, ids)
    loss, grads = _loss_and_grads(pm, ids)
    _check_close(loss, expected_loss, _bound(compute_dtype, expected_loss), "loss")
    for name, grad in expected_grads.items():
        _check_close(grads[name], grad, _bound(compute_dtype, grad), f"grad of {name}")

    # A few optimizer steps on the nf4lora model.
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    for step in range(STEPS):
        optimizer.zero_grad()
        batch = _batch(step + 1)
        loss = pm(input_ids=batch, labels=batch).loss
        assert torch.isfinite(loss), f"step {step}: loss {loss.item()}"
        loss.backward()
        optimizer.step()
        if method == "adalora":
            pm.base_model.update_and_allocate(step)
    unchanged = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not unchanged, f"adapter parameters that did not train: {unchanged}"
    after = _packed(nf4)
    assert after.keys() == packed.keys()
    for layer, tensors in packed.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[layer])), f"{layer} 4-bit state changed"
    assert all(m.weight.grad is None for m in nf4.modules() if isinstance(m, Linear4bit))

    # The trained adapter on the dense model gives the nf4lora model's output; the adapter
    # moves the output by much more than the bound, so the check would see a wrong adapter.
    pm.eval()
    ref.eval()
    _copy_adapter(pm, ref)
    ids = _batch(99)
    expected = _logits(ref, ids)
    bound = _bound(compute_dtype, expected)
    _check_close(_logits(pm, ids), expected, bound, "logits after training")
    with pm.disable_adapter():
        without_adapter = _logits(pm, ids)
    tokens = ids.shape[1]                   # prompt tuning's logits include the virtual tokens
    assert (without_adapter - expected[:, -tokens:]).abs().max().item() > SENSITIVITY * bound


# -- add_weighted_adapter ----------------------------------------------------------------------------

# combination_type -> (rank of the second adapter, add_weighted_adapter's extra arguments).
# linear, ties and dare_* need equal ranks (PEFT's rule); cat and svd are given unequal ones.
COMBINATIONS = {
    "linear": (4, {}),
    "cat": (2, {}),
    "ties": (4, {"density": 0.5}),
    "svd": (2, {}),
    "dare_linear": (4, {"density": 0.5}),
    "dare_ties": (4, {"density": 0.5}),
}


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_add_weighted_adapter_combines_as_on_dense(combination):
    """PEFT's add_weighted_adapter on nf4lora layers builds the same combined adapter as on
    the dense twin (it reads only adapter weights, or for svd the delta weights), and the
    combined adapter gives the dense twin's logits."""
    second_rank, kwargs = COMBINATIONS[combination]
    nf4, dense = _models(torch.float32)
    models = []
    for model in (nf4, dense):
        torch.manual_seed(1)
        pm = get_peft_model(model, CONFIGS["lora"]())
        pm.add_adapter("second", LoraConfig(r=second_rank, lora_alpha=2 * second_rank,
                                            target_modules=TARGETS, init_lora_weights=False))
        models.append(pm.eval())
    pm, ref = models
    _copy_adapter(pm, ref)
    for model in (pm, ref):
        torch.manual_seed(5)                        # dare_*: the same random drops on both
        model.add_weighted_adapter(["default", "second"], [0.7, -0.4], "combined",
                                   combination_type=combination, **kwargs)
    combined = {n: p for n, p in pm.named_parameters() if ".combined." in n}
    expected = {n: p for n, p in ref.named_parameters() if ".combined." in n}
    assert combined.keys() == expected.keys() and len(combined) == 2 * 2 * len(TARGETS)
    for name, param in combined.items():
        # svd: the same float32 delta weights, decomposed by the same LAPACK call
        torch.testing.assert_close(param, expected[name], rtol=0, atol=0, msg=name)
    q_proj = pm.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj) is LoraLinear4bitPeft and "combined" in q_proj.lora_A

    ids = _batch(7)
    pm.set_adapter("default")
    first_only = _logits(pm, ids)
    pm.set_adapter("combined")
    ref.set_adapter("combined")
    expected_logits = _logits(ref, ids)
    bound = _bound(torch.float32, expected_logits)
    _check_close(_logits(pm, ids), expected_logits, bound, f"logits of the {combination} adapter")
    assert (first_only - expected_logits).abs().max().item() > SENSITIVITY * bound


# -- refused ---------------------------------------------------------------------------------------

def test_other_lora_variants_are_refused_with_the_reason():
    nf4, dense = _models(torch.float32)
    config = {"r": 4, "target_modules": TARGETS, "use_bdlora": {"target_modules_bd_a": ["q_proj"]}}
    with pytest.raises(ValueError) as error:
        get_peft_model(nf4, LoraConfig(**config))
    message = str(error.value)
    assert "supports plain LoRA, rsLoRA and DoRA only" in message and "nf4lora" in message


# -- DoRA ------------------------------------------------------------------------------------------

def _dora_models(compute_dtype, **config):
    nf4, dense = _models(compute_dtype)
    models = []
    for model in (nf4, dense):
        torch.manual_seed(1)
        models.append(get_peft_model(model, LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=True,
            task_type="CAUSAL_LM", **config)))
    torch.manual_seed(2)       # magnitudes away from the norms: the row scale is not 1
    with torch.no_grad():
        for name, param in models[0].named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)
    _copy_adapter(*models)
    return models


def test_dora_magnitude_starts_at_the_4bit_weights_norms():
    """PEFT's init, m = ||W + s B A||_row, computed from the packed weight: the dense twin's
    PEFT computes it from the dequantized dense weight."""
    nf4, dense = _models(torch.float32)
    models = []
    for model in (nf4, dense):
        torch.manual_seed(1)
        models.append(get_peft_model(model, CONFIGS["dora"]()))
    ours = {n: p for n, p in models[0].named_parameters() if "lora_magnitude_vector" in n}
    theirs = {n: p for n, p in models[1].named_parameters() if "lora_magnitude_vector" in n}
    assert ours.keys() == theirs.keys() and len(ours) == 2 * len(TARGETS)
    for name, m in ours.items():
        assert m.dtype == torch.float32
        torch.testing.assert_close(m, theirs[name], rtol=4e-6, atol=0, msg=name)


def test_dora_with_dropout_trains_like_dense():
    """Active dropout: the base on x, DoRA's term on dropout(x) (the unfused variant path),
    the same random mask on both models."""
    pm, ref = _dora_models(torch.float32, lora_dropout=0.25)
    pm.train()
    ref.train()
    ids = _batch(3)
    torch.manual_seed(11)
    expected_loss, expected_grads = _loss_and_grads(ref, ids)
    torch.manual_seed(11)
    loss, grads = _loss_and_grads(pm, ids)
    _check_close(loss, expected_loss, _bound(torch.float32, expected_loss), "loss")
    assert any("lora_magnitude_vector" in n for n in grads)
    for name, grad in expected_grads.items():
        _check_close(grads[name], grad, _bound(torch.float32, grad), f"grad of {name}")


def test_dora_with_two_active_adapters_matches_dense():
    """Two adapters active at once: each through the variant path, as PEFT sums them."""
    pm, ref = _dora_models(torch.float32)
    for model in (pm, ref):
        torch.manual_seed(3)
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                               init_lora_weights=False, use_dora=True))
        model.base_model.set_adapter(["default", "second"])
        model.eval()
    _copy_adapter(pm, ref)
    ids = _batch(4)
    expected = _logits(ref, ids)
    _check_close(_logits(pm, ids), expected, _bound(torch.float32, expected), "logits")


def test_dora_merge_requantizes_peft_s_merged_weight():
    """merge_and_unload: each weight becomes the 4-bit rounding of PEFT's DoRA merge,
    m / ||W + s B A||_row * (W + s B A): within the reported error of the dense twin's
    merged weight (the magnitudes are away from the norms, so a LoRA-only merge would be
    off by up to 50% of a row)."""
    pm, ref = _dora_models(torch.float32)
    pm.eval()
    ref.eval()
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = pm.merge_and_unload()
    dense_merged = ref.merge_and_unload()
    dense = dict(dense_merged.named_modules())
    layers = [(n, m) for n, m in merged.named_modules() if isinstance(m, Linear4bit)]
    for name, layer in layers:
        if not name.endswith(tuple(TARGETS)):
            continue
        error = (layer.dequantized_weight(torch.float32) - dense[name].weight).abs().max().item()
        assert error <= layer.merge_report.max_abs_error + 1e-5, name


def test_dora_unmerge_restores_the_layer():
    """Unmerge: W = W' / f - s B A with the merge's own factor f = m / ||W + s B A||_row, so
    W comes back within the merge's rounding (divided by f) plus the unmerge's own."""
    pm, _ = _dora_models(torch.float32)
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    W0 = base.dequantized_weight(torch.float32)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    merge_error = layer.merge_report.max_abs_error
    factor = layer._dora_factors["default"]
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.unmerge()
    unmerge_error = layer.merge_report.max_abs_error
    assert not layer.merged and "default" not in layer._dora_factors
    error = (base.dequantized_weight(torch.float32) - W0).abs().max().item()
    assert error <= merge_error / factor.abs().min().item() + unmerge_error + 1e-6


@pytest.mark.parametrize("method", ["ia3", "adalora"])
def test_dense_merges_refuse_and_leave_the_4bit_weights(method):
    """IA3 and AdaLoRA merge by writing float deltas into the base weight's data, which on a
    4-bit layer is packed bytes (IA3 on feedforward modules would broadcast them into a
    [n/2, in] tensor without a word). nf4lora's model is flagged 4-bit, as transformers
    flags bitsandbytes' models: PEFT refuses the IA3 merge, AdaLoRA's fails on the shape;
    either way with an error, and the packed bytes are unchanged."""
    nf4, _ = _models(torch.float32)
    assert nf4.is_loaded_in_4bit
    model = get_peft_model(nf4, CONFIGS[method]())
    before = _packed(model)
    with pytest.raises((ValueError, RuntimeError)):
        model.merge_and_unload()
    after = _packed(model)
    assert before.keys() == after.keys()
    for name in before:
        assert all(torch.equal(a, b) for a, b in zip(before[name], after[name])), name


# -- LoHa / LoKr specifics -------------------------------------------------------------------------

def test_lycoris_registration_is_idempotent_and_leaves_dense_layers_to_peft():
    nf4peft.register()
    nf4peft.register()
    for tuner, layer_cls in ((LoHaModel, LoHaLinear4bitPeft), (LoKrModel, LoKrLinear4bitPeft)):
        mapping = tuner.layers_mapping
        assert next(iter(mapping)) is Linear4bit and mapping[Linear4bit] is layer_cls
        assert list(mapping).count(Linear4bit) == 1
        assert mapping[torch.nn.Linear] is not layer_cls        # PEFT's dense layer


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_merge_requantizes_and_unmerge_restores(method):
    nf4, _ = _models(torch.float32)
    pm = get_peft_model(nf4, CONFIGS[method]()).eval()
    layer = pm.get_base_model().model.layers[0].mlp.down_proj        # [64, 128]
    base = layer.get_base_layer()
    W0 = base.dequantized_weight(torch.float32)
    delta = layer.get_delta_weight("default")
    assert delta.shape == (64, 128)
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (W0 + delta).t(), rtol=1e-5, atol=1e-5)
    assert_peft_merge_requantizes(layer, x)
    assert base.weight.dtype == torch.uint8 and base.weight.shape == (64 * 128 // 2, 1)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_delta_weight_and_rank_dropout_as_peft_dense(method):
    """The delta weight nf4lora's LoHa/LoKr layers build ([out, in], PEFT's helpers) is the
    one PEFT's dense layer builds, with and without rank dropout (same random rows)."""
    nf4, dense = _models(torch.float32)
    options = {"rank_dropout": 0.5, **({"rank_dropout_scale": True} if method == "lokr" else {})}
    config = CONFIGS[method]()
    for name, value in options.items():
        setattr(config, name, value)
    pm = get_peft_model(nf4, config)
    ref = get_peft_model(dense, copy.deepcopy(config))
    _copy_adapter(pm, ref)
    ours = pm.get_base_model().model.layers[1].mlp.down_proj
    theirs = ref.get_base_model().model.layers[1].mlp.down_proj
    assert type(theirs).__name__ == "Linear" and not isinstance(theirs, type(ours))
    with torch.no_grad():
        full = theirs.get_delta_weight("default")
        torch.testing.assert_close(ours.get_delta_weight("default"), full, rtol=0, atol=0)
        torch.manual_seed(5)
        expected = theirs.get_delta_weight("default", apply_rank_dropout=True)
        torch.manual_seed(5)
        got = ours.get_delta_weight("default", apply_rank_dropout=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    dropped = (got == 0).all(dim=1)
    assert 0 < dropped.sum() < got.shape[0]           # some rows dropped, the rest rescaled
    assert not torch.allclose(got[~dropped], full[~dropped])
