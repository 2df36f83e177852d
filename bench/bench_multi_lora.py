"""Mixed-adapter batches: nf4lora.multi_lora_matmul_4bit (one 4-bit pass for the batch, each
row's adapter gathered) against one single-adapter fused call at the same M (issue 15's
target: <= 1.2x of it), and PEFT's `adapter_names=` forward on the same nf4lora layer, both
ways: routed to multi_lora_matmul_4bit (nf4lora's LoraLinear4bitPeft) and PEFT's own
sub-batch loop (its LoraLayer._mixed_batch_forward: the base layer once for the batch,
then each adapter on its rows, in the adapters' float32), beside the layer's
single-adapter forward (one active adapter: one fused call).

    python -m bench.bench_multi_lora [--shape 4096x4096] [--tokens 8] [--adapters 8]
                                     [--rank 16] [--threads N] [--reps 60] [--out DIR]
                                     [--device cpu|cuda] [--plan]

bf16 activations, NF4 + double quantization, blocksize 64, one layer built by
nf4lora.replace_linear (PEFT's adapters on it, float32 as PEFT keeps them; the op-level rows
get them stacked and cast to bf16 once, outside the timing); the weight stays in cache
(one layer, looped): every provider reads the same bytes, so the ratios compare compute.
The providers take turns call by call (harness.time_calls), so that a burst of load from
other processes lands on all of them; with --threads 1 the clock is the thread's CPU time
(time.thread_time), which other processes on a shared machine do not inflate.

--device cuda (scripts/gpu_check.sh): the two op rows on CUDA tensors, once per nf4lora GPU
backend usable here (nf4lora[cuda]: the mixed-adapter GEMV, one launch; nf4lora[triton]),
each backend's multi_lora_matmul_4bit first checked against the spec (float32 math on the
decoded weight, up to bf16: bench_matmul.mismatch); CUDA-event time per call (the two
providers take turns) and the GPU's busy time per call from the profiler (kernel ms). PEFT's
rows stay CPU rows. --plan prints what a run would time and exits (the dry run's check).
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import torch

from bench import harness
from bench.bench_codec import gpu_kernel_seconds, gpu_time_calls, print_plan
from bench.bench_matmul import mismatch, root_sum_squares

DTYPE = torch.bfloat16
COLUMNS = [("provider", "provider", "s"), ("shape", "shape", ""), ("M", "tokens", "d"),
           ("adapters", "adapters", "d"), ("r", "rank", "d"), ("median ms", "median_ms", ".3f"),
           ("p20 ms", "p20_ms", ".3f"), ("p80 ms", "p80_ms", ".3f"),
           ("x single-adapter", "x_vs_single", ".2f")]
SINGLE = "single adapter (fused lora_matmul_4bit)"
MULTI = "nf4lora multi_lora_matmul_4bit"
PEFT_SINGLE = "PEFT layer, one active adapter (fused)"
PEFT_ROUTED = "PEFT adapter_names= (routed: multi_lora_matmul_4bit)"
PEFT_LOOP = "PEFT adapter_names= (PEFT's sub-batch loop)"


def peft_layer(shape, adapters: int, rank: int, gen: torch.Generator):
    """A LoraLinear4bitPeft over a bf16-compute nf4lora Linear4bit of `shape`, with
    `adapters` LoRA adapters a0, a1, ... of rank `rank` (B random too, as trained)."""
    import nf4lora.integrations.peft  # noqa: F401  (imports PEFT quietly, registers its layer)
    from peft import LoraConfig, get_peft_model
    import nf4lora
    out_features, in_features = shape
    dense = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
    with torch.no_grad():
        dense[0].weight.copy_(torch.randn(shape, generator=gen))
    model = nf4lora.replace_linear(dense, quant_type="nf4", compute_dtype=DTYPE, progress=False)
    config = dict(r=rank, lora_alpha=2 * rank, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(model, LoraConfig(**config), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", LoraConfig(**config))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name in layer.lora_A:
            layer.lora_A[name].weight.copy_(torch.randn(rank, in_features, generator=gen) * 0.01)
            layer.lora_B[name].weight.copy_(torch.randn(out_features, rank, generator=gen) * 0.01)
    layer.base_layer.prepare(torch.empty(0, in_features, dtype=DTYPE))   # quantize now
    return model.eval(), layer


def providers(shape, tokens: int, adapters: int, rank: int) -> dict:
    """name -> zero-argument call, each over the same packed weight, adapters and inputs."""
    import nf4lora
    from peft.tuners.lora.layer import LoraLayer
    gen = torch.Generator().manual_seed(0)
    model, layer = peft_layer(shape, adapters, rank, gen)
    base = layer.base_layer
    packed, state = base.weight, base.weight.quant_state
    names = [f"a{i % adapters}" for i in range(tokens)]
    A, B = nf4lora.pad_adapters([layer.lora_A[n].weight.to(DTYPE) for n in layer.lora_A],
                                [layer.lora_B[n].weight.to(DTYPE) for n in layer.lora_A])
    scalings = [layer.scaling[n] for n in layer.lora_A]
    x = torch.randn(tokens, shape[1], generator=gen).to(DTYPE)
    index = torch.arange(tokens) % adapters
    model.set_adapter("a0")
    return {
        SINGLE: lambda: nf4lora.lora_matmul_4bit(x, packed, state, A[0], B[0], scalings[0]),
        MULTI: lambda: nf4lora.multi_lora_matmul_4bit(x, packed, state, A, B, scalings, index),
        PEFT_SINGLE: lambda: layer(x),
        PEFT_ROUTED: lambda: layer(x, adapter_names=names),
        PEFT_LOOP: lambda: LoraLayer._mixed_batch_forward(layer, x, adapter_names=names),
    }


GPU_COLUMNS = [("provider", "provider", "s"), ("backend", "backend", "s"), ("shape", "shape", ""),
               ("M", "tokens", "d"), ("adapters", "adapters", "d"), ("r", "rank", "d"),
               ("median ms", "median_ms", ".4f"), ("kernel ms", "kernel_ms", ".4f"),
               ("x single-adapter", "x_vs_single", ".2f"),
               ("kernel x single", "kernel_x_vs_single", ".2f")]


def gpu_calls(shape, tokens: int, adapters: int, rank: int, device: str = "cuda"):
    """({SINGLE, MULTI: zero-argument call} on `device`'s tensors, the multi call's exact y and the
    root-sum-square of its terms, both float32): one NF4 + double-quant weight, `adapters`
    bf16 adapters of rank `rank`, row m on adapter m % adapters (the index on the CPU, as a
    scheduler's would be). Quantized by whichever backend is current."""
    import nf4lora
    import nf4lora.functional as F
    gen = torch.Generator().manual_seed(0)
    out_features, in_features = shape
    packed, state = F.quantize_4bit(torch.randn(shape, generator=gen).to(device), blocksize=64,
                                    compress_statistics=True, quant_type="nf4")
    # Each adapter's term about as large as the base's (~sqrt(in)), so that the check
    # below sees a row that got another adapter, or none.
    A, B = nf4lora.pad_adapters(
        [torch.randn(rank, in_features, generator=gen) / in_features ** 0.5
         for _ in range(adapters)],
        [torch.randn(out_features, rank, generator=gen) * (in_features / rank) ** 0.5 / 2
         for _ in range(adapters)])
    A, B = A.to(device, DTYPE), B.to(device, DTYPE)
    scalings = [2.0] * adapters   # lora_alpha 2 r / r
    x = torch.randn(tokens, in_features, generator=gen).to(device, DTYPE)
    index = torch.arange(tokens) % adapters
    W = F.dequantize_4bit(packed, state).float()
    rows = index.to(device)
    h = torch.einsum("mk,mrk->mr", x.float(), A.float()[rows])
    want = x.float() @ W.t() + 2.0 * torch.einsum("mr,mnr->mn", h, B.float()[rows])
    terms = (root_sum_squares(x.float(), W.t())
             + 2.0 * torch.einsum("mr,mnr->mn", h * h, B.float()[rows] ** 2).sqrt())
    calls = {SINGLE: lambda: nf4lora.lora_matmul_4bit(x, packed, state, A[0], B[0], scalings[0]),
             MULTI: lambda: nf4lora.multi_lora_matmul_4bit(x, packed, state, A, B, scalings, index)}
    return calls, want, terms


def main_gpu(args, argv) -> dict:
    """--device cuda: the op rows per GPU backend, checked, then timed (see the docstring)."""
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    if args.plan:   # every GPU backend, available here or not: nothing touches a GPU
        names = [f"{p} nf4lora[{b}]" for b in harness.GPU_BACKENDS for p in (SINGLE, MULTI)]
        return print_plan("cuda", ["multi-lora"], [shape], names, harness.nf4lora_gpu_backends()[1],
                          extra=f" tokens={args.tokens} adapters={args.adapters} r={args.rank}")
    backends, notes = harness.nf4lora_gpu_backends()
    rows = []
    with torch.no_grad():
        for backend in backends:
            with harness.using_backend(backend):
                calls, want, terms = gpu_calls(shape, args.tokens, args.adapters, args.rank)
                why = mismatch(calls[MULTI](), want, terms)
                if why:
                    notes.append(f"nf4lora[{backend}] {MULTI}: not timed, wrong result: {why}")
                    continue
                times = gpu_time_calls(list(calls.values()), args.reps)   # interleaved
                for i, name in enumerate(calls):
                    kernel_s = gpu_kernel_seconds([calls[name]] * 10)
                    rows.append(dict(provider=name, backend=f"nf4lora[{backend}]", shape=list(shape),
                                     tokens=args.tokens, adapters=args.adapters, rank=args.rank,
                                     **harness.quantiles_ms(times[i::len(calls)]),
                                     kernel_ms=None if kernel_s is None else kernel_s * 1e3))
    harness.add_gpu_ratios(rows, "x_vs_single", lambda row: next(
        (r for r in rows if r["backend"] == row["backend"] and r["provider"] == SINGLE), None))
    return harness.print_and_save_gpu_table(
        args, argv, "multi-lora-gpu", "multi_lora", f"{shape[0]}x{shape[1]} NF4 + double quant, "
        f"bf16, M = {args.tokens} over {args.adapters} adapters, r = {args.rank}", rows,
        GPU_COLUMNS, notes)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x4096", help="OUTxIN (default 4096x4096)")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=60)
    harness.add_threads_flag(parser)
    harness.add_out_flag(parser)
    harness.add_device_flags(parser, "the op rows on CUDA tensors, per nf4lora GPU backend",
                             "(with --device cuda) what")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return main_gpu(args, argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    with harness.threads_set_to(args.threads), torch.no_grad():
        calls = providers(shape, args.tokens, args.adapters, args.rank)
        for call in calls.values():     # each provider's first call (one-time work) untimed
            call()
        times = harness.time_calls(list(calls.values()), args.reps, clock=clock)   # interleaved
        times = {name: times[i::len(calls)] for i, name in enumerate(calls)}
        threads = torch.get_num_threads()
    rows = [dict(provider=name, shape=list(shape), tokens=args.tokens, adapters=args.adapters,
                 rank=args.rank, clock=clock.__name__, **harness.quantiles_ms(t))
            for name, t in times.items()]
    single = {row["provider"]: row["median_ms"] for row in rows}
    for row in rows:   # op rows against the op's single call, PEFT rows against PEFT's
        row["x_vs_single"] = row["median_ms"] / single[PEFT_SINGLE if row["provider"].startswith("PEFT")
                                                      else SINGLE]
    heading = (f"{shape[0]}x{shape[1]} NF4 + double quant, bf16, M = {args.tokens} over "
               f"{args.adapters} adapters, r = {args.rank}, {threads} threads")
    return harness.print_and_save_table(args, argv, "multi-lora", "multi_lora", heading, rows,
                                        COLUMNS)


if __name__ == "__main__":
    main()
