"""GPU performance on paper for the matmul kernels: bytes moved, FLOPs, ideal time.

    python -m nf4lora.roofline        (or call print_roofline())

No GPU is available here, so speed is argued (shared/perf.md, "GPU performance, on
paper"): for each kernel and shape, the DRAM bytes it must move (every operand read
once, every result written once; code books and L2-resident re-reads not counted) and
the FLOPs it does, and the ideal time max(bytes / bandwidth, FLOPs / peak) on

    H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16/fp16, 132 SMs
    A100 SXM: 2.039 TB/s HBM2e, 312 TFLOP/s dense bf16/fp16, 108 SMs

Rows, per (GPU, layer shape, M tokens):
  gemv_split_k            pass 1 + its epilogue (M <= 16); includes the fp32 workspace
  lora_matmul             the fused kernel + the small h = x @ A^T matmul before it
  composite               dequantize W into a buffer, F.linear, F.linear(x, A), addmm
  lora_matmul_grad_input  dx = dy @ W + grad_h @ A, W packed
  composite_grad_input    dequantize W, dy @ W, addmm
`chosen` marks the path the Triton backend (backends/triton.py matmul_path) takes on that GPU.

The 4-bit weight with double quantization is 0.5 + 1/64 + 4/(64*256) = 0.516 bytes per
weight at blocksize 64; a bf16 copy is 2. Dequantize-then-matmul moves 0.516 + 2 (write)
+ 2 (read) = 4.5 bytes per weight, the fused kernels 0.516: 8.7x fewer while M is small.
The GEMM is memory-bound while 2*M FLOPs per weight cost less than 0.516 bytes, up to
the ridge point M* = peak * 0.516 / (2 * bandwidth): 76 on H100, 39 on A100
(memory_bound_max_m), the thresholds of backends/triton.py FUSED_MAX_M.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

from .backends import triton as triton_backend


class Gpu(NamedTuple):
    name: str
    bandwidth: float    # bytes/s, DRAM
    flops: float        # FLOP/s, dense bf16/fp16 tensor cores
    sms: int
    capability: tuple


H100 = Gpu("H100", 3.35e12, 989e12, 132, (9, 0))
A100 = Gpu("A100", 2.039e12, 312e12, 108, (8, 0))
GPUS = (H100, A100)

# shared/perf.md's shapes: Llama-7B projections (out, in), and tokens per call.
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
MS = (1, 8, 16, 32, 64, 512)
RANK = 16
ELEMENT_BYTES = 2       # bf16 activations, adapters, outputs
BLOCKSIZE = 64
NESTED = True


def weight_bytes(n: int, k: int, blocksize: int = BLOCKSIZE, nested: bool = NESTED) -> float:
    """DRAM bytes of a packed 4-bit [n, k] weight and its (nested) absmax."""
    blocks = -(-n * k // blocksize)
    if nested:
        return n * k / 2 + blocks + 4 * -(-blocks // 256)
    return n * k / 2 + 4 * blocks


def memory_bound_max_m(gpu: Gpu, blocksize: int = BLOCKSIZE, nested: bool = NESTED) -> float:
    """The ridge point: the M at which a 4-bit GEMM's 2*M FLOPs per weight take as long
    as reading the weight's bytes. Below it the fused kernels are memory-bound."""
    per_weight = weight_bytes(1 << 20, 1, blocksize, nested) / (1 << 20)
    return gpu.flops * per_weight / (2 * gpu.bandwidth)


def _traffic(kernel: str, gpu: Gpu, m: int, n: int, k: int, r: int, e: int) -> tuple[float, float]:
    """(DRAM bytes, FLOPs) of one call."""
    w = weight_bytes(n, k)
    lora_flops = 2 * m * r * k + 2 * m * n * r
    if kernel == "gemv_split_k":
        gemv = triton_backend.kernels().gemv      # its launch config and split heuristic
        config = gemv.launch_config(gemv.block_m_for(m), "bf16", NESTED)
        tiles = -(-n // config["BLOCK_N"]) - (-r // config["BLOCK_N"])
        splits, _ = gemv.num_splits(m, k, tiles, gpu.sms, config["BLOCK_K"])
        workspace = 2 * splits * m * (n + r) * 4            # written by pass 1, read by pass 2
        moved = w + e * (m * k + r * k + n * r + n + m * n + m * r) + workspace
        return moved, 2 * m * n * k + lora_flops
    if kernel == "lora_matmul":
        h_matmul = e * (m * k + r * k + m * r)              # F.linear(x, A) before the launch
        moved = w + e * (m * k + m * r + n * r + n + m * n) + h_matmul
        return moved, 2 * m * n * k + lora_flops
    if kernel == "composite":
        dequantize = w + e * n * k
        linear = e * (n * k + m * k + n + m * n)
        lora = e * (m * k + r * k + m * r) + e * (m * r + n * r + 2 * m * n)   # h, then addmm
        return dequantize + linear + lora, 2 * m * n * k + lora_flops
    if kernel == "lora_matmul_grad_input":
        moved = w + e * (m * n + m * r + r * k + m * k)
        return moved, 2 * m * n * k + 2 * m * r * k
    if kernel == "composite_grad_input":
        moved = (w + e * n * k) + e * (n * k + m * n + m * k) + e * (m * r + r * k + 2 * m * k)
        return moved, 2 * m * n * k + 2 * m * r * k
    raise ValueError(f"unknown kernel {kernel!r}")


def roofline_rows(gpus=GPUS, shapes=SHAPES, ms=MS, rank: int = RANK,
                  element_bytes: int = ELEMENT_BYTES) -> list[dict]:
    """One dict per (gpu, shape, M, kernel): kernel, gpu, M, N, K, r, bytes, flops,
    intensity (FLOP/byte), ideal_us, bound ("memory"/"compute"), vs_composite (the
    composite path's ideal time over this one's) and chosen (the dispatcher's pick)."""
    rows = []
    for gpu in gpus:
        for n, k in shapes:
            for m in ms:
                path = triton_backend.matmul_path(m, n, k, gpu.capability)
                kernels = ["composite", "lora_matmul_grad_input", "composite_grad_input"]
                kernels.insert(0, "gemv_split_k" if m <= triton_backend.GEMV_MAX_M else "lora_matmul")
                ideal = {}
                for kernel in kernels:
                    moved, flops = _traffic(kernel, gpu, m, n, k, rank, element_bytes)
                    memory_s, compute_s = moved / gpu.bandwidth, flops / gpu.flops
                    ideal[kernel] = max(memory_s, compute_s)
                    chosen = {"gemv_split_k": path == triton_backend.PATH_GEMV,
                              "lora_matmul": path == triton_backend.PATH_FUSED,
                              "composite": path == triton_backend.PATH_COMPOSITE,
                              "lora_matmul_grad_input": path != triton_backend.PATH_COMPOSITE,
                              "composite_grad_input": path == triton_backend.PATH_COMPOSITE}[kernel]
                    rows.append(dict(kernel=kernel, gpu=gpu.name, M=m, N=n, K=k, r=rank,
                                     bytes=moved, flops=flops, intensity=flops / moved,
                                     ideal_us=ideal[kernel] * 1e6,
                                     bound="memory" if memory_s >= compute_s else "compute",
                                     chosen=chosen))
                for row in rows[-len(kernels):]:
                    composite = "composite_grad_input" if "grad" in row["kernel"] else "composite"
                    row["vs_composite"] = ideal[composite] * 1e6 / row["ideal_us"]
    return rows


COLUMNS = (("gpu", "{}"), ("N", "{}"), ("K", "{}"), ("M", "{}"), ("kernel", "{}"),
           ("chosen", "{}"), ("bytes", "{:.3g}"), ("flops", "{:.3g}"), ("intensity", "{:.1f}"),
           ("ideal_us", "{:.2f}"), ("bound", "{}"), ("vs_composite", "{:.2f}x"))


def format_roofline(rows: list[dict]) -> str:
    """A fixed-width table of roofline_rows(); `chosen` is '*' for the dispatcher's pick."""
    cells = [[fmt.format("*" if row[name] is True else "" if row[name] is False else row[name])
              for name, fmt in COLUMNS] for row in rows]
    header = [name for name, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    ridge = ", ".join(f"{gpu.name} M* = {memory_bound_max_m(gpu):.1f}" for gpu in GPUS)
    return (f"ideal time = max(DRAM bytes / bandwidth, FLOPs / peak); bf16, NF4 nested "
            f"blocksize {BLOCKSIZE}, LoRA r = {rows[0]['r'] if rows else RANK}; ridge "
            f"points {ridge}\n" + "\n".join(lines))


def print_roofline(file=None, **kwargs) -> list[dict]:
    """Print the roofline table (for the benchmark output) and return its rows."""
    rows = roofline_rows(**kwargs)
    print(format_roofline(rows), file=file or sys.stdout)
    return rows


if __name__ == "__main__":
    print_roofline()
