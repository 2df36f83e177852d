"""The Triton backend: launch glue for `nf4lora.triton_kernels` (grid, block sizes, dtypes).

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter,
how the tests run it on machines without a GPU). The kernels and their block-size
choices live in triton_kernels/ (one op per file); this module routes each matmul shape
to a kernel (matmul_path, fused_splits: the named crossovers), allocates outputs and
launches. Inputs are validated by the caller (see nf4lora.backends).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os

import torch

from .. import codebook
from ..codebook import FP4_ABS_THRESHOLDS, FP4_CODE_BY_RANK
from ..reference import midpoints, num_blocks

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE_TYPES = ("cuda", "cpu") if INTERPRETING else ("cuda",)


def takes_format(quant_type: str) -> bool:
    """Any code book: the kernels read the 16-entry table as data (_table), and quantize
    by its midpoints (FP4 by its own sign/magnitude rule; _encoder)."""
    return True


def _import_kernels():
    """(kernels package, None) or (None, why not).

    Installed, the kernels are `nf4lora.triton_kernels`; in a source checkout without an
    install they are the top-level `triton_kernels` folder beside `nf4lora/`. That name
    is also used by other distributions, so the fallback must carry our marker.
    """
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed (pip install triton)"
    try:
        return importlib.import_module("nf4lora.triton_kernels"), None
    except ModuleNotFoundError as error:
        if error.name != "nf4lora.triton_kernels":
            return None, f"importing nf4lora.triton_kernels failed: {error}"
    except ImportError as error:
        return None, f"importing nf4lora.triton_kernels failed: {error}"
    try:
        import triton_kernels
    except ImportError as error:
        return None, f"importing the triton_kernels source folder failed: {error}"
    if not getattr(triton_kernels, "NF4LORA_TRITON_KERNELS", False):
        return None, (f"the importable triton_kernels ({triton_kernels.__file__}) is another "
                      "distribution's, and nf4lora.triton_kernels is not installed")
    return triton_kernels, None


_kernels, _unavailable_reason = _import_kernels()


def kernels():
    """The Triton kernel package (for the roofline's launch configs); ImportError if absent."""
    if _kernels is None:
        raise ImportError(_unavailable_reason)
    return _kernels


def availability() -> str | None:
    if _unavailable_reason is not None:
        return _unavailable_reason
    if not INTERPRETING and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return None


@functools.lru_cache(maxsize=None)
def _table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry float32 table of a format key on `device`, uploaded once per device and
    format (a custom key carries its table exactly: nf4lora.codebook.table)."""
    return codebook.table(quant_type, device)


@functools.lru_cache(maxsize=None)
def _encoder(quant_type: str) -> tuple[str, tuple, int]:
    """The quantize kernel's (encoding, thresholds, fp4_magnitude_codes) for quant_type
    (triton_kernels/codec.py ENCODINGS): the spec's constants (reference.encode_nf4 /
    encode_fp4), as the float32 values the reference compares against."""
    if quant_type == "fp4":
        thresholds = torch.tensor(FP4_ABS_THRESHOLDS, dtype=torch.float32).tolist()
        return "fp4", tuple(thresholds), _kernels.codec.pack_fp4_magnitude_codes(FP4_CODE_BY_RANK)
    # every other format: the count of its table's float32 midpoints below the value, the
    # spec's rule (reference.encode_sorted; for NF4 the midpoints are nf4_thresholds)
    return "midpoints", tuple(midpoints(codebook.table(quant_type)).tolist()), 0


def _log2_of_power_of_two(value: int, name: str) -> int:
    if value < 2 or value & (value - 1):
        raise ValueError(f"{name} must be a power of 2 (the kernels shift by its log2), "
                         f"got {value}")
    return value.bit_length() - 1


def _check_quantize_blocksize(blocksize: int, allowed) -> None:
    if blocksize not in allowed:
        raise ValueError(f"blocksize must be one of {allowed} for the triton backend, "
                         f"got {blocksize}")


def _on(device: torch.device):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def _contiguous_output(out: torch.Tensor):
    """Yield a flat contiguous buffer the kernel fills, copied into `out` if needed."""
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype,
                                                         device=out.device)
    yield target.view(-1)
    if target is not out:
        out.copy_(target)


def quantize_4bit(A, blocksize, quant_type):
    kernels = _kernels.quantize_4bit
    _check_quantize_blocksize(blocksize, kernels.BLOCKSIZES)
    x = A.reshape(-1).contiguous()
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=x.device)
    if n:
        encoding, thresholds, fp4_magnitude_codes = _encoder(quant_type)
        config = kernels.launch_config(blocksize, encoding)
        with _on(x.device):
            kernels.quantize_4bit_kernel[kernels.grid(n, config)](
                x, packed, absmax, thresholds, fp4_magnitude_codes, n, packed.numel(), **config)
    return packed, absmax


def dequantize_4bit(weight, out):
    kernels = _kernels.dequantize_4bit
    n = out.numel()
    if n == 0:
        return
    (packed, absmax, table, nested_code, nested_absmax, blocksize_log2, nested_log2,
     nested_offset) = _weight_args(weight, out.device)
    config = kernels.launch_config(weight.nested is not None)
    with _contiguous_output(out) as flat_out, _on(out.device):
        kernels.dequantize_4bit_kernel[kernels.grid(n, config)](
            packed, absmax, table, nested_code, nested_absmax, flat_out,
            n, (n + 1) // 2, blocksize_log2, nested_log2, nested_offset, **config)


def quantize_blockwise(A, code, blocksize):
    kernels = _kernels.blockwise_8bit
    _check_quantize_blocksize(blocksize, kernels.BLOCKSIZES)
    x = A.reshape(-1).contiguous()
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=x.device)
    if n:
        config = kernels.quantize_launch_config(blocksize)
        with _on(x.device):
            kernels.quantize_blockwise_kernel[kernels.quantize_grid(n, config)](
                x, code.float().contiguous(), codes, absmax, n, **config)
    return codes, absmax


def dequantize_blockwise(codes, absmax, code, blocksize, out):
    kernels = _kernels.blockwise_8bit
    blocksize_log2 = _log2_of_power_of_two(blocksize, "blocksize")
    n = out.numel()
    if n == 0:
        return
    config = kernels.dequantize_launch_config()
    with _contiguous_output(out) as flat_out, _on(out.device):
        kernels.dequantize_blockwise_kernel[kernels.dequantize_grid(n, config)](
            codes.reshape(-1).contiguous(), absmax.reshape(-1).float(),
            code.float().contiguous(), flat_out, n, blocksize_log2, **config)


# --------------------------------------------------------------------------------------
# Routing: which kernel runs a matmul call (the one place this backend decides it; the
# kernels and their launch configs are in triton_kernels/). The split-K GEMV for
# M <= GEMV_MAX_M, the fused tensor-core kernel up to the roofline threshold FUSED_MAX_M
# (with K split when its tiles leave SMs idle: fused_splits), and above it (or for odd
# in_features) the composite path, dequantize into a buffer + torch's matmul.
# --------------------------------------------------------------------------------------

PATH_GEMV, PATH_FUSED, PATH_COMPOSITE = "gemv", "fused", "composite"

# Up to this many tokens the split-K GEMV (triton_kernels/gemv.py) runs; the tensor-core
# tile of the fused kernel would be mostly padding and too few programs would cover W.
GEMV_MAX_M = 16

# Above FUSED_MAX_M the composite path runs (nf4lora.backends.composite). Why: the fused
# kernel moves 0.52 bytes per weight, the composite path 4.5 (read 0.52, write 2, read 2
# again), so the fused kernel wins while the GEMM is memory-bound; past the ridge point
# both are compute-bound, and cuBLAS (wgmma, TMA, tuned tiles) beats a Triton kernel that
# spends issue slots decoding W in its K loop and decodes W again for every M tile
# (bitsandbytes measured the same on H100: its dispatcher hands sm_90 back to dequantize
# + cuBLAS early, "thresholds are tight"). The ridge point, M* = peak FLOP/s * 0.516 B /
# (2 * bandwidth), from the roofline's memory_bound_max_m:
#   A100 (312 TFLOP/s bf16, 2.039 TB/s): M* = 39.5 -> 39
#   H100 (989 TFLOP/s bf16, 3.35 TB/s):  M* = 76.1 -> 64, capped at BLOCK_M: M in 65..76
#     needs a second M tile that decodes all of W again, for a margin of at most 15%.
# Keys are compute-capability majors; 8.x consumer parts (3090: M* ~ 35, 4090: ~ 41) sit
# near the A100, and Blackwell (B200: M* ~ 73) near the H100. Derived, not yet measured:
# scripts/gpu_check.sh times both sides of it.
FUSED_MAX_M = {8: 39, 9: 64}
FUSED_MAX_M_DEFAULT = 64  # newer archs, and Triton's interpreter (CPU tensors)

# Split-K of the fused forward and backward kernels. One program per [64, 64] output
# tile walks all of K: at N = 4096 that is 64 programs for 132 SMs (H100). By estimate
# the kernel's time is mostly issue slots decoding W (~10 instructions per weight: 4096 x
# 4096 is ~5M warp-instructions, ~11 us on 64 SMs at 1.8 GHz, ~5.5 us on 132), so idle
# SMs are time lost. fused_splits picks the number of K slices s that minimizes the waves,
# ceil(tiles * s / SMs) / s, the time in units of one full-K tile on one SM:
#   tiles = 64 (N = 4096), 132 SMs:   s = 2, 0.5 (s = 1: 1.0)
#   tiles = 172 (N = 11008), 132 SMs: s = 3, 1.33 (s = 1: 2.0; the ideal 172/132 = 1.30)
# and splits only for a gain of at least SPLIT_MIN_GAIN (the reduction is one more
# launch, ~2-3 us, and writes + reads 8 * M * N bytes of fp32 partials per slice, e.g.
# 2 MB per slice at M = 64, N = 4096: L2-resident on the 50 MB of an H100). Each slice
# keeps at least MIN_K_STEPS_PER_SPLIT BLOCK_K steps (the 3-stage pipeline fills in 2;
# 8 x 64 = 512 of K), at most MAX_SPLITS slices. Derived, not yet measured: the GPU
# bench times nf4lora[triton] against nf4lora[triton] without split-K
# (SPLIT_K_ENABLED = False) on the same shapes.
SPLIT_MIN_GAIN = 0.9          # split when the waves fall to <= 90% of the unsplit ones
MIN_K_STEPS_PER_SPLIT = 8
MAX_SPLITS = 8
SPLIT_K_ENABLED = True        # False: never split (for the benchmark's comparison)


def fused_max_m(capability: tuple[int, int] | None) -> int:
    """Largest M the fused kernels take on a GPU of this compute capability (None: the
    interpreter). Below sm_80 (no bf16 MMA, and not an arch the compile report checks):
    0, always the composite path."""
    if capability is None:
        return FUSED_MAX_M_DEFAULT
    major = capability[0]
    if major < 8:
        return 0
    return FUSED_MAX_M.get(major, FUSED_MAX_M_DEFAULT)


def matmul_path(m: int, n: int, k: int, capability: tuple[int, int] | None) -> str:
    """PATH_GEMV, PATH_FUSED or PATH_COMPOSITE for x [m, k] @ W^T [k, n] on a GPU of
    this compute capability (None: the interpreter).

    Odd k goes to the composite path: a packed byte would then straddle two rows of W,
    and the kernels read each row's bytes as whole pairs. Empty shapes too (nothing to
    fuse, and torch handles them)."""
    limit = fused_max_m(capability)
    if m == 0 or n == 0 or k == 0 or k % 2 or m > limit:
        return PATH_COMPOSITE
    return PATH_GEMV if m <= GEMV_MAX_M else PATH_FUSED


def fused_splits(tiles: int, steps: int, num_sms: int) -> int:
    """K slices for a fused (or backward) launch of `tiles` output tiles, each walking
    `steps` BLOCK_K steps of the reduction, on num_sms SMs (see SPLIT_MIN_GAIN above)."""
    most = min(MAX_SPLITS, steps // MIN_K_STEPS_PER_SPLIT)
    if not SPLIT_K_ENABLED or most < 2:
        return 1

    def waves(splits: int) -> float:
        return -(-tiles * splits // num_sms) / splits
    best = min(range(1, most + 1), key=lambda splits: (waves(splits), splits))
    return best if waves(best) <= SPLIT_MIN_GAIN * waves(1) else 1


# --------------------------------------------------------------------------------------
# The matmul ops: lora_matmul_4bit, multi_lora_matmul_4bit and lora_matmul_4bit_grad_input
# (see nf4lora.backends for the contract), routed by matmul_path.
# --------------------------------------------------------------------------------------

_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The interpreter has no SMs; the split heuristics get a small nominal count so that
# interpreted launches stay few programs.
INTERPRETER_NUM_SMS = 4


def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _weight_args(weight, device: torch.device) -> tuple:
    """The kernels' weight arguments: (packed, absmax, table, nested_code, nested_absmax,
    blocksize_log2, nested_blocksize_log2, nested_offset). Without double quantization the
    nested slots get the table (never read) and zeros."""
    table = _table(weight.quant_type, device)
    nested = weight.nested
    if nested is None:
        absmax = weight.absmax.reshape(-1).float()
        nested_code, nested_absmax, nested_offset, nested_log2 = table, table, 0.0, 0
    else:
        absmax = weight.absmax.reshape(-1).view(torch.uint8)
        nested_code = nested.code.float().contiguous()
        nested_absmax = nested.absmax.reshape(-1).float()
        nested_offset = float(nested.offset)
        nested_log2 = _log2_of_power_of_two(nested.blocksize, "nested blocksize")
    return (weight.packed.reshape(-1).view(torch.uint8), absmax, table, nested_code,
            nested_absmax, _log2_of_power_of_two(weight.blocksize, "blocksize"), nested_log2,
            nested_offset)


def _matmul_weight_args(weight, device: torch.device) -> tuple:
    """The matmul kernels' ten weight arguments (triton_kernels/lora_matmul.py
    weight_signature): `_weight_args` with the row bytes and block count after the
    pointers."""
    (packed, absmax, table, nested_code, nested_absmax, blocksize_log2, nested_log2,
     nested_offset) = _weight_args(weight, device)
    n, k = weight.out_features, weight.in_features
    return (packed, absmax, table, nested_code, nested_absmax, k // 2,
            num_blocks(n * k, weight.blocksize), blocksize_log2, nested_log2, nested_offset)


def _composite():
    """(the composite module, this backend module): dequantize + torch's matmul."""
    import sys
    from . import composite
    return composite, sys.modules[__name__]


def _check_path(path: str, m: int, k: int) -> None:
    if path not in (PATH_GEMV, PATH_FUSED, PATH_COMPOSITE):
        raise ValueError(f"path must be one of gemv, fused, composite; got {path!r}")
    if path != PATH_COMPOSITE and k % 2:
        raise ValueError(f"the {path} kernel needs an even in_features, got {k}")
    if path == PATH_GEMV and m > GEMV_MAX_M:
        raise ValueError(f"the gemv kernel takes M <= {GEMV_MAX_M} rows, got {m}")


def _or_stand_in(t, stand_in: torch.Tensor) -> torch.Tensor:
    """t, or stand_in where a kernel never reads t (None, or empty): a pointer argument
    still needs a tensor."""
    return stand_in if t is None or t.numel() == 0 else t


def _fused_split(tiles: int, length: int, block: int, splits, device) -> tuple[int, int]:
    """(splits, length per split) of a fused launch's reduction axis of `length`, walked
    in steps of `block`: `splits` if forced, else fused_splits' choice."""
    if splits is None:
        splits = fused_splits(tiles, -(-length // block), _num_sms(device))
    return _kernels.gemv.split_k(length, splits, block)


@functools.lru_cache(maxsize=None)
def _index_stand_in(device: torch.device) -> torch.Tensor:
    """An int32 tensor for the adapter-index pointer of launches without one (never read;
    the kernels' index_ptr is *i32 in every binary, as the compile report builds them)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def lora_matmul_4bit(x, weight, lora_A, lora_B, scaling, bias, *, path=None, splits=None):
    """(y [M, out], h [M, r]) = (x @ W^T + scaling * h @ lora_B^T + bias, x @ lora_A^T).

    `path` forces a kernel ("gemv", "fused", "composite") and `splits` the GEMV's or the
    fused kernel's K slices; both are for tests and benchmarks, the default is the
    routing's choice (matmul_path, then gemv.num_splits or fused_splits)."""
    m, k = x.shape
    path = path or matmul_path(m, weight.out_features, k, _capability(x.device))
    _check_path(path, m, k)
    if path == PATH_COMPOSITE:
        composite, backend = _composite()
        return composite.lora_matmul_4bit(backend, x, weight, lora_A, lora_B, scaling, bias)
    return _launch(x, weight, lora_A, lora_B, float(scaling), bias, None, path, splits)


def multi_lora_matmul_4bit(x, weight, lora_A, lora_B, scalings, adapter_index, bias, *,
                           path=None, splits=None):
    """y [M, out]: a mixed-adapter batch (nf4lora._ops.multi_lora_matmul_4bit), each row's
    adapter inside the kernels (per-row shrink and epilogue, PER_ROW in
    triton_kernels/lora_matmul.py and gemv.py), on the same paths as lora_matmul_4bit:
    the GEMV computes every row's h in its own pass 1; the fused path runs that shrink
    alone first (N = 0), then the fused kernel with the per-row epilogue. `path` and
    `splits` as in lora_matmul_4bit."""
    m, k = x.shape
    path = path or matmul_path(m, weight.out_features, k, _capability(x.device))
    _check_path(path, m, k)
    if path == PATH_COMPOSITE:
        composite, backend = _composite()
        return composite.multi_lora_matmul_4bit(backend, x, weight, lora_A, lora_B, scalings,
                                                adapter_index, bias)
    per_row = (adapter_index.to(torch.int32), scalings, lora_A.shape[0])
    lora_A = lora_A.reshape(-1, k)    # [n * r, K]: adapter i's rows start at i * r
    return _launch(x, weight, lora_A, lora_B, 1.0, bias, per_row, path, splits)[0]


def _launch(x, weight, lora_A, lora_B, scaling, bias, per_row, path, splits):
    """The GEMV or fused launches of lora_matmul_4bit and multi_lora_matmul_4bit; per_row:
    None, or (int32 index [M], float32 scalings [n], n) with lora_A [n * r, K] and lora_B
    [n, out, r] stacked (r = lora_B.shape[-1]); h is then each row's own, [M, r]."""
    kernels = _kernels.lora_matmul
    gemv = _kernels.gemv
    m, k = x.shape
    n = weight.out_features
    r = 0 if lora_B is None else lora_B.shape[-1]
    index, scalings, adapters = per_row or (_index_stand_in(x.device), None, 1)
    bias = None if bias is None else bias.contiguous()   # the ops check its shape, not strides
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, r), dtype=x.dtype, device=x.device)
    weight_args = _matmul_weight_args(weight, x.device)
    x_type = _TYPE_NAMES[x.dtype]
    nested = weight.nested is not None
    given = functools.partial(_or_stand_in, stand_in=x)
    scalings = _or_stand_in(scalings, _table(weight.quant_type, x.device))   # fp32, unread
    suffix = "_per_row" if per_row else ""
    with _on(x.device):
        if path == PATH_GEMV:
            config = gemv.launch_config(gemv.block_m_for(m), x_type, nested, per_row is not None)
            slots = gemv.adapter_slots(m, adapters, config)
            tiles = -(-n // config["BLOCK_N"]) - (-r // config["BLOCK_N"]) * slots
            if splits is None:
                splits, k_per_split = gemv.num_splits(m, k, tiles, _num_sms(x.device),
                                                      config["BLOCK_K"])
            else:
                splits, k_per_split = gemv.split_k(k, splits, config["BLOCK_K"])
            partial = torch.empty((splits, m, n + r), dtype=torch.float32, device=x.device)
            gemv.gemv_split_k_kernel[gemv.grid(n, r, splits, config, slots=slots)](
                x, *weight_args, given(lora_A), index, partial, m, n, k, r, k_per_split,
                **config)
            # Pass 2: the split-K reduction, which also sums h from the workspace's last r
            # columns into h.
            config = kernels.reduce_config(
                "none" if lora_A is None else "B_h_from_partials" + suffix, bias is not None)
            kernels.split_k_reduce_kernel[kernels.reduce_grid(m, n, config)](
                partial, given(h), given(lora_B), index, scalings, given(bias), y, m, n, r,
                splits, n + r, scaling, **config)
            return y, h
        # h by a separate small matmul, the kernel (or the split-K reduction) adds
        # h @ B^T in its epilogue (why: triton_kernels/lora_matmul.py's docstring).
        if per_row is not None:
            h = _per_row_shrink(x, weight_args, lora_A, index, adapters, r, x_type, nested)
        elif lora_A is not None:
            h = torch.nn.functional.linear(x, lora_A)
        config = kernels.launch_config(x_type, nested, lora_A is not None, bias is not None,
                                       per_row=per_row is not None)
        tiles = kernels.grid(m, n, config)[0]
        splits, k_per_split = _fused_split(tiles, k, config["BLOCK_K"], splits, x.device)
        partial = y
        if splits > 1:
            config = kernels.launch_config(x_type, nested, False, False, split_k=True)
            partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        kernels.lora_matmul_kernel[kernels.grid(m, n, config, splits)](
            x, *weight_args, given(h), given(lora_B), index, scalings, given(bias), y, partial,
            m, n, k, r, scaling, k_per_split, **config)
        if splits > 1:
            config = kernels.reduce_config("none" if lora_A is None else "B" + suffix,
                                           bias is not None)
            kernels.split_k_reduce_kernel[kernels.reduce_grid(m, n, config)](
                partial, given(h), given(lora_B), index, scalings, given(bias), y, m, n, r,
                splits, n, scaling, **config)
    return y, h


def _per_row_shrink(x, weight_args, lora_A, index, adapters, r, x_type, nested):
    """h [M, r] with h[m] = x[m] @ A_i^T, i = index[m] (0 for -1 rows, which no shrink
    program writes: the workspace starts zeroed, splits * M * r * 4 bytes): the GEMV's
    per-row shrink programs alone (N = 0) over tiles of 16 rows, split over K by the GEMV's
    heuristic for 16 rows, then the split-K reduction rounds h to x's dtype."""
    kernels = _kernels.lora_matmul
    gemv = _kernels.gemv
    m, k = x.shape
    if r == 0:
        return torch.empty((m, 0), dtype=x.dtype, device=x.device)
    config = gemv.launch_config(16, x_type, nested, per_row=True)
    slots = gemv.adapter_slots(m, adapters, config)
    tiles = -(-r // config["BLOCK_N"]) * slots * -(-m // config["BLOCK_M"])
    splits, k_per_split = gemv.num_splits(config["BLOCK_M"], k, tiles, _num_sms(x.device),
                                          config["BLOCK_K"])
    partial = torch.zeros((splits, m, r), dtype=torch.float32, device=x.device)
    gemv.gemv_split_k_kernel[gemv.grid(0, r, splits, config, m=m, slots=slots)](
        x, *weight_args, lora_A, index, partial, m, 0, k, r, k_per_split, **config)
    h = torch.empty((m, r), dtype=x.dtype, device=x.device)
    config = kernels.reduce_config("none", False)
    kernels.split_k_reduce_kernel[kernels.reduce_grid(m, r, config)](
        partial, h, h, index, partial, h, h, m, r, 0, splits, r, 1.0, **config)
    return h


def lora_matmul_4bit_grad_input(grad, weight, lora_A, grad_h, *, path=None, splits=None):
    """dx [M, in] = grad @ W + grad_h @ lora_A, W read packed (fused) up to the forward's
    threshold; above it the composite path. `path` forces "fused" or "composite",
    `splits` the fused kernel's slices of the reduction over out_features."""
    kernels = _kernels.lora_matmul
    m, n = grad.shape
    k = weight.in_features
    path = path or matmul_path(m, n, k, _capability(grad.device))
    if path == PATH_GEMV:  # no GEMV variant of the backward: the fused kernel (split-K)
        path = PATH_FUSED
    _check_path(path, m, k)
    if path == PATH_COMPOSITE:
        composite, backend = _composite()
        return composite.lora_matmul_4bit_grad_input(backend, grad, weight, lora_A, grad_h)
    backward = _kernels.lora_matmul_backward
    r = 0 if lora_A is None else lora_A.shape[0]
    dx = torch.empty((m, k), dtype=grad.dtype, device=grad.device)
    weight_args = _matmul_weight_args(weight, grad.device)
    x_type = _TYPE_NAMES[grad.dtype]
    nested = weight.nested is not None
    config = backward.launch_config(x_type, nested, lora_A is not None)
    tiles = backward.grid(m, k, config)[0]
    splits, n_per_split = _fused_split(tiles, n, config["BLOCK_N"], splits, grad.device)
    partial = dx
    if splits > 1:
        config = backward.launch_config(x_type, nested, False, split_k=True)
        partial = torch.empty((splits, m, k), dtype=torch.float32, device=grad.device)
    given = functools.partial(_or_stand_in, stand_in=grad)
    with _on(grad.device):
        backward.lora_matmul_grad_input_kernel[backward.grid(m, k, config, splits)](
            grad, *weight_args, given(lora_A), given(grad_h), dx, partial, m, n, k, r,
            n_per_split, **config)
        if splits > 1:
            # dx = sum of the slices + grad_h @ A, as the reduction's h @ L^T with L = A^T.
            config = kernels.reduce_config("none" if lora_A is None else "A", False)
            kernels.split_k_reduce_kernel[kernels.reduce_grid(m, k, config)](
                partial, given(grad_h), given(lora_A), _index_stand_in(grad.device),
                weight_args[2], grad, dx, m, k, r, splits, k, 1.0, **config)
    return dx
