"""`nf4lora memory` (nf4lora/memory.py): parameter counts against real modules, the 4-bit
bytes against real quantization, the activation trace against a real training step, each
option moving the plan the right way, bad input, the command's table and JSON, and
--measure's estimate within 15% of a measured run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import nf4lora  # noqa: E402
from nf4lora import cli, memory  # noqa: E402
from nf4lora.nn import Linear4bit  # noqa: E402

# Small enough for a CPU test, large enough that the model is more than the process's noise.
SMALL = dict(batch_size=1, seq_len=128)
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_plan():
    return memory.estimate_memory("tiny-llama", **SMALL)


def row(plan, section, prefix):
    matches = [r for r in plan.section(section) if r.item.startswith(prefix)]
    assert len(matches) == 1, (prefix, [r.item for r in plan.section(section)])
    return matches[0]


def real_qlora_model(config, rank, targets):
    """The model a user builds by hand with transformers and nf4lora's public API."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_total = sum(p.numel() for p in model.parameters())
    n_embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    nf4lora.replace_linear(model, quant_type="nf4", compute_dtype=torch.bfloat16, progress=False)
    nf4lora.add_lora(model, r=rank, lora_alpha=2 * rank, target_modules=targets)
    return model, n_total, n_embedding


# --------------------------------------------------------------------------------------
# Counts and bytes against the real thing
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["tiny-llama", "gpt2"])
def test_counts_equal_the_real_modules(source):
    """Each kind's count is the numel of the real module's parameters: a Llama, and a GPT-2
    (transformers' Conv1D layers, lm_head tied to the embedding, biases)."""
    config = (memory.load_config(source) if source == "tiny-llama" else
              transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=512,
                                      n_positions=256, bos_token_id=0, eos_token_id=0))
    targets = ["q_proj", "v_proj"] if source == "tiny-llama" else ["c_attn"]
    plan = memory.estimate_memory(config, lora_rank=8, lora_targets=targets, **SMALL)
    model, n_total, n_embedding = real_qlora_model(config, 8, targets)

    counts = plan.parameters
    assert plan.model["parameters"] == n_total
    assert sum(v for k, v in counts.items() if k != memory.KINDS["lora"]) == n_total
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert counts[memory.KINDS["quantized_linear"]] == sum(math.prod(m.weight.quant_state.shape)
                                                           for m in quantized)
    assert counts[memory.KINDS["linear_bias"]] == sum(m.bias.numel() for m in quantized
                                                      if m.bias is not None)
    assert counts[memory.KINDS["embedding"]] == n_embedding
    assert counts[memory.KINDS["lora"]] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if source == "gpt2":      # tied: the output layer is the embedding, counted once
        assert counts[memory.KINDS["unquantized_linear"]] == 0
    else:
        assert counts[memory.KINDS["unquantized_linear"]] == model.lm_head.weight.numel()


def test_4bit_bytes_equal_real_quantization(tiny_plan):
    """The meta model's quant states have the real states' tensors, sizes and dtypes (an
    odd shape too), so the weights line is the bytes a real quantized model holds."""
    def layout(state):
        return sorted((name, str(t.dtype), tuple(t.shape)) for name, t in vars(state).items()
                      if isinstance(t, torch.Tensor)) + (layout(state.state2) if state.state2 else [])

    for double_quant in (True, False):
        template = nf4lora.functional.quantize_4bit(torch.ones(64, dtype=torch.bfloat16),
                                                    compress_statistics=double_quant, quant_type="nf4")[1]
        for shape in [(300, 70), (688, 256)]:
            real_packed, real = nf4lora.functional.quantize_4bit(
                torch.randn(shape, dtype=torch.bfloat16), compress_statistics=double_quant,
                quant_type="nf4")
            fake = memory._meta_state(template, torch.Size(shape), math.ceil(math.prod(shape) / 64))
            assert layout(fake) == layout(real)
            assert real_packed.shape == (math.ceil(math.prod(shape) / 2), 1)

    model, _, _ = real_qlora_model(memory.load_config("tiny-llama"), 16, LLAMA_LINEARS)
    real_bytes = sum(m.weight.untyped_storage().nbytes() + sum(
        t.untyped_storage().nbytes() for t in memory._state_tensors(m.weight.quant_state))
        for m in model.modules() if isinstance(m, Linear4bit))
    assert row(tiny_plan, "training", "linear weights that get quantized").bytes == real_bytes


def test_bits_per_weight():
    assert memory.bits_per_weight(64, True) == pytest.approx(4.127, abs=5e-4)
    assert memory.bits_per_weight(64, False) == 4.5
    assert memory.bits_per_weight(128, True) == 4 + 8 / 128 + 32 / (128 * 256)
    assert memory.bits_per_weight(256, False) == 4 + 32 / 256


@pytest.mark.parametrize("double_quant", [True, False])
def test_weights_line_is_the_bits_per_weight_formula(double_quant):
    """N x bits / 8, plus per layer only the code tables, offset and rounding (< 1.2 KB)."""
    plan = memory.estimate_memory("tiny-llama", double_quant=double_quant, **SMALL)
    line = row(plan, "training", "linear weights that get quantized")
    n, layers = line.inputs["N"], line.inputs["layers"]
    assert line.inputs["bits_per_weight"] == memory.bits_per_weight(64, double_quant)
    extra = line.bytes - n * memory.bits_per_weight(64, double_quant) / 8
    assert 0 <= extra <= layers * 1200


def test_trace_equals_a_real_training_step():
    """The fake-tensor trace counts what a real CPU step allocates, to the byte: the same
    live-bytes counter run over the real forward + backward gives the same peak and the
    same bytes kept after forward, with and without gradient checkpointing."""
    config = memory.load_config("tiny-llama")
    for checkpointing in (False, True):
        options = memory.PlanOptions(dtype="float32", gradient_checkpointing=checkpointing,
                                     batch_size=1, seq_len=64)
        meta = memory._build_model(config, options, "meta")
        memory._quantize_on_meta(meta, options.blocksize)
        traced = memory._trace_training_step(meta, options.batch_size, options.seq_len)

        real = memory._build_model(config, options, "cpu")
        held = list(real.parameters()) + list(real.buffers()) + [
            t for m in real.modules() if isinstance(m, Linear4bit)
            for t in memory._state_tensors(m.weight.quant_state)]
        counter = memory._LiveBytes(held)
        with counter:           # the batch is held through the step, as a training loop does
            input_ids = torch.randint(config.vocab_size, (1, options.seq_len))
            loss = memory._training_loss(real, input_ids)
            after_forward = counter.live
            loss.backward()
            del loss, input_ids
        assert traced["after_forward"] == after_forward, checkpointing
        assert traced["peak"] == counter.peak, checkpointing


# --------------------------------------------------------------------------------------
# Each option moves the plan the right way
# --------------------------------------------------------------------------------------

def total(plan, section="training"):
    return plan.total(section)


def test_quantization_options_shrink_the_weights(tiny_plan):
    dense = memory.estimate_memory("tiny-llama", quant="none", **SMALL)
    single = memory.estimate_memory("tiny-llama", double_quant=False, **SMALL)
    bigger_blocks = memory.estimate_memory("tiny-llama", blocksize=256, **SMALL)
    weights = "linear weights that get quantized"
    nf4 = row(tiny_plan, "inference", weights).bytes
    assert row(dense, "inference", weights).bytes == 2 * row(dense, "inference", weights).inputs["N"]
    assert nf4 < row(single, "inference", weights).bytes < row(dense, "inference", weights).bytes
    assert row(bigger_blocks, "inference", weights).bytes < nf4
    for section in ("inference", "training"):
        assert total(tiny_plan, section) < total(dense, section)


def test_lora_options(tiny_plan):
    bigger = memory.estimate_memory("tiny-llama", lora_rank=32, **SMALL)
    fewer = memory.estimate_memory("tiny-llama", lora_targets=["q_proj", "v_proj"], **SMALL)
    for prefix in ("LoRA adapters", "LoRA gradients", "optimizer state"):
        assert row(fewer, "training", prefix).bytes < row(tiny_plan, "training", prefix).bytes \
            < row(bigger, "training", prefix).bytes
    n = row(tiny_plan, "training", "LoRA adapters").inputs["N"]
    assert row(bigger, "training", "LoRA adapters").inputs["N"] == 2 * n   # r x (in + out)
    assert total(fewer) < total(tiny_plan) < total(bigger)
    assert total(bigger, "inference") == total(tiny_plan, "inference")


def test_optimizers(tiny_plan):
    state = {name: row(memory.estimate_memory("tiny-llama", optimizer=name, **SMALL), "training",
                       "optimizer state").bytes for name in ("adamw8bit", "sgd")}
    adamw = row(tiny_plan, "training", "optimizer state")
    assert adamw.bytes == 8 * adamw.inputs["N"]
    assert 0 == state["sgd"] < state["adamw8bit"] < adamw.bytes
    # bitsandbytes keeps tensors under 4096 elements in float32
    assert memory.optimizer_state_bytes("adamw8bit", [4095]) == 8 * 4095
    assert memory.optimizer_state_bytes("adamw8bit", [4096]) == 2 * 4096 + 8 * 16


def test_batch_sequence_dtype_and_checkpointing(tiny_plan):
    activations = "activations"
    base = row(tiny_plan, "training", activations).bytes
    longer = memory.estimate_memory("tiny-llama", batch_size=1, seq_len=256)
    wider = memory.estimate_memory("tiny-llama", batch_size=2, seq_len=128)
    float32 = memory.estimate_memory("tiny-llama", dtype="float32", **SMALL)
    checkpointed = memory.estimate_memory("tiny-llama", gradient_checkpointing=True, **SMALL)
    for plan in (longer, wider, float32):
        assert row(plan, "training", activations).bytes > base
        assert total(plan) > total(tiny_plan)
    assert row(checkpointed, "training", activations).bytes < base
    assert row(checkpointed, "training", activations).inputs["kept_after_forward_bytes"] < \
        row(tiny_plan, "training", activations).inputs["kept_after_forward_bytes"]
    kv = row(tiny_plan, "inference", "KV cache").bytes
    layers, kv_heads, head_dim = 4, 4, 32                   # tiny-llama
    assert kv == 2 * layers * 1 * 128 * kv_heads * head_dim * 2
    assert row(longer, "inference", "KV cache").bytes == 2 * kv
    assert row(wider, "inference", "KV cache").bytes == 2 * kv
    assert row(float32, "inference", "KV cache").bytes == 2 * kv
    assert total(checkpointed, "inference") == total(tiny_plan, "inference")


def test_plan_json_and_totals(tiny_plan):
    payload = json.loads(json.dumps(tiny_plan.to_json()))
    for section in ("inference", "training"):
        rows = payload[section]["rows"]
        assert payload[section]["total_bytes"] == sum(r["bytes"] for r in rows)
        assert all(r["formula"] for r in rows)
    inference = payload["inference"]["rows"]
    weights = sum(r["bytes"] for r in inference if "rule of thumb" not in r["item"]
                  and "KV cache" not in r["item"])
    overhead = next(r for r in inference if "rule of thumb" in r["item"])
    assert overhead["bytes"] == round(0.2 * weights)          # the x 1.2 rule
    assert payload["options"]["lora_targets"] == memory.ALL_LINEAR


def test_encoder_folder_has_no_kv_cache(tmp_path):
    """A BERT config folder (an encoder: its own class, a stand-in loss, no KV cache)."""
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=300)
    config.architectures = ["BertModel"]
    config.save_pretrained(tmp_path)
    plan = memory.estimate_memory(tmp_path, seq_len=32)
    assert plan.model["cls"] == "BertModel"
    assert any("takes no labels" in line for line in plan.assumptions)
    assert row(plan, "inference", "KV cache").bytes == 0
    assert row(plan, "training", "activations").bytes > 0


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------

def test_bad_config_sources(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        memory.load_config(tmp_path)
    not_json = tmp_path / "config.txt"
    not_json.write_text("hidden_size: 64\n")
    with pytest.raises(ValueError, match="not a JSON file"):
        memory.load_config(not_json)
    no_type = tmp_path / "no_type.json"
    no_type.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="model_type"):
        memory.load_config(no_type)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ValueError, match="no-such-model"):
        memory.load_config(unknown)
    with pytest.raises(ValueError, match="neither a preset"):
        memory.load_config("llama-9000b")
    with pytest.raises(TypeError, match="preset name"):
        memory.load_config(42)


@pytest.mark.parametrize("options,message", [
    (dict(optimizer="adam9"), "optimizer must be one of"),
    (dict(lora_rank=0), "lora_rank must be a positive integer"),
    (dict(lora_rank=-4), "lora_rank must be a positive integer"),
    (dict(lora_rank=2.5), "lora_rank must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(seq_len=-1), "seq_len must be a positive integer"),
    (dict(quant="int3"), "quant must be one of"),
    (dict(blocksize=100), "blocksize must be one of"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(lora_targets=[]), "lora_targets must be"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        memory.PlanOptions(**options)


def test_lora_target_that_matches_nothing():
    with pytest.raises(ValueError, match="matches no Linear4bit layer"):
        memory.estimate_memory("tiny-llama", lora_targets=["query"], **SMALL)


def test_measure_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="quant nf4 or fp4"):
        memory.measure_training("tiny-llama", quant="none")
    with pytest.raises(ValueError, match="blocksize 64"):
        memory.measure_training("tiny-llama", blocksize=128)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        memory.measure_training("tiny-llama", steps=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            memory.measure_training("tiny-llama", device="cuda")


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    assert cli.main(["memory", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "without config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["memory", "tiny-llama", "--optimizer", "adam9"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'adam9'" in capsys.readouterr().err
    assert cli.main(["memory", "tiny-llama", "--lora-rank", "0", "--out", str(tmp_path)]) == 2
    assert "lora_rank must be a positive integer" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------

def test_cli_prints_tables_and_writes_json(tmp_path, capsys):
    assert cli.main(["memory", "tiny-llama", "--seq-len", "128", "--lora-targets", "q_proj,v_proj",
                     "--gradient-checkpointing", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in ("LlamaForCausalLM (tiny-llama)", "inference", "training", "KV cache",
                 "optimizer state (adamw)", "LoRA r=16 on q_proj,v_proj", "N x 4.127 bits",
                 "gradient_checkpointing=on", "total"):
        assert text in out, text
    payload = json.loads((tmp_path / "memory-plan-latest.json").read_text())
    plan = payload["plan"]
    assert plan["options"]["lora_targets"] == ["q_proj", "v_proj"]
    assert plan["options"]["gradient_checkpointing"] is True
    assert plan["training"]["total_bytes"] == sum(r["bytes"] for r in plan["training"]["rows"])
    assert all("inputs" in r and "formula" in r for r in plan["training"]["rows"])
    assert payload["measured"] is None and payload["metadata"]["cpu"]
    assert f"{plan['training']['total_bytes'] / 2**20:.2f}" in out


def test_cli_help_lists_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["memory", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in memory.PRESETS)


def test_measure_is_within_15_percent(tmp_path, capsys):
    """The shipped example: tiny-llama, float32 (fast on any CPU), 2 x 256 tokens, two
    steps in a fresh process; the estimate must be within 15% of the measured peak."""
    argv = ["memory", "tiny-llama", "--dtype", "float32", "--batch-size", "2", "--seq-len", "256",
            "--measure", "--steps", "2", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    comparison = json.loads((tmp_path / "memory-plan-latest.json").read_text())["comparison"]
    assert comparison["within_tolerance"], comparison
    assert abs(comparison["ratio"] - 1) <= memory.MEASURE_TOLERANCE
    assert comparison["measured_bytes"] > 50 * 2**20         # not a trivial run
    assert f"estimate / measured = {comparison['ratio']:.3f}, within 15%" in out
