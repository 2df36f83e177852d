"""The C++ CPU backend: launch glue for `nf4lora._C` (csrc/cpu).

The kernels take the tensors and the PackedWeight themselves (csrc/bindings_common.h reads
their addresses, sizes and dtypes, and the format as data, PackedWeight.codec; dtype ids
never appear here), and
run with the GIL released, OpenMP across blocks, on the best SIMD path the CPU has
(`nf4lora._C.isa()`; the environment variable
NF4LORA_CPU_ISA=scalar|avx2|avx512|avx512bf16 forces one; `nf4lora._C.supported_isas()`
lists what the CPU can run). Threads:
`nf4lora._C.set_num_threads(k)`, default torch's/OpenMP's thread count. Callers
(nf4lora._ops) have validated dtypes, sizes and devices; here (and in the binding, for the
packed weight) only cheap checks guard what would otherwise read or write out of bounds.

The matmul ops take one of three paths (`matmul_path` tells which):

* "fused", M <= fused_max_m(dtype, weight) rows (decode, small batches; "amx" from
  TILE_GEMM_MIN_M rows where a tile GEMM is named): `_C.lora_gemv_4bit`
  reads W packed, decodes it in registers and does the LoRA and bias epilogue in the same
  pass (a mixed-adapter batch: `_C.multi_lora_gemv_4bit`, the same kernel, each row its own
  adapter); a weight that brings an interleaved copy (`interleave`) has it read instead,
  where the CPU has the kernel, and keeps the fused path to a larger M.
* "amx", bf16 x of at least TILE_GEMM_MIN_M rows, where `_C.tile_gemm()` names a tile GEMM
  (NF4LORA_CPU_GEMM=amx on an AMX-BF16 CPU, or amx-emulated for tests; auto names none
  until the kernel is measured on an AMX CPU): `_C.tile_gemm_4bit` decodes W into bf16
  tiles in cache and multiplies them with AMX (csrc/cpu/gemm_tiles.h), never materializing
  W; the LoRA and bias terms as below. The backward's grad @ W likewise
  (`_C.tile_grad_input_4bit`).
* "dequantize+gemm", everything else: W is dequantized chunk by chunk into a reused
  per-thread workspace and multiplied with torch's GEMM (oneDNN). On CPUs without
  native 16-bit GEMM instructions (no AVX512-BF16 / AMX / AVX512-FP16) torch's bf16 and
  fp16 matmuls run 4-6x slower than float32 ones (4096x4096 at M = 512, 2-core EPYC:
  bf16 836 ms, fp32 133 ms), so there W is dequantized to float32 and the GEMMs run in
  float32, rounding the result once to the activation dtype. That is also more
  accurate than a bf16 GEMM on a bf16 copy of W.

The backward's grad_input (dx = grad @ W + grad_h @ lora_A) takes the same three kinds of
path (`grad_input_path`): "fused" up to grad_input_fused_max_m(dtype) rows
(`_C.lora_grad_input_4bit`: W read packed, column panels per thread, float32 sums), else
"amx" or "dequantize+gemm" as above.
"""
from __future__ import annotations

import functools
import os
import sys
import threading

import torch

from .. import codebook
from . import composite

DEVICE_TYPES = ("cpu",)


def takes_format(quant_type: str) -> bool:
    """Every format: the kernels take its table and encoder as data
    (nf4lora.codebook.kernel_codec; a weight's through PackedWeight.codec)."""
    return codebook.is_format_key(quant_type)

try:
    from .. import _C
    _IMPORT_ERROR: str | None = None
except ImportError as error:  # not built: `pip install -e .` builds it
    _C = None
    _IMPORT_ERROR = f"the C++ extension nf4lora._C is not importable ({error}); build it with `pip install -e .`"


def availability() -> str | None:
    return _IMPORT_ERROR


def _blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def _check_input(t: torch.Tensor, name: str) -> None:
    assert t.device.type == "cpu", f"{name} must be a CPU tensor, got {t.device}"
    assert t.is_contiguous(), f"{name} must be contiguous"


def quantize_4bit(A, blocksize, quant_type):
    _check_input(A, "A")
    n = A.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(_blocks(n, blocksize), dtype=torch.float32)
    _C.quantize_4bit(A, blocksize, codebook.kernel_codec(quant_type), packed, absmax)
    return packed, absmax


def dequantize_4bit(weight, out):
    _check_input(out, "out")
    assert weight.device.type == "cpu" and out.numel() == weight.numel, "out: the weight's size"
    _C.dequantize_4bit(weight, out)


def quantize_blockwise(A, code, blocksize):
    _check_input(A, "A")
    code = code.float().contiguous()
    assert code.numel() == 256, "code must have 256 entries"
    n = A.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(_blocks(n, blocksize), dtype=torch.float32)
    _C.quantize_blockwise(A, code, blocksize, codes, absmax)
    return codes, absmax


def dequantize_blockwise(codes, absmax, code, blocksize, out):
    n = out.numel()
    _check_input(codes, "codes")
    _check_input(absmax, "absmax")
    _check_input(out, "out")
    code = code.float().contiguous()
    assert codes.dtype == torch.uint8 and codes.numel() >= n, "codes: u8 [n]"
    assert absmax.dtype == torch.float32 and absmax.numel() >= _blocks(n, blocksize)
    assert code.numel() == 256, "code must have 256 entries"
    _C.dequantize_blockwise(codes, absmax, code, blocksize, out)


# ---------------------------------------------------------------------------------------
# Matmul ops (see the module docstring for the two paths).
# ---------------------------------------------------------------------------------------

# Largest M that takes the fused kernel: the measured crossovers, bf16 x, 4096x4096 NF4 +
# double quant, ms per call, fused vs dequantize+gemm.
# 2-core AVX2 EPYC (Zen 3), warm, float32 GEMM (no native bf16 GEMM):
#   M = 8: 5.0 vs 17.3;  16: 8.1 vs 18.4;  24: 11.8 vs 20.4;  32: 16.0 vs 20.4
# The fused kernel costs ~0.5 ms per row of x (float32 FMAs), the other path ~17 ms of
# dequantization and GEMM setup plus ~0.1 ms per row, so they cross near M = 40; 32
# keeps a margin. AMD EPYC Zen 4 (AVX512-BF16), one thread, W in cache, CPU time:
#   bf16 x, native bf16 GEMM: M = 4: 1.9 vs 4.5;  8: 3.7 vs 5.2;  16: 6.0 vs 6.3;  32: 12.5 vs 8.7
#   fp16 x (float32 GEMM):    M = 8: 4.3 vs 10.3; 16: 8.1 vs 13.1; 24: 12.1 vs 16.0; 32: 15.9 vs 18.8
# and after the bf16 decoder's per-16-rows block constants and vcvtneps2bf16 tables (same
# machine, rank 16, interleaved, two runs, the other core busy):
#   bf16 x, native bf16 GEMM: M = 16: 5.6 vs 7.4;  17: 6.3-7.8 vs 7.8-8.0;  20: 6.8 vs 8.3;
#                             24: 7.8-9.3 vs 8.7-9.9;  28: 10.0 vs 9.4;  32: 10.6-13.4 vs 10.1-11.6
# so a dtype with native 16-bit GEMM crosses over at FUSED_MAX_M_NATIVE_GEMM (it was 16:
# DoRA's 17-row pass at M = 1, x's row and r = 16 of lora_A, now takes the fused kernel;
# AMX CPUs sooner: re-measure with `python -m bench.bench_matmul --tokens 8 16 24 32 64`).
FUSED_MAX_M = 32
FUSED_MAX_M_NATIVE_GEMM = 24
# A weight with an interleaved copy (`interleave`; an eval-mode Linear4bit's) that the call
# reads (`_C.reads_interleaved`): the fused kernel's integer sums on the copy against
# dequantize + bf16 GEMM, bf16 x, NF4 + double quant, ms per call, W streamed (layers
# rotated through 200 MB), AMD EPYC Zen 4 (AVX512-BF16), one thread / two threads:
#   4096x4096  M = 16: 2.95 vs 6.30;  32: 5.96 vs 8.85 / 3.18 vs 5.13;  48: 8.74 vs 11.35 / 4.59 vs 6.18
#              64: 11.5 vs 13.6 / 6.10 vs 7.28;  96: 18.2 vs 18.5 / 9.07 vs 9.71
#   5632x2048  M = 32: 4.41 vs 6.24 / 2.16 vs 3.36;  64: 8.56 vs 9.46 / 4.30 vs 5.10;
#              96: 13.0 vs 13.0 / 6.43 vs 6.81
# and against dequantize + float32 GEMM (no native bf16 GEMM) on an AVX2-only AMD EPYC
# (Zen 1), one thread, the same weight and method:
#   4096x4096  M = 16: 16.1 vs 35.0;  32: 31.9 vs 47.5;  48: 47.9 vs 60.7;  64: 63.9 vs 73.5;
#              96: 96.0 vs 99.4
# so they cross near M = 96 on both; 64 keeps a margin (a prompt of up to 64 tokens is
# prefilled by the fused kernel).
FUSED_MAX_M_INTERLEAVED = 64
# The same with the opt-in int8 sums (NF4LORA_CPU_GEMV=int8 where the ISA has them:
# `_C.gemv_decoder` says "int8"), same machine, one thread, 4096x4096, fused (in one
# process, W streamed) vs dequantize + bf16 GEMM (bench_matmul's nf4lora-eval past M = 64),
# ms: M = 64: 7.0 vs 12.0 (the fused int16); 128: 13.2 vs 23.4; 256: 26.7 vs 42.2; 512:
# 52.3 vs 84.9. vpdpbusd does 64 multiply-adds per instruction where oneDNN's bf16 GEMM
# does 32 with vdpbf16ps, and a call reads W once (a chunk of 512 rows of the copy stays
# in L2 while every tile of x passes over it), so the fused kernel stays ahead at every
# M measured; 512 is the largest measured. AMX CPUs: re-measure (AMX GEMM is far faster).
FUSED_MAX_M_INTERLEAVED_INT8 = 512

# Largest M whose backward grad-input (dx = grad @ W + grad_h @ lora_A) takes the fused
# kernel (`_C.lora_grad_input_4bit`: W read packed, never materialized) instead of
# dequantize + GEMM: the measured crossovers, `python -m bench.bench_grad_input` (NF4 +
# double quant, blocksize 64, rank 16), AMD EPYC Zen 4 (AVX512-BF16), one thread, per-thread
# CPU ms, fused vs dequantize+gemm, W cold (the GEMM path's workspace flushes it):
#   bf16 (native bf16 GEMM), 4096x4096:  M = 1: 1.6-1.7 vs 6.3-6.5;  4: 3.2-4.8 vs 6.6-7.1;
#                                        8: 4.4-7.0 vs 7.3-8.0;  16: 9.1-11.1 vs 8.6-9.2
#                            11008x4096: M = 1: 4.5-4.8 vs 17.4-19.3;  8: 13.8-18.9 vs 19.3-19.8;
#                                        16: 28.2-30.0 vs 22.3-22.9
#   fp16 (float32 GEMM), 4096x4096:      M = 8: 6.8 vs 12.7;  16: 8.1-10.3 vs 15.6-16.8;
#                                        32: 15.3-16.4 vs 20.9-24.0
# (ranges: 2-4 runs, load average 0.9-2.5 on the 2 cores).
# The fused kernel is float32 FMAs, ~2 per 32 weights and row of grad (plus a decode shared
# by the rows), so it gains most where the other path pays for a dequantized W. Its AVX2
# build has half the lanes, and on an AVX2-only AMD EPYC (Zen 1: one 256-bit FMA per
# cycle, as two halves) it crosses sooner, bf16 (float32 GEMM), the same bench:
#   4096x4096:  M = 1: 5.1 vs 18.9;  8: 17.9 vs 28.9;  16: 31.5-32.3 vs 34.2-35.7;
#               20: 39.5 vs 36.9;  24: 45.9 vs 40.5;  32: 60.0 vs 49.3
#   11008x4096: M = 16: 83.5-89.2 vs 108.6-120.0;  20: 101.6 vs 114.7;  24: 125.3 vs 125.9;
#               32: 166.8 vs 153.0
GRAD_INPUT_FUSED_MAX_M = 32
GRAD_INPUT_FUSED_MAX_M_AVX2 = 16
GRAD_INPUT_FUSED_MAX_M_NATIVE_GEMM = 8

# Size of one dequantized chunk of W on the float32 path: small enough that the chunk
# the dequantizer just wrote is still in the 32 MiB L3 when the GEMM reads it, large
# enough that each GEMM is big (16 MiB = 1024 rows of a 4096-wide layer).
CHUNK_BYTES = 16 << 20

# The backward's grad @ W sums over W's rows, so it cuts W by columns instead
# (`_column_panels`): dx[:, c0:c1] = grad @ W[:, c0:c1] is one GEMM over all of W's rows,
# bit-identical to the whole-W product in any panel width (oneDNN, bf16 and float32), and
# the dequantized panel is ~PANEL_BYTES, still in cache when the GEMM reads it, but at least
# PANEL_MIN_COLUMNS wide (narrower panels starve the GEMM). Measured, grad-input alone
# (dequantize + GEMM, r = 16), NF4 + double quant, one thread, CPU ms, AMD EPYC Zen 4, medians
# of 4-10, whole-W path (before) vs panels of 4 MiB / 16 MiB / 4 MiB with 256 or 512 columns:
#   bf16 M = 16,  4096x4096:  8.5 vs 8.1 (512 col) / 11.0 (2048 col)
#                 11008x4096: 21.8-22.2 vs 23.0 (256 col) / 24.6 (128 col) / 27.5 (512 col)
#   bf16 M = 512, 4096x4096:  85.5 vs 87.0 (512 col) / 88.0 (2048 col)
#                 11008x4096: 230 vs 240 (128, 256 or 512 col) / 238 (704 col)
#   fp16 (float32 GEMM) M = 512, 4096x4096:  190 vs 192 (256 col) / 185 (512 col)
#                                11008x4096: 505 vs 513 (256 col) / 494 (512 col) / 551 (128)
# Panels cost one more pass over the packed bytes (copied out of their strided rows) and
# the double-quantized absmax decoded per call (~1-3 ms): +1-5% on grad-input, ~1% of a
# layer's forward + backward; the workspace is the panel, not all of W (32 / 86 MiB in bf16).
PANEL_BYTES = 4 << 20
PANEL_MIN_COLUMNS = 256

_thread = threading.local()  # per-thread workspaces: concurrent calls never share one


@functools.cache
def _native_16bit_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU has a native GEMM for 16-bit `dtype` (a fact of the CPU: asked once,
    not on every op call, where the binding cost ~5 us)."""
    return dtype != torch.float32 and _C is not None and _C.native_16bit_gemm(dtype)


def fused_max_m(dtype: torch.dtype, weight=None) -> int:
    """The largest M of activations of `dtype` that takes the fused kernel (see above), for
    `weight` (a PackedWeight: whether it brings an interleaved copy the call reads)."""
    if weight is not None and weight.interleaved is not None and reads_interleaved(dtype):
        return fused_max_m_interleaved(dtype)
    return FUSED_MAX_M_NATIVE_GEMM if _native_16bit_gemm(dtype) else FUSED_MAX_M


def fused_max_m_interleaved(dtype: torch.dtype) -> int:
    """The largest fused M of a call that reads a weight's interleaved copy: further with
    the opt-in int8 sums (see above; asked per call, 0.3 us: the environment may change)."""
    int8 = _C.gemv_decoder(FUSED_MAX_M_INTERLEAVED_INT8, dtype) == "int8"
    return FUSED_MAX_M_INTERLEAVED_INT8 if int8 else FUSED_MAX_M_INTERLEAVED


# Where a tile GEMM is named (NF4LORA_CPU_GEMM=amx), it takes every call the dequantize +
# GEMM path would, and, before the fused kernel, every call of at least this many rows: a
# tile holds 16 rows of x (fewer are padding), and the issue that asked for it set AMX at
# M >= 16. Until an AMX CPU has timed the crossovers (bench_matmul's nf4lora-amx row beside
# nf4lora[cpu] and nf4lora-eval), this is the request, not a measurement.
TILE_GEMM_MIN_M = 16


def route(M: int, dtype: torch.dtype, fused_max: int, weight=None) -> str:
    """matmul_path / grad_input_path for M rows of `dtype` and a kernel fused up to
    fused_max rows: "amx" where a tile GEMM is named (`_C.tile_gemm()`: NF4LORA_CPU_GEMM)
    and can take the call (bf16, rows of W on block boundaries; every blocksize is a
    multiple of 32, a tile's pairs) from TILE_GEMM_MIN_M rows, "fused" up to fused_max rows,
    then "amx" or "dequantize+gemm". weight None: one whose rows are whole blocks of 64
    (`nf4lora info`'s table)."""
    whole_blocks = weight is None or (weight.in_features > 0 and weight.in_features % weight.blocksize == 0)
    fused = 0 < M <= fused_max and whole_blocks
    if ((M >= TILE_GEMM_MIN_M or not fused) and M > 0 and whole_blocks and dtype == torch.bfloat16
            and _C.tile_gemm()):
        return "amx"
    return "fused" if fused else "dequantize+gemm"


def matmul_path(M: int, weight, dtype: torch.dtype) -> str:
    """Which path lora_matmul_4bit takes for M rows of x of `dtype`: "fused", "amx" (the
    tile GEMM) or "dequantize+gemm" (`route`)."""
    return route(M, dtype, fused_max_m(dtype, weight), weight)


def _fused(x, weight, lora_A, lora_B, scaling, bias, per_row=None):
    """(y, h) of the fused kernel. per_row: None (one adapter, lora_A [r, K], lora_B [N, r]),
    or (scalings float32 [n], adapter_index int64 [M]) for a mixed batch with lora_A
    [n, r, K], lora_B [n, N, r] (h is then each row's own, 0 on rows without adapter)."""
    M, N, rank = x.shape[0], weight.out_features, (0 if lora_A is None else lora_A.shape[-2])
    y = x.new_empty(M, N)     # (x.new_empty(sizes): 2.4 us on a 2-core Zen 1; torch.empty
    h = x.new_empty(M, rank)  # with dtype= 3.2, a tuple of sizes 3.8)
    bias = None if bias is None else bias.contiguous()
    if per_row is None:
        _C.lora_gemv_4bit(x, weight, lora_A, lora_B, float(scaling), bias, y, h)
    else:
        _C.multi_lora_gemv_4bit(x, weight, lora_A, lora_B, *per_row, bias, y, h)
    return y, h


def interleave_unavailable() -> str | None:
    """Why no weight gets an interleaved copy here (`interleave`), or None: the extension
    is missing, the active ISA has no kernel for one, or NF4LORA_CPU_INTERLEAVE=0."""
    if _C is None:
        return _IMPORT_ERROR
    if not _C.has_interleaved_gemv():
        return f"{_C.isa()} has no kernel for the interleaved copy: AVX2 and AVX-512 have"
    if os.environ.get("NF4LORA_CPU_INTERLEAVE", "1") == "0":
        return "NF4LORA_CPU_INTERLEAVE=0"
    return None


def reads_interleaved(dtype: torch.dtype) -> bool:
    """Whether the fused kernel reads a weight's interleaved copy for activations of `dtype`
    (16-bit ones, with an integer decoder: float32 x takes the float decoder on the
    bitsandbytes layout, csrc/cpu/dispatch.cpp), so that making one is worth its bytes."""
    return _C is not None and _C.reads_interleaved(dtype)


def interleave(weight) -> torch.Tensor | None:
    """The weight's interleaved copy (csrc/weight.h: 16 rows of W per tile, one row per
    vector lane, block constants decoded beside their codes), which the fused kernel reads
    instead of the bitsandbytes-layout bytes where the active ISA has a kernel for it
    (`_C.has_interleaved_gemv()`: AVX2, AVX-512); None where nothing would read one
    (`interleave_unavailable`, an empty weight, or in_features or blocksize not a multiple
    of 64: `_C.interleavable`). It costs the packed bytes once more (+12.5% for the
    constants: 9.4 MB for 4096x4096) and one pass to build (~6 ms for 4096x4096, one
    thread); an eval-mode Linear4bit keeps one (nn.linear4bit), for 1.4-2.3x faster
    small-M calls (README "CPU matmul")."""
    N, K = weight.out_features, weight.in_features
    if interleave_unavailable() is not None or N * K == 0 or not _C.interleavable(K, weight.blocksize):
        return None
    out = torch.empty(_C.interleaved_bytes(N, K), dtype=torch.uint8)
    _C.interleave_4bit(weight.with_offset_read(), out)
    return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The GEMM dtype of the dequantize+gemm path: float32 unless the CPU does `dtype` natively."""
    return dtype if _native_16bit_gemm(dtype) else torch.float32


def _workspace(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's scratch buffer of `dtype`, grown to at least numel, reused across calls."""
    buffers = getattr(_thread, "buffers", None)
    if buffers is None:
        buffers = _thread.buffers = {}
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def release_workspace() -> None:
    """Free this thread's dequantization workspace (it is reallocated on the next large-M call)."""
    _thread.buffers = {}


def _row_chunks(weight, dtype: torch.dtype, sums_over_rows: bool):
    """Yield (n0, n1, W[n0:n1] dequantized into the workspace, in dtype).

    Chunks of ~CHUNK_BYTES, each starting where `PackedWeight.rows` can cut. The forward's
    x @ W^T computes each output column in one chunk's GEMM: the same bytes chunked or not
    (4096x4096 bf16 M = 512, 2048-row chunks: bit-identical, 81.4 vs 81.7 ms one thread,
    Zen 4), and its workspace stays at CHUNK_BYTES instead of all of W. A product that sums
    over W's rows (the backward's grad @ W) takes column panels (`_column_panels`) where W's
    rows hold whole blocks; only where blocks span rows (in_features not a multiple of
    blocksize) does it come here, and then in a 16-bit dtype the whole W is one chunk, since
    a product per chunk would add a bf16 rounding per chunk.
    """
    N, K = weight.out_features, weight.in_features
    granule = weight.row_granule
    rows = max(N, 1)
    if dtype == torch.float32 or not sums_over_rows:
        rows = max(granule, CHUNK_BYTES // (dtype.itemsize * K) // granule * granule)
    buffer = _workspace(min(rows, N) * K, dtype)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        w = buffer[: (n1 - n0) * K].view(n1 - n0, K)
        dequantize_4bit(weight.rows(n0, n1), w)
        yield n0, n1, w


def _unfused(x, weight, lora_A, lora_B, scaling, bias, path):
    """The "amx" and "dequantize+gemm" paths: x @ W^T by the tile GEMM or by torch's GEMM
    on chunks of dequantized W (float32 sums rounded once to the GEMM's dtype, either way),
    then the LoRA and bias terms in that dtype."""
    if x.shape[0] == 0:  # nothing to multiply: skip dequantizing W
        return (x.new_empty((0, weight.out_features)),
                x.new_empty((0, 0 if lora_A is None else lora_A.shape[0])))
    dtype = _compute_dtype(x.dtype)
    xc = x.to(dtype)
    y = torch.empty((x.shape[0], weight.out_features), dtype=dtype)
    if path == "amx":  # (float32 y where the CPU has no bf16 GEMM: only when emulated)
        _C.tile_gemm_4bit(x, weight, y)
    else:
        for n0, n1, w in _row_chunks(weight, dtype, sums_over_rows=False):
            torch.mm(xc, w.t(), out=y[:, n0:n1])
    h = x.new_empty((x.shape[0], 0))
    if lora_A is not None:
        h = torch.nn.functional.linear(xc, lora_A.to(dtype)).to(x.dtype)  # rounded as saved
        y.addmm_(h.to(dtype), lora_B.to(dtype).t(), alpha=scaling)
    if bias is not None:
        y += bias.to(dtype)
    return y.to(x.dtype), h


def lora_matmul_4bit(x, weight, lora_A, lora_B, scaling, bias):
    path = matmul_path(x.shape[0], weight, x.dtype)
    if path == "fused":
        return _fused(x, weight, lora_A, lora_B, scaling, bias)
    return _unfused(x, weight, lora_A, lora_B, scaling, bias, path)


def multi_lora_matmul_4bit(x, weight, lora_A, lora_B, scalings, adapter_index, bias):
    """A mixed-adapter batch (nf4lora._ops.multi_lora_matmul_4bit): on the fused path each
    row's adapter inside the fused kernel (its h and epilogue read that row's adapter: one
    pass over W, and nothing after it), else the composite path (the dequantize+gemm
    matmul once for the batch, then the adapters gathered per row)."""
    if matmul_path(x.shape[0], weight, x.dtype) == "fused":
        per_row = (scalings, adapter_index.to(torch.int64))
        return _fused(x, weight, lora_A, lora_B, 1.0, bias, per_row)[0]
    return composite.multi_lora_matmul_4bit(sys.modules[__name__], x, weight, lora_A, lora_B,
                                            scalings, adapter_index, bias)


def grad_input_fused_max_m(dtype: torch.dtype) -> int:
    """The largest M of gradients of `dtype` whose grad-input takes the fused kernel (the
    active ISA is asked per call, 0.3 us: NF4LORA_CPU_ISA may change)."""
    if _native_16bit_gemm(dtype):
        return GRAD_INPUT_FUSED_MAX_M_NATIVE_GEMM
    return GRAD_INPUT_FUSED_MAX_M_AVX2 if _C.isa() == "avx2" else GRAD_INPUT_FUSED_MAX_M


def grad_input_path(M: int, weight, dtype: torch.dtype) -> str:
    """Which path lora_matmul_4bit_grad_input takes for M rows of grad of `dtype`: "fused",
    "amx" (the tile GEMM) or "dequantize+gemm" (`route`)."""
    return route(M, dtype, grad_input_fused_max_m(dtype), weight)


def _fused_grad_input(grad, weight, lora_A, grad_h):
    dx = torch.empty((grad.shape[0], weight.in_features), dtype=grad.dtype)
    _C.lora_grad_input_4bit(grad, weight, lora_A, None if lora_A is None else grad_h.contiguous(), dx)
    return dx


def lora_matmul_4bit_grad_input(grad, weight, lora_A, grad_h):
    path = grad_input_path(grad.shape[0], weight, grad.dtype)
    if path == "fused":
        return _fused_grad_input(grad, weight, lora_A, grad_h)
    return _unfused_grad_input(grad, weight, lora_A, grad_h, path)


def _column_panels(weight, dtype: torch.dtype):
    """Yield (c0, c1, W[:, c0:c1] dequantized into the workspace, in dtype): panels of
    ~PANEL_BYTES, a whole number of blocks wide, W's rows holding whole blocks."""
    N, K, bs = weight.out_features, weight.in_features, weight.blocksize
    weight = weight.with_absmax_decoded()      # nested groups of 256 blocks span columns
    columns = max(PANEL_MIN_COLUMNS, PANEL_BYTES // (dtype.itemsize * max(N, 1)))
    columns = max(bs, columns // bs * bs)
    buffer = _workspace(N * min(columns, K), dtype)
    packed = _workspace(N * min(columns, K) // 2, torch.uint8)
    for c0 in range(0, K, columns):
        c1 = min(K, c0 + columns)
        w = buffer[: N * (c1 - c0)].view(N, c1 - c0)
        dequantize_4bit(weight.columns(c0, c1, out=packed), w)
        yield c0, c1, w


def _unfused_grad_input(grad, weight, lora_A, grad_h, path):
    """The "amx" and "dequantize+gemm" paths of grad-input: grad @ W by the tile GEMM or by
    torch's GEMM on dequantized column panels (or row chunks), rounded once to the GEMM's
    dtype, then the LoRA term in that dtype."""
    if grad.shape[0] == 0:
        return grad.new_empty((0, weight.in_features))
    dtype = _compute_dtype(grad.dtype)
    gc = grad.to(dtype)
    if path == "amx":
        dx = torch.empty((grad.shape[0], weight.in_features), dtype=dtype)
        _C.tile_grad_input_4bit(grad, weight, dx)
    elif weight.in_features % weight.blocksize == 0:
        # dx[:, c0:c1] = grad @ W[:, c0:c1]: each element one GEMM's sum over all of W's
        # rows, rounded once, whatever the panel (see PANEL_BYTES)
        dx = torch.empty((grad.shape[0], weight.in_features), dtype=dtype)
        for c0, c1, w in _column_panels(weight, dtype):
            torch.mm(gc, w, out=dx[:, c0:c1])
    else:  # blocks span rows: no column panels
        dx = None
        for n0, n1, w in _row_chunks(weight, dtype, sums_over_rows=True):
            dx = gc[:, n0:n1] @ w if dx is None else dx.addmm_(gc[:, n0:n1], w)
        if dx is None:  # no rows in W
            dx = torch.zeros((grad.shape[0], weight.in_features), dtype=dtype)
    if grad_h is not None:
        dx.addmm_(grad_h.to(dtype), lora_A.to(dtype))
    return dx.to(grad.dtype)
