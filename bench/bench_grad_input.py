"""The cpu backend's grad-input (dx = grad @ W + grad_h @ lora_A, the backward of a 4-bit
matmul for x) at small M: the fused kernel (`_C.lora_grad_input_4bit`, W read packed) against
the dequantize + GEMM path, and on AMX-BF16 CPUs the tile GEMM (`_C.tile_grad_input_4bit`,
NF4LORA_CPU_GEMM=amx: the "amx" path, opt-in until measured), one thread, NF4 + double
quantization, blocksize 64, rank 16.

Timed as per-thread CPU time (time.thread_time) of each call, the paths interleaved call by
call, medians: on a shared machine wall time counts the neighbours' slices too. W is in
cache after the first call (4096x4096: 8 MiB packed, 11008x4096: 22 MiB, near the 32 MiB
L3), as it is in a training step's backward right after the forward read it. Prints a
table and saves JSON (bench/harness.py save_run: --out, grad-input-latest.json).

    python -m bench.bench_grad_input [--shapes 4096x4096 11008x4096] [--tokens 1 4 8 16 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import nf4lora.functional as nf
from nf4lora._weight import PackedWeight
from nf4lora.backends import cpu

from . import harness

COLUMNS = [("shape", "shape", "s"), ("M", "tokens", "d"), ("fused ms", "fused_ms", ".3f"),
           ("dequant+gemm ms", "gemm_ms", ".3f"), ("amx ms", "amx_ms", ".3f"),
           ("gemm / fused", "gemm_over_fused", ".1f")]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rank", type=int, default=16)
    harness.add_out_flag(parser)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu._C.set_num_threads(1)
    try:
        rows = run(args)
    finally:
        torch.set_num_threads(threads)
        cpu._C.set_num_threads(0)
    heading = (f"grad-input, isa {cpu._C.isa()}, {args.dtype}, r = {args.rank}, 1 thread, per-thread "
               f"CPU ms, median of {args.repeats} interleaved calls")
    return harness.print_and_save_table(args, argv, "grad-input", "grad_input", heading, rows, COLUMNS)


def run(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    amx = dtype == torch.bfloat16 and cpu._C.has_amx()
    rows = []
    for shape in args.shapes:
        out_f, in_f = map(int, shape.split("x"))
        w = torch.randn(out_f, in_f)
        packed, state = nf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        weight = PackedWeight.from_state(packed, state).with_offset_read()
        del w
        A = (torch.randn(args.rank, in_f) * in_f ** -0.5).to(dtype)
        for M in args.tokens:
            grad = torch.randn(M, out_f).to(dtype)
            grad_h = torch.randn(M, args.rank).to(dtype)
            paths = {
                "fused": lambda: cpu._fused_grad_input(grad, weight, A, grad_h),
                "gemm": lambda: cpu._unfused_grad_input(grad, weight, A, grad_h, "dequantize+gemm"),
            }
            if amx:
                def tiles():
                    with harness.environment_variable("NF4LORA_CPU_GEMM", "amx"):
                        return cpu._unfused_grad_input(grad, weight, A, grad_h, "amx")
                paths["amx"] = tiles
            times = {name: [] for name in paths}
            for fn in paths.values():
                fn()  # warm: workspace, W in cache
            for _ in range(args.repeats):
                for name, fn in paths.items():
                    t0 = time.thread_time()
                    fn()
                    times[name].append((time.thread_time() - t0) * 1e3)
            ms = {name: statistics.median(t) for name, t in times.items()}
            rows.append({"shape": shape, "tokens": M, "fused_ms": ms["fused"], "gemm_ms": ms["gemm"],
                         "amx_ms": ms.get("amx"), "gemm_over_fused": ms["gemm"] / ms["fused"]})
    return rows


if __name__ == "__main__":
    main()
