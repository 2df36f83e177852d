"""DoRA on a 4-bit layer, forward + backward: nf4lora's DoRA against the same layer with plain
LoRA (issue 15's target: <= 1.3x) and against PEFT's DoRA on bitsandbytes' Linear4bit holding
the same kind of weight (target: nf4lora >= 3x faster), and the peak memory each adds; plain
LoRA also against PEFT's LoRA on the dense bf16 layer (issue 13's training-shape target:
nf4lora's QLoRA <= 1.1x of it at M = 512).

    python -m bench.bench_dora [--shape 4096x4096] [--tokens 1 512] [--rank 16]
                               [--reps 5] [--threads N] [--no-memory] [--out DIR]
                               [--device cpu|cuda] [--plan]

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

--device cuda (scripts/gpu_check.sh): the three nf4lora rows (LoRA, DoRA with the adapter
changed every call, DoRA with the norm kept) on CUDA tensors, once per nf4lora GPU backend
usable here: nf4lora[cuda] (its route, backends/cuda.py matmul_path: DoRA's M + r rows
and every backward's grad @ W through Triton's kernels, W read packed), nf4lora[cuda]
no-triton (the same backend with that route off, TRITON_ROUTE_ENABLED = False: dequantize
+ cuBLAS past the GEMV, the route before it) and nf4lora[triton]. Each provider's y and dx
of a call first checked against the spec (float32 math on the decoded weight, up to bf16:
bench_matmul.mismatch), then timed: CUDA-event time per forward + backward (a backend's
providers take turns; default 30 reps) and the GPU's busy time per call from the profiler
(kernel ms). Issue 15's target: DoRA <= 1.3x LoRA at M = 1 on the GPU. PEFT's and the
dense rows, and the peak memory (a resident-set measure), stay CPU rows, skipped with a
note. --plan prints what a run would time and exits (the dry run's check).
"""
from __future__ import annotations

import argparse
import contextlib
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


def build(provider: str, shape, rank: int, device: str = "cpu"):
    """A one-layer module of `provider` over a random [out, in] weight (fixed seed), its
    dense layer on `device` before nf4lora quantizes it (by the current backend)."""
    out_features, in_features = shape
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False)).to(device)
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


def step_of(model, tokens: int, in_features: int, provider: str, device: str = "cpu"):
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1)).to(device, DTYPE)
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
    step.x = x    # the GPU rows' spec check reads its gradient
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


# --- --device cuda -------------------------------------------------------------------------

NF4LORA_PROVIDERS = PROVIDERS[:3]      # the rows that run on CUDA tensors
GPU_COLUMNS = [("provider", "provider", "s"), ("backend", "backend", "s"), ("shape", "shape", ""),
               ("M", "tokens", "d"), ("r", "rank", "d"), ("median ms", "median_ms", ".4f"),
               ("p20 ms", "p20_ms", ".4f"), ("p80 ms", "p80_ms", ".4f"),
               ("kernel ms", "kernel_ms", ".4f"), ("x LoRA", "x_vs_lora", ".2f"),
               ("kernel x LoRA", "kernel_x_vs_lora", ".2f")]
NO_TRITON = " no-triton"


@contextlib.contextmanager
def gpu_backend(variant: str):
    """nf4lora backend of `variant` ("cuda", "cuda no-triton", "triton") inside the block;
    no-triton: the CUDA backend's route to Triton off (bench_matmul.without_triton_route)."""
    from bench.bench_matmul import without_triton_route
    backend = variant.split()[0]
    context = without_triton_route if variant.endswith(NO_TRITON) else harness.using_backend
    with context(backend):
        yield


def label_of(variant: str) -> str:
    """"cuda no-triton" -> "nf4lora[cuda] no-triton", bench_matmul's provider names."""
    backend, _, rest = variant.partition(" ")
    return f"nf4lora[{backend}]" + (f" {rest}" if rest else "")


def gpu_variants(backends: Sequence[str]) -> list[str]:
    """The backend variants timed for these usable GPU backends (cuda also without Triton)."""
    return [v for b in backends for v in ((b, b + NO_TRITON) if b == "cuda" else (b,))]


def spec_check(model, step, y) -> Optional[str]:
    """None if y and x's gradient of one step() (the backward of y.sum()) are the spec up to
    bf16 arithmetic (bench_matmul.mismatch), else what is off. The spec, float32 on the
    decoded weight: y = s_o (x W^T + c x A^T B^T), s_o = m_o / ||W + c B A||_o for DoRA (1
    for LoRA), so every row of dx is sum_o s_o (W + c B A)_o."""
    import nf4lora.functional as F
    from bench.bench_matmul import mismatch, root_sum_squares
    layer = model[0]
    packed = layer.base_layer.weight
    W = F.dequantize_4bit(packed, packed.quant_state).float()
    A, B, c = layer.lora_A.weight.float(), layer.lora_B.weight.float(), layer.scaling
    x = step.x.detach().float()
    h = x @ A.t()
    delta = c * B @ A
    scale = torch.ones(W.shape[0], device=W.device)
    if layer.use_dora:
        scale = layer.lora_magnitude_vector.weight.float() / (W + delta).norm(dim=1)
    want_y = scale * (x @ W.t() + c * h @ B.t())
    terms_y = scale.abs() * (root_sum_squares(x, W.t()) + c * root_sum_squares(h, B.t()))
    rows = x.shape[0]
    want_dx = (scale[:, None] * (W + delta)).sum(0).expand(rows, -1)
    terms_dx = (scale[:, None] ** 2 * (W * W + delta * delta)).sum(0).sqrt().expand(rows, -1)
    why = mismatch(y.detach(), want_y, terms_y)
    if why:
        return f"y: {why}"
    why = mismatch(step.x.grad, want_dx, terms_dx)
    return f"dx: {why}" if why else None


def gpu_steps(shape, tokens: int, rank: int, device: str = "cuda",
              providers: Sequence[str] = NF4LORA_PROVIDERS):
    """({provider: zero-argument forward + backward step} of the nf4lora rows `providers` on
    `device`'s tensors, {provider: its model}), built and quantized by the current backend."""
    models = {provider: build(provider, shape, rank, device) for provider in providers}
    steps = {provider: step_of(models[provider], tokens, shape[1], provider, device)
             for provider in providers}
    return steps, models


def check_steps(steps, models) -> dict:
    """{provider: None, or how its step is off the spec}: one step each (x's gradient
    cleared around it: it accumulates over calls)."""
    found = {}
    for provider, step in steps.items():
        step.x.grad = None
        found[provider] = spec_check(models[provider], step, step())
        step.x.grad = None
    return found


def main_gpu(args, argv) -> dict:
    """--device cuda: the nf4lora rows per GPU backend variant, checked, then timed."""
    from bench.bench_codec import gpu_kernel_seconds, gpu_time_calls, print_plan
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    cpu_only = [p for p in PROVIDERS if p not in NF4LORA_PROVIDERS and p in args.providers]
    providers = [p for p in NF4LORA_PROVIDERS if p in args.providers]
    cpu_note = ((f"{', '.join(cpu_only)}: CPU rows only (--device cpu); " if cpu_only else "")
                + "peak memory: a resident-set measure, CPU only")
    if args.plan:   # every GPU backend, available here or not: nothing touches a GPU
        names = [f"{p} {label_of(v)}" for v in gpu_variants(harness.GPU_BACKENDS)
                 for p in providers]
        return print_plan("cuda", ["dora"], [shape], names,
                          harness.nf4lora_gpu_backends()[1] + [cpu_note],
                          extra=f" tokens={' '.join(map(str, args.tokens))} r={args.rank}")
    backends, notes = harness.nf4lora_gpu_backends()
    notes.append(cpu_note)
    reps = args.reps or 30
    rows = []
    for variant in gpu_variants(backends):
        label = label_of(variant)
        for tokens in args.tokens:
            with gpu_backend(variant):
                steps, models = gpu_steps(shape, tokens, args.rank, providers=providers)
                wrong = {p: why for p, why in check_steps(steps, models).items() if why}
                for provider, why in wrong.items():
                    notes.append(f"{label} {provider} M = {tokens}: not timed, wrong result: {why}")
                timed = [p for p in steps if p not in wrong]
                times = gpu_time_calls([steps[p] for p in timed], reps) if timed else []
                for i, provider in enumerate(timed):   # the providers took turns
                    kernel_s = gpu_kernel_seconds([steps[provider]] * 10)
                    rows.append(dict(provider=provider, backend=label, shape=list(shape),
                                     tokens=tokens, rank=args.rank,
                                     **harness.quantiles_ms(times[i::len(timed)]),
                                     kernel_ms=None if kernel_s is None else kernel_s * 1e3))
            del steps, models
            torch.cuda.empty_cache()
    harness.add_gpu_ratios(rows, "x_vs_lora", lambda row: next(
        (r for r in rows if r["backend"] == row["backend"] and r["tokens"] == row["tokens"]
         and r["provider"] == PROVIDERS[0]), None))
    return harness.print_and_save_gpu_table(
        args, argv, "dora-gpu", "dora", f"{shape[0]}x{shape[1]} NF4 + double quant, bf16, "
        f"forward + backward, r = {args.rank}", rows, GPU_COLUMNS, notes)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x4096", help="OUTxIN (default 4096x4096)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, help="timed calls per provider (default 5; "
                        "--device cuda: 30)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-child", choices=PROVIDERS, help=argparse.SUPPRESS)
    harness.add_threads_flag(parser)
    harness.add_out_flag(parser)
    harness.add_device_flags(parser, "the nf4lora rows on CUDA tensors, per nf4lora GPU backend",
                             "(with --device cuda) what")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return main_gpu(args, argv)
    args.reps = args.reps or 5
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
