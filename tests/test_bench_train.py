"""Smoke tests of the QLoRA training-step benchmark: a --quick run (tiny Llama, one thread)
writes the JSON with the rows and keys it promises, the providers agree on step 1, and a
provider that cannot be imported becomes a note, not a crash.

No timing is asserted anywhere (shared/perf.md): the machines are shared and noisy.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# bench/ is a directory of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import rows_by_provider, run_quick_bench, saved_bench_payload  # noqa: E402
from bench import bench_train  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROW_KEYS = {"provider", "how", "base_layers", "batch", "seq", "tokens", "warmup", "steps",
            "median_s", "p20_s", "p80_s", "min_s", "step_s", "tokens_per_s", "trainable_params",
            "losses", "loss_first", "loss_last", "check",
            "x_vs_bitsandbytes+peft", "x_vs_dense-bf16+peft"}
METADATA_KEYS = {"timestamp", "cpu", "threads", "versions", "versions_extra", "nf4lora", "git_sha",
                 "load_average"}
QUICK = ["--quick", "--threads", "1", "--no-probe"]


def run(tmp_path, monkeypatch, *extra):
    return run_quick_bench(bench_train.main, QUICK + list(extra), tmp_path, monkeypatch)


def test_quick_run_writes_every_row_and_key(tmp_path, monkeypatch):
    saved = saved_bench_payload(tmp_path, "train", run(tmp_path, monkeypatch))
    assert METADATA_KEYS <= saved["metadata"].keys()
    assert {"model", "why_this_size", "batch", "seq", "lora", "quantization", "optimizer",
            "tolerance"} <= saved["config"].keys()
    assert saved["target"] is None                 # --quick numbers mean nothing

    rows = rows_by_provider(saved, {"nf4lora", "nf4lora+peft", "dense-bf16+peft"}, "bitsandbytes+peft")
    quick = bench_train.QUICK
    for row in rows.values():
        assert ROW_KEYS <= row.keys()
        assert row["tokens"] == quick["batch"] * quick["seq"]
        assert row["steps"] == len(row["step_s"]) == quick["steps"]
        assert len(row["losses"]) == quick["warmup"] + quick["steps"]
        assert row["median_s"] > 0 and row["tokens_per_s"] > 0
        # same model, data and adapters: every provider agrees on step 1
        assert row["check"] == "ok", row["check"]
        assert row["trainable_params"] == rows["dense-bf16+peft"]["trainable_params"]
    assert rows["dense-bf16+peft"]["x_vs_dense-bf16+peft"] == pytest.approx(1.0)
    # what each provider really runs on
    assert "nf4lora.Linear4bit" in rows["nf4lora"]["base_layers"]
    assert "nf4lora.Linear4bit" in rows["nf4lora+peft"]["base_layers"]
    # nf4lora's rows are held to the spec on the same codes (tight), bitsandbytes' is not:
    # its CPU kernels' results depend on the CPU (bench_train's docstring)
    for name in ("nf4lora", "nf4lora+peft"):
        for key, limit in bench_train.TOLERANCE_SAME_CODES.items():
            value = rows[name]["d_loss_vs_spec" if key == "loss" else f"{key}_vs_spec"]
            assert abs(value) <= limit, (name, key, value)
    if "bitsandbytes+peft" in rows:
        assert "bitsandbytes.Linear4bit" in rows["bitsandbytes+peft"]["base_layers"]
        assert "d_loss_vs_spec" in rows["bitsandbytes+peft"]      # shown, not judged


def test_missing_provider_is_a_note_not_a_crash(tmp_path, monkeypatch, hide_optional_imports):
    hide_optional_imports("bitsandbytes")
    payload = run(tmp_path, monkeypatch, "--providers", "bitsandbytes+peft", "dense-bf16+peft")
    assert any(note.startswith("bitsandbytes+peft: skipped") for note in payload["notes"])
    assert [row["provider"] for row in payload["rows"]] == ["dense-bf16+peft"]
    assert payload["rows"][0]["x_vs_bitsandbytes+peft"] is None


def test_a_broken_provider_is_flagged(tmp_path, monkeypatch):
    """A 4-bit provider whose adapter path is wrong (scaling dropped) fails the step-1 check
    and posts no ratio."""
    real_build = bench_train.build_nf4lora

    def broken(model, mods):
        model = real_build(model, mods)
        for module in model.modules():
            if isinstance(module, mods["nf4lora"].nn.LoraLinear4bit):
                module.scaling = 0.0
        return model

    monkeypatch.setattr(bench_train, "build_nf4lora", broken)
    payload = run(tmp_path, monkeypatch, "--providers", "nf4lora", "dense-bf16+peft")
    rows = {row["provider"]: row for row in payload["rows"]}
    assert rows["nf4lora"]["check"].startswith("FAILED")
    assert rows["nf4lora"]["x_vs_dense-bf16+peft"] is None
    assert rows["dense-bf16+peft"]["check"] == "ok"


def test_adapter_names_map_across_integrations():
    key = ("model.layers.0.self_attn.q_proj", "A")
    assert bench_train.adapter_key("model.layers.0.self_attn.q_proj.lora_A.weight") == key
    assert bench_train.adapter_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == key
    assert bench_train.adapter_key("model.layers.0.self_attn.q_proj.base_layer.weight") is None
