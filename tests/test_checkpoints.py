"""bitsandbytes-4bit checkpoints: transformers + bitsandbytes (CPU) write them, nf4lora loads them
without re-quantizing; nf4lora writes them, transformers + bitsandbytes load them.

Tiny Llama models from configs with random weights, saved to tmp dirs; nothing is downloaded.
transformers' own bitsandbytes path works on CPU with bitsandbytes >= 0.46, so the oracle
checkpoints are made exactly as users make them: from_pretrained(dense, BitsAndBytesConfig)
followed by save_pretrained. bitsandbytes is the oracle for the bytes and keys; a model it
loaded is run through `spec_twin` (tests/oracles.py), never through its CPU kernels, whose
results depend on the CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

import nf4lora
from nf4lora.integrations import checkpoints
from nf4lora.integrations.checkpoints import load_pretrained_4bit, save_pretrained_4bit
from nf4lora.nn import Linear4bit, LoraLinear4bit

from oracles import max_abs_tolerance, spec_twin

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("one_thread", "quiet_eager")


def _llama(seed=0, **overrides):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      **overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits.float()


def _bnb_config(quant_type="nf4", double_quant=True, compute_dtype=torch.float32,
                quant_storage=torch.uint8):
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    _llama().save_pretrained(path)
    return path


BNB_SETTINGS = {
    "nf4-double-fp32": dict(quant_type="nf4", double_quant=True, compute_dtype=torch.float32),
    "fp4-bf16": dict(quant_type="fp4", double_quant=False, compute_dtype=torch.bfloat16),
}


@pytest.fixture(scope="module", params=sorted(BNB_SETTINGS))
def bnb_dir(request, dense_dir, tmp_path_factory):
    """A checkpoint transformers + bitsandbytes quantized and saved: (dir, settings)."""
    with torch._dynamo.config.patch(disable=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            dense_dir, quantization_config=_bnb_config(**BNB_SETTINGS[request.param]), device_map="cpu")
        assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
        path = tmp_path_factory.mktemp("bnb-" + request.param)
        model.save_pretrained(path)
    return path, BNB_SETTINGS[request.param]


def _load_bnb(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")


def _bnb_logits(path):
    """Logits of the model transformers + bitsandbytes load from `path`, its 4-bit layers
    decoded by the spec (tests/oracles.py)."""
    model = _load_bnb(path)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    return _logits(spec_twin(model))


def _same_bytes(a, b):
    """Equal dtype, shape and bytes (torch.equal says NaN != NaN, and packed codes stored as
    bf16 can read as NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _file_tensors(path):
    from safetensors.torch import load_file
    tensors = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


# -- loading what transformers + bitsandbytes saved ----------------------------------------------

def test_load_bitsandbytes_checkpoint_without_requantizing(bnb_dir, monkeypatch):
    path, settings = bnb_dir

    def no_quantize(*args, **kwargs):
        raise AssertionError("loading a pre-quantized checkpoint must not quantize")
    monkeypatch.setattr(nf4lora.functional, "quantize_4bit", no_quantize)
    model = load_pretrained_4bit(path)
    monkeypatch.undo()

    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(PROJECTIONS) and len(layers) == 14
    assert type(model.lm_head) is torch.nn.Linear and not model.training
    for layer in layers.values():
        assert layer.weight.quant_type == settings["quant_type"]
        assert layer.weight.compress_statistics == settings["double_quant"]
        assert layer.compute_dtype == settings["compute_dtype"]
    # every saved tensor is in the model as saved: packed bytes, quant states, dense weights
    saved, ours = _file_tensors(path), model.state_dict()
    assert set(saved) == set(ours)
    for key, value in saved.items():
        assert _same_bytes(ours[key], value), key

    # same outputs as bitsandbytes' model decoded by the spec: the same bytes; in float32 the
    # matmuls agree to rounding, in bf16 to bf16 rounding of the outputs
    expected = _bnb_logits(path)
    tolerance = max_abs_tolerance(expected, settings["compute_dtype"], factor=8)
    assert (_logits(model) - expected).abs().max().item() <= tolerance


def test_dtype_casts_dense_tensors_only(bnb_dir):
    path, _ = bnb_dir
    model = load_pretrained_4bit(path, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.uint8 and q.weight.quant_state.absmax.dtype in (torch.uint8, torch.float32)
    assert torch.isfinite(_logits(model)).all()


def test_progress_bar(bnb_dir, capsys):
    load_pretrained_4bit(bnb_dir[0], progress=True)
    assert "loading" in capsys.readouterr().err
    load_pretrained_4bit(bnb_dir[0])                 # not a tty under pytest: silent
    assert "loading" not in capsys.readouterr().err


# -- saving what transformers + bitsandbytes load ------------------------------------------------

@pytest.mark.parametrize("quant_type,compress_statistics,quant_storage",
                         [("nf4", True, torch.uint8), ("fp4", False, torch.bfloat16)])
def test_save_loads_in_transformers_bitsandbytes(tmp_path, quant_type, compress_statistics,
                                                 quant_storage):
    model = nf4lora.replace_linear(_llama(), quant_type=quant_type, compute_dtype=torch.float32,
                                   compress_statistics=compress_statistics,
                                   quant_storage=quant_storage, skip_modules=("lm_head", "mlp.down_proj"),
                                   progress=False)
    save_pretrained_4bit(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"]
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"], qc["bnb_4bit_quant_storage"],
            qc["bnb_4bit_compute_dtype"]) == (quant_type, compress_statistics,
                                              str(quant_storage).removeprefix("torch."), "float32")
    # the linears left dense are listed, so transformers keeps them dense
    assert set(qc["llm_int8_skip_modules"]) == {"lm_head", "model.layers.0.mlp.down_proj",
                                                "model.layers.1.mlp.down_proj"}
    assert getattr(model.config, "quantization_config", None) is None     # caller's config untouched

    theirs = _load_bnb(tmp_path)
    assert isinstance(theirs.model.layers[1].self_attn.o_proj, bnb.nn.Linear4bit)
    assert type(theirs.model.layers[1].mlp.down_proj) is torch.nn.Linear
    ours_sd, theirs_sd = model.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for key, value in ours_sd.items():             # the same bytes, the same quant states
        assert _same_bytes(value, theirs_sd[key]), key
    torch.testing.assert_close(_logits(spec_twin(theirs)), _logits(model), rtol=1e-5, atol=1e-5)

    # and back into nf4lora
    again = load_pretrained_4bit(tmp_path)
    assert again.state_dict().keys() == ours_sd.keys()
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=0)


def test_sharded_save_and_load(tmp_path):
    model = nf4lora.replace_linear(_llama(), compute_dtype=torch.float32, progress=False)
    save_pretrained_4bit(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / checkpoints.SAFE_WEIGHTS_INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / checkpoints.SAFE_WEIGHTS_NAME).exists()
    expected = _logits(model)
    torch.testing.assert_close(_logits(load_pretrained_4bit(tmp_path)), expected, rtol=0, atol=0)
    torch.testing.assert_close(_bnb_logits(tmp_path), expected, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_round_trip(tmp_path):
    model = nf4lora.replace_linear(_llama(tie_word_embeddings=True), compute_dtype=torch.float32,
                                   progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_pretrained_4bit(model, tmp_path)
    saved = _file_tensors(tmp_path)
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved   # once
    loaded = load_pretrained_4bit(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight                # re-tied
    expected = _logits(model)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)
    torch.testing.assert_close(_bnb_logits(tmp_path), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_round_trip(tmp_path):
    """GPT-2's Conv1D stores [in, out]; bitsandbytes quantizes it as a Linear4bit [out, in].
    GPT-2 also ties lm_head to the embeddings."""
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "dense")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=_bnb_config(), device_map="cpu")
    theirs.save_pretrained(tmp_path / "bnb")
    ours = load_pretrained_4bit(tmp_path / "bnb")
    layer = ours.transformer.h[0].attn.c_attn
    assert isinstance(layer, Linear4bit) and (layer.in_features, layer.out_features) == (32, 96)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        expected = spec_twin(theirs)(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
        save_pretrained_4bit(ours, tmp_path / "ours")
        again = spec_twin(_load_bnb(tmp_path / "ours"))
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_save_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="no nf4lora Linear4bit"):
        save_pretrained_4bit(_llama(), tmp_path)
    with pytest.raises(ValueError, match="transformers models"):
        save_pretrained_4bit(torch.nn.Sequential(Linear4bit(64, 64)), tmp_path)
    model = nf4lora.add_lora(nf4lora.replace_linear(_llama(), progress=False), r=2, lora_alpha=4,
                             target_modules=["q_proj"])
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear4bit)
    with pytest.raises(ValueError, match="LoRA layers.*q_proj"):
        save_pretrained_4bit(model, tmp_path)
    # bitsandbytes cannot decode nf4lora's code books: such a model is not a bnb checkpoint
    model = nf4lora.replace_linear(_llama(), quant_type="af4", progress=False)
    with pytest.raises(ValueError, match=r"nf4 and fp4 layers only.*mlp.down_proj \(af4\)"):
        save_pretrained_4bit(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


# -- bad checkpoints -----------------------------------------------------------------------------

def _copy(src, dst, drop=(), add=None, config=None):
    """A copy of checkpoint `src` with some tensors dropped/added or config.json changed."""
    from safetensors.torch import save_file
    shutil.copytree(src, dst)
    tensors = {k: v for k, v in _file_tensors(src).items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, os.path.join(dst, checkpoints.SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("nf4")
    save_pretrained_4bit(nf4lora.replace_linear(_llama(), progress=False), path)
    return path


def test_not_a_4bit_checkpoint(dense_dir, nf4_dir, tmp_path):
    with pytest.raises(ValueError, match="no quantization_config: not a bitsandbytes 4-bit"):
        load_pretrained_4bit(dense_dir)

    def eight_bit(config):
        config["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True)
    with pytest.raises(ValueError, match="load_in_4bit=False"):
        load_pretrained_4bit(_copy(nf4_dir, tmp_path / "8bit", config=eight_bit))

    def gptq(config):
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        load_pretrained_4bit(_copy(nf4_dir, tmp_path / "gptq", config=gptq))

    # a 4-bit config over dense weights (someone copied the config)
    dense_weights = tmp_path / "mixed"
    shutil.copytree(dense_dir, dense_weights)
    shutil.copy(nf4_dir / "config.json", dense_weights / "config.json")
    with pytest.raises(ValueError, match="not a pre-quantized checkpoint"):
        load_pretrained_4bit(dense_weights)
    with pytest.raises(FileNotFoundError, match="only local"):
        load_pretrained_4bit("someone/some-model-on-the-hub")


def test_missing_and_unexpected_keys_are_listed(nf4_dir, tmp_path, monkeypatch):
    read = []
    original = checkpoints._read_tensors
    monkeypatch.setattr(checkpoints, "_read_tensors", lambda *a: read.append(1) or original(*a))
    dropped = ("model.layers.1.self_attn.k_proj.weight.absmax", "model.norm.weight",
               "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4")
    bad = _copy(nf4_dir, tmp_path / "missing", drop=dropped, add={"model.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError) as info:
        load_pretrained_4bit(bad)
    message = str(info.value)
    assert "missing keys (2)" in message and "unexpected keys (5)" in message
    # the quant state of up_proj is gone, so the checkpoint says up_proj is dense: its
    # packed weight and state entries are unexpected for a dense nn.Linear
    for key in dropped[:2] + ("model.extra.weight", "model.layers.0.mlp.up_proj.weight.absmax"):
        assert key in message
    assert not read                                  # checked before reading any tensor

    # a malformed quant state (wrong absmax size) is caught by the layer, with its name
    tensors = _file_tensors(nf4_dir)
    key = "model.layers.0.self_attn.q_proj.weight.absmax"
    broken = _copy(nf4_dir, tmp_path / "broken", add={key: tensors[key][:-1].clone()})
    with pytest.raises(RuntimeError, match="q_proj.weight.*absmax"):
        load_pretrained_4bit(broken)
