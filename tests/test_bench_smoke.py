"""Smoke tests of the codec benchmark: a --quick run writes the rows and keys it promises,
a missing provider becomes a note, and the correctness guard rejects a wrong kernel.

No timing is asserted anywhere (shared/perf.md): the machines are shared and noisy.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

# bench/ is a directory of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_codec, harness  # noqa: E402
from nf4lora import backends  # noqa: E402

ROW_KEYS = {"op", "shape", "dtype", "quant_type", "blocksize", "nested_blocksize", "provider",
            "mode", "layers", "footprint_bytes", "bytes", "median_ms", "p20_ms", "p80_ms",
            "min_ms", "calls", "gbs", "pct_copy_bw", "pct_read_bw", "x_vs_bitsandbytes"}
METADATA_KEYS = {"timestamp", "cpu", "threads", "versions", "nf4lora", "git_sha",
                 "bitsandbytes_path", "dequantize_inputs_from"}


def cpu_backends() -> list[str]:
    return [name for name in ("reference", "cpu") if backends.availability(name) is None]


def test_quick_run_writes_every_row_and_key(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--providers", "nf4lora", "bitsandbytes", "copy-bf16"]
    payload = bench_codec.main(argv)

    saved = json.loads((tmp_path / "codec-latest.json").read_text())
    assert len(list(tmp_path.glob("codec-2*.json"))) == 1
    assert saved["rows"] == json.loads(json.dumps(payload["rows"], default=str))
    assert METADATA_KEYS <= saved["metadata"].keys()
    assert {"read_gbs", "copy_gbs", "bytes", "threads"} <= saved["bandwidth"].keys()

    expected = {("dequantize", "copy-bf16"), ("dequantize", "copy-bf16 out=")}
    expected |= {(op, f"nf4lora[{name}]") for op in bench_codec.OPS for name in cpu_backends()}
    expected |= {("dequantize", f"nf4lora[{name}] out=") for name in cpu_backends() if name != "reference"}
    if saved["metadata"]["bitsandbytes_path"] is not None:
        expected |= {(op, "bitsandbytes") for op in bench_codec.OPS}
    for shape in bench_codec.QUICK_SHAPES:
        got = {(row["op"], row["provider"]) for row in saved["rows"] if row["shape"] == list(shape)}
        assert got == expected, f"shape {shape}"
    for row in saved["rows"]:
        assert ROW_KEYS <= row.keys()
        assert row["mode"] == "cold" and row["layers"] >= harness.MIN_LAYERS
        assert row["median_ms"] > 0 and row["bytes"] > 0


def test_missing_provider_is_a_note_not_a_crash(tmp_path, monkeypatch):
    real_import = harness.import_optional

    def fake_import(name):
        if name.startswith("bitsandbytes"):
            return None, "import bitsandbytes failed: not installed (simulated)", []
        return real_import(name)

    monkeypatch.setattr(harness, "import_optional", fake_import)
    payload = bench_codec.main(["--quick", "--ops", "dequantize", "--out", str(tmp_path),
                                "--providers", "bitsandbytes", "copy-bf16"])
    assert any("bitsandbytes: skipped" in note for note in payload["notes"])
    assert {row["provider"] for row in payload["rows"]} == {"copy-bf16", "copy-bf16 out="}
    assert all(row["x_vs_bitsandbytes"] is None for row in payload["rows"])


@pytest.mark.skipif(backends.availability("cpu") is not None, reason="nf4lora cpu backend not built")
@pytest.mark.parametrize("op", bench_codec.OPS)
def test_guard_rejects_a_wrong_kernel(op, monkeypatch):
    assert bench_codec.check_against_reference(op, "cpu") is None
    cpu = importlib.import_module("nf4lora.backends.cpu")
    if op == "dequantize":
        real = cpu.dequantize_4bit

        def off_by_one(packed, absmax, blocksize, quant_type, out, nested):
            real(packed, absmax, blocksize, quant_type, out, nested)
            out.view(-1)[-1] += 1

        monkeypatch.setattr(cpu, "dequantize_4bit", off_by_one)
    else:
        real = cpu.quantize_4bit

        def flipped_code(A, blocksize, quant_type):
            packed, absmax = real(A, blocksize, quant_type)
            packed[0] ^= 1
            return packed, absmax

        monkeypatch.setattr(cpu, "quantize_4bit", flipped_code)
    assert "differs" in bench_codec.check_against_reference(op, "cpu")


def test_table_formats_shapes_and_missing_values():
    rows = [{"shape": [4096, 11008], "ms": 1.23456, "x": None}]
    table = harness.format_table(rows, [("shape", "shape", ""), ("ms", "ms", ".2f"), ("x", "x", ".2f")])
    assert "4096x11008" in table and "1.23" in table and table.splitlines()[-1].endswith("-")


def test_layers_rotate_past_the_cold_footprint():
    assert harness.layers_for(42_000_000, harness.COLD_FOOTPRINT) * 42_000_000 > harness.COLD_FOOTPRINT
    assert harness.layers_for(10**9, harness.COLD_FOOTPRINT) == harness.MIN_LAYERS
    assert harness.layers_for(1000, harness.COLD_FOOTPRINT, max_layers=2) == 2
    assert torch.get_num_threads() >= 1


def test_memory_benchmark_quick_run(tmp_path):
    from bench import bench_memory
    payload = bench_memory.main(["--quick", "--out", str(tmp_path)])
    rows = {row["config"]: row for row in payload["rows"]}
    assert {"nf4lora QLoRA", "dense bf16 LoRA"} <= set(rows)
    # The 4-bit layer holds ~0.52 byte per weight against bf16's 2 (plus the same adapter).
    assert rows["nf4lora QLoRA"]["held_mb"] < 0.5 * rows["dense bf16 LoRA"]["held_mb"]
    assert (tmp_path / "memory-latest.json").exists()
