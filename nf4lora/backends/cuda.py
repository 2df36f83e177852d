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
"""
from __future__ import annotations

import contextlib
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

GEMV_MAX_M = 8  # rows of x the GEMV kernel takes (decode); larger M: dequantize + matmul


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


def _takes_gemv(x) -> bool:
    """Whether the matmul ops take the GEMV for activations x [M, K]: decode sizes."""
    return 1 <= x.shape[0] <= GEMV_MAX_M and x.dtype in (torch.float16, torch.bfloat16)


def lora_matmul_4bit(x, weight, lora_A, lora_B, scaling, bias):
    """The registry's fused op: the GEMV for decode (1..8 rows, fp16/bf16), otherwise
    dequantize + cuBLAS (composite), which wins once W's bytes are amortized over rows."""
    if _takes_gemv(x):
        return gemv_4bit_lora(x, weight, lora_A, lora_B, scaling, bias)
    return composite.lora_matmul_4bit(sys.modules[__name__], x, weight, lora_A, lora_B,
                                      scaling, bias)


def multi_lora_matmul_4bit(x, weight, lora_A, lora_B, scalings, adapter_index, bias):
    """A mixed-adapter batch (nf4lora._ops.multi_lora_matmul_4bit): y [M, N]. Decode sizes
    (as lora_matmul_4bit) take the GEMV with each row's adapter inside it (one launch, one
    pass over W); the rest the composite path: lora_matmul_4bit without adapter (dequantize
    + cuBLAS), then the adapters gathered in torch (composite.multi_lora_matmul_4bit)."""
    if _takes_gemv(x):
        return multi_lora_gemv_4bit(x, weight, lora_A, lora_B, scalings, adapter_index, bias)[0]
    return composite.multi_lora_matmul_4bit(sys.modules[__name__], x, weight, lora_A, lora_B,
                                            scalings, adapter_index, bias)
