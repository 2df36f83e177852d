"""Smoke tests of the decode benchmark (bench/bench_decode.py, `nf4lora bench decode`): a --quick
run (tiny Llama, batch 1, one thread) writes the JSON with the rows and keys it promises, nf4lora
agrees with the spec's logits and records its CPU path, a provider that cannot be imported
becomes a note, and a wrong kernel fails the check and posts no ratio.

No timing is asserted anywhere (shared/perf.md): the machines are shared and noisy.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

# bench/ is a directory of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import rows_by_provider, run_quick_bench, saved_bench_payload  # noqa: E402
from bench import bench_decode  # noqa: E402
from nf4lora import backends, cli  # noqa: E402

pytest.importorskip("transformers")

ROW_KEYS = {"provider", "how", "batch", "prompt", "new_tokens", "warmup", "steps", "build_s",
            "prefill_s", "prefill_first_call_s", "step_ms", "median_ms", "p20_ms", "p80_ms", "min_ms",
            "tokens_per_s", "weight_bytes", "weight_mb", "weight_bytes_per_token", "weight_gbs",
            "pct_read_bw", "ideal_ms", "kv_bytes_per_step", "layers", "path", "check",
            "x_vs_dense-bf16", "x_vs_bitsandbytes", "load_1min", "cpu_share"}
CHECK_KEYS = {"logits0_err", "logits0_tol", "logits0_floor", "logits0_err_vs_spec_bf16",
              "logits1_rows", "logits1_err", "logits1_tol", "agree_tokens", "agree_tokens_per_row"}
METADATA_KEYS = {"timestamp", "cpu", "cpu_model", "threads", "versions", "versions_extra", "nf4lora",
                 "git_sha", "load_average"}
QUICK = ["--quick", "--threads", "1"]


def run(tmp_path, monkeypatch, *extra):
    return run_quick_bench(bench_decode.main, QUICK + list(extra), tmp_path, monkeypatch)


def test_quick_run_writes_every_row_and_key(tmp_path, monkeypatch):
    saved = saved_bench_payload(tmp_path, "decode", run(tmp_path, monkeypatch))
    assert METADATA_KEYS <= saved["metadata"].keys()
    assert {"start", "end", "high", "cpus"} <= saved["metadata"]["load_average"].keys()
    assert saved["metadata"]["cpu_model"]
    assert {"read_gbs", "copy_gbs", "threads"} <= saved["bandwidth"].keys()
    assert {"model", "why_this_size", "batches", "prompt", "new_tokens", "quantization",
            "check"} <= saved["config"].keys()
    assert saved["config"]["model"]["hidden_size"] == 256
    assert saved["config"]["batches"] == [1]
    assert saved["target"] is None                 # --quick numbers mean nothing

    rows = rows_by_provider(saved, {"nf4lora", "dense-bf16"}, "bitsandbytes")
    quick = bench_decode.QUICK
    for row in rows.values():
        assert (ROW_KEYS | CHECK_KEYS) <= row.keys(), row["provider"]
        assert row["batch"] == 1
        assert row["new_tokens"] == 1 + quick["warmup"] + quick["steps"]
        assert len(row["step_ms"]) == quick["warmup"] + quick["steps"]
        assert row["steps"] == quick["steps"]
        assert row["median_ms"] > 0 and row["tokens_per_s"] > 0 and row["prefill_s"] > 0
        assert row["weight_bytes"]["total"] == sum(v for k, v in row["weight_bytes"].items() if k != "total")
        assert 0 <= row["agree_tokens"] <= row["new_tokens"]
    assert rows["dense-bf16"]["x_vs_dense-bf16"] == pytest.approx(1.0)

    # what each provider really runs on, and the bytes it reads: ~0.52 byte per 4-bit weight
    nf4 = rows["nf4lora"]
    assert nf4["layers"] == {"nf4lora.Linear4bit": 14, "torch.Linear": 1}     # lm_head stays dense
    assert nf4["weight_bytes"]["linear_4bit"] * 4 == rows["dense-bf16"]["weight_bytes"]["linear_dense"] \
        - nf4["weight_bytes"]["linear_dense"]
    assert nf4["weight_mb"] < 0.5 * rows["dense-bf16"]["weight_mb"]
    # nf4lora agrees with the spec within bf16 rounding, on the prefill and the first decode step
    assert nf4["check"] == "ok", nf4["check"]
    assert nf4["logits0_err"] <= nf4["logits0_tol"]
    assert nf4["logits1_err"] is None or nf4["logits1_err"] <= nf4["logits1_tol"]
    # ... while dense bf16 (no quantization) is NF4's error away: the check can tell
    assert rows["dense-bf16"]["logits0_err"] > rows["dense-bf16"]["logits0_tol"]
    assert rows["dense-bf16"]["check"] == "shown, not judged"
    path = nf4["nf4lora_path"]
    if backends.availability("cpu") is None:
        from nf4lora import _C
        assert path["backend"] == "cpu" and path["isa"] == _C.isa()
        assert path["decode"] == {"fused (M=1)": 14} and path["decode_fused"] == "14/14"
        assert path["prefill"] == {f"fused (M={quick['prompt']})": 14}
    if "bitsandbytes" in rows:
        assert rows["bitsandbytes"]["layers"]["bitsandbytes.Linear4bit"] == 14
        assert rows["bitsandbytes"]["bitsandbytes_path"]["layers"] == 14


def test_missing_provider_is_a_note_not_a_crash(tmp_path, monkeypatch, hide_optional_imports):
    hide_optional_imports("bitsandbytes")
    payload = run(tmp_path, monkeypatch, "--providers", "bitsandbytes", "dense-bf16", "--no-check")
    assert any(note.startswith("bitsandbytes: skipped") for note in payload["notes"])
    assert [row["provider"] for row in payload["rows"]] == ["dense-bf16"]
    assert payload["rows"][0]["x_vs_bitsandbytes"] is None
    assert payload["rows"][0]["check"] == "not checked"
    assert (tmp_path / "decode-latest.json").exists()


def test_a_wrong_kernel_fails_the_check(tmp_path, monkeypatch):
    """nf4lora's matmul 3% off (every 4-bit layer): its logits leave the bf16 tolerance, the
    row is FAILED and posts no ratio."""
    from nf4lora import _ops
    real = _ops.call_lora_matmul_4bit

    def off(*args, **kwargs):
        y, h = real(*args, **kwargs)
        return y * 1.03, h

    monkeypatch.setattr(_ops, "call_lora_matmul_4bit", off)
    payload = run(tmp_path, monkeypatch, "--providers", "nf4lora", "dense-bf16")
    rows = {row["provider"]: row for row in payload["rows"]}
    assert rows["nf4lora"]["check"].startswith("FAILED"), rows["nf4lora"]
    assert rows["nf4lora"]["x_vs_dense-bf16"] is None
    assert any("no ratios posted" in note for note in payload["notes"])


def test_cli_runs_the_decode_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "decode" in cli.BENCH_SUITES
    assert cli.main(["bench", "decode", "--quick", "--threads", "1", "--no-check",
                     "--providers", "dense-bf16", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "decode-latest.json").read_text())
    assert [row["provider"] for row in saved["rows"]] == ["dense-bf16"]


def test_agreement_counts_leading_equal_tokens():
    tokens = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [1, 6, 7, 8]])
    reference = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    assert bench_decode.agreement(tokens, reference) == [4, 1, 0]


def test_weight_bytes_count_what_a_step_reads():
    model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 4, bias=False),
                                torch.nn.LayerNorm(4)).to(torch.bfloat16)
    parts = bench_decode.weight_bytes(model, batch=3)
    assert parts["embedding_rows"] == 3 * 8 * 2          # the rows read, not the table
    assert parts["linear_dense"] == 8 * 4 * 2
    assert parts["other"] == 2 * 4 * 2                   # LayerNorm weight and bias
    assert parts["total"] == 48 + 64 + 16


def test_rounds_take_turns_and_pool_their_steps(tmp_path, monkeypatch):
    # --rounds 2: two timed generates per provider, the providers alternating; a row pools
    # the timed steps of both rounds
    order = []
    real = bench_decode.generate

    def logged(model, prompt, new_tokens, keep_logits=2):
        order.append((type(model.model.layers[0].mlp.up_proj).__name__, new_tokens))
        return real(model, prompt, new_tokens, keep_logits)

    monkeypatch.setattr(bench_decode, "generate", logged)
    saved = saved_bench_payload(tmp_path, "decode", run(tmp_path, monkeypatch, "--rounds", "2",
                                                        "--providers", "nf4lora", "dense-bf16",
                                                        "--no-check"))
    quick = bench_decode.QUICK
    timed = 1 + quick["warmup"] + quick["steps"]
    assert order == [("Linear4bit", 2), ("Linear", 2)] + [("Linear4bit", timed), ("Linear", timed)] * 2
    for row in saved["rows"]:
        assert row["rounds"] == 2 and row["steps"] == 2 * quick["steps"]
        assert len(row["step_ms"]) == 2 * (quick["warmup"] + quick["steps"])
