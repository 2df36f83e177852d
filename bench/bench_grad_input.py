"""The cpu backend's grad-input (dx = grad @ W + grad_h @ lora_A, the backward of a 4-bit
matmul for x) at small M: the fused kernel (`_C.lora_grad_input_4bit`, W read packed) against
the dequantize + GEMM path, one thread, NF4 + double quantization, blocksize 64, rank 16.

Timed as per-thread CPU time (time.thread_time) of each call, the providers interleaved
call by call, medians: on a shared machine wall time counts the neighbours' slices too.
W is in cache after the first call (4096x4096: 8 MiB packed, 11008x4096: 22 MiB, near the
32 MiB L3), as it is in a training step's backward right after the forward read it.

    python -m bench.bench_grad_input [--shapes 4096x4096 11008x4096] [--tokens 1 4 8 16 32]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import nf4lora.functional as nf
from nf4lora._weight import PackedWeight
from nf4lora.backends import cpu


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu._C.set_num_threads(1)
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)
        cpu._C.set_num_threads(0)


def run(args) -> None:
    dtype = getattr(torch, args.dtype)
    print(f"CPU: {cpu_model()}; isa {cpu._C.isa()}; {args.dtype}; 1 thread; "
          f"per-thread CPU ms, median of {args.repeats} interleaved calls")
    print(f"{'shape':>11} {'M':>3} {'fused ms':>9} {'dequant+gemm ms':>16} {'x':>6}")
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
            providers = {
                "fused": lambda: cpu._fused_grad_input(grad, weight, A, grad_h),
                "gemm": lambda: cpu._unfused_grad_input(grad, weight, A, grad_h, "dequantize+gemm"),
            }
            times = {name: [] for name in providers}
            for fn in providers.values():
                fn()  # warm: workspace, W in cache
            for _ in range(args.repeats):
                for name, fn in providers.items():
                    t0 = time.thread_time()
                    fn()
                    times[name].append((time.thread_time() - t0) * 1e3)
            fused, gemm = (statistics.median(times[n]) for n in ("fused", "gemm"))
            print(f"{shape:>11} {M:>3} {fused:9.3f} {gemm:16.3f} {gemm / fused:6.1f}", flush=True)


if __name__ == "__main__":
    main()
