"""Benchmark greedy decoding of a Llama-style model: tokens/s of nf4lora's 4-bit model against
bitsandbytes 4-bit and dense bf16, and the share of the read bandwidth its weight bytes imply.

    python -m bench.bench_decode [--quick] [--batches 1 8] [--prompt P] [--steps N] [--warmup N]
                                 [--rounds N] [--threads N] [--providers NAME ...] [--no-check]
                                 [--out DIR]
    nf4lora bench decode [the same options]

Every provider generates from the same model: a transformers LlamaForCausalLM built from a
LlamaConfig with random weights (seeded; nothing is downloaded), cast to bf16, prompted with
the same random token ids (batch b takes the first b rows), `model.generate(do_sample=False,
use_cache=True)` (greedy, the default DynamicCache), in eval mode under no_grad:

  nf4lora        nf4lora.replace_linear(model, quant_type="nf4", compute_dtype=bf16) (double
                 quantization, blocksize 64; lm_head stays dense bf16), built in memory
  bitsandbytes   every nn.Linear but lm_head replaced by bitsandbytes.nn.Linear4bit (NF4,
                 compress_statistics=True, blocksize 64, compute_dtype bf16), quantized on CPU
                 (what transformers' BitsAndBytesConfig loading does), eval mode: on CPUs with
                 AVX512-BF16 its first forward repacks each weight for its fused CPU gemv
  dense-bf16     the bf16 model as it is

Timing. Every provider's model is built first and held. Per batch size: one untimed warm-up
generate each (prefill + 1 decode step: lazy initialization, bitsandbytes' repacking, oneDNN
primitives, first-touch pages), then `rounds` timed generates of 1 + warmup + steps new tokens
each, the providers taking turns (round 1 of each, then round 2 of each, ...: a burst of load
from other processes lands on all of them). A StoppingCriteria stamps the clock after each
token: prefill = from the call to the first token (the prompt's forward, plus generate's small
setup), decode step i = the interval between tokens i-1 and i (one forward of `batch` tokens
with the KV cache, the greedy pick, the cache update). The first `warmup` decode steps of each
round are dropped; the row has the median (p20, p80, min) of the rest of all rounds,
tokens/s = batch / median step; prefill is the median round's.
With --threads 1 the clock is the thread's own CPU time (time.thread_time: every kernel of
every provider runs on that thread), which other processes on a shared machine do not
inflate; otherwise wall time.

Bytes. `weight MB/step` is what one decode step must read of the weights, counted from the
model's own tensors after the run (so bitsandbytes' repacked layout is counted as it is):
4-bit linears = packed codes + their constants (absmax, nested absmax, its code and offset;
nf4lora's eval layers on AVX2 and AVX-512 CPUs: the interleaved copy the kernel reads instead, 9% more),
dense linears (lm_head, and every projection of dense-bf16) in full, embeddings as read (batch
rows), norms. `GB/s` = that / the median step, `% read BW` = against `harness.probe_bandwidth`'s
streaming read measured in the same run: a decode step cannot be faster than its weight bytes
at that bandwidth. The KV cache read per step (mean over the timed steps) is in the JSON, not in
those columns (it is ~1% of the weights at the default prompt).

Correctness (skip with --no-check). `nf4-spec` is the dense bf16 model whose projections hold
nf4lora's 4-bit weights decoded by nf4lora.reference: what nf4lora computes, in plain torch ops.
It generates greedily from the same prompts (untimed), and the same model in float32 runs the
prompt plus the spec's first token (teacher forced): the float32 logits of the first two tokens.
In bf16 the greedy tokens of two correct implementations diverge after a few tokens (a top-2
margin below the rounding flips a pick, and everything after differs), so the judged quantity
is the logits, not the token stream:
  - step 0 (the prefill's logits; for nf4lora the dequantize+GEMM path unless M <= 32) and
    step 1 (the first decode step's, the fused small-M kernel; compared on the rows whose first
    token equals the spec's, whose inputs are then the same): relative L2 error against the
    spec in float32;
  - the tolerance is derived from bf16 rounding on this very model: TOL_FACTOR x the error of
    the spec's own bf16 run against float32 (at least TOL_FACTOR x 2^-8, a bf16 ulp), since a
    correct bf16 implementation of the same weights is that far from exact, and another one
    (rounding elsewhere) at most about twice as far. A wrong code, scale or block lands near 1.
nf4lora's rows are judged (a failed check posts no ratio); bitsandbytes' (the same NF4 codes,
its absmax rounded to bf16 when repacked) and dense-bf16's (no quantization: its distance is
NF4's error) are shown. Every row reports how many leading greedy tokens equal the spec's.
nf4lora's rows also record which CPU path ran: nf4lora._C.isa(), the backend, and the
`nf4lora.backends.cpu.matmul_path` of every 4-bit matmul in one (untimed) forward of the decode
shape (M = batch) and of the prefill shape (M = batch x prompt).

Model size (default): TinyLlama-1.1B's shape, the common 1B Llama: hidden 2048, MLP 5632, 22
layers, 32 heads of 64 with 4 KV heads (GQA), vocab 32000; 0.97 G projection weights + 2 x 65.5 M
embedding / lm_head, 2.2 GB in bf16, 0.50 GB as NF4 (0.63 GB a step with the dense 131 MB
lm_head): far beyond the 32 MiB L3, so a decode step streams its weights from memory, as on any
real model. Memory:
the bf16 base model (2.2 GB) is kept and each provider is built from a copy, one at a time; the
peak is the spec check in float32 (base + 4.4 GB), ~8 GB in all, well inside 20 GB.
`--hidden/--intermediate/--layers/--heads/--kv-heads/--vocab` override it.

The machines are shared: the CPU model (lscpu) and the load average before and after are
printed and saved; other processes on a 2-core machine distort timings by up to 10x, and a
note says so when the load was high. Each row also has the 1-minute load average when its timed
generate started (`load`) and `CPU share`: this process's CPU time over that generate / (wall
time x threads), near 1 on a quiet machine, well below when other processes took the cores
(with 2 threads every OpenMP barrier then waits for a descheduled thread: a decode step of ~200
parallel regions measured 5-10x slower at load 3-4 than at load 2 on the 2-core AMD EPYC here).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import subprocess
import time
import warnings
from collections import Counter

import torch
from torch import nn

from . import harness

DTYPE = torch.bfloat16
BLOCKSIZE = 64
SEED = 0

# TinyLlama-1.1B's shape (see the docstring); --quick: a tiny model of the same proportions.
FULL_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
QUICK_MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
FULL = dict(model=FULL_MODEL, batches=[1, 8], prompt=32, steps=16, warmup=2, rounds=3,
            probe_bytes=harness.GIB)
QUICK = dict(model=QUICK_MODEL, batches=[1], prompt=8, steps=4, warmup=1, rounds=1,
             probe_bytes=64 * harness.MIB)

NF4LORA, BNB, DENSE = "nf4lora", "bitsandbytes", "dense-bf16"
PROVIDERS = (NF4LORA, BNB, DENSE)
SPEC = "nf4-spec"          # the correctness reference (untimed, not a row)

# Logit tolerance: TOL_FACTOR x (the spec's own bf16 error against float32), at least
# TOL_FACTOR x BF16_ULP (see the docstring).
TOL_FACTOR = 2.0
BF16_ULP = 2.0 ** -8
# Issue 13's decode target: a 4-bit model's tokens/s >= 3x the dense bf16 model's at batch 1.
TARGET_X_DENSE = 3.0


# --- model ----------------------------------------------------------------------------------

def build_base(model_cfg: dict, max_positions: int, seed: int = SEED) -> nn.Module:
    """LlamaForCausalLM from a LlamaConfig with seeded random weights, cast to bf16, eval mode.
    No EOS token: every sequence generates exactly the tokens asked for."""
    import transformers
    config = transformers.LlamaConfig(**model_cfg, max_position_embeddings=max(max_positions, 128),
                                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(DTYPE)
    model.generation_config.eos_token_id = None
    return model.eval()


def make_prompts(batch: int, length: int, vocab: int, seed: int = SEED) -> torch.Tensor:
    """Random token ids in [3, vocab) (no pad/bos/eos ids), [batch, length]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


# --- providers ------------------------------------------------------------------------------

# build(base_copy, modules): base_copy() returns a copy of the bf16 base model; None means
# the base model itself (the dense provider needs no copy).
Provider = harness.ModelProvider


def build_nf4lora(base_copy, mods):
    model = mods["nf4lora"].replace_linear(base_copy(), quant_type="nf4", compute_dtype=DTYPE,
                                           compress_statistics=True, progress=False)
    return model.eval()


def build_bnb(base_copy, mods):
    return harness.bitsandbytes_4bit(base_copy(), mods["bitsandbytes"], DTYPE, BLOCKSIZE).eval()


def build_dense(base_copy, mods):
    return None           # the base model itself (see run_provider): no copy needed


def all_providers() -> list[Provider]:
    return [
        Provider(NF4LORA, "nf4lora.replace_linear(model, quant_type='nf4', compute_dtype=bf16)",
                 ("nf4lora",), build_nf4lora),
        Provider(BNB, "bitsandbytes.nn.Linear4bit (nf4, double quant, bf16 compute), eval",
                 ("bitsandbytes",), build_bnb),
        Provider(DENSE, "bf16 nn.Linear (torch F.linear)", (), build_dense),
    ]


def is_4bit(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return getattr(weight, "quant_state", None) is not None


def layer_types(model: nn.Module) -> dict[str, int]:
    """Class names of the modules holding linear weights (4-bit or dense), counted."""
    counts: Counter = Counter()
    for module in model.modules():
        if is_4bit(module) or isinstance(module, nn.Linear):
            counts[f"{type(module).__module__.split('.')[0]}.{type(module).__name__}"] += 1
    return dict(counts)


def _state_bytes(state) -> int:
    """Bytes of a QuantState's tensors: absmax, code, offset, and the nested state's."""
    total = 0
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            total += value.nbytes
    nested = getattr(state, "state2", None) if getattr(state, "nested", False) else None
    return total + (_state_bytes(nested) if nested is not None else 0)


def interleaved_copy(module: nn.Module):
    """The interleaved copy an eval-mode nf4lora Linear4bit keeps for the CPU kernel
    (nf4lora.backends.cpu.interleave), or None."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None:
        return None
    from nf4lora._weight import PackedWeight
    return PackedWeight.kept_interleaved(state)


def weight_bytes(model: nn.Module, batch: int) -> dict:
    """Weight bytes one decode step of `batch` tokens reads, by kind (see the docstring)."""
    parts = dict(linear_4bit=0, linear_4bit_constants=0, linear_dense=0, embedding_rows=0, other=0)
    for module in model.modules():
        own = [t for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))]
        copy = interleaved_copy(module)
        if copy is not None:  # what the fused kernel reads instead: 512 bytes of codes and
            # 64 of float32 constants per 16 rows x 64 columns (csrc/weight.h)
            parts["linear_4bit"] += copy.nbytes * 512 // 576
            parts["linear_4bit_constants"] += copy.nbytes * 64 // 576
            parts["other"] += module.bias.nbytes if module.bias is not None else 0
        elif is_4bit(module):
            parts["linear_4bit"] += module.weight.data.nbytes
            parts["linear_4bit_constants"] += _state_bytes(module.weight.quant_state)
            parts["other"] += module.bias.nbytes if module.bias is not None else 0
        elif isinstance(module, nn.Embedding):
            parts["embedding_rows"] += batch * module.embedding_dim * module.weight.element_size()
        elif isinstance(module, nn.Linear):
            parts["linear_dense"] += sum(t.nbytes for t in own)
        else:
            parts["other"] += sum(t.nbytes for t in own)
    parts["total"] = sum(parts.values())
    return parts


def kv_bytes_per_step(cfg: dict, batch: int, context: float) -> float:
    """Keys + values read by one decode step attending to `context` tokens, bf16."""
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * batch * cfg["num_key_value_heads"] * head_dim * context * 2


# --- generation -----------------------------------------------------------------------------

def _now() -> float:
    """The step clock: with one thread, that thread's CPU time, else wall time."""
    return harness.one_thread_clock()()


def _clock():
    """A StoppingCriteria that stamps _now() after every generated token."""
    import transformers

    class Clock(transformers.StoppingCriteria):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(_now())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Clock()


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, keep_logits: int = 2) -> dict:
    """Greedy generation of exactly `new_tokens`; the clock stamps, the new tokens, and the raw
    logits (float32) of the first `keep_logits` of them."""
    import transformers
    clock = _clock()
    load = harness.load_average()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    start = _now()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=new_tokens, use_cache=True, pad_token_id=0, eos_token_id=None,
                         stopping_criteria=transformers.StoppingCriteriaList([clock]),
                         return_dict_in_generate=True, output_logits=True)
    end = _now()
    cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - wall_start
    tokens = out.sequences[:, prompt.shape[1]:]
    if tokens.shape[1] != new_tokens or len(clock.stamps) != new_tokens:
        raise RuntimeError(f"generate returned {tokens.shape[1]} tokens ({len(clock.stamps)} clock "
                           f"stamps), expected {new_tokens}")
    stamps = [start] + clock.stamps
    return dict(prefill_s=stamps[1] - start,
                step_s=[b - a for a, b in zip(stamps[1:], stamps[2:])],
                total_s=end - start, load_1min=load[0] if load else None,
                # this process's CPU time / (wall time x threads): well below 1 when other
                # processes took our cores (idle spinning threads still count as busy)
                cpu_share=cpu_s / (wall_s * torch.get_num_threads()), tokens=tokens.clone(),
                logits=[x.detach().float().clone() for x in out.logits[:keep_logits]])


@contextlib.contextmanager
def count_nf4lora_paths(counter: Counter):
    """Count nf4lora.backends.cpu.matmul_path's answers (by path) inside the block."""
    from nf4lora.backends import cpu
    real = cpu.matmul_path

    def counted(M, weight, dtype):
        path = real(M, weight, dtype)
        counter[f"{path} (M={M})"] += 1
        return path

    cpu.matmul_path = counted
    try:
        yield counter
    finally:
        cpu.matmul_path = real


@torch.no_grad()
def nf4lora_paths(model: nn.Module, prompt: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Which CPU path nf4lora's 4-bit matmuls took, observed in one untimed forward of the
    decode shape (batch rows of 1 token) and one of the prefill shape (the prompt)."""
    import nf4lora
    from nf4lora import backends
    from nf4lora.backends import cpu
    info = dict(backend=backends.backend_for(torch.device("cpu")).__name__.rsplit(".", 1)[-1])
    ext, _, _ = harness.import_optional("nf4lora._C")
    info["isa"] = ext.isa() if ext is not None and hasattr(ext, "isa") else None
    info["fused_max_m"] = cpu.fused_max_m(DTYPE)
    info["fused_max_m_interleaved"] = cpu.FUSED_MAX_M_INTERLEAVED   # (for a layer reading a copy)
    for phase, ids in (("decode", tokens[:, :1]), ("prefill", prompt)):
        counter: Counter = Counter()
        with count_nf4lora_paths(counter):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        info[phase] = dict(counter)
    layers = [m for m in model.modules() if isinstance(m, nf4lora.nn.Linear4bit)]
    fused = sum(n for key, n in info["decode"].items() if key.startswith("fused"))
    info["decode_fused"] = f"{fused}/{len(layers)}"
    # eval layers on a CPU with the kernel for it read an interleaved copy (backends.cpu.interleave)
    from nf4lora._weight import PackedWeight
    kept = sum(PackedWeight.kept_interleaved(m.weight.quant_state) is not None for m in layers)
    info["interleaved_copy"] = f"{kept}/{len(layers)}"
    return info


def bnb_paths(model: nn.Module, import_messages: list[str]) -> dict:
    """Which bitsandbytes path its 4-bit layers took: repacked for its fused CPU gemv (CPUs
    with AVX512-BF16, eval mode) or matmul_4bit's gemm_4bit op (dequantize + F.linear)."""
    layers = [m for m in model.modules() if is_4bit(m)]
    repacked = sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers)
    info = dict(layers=len(layers), repacked_for_cpu_gemv=repacked,
                support_avx512bf16_for_cpu=bool(getattr(layers[0], "support_avx512bf16_for_cpu", False))
                if layers else None)
    info["path"] = ("gemv_4bit (fused CPU kernel, repacked weights, bf16 absmax)" if layers and repacked == len(layers)
                    else "matmul_4bit -> gemm_4bit op" if not repacked else f"mixed: {repacked} repacked")
    try:
        from .bench_matmul import bitsandbytes_matmul_path
        info["ops"] = bitsandbytes_matmul_path(import_messages)
    except Exception as error:  # the details are extra; the path above is what ran
        info["ops"] = f"not recorded: {type(error).__name__}: {error}"
    return info


# --- correctness ----------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> list[int]:
    """Per row: how many leading tokens equal the reference's."""
    same = (tokens == reference).int()
    return [int(row.cumprod(0).sum()) for row in same]


def build_spec(base: nn.Module, quantized: nn.Module, mods: dict) -> nn.Module:
    """A copy of the bf16 base whose projections hold the nf4lora model's 4-bit weights,
    decoded by nf4lora.reference (the spec), in bf16."""
    spec = copy.deepcopy(base)
    with torch.no_grad():
        for name, _, weight in harness.spec_weights(quantized, DTYPE):
            spec.get_submodule(name).weight.copy_(weight)
    return spec.eval()


@torch.no_grad()
def float32_logits(spec32: nn.Module, prompt: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[batch, 2, vocab] float32 logits of steps 0 and 1, the spec's first token teacher forced."""
    ids = torch.cat([prompt, first[:, :1]], dim=1)
    return spec32(input_ids=ids, use_cache=False, logits_to_keep=2).logits.float()


def judge_row(result: dict, spec: dict) -> dict:
    """The logit errors of one provider's generate against the spec (see the docstring)."""
    exact = spec["logits32"]                   # [batch, 2, vocab]
    out = {}
    out["logits0_err"] = _rel(result["logits"][0], exact[:, 0])
    out["logits0_floor"] = _rel(spec["logits"][0], exact[:, 0])
    out["logits0_err_vs_spec_bf16"] = _rel(result["logits"][0], spec["logits"][0])
    same_input = result["tokens"][:, 0] == spec["tokens"][:, 0]
    out["logits1_rows"] = int(same_input.sum())
    if len(result["logits"]) > 1 and len(spec["logits"]) > 1 and same_input.any():
        rows = same_input.nonzero().flatten()
        out["logits1_err"] = _rel(result["logits"][1][rows], exact[rows, 1])
        out["logits1_floor"] = _rel(spec["logits"][1][rows], exact[rows, 1])
        out["logits1_err_vs_spec_bf16"] = _rel(result["logits"][1][rows], spec["logits"][1][rows])
    else:
        out["logits1_err"] = out["logits1_floor"] = out["logits1_err_vs_spec_bf16"] = None
    for k in ("0", "1"):
        floor = out[f"logits{k}_floor"]
        out[f"logits{k}_tol"] = None if floor is None else TOL_FACTOR * max(floor, BF16_ULP)
    per_row = agreement(result["tokens"], spec["tokens"])
    out["agree_tokens"] = min(per_row)
    out["agree_tokens_per_row"] = per_row
    bad = []
    for k in ("0", "1"):
        err, tol = out[f"logits{k}_err"], out[f"logits{k}_tol"]
        if err is not None and not err <= tol:     # NaN fails too
            bad.append(f"step {k} logits rel. error {err:.3g} > {tol:.3g}")
    out["problems"] = bad
    return out


# --- main -----------------------------------------------------------------------------------

MODEL_FLAGS = (("--hidden", "hidden_size"), ("--intermediate", "intermediate_size"),
               ("--layers", "num_hidden_layers"), ("--heads", "num_attention_heads"),
               ("--kv-heads", "num_key_value_heads"), ("--vocab", "vocab_size"))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_decode", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny model (hidden 256, 2 layers, vocab 1024), batch 1, prompt "
                             f"{QUICK['prompt']}, {QUICK['warmup']} + {QUICK['steps']} steps: a smoke run, not numbers")
    parser.add_argument("--batches", type=int, nargs="+", help=f"batch sizes (default {FULL['batches']})")
    parser.add_argument("--prompt", type=int, help=f"prompt tokens (default {FULL['prompt']})")
    parser.add_argument("--steps", type=int, help=f"timed decode steps (default {FULL['steps']})")
    parser.add_argument("--warmup", type=int, help=f"untimed decode steps first (default {FULL['warmup']})")
    parser.add_argument("--rounds", type=int,
                        help=f"timed generates per provider and batch, the providers taking turns "
                             f"(default {FULL['rounds']})")
    harness.add_model_bench_flags(parser, PROVIDERS, MODEL_FLAGS, FULL_MODEL)
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help=f"skip the correctness check against {SPEC} (saves building it)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.model = harness.model_from_args(args, MODEL_FLAGS, preset["model"])
    harness.defaults_from_preset(args, preset, ("batches", "prompt", "steps", "warmup", "rounds",
                                                "probe_bytes"))
    if args.steps < 1 or args.warmup < 0 or args.prompt < 1 or min(args.batches) < 1 or args.rounds < 1:
        parser.error("--steps, --prompt, --rounds and --batches must be >= 1, --warmup >= 0")
    cfg = args.model
    if cfg["hidden_size"] % cfg["num_attention_heads"] or cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        parser.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    args.batches = sorted(set(args.batches))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with harness.threads_set_to(args.threads):
        return _run(args, argv)


def lscpu_model() -> str:
    """lscpu's "Model name" (what the brief of every number asks for), else /proc/cpuinfo's."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                              env=dict(os.environ, LC_ALL="C")).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                return value.strip()
    return harness.cpu_info()["model"]


TIME_COLUMNS = [("provider", "provider", ""), ("batch", "batch", "d"), ("prefill s", "prefill_s", ".3f"),
                ("ms/step", "median_ms", ".1f"), ("p20", "p20_ms", ".1f"), ("p80", "p80_ms", ".1f"),
                ("tokens/s", "tokens_per_s", ".2f"), ("weight MB/step", "weight_mb", ".1f"),
                ("GB/s", "weight_gbs", ".2f"), ("% read BW", "pct_read_bw", ".1f"),
                (f"x vs {DENSE}", f"x_vs_{DENSE}", ".2f"), (f"x vs {BNB}", f"x_vs_{BNB}", ".2f"),
                ("agree", "agree_tokens", "d"), ("load", "load_1min", ".1f"), ("CPU share", "cpu_share", ".2f"),
                ("path", "path", "")]
CHECK_COLUMNS = [("provider", "provider", ""), ("batch", "batch", "d"),
                 ("step0 err", "logits0_err", ".2e"), ("step0 tol", "logits0_tol", ".2e"),
                 ("step0 bf16 floor", "logits0_floor", ".2e"), ("step1 rows", "logits1_rows", "d"),
                 ("step1 err", "logits1_err", ".2e"), ("step1 tol", "logits1_tol", ".2e"),
                 ("agree tokens", "agree_tokens", "d"), ("new tokens", "new_tokens", "d"),
                 ("check", "check", "")]


def _run(args, argv) -> dict:
    notes: list[str] = []
    load_start = harness.load_average()
    cpu_model = lscpu_model()
    cpus = os.cpu_count() or 1
    threads = torch.get_num_threads()
    new_tokens = 1 + args.warmup + args.steps
    wanted = [p for p in all_providers() if not args.providers or p.name in args.providers]
    print(f"greedy decode: Llama {args.model}, bf16, prompt {args.prompt}, batches {args.batches}, "
          f"{new_tokens} new tokens (prefill + {args.warmup} warm-up + {args.steps} timed steps); "
          f"{threads} threads; CPU {cpu_model}; load average {load_start}", flush=True)

    runnable, mods, import_notes, messages = harness.import_providers(wanted)
    notes += import_notes
    bnb_messages = messages.get("bitsandbytes", [])
    transformers = mods.get("transformers")
    check = args.check and transformers is not None
    if check and "nf4lora" not in mods:
        module, reason, _ = harness.import_optional("nf4lora")
        if module is None:
            check = False
            notes.append(f"{SPEC}: not built ({reason}); no correctness check")
        else:
            mods["nf4lora"] = module
    if not args.check:
        notes.append("correctness check skipped (--no-check)")

    print(f"read bandwidth probe ({args.probe_bytes >> 20} MiB) ...", flush=True)
    bandwidth = harness.probe_bandwidth(args.probe_bytes)
    print(f"  read {bandwidth['read_gbs']:.1f} GB/s, copy {bandwidth['copy_gbs']:.1f} GB/s", flush=True)

    rows: list[dict] = []
    results: dict = {}         # (provider, batch) -> generate result
    spec: dict = {}            # batch -> spec results (tokens, logits, logits32)
    spec_info: dict = {}
    max_batch = max(args.batches)
    prompts = make_prompts(max_batch, args.prompt, args.model["vocab_size"])
    base = None
    # gc_frozen: the imports' objects are never garbage; the models built below are not frozen
    with harness.gc_frozen():
        if runnable or check:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = build_base(args.model, args.prompt + new_tokens)
            n_params = sum(p.numel() for p in base.parameters())
            print(f"base model: {n_params / 1e6:.1f} M parameters, {n_params * 2 / 1e9:.2f} GB in bf16, "
                  f"built in {time.perf_counter() - start:.1f} s", flush=True)
        built = []   # (provider, model, build seconds): every model is held, so the rounds interleave
        for provider in runnable:
            print(f"{provider.name}: {provider.how}", flush=True)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")    # transformers / bitsandbytes chatter
                    start = time.perf_counter()
                    model = provider.build(lambda: copy.deepcopy(base), mods)
                    built.append((provider, base if model is None else model, time.perf_counter() - start))
                print(f"  built in {built[-1][2]:.1f} s", flush=True)
            except Exception as error:       # a provider that fails is a note, not a crash
                notes.append(f"{provider.name}: failed, {type(error).__name__}: {error}")
                print(f"  {provider.name}: failed, {type(error).__name__}: {error}", flush=True)
        for batch in args.batches:
            prompt = prompts[:batch]
            runs = {}   # provider name -> its timed generates, the providers taking turns per round
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for provider, model, _ in list(built):
                    try:
                        first = generate(model, prompt, 2)            # warm-up, untimed
                        runs[provider.name] = dict(first_prefill_s=first["prefill_s"], rounds=[])
                    except Exception as error:
                        notes.append(f"{provider.name} batch {batch}: failed, {type(error).__name__}: {error}")
                for _ in range(args.rounds):
                    for provider, model, _ in built:
                        if provider.name in runs:
                            runs[provider.name]["rounds"].append(generate(model, prompt, new_tokens))
            for provider, model, build_s in built:
                if provider.name not in runs:
                    continue
                rounds = runs[provider.name]["rounds"]
                result = dict(rounds[0], first_prefill_s=runs[provider.name]["first_prefill_s"])
                timed = [t for r in rounds for t in r["step_s"][args.warmup:]]
                prefill_s = sorted(r["prefill_s"] for r in rounds)[len(rounds) // 2]
                q = harness.quantiles_ms(timed)
                print(f"  {provider.name} batch {batch}: prefill {prefill_s:.3f} s, decode median "
                      f"{q['median_ms']:.1f} ms/step, {batch / (q['median_ms'] / 1e3):.2f} tokens/s",
                      flush=True)
                wb = weight_bytes(model, batch)
                context = args.prompt + args.warmup + (args.steps + 1) / 2
                row = dict(provider=provider.name, how=provider.how, batch=batch, prompt=args.prompt,
                           new_tokens=new_tokens, warmup=args.warmup, rounds=len(rounds), steps=len(timed),
                           build_s=build_s, prefill_s=prefill_s,
                           prefill_first_call_s=result["first_prefill_s"],
                           step_ms=[t * 1e3 for r in rounds for t in r["step_s"]], **q,
                           load_1min=result["load_1min"],
                           cpu_share=min(r["cpu_share"] for r in rounds),
                           tokens_per_s=batch / (q["median_ms"] / 1e3),
                           prefill_tokens_per_s=batch * args.prompt / prefill_s,
                           weight_bytes=wb, weight_mb=wb["total"] / 1e6,
                           weight_bytes_per_token=wb["total"] / batch,
                           kv_bytes_per_step=kv_bytes_per_step(args.model, batch, context),
                           layers=layer_types(model))
                row["weight_gbs"] = wb["total"] / (q["median_ms"] * 1e-3) / 1e9
                row["pct_read_bw"] = 100 * row["weight_gbs"] / bandwidth["read_gbs"]
                row["ideal_ms"] = wb["total"] / (bandwidth["read_gbs"] * 1e9) * 1e3
                if provider.name == NF4LORA:
                    info = nf4lora_paths(model, prompt, result["tokens"])
                    row["nf4lora_path"] = info
                    row["path"] = (f"{info['backend']}/{info['isa']}: decode fused {info['decode_fused']}, "
                                   f"interleaved copy {info['interleaved_copy']}")
                elif provider.name == BNB:
                    row["bitsandbytes_path"] = bnb_paths(model, bnb_messages)
                    row["path"] = row["bitsandbytes_path"]["path"].split(" (")[0]
                else:
                    row["path"] = "torch F.linear bf16"
                rows.append(row)
                results[(provider.name, batch)] = result
        for provider, model, _ in built:
            if check and provider.name == NF4LORA:
                try:
                    spec_info = run_spec(base, model, mods, prompts, args, new_tokens, spec)
                except Exception as error:
                    notes.append(f"{SPEC}: failed, {type(error).__name__}: {error}")
        built = model = None
        gc.collect()
        if check and not spec and all(p.name != NF4LORA for p in runnable):
            # nf4lora was not asked for: quantize it here for the spec only (untimed)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = build_nf4lora(lambda: copy.deepcopy(base), mods)
                    spec_info = run_spec(base, model, mods, prompts, args, new_tokens, spec)
            except Exception as error:
                notes.append(f"{SPEC}: failed, {type(error).__name__}: {error}")
            finally:
                model = None
                gc.collect()
    base = None
    gc.collect()

    # correctness against the spec; nf4lora's rows are judged, the others shown
    for row in rows:
        result = results[(row["provider"], row["batch"])]
        if row["batch"] in spec:
            row.update(judge_row(result, spec[row["batch"]]))
            problems = row.pop("problems")
            if not all(math.isfinite(t) for t in row["step_ms"]):
                problems.append("non-finite time")
            if row["provider"] == NF4LORA:
                row["check"] = "ok" if not problems else "FAILED: " + "; ".join(problems)
                if problems:
                    notes.append(f"{NF4LORA} batch {row['batch']}: {row['check']}; no ratios posted")
                if row["logits1_err"] is None:
                    notes.append(f"{NF4LORA} batch {row['batch']}: the first greedy token differs from "
                                 f"{SPEC}'s on every row, so the decode step's logits were not compared")
            else:
                row["check"] = "shown, not judged"
        else:
            row["check"] = "not checked"
    for base_name in (DENSE, BNB):
        for row in rows:
            ref = next((r for r in rows if r["provider"] == base_name and r["batch"] == row["batch"]), None)
            ok = ref is not None and not row["check"].startswith("FAILED")
            row[f"x_vs_{base_name}"] = row["tokens_per_s"] / ref["tokens_per_s"] if ok else None
            row[f"prefill_x_vs_{base_name}"] = ref["prefill_s"] / row["prefill_s"] if ok else None

    target = None
    nf4 = next((r for r in rows if r["provider"] == NF4LORA and r["batch"] == 1), None)
    if nf4 is not None and nf4.get(f"x_vs_{DENSE}") is not None and not args.quick:
        ratio = nf4[f"x_vs_{DENSE}"]
        target = dict(goal=f"nf4lora decode tokens/s >= {TARGET_X_DENSE}x {DENSE}'s at batch 1 (issue 13)",
                      ratio=ratio, met=ratio >= TARGET_X_DENSE)

    load_end = harness.load_average()
    external = max(load_start[0] if load_start else 0.0,
                   (load_end[0] - threads) if load_end else 0.0)   # our own run adds ~threads
    high_load = external > 0.5 * cpus
    if high_load:
        shares = [r["cpu_share"] for r in rows]
        spread = f"{min(shares):.2f}-{max(shares):.2f}" if shares else "-"
        notes.append(f"HIGH LOAD: load average {load_start} at the start, {load_end} at the end, on "
                     f"{cpus} CPUs ({threads} threads ours; a load average also remembers the last "
                     "minutes, this run's own setup included): other processes may have shared the "
                     "machine, which on a 2-core box distorts timings by up to 10x. The rows' CPU share "
                     f"(~1 when this process had its cores) ranged {spread}; compare rows of this run "
                     "only, and rerun on a quiet machine for firm numbers")
    if args.quick:
        notes.append("--quick: a tiny model whose weights fit in the cache; the numbers mean nothing")

    print()
    print(f"CPU {cpu_model}, {threads} threads, read bandwidth {bandwidth['read_gbs']:.1f} GB/s; "
          f"load average {load_start} -> {load_end}{' (HIGH: see the note)' if high_load else ''}")
    print(harness.format_table(rows, TIME_COLUMNS))
    if spec:
        print()
        print(f"logits against {SPEC} in float32 (relative L2 error; tol = {TOL_FACTOR:g} x the spec's own "
              f"bf16 error, >= {TOL_FACTOR:g} x 2^-8), and greedy tokens equal to {SPEC}'s bf16 run:")
        print(harness.format_table(rows, CHECK_COLUMNS))
    if target:
        print(f"\ntarget: {target['goal']}: measured {target['ratio']:.2f}x "
              f"({'met' if target['met'] else 'NOT met'})")
    harness.print_notes(notes)
    return harness.save_run(
        args.out, "decode", benchmark="decode", argv=argv,
        metadata=harness.metadata(
            benchmark="decode", cpu_model=cpu_model,
            versions_extra=harness.package_versions(["transformers", "accelerate"]),
            load_average=dict(start=load_start, end=load_end, high=high_load, cpus=cpus)),
        config={
            "quick": args.quick,
            "model": dict(args.model, architecture="LlamaForCausalLM",
                          weights=f"random, torch.manual_seed({SEED}), cast to bf16"),
            "why_this_size": __doc__.split("Model size (default): ")[1].split("\n\n")[0].replace("\n", " "),
            "batches": args.batches, "prompt": args.prompt, "new_tokens": new_tokens,
            "warmup": args.warmup, "steps": args.steps,
            "generate": "model.generate(do_sample=False, use_cache=True), DynamicCache, no EOS",
            "quantization": dict(quant_type="nf4", blocksize=BLOCKSIZE, double_quant=True,
                                 compute_dtype="bfloat16", skipped=["lm_head"]),
            "prompts": f"random token ids in [3, vocab), torch.Generator seed {SEED}",
            "providers": [dict(name=p.name, how=p.how) for p in wanted],
            "check": dict(enabled=check, tolerance=f"{TOL_FACTOR} x max(spec bf16 vs float32 error, 2^-8)",
                          spec=spec_info),
        },
        bandwidth=bandwidth, rows=rows, target=target, notes=notes)


def run_spec(base, quantized, mods, prompts, args, new_tokens, spec: dict) -> dict:
    """Fill spec[batch] with the spec's greedy tokens and bf16 logits, and the float32 logits
    of steps 0 and 1 (teacher forced with the spec's first token). Untimed."""
    print(f"{SPEC}: dense bf16 on nf4lora's weights decoded by nf4lora.reference (untimed)", flush=True)
    start = time.perf_counter()
    model = build_spec(base, quantized, mods)
    for batch in args.batches:
        result = generate(model, prompts[:batch], new_tokens)
        spec[batch] = dict(tokens=result["tokens"], logits=result["logits"])
    model.float()
    for batch in args.batches:
        spec[batch]["logits32"] = float32_logits(model, prompts[:batch], spec[batch]["tokens"])
    model = None
    gc.collect()
    seconds = time.perf_counter() - start
    print(f"  done in {seconds:.1f} s", flush=True)
    return dict(how="copy of the bf16 base; each nf4lora Linear4bit's weight <- its "
                    "dequantized_weight(bf16) under nf4lora's reference backend; float32 logits by "
                    "model.float() on the prompt + the spec's first greedy token", seconds=seconds)


if __name__ == "__main__":
    main()
