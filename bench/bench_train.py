"""Benchmark one QLoRA training step (forward + backward + AdamW) on a small Llama built from
a config: tokens/s of nf4lora against bitsandbytes + PEFT and dense bf16 + PEFT.

    python -m bench.bench_train [--quick] [--steps N] [--warmup N] [--batch B] [--seq S]
                                [--threads N] [--providers NAME ...] [--profile] [--out DIR]

Every provider trains the same model: a transformers LlamaForCausalLM built from a
LlamaConfig with random weights (seeded; nothing is downloaded), cast to bf16, on the same
batches of random token ids (labels = inputs), with the same LoRA (r=16, alpha=32, no
dropout, on q, k, v, o, gate, up and down projections; lm_head and embeddings stay dense
and frozen) and the same optimizer (torch AdamW, lr 1e-3, on the adapters only). bf16
compute everywhere; the adapter weights are float32, as PEFT keeps them.

Providers (--providers picks some; one that cannot be imported is a note, never a crash):
  nf4lora            nf4lora.replace_linear (NF4, double quantization, blocksize 64, bf16
                     compute) + nf4lora.add_lora: nf4lora's own integration
  nf4lora+peft       the same replace_linear, then peft.get_peft_model: PEFT on nf4lora's
                     Linear4bit (nf4lora.integrations.peft registers its fused LoRA layer)
  bitsandbytes+peft  every nn.Linear but lm_head replaced by bitsandbytes.nn.Linear4bit (NF4,
                     compress_statistics=True, blocksize 64, compute_dtype bf16), quantized on
                     CPU by hand (what transformers' BitsAndBytesConfig loading does; the model
                     is marked is_loaded_in_4bit as transformers marks it), then get_peft_model
  dense-bf16+peft    the bf16 model as it is + get_peft_model: what you run without quantizing

Timing: `--warmup` untimed steps (lazy initialization, first-touch pages), then `--steps`
timed steps; a step is forward + loss + backward + optimizer.step + zero_grad, wall clock.
The row reports the median (p20, p80, min) and tokens/s = batch x seq / median.

Correctness, so a broken provider is visible (it keeps its time but posts no ratio):
every provider gets the same adapter weights (seeded per layer name; B is not zero as in
PEFT's init, so that step 1 already runs and differentiates the adapter path), and its
step 1 (loss, logits, gradients of every lora_A and lora_B) must agree with dense bf16
within the NF4 rounding. nf4lora's providers must also agree tightly with `nf4-spec`: the
dense bf16 + PEFT model whose projections hold nf4lora's 4-bit weights decoded by
nf4lora.reference (the same codes, bf16 compute; run for step 1 only, untimed). bitsandbytes
is not that reference: its CPU kernels' results depend on the CPU (on AVX-512 CPUs its
dequantize splits blocks that span rows, e.g. --quick's 176-wide MLP rows), so its
distance to the spec is reported, and explained in a note when large, but judged against
dense bf16 only. All losses are printed and saved, so diverging curves show too.

Model size: hidden 512, MLP 1408, 4 layers, 8 heads of 64, vocab 4096: the proportions of
the small Llamas (MLP 2.75x hidden, lm_head ~1/6 of the projections' FLOPs) scaled so that
a step takes seconds, not minutes, on 2 cores: on CPUs without avx512_bf16/AMX, torch's
bf16 GEMMs run ~8x slower than float32 ones, and the backward's `grad @ W` layout ~10x
slower still (the JSON's gemm_probe measures both in the same run). Both baselines run
bf16 GEMMs; nf4lora's CPU backend runs its GEMMs in float32 on such CPUs (bf16 in and out),
so on this machine kind the ratio measures that choice as much as the kernels.
`--hidden/--intermediate/--layers/--heads/--vocab` override the size.
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import re
import statistics
import time
import warnings
import zlib
from typing import Optional

import torch
from torch import nn

from . import harness

DTYPE = torch.bfloat16
RANK, ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCKSIZE = 64
LR = 1e-3
B_BOUND = 0.25 / math.sqrt(RANK)   # LoRA B ~ U(+-B_BOUND): the adapter adds ~1/3 of a projection's output
SEED = 0

# hidden 512 / MLP 1408 / 8 heads of 64 / vocab 4096: the proportions of the issue's
# example (hidden 1024, MLP 2816, vocab 8192) at a quarter of its FLOPs. On the 2-core
# AVX2 machine this one took ~40 s per bitsandbytes + PEFT or dense bf16 step at 4 x 128
# tokens (most of it in bf16 `grad @ W`), ~10 s per nf4lora step; the example
# would take minutes per step.
FULL_MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)
QUICK_MODEL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
FULL = dict(model=FULL_MODEL, batch=4, seq=128, steps=5, warmup=1)
QUICK = dict(model=QUICK_MODEL, batch=2, seq=32, steps=2, warmup=1)

BASELINE = "bitsandbytes+peft"
DENSE = "dense-bf16+peft"
SPEC = "nf4-spec"         # the step-1 reference for nf4lora's providers (not timed, not a row)
PROVIDERS = ("nf4lora", "nf4lora+peft", BASELINE, DENSE)
TARGET_RATIO = 1.3   # the issue: nf4lora >= 1.3x the tokens/s of bitsandbytes + PEFT

# Agreement of step 1 (loss: absolute difference; logits and adapter gradients: relative L2
# error) with dense bf16 (loose: NF4 rounding) and, for nf4lora's providers, with nf4-spec
# (tight: the same 4-bit codes in the same dtype, so only bf16 rounding order). A kernel
# returning zeros, a wrong scale or a wrong gradient lands near 1 or above. Measured, full
# model: NF4 vs dense 0.29 (logits), 0.36 (dA), 0.35 (dB), loss 3e-3 (a random-weight
# Llama's residual stream is mostly its quantized layers' outputs, so NF4's ~10% weight
# error shows in full); nf4lora vs the same codes (then bitsandbytes on an AVX2 CPU) 0.012,
# 0.014, 0.013, loss 7e-4. --quick model: 0.10-0.14 and 0.008-0.010.
TOLERANCE_DENSE = dict(loss=0.05, logits=0.6, grad_A=0.6, grad_B=0.6)
TOLERANCE_SAME_CODES = dict(loss=0.01, logits=0.05, grad_A=0.05, grad_B=0.05)


# --- model and data -------------------------------------------------------------------------

def build_base(model_cfg: dict, seq: int, seed: int = SEED) -> nn.Module:
    """LlamaForCausalLM from a LlamaConfig with seeded random weights, cast to bf16."""
    import transformers
    config = transformers.LlamaConfig(**model_cfg, max_position_embeddings=max(seq, 128),
                                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    return model.to(DTYPE)


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int = SEED) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (batch, seq), generator=generator) for _ in range(n)]


def lora_config(peft):
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                           target_modules=list(TARGETS), task_type="CAUSAL_LM")


_ADAPTER_NAME = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def adapter_key(name: str) -> Optional[tuple[str, str]]:
    """(layer path, "A" or "B") of a LoRA parameter, the same for nf4lora's names
    (`model.layers.0.self_attn.q_proj.lora_A.weight`) and PEFT's
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`); else None."""
    match = _ADAPTER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int = SEED) -> int:
    """Same LoRA weights in every provider, drawn from generators seeded by the layer's path:
    A ~ U(+-1/sqrt(in)) (the bound of kaiming_uniform(a=sqrt(5)), PEFT's and nf4lora's init)
    and B ~ U(+-B_BOUND), not PEFT's B = 0: with B = 0 the adapters would neither change
    step 1's output nor get a gradient on A, so a broken adapter path would pass the checks.
    (Timing does not depend on the values.) Returns the number of adapter matrices."""
    count = 0
    for name, param in model.named_parameters():
        key = adapter_key(name)
        if key is None:
            continue
        path, which = key
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{path}.{which}".encode()))
        bound = 1 / math.sqrt(param.shape[1]) if which == "A" else B_BOUND
        param.copy_(torch.rand(param.shape, generator=generator) * (2 * bound) - bound)
        count += 1
    return count


# --- providers ------------------------------------------------------------------------------

# build(model, modules): the model (a copy of the bf16 base) with its 4-bit layers and adapters.
Provider = harness.ModelProvider


def _nf4lora_quantize(model: nn.Module, mods: dict) -> nn.Module:
    return mods["nf4lora"].replace_linear(model, quant_type="nf4", compute_dtype=DTYPE,
                                          compress_statistics=True, progress=False)


def build_nf4lora(model, mods):
    model = _nf4lora_quantize(model, mods)
    return mods["nf4lora"].add_lora(model, r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS))


def build_nf4lora_peft(model, mods):
    # importing nf4lora.integrations.peft (in `needs`) registered nf4lora's PEFT layer
    return mods["peft"].get_peft_model(_nf4lora_quantize(model, mods), lora_config(mods["peft"]))


def build_bnb_peft(model, mods):
    # flagged is_loaded_in_4bit, as transformers' bitsandbytes loading flags it: PEFT then
    # picks its bitsandbytes LoRA layer
    model = harness.bitsandbytes_4bit(model, mods["bitsandbytes"], DTYPE, BLOCKSIZE)
    return mods["peft"].get_peft_model(model, lora_config(mods["peft"]))


def build_dense_peft(model, mods):
    return mods["peft"].get_peft_model(model, lora_config(mods["peft"]))


def build_spec_reference(model, mods):
    """Dense bf16 + PEFT on nf4lora's 4-bit weights decoded by nf4lora.reference: what the
    4-bit providers compute, in plain torch ops, from the same codes."""
    model = _nf4lora_quantize(model, mods)
    for name, module, weight in harness.spec_weights(model, DTYPE):
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          dtype=DTYPE, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.detach().to(DTYPE), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dense)
    return build_dense_peft(model, mods)


def all_providers() -> list[Provider]:
    return [
        Provider("nf4lora", "nf4lora.replace_linear + nf4lora.add_lora", ("nf4lora",), build_nf4lora),
        Provider("nf4lora+peft", "nf4lora.replace_linear + peft.get_peft_model",
                 ("nf4lora", "nf4lora.integrations.peft", "peft"), build_nf4lora_peft),
        Provider(BASELINE, "bitsandbytes.nn.Linear4bit + peft.get_peft_model",
                 ("bitsandbytes", "peft"), build_bnb_peft),
        Provider(DENSE, "bf16 nn.Linear + peft.get_peft_model", ("peft",), build_dense_peft),
    ]


def quantized_layer_types(model: nn.Module) -> dict[str, int]:
    """Class names of the modules holding the projections' base weights, counted."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS + ("base_layer",) and not list(module.children()):
            kind = f"{type(module).__module__.split('.')[0]}.{type(module).__name__}"
            counts[kind] = counts.get(kind, 0) + 1
    return counts


# --- training loop --------------------------------------------------------------------------

def _adapter_grads(model: nn.Module, which: str) -> dict[str, torch.Tensor]:
    return {key[0]: p.grad.detach().float().clone() for name, p in model.named_parameters()
            if (key := adapter_key(name)) and key[1] == which and p.grad is not None}


def train(name: str, model: nn.Module, batches: list[torch.Tensor], warmup: int,
          profile: bool) -> dict:
    """Run len(batches) steps; the first `warmup` are untimed. Returns times, losses, the
    first step's logits and adapter gradients, and optionally a profile of one more step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    model.train()
    times, losses, captured = [], [], {}
    total = len(batches)
    for step, ids in enumerate(batches):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        paused = time.perf_counter()
        if step == 0:                # what the checks compare; kept off the clock
            captured = dict(logits=out.logits.detach().float(), grad_A=_adapter_grads(model, "A"),
                            grad_B=_adapter_grads(model, "B"))
        resumed = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()
        seconds = (time.perf_counter() - resumed) + (paused - start)
        del out
        losses.append(loss)
        if step >= warmup:
            times.append(seconds)
        label = "warm-up" if step < warmup else "timed"
        print(f"  {name}: step {step + 1}/{total} ({label}) {seconds:.2f} s, loss {loss:.4f}", flush=True)
    result = dict(times=times, losses=losses, **captured, n_trainable=sum(p.numel() for p in trainable))
    if profile:
        result["profile"] = profile_step(model, optimizer, batches[-1])
    return result


def profile_step(model: nn.Module, optimizer, ids: torch.Tensor, top: int = 14) -> dict:
    """One more step under torch.profiler: the ops with the most self CPU time, and the
    same split by input shapes (which GEMM: a projection, lm_head, attention, LoRA)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def table(events, shapes: bool) -> list[dict]:
        events = sorted((e for e in events if e.self_cpu_time_total > 0),
                        key=lambda e: e.self_cpu_time_total, reverse=True)
        return [dict(op=e.key + (f" {e.input_shapes}" if shapes else ""),
                     self_ms=e.self_cpu_time_total / 1e3, calls=e.count,
                     pct=100 * e.self_cpu_time_total / total_us) for e in events[:top]]

    total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    return dict(total_self_ms=total_us / 1e3, ops=table(prof.key_averages(), False),
                ops_by_shape=table(prof.key_averages(group_by_input_shape=True), True))


# --- checks ---------------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _rel_dict(got: dict, want: dict) -> Optional[float]:
    keys = sorted(want)
    if sorted(got) != keys:
        return math.inf
    return _rel(torch.cat([got[k].flatten() for k in keys]), torch.cat([want[k].flatten() for k in keys]))


def errors(result: dict, reference: dict) -> dict:
    """One provider's first step against another's: loss difference, relative L2 errors."""
    return dict(d_loss=result["losses"][0] - reference["losses"][0],
                logits=_rel(result["logits"], reference["logits"]),
                grad_A=_rel_dict(result["grad_A"], reference["grad_A"]),
                grad_B=_rel_dict(result["grad_B"], reference["grad_B"]))


def judge(errs: dict, tolerance: dict, against: str) -> list[str]:
    bad = []
    if not abs(errs["d_loss"]) <= tolerance["loss"]:             # NaN fails too
        bad.append(f"first loss {errs['d_loss']:+.3g} from {against}'s")
    for key in ("logits", "grad_A", "grad_B"):
        if not errs[key] <= tolerance[key]:
            bad.append(f"{key} rel. error {errs[key]:.3g} > {tolerance[key]} against {against}")
    return bad


def spec_step1(base: nn.Module, batch: torch.Tensor, mods: dict) -> Optional[dict]:
    """Step 1 of the spec reference (build_spec_reference), or None if it cannot be built."""
    for name in ("nf4lora", "peft"):
        if name not in mods:
            module, _, _ = harness.import_optional(name)
            if module is None:
                return None
            mods[name] = module
    print(f"{SPEC}: step-1 reference (dense bf16 + PEFT on the spec's decoding of nf4lora's "
          "4-bit weights; untimed)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # PEFT / transformers chatter
        model = build_spec_reference(copy.deepcopy(base), mods)
        init_adapters(model)
        return train(SPEC, model, [batch], warmup=1, profile=False)


# --- bf16 GEMM probe ------------------------------------------------------------------------

def gemm_probe(tokens: int, hidden: int, intermediate: int, reps: int = 2) -> list[dict]:
    """GFLOP/s of the step's main GEMM shape in the two layouts a frozen linear uses:
    forward y = x @ W^T (F.linear) and backward dx = g @ W, in bf16 and float32."""
    rows = []
    for dtype in (DTYPE, torch.float32):
        x = torch.randn(tokens, hidden, dtype=dtype)
        g = torch.randn(tokens, intermediate, dtype=dtype)
        w = torch.randn(intermediate, hidden, dtype=dtype)
        for layout, call in (("x @ W^T (forward)", lambda: torch.nn.functional.linear(x, w)),
                             ("g @ W (backward dx)", lambda: g @ w)):
            ms = harness.quantiles_ms(harness.time_calls([call], reps))["median_ms"]
            rows.append(dict(dtype=str(dtype).removeprefix("torch."), layout=layout,
                             shape=[tokens, hidden, intermediate], ms=ms,
                             gflops=2 * tokens * hidden * intermediate / (ms * 1e-3) / 1e9))
    return rows


# --- main -----------------------------------------------------------------------------------

MODEL_FLAGS = (("--hidden", "hidden_size"), ("--intermediate", "intermediate_size"),
               ("--layers", "num_hidden_layers"), ("--heads", "num_attention_heads"),
               ("--vocab", "vocab_size"))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny model, batch {QUICK['batch']} x seq {QUICK['seq']}, "
                             f"{QUICK['warmup']} warm-up + {QUICK['steps']} steps: a smoke run, not numbers")
    parser.add_argument("--steps", type=int, help=f"timed steps (default {FULL['steps']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps first, >= 1 (default {FULL['warmup']})")
    parser.add_argument("--batch", type=int, help=f"sequences per step (default {FULL['batch']})")
    parser.add_argument("--seq", type=int, help=f"tokens per sequence (default {FULL['seq']})")
    harness.add_model_bench_flags(parser, PROVIDERS, MODEL_FLAGS, FULL_MODEL)
    parser.add_argument("--profile", action="store_true",
                        help="one extra step per provider under torch.profiler: top ops by self time")
    parser.add_argument("--no-probe", dest="probe", action="store_false",
                        help="skip the bf16/fp32 GEMM probe")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.model = harness.model_from_args(args, MODEL_FLAGS, preset["model"])
    args.model["num_key_value_heads"] = args.model["num_attention_heads"]   # no GQA
    harness.defaults_from_preset(args, preset, ("steps", "warmup", "batch", "seq"))
    if args.steps < 1 or args.warmup < 1 or args.batch < 1 or args.seq < 2:
        parser.error("--steps, --warmup and --batch must be >= 1, --seq >= 2")
    if args.model["hidden_size"] % args.model["num_attention_heads"]:
        parser.error("--hidden must be a multiple of --heads")
    return args


TIME_COLUMNS = [("provider", "provider", ""), ("setup s", "build_s", ".1f"), ("tokens/step", "tokens", "d"),
                ("median s", "median_s", ".3f"), ("p20 s", "p20_s", ".3f"), ("p80 s", "p80_s", ".3f"),
                ("tokens/s", "tokens_per_s", ".1f"), (f"x vs {BASELINE}", f"x_vs_{BASELINE}", ".2f"),
                (f"x vs {DENSE}", f"x_vs_{DENSE}", ".2f")]
CHECK_COLUMNS = [("provider", "provider", ""), ("loss step 1", "loss_first", ".5f"),
                 ("loss last", "loss_last", ".5f")] + [
    (f"{label} vs {short}", f"{key}_vs_{short}", spec) for short in ("dense", "spec")
    for label, key, spec in (("d loss", "d_loss", "+.1e"), ("logits", "logits", ".1e"),
                             ("dA", "grad_A", ".1e"), ("dB", "grad_B", ".1e"))] + [("check", "check", "")]


def main(argv=None) -> dict:
    args = parse_args(argv)
    with harness.threads_set_to(args.threads):
        return _run(args, argv)


def _run(args, argv) -> dict:
    notes: list[str] = []
    load_start = harness.load_average()
    wanted = [p for p in all_providers() if not args.providers or p.name in args.providers]
    tokens = args.batch * args.seq
    print(f"QLoRA training step: Llama {args.model}, batch {args.batch} x seq {args.seq} = {tokens} "
          f"tokens, LoRA r={RANK} alpha={ALPHA} on {','.join(TARGETS)}, bf16, AdamW lr {LR:g}; "
          f"{args.warmup} warm-up + {args.steps} timed steps, {torch.get_num_threads()} threads", flush=True)

    runnable, mods, import_notes, _ = harness.import_providers(wanted)
    notes += import_notes
    transformers = mods.get("transformers")
    if "bitsandbytes" in mods:
        path = "native CPU library" if torch._C._dispatch_has_kernel_for_dispatch_key(
            "bitsandbytes::dequantize_4bit", "CPU") else "pure-PyTorch default"
        notes.append(f"bitsandbytes: dequantize_4bit runs its {path}; matmul_4bit on CPU in training "
                     "= dequantize + torch F.linear (backward: grad @ dequantized W)")

    gemm = []
    if args.probe and transformers is not None:
        print("bf16 / fp32 GEMM probe ...", flush=True)
        gemm = gemm_probe(tokens, args.model["hidden_size"], args.model["intermediate_size"],
                          reps=1 if args.quick else 2)
        for row in gemm:
            print(f"  {row['dtype']:8s} {row['layout']:20s} {'x'.join(map(str, row['shape']))}: "
                  f"{row['ms']:.1f} ms, {row['gflops']:.2f} GFLOP/s", flush=True)

    base = build_base(args.model, args.seq) if runnable else None
    batches = make_batches(args.warmup + args.steps, args.batch, args.seq, args.model["vocab_size"])
    rows, results = [], {}
    for provider in runnable:
        print(f"{provider.name}: {provider.how}", flush=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")       # PEFT / transformers chatter
                start = time.perf_counter()
                model = provider.build(copy.deepcopy(base), mods)
                n_adapters = init_adapters(model)
                build_s = time.perf_counter() - start
                expected = 2 * len(TARGETS) * args.model["num_hidden_layers"]
                if n_adapters != expected:
                    raise RuntimeError(f"found {n_adapters} LoRA matrices, expected {expected}")
                layers = quantized_layer_types(model)
                result = train(provider.name, model, batches, args.warmup, args.profile)
        except Exception as error:       # a provider that fails is a note, not a crash
            notes.append(f"{provider.name}: failed, {type(error).__name__}: {error}")
            print(f"  {provider.name}: failed, {type(error).__name__}: {error}", flush=True)
            continue
        finally:
            model = None
            gc.collect()
        times = result["times"]
        q = harness.quantiles_ms(times)
        row = dict(provider=provider.name, how=provider.how, base_layers=layers,
                   batch=args.batch, seq=args.seq, tokens=tokens, warmup=args.warmup,
                   steps=len(times), build_s=build_s, median_s=q["median_ms"] / 1e3,
                   p20_s=q["p20_ms"] / 1e3, p80_s=q["p80_ms"] / 1e3, min_s=q["min_ms"] / 1e3,
                   step_s=times, tokens_per_s=tokens / statistics.median(times),
                   trainable_params=result["n_trainable"], losses=result["losses"],
                   loss_first=result["losses"][0], loss_last=result["losses"][-1])
        if "profile" in result:
            row["profile"] = result["profile"]
        rows.append(row)
        results[provider.name] = result

    # Step 1 against dense bf16 (NF4 rounding allowed) and, for nf4lora's providers, against
    # the spec on the same codes (tight); bitsandbytes' distance to the spec is shown only.
    spec = spec_step1(base, batches[0], mods) if rows else None
    if spec is None and rows:
        notes.append(f"{SPEC}: could not be built (needs nf4lora and peft); 4-bit rows are "
                     "checked against dense bf16 only")
    for row in rows:
        bad = []
        if DENSE in results and row["provider"] != DENSE:
            errs = errors(results[row["provider"]], results[DENSE])
            row.update({f"{key}_vs_dense": value for key, value in errs.items()})
            bad += judge(errs, TOLERANCE_DENSE, DENSE)
        if spec is not None and row["provider"] != DENSE:
            errs = errors(results[row["provider"]], spec)
            row.update({f"{key}_vs_spec": value for key, value in errs.items()})
            if row["provider"] == BASELINE:
                if judge(errs, TOLERANCE_SAME_CODES, SPEC):
                    notes.append(f"{BASELINE}: step 1 is {errs['logits']:.3g} (logits) from {SPEC}, "
                                 "beyond the same-codes tolerance: bitsandbytes' CPU dequantize is "
                                 "wrong for blocks that span rows on AVX-512 CPUs (README, "
                                 "differences); judged against dense bf16 only")
            else:
                bad += judge(errs, TOLERANCE_SAME_CODES, SPEC)
        if not all(math.isfinite(x) for x in row["losses"]):
            bad.append("non-finite loss")
        row["check"] = "ok" if not bad else "FAILED: " + "; ".join(bad)
        if bad:
            notes.append(f"{row['provider']}: {row['check']}; no ratios posted")
    for base_name in (BASELINE, DENSE):
        base_row = next((r for r in rows if r["provider"] == base_name and r["check"] == "ok"), None)
        for row in rows:
            ok = base_row is not None and row["check"] == "ok"
            row[f"x_vs_{base_name}"] = row["tokens_per_s"] / base_row["tokens_per_s"] if ok else None

    target = None
    nf4 = next((r for r in rows if r["provider"] == "nf4lora"), None)
    if nf4 is not None and nf4.get(f"x_vs_{BASELINE}") is not None and not args.quick:
        ratio = nf4[f"x_vs_{BASELINE}"]
        target = dict(goal=f"nf4lora >= {TARGET_RATIO}x the tokens/s of {BASELINE}",
                      ratio=ratio, met=ratio >= TARGET_RATIO)

    print()
    print(harness.format_table(rows, TIME_COLUMNS))
    print()
    print("agreement of step 1 (loss difference; relative L2 error of logits and LoRA gradients) "
          f"with {DENSE} and {SPEC} (the same 4-bit codes decoded by nf4lora.reference):")
    print(harness.format_table(rows, CHECK_COLUMNS))
    if target:
        print(f"\ntarget: {target['goal']}: measured {target['ratio']:.2f}x "
              f"({'met' if target['met'] else 'NOT met'})")
    for row in rows:
        if "profile" in row:
            prof = row["profile"]
            print(f"\nprofile, {row['provider']}: one step, {prof['total_self_ms']:.0f} ms self CPU time")
            for key in ("ops", "ops_by_shape"):
                print(harness.format_table(prof[key], [("op" + (" [input shapes]" if key != "ops" else ""), "op", ""),
                                                       ("self ms", "self_ms", ".1f"), ("%", "pct", ".1f"),
                                                       ("calls", "calls", "d")]))
    load_end = harness.load_average()
    cpus = os.cpu_count() or 1
    if load_start and load_end and max(load_start[0], load_end[0]) > cpus:
        notes.append(f"load average {load_start[0]} at the start, {load_end[0]} at the end, on {cpus} "
                     "CPUs: other jobs shared the machine, small ops' thread barriers pay for it; "
                     "rerun on a quiet machine for firm numbers")
    harness.print_notes(notes)
    return harness.save_run(
        args.out, "train", benchmark="train", argv=argv,
        metadata=harness.metadata(
            benchmark="train", versions_extra=harness.package_versions(["transformers", "peft", "accelerate"]),
            load_average=dict(start=load_start, end=load_end)),
        config={
            "quick": args.quick, "model": dict(args.model, architecture="LlamaForCausalLM",
                                               weights=f"random, torch.manual_seed({SEED}), cast to bf16"),
            "why_this_size": __doc__.split("Model size: ")[1].split("\n\n")[0].replace("\n", " "),
            "batch": args.batch, "seq": args.seq, "tokens_per_step": tokens, "warmup": args.warmup,
            "steps": args.steps, "lora": dict(r=RANK, alpha=ALPHA, dropout=0.0, targets=list(TARGETS),
                                              init=f"A ~ U(+-1/sqrt(in)), B ~ U(+-{B_BOUND:g}), seeded per layer name"),
            "quantization": dict(quant_type="nf4", blocksize=BLOCKSIZE, double_quant=True,
                                 compute_dtype="bfloat16"),
            "optimizer": dict(name="torch.optim.AdamW", lr=LR, params="LoRA adapters only (float32)"),
            "data": f"random token ids, torch.Generator seed {SEED}; labels = input_ids",
            "providers": [dict(name=p.name, how=p.how) for p in wanted],
            "tolerance": dict(vs_dense=TOLERANCE_DENSE, vs_spec=TOLERANCE_SAME_CODES),
            "profile": args.profile,
        },
        gemm_probe=gemm, rows=rows, target=target, notes=notes)


if __name__ == "__main__":
    main()
