"""Memory of one LoRA layer's forward + backward: nf4lora QLoRA vs dense bf16 LoRA
(and bitsandbytes 4-bit + the same LoRA, when installed).

    python -m bench.bench_memory [--quick] [--out DIR]

Each configuration runs in its own fresh process, so one run's allocations cannot hide
in another's peak. Three figures per configuration:

  held     bytes of the layer's parameters, buffers and quant state (what stays between steps)
  saved    bytes autograd keeps for backward beyond the held weights (saved_tensors_hooks;
           a saved tensor that is a held weight, e.g. the packed W, is not counted again)
  peak     the process's peak resident memory during forward + backward above its resident
           memory just before (Linux VmHWM, reset through /proc/self/clear_refs), so
           transient buffers such as a dequantized W count, and page-level noise of a few
           MB is possible

Shape: a Llama-7B attention projection (4096 x 4096), M = 512 tokens, rank 16, bf16
activations (perf.md). Time per forward + backward is printed beside, for information
(the speed targets are benchmarked elsewhere).
"""
from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

import torch

from . import harness

SHAPE = (4096, 4096)
QUICK_SHAPE = (512, 256)
TOKENS, QUICK_TOKENS = 512, 32
RANK = 16
CONFIGS = ("nf4lora QLoRA", "dense bf16 LoRA", "bitsandbytes 4-bit + LoRA")


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def _build(config: str, shape, dtype):
    """-> (forward callable x -> y, modules whose memory is 'held')."""
    out_features, in_features = shape
    weight = torch.randn(shape, dtype=dtype)
    lora_A = torch.nn.Parameter(torch.randn(RANK, in_features, dtype=dtype) / in_features ** 0.5)
    lora_B = torch.nn.Parameter(torch.randn(out_features, RANK, dtype=dtype) * 0.01)
    scaling = 2.0
    if config == "nf4lora QLoRA":
        import nf4lora
        base = nf4lora.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype,
                                     quant_type="nf4")
        base.weight = nf4lora.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        base = base.to("cpu")
        state = base.weight.quant_state

        def forward(x):
            return nf4lora.lora_matmul_4bit(x, base.weight, state, lora_A, lora_B, scaling)
    elif config == "dense bf16 LoRA":
        base = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        base.weight.data.copy_(weight)
        base.weight.requires_grad_(False)

        def forward(x):
            return base(x) + scaling * ((x @ lora_A.t()) @ lora_B.t())
    else:
        import bitsandbytes as bnb
        base = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype,
                                 quant_type="nf4")
        base.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        base = base.to("cpu")

        def forward(x):  # PEFT's bnb layer: base(x) plus the adapter
            return base(x) + scaling * ((x @ lora_A.t()) @ lora_B.t())
    del weight
    return forward, [base, lora_A, lora_B]


def _held_tensors(objects) -> list:
    tensors = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors += list(obj.parameters()) + list(obj.buffers())
            state = getattr(getattr(obj, "weight", None), "quant_state", None)
            if state is not None:
                tensors += [t for t in state.as_dict().values() if isinstance(t, torch.Tensor)]
        else:
            tensors.append(obj)
    return tensors


def _held_bytes(objects) -> int:
    seen, total = set(), 0
    for t in _held_tensors(objects):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _measure(config: str, shape, tokens: int, queue) -> None:
    """Runs in a child process; puts one result row (or an error note) on the queue."""
    try:
        torch.manual_seed(0)
        dtype = torch.bfloat16
        with torch._dynamo.config.patch(disable=True):
            forward, held = _build(config, shape, dtype)
            x = torch.randn(tokens, shape[1], dtype=dtype, requires_grad=True)
            forward(x).float().sum().backward()  # warm-up: allocator and lazy init
            x.grad = None
            for p in held[1:]:
                p.grad = None
            saved = []
            rss_before = _rss_bytes("VmRSS")
            _reset_peak()
            start = time.perf_counter()
            held_storage = {t.untyped_storage().data_ptr() for t in _held_tensors(held)}
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: saved.append((t.untyped_storage().data_ptr(),
                                            t.numel() * t.element_size())) or t, lambda t: t):
                y = forward(x)
            y.float().sum().backward()
            seconds = time.perf_counter() - start
            peak = _rss_bytes("VmHWM") - rss_before
        queue.put(dict(config=config, shape=list(shape), tokens=tokens, rank=RANK,
                       held_mb=_held_bytes(held) / 1e6,
                       # only what backward keeps beyond the held weights (x, h, ...)
                       saved_mb=sum(b for ptr, b in dict(saved).items() if ptr not in held_storage) / 1e6,
                       peak_mb=peak / 1e6, fwd_bwd_ms=seconds * 1e3))
    except ImportError as error:
        queue.put(dict(config=config, note=f"skipped: {error}"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_memory",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny layer: a smoke run")
    parser.add_argument("--tokens", type=int, help=f"rows of x (default {TOKENS}; bf16 GEMMs "
                        "are slow on CPUs without avx512_bf16/AMX, so fewer rows keep it short)")
    harness.add_out_flag(parser)
    args = parser.parse_args(argv)
    shape, tokens = (QUICK_SHAPE, QUICK_TOKENS) if args.quick else (SHAPE, TOKENS)
    tokens = args.tokens or tokens
    context = multiprocessing.get_context("spawn")
    rows, notes = [], []
    for config in CONFIGS:
        queue = context.Queue()
        child = context.Process(target=_measure, args=(config, shape, tokens, queue))
        child.start()
        child.join(timeout=600)
        if child.exitcode != 0 or queue.empty():
            child.kill()
            notes.append(f"{config}: failed (exit code {child.exitcode})")
            continue
        row = queue.get()
        (notes.append(f"{config}: {row['note']}") if "note" in row else rows.append(row))
    dense = next((r for r in rows if r["config"] == "dense bf16 LoRA"), None)
    for row in rows:
        if dense:
            row["peak_vs_dense"] = row["peak_mb"] / dense["peak_mb"] if dense["peak_mb"] else None
            row["held_vs_dense"] = row["held_mb"] / dense["held_mb"]
    columns = [("config", "config", ""), ("shape", "shape", ""), ("tokens", "tokens", "d"),
               ("held MB", "held_mb", ".2f"), ("saved MB", "saved_mb", ".2f"),
               ("peak MB", "peak_mb", ".2f"), ("held x dense", "held_vs_dense", ".3f"),
               ("peak x dense", "peak_vs_dense", ".3f"), ("fwd+bwd ms", "fwd_bwd_ms", ".1f")]
    print(harness.format_table(rows, columns))
    harness.print_notes(notes)
    return harness.save_run(args.out, "memory", benchmark="memory", argv=argv,
                            metadata=harness.metadata(benchmark="memory"),
                            config={"quick": args.quick, "shape": list(shape), "tokens": tokens},
                            rows=rows, notes=notes)


if __name__ == "__main__":
    main()
