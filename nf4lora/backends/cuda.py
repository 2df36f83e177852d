"""The CUDA backend: launch glue for `nf4lora._C_cuda` (csrc/cuda). The kernels' speed on
paper (bytes, FLOPs, ideal H100/A100 time) is nf4lora/roofline.py's kernel_roofline.

The kernels take the tensors and the PackedWeight themselves (csrc/bindings_common.h, shared
with the CPU extension, reads their device addresses, sizes and dtypes) and the current
stream as an integer (`torch.cuda.current_stream().cuda_stream`), and launch
asynchronously on it, on the tensors' device. Callers (nf4lora._ops) have validated
dtypes, sizes and devices; here (and in the binding, for the packed weight) only cheap
checks guard what would otherwise read or write out of bounds. Build: `pip install -e .`
with nvcc on PATH (or CUDA_HOME set) compiles the extension; NF4LORA_CUDA_ARCHS picks the
architectures (default 80;86;89;90).

Beyond the backend interface, `gemv_4bit_lora` is the fused decode kernel
(y = x @ W^T + scaling * (x @ A^T) @ B^T + bias and h = x @ A^T for up to 8 rows of x,
one launch), and `multi_lora_gemv_4bit` the same kernel for a mixed-adapter batch (each
row of x its own adapter of a stack, or none).

Which kernel runs a matmul op (lora_matmul_4bit, multi_lora_matmul_4bit,
lora_matmul_4bit_grad_input) is decided in one place, `matmul_path`: the GEMV above for
1..8 rows of fp16/bf16 (forward only: there is no CUDA backward kernel); the rest, up to
the Triton backend's fused-kernel rows (backends/triton.py fused_max_m: 39 on sm_8x, 64
on sm_90), Triton's own op (its routing picks its GEMV or fused kernel: W read packed
once) when the Triton backend can run here; above that, or without Triton, the composite
path (this backend's dequantize into a buffer + cuBLAS). DoRA is why the middle matters:
its forward runs x's rows and lora_A's r rows through one call (M = 1, r = 16: 17 rows).
The Triton rows are a route by shape, not a fallback for a missing backend: without a
usable Triton the same shapes take the composite path, and TRITON_ROUTE_ENABLED = False
turns the route off (the benchmarks' "nf4lora[cuda] no-triton" rows). Its bounds are
Triton's derived crossovers, not yet measured: scripts/gpu_check.sh times both sides.
"""
from __future__ import annotations

import contextlib
import functools
import math
import sys

import torch

from .. import codebook
from . import composite

DEVICE_TYPES = ("cuda",)


def takes_format(quant_type: str) -> bool:
    """Every format: the kernels take its table and encoder as data, as kernel parameters
    (nf4lora.codebook.kernel_codec; a weight's through PackedWeight.codec)."""
    return codebook.is_format_key(quant_type)

BUILD_HINT = ("build it with `pip install -e .` on a machine where nvcc is on PATH "
              "(or CUDA_HOME points at the CUDA toolkit)")

try:
    from .. import _C_cuda
    _IMPORT_ERROR: str | None = None
except ImportError as error:  # not built (no nvcc at install time) or built broken
    _C_cuda = None
    _IMPORT_ERROR = f"the CUDA extension nf4lora._C_cuda is not importable ({error}); {BUILD_HINT}"

GEMV_MAX_M = 8  # rows of x the GEMV kernel takes (decode); larger M: see matmul_path


def availability() -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"no usable CUDA device: torch.cuda.is_available() is False (torch "
                f"{torch.__version__}, {build}); the CUDA runtime says: "
                f"{_C_cuda.runtime_status()}")
    return None


# The two hooks below are all that ties this glue to a real GPU; tests replace them (and
# _C_cuda) to drive this module on CPU tensors through the host replay of the kernels.
def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _on_device(device: torch.device):
    """Make `device` current: the kernels launch on the current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def _check_input(t: torch.Tensor, name: str, device: torch.device) -> None:
    assert t.device == device, f"{name} is on {t.device}, expected {device}"
    assert t.is_contiguous(), f"{name} must be contiguous"


def quantize_4bit(A, blocksize, quant_type):
    _check_input(A, "A", A.device)
    n = A.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(_blocks(n, blocksize), dtype=torch.float32, device=A.device)
    with _on_device(A.device):
        _C_cuda.quantize_4bit(A, blocksize, codebook.kernel_codec(quant_type), packed, absmax,
                              _stream(A.device))
    return packed, absmax


def dequantize_4bit(weight, out):
    device = out.device
    _check_input(out, "out", device)
    assert weight.device == device and out.numel() == weight.numel, "out: the weight's size, device"
    with _on_device(device):
        _C_cuda.dequantize_4bit(weight, out, _stream(device))


def quantize_blockwise(A, code, blocksize):
    _check_input(A, "A", A.device)
    code = code.to(device=A.device, dtype=torch.float32).contiguous()
    assert code.numel() == 256, "code must have 256 entries"
    n = A.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(_blocks(n, blocksize), dtype=torch.float32, device=A.device)
    with _on_device(A.device):
        _C_cuda.quantize_blockwise(A, code, blocksize, codes, absmax, _stream(A.device))
    return codes, absmax


def dequantize_blockwise(codes, absmax, code, blocksize, out):
    n, device = out.numel(), out.device
    for t, name in ((codes, "codes"), (absmax, "absmax"), (out, "out")):
        _check_input(t, name, device)
    code = code.to(device=device, dtype=torch.float32).contiguous()
    assert codes.dtype == torch.uint8 and codes.numel() >= n, "codes: u8 [n]"
    assert absmax.dtype == torch.float32 and absmax.numel() >= _blocks(n, blocksize)
    assert code.numel() == 256, "code must have 256 entries"
    with _on_device(device):
        _C_cuda.dequantize_blockwise(codes, absmax, code, blocksize, out, _stream(device))


def _gemv_rows(x, weight) -> int:
    """M, the rows of x [..., K] the GEMV takes (1..8, float16 / bfloat16), checked."""
    K = weight.in_features
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float16 or bfloat16 for the CUDA GEMV, got {x.dtype}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight has K = {K}")
    M = math.prod(x.shape[:-1])
    if not 1 <= M <= GEMV_MAX_M:
        raise ValueError(f"the CUDA GEMV takes 1..{GEMV_MAX_M} rows of x, got {M}")
    assert weight.device == x.device, f"the weight is on {weight.device}, x on {x.device}"
    return M


def _same_dtype(x, **operands) -> None:
    for name, t in operands.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must be {x.dtype} like x, got {t.dtype}")


def _gemv_outputs(x, M: int, N: int, rank: int):
    """(y [M, N], h [M, rank], the workspace) for a GEMV launch."""
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    h = torch.empty(M, rank, dtype=x.dtype, device=x.device)
    workspace = torch.empty(max(1, _C_cuda.gemv_workspace_bytes(M, rank) // 4),
                            dtype=torch.int32, device=x.device)
    return y, h, workspace


def gemv_4bit_lora(x, weight, lora_A=None, lora_B=None, scaling=1.0, bias=None):
    """(y, h) with y = x @ W^T + scaling * h @ B^T + bias and h = x @ A^T, for x [..., K]
    with at most 8 rows.

    W is `weight`, a PackedWeight of shape (N, K); x, lora_A [r, K], lora_B [N, r], bias [N]
    are all float16 or all bfloat16. Accumulation is float32; y [..., N] and h [..., r]
    ([..., 0] without LoRA) have x's dtype. h is the kernel's own x @ A^T (it needs it for
    y anyway), rounded once.
    """
    N, K = weight.out_features, weight.in_features
    M = _gemv_rows(x, weight)
    device = x.device
    x2 = x.reshape(M, K).contiguous()
    rank = 0
    if lora_A is not None or lora_B is not None:
        if lora_A is None or lora_B is None:
            raise ValueError("lora_A and lora_B go together")
        rank = lora_A.shape[0]
        if tuple(lora_A.shape) != (rank, K) or tuple(lora_B.shape) != (N, rank):
            raise ValueError(f"lora_A must be [r, {K}] and lora_B [{N}, r], got "
                             f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    _same_dtype(x, lora_A=lora_A, lora_B=lora_B, bias=bias)
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias must have {N} elements, got {bias.numel()}")
    lora_A = lora_A.contiguous() if rank else None
    lora_B = lora_B.contiguous() if rank else None
    bias = bias.contiguous() if bias is not None else None

    y, h, workspace = _gemv_outputs(x, M, N, rank)
    with _on_device(device):
        _C_cuda.lora_gemv_4bit(x2, weight, lora_A, lora_B, float(scaling), bias, y, h,
                               workspace, _stream(device))
    return y.reshape(*x.shape[:-1], N), h.reshape(*x.shape[:-1], rank)


def multi_lora_gemv_4bit(x, weight, lora_A, lora_B, scalings, adapter_index, bias=None):
    """(y, h) of a mixed-adapter batch for x [M, K], 1 <= M <= 8: row m uses adapter
    i = adapter_index[m] of the stacks lora_A [n, r, K] and lora_B [n, N, r],
    y[m] = x[m] @ W^T + scalings[i] * h[m] @ lora_B[i]^T + bias, h[m] = x[m] @ lora_A[i]^T;
    where i = -1, h[m] = 0 and y[m] = x[m] @ W^T + bias.

    The same kernel as gemv_4bit_lora (one pass over W), and the same bytes: a row gets
    what gemv_4bit_lora gives it with its adapter alone (and scaling scalings[i]).
    x, lora_A, lora_B, bias are all float16 or all bfloat16; scalings float32 [n],
    adapter_index an integer tensor [M], both on x's device. Every index must lie in
    [-1, n): the kernel reads the adapter it names (nf4lora._ops checks them).
    """
    N, K = weight.out_features, weight.in_features
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K] for a mixed-adapter batch, got {list(x.shape)}")
    M = _gemv_rows(x, weight)
    n, rank = lora_A.shape[:2] if lora_A.dim() == 3 else (0, 0)
    if tuple(lora_A.shape) != (n, rank, K) or tuple(lora_B.shape) != (n, N, rank):
        raise ValueError(f"lora_A must be [n, r, {K}] and lora_B [n, {N}, r], got "
                         f"{list(lora_A.shape)} and {list(lora_B.shape)}")
    _same_dtype(x, lora_A=lora_A, lora_B=lora_B, bias=bias)
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias must have {N} elements, got {bias.numel()}")
    if scalings.dtype != torch.float32 or scalings.numel() != n:
        raise ValueError(f"scalings must be float32 [{n}], got {scalings.dtype} "
                         f"{list(scalings.shape)}")
    if adapter_index.numel() != M:
        raise ValueError(f"adapter_index must be [{M}], got {list(adapter_index.shape)}")
    for t, name in ((scalings, "scalings"), (adapter_index, "adapter_index")):
        assert t.device == x.device, f"{name} is on {t.device}, x on {x.device}"
    index = adapter_index.reshape(M).to(torch.int64).contiguous()
    bias = bias.contiguous() if bias is not None else None

    y, h, workspace = _gemv_outputs(x, M, N, rank)
    with _on_device(x.device):
        _C_cuda.multi_lora_gemv_4bit(x.contiguous(), weight, lora_A.contiguous(),
                                     lora_B.contiguous(), scalings.contiguous(), index, bias,
                                     y, h, workspace, _stream(x.device))
    return y, h


# --------------------------------------------------------------------------------------
# Routing: which kernel runs a matmul op (the one place this backend decides it).
# --------------------------------------------------------------------------------------

PATH_GEMV, PATH_TRITON, PATH_COMPOSITE = "gemv", "triton", "composite"
GEMV_DTYPES = (torch.float16, torch.bfloat16)
# False: never hand rows to Triton (the composite path instead), for the benchmarks'
# comparison of both sides of the crossover (bench_matmul's and bench_dora's
# "nf4lora[cuda] no-triton" rows); the ops read it on every call.
TRITON_ROUTE_ENABLED = True


def matmul_path(m: int, n: int, k: int, dtype: torch.dtype,
                capability: tuple[int, int] | None, triton_available: bool, *,
                grad_input: bool = False) -> str:
    """PATH_GEMV, PATH_TRITON or PATH_COMPOSITE for a matmul op of x [m, k] (grad [m, n]
    with grad_input) and W [n, k] in `dtype`, on a GPU of this compute capability (None:
    CPU tensors, Triton's interpreter), with the Triton backend usable here or not.

      gemv       1..GEMV_MAX_M rows of fp16/bf16, the forward ops: this backend's fused
                 decode GEMV (one launch). No backward GEMV exists: grad_input never.
      triton     the Triton backend's op, which routes by its own matmul_path (its split-K
                 GEMV up to 16 rows, its fused tensor-core kernel up to
                 fused_max_m(capability)), whenever that route is not composite: W read
                 packed, 0.52 bytes per weight, against the composite path's ~4.5 (read
                 0.52, write 2, read 2 again). The rows it takes, FUSED_MAX_M = {8: 39, 9: 64}
                 in backends/triton.py, are the roofline ridge points M* = peak FLOP/s *
                 0.516 B / (2 * bandwidth) of the A100 and H100 (below M* the GEMM is
                 memory-bound and the single pass wins; above it cuBLAS's tensor-core GEMM
                 wins); derived, not yet measured: scripts/gpu_check.sh times both sides
                 (bench_matmul's nf4lora[cuda] and nf4lora[triton] rows, bench_dora).
      composite  the rest (more rows, odd in_features or empty shapes, a GPU below sm_80,
                 or no usable Triton): this backend's dequantize into a fresh 16-bit
                 buffer, then cuBLAS (backends/composite.py).

    Pure (no device queries): the ops pass in the capability and Triton's availability."""
    if not grad_input and 1 <= m <= GEMV_MAX_M and dtype in GEMV_DTYPES:
        return PATH_GEMV
    if triton_available:
        triton_backend = _triton_module()
        if triton_backend.matmul_path(m, n, k, capability) != triton_backend.PATH_COMPOSITE:
            return PATH_TRITON
    return PATH_COMPOSITE


def _triton_module():
    """nf4lora.backends.triton (imported on first use: it imports triton)."""
    from . import triton as triton_backend
    return triton_backend


def _capability(device: torch.device):
    """The device's compute capability; None for CPU tensors (the host replay in tests)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    """Whether the Triton backend can run here (asked once per process: what it depends
    on, triton's import, TRITON_INTERPRET and the CUDA driver, is fixed by then)."""
    return _triton_module().availability() is None


def _path(m: int, n: int, k: int, t: torch.Tensor, grad_input: bool = False) -> str:
    """matmul_path for an op on activations (or grad) `t` on its device."""
    return matmul_path(m, n, k, t.dtype, _capability(t.device),
                       TRITON_ROUTE_ENABLED and _triton_available(), grad_input=grad_input)


def lora_matmul_4bit(x, weight, lora_A, lora_B, scaling, bias):
    """The registry's fused op, routed by matmul_path: the GEMV for decode (1..8 rows,
    fp16/bf16), Triton's op for the rows its kernels read W packed, else dequantize +
    cuBLAS (composite), which wins once W's bytes are amortized over rows."""
    path = _path(x.shape[0], weight.out_features, x.shape[1], x)
    if path == PATH_GEMV:
        return gemv_4bit_lora(x, weight, lora_A, lora_B, scaling, bias)
    if path == PATH_TRITON:
        return _triton_module().lora_matmul_4bit(x, weight, lora_A, lora_B, scaling, bias)
    return composite.lora_matmul_4bit(sys.modules[__name__], x, weight, lora_A, lora_B,
                                      scaling, bias)


def multi_lora_matmul_4bit(x, weight, lora_A, lora_B, scalings, adapter_index, bias):
    """A mixed-adapter batch (nf4lora._ops.multi_lora_matmul_4bit): y [M, N], routed as
    lora_matmul_4bit. Decode sizes take the GEMV with each row's adapter inside it (one
    launch, one pass over W); Triton's rows its op (each row's adapter inside its kernels);
    the rest the composite path: lora_matmul_4bit without adapter, then the adapters
    gathered in torch (composite.multi_lora_matmul_4bit)."""
    path = _path(x.shape[0], weight.out_features, x.shape[1], x)
    if path == PATH_GEMV:
        return multi_lora_gemv_4bit(x, weight, lora_A, lora_B, scalings, adapter_index, bias)[0]
    if path == PATH_TRITON:
        return _triton_module().multi_lora_matmul_4bit(x, weight, lora_A, lora_B, scalings,
                                                       adapter_index, bias)
    return composite.multi_lora_matmul_4bit(sys.modules[__name__], x, weight, lora_A, lora_B,
                                            scalings, adapter_index, bias)


def lora_matmul_4bit_grad_input(grad, weight, lora_A, grad_h):
    """dx [M, in] = grad @ W + grad_h @ lora_A (the backward of both ops), routed by
    matmul_path(grad_input=True): no CUDA kernel of its own, so Triton's op (its backward
    kernel reads W packed, up to the forward's fused rows) where it takes the shape, else
    dequantize + cuBLAS. Without this op every backward, M = 1 included, dequantized all
    of W (the registry's composite fallback)."""
    path = _path(grad.shape[0], grad.shape[1], weight.in_features, grad, grad_input=True)
    if path == PATH_TRITON:
        return _triton_module().lora_matmul_4bit_grad_input(grad, weight, lora_A, grad_h)
    return composite.lora_matmul_4bit_grad_input(sys.modules[__name__], grad, weight, lora_A,
                                                 grad_h)
