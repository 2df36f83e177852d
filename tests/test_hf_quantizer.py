"""nf4lora as a transformers quantization method: from_pretrained(..., quantization_config=
NF4LoraConfig(...)), save_pretrained, generate, PEFT + Trainer, errors.

Tiny Llama / GPT-2 models from configs with random weights, saved to tmp dirs; nothing is
downloaded. bitsandbytes (through transformers' BitsAndBytesConfig, as users run it) is the
oracle for the *format*: which layers are 4-bit, keys, bytes. Values are checked against the
spec (tests/oracles.py `spec_twin`), never against bitsandbytes' CPU kernels, whose results
depend on the CPU.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import nf4lora
from nf4lora.nn import Linear4bit

from oracles import max_abs_tolerance, spec_twin

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")
    from nf4lora import NF4LoraConfig
    from nf4lora.integrations import hf_quantizer
    from nf4lora.integrations.hf_quantizer import NF4LoraQuantizer

pytestmark = pytest.mark.usefixtures("one_thread", "quiet_eager")

SETTINGS = {
    "nf4-double-fp32": dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32),
    "fp4-bf16": dict(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                     bnb_4bit_compute_dtype=torch.bfloat16),
}


def _llama(tied=False):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


def _gpt2():
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    """bf16 safetensors checkpoints: {"llama", "llama-tied", "gpt2"} -> dir."""
    dirs = {}
    for name, model in (("llama", _llama()), ("llama-tied", _llama(tied=True)), ("gpt2", _gpt2())):
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    return dirs


def _dense(name, dense_dirs):
    return transformers.AutoModelForCausalLM.from_pretrained(dense_dirs[name], dtype=torch.bfloat16)


def _quiet(fn, *args, **kwargs):
    # bitsandbytes' CPU dequantize is torch.compile'd per shape; transformers warns offline.
    with torch._dynamo.config.patch(disable=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _load_nf4lora(path, **settings):
    return _quiet(transformers.AutoModelForCausalLM.from_pretrained, path,
                  quantization_config=NF4LoraConfig(**settings))


def _load_bnb(path, **settings):
    # no settings: the folder's own config (passing quantization_config=None explicitly makes
    # transformers 5.25 skip the pre-quantized path)
    extra = {"quantization_config": transformers.BitsAndBytesConfig(load_in_4bit=True, **settings)} \
        if settings else {}
    return _quiet(transformers.AutoModelForCausalLM.from_pretrained, path, device_map="cpu", **extra)


def _bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_same_state(ours, theirs):
    """Same keys, dtypes, shapes and bytes."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
        assert torch.equal(_bytes(a[key]), _bytes(b[key])), key


def _assert_quantized_like_bitsandbytes(ours, theirs, dense, settings):
    """`ours` (nf4lora) and `theirs` (transformers + bitsandbytes) quantized the same dense
    model while loading: the same keys, dtypes and shapes, the same bytes for everything but
    the codes, and codes equal to nf4lora's quantize_4bit of the dense weights. Codes may differ
    from bitsandbytes' CPU build in a few places where it departs from the CUDA kernels that
    nf4lora follows (values within ulps of a threshold, the sign of an FP4 zero, 8-bit nested
    codes near a midpoint: tests/test_format_vs_bitsandbytes.py pins each one down)."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    conv1d = transformers.pytorch_utils.Conv1D
    codes = {f"{n}.weight" for n in layers} | {f"{n}.weight.absmax" for n in layers
                                                if settings.get("bnb_4bit_use_double_quant")}
    for key in a:
        x, y = a[key], b[key]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        if key in codes:
            assert (_bytes(x) != _bytes(y)).float().mean() < 0.02, key
        elif key.endswith(".weight.quant_map"):
            # the FP4 table's code 8 is -0.0 in bitsandbytes' CUDA table (nf4lora's), +0.0 on CPU
            assert torch.equal(x, y), key
        else:
            assert torch.equal(_bytes(x), _bytes(y)), key
    for name, layer in layers.items():
        source = dense.get_submodule(name)
        weight = source.weight.t() if isinstance(source, conv1d) else source.weight
        packed, state = nf4lora.functional.quantize_4bit(
            weight.detach().contiguous(), quant_type=settings.get("bnb_4bit_quant_type", "fp4"),
            compress_statistics=settings.get("bnb_4bit_use_double_quant", False))
        assert torch.equal(_bytes(layer.weight), _bytes(packed)), name
        assert torch.equal(layer.weight.quant_state.absmax, state.absmax), name


def _ids(vocab=128):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=None):
    with torch.no_grad():
        return model(_ids() if ids is None else ids).logits.float()


def _linear_names(model):
    conv1d = transformers.pytorch_utils.Conv1D
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, conv1d))}


# -- quantizing while loading ------------------------------------------------------------------

@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_from_pretrained_quantizes_like_bitsandbytes(dense_dirs, setting):
    settings = SETTINGS[setting]
    model = _load_nf4lora(dense_dirs["llama"], **settings)
    theirs = _load_bnb(dense_dirs["llama"], **settings)

    four_bit = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert four_bit == {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert _linear_names(model) - four_bit == {"lm_head"}    # every nn.Linear but the skipped one
    assert all(type(m) is Linear4bit and m.weight.bnb_quantized for n, m in model.named_modules() if n in four_bit)
    _assert_quantized_like_bitsandbytes(model, theirs, _dense("llama", dense_dirs), settings)

    assert model.is_loaded_in_4bit and model.is_quantized
    assert isinstance(model.hf_quantizer, NF4LoraQuantizer)
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_serializable()
    layer = model.model.layers[0].mlp.down_proj
    assert layer.compute_dtype == settings["bnb_4bit_compute_dtype"]
    assert layer.weight.quant_type == settings["bnb_4bit_quant_type"]

    # values: the spec's dequantization of these very bytes
    got = _logits(model)
    want = _logits(spec_twin(copy.deepcopy(model)))
    # the checkpoint is bf16, so activations (and each layer's output) are bf16
    assert (got - want).abs().max() <= max_abs_tolerance(want, torch.bfloat16)


def test_quantizes_layer_by_layer(dense_dirs, monkeypatch):
    """When a weight is quantized, no other linear holds full-precision weights: each one is
    either not loaded yet (meta) or already 4-bit, so peak memory is the 4-bit model plus one
    layer in full precision."""
    seen = []
    original = hf_quantizer._Quantize.convert

    def spy(self, input_dict, full_layer_name=None, model=None, **kwargs):
        dense = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)
                 and m.weight.device.type != "meta" and not m.weight.bnb_quantized]
        seen.append((full_layer_name, dense))
        return original(self, input_dict, full_layer_name=full_layer_name, model=model, **kwargs)
    monkeypatch.setattr(hf_quantizer._Quantize, "convert", spy)
    _load_nf4lora(dense_dirs["llama"], bnb_4bit_quant_type="nf4")
    assert len(seen) == 14 and all(not dense for _, dense in seen)


def test_fp32_and_fp16_checkpoints_quantize_their_own_dtype(tmp_path):
    for dtype in (torch.float32, torch.float16):
        path = tmp_path / str(dtype)
        _llama().to(dtype).save_pretrained(path)
        model = _load_nf4lora(path, bnb_4bit_quant_type="nf4")
        theirs = _load_bnb(path, bnb_4bit_quant_type="nf4")
        dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        _assert_quantized_like_bitsandbytes(model, theirs, dense, {"bnb_4bit_quant_type": "nf4"})
        assert model.model.layers[0].self_attn.q_proj.weight.quant_state.dtype == dtype


# -- pre-quantized checkpoints and save_pretrained ---------------------------------------------

@pytest.mark.parametrize("name", ["llama-tied", "gpt2"])
def test_save_pretrained_roundtrips_through_bitsandbytes(dense_dirs, name, tmp_path):
    """nf4lora model -> save_pretrained (sharded) -> plain transformers + bitsandbytes ->
    save_pretrained -> nf4lora: the same keys and bytes at every step."""
    settings = SETTINGS["nf4-double-fp32"]
    model = _load_nf4lora(dense_dirs[name], **settings)
    assert _linear_names(model) - {n for n, m in model.named_modules() if isinstance(m, Linear4bit)} \
        == {"lm_head"}
    # quantized as bitsandbytes quantizes (GPT-2: Conv1D weights transposed first)
    _assert_quantized_like_bitsandbytes(model, _load_bnb(dense_dirs[name], **settings),
                                        _dense(name, dense_dirs), settings)
    out = tmp_path / "nf4lora"
    _quiet(model.save_pretrained, out, max_shard_size="40KB")
    assert os.path.isfile(out / "model.safetensors.index.json")      # sharded
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes" and saved["load_in_4bit"]
    assert saved["bnb_4bit_quant_type"] == "nf4" and saved["bnb_4bit_use_double_quant"]

    theirs = _load_bnb(out)                        # no quantization_config: the folder's
    assert isinstance(theirs.lm_head, torch.nn.Linear) and not isinstance(theirs.lm_head, bnb.nn.Linear4bit)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in theirs.modules())
    _assert_same_state(model, theirs)              # loaded as saved: byte for byte
    if name == "llama-tied":
        assert theirs.lm_head.weight is theirs.model.embed_tokens.weight

    back = _quiet(nf4lora.from_pretrained, out)   # the same folder, with nf4lora's kernels
    assert all(not isinstance(m, bnb.nn.Linear4bit) for m in back.modules())
    _assert_same_state(back, theirs)
    assert back.is_loaded_in_4bit and isinstance(back.hf_quantizer, NF4LoraQuantizer)
    if name == "llama-tied":
        assert back.lm_head.weight is back.model.embed_tokens.weight

    # a pre-quantized nf4lora model saves again, to the same folder contents. (transformers
    # 5.25 cannot save a bitsandbytes model it loaded pre-quantized: its deserialize op has
    # no reverse, so that direction is not tested here.) Saved before any forward: the first
    # forward casts biases to the compute dtype, as bitsandbytes' Linear4bit does.
    again = tmp_path / "again"
    _quiet(back.save_pretrained, again)
    saved, resaved = _file_tensors(out), _file_tensors(again)
    assert resaved.keys() == saved.keys()
    assert all(torch.equal(_bytes(t), _bytes(saved[k])) for k, t in resaved.items())
    _assert_same_state(_load_bnb(again), theirs)

    ids = _ids(model.config.vocab_size)
    assert torch.equal(_logits(back, ids), _logits(model, ids))


def _file_tensors(path):
    from safetensors.torch import load_file
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def test_prequantized_checkpoint_is_not_requantized(dense_dirs, tmp_path, monkeypatch):
    theirs = _load_bnb(dense_dirs["llama"], **SETTINGS["fp4-bf16"])
    _quiet(theirs.save_pretrained, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("re-quantized a pre-quantized checkpoint")
    monkeypatch.setattr(nf4lora.functional, "quantize_4bit", refuse)
    model = _quiet(nf4lora.from_pretrained, tmp_path)
    _assert_same_state(model, theirs)
    assert model.model.layers[1].mlp.up_proj.compute_dtype == torch.bfloat16
    assert not model.hf_quantizer.quantization_config.bnb_4bit_use_double_quant


# -- generation --------------------------------------------------------------------------------

def test_generate_matches_a_model_with_the_same_float_weights(dense_dirs):
    model = _load_nf4lora(dense_dirs["llama"], **SETTINGS["nf4-double-fp32"])
    twin = spec_twin(copy.deepcopy(model))
    prompt = _ids()[:1]
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    tokens = _quiet(model.generate, prompt, **kwargs)
    assert tokens.shape == (1, prompt.shape[1] + 16)
    assert torch.equal(tokens, _quiet(twin.generate, prompt, **kwargs))
    # the KV cache changes nothing
    assert torch.equal(tokens, _quiet(model.generate, prompt, use_cache=False, **kwargs))
    # sampling: the same seed, the same tokens
    sample = dict(kwargs, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(1)
    a = _quiet(model.generate, prompt, **sample)
    torch.manual_seed(1)
    b = _quiet(twin.generate, prompt, **sample)
    assert torch.equal(a, b)


# -- PEFT and Trainer --------------------------------------------------------------------------

def test_peft_and_trainer_steps(dense_dirs, tmp_path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nf4lora.integrations.peft as nf4peft

    model = _load_nf4lora(dense_dirs["llama"], **SETTINGS["nf4-double-fp32"])
    packed = {n: _bytes(m.weight).clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    model = nf4peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       lora_dropout=0.0, init_lora_weights=False))
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, nf4peft.LoraLinear4bitPeft)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)

    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    _quiet(trainer.train)
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n].detach()) for n in before)
    for name, layer in model.named_modules():
        if isinstance(layer, Linear4bit):
            key = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            assert torch.equal(_bytes(layer.weight), packed[key]), name   # the 4-bit weights never move


# -- errors ------------------------------------------------------------------------------------

def test_config_errors():
    with pytest.raises(ValueError, match="8-bit"):
        NF4LoraConfig(load_in_8bit=True)
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        NF4LoraConfig(bnb_4bit_quant_type="int4")
    with pytest.raises(ValueError, match="not a torch dtype"):
        NF4LoraConfig(bnb_4bit_compute_dtype="float17")
    config = NF4LoraConfig(bnb_4bit_quant_type="nf4", modules_to_not_convert=["lm_head", "down_proj"])
    assert config.llm_int8_skip_modules == ["lm_head", "down_proj"] and config.quant_method == "nf4lora"
    # the defaults are BitsAndBytesConfig's
    default, theirs = NF4LoraConfig(), transformers.BitsAndBytesConfig(load_in_4bit=True)
    assert default.to_dict() == theirs.to_dict()
    assert NF4LoraConfig.from_dict(theirs.to_dict()).to_dict() == theirs.to_dict()


def test_no_linear_to_convert_is_an_error(dense_dirs):
    with pytest.raises(ValueError, match="no nn.Linear/Conv1D layer to quantize"):
        _load_nf4lora(dense_dirs["llama"], llm_int8_skip_modules=["model", "lm_head"])


def test_only_skipped_modules_stay_dense(dense_dirs):
    model = _load_nf4lora(dense_dirs["llama"], bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head", "down_proj"])
    dense = _linear_names(model) - {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert dense == {"lm_head"} | {f"model.layers.{i}.mlp.{p}" for i in range(2)
                                   for p in ("down_proj",)}


def _broken_copy(src, dst, key, value):
    from safetensors.torch import load_file, save_file
    os.makedirs(dst)
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(src, name))
            if key in tensors:
                tensors[key] = value(tensors[key])
            save_file(tensors, os.path.join(dst, name), metadata={"format": "pt"})
        else:
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())


def test_malformed_prequantized_tensors_name_the_layer_and_key(dense_dirs, tmp_path):
    good = tmp_path / "good"
    _quiet(_load_bnb(dense_dirs["llama"], **SETTINGS["nf4-double-fp32"]).save_pretrained, good)
    layer = "model.layers.0.self_attn.q_proj"
    cases = {
        "absmax": (f"{layer}.weight.absmax", lambda t: t[:-1].clone(), "absmax"),
        "packed": (f"{layer}.weight", lambda t: t[:-2].clone(), rf"{layer}\.weight"),
        "quant_map": (f"{layer}.weight.quant_map", lambda t: t * 2, "quant_map"),
    }
    for case, (key, change, match) in cases.items():
        bad = tmp_path / case
        _broken_copy(good, bad, key, change)
        with pytest.raises(ValueError, match=match) as info:
            _quiet(nf4lora.from_pretrained, bad)
        assert layer in str(info.value), case


# -- import ------------------------------------------------------------------------------------

def test_import_is_quiet_and_lazy_and_works_without_transformers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    code = ("import sys, nf4lora; assert 'transformers.quantizers' not in sys.modules; "
            "c = nf4lora.NF4LoraConfig(bnb_4bit_quant_type='nf4'); "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m; "
            "assert m['nf4lora'] is nf4lora.NF4LoraQuantizer")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
    # transformers missing: import nf4lora works; the config says what is missing
    code = ("import sys; sys.modules['transformers'] = None; import nf4lora\n"
            "try:\n    nf4lora.NF4LoraConfig\nexcept ImportError as e:\n    print('ImportError')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ImportError", result.stderr
