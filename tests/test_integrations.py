"""replace_linear / add_lora on tiny transformers models built from configs (random weights)."""
from __future__ import annotations

import copy

import pytest
import torch

from nf4lora.integrations import add_lora, replace_linear
from nf4lora.nn import Linear4bit, LoraLinear4bit

transformers = pytest.importorskip("transformers")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama(seed=0):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(batch=2, length=7):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(0))


def test_replace_linear_llama_forward_backward():
    model = _llama()
    reference = copy.deepcopy(model)
    ids = _ids()
    replace_linear(model, compute_dtype=torch.float32, progress=False)
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert names == set(PROJECTIONS)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 2 * len(PROJECTIONS)
    assert type(model.lm_head) is torch.nn.Linear                  # skipped
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.bnb_quantized and layer.weight.quant_type == "nf4"
    assert layer.weight.compress_statistics and layer.compute_dtype == torch.float32
    # the quantized weight is the original one's quantization
    torch.testing.assert_close(layer.dequantized_weight(torch.float32),
                               reference.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0.1)
    with torch.no_grad():
        logits = model(ids).logits
        ref_logits = reference(ids).logits
    assert torch.isfinite(logits).all()
    # 4-bit weights: close to the float model, not equal
    relative = (logits - ref_logits).norm() / ref_logits.norm()
    assert 0 < relative < 0.3, relative

    add_lora(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{proj}.lora_{ab}.weight"
                         for i in range(2) for proj in ("q_proj", "v_proj") for ab in "AB"}
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    lora = model.model.layers[0].self_attn.q_proj
    assert isinstance(lora, LoraLinear4bit)
    assert lora.lora_B.weight.grad is not None and lora.lora_B.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    # one optimizer step moves the loss
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    optimizer.step()
    with torch.no_grad():
        assert model(ids, labels=ids).loss.item() != out.loss.item()


def test_replace_linear_bf16_compute_and_state_dict_round_trip():
    model = replace_linear(_llama(), progress=False)       # default compute dtype bf16
    ids = _ids()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # a fresh (differently initialized) quantized model loads the 4-bit state dict strictly
    other = replace_linear(_llama(seed=1), progress=False)
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, logits, rtol=0, atol=0)


def test_replace_linear_options_and_progress(capsys):
    model = replace_linear(_llama(), quant_type="fp4", compress_statistics=False,
                           skip_modules=("lm_head", "mlp"), progress=True)
    err = capsys.readouterr().err
    assert "quantizing" in err                                 # the tqdm bar
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.quant_type == "fp4" and not q.weight.compress_statistics
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    replace_linear(_llama(), progress=None)                    # not a tty under pytest: silent
    assert "quantizing" not in capsys.readouterr().err


def test_replace_linear_skips_tied_weights():
    model = _llama()
    model.lm_head.weight = model.model.embed_tokens.weight     # tie
    replace_linear(model, skip_modules=(), progress=False)
    assert type(model.lm_head) is torch.nn.Linear


def test_replace_linear_conv1d_gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    conv = model.transformer.h[0].attn.c_attn                  # Conv1D, weight [in, out]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = conv(x)
    replace_linear(model, compute_dtype=torch.float32, progress=False)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Linear4bit) and (layer.in_features, layer.out_features) == (32, 96)
    W = layer.dequantized_weight(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W.t() + layer.bias, rtol=1e-5, atol=1e-5)
        assert ((layer(x) - expected).norm() / expected.norm()) < 0.2
        ids = torch.randint(0, 64, (1, 6))
        assert torch.isfinite(model(ids).logits).all()


def test_add_lora_errors_list_candidates():
    model = replace_linear(_llama(), progress=False)
    with pytest.raises(ValueError, match="q_prj") as info:
        add_lora(model, r=4, lora_alpha=8, target_modules=["q_proj", "q_prj"])
    for name in PROJECTIONS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="Linear.*replace_linear"):
        add_lora(model, r=4, lora_alpha=8, target_modules=["lm_head"])
    # nothing was wrapped by the failed calls
    assert not any(isinstance(m, LoraLinear4bit) for m in model.modules())
    # a string is a regex on the full name (PEFT's rule)
    add_lora(model, r=4, lora_alpha=8, target_modules=r".*layers\.1\.mlp\.(up|down)_proj")
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)}
    assert wrapped == {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
