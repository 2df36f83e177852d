"""DoRA on a 4-bit layer, forward + backward: nf4lora's DoRA against the same layer with plain
LoRA (issue 15's target: <= 1.3x) and against PEFT's DoRA on bitsandbytes' Linear4bit holding
the same kind of weight (target: nf4lora >= 3x faster), and the peak memory each adds; plain
LoRA also against PEFT's LoRA on the dense bf16 layer (issue 13's training-shape target:
nf4lora's QLoRA <= 1.1x of it at M = 512).

    python -m bench.bench_dora [--shape 4096x4096] [--tokens 1 512] [--rank 16]
                               [--reps 5] [--threads N] [--no-memory] [--out DIR]

bf16 activations that require grad (a layer inside a model), NF4 + double quantization,
blocksize 64, adapters in float32 cast to bf16 (PEFT's default). One call = forward and
backward of one layer; median of --reps after a warm-up, providers interleaved rep by rep.
With --threads 1 the clock is the thread's CPU time (time.thread_time: a shared machine's
other processes do not inflate it); otherwise wall time.

Memory: each provider again in a fresh process: the layer built, then one forward +
backward; "peak MiB" is the resident-set high-water mark of that call above the resident
set before it (Linux's VmHWM, reset through /proc/self/clear_refs). What DoRA keeps
between calls (||W_o||^2, 4 bytes a row) is counted in its first call. The dense W in
bf16 of a 4096x4096 layer is 32 MiB, in float32 64 MiB.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from typing import Optional, Sequence

import torch

from bench import harness

DTYPE = torch.bfloat16
# "nf4lora DoRA": the adapter's weights change before every call (an optimizer step each
# call), so the norm is recomputed every time; "kept norm": they do not (the micro-batches of
# gradient accumulation, evaluation), so the layer reuses it (nf4lora.nn.lora.DoraNormCache).
DENSE = "dense bf16 LoRA"       # PEFT's LoRA on the bf16 nn.Linear: what QLoRA replaces
PROVIDERS = ("nf4lora LoRA", "nf4lora DoRA", "nf4lora DoRA, kept norm", "PEFT DoRA on bitsandbytes",
             DENSE)
COLUMNS = [("provider", "provider", "s"), ("shape", "shape", ""), ("M", "tokens", "d"),
           ("r", "rank", "d"), ("median ms", "median_ms", ".2f"), ("p20 ms", "p20_ms", ".2f"),
           ("p80 ms", "p80_ms", ".2f"), ("x LoRA", "x_vs_lora", ".2f"),
           ("x nf4lora DoRA", "x_vs_dora", ".2f"), ("x dense", "x_vs_dense", ".2f"),
           ("peak MiB", "peak_mib", ".1f")]


def build(provider: str, shape, rank: int):
    """A one-layer module of `provider` over a random [out, in] weight (fixed seed)."""
    out_features, in_features = shape
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
    if provider.startswith("nf4lora"):
        import nf4lora
        nf4lora.replace_linear(dense, quant_type="nf4", compute_dtype=DTYPE, progress=False)
        model = nf4lora.add_lora(dense, r=rank, lora_alpha=2 * rank, target_modules=["0"],
                                 use_dora="DoRA" in provider)
        layer = model[0]
        torch.nn.init.normal_(layer.lora_B.weight, std=0.01)    # a trained adapter
        return model
    import peft
    if provider == DENSE:     # float32 adapters on the bf16 layer, as PEFT makes them
        return peft.get_peft_model(dense.to(DTYPE), peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["0"], init_lora_weights=False))
    import bitsandbytes as bnb
    import nf4lora.integrations.peft  # noqa: F401  (PEFT's own dispatch still takes bnb layers)
    harness.bitsandbytes_4bit(dense, bnb, DTYPE)
    model = peft.get_peft_model(dense, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                       target_modules=["0"], use_dora=True,
                                                       init_lora_weights=False))
    return model


def step_of(model, tokens: int, in_features: int, provider: str):
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1)).to(DTYPE)
    x.requires_grad_()
    # An in-place no-op on the adapter, as an optimizer step writes it: its version changes.
    changed = [p for p in model.parameters() if p.requires_grad] if provider == "nf4lora DoRA" else []

    def step():
        with torch.no_grad():
            for p in changed:
                p.mul_(1.0)
        y = model(x)
        y.backward(torch.ones_like(y))
        return y
    return step


def peak_mib_in_fresh_process(provider: str, shape, tokens: int, rank: int) -> Optional[float]:
    command = [sys.executable, "-m", "bench.bench_dora", "--memory-child", provider,
               "--shape", f"{shape[0]}x{shape[1]}", "--tokens", str(tokens), "--rank", str(rank)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["peak_mib"] if done.returncode == 0 and lines else None


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def memory_child(provider: str, shape, tokens: int, rank: int) -> None:
    model = build(provider, shape, rank)
    step = step_of(model, tokens, shape[1], provider)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                       # reset VmHWM to the current resident set
    before = _kib("VmRSS:")
    step()
    print(json.dumps({"peak_mib": (_kib("VmHWM:") - before) / 1024}))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x4096", help="OUTxIN (default 4096x4096)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-child", choices=PROVIDERS, help=argparse.SUPPRESS)
    harness.add_threads_flag(parser)
    harness.add_out_flag(parser)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    if args.memory_child:
        return memory_child(args.memory_child, shape, args.tokens[0], args.rank)
    rows = []
    with harness.threads_set_to(args.threads):
        clock = harness.one_thread_clock()
        models = {provider: build(provider, shape, args.rank) for provider in args.providers}
        for tokens in args.tokens:
            steps = [step_of(models[provider], tokens, shape[1], provider)
                     for provider in args.providers]
            for step in steps:      # each provider's first call (one-time work) untimed
                step()
            times = harness.time_calls(steps, args.reps, clock=clock)   # interleaved
            for i, provider in enumerate(args.providers):
                rows.append(dict(provider=provider, shape=list(shape), tokens=tokens,
                                 rank=args.rank, clock=clock.__name__,
                                 **harness.quantiles_ms(times[i::len(steps)])))
        threads = torch.get_num_threads()
    for row in rows:
        same_m = {r["provider"]: r["median_ms"] for r in rows if r["tokens"] == row["tokens"]}
        row["x_vs_lora"] = row["median_ms"] / same_m.get("nf4lora LoRA", float("nan"))
        row["x_vs_dora"] = row["median_ms"] / same_m.get("nf4lora DoRA", float("nan"))
        row["x_vs_dense"] = row["median_ms"] / same_m.get(DENSE, float("nan"))
        if not args.no_memory:
            row["peak_mib"] = peak_mib_in_fresh_process(row["provider"], shape, row["tokens"],
                                                         args.rank)
    heading = (f"{shape[0]}x{shape[1]} NF4 + double quant, bf16, forward + backward, "
               f"r = {args.rank}, {threads} threads")
    return harness.print_and_save_table(args, argv, "dora", "dora", heading, rows, COLUMNS)


if __name__ == "__main__":
    main()
