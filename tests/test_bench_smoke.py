"""Smoke tests of the benchmarks (codec, matmul, memory) and of `nf4lora bench SUITE`:
a --quick run writes the rows and keys it promises, a missing provider becomes a note,
and the correctness guard rejects a wrong kernel.

No timing is asserted anywhere (shared/perf.md): the machines are shared and noisy.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

# bench/ is a directory of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_codec, bench_matmul, harness  # noqa: E402
from nf4lora import backends, cli  # noqa: E402

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


def test_missing_provider_is_a_note_not_a_crash(tmp_path, hide_optional_imports):
    hide_optional_imports("bitsandbytes")
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

        def off_by_one(weight, out):
            real(weight, out)
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


def test_a_long_warmup_can_count_as_the_first_sample():
    calls = []
    call = functools.partial(calls.append, 1)
    assert len(harness.time_calls([call, call], reps=2)) == 4 and len(calls) == 5
    calls.clear()   # any warm-up is "long" at a threshold of 0 s: it becomes the first sample
    assert len(harness.time_calls([call, call], reps=2, warmup_is_sample_after_s=0.0)) == 4
    assert len(calls) == 4
    calls.clear()
    assert len(harness.time_calls([call], reps=1, warmup_is_sample_after_s=0.0)) == 1
    assert len(calls) == 1


def test_memory_benchmark_quick_run(tmp_path):
    from bench import bench_memory
    payload = bench_memory.main(["--quick", "--out", str(tmp_path)])
    rows = {row["config"]: row for row in payload["rows"]}
    assert {"nf4lora QLoRA", "dense bf16 LoRA"} <= set(rows)
    # The 4-bit layer holds ~0.52 byte per weight against bf16's 2 (plus the same adapter).
    assert rows["nf4lora QLoRA"]["held_mb"] < 0.5 * rows["dense bf16 LoRA"]["held_mb"]
    assert (tmp_path / "memory-latest.json").exists()


# --- bench_matmul ------------------------------------------------------------------------

MATMUL_ROW_KEYS = {"op", "shape", "tokens", "rank", "dtype", "quant_type", "blocksize", "flops",
                   "provider", "mode", "layers", "bytes", "median_ms", "gbs", "pct_read_bw",
                   "tflops", "x_vs_bitsandbytes", "x_vs_dense-bf16"}
# One small shape and one M per op keeps a run to a few seconds; --quick's own presets are
# what `python -m bench.bench_matmul --quick` runs.
MATMUL_SMALL = ["--quick", "--shapes", "256x256", "--tokens", "1"]


def test_matmul_quick_run_writes_every_row_key_json_and_plot(tmp_path):
    payload = bench_matmul.main(MATMUL_SMALL + ["--out", str(tmp_path), "--providers", "nf4lora",
                                                "bitsandbytes", "dense-bf16"])

    saved = json.loads((tmp_path / "matmul-latest.json").read_text())
    assert len(list(tmp_path.glob("matmul-2*.json"))) == 1
    assert saved["rows"] == json.loads(json.dumps(payload["rows"], default=str))
    assert {"read_gbs", "copy_gbs", "threads"} <= saved["bandwidth"].keys()
    metadata_keys = METADATA_KEYS - {"dequantize_inputs_from"} | {"weights_quantized_by"}
    assert metadata_keys <= saved["metadata"].keys()
    if saved["metadata"]["bitsandbytes_path"] is not None:
        assert "gemm_4bit" in saved["metadata"]["bitsandbytes_path"]["ops"]

    providers = {f"nf4lora[{name}]" for name in cpu_backends()} | {"dense-bf16"}
    if saved["metadata"]["bitsandbytes_path"] is not None:
        providers.add("bitsandbytes")
    got = {(row["op"], row["tokens"], row["provider"]) for row in saved["rows"]}
    expected = {(op, 1, p) for op in ("matmul", "lora") for p in providers}
    # the reference backend is not in the train rows (its backward is torch's bf16 matmul)
    expected |= {("train", bench_matmul.QUICK_TRAIN_TOKENS, p) for p in providers
                 if p != "nf4lora[reference]"}
    assert got == expected
    for row in saved["rows"]:
        assert MATMUL_ROW_KEYS <= row.keys(), row["provider"]
        assert row["shape"] == [256, 256] and row["mode"] == "cold"
        assert row["median_ms"] > 0 and row["bytes"] > 0
        # a train step is timed on one layer (tens of seconds for the bf16 baselines)
        assert row["layers"] == (1 if row["op"] == "train" else max(row["layers"], harness.MIN_LAYERS))
        assert row["x_vs_dense-bf16"] is not None
        # TFLOP/s is shown for the compute-bound calls only
        assert (row["tflops"] is None) == (row["tokens"] < bench_matmul.COMPUTE_BOUND_TOKENS)
        assert (row["rank"] is None) == (row["op"] == "matmul")

    matplotlib, _, _ = harness.import_optional("matplotlib")
    assert (tmp_path / "matmul-latest.png").exists() == (matplotlib is not None)
    assert saved["plot"] == ("matmul-latest.png" if matplotlib is not None else None)


def test_matmul_peer_kernels_and_cycles_column(tmp_path):
    # bitsandbytes' fused CPU GEMV (eval Linear4bit: the notes say whether it repacked) and
    # torch's int4 weight-only kernel sit beside nf4lora; a one-thread run gets cycles per
    # 32 weights on its matmul rows (median ms x nominal MHz / (weights / 32))
    payload = bench_matmul.main(MATMUL_SMALL + ["--ops", "matmul", "--threads", "1", "--out", str(tmp_path),
                                                "--providers", "nf4lora[cpu]", "bitsandbytes-gemv",
                                                "torch-int4"])
    rows = {row["provider"]: row for row in payload["rows"]}
    expected = {"nf4lora[cpu]", "torch-int4"}
    if harness.import_optional("bitsandbytes")[0] is not None:
        expected.add("bitsandbytes-gemv")
        assert any(note.startswith("bitsandbytes-gemv: ") and "repacked" in note
                   for note in payload["notes"])
    assert set(rows) == expected
    assert rows["torch-int4"]["bytes"] == 256 * 256 // 2 + 4 * 256 * 256 // 64 + 2 * (256 + 256)
    mhz = harness.cpu_mhz()
    for row in rows.values():
        if mhz is not None:
            assert row["cycles_per_32_weights"] == pytest.approx(
                row["median_ms"] * 1e-3 * mhz * 1e6 / (256 * 256 / 32))


def test_matmul_int8_eval_row_is_opt_in_and_guarded(tmp_path):
    # nf4lora-eval-int8 runs only when named; it passes the guard at its own (int8)
    # tolerance, the notes say which sums ran, and the environment is left as it was
    payload = bench_matmul.main(MATMUL_SMALL + ["--ops", "matmul", "--out", str(tmp_path)])
    assert bench_matmul.NF4LORA_EVAL_INT8 not in {row["provider"] for row in payload["rows"]}
    assert bench_matmul.nf4lora_eval_layers == []   # the run's layers are not kept past it
    payload = bench_matmul.main(MATMUL_SMALL + ["--ops", "matmul", "--out", str(tmp_path), "--providers",
                                                bench_matmul.NF4LORA_EVAL, bench_matmul.NF4LORA_EVAL_INT8])
    assert {row["provider"] for row in payload["rows"]} == {bench_matmul.NF4LORA_EVAL,
                                                            bench_matmul.NF4LORA_EVAL_INT8}
    (note,) = [n for n in payload["notes"] if n.startswith(bench_matmul.NF4LORA_EVAL_INT8 + ": ")]
    from nf4lora.backends import cpu
    # (the note's first words name the sums that ran; an AVX2-only CPU also says why not int8)
    assert note.startswith(bench_matmul.NF4LORA_EVAL_INT8 + (": int8 sums" if cpu._C.isa() == "avx512bf16"
                                                             else ": integer sums ("))
    assert "NF4LORA_CPU_GEMV" not in os.environ
    assert bench_matmul.nf4lora_eval_layers == []


def test_matmul_amx_row_runs_where_amx_is(tmp_path, monkeypatch):
    # nf4lora-amx: a note where the CPU has no AMX-BF16; where it has (or, here, with the
    # tiles emulated), rows from M = 16 only, that took the tile GEMM and passed the guard
    from nf4lora.backends import cpu
    args = ["--quick", "--shapes", "128x256", "--tokens", "40", "--ops", "matmul", "lora",
            "--out", str(tmp_path), "--providers", bench_matmul.NF4LORA_AMX]
    if not cpu._C.has_amx():
        payload = bench_matmul.main(args)
        assert payload["rows"] == []
        assert any(n.startswith(bench_matmul.NF4LORA_AMX + ": skipped, this CPU has no AMX")
                   for n in payload["notes"])

        @contextlib.contextmanager
        def emulated_tiles():
            with harness.using_backend("cpu"), harness.environment_variable("NF4LORA_CPU_GEMM", "amx-emulated"):
                yield
        monkeypatch.setattr(cpu._C, "has_amx", lambda: True)
        monkeypatch.setattr(bench_matmul, "amx_tiles", emulated_tiles)
    paths = []
    real = cpu.matmul_path
    monkeypatch.setattr(cpu, "matmul_path", lambda *a: paths.append(real(*a)) or paths[-1])
    payload = bench_matmul.main(args[:4] + ["8", "40"] + args[5:])   # no rows below M = 16
    assert {(row["provider"], row["op"], row["tokens"]) for row in payload["rows"]} == {
        (bench_matmul.NF4LORA_AMX, "matmul", 40), (bench_matmul.NF4LORA_AMX, "lora", 40)}
    assert "amx" in paths
    assert "NF4LORA_CPU_GEMM" not in os.environ


def test_int4pack_round_trips_through_torchs_kernel():
    # the torch-int4 provider's own packing: its kernel computes x @ dequantized(W)^T
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed, scales_and_zeros = bench_matmul.int4pack(weight)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, bench_matmul.INT4_GROUP, scales_and_zeros)
    groups = weight.float().reshape(128, 4, 64)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15
    dequantized = (((groups - low) / step).round() * step + low).reshape(128, 256)
    exact = x.double() @ dequantized.double().t()
    assert (y.double() - exact).abs().max() < 0.02 * exact.abs().max()


def test_multi_lora_bench_quick_run(tmp_path):
    from bench import bench_multi_lora
    payload = bench_multi_lora.main(["--shape", "64x128", "--tokens", "4", "--adapters", "3",
                                     "--rank", "2", "--reps", "2",
                                     "--out", str(tmp_path)])
    rows = {row["provider"]: row for row in payload["rows"]}
    assert set(rows) == {bench_multi_lora.SINGLE, bench_multi_lora.MULTI,
                         bench_multi_lora.PEFT_SINGLE, bench_multi_lora.PEFT_ROUTED,
                         bench_multi_lora.PEFT_LOOP}
    assert rows[bench_multi_lora.SINGLE]["x_vs_single"] == 1.0
    assert rows[bench_multi_lora.PEFT_SINGLE]["x_vs_single"] == 1.0
    assert all(row["median_ms"] > 0 for row in rows.values())
    assert (tmp_path / "multi-lora-latest.json").exists()


def test_multi_lora_bench_gpu_check_sees_a_wrong_adapter():
    """--device cuda checks multi_lora_matmul_4bit against the spec before it times it (the
    check runs here on CPU tensors): the op passes, and the single-adapter call, every row
    on adapter 0, does not (the adapters' terms are as large as the base's)."""
    from bench import bench_multi_lora
    calls, want, terms = bench_multi_lora.gpu_calls((96, 128), 4, 3, 8, device="cpu")
    assert bench_matmul.mismatch(calls[bench_multi_lora.MULTI](), want, terms) is None
    assert bench_matmul.mismatch(calls[bench_multi_lora.SINGLE](), want, terms) is not None


def test_matmul_bytes_and_flops_follow_the_docstring():
    weights = bench_matmul.Weights((4096, 4096), quantizer=None)
    nf4 = bench_codec.quantized_bytes(4096 * 4096)
    assert nf4 / (4096 * 4096) == pytest.approx(0.516, abs=1e-3)  # perf.md: 0.516 byte/weight
    m1 = bench_matmul.Case("matmul", weights, 1)
    assert m1.bytes_moved(nf4) == nf4 + 2 * (4096 + 4096)
    assert m1.flops == 2 * 4096 * 4096
    lora = bench_matmul.Case("lora", weights, 8)
    assert lora.bytes_moved(nf4) == nf4 + 2 * 8 * 8192 + 2 * bench_matmul.RANK * 8192
    train = bench_matmul.Case("train", weights, 512)
    assert train.bytes_moved(nf4) == 2 * bench_matmul.Case("lora", weights, 512).bytes_moved(nf4)
    assert train.flops == 4 * 512 * 4096 * 4096 + 6 * 512 * bench_matmul.RANK * 8192


def test_matmul_missing_provider_is_a_note_not_a_crash(tmp_path, hide_optional_imports):
    hide_optional_imports("bitsandbytes", "torchao", "matplotlib")
    payload = bench_matmul.main(MATMUL_SMALL + ["--ops", "matmul", "--out", str(tmp_path),
                                                "--providers", "bitsandbytes", "torchao", "dense-bf16"])
    notes = "\n".join(payload["notes"])
    assert "bitsandbytes: skipped" in notes and "torchao: skipped" in notes
    assert "plot: skipped" in notes and not (tmp_path / "matmul-latest.png").exists()
    assert {row["provider"] for row in payload["rows"]} == {"dense-bf16"}
    assert all(row["x_vs_bitsandbytes"] is None for row in payload["rows"])
    assert payload["metadata"]["bitsandbytes_path"] is None


@pytest.mark.parametrize("backend", cpu_backends())
def test_matmul_guard_passes_the_real_kernels(backend):
    impl = bench_matmul.nf4lora_impl(backend)
    with impl.context():
        assert bench_matmul.check_impl(impl, bench_matmul.OPS, [1, 8, 64]) is None


@pytest.mark.skipif(backends.availability("cpu") is not None, reason="nf4lora cpu backend not built")
@pytest.mark.parametrize("bug", ["adapter dropped", "dx without the adapter"])
def test_matmul_guard_rejects_a_wrong_kernel(bug, tmp_path, monkeypatch):
    cpu = importlib.import_module("nf4lora.backends.cpu")
    composite = importlib.import_module("nf4lora.backends.composite")
    if bug == "adapter dropped":
        real = (getattr(cpu, "lora_matmul_4bit", None)
                or functools.partial(composite.lora_matmul_4bit, cpu))

        def wrong(x, weight, lora_A, lora_B, scaling, bias):
            y, _ = real(x, weight, None, None, scaling, bias)
            h = x @ lora_A.t() if lora_A is not None else x.new_empty((x.shape[0], 0))
            return y, h

        monkeypatch.setattr(cpu, "lora_matmul_4bit", wrong, raising=False)
        expected = "lora y"
    else:
        real = (getattr(cpu, "lora_matmul_4bit_grad_input", None)
                or functools.partial(composite.lora_matmul_4bit_grad_input, cpu))

        def wrong(grad, weight, lora_A, grad_h):
            return real(grad, weight, None, None)

        monkeypatch.setattr(cpu, "lora_matmul_4bit_grad_input", wrong, raising=False)
        expected = "train dx"
    impl = bench_matmul.nf4lora_impl("cpu")
    with impl.context():
        why = bench_matmul.check_impl(impl, bench_matmul.OPS, [1, 64])
    assert why is not None and expected in why and "elements off" in why

    # and in a run, the wrong kernel posts no number
    payload = bench_matmul.main(MATMUL_SMALL + ["--out", str(tmp_path), "--providers", "nf4lora[cpu]",
                                                "dense-bf16"])
    assert any("nf4lora[cpu]: skipped, correctness check failed" in n for n in payload["notes"])
    assert {row["provider"] for row in payload["rows"]} == {"dense-bf16"}


def test_matmul_guard_tolerance_is_bf16_sized():
    want = torch.full((4, 4), 10.0)
    terms = torch.full((4, 4), 10.0)   # root-sum-square of the summed terms
    assert bench_matmul.mismatch(want * (1 + 2 ** -8), want, terms) is None   # a bf16 rounding
    assert bench_matmul.mismatch(want * 1.1, want, terms) is not None          # a 10% error
    assert "shape" in bench_matmul.mismatch(want[:2], want, terms)


# --- nf4lora bench SUITE -------------------------------------------------------------------

@pytest.fixture
def suites(monkeypatch):
    """Every suite's main replaced by a recorder: [(module name, argv)]."""
    calls = []

    def load(module):
        return types.SimpleNamespace(main=lambda argv: calls.append((module, list(argv))))

    monkeypatch.setattr(cli, "_load_bench", load)
    return calls


def test_cli_bench_dispatches_to_the_suite(suites):
    assert cli.main(["bench", "--quick"]) == 0                    # default suite: matmul
    assert cli.main(["bench", "codec", "--quick", "--ops", "quantize"]) == 0
    assert cli.main(["bench", "memory"]) == 0
    assert cli.main(["bench", "train", "--steps", "1"]) == 0
    assert suites == [("bench_matmul", ["--quick"]), ("bench_codec", ["--quick", "--ops", "quantize"]),
                      ("bench_memory", []), ("bench_train", ["--steps", "1"])]


def test_cli_bench_unknown_or_missing_suite_is_a_clear_error(monkeypatch, capsys):
    assert cli.main(["bench", "nosuch"]) == 2
    assert "unknown suite 'nosuch'" in capsys.readouterr().err
    # a suite whose file is not there (bench_train.py is written separately)
    monkeypatch.setitem(cli.BENCH_SUITES, "train", "bench_not_written_yet")
    assert cli.main(["bench", "train"]) == 2
    assert "bench/bench_not_written_yet.py is not in this" in capsys.readouterr().err


def test_cli_loads_the_real_suites():
    assert cli._load_bench("bench_matmul").main is not None
    assert cli._load_bench("bench_codec").main is not None
    assert cli._load_bench("bench_not_written_yet") is None


# --- where results go ------------------------------------------------------------------------

def _files(root: Path) -> dict[str, int]:
    """Every file under root (bytecode caches aside) and its mtime."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_results_land_in_the_working_directory(tmp_path, monkeypatch):
    """`nf4lora bench` without --out writes ./nf4lora-results in the directory it runs from,
    never into the installed package or the checkout's bench/results."""
    import nf4lora
    suite = cli._load_bench("bench_codec")
    watched = {Path(suite.__file__).resolve().parent, Path(nf4lora.__file__).resolve().parent,
               Path(bench_codec.__file__).resolve().parent}
    before = {root: _files(root) for root in watched}
    monkeypatch.chdir(tmp_path)

    assert cli.main(["bench", "codec", "--quick", "--ops", "dequantize", "--providers", "copy-bf16"]) == 0

    saved = json.loads((tmp_path / "nf4lora-results" / "codec-latest.json").read_text())
    assert {row["provider"] for row in saved["rows"]} == {"copy-bf16", "copy-bf16 out="}
    assert len(list((tmp_path / "nf4lora-results").glob("codec-2*.json"))) == 1
    for root in watched:
        assert _files(root) == before[root], f"the benchmark wrote under {root}"


@pytest.mark.parametrize("suite", sorted(cli.BENCH_SUITES))
def test_every_suite_defaults_to_the_one_results_folder(suite, capsys):
    module = cli._load_bench(cli.BENCH_SUITES[suite])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert f"./{harness.DEFAULT_OUT}" in capsys.readouterr().out
    assert harness.DEFAULT_OUT == Path("nf4lora-results")     # relative: the working directory


def test_dora_bench_quick_run(tmp_path):
    from bench import bench_dora
    payload = bench_dora.main(["--shape", "64x128", "--tokens", "4", "--rank", "2",
                               "--reps", "2", "--out", str(tmp_path)])
    rows = payload["rows"]
    assert {row["provider"] for row in rows} == set(bench_dora.PROVIDERS)
    assert all(row["median_ms"] > 0 for row in rows)
    lora = [row for row in rows if row["provider"] == "nf4lora LoRA"]
    assert [row["x_vs_lora"] for row in lora] == [1.0]
    dense = [row for row in rows if row["provider"] == bench_dora.DENSE]
    assert [row["x_vs_dense"] for row in dense] == [1.0] and lora[0]["x_vs_dense"] > 0
    # the fresh-process memory runs worked (Linux: VmHWM), and a layer this small adds < 64 MiB
    assert all(row["peak_mib"] is not None and 0 <= row["peak_mib"] < 64 for row in rows)
    assert (tmp_path / "dora-latest.json").exists()


def test_dora_bench_gpu_check_sees_a_wrong_result():
    """--device cuda checks each nf4lora row's y and dx against the spec before it times it
    (bench_dora.spec_check); here on CPU tensors through the current backend: the rows pass,
    a changed magnitude or adapter after the call does not."""
    from bench import bench_dora
    for tokens in (1, 20):
        steps, models = bench_dora.gpu_steps((96, 128), tokens, 8, device="cpu")
        assert bench_dora.check_steps(steps, models) == dict.fromkeys(bench_dora.NF4LORA_PROVIDERS)
    for provider, change in (("nf4lora DoRA", lambda layer: layer.lora_magnitude_vector.weight),
                             ("nf4lora LoRA", lambda layer: layer.lora_B.weight[0])):
        step = steps[provider]
        step.x.grad = None
        y = step()
        with torch.no_grad():
            change(models[provider][0]).mul_(1.5)
        assert bench_dora.spec_check(models[provider], step, y).startswith("y: ")


def run_gpu_flow_on_the_cpu(monkeypatch, timers):
    """A GPU benchmark's main_gpu on this machine: the CPU backend stands in for the GPU
    backends, harness.time_calls' wall clock for CUDA events (`timers`: the module whose
    gpu_time_calls the benchmark calls), and the profiler's kernel time is absent."""
    monkeypatch.setattr(harness, "nf4lora_gpu_backends", lambda: (["cpu"], []))
    monkeypatch.setattr(timers, "gpu_time_calls", harness.time_calls)
    monkeypatch.setattr(timers, "gpu_kernel_seconds", lambda calls: None)


def test_multi_lora_bench_gpu_run_end_to_end_on_a_stand_in(tmp_path, monkeypatch):
    """main_gpu's whole flow (check, interleaved timing, ratios, save) with the CPU backend
    standing in for the GPU backends and wall-clock timers for CUDA events."""
    from bench import bench_multi_lora
    run_gpu_flow_on_the_cpu(monkeypatch, bench_multi_lora)
    calls_on_cpu = bench_multi_lora.gpu_calls
    monkeypatch.setattr(bench_multi_lora, "gpu_calls",
                        lambda *args, **kwargs: calls_on_cpu(*args, device="cpu", **kwargs))
    payload = bench_multi_lora.main(["--device", "cuda", "--shape", "64x128", "--tokens", "4",
                                     "--adapters", "3", "--rank", "4", "--reps", "2",
                                     "--out", str(tmp_path)])
    rows = {r["provider"]: r for r in payload["rows"]}
    assert set(rows) == {bench_multi_lora.SINGLE, bench_multi_lora.MULTI}
    assert rows[bench_multi_lora.SINGLE]["x_vs_single"] == 1.0
    assert rows[bench_multi_lora.MULTI]["x_vs_single"] > 0
    assert rows[bench_multi_lora.MULTI]["kernel_x_vs_single"] is None
    assert payload["device"] == "cuda" and not payload["notes"]
    assert (tmp_path / "multi-lora-gpu-latest.json").exists()


def test_dora_bench_gpu_run_end_to_end_on_a_stand_in(tmp_path, monkeypatch):
    """main_gpu's whole flow (variants, check, interleaved timing, ratios, save) with the CPU
    backend standing in for the GPU backends and wall-clock timers for CUDA events."""
    from bench import bench_codec, bench_dora
    run_gpu_flow_on_the_cpu(monkeypatch, bench_codec)
    steps_on_cpu = bench_dora.gpu_steps
    monkeypatch.setattr(bench_dora, "gpu_steps",
                        lambda *args, **kwargs: steps_on_cpu(*args, device="cpu", **kwargs))
    payload = bench_dora.main(["--device", "cuda", "--shape", "64x128", "--tokens", "1", "3",
                               "--rank", "4", "--reps", "2", "--out", str(tmp_path)])
    rows = payload["rows"]
    assert len(rows) == 6 and {r["backend"] for r in rows} == {"nf4lora[cpu]"}
    assert [r["x_vs_lora"] for r in rows if r["provider"] == "nf4lora LoRA"] == [1.0, 1.0]
    assert not [n for n in payload["notes"] if "wrong result" in n]
    assert (tmp_path / "dora-gpu-latest.json").exists()


def test_dora_bench_gpu_plan(capsys):
    """--device cuda --plan: every GPU backend variant's three rows, no GPU touched."""
    from bench import bench_dora
    plan = bench_dora.main(["--device", "cuda", "--plan"])
    assert plan["plan"] and plan["ops"] == ["dora"]
    assert len(plan["providers"]) == 9
    assert "nf4lora DoRA nf4lora[cuda] no-triton" in plan["providers"]
    assert "CPU rows only" in capsys.readouterr().out


def test_providers_of_a_case_take_turns():
    # harness.measure_interleaved: pass r of every provider before pass r + 1 of any, each
    # inside its own context, so a burst of outside load lands on all of them
    log = []

    @contextlib.contextmanager
    def inside(name):
        log.append(f"enter {name}")
        yield
        log.append(f"exit {name}")

    def provider(name, reps):
        layers = lambda case, n: [functools.partial(log.append, f"{name}{i}") for i in range(n)]
        return harness.Provider(name, layers, bytes_moved=lambda case: harness.COLD_FOOTPRINT,
                                reps=reps, context=functools.partial(inside, name))

    case = types.SimpleNamespace(labels={"op": "fake"})
    rows, notes = harness.measure_interleaved([provider("a", 2), provider("b", 1)], case)
    assert notes == [] and [(r["provider"], r["calls"]) for r in rows] == [("a", 4), ("b", 2)]
    setup = ["enter a", "a0", "exit a", "enter b", "b0", "exit b"]   # one warm-up call each
    passes = ["enter a", "a0", "a1", "exit a", "enter b", "b0", "b1", "exit b",
              "enter a", "a0", "a1", "exit a"]
    assert log == setup + passes
