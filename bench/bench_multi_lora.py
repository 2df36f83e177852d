"""Mixed-adapter batches: nf4lora.multi_lora_matmul_4bit (one 4-bit pass for the batch, each
row's adapter gathered) against one single-adapter fused call at the same M (issue 15's
target: <= 1.2x of it) and against PEFT's sub-batch loop on the same nf4lora weight (the base
layer once per adapter in the batch, then that adapter on its rows).

    python -m bench.bench_multi_lora [--shape 4096x4096] [--tokens 8] [--adapters 8]
                                     [--rank 16] [--threads N] [--out DIR]

bf16 activations, NF4 + double quantization, blocksize 64; the weight stays in cache (one
layer, looped): the three providers read the same bytes, so the ratios compare their
compute. Median of --reps calls after a warm-up.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from bench import harness

DTYPE = torch.bfloat16
COLUMNS = [("provider", "provider", "s"), ("shape", "shape", ""), ("M", "tokens", "d"),
           ("adapters", "adapters", "d"), ("r", "rank", "d"), ("median ms", "median_ms", ".3f"),
           ("p20 ms", "p20_ms", ".3f"), ("p80 ms", "p80_ms", ".3f"),
           ("x single-adapter", "x_vs_single", ".2f")]


def providers(shape, tokens: int, adapters: int, rank: int) -> dict:
    """name -> zero-argument call, each over the same packed weight and inputs."""
    import nf4lora
    from nf4lora import functional
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(0)
    packed, state = functional.quantize_4bit(torch.randn(shape, generator=gen).to(DTYPE),
                                             blocksize=64, quant_type="nf4", compress_statistics=True)
    As = [(torch.randn(rank, in_features, generator=gen) * 0.01).to(DTYPE) for _ in range(adapters)]
    Bs = [(torch.randn(out_features, rank, generator=gen) * 0.01).to(DTYPE) for _ in range(adapters)]
    A, B = nf4lora.pad_adapters(As, Bs)
    x = torch.randn(tokens, in_features, generator=gen).to(DTYPE)
    index = torch.arange(tokens) % adapters
    scalings = [2.0] * adapters

    def sub_batch_loop():   # PEFT's mixed-batch forward: the base layer again per adapter
        y = torch.empty(tokens, out_features, dtype=DTYPE)
        for i in index.unique().tolist():
            rows = (index == i).nonzero().flatten()
            y[rows] = nf4lora.lora_matmul_4bit(x[rows], packed, state, As[i], Bs[i], scalings[i])
        return y

    return {
        "single adapter (fused)": lambda: nf4lora.lora_matmul_4bit(x, packed, state, As[0], Bs[0], 2.0),
        "nf4lora multi_lora_matmul_4bit": lambda: nf4lora.multi_lora_matmul_4bit(
            x, packed, state, A, B, scalings, index),
        "sub-batch loop (PEFT's way)": sub_batch_loop,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x4096", help="OUTxIN (default 4096x4096)")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    harness.add_out_flag(parser)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    rows = []
    with harness.threads_set_to(args.threads), torch.no_grad():
        for name, call in providers(shape, args.tokens, args.adapters, args.rank).items():
            times = harness.time_calls([call], args.reps)
            rows.append(dict(provider=name, shape=list(shape), tokens=args.tokens,
                             adapters=args.adapters, rank=args.rank, **harness.quantiles_ms(times)))
        threads = torch.get_num_threads()
    single = rows[0]["median_ms"]
    for row in rows:
        row["x_vs_single"] = row["median_ms"] / single
    heading = (f"{shape[0]}x{shape[1]} NF4 + double quant, bf16, M = {args.tokens} over "
               f"{args.adapters} adapters, r = {args.rank}, {threads} threads")
    return harness.print_and_save_table(args, argv, "multi-lora", "multi_lora", heading, rows,
                                        COLUMNS)


if __name__ == "__main__":
    main()
