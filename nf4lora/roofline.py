"""GPU performance on paper for the GPU kernels, CUDA and Triton: bytes moved, FLOPs,
ideal time.

    python -m nf4lora.roofline        (or call print_roofline())

No GPU is available here, so speed is argued (shared/perf.md, "GPU performance, on
paper"): for each kernel and shape, the DRAM bytes it must move (every operand read
once, every result written once; L2-resident re-reads not counted) and the FLOPs it
does, and the ideal time max(bytes / bandwidth, FLOPs / peak) on

    H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16/fp16, 67 TFLOP/s fp32 FMA, 132 SMs
    A100 SXM: 2.039 TB/s HBM2e, 312 TFLOP/s dense bf16/fp16, 19.5 TFLOP/s fp32 FMA, 108 SMs

(NVIDIA datasheets: H100 SXM5, A100 80GB SXM4). One model, two views of it:

  kernel_roofline(op, **shape)  one call of one kernel: the codec kernels (the CUDA and
      Triton ones move the same bytes) and the CUDA decode GEMV, with per GPU the time
      bound of the tensor cores and of the CUDA cores (a SIMT kernel's FMAs);
  roofline_rows()  the matmul paths the Triton backend routes between, per (GPU, layer
      shape, M tokens):
        gemv_split_k            pass 1 + its reduction (M <= 16); includes the fp32 workspace
        lora_matmul             the fused kernel + the small h = x @ A^T matmul before it
        composite               dequantize W into a buffer, F.linear, F.linear(x, A), addmm
        lora_matmul_grad_input  dx = dy @ W + grad_h @ A, W packed
        composite_grad_input    dequantize W, dy @ W, addmm
      `chosen` marks the path the Triton backend (backends/triton.py matmul_path) takes on
      that GPU.

A packed weight is its codes (half a byte per weight) and its absmax: 4 bytes per block,
or with double quantization 1 byte per block, 4 per 256 blocks and the 1 KB 8-bit map; the
64-byte 4-bit table is left out (one cache line). At blocksize 64 that is 0.5 + 1/64 +
4/(64*256) = 0.516 bytes per weight; a bf16 copy is 2. Dequantize-then-matmul moves
0.516 + 2 (write) + 2 (read) = 4.5 bytes per weight, the fused kernels 0.516: 8.7x fewer
while M is small. The GEMM is memory-bound while 2*M FLOPs per weight cost less than
0.516 bytes, up to the ridge point M* = peak * 0.516 / (2 * bandwidth): 76 on H100, 39
on A100 (memory_bound_max_m), the thresholds of backends/triton.py FUSED_MAX_M.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

from .backends import triton as triton_backend


class Gpu(NamedTuple):
    name: str
    bandwidth: float    # bytes/s, DRAM
    flops: float        # FLOP/s, dense bf16/fp16 tensor cores
    simt_flops: float   # FLOP/s, fp32 FMA on CUDA cores: the bound of a SIMT kernel
    sms: int
    capability: tuple


H100 = Gpu("H100", 3.35e12, 989e12, 67e12, 132, (9, 0))
A100 = Gpu("A100", 2.039e12, 312e12, 19.5e12, 108, (8, 0))
GPUS = (H100, A100)

# shared/perf.md's shapes: Llama-7B projections (out, in), and tokens per call.
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
MS = (1, 8, 16, 32, 64, 512)
RANK = 16
ELEMENT_BYTES = 2       # bf16 activations, adapters, outputs
BLOCKSIZE = 64
NESTED = True
NESTED_BLOCKSIZE = 256
# The float32 256-entry 8-bit map: double quantization's, and the blockwise codec's code.
DYNAMIC_MAP_BYTES = 4 * 256


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def absmax_bytes(n: int, blocksize: int = BLOCKSIZE, nested: bool = NESTED) -> int:
    """DRAM bytes of the absmax of n weights: float32 per block, or with double
    quantization an 8-bit code per block, a float32 per NESTED_BLOCKSIZE blocks and the map."""
    blocks = _ceil_div(n, blocksize)
    if not nested:
        return 4 * blocks
    return blocks + 4 * _ceil_div(blocks, NESTED_BLOCKSIZE) + DYNAMIC_MAP_BYTES


def weight_bytes(n: int, k: int, blocksize: int = BLOCKSIZE, nested: bool = NESTED) -> int:
    """DRAM bytes of a packed 4-bit [n, k] weight and its (nested) absmax."""
    return _ceil_div(n * k, 2) + absmax_bytes(n * k, blocksize, nested)


def bytes_per_weight(blocksize: int = BLOCKSIZE, nested: bool = NESTED) -> float:
    """weight_bytes per weight of a large weight (the fixed-size map amortized away)."""
    if nested:
        return 0.5 + 1 / blocksize + 4 / (blocksize * NESTED_BLOCKSIZE)
    return 0.5 + 4 / blocksize


def memory_bound_max_m(gpu: Gpu, blocksize: int = BLOCKSIZE, nested: bool = NESTED) -> float:
    """The ridge point: the M at which a 4-bit GEMM's 2*M FLOPs per weight take as long
    as reading the weight's bytes. Below it the fused kernels are memory-bound."""
    return gpu.flops * bytes_per_weight(blocksize, nested) / (2 * gpu.bandwidth)


def ideal_times(moved: float, flops: float, gpu: Gpu) -> dict:
    """Microseconds for `moved` DRAM bytes and `flops` on `gpu`: memory_us, tensor_us (at
    the bf16 tensor-core peak), simt_us (at the fp32 FMA peak); ideal_us = max(memory_us,
    tensor_us), the physical limit of any kernel; kernel_us = max(memory_us, simt_us), the
    limit of a kernel that does its FMAs on CUDA cores, and kernel_bound, which of the two
    sets it."""
    memory = moved / gpu.bandwidth * 1e6
    tensor = flops / gpu.flops * 1e6
    simt = flops / gpu.simt_flops * 1e6
    return {"memory_us": memory, "tensor_us": tensor, "simt_us": simt,
            "ideal_us": max(memory, tensor), "kernel_us": max(memory, simt),
            "kernel_bound": "memory" if memory >= simt else "fp32 FMA"}


# --------------------------------------------------------------------------------------
# One call of one kernel.
# --------------------------------------------------------------------------------------

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _itemsize(dtype) -> int:
    """Bytes per element of a torch dtype or its name."""
    return _ITEMSIZE[str(dtype).removeprefix("torch.")]


def kernel_roofline(op: str, gpus=GPUS, **shape) -> dict:
    """Bytes, FLOPs and ideal times (ideal_times, per GPU name) of one call of kernel `op`.

    op and its shape arguments (dtype: a torch dtype or its name):
      quantize_4bit(n, dtype=bfloat16, blocksize=64)
      dequantize_4bit(n, dtype=bfloat16, blocksize=64, nested=True)
      quantize_blockwise(n, dtype=float32, blocksize=256)
      dequantize_blockwise(n, dtype=float32, blocksize=256)
      gemv_4bit_lora(M, N, K, rank=0, dtype=bfloat16, blocksize=64, nested=True, bias=False),
        the CUDA decode GEMV

    Codec ops count one FLOP per element (the scale multiply). The CUDA GEMV does its FMAs
    on CUDA cores (at M = 8 on A100 that, not memory, is its bound: kernel_bound), and
    simt_us counts FMAs only: it also spends ~4 instructions per weight and row group on
    decoding (nibble, table load, scale multiply), which at M = 1 costs about as much issue
    time as the memory time (~2.8 vs 2.6 us for 4096x4096 on H100).
    """
    blockwise = op.endswith("blockwise")
    dtype_bytes = _itemsize(shape.get("dtype", "float32" if blockwise else "bfloat16"))
    blocksize = shape.get("blocksize", 256 if blockwise else 64)
    nested = shape.get("nested", True)
    if op == "quantize_4bit":
        n = shape["n"]
        moved = n * dtype_bytes + weight_bytes(n, 1, blocksize, nested=False)
        flops = n
    elif op == "dequantize_4bit":
        n = shape["n"]
        moved = weight_bytes(n, 1, blocksize, nested) + n * dtype_bytes
        flops = n
    elif op in ("quantize_blockwise", "dequantize_blockwise"):
        n = shape["n"]
        moved = n * dtype_bytes + DYNAMIC_MAP_BYTES + n + 4 * _ceil_div(n, blocksize)
        flops = n
    elif op == "gemv_4bit_lora":
        M, N, K, r = shape["M"], shape["N"], shape["K"], shape.get("rank", 0)
        bias = N if shape.get("bias") else 0
        activations = dtype_bytes * (M * K + M * N + r * K + N * r + bias)
        h_workspace = 2 * 4 * M * r                     # fp32, written once, read back from L2
        moved = weight_bytes(N, K, blocksize, nested) + activations + h_workspace
        flops = 2 * M * N * K + 2 * M * r * K + 2 * M * N * r
    else:
        raise ValueError(f"unknown op {op!r}")
    row = {"op": op, **{k: v if isinstance(v, (int, float, str)) else str(v)  # a torch dtype
                        for k, v in shape.items()},
           "bytes": moved, "flops": flops}
    for gpu in gpus:
        row[gpu.name] = ideal_times(moved, flops, gpu)
    return row


def format_kernel_roofline(row: dict) -> str:
    """One line per GPU of a kernel_roofline() row, e.g. for a benchmark's output."""
    gpu_names = [gpu.name for gpu in GPUS]
    shape = ", ".join(f"{k}={v}" for k, v in row.items()
                      if k not in ("op", "bytes", "flops", *gpu_names))
    lines = []
    for name in gpu_names:
        if name in row:
            g = row[name]
            lines.append(f"{row['op']}({shape}) on {name}: {row['bytes'] / 1e6:.3f} MB, "
                         f"{row['flops'] / 1e9:.3f} GFLOP, ideal {g['ideal_us']:.2f} us, "
                         f"SIMT-kernel bound {g['kernel_us']:.2f} us ({g['kernel_bound']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The Triton backend's matmul paths.
# --------------------------------------------------------------------------------------

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
                    times = ideal_times(moved, flops, gpu)
                    ideal[kernel] = times["ideal_us"]
                    chosen = {"gemv_split_k": path == triton_backend.PATH_GEMV,
                              "lora_matmul": path == triton_backend.PATH_FUSED,
                              "composite": path == triton_backend.PATH_COMPOSITE,
                              "lora_matmul_grad_input": path != triton_backend.PATH_COMPOSITE,
                              "composite_grad_input": path == triton_backend.PATH_COMPOSITE}[kernel]
                    rows.append(dict(kernel=kernel, gpu=gpu.name, M=m, N=n, K=k, r=rank,
                                     bytes=moved, flops=flops, intensity=flops / moved,
                                     ideal_us=times["ideal_us"],
                                     bound=("memory" if times["memory_us"] >= times["tensor_us"]
                                            else "compute"),
                                     chosen=chosen))
                for row in rows[-len(kernels):]:
                    composite = "composite_grad_input" if "grad" in row["kernel"] else "composite"
                    row["vs_composite"] = ideal[composite] / row["ideal_us"]
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
