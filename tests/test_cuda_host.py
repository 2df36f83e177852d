"""The CUDA kernels, run on the CPU through their own source (no GPU needed).

Every CUDA kernel in csrc/cuda is written as __host__ __device__ per-thread functions of
explicit indices (csrc/cuda/thread_work.cuh) behind thin __global__ shells. Here g++
builds nf4lora._C_cuda's own binding (csrc/cuda/bindings_cuda.cpp) with
csrc/cuda_host/host_driver.cpp in place of the CUDA launchers: it runs those functions
over the whole grid (every CUDA block, warp and lane), through the same launch plan as
the real launcher (csrc/cuda/plan.h: argument checks, the 16-byte-vector vs element-wise
choice, the grid), with each warp's shuffle reduction replayed as the same butterfly over
the 32 lanes. The tests drive nf4lora/backends/cuda.py (the real Python glue) with that
module standing in for nf4lora._C_cuda, on CPU tensors, and compare with nf4lora.reference:
  * quantize (4-bit and 8-bit) codes and absmax: bit-exact, edge cases included;
  * dequantize (4-bit with float or nested absmax, 8-bit), every output dtype: bit-exact;
  * the GEMV + LoRA (M = 1..8, K not a multiple of the 32-wide chunk or of the 1024-wide
    warp step, rows past N, rank > 32), y and the h = x @ A^T it returns: within the error
    that the same computation done by torch in the activation dtype makes against float64;
    N = 0 and K = 0 too;
  * the same GEMV for a mixed-adapter batch (multi_lora_gemv_4bit: row m its own adapter
    of a stack, -1 for none; M = 1..8, repeated adapters, rank 1 and 70): y and each row's h
    within the dtype baseline of nf4lora.reference.multi_lora_matmul_4bit, and bit for bit
    the single-adapter GEMV's rows for the same adapter (a -1 row: the GEMV without LoRA's,
    h = 0), the whole output when every row has the same adapter; the public op
    nf4lora.multi_lora_matmul_4bit routed through the CUDA backend, and its clear errors
    for an index out of range;
  * the backend's route (matmul_path, a pure function: rows, dtype, Triton usable or not,
    compute capability): the GEMV for 1..8 rows of fp16/bf16, Triton's op up to its
    fused_max_m, else composite; and through the public ops, with Triton's kernels run by
    its interpreter (fp16 / fp32: its bf16 tl.dot is wrong), the rows each route takes and
    their results: LoRA at 17 rows (DoRA's M = 1 + r = 16) forward and backward, DoRA at
    M = 1 (its one 17-row call and its 1-row grad @ W both through Triton).

On a machine with a GPU and the extension built, every such test runs a second time
through the real nf4lora._C_cuda on CUDA tensors (the "gpu" variant, skipped elsewhere).

NOT covered by the host replay (it needs a GPU; `scripts/check_cuda.sh` compiles it):
  * the device-only lines: __shfl_xor_sync (the driver replays the butterfly instead),
    shared-memory staging and __syncthreads, __ldg/__ldcs/__ldcg cache hints, 16-byte
    LDG/STG instructions (the host copies 16 bytes with memcpy), and the hardware
    conversions to fp16/bf16 (cvt.rn, IEEE round-to-nearest-even like the codec's
    integer version that the host uses; only NaN payloads may differ);
  * the GEMV's inter-block protocol: atomic tickets, the shrink warps' fence + counter,
    the spin-wait (the host runs the shrink blocks first, the order the tickets enforce);
  * concurrency and memory-model effects, launch errors, streams and devices, speed.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import nf4lora
from nf4lora import backends, codebook, reference
from conftest import dequantize_into
from test_cpu_backend import tie_values  # values on and 1 ulp around every threshold
from nf4lora.backends import NestedAbsmax, PackedWeight
from nf4lora.backends import composite, cuda as cuda_backend
from nf4lora.codebook import create_dynamic_map

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
QUANT_TYPES = ("nf4", "fp4")
DYNAMIC = create_dynamic_map()


def build_host_module(directory: Path):
    """nf4lora._C_cuda's binding (csrc/cuda/bindings_cuda.cpp) linked with the CPU replay of
    its kernels (csrc/cuda_host/host_driver.cpp) in place of the CUDA launchers, built with
    g++ into `directory` and imported (as the top-level module `_C_cuda`)."""
    import pybind11

    out = directory / f"_C_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
    # -ffp-contract=off as for the CPU kernels: the codec's a * b + c is two roundings.
    cmd = [CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-fvisibility=hidden",
           "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}", str(ROOT / "csrc/cuda/bindings_cuda.cpp"),
           str(ROOT / "csrc/cuda_host/host_driver.cpp"), "-o", str(out)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"building the host replay failed:\n{' '.join(cmd)}\n{built.stderr}")
    spec = importlib.util.spec_from_file_location("_C_cuda", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The host-replay stand-in for nf4lora._C_cuda, built once per test module (~12 s)."""
    if CXX is None:
        pytest.skip("no C++ compiler (g++) to build csrc/cuda_host/host_driver.cpp")
    pytest.importorskip("pybind11", reason="pybind11 (in the test extra) builds the host replay")
    try:
        return build_host_module(tmp_path_factory.mktemp("cuda_host"))
    except RuntimeError as error:
        pytest.fail(str(error))


class OnDevice:
    """The backend module with tensors moved to `device` and results moved back, so the
    same test runs the host replay (CPU tensors) or the real kernels (CUDA tensors)."""

    def __init__(self, module, device: torch.device):
        self.module, self.device = module, device

    def _to(self, value):
        if isinstance(value, PackedWeight):
            return value._replace(packed=self._to(value.packed), absmax=self._to(value.absmax),
                                  nested=self._to(value.nested))
        if isinstance(value, NestedAbsmax):
            return value._replace(absmax=self._to(value.absmax), code=self._to(value.code))
        if not isinstance(value, torch.Tensor) or self.device.type == "cpu":
            return value
        # Keep the storage offset, so an unaligned view stays unaligned on the device.
        base = torch.empty(value.storage_offset() + value.numel(), dtype=value.dtype, device=self.device)
        view = base[value.storage_offset():].view(value.shape)
        return view.copy_(value)

    def _back(self, value):
        if isinstance(value, tuple):
            return tuple(self._back(v) for v in value)
        return value.cpu() if isinstance(value, torch.Tensor) else value

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def call(*args, **kwargs):
            moved = [self._to(a) for a in args]
            moved_kw = {k: self._to(v) for k, v in kwargs.items()}
            result = fn(*moved, **moved_kw)
            for original, on_device in zip(args, moved):  # outputs written in place
                if isinstance(original, torch.Tensor) and on_device is not original:
                    original.copy_(on_device.cpu())
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return self._back(result)
        return call


@pytest.fixture(params=["host", "gpu"])
def glue(request, monkeypatch):
    """nf4lora.backends.cuda driven either by the CPU replay of the kernels ("host": CPU
    tensors, always) or by the real nf4lora._C_cuda ("gpu": CUDA tensors, only where a
    GPU and the built extension are available; skipped otherwise)."""
    if request.param == "gpu":
        reason = cuda_backend.availability()
        if reason is not None:
            pytest.skip(f"real CUDA kernels unavailable: {reason}")
        return OnDevice(cuda_backend, torch.device("cuda"))
    monkeypatch.setattr(cuda_backend, "_C_cuda", request.getfixturevalue("host"))
    monkeypatch.setattr(cuda_backend, "_stream", lambda device: 0)
    return OnDevice(cuda_backend, torch.device("cpu"))


# ---- helpers ----------------------------------------------------------------------------
def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal dtype, shape, NaN positions, and bits everywhere else (the sign of zero too)."""
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    if not actual.is_floating_point():
        bad = (actual != expected).nonzero().flatten()[:5].tolist()
        assert not bad, f"{what}: differ at {bad}"
        return
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    a, e = actual[~nan_a].view(bits[actual.dtype]), expected[~nan_e].view(bits[actual.dtype])
    bad = (a != e).nonzero().flatten()[:5].tolist()
    assert not bad, f"{what}: differ at {bad}: {actual[~nan_a][bad]} vs {expected[~nan_e][bad]}"


def make_values(n: int, dtype: torch.dtype, blocksize: int, seed: int, nan: bool = False):
    """Normal values at scales 1e-3..1e3, with -0.0, subnormals, an all-zero block, a
    block with a huge outlier, and (nan=True) a NaN in a later block."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 3, 7)[torch.randint(0, 7, (n,), generator=g)]
    x = (torch.randn(n, generator=g) * scale).to(dtype)
    if n == 0:
        return x
    tiny = {torch.float32: 1e-40, torch.float16: 6e-8, torch.bfloat16: 1e-40}[dtype]
    x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = -0.0
    x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = tiny
    if n >= 3 * blocksize:
        x[blocksize:2 * blocksize] = 0.0
        x[2 * blocksize + 1] = 6e4 if dtype == torch.float16 else 1e30
        if nan and n >= 4 * blocksize:
            x[3 * blocksize + 5] = float("nan")
    return x


def quantized(n, blocksize, quant_type, seed, nested):
    """(packed, absmax-or-codes, NestedAbsmax or None, float32 absmax) from the reference."""
    values = make_values(n, torch.float32, blocksize, seed)
    packed, absmax = reference.quantize_4bit(values, blocksize, quant_type)
    if not nested:
        return packed, absmax, None, absmax
    q, absmax2, offset = reference.double_quantize(absmax, DYNAMIC)
    decoded = reference.dequantize_absmax(q, absmax2, DYNAMIC, float(offset))
    return packed, q, NestedAbsmax(absmax2, DYNAMIC, float(offset), 256), decoded


# ---- quantize ---------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("n", (0, 1, 2, 63, 64, 65, 1000, 4097, 3 * 4096 + 7))
def test_quantize_4bit_bit_exact(glue, n, blocksize, dtype, quant_type):
    values = make_values(n, dtype, blocksize, seed=n + blocksize, nan=True)
    packed, absmax = glue.quantize_4bit(values, blocksize, quant_type)
    want_packed, want_absmax = reference.quantize_4bit(values, blocksize, quant_type)
    assert_same(packed, want_packed, "packed")
    assert_same(absmax, want_absmax, "absmax")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_ties_go_to_the_lower_code(glue, dtype, quant_type):
    values = tie_values(dtype, quant_type)
    packed, absmax = glue.quantize_4bit(values, 64, quant_type)
    want_packed, want_absmax = reference.quantize_4bit(values, 64, quant_type)
    assert_same(packed, want_packed, "packed")
    assert_same(absmax, want_absmax, "absmax")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", (256, 64, 100, 1))
@pytest.mark.parametrize("n", (1, 255, 256, 257, 5000))
def test_quantize_blockwise_bit_exact(glue, n, blocksize, dtype):
    values = make_values(n, dtype, blocksize, seed=7 * n + blocksize, nan=True)
    codes, absmax = glue.quantize_blockwise(values, DYNAMIC, blocksize)
    want_codes, want_absmax = reference.quantize_blockwise(values, DYNAMIC, blocksize)
    assert_same(codes, want_codes.reshape(-1), "codes")
    assert_same(absmax, want_absmax, "absmax")


@pytest.mark.parametrize("n", (64, 64 * 1000 + 3, 64 * 4096))
def test_double_quantization_of_absmax_bit_exact(glue, n):
    """The nested level: absmax - mean, 8-bit blockwise with blocksize 256."""
    _, absmax = reference.quantize_4bit(make_values(n, torch.float32, 64, seed=n), 64, "nf4")
    offset = absmax.mean()
    codes, absmax2 = glue.quantize_blockwise(absmax - offset, DYNAMIC, 256)
    want_q, want_absmax2, _ = reference.double_quantize(absmax, DYNAMIC)
    assert_same(codes, want_q, "qabsmax")
    assert_same(absmax2, want_absmax2, "nested absmax")


# ---- dequantize -------------------------------------------------------------------------
@pytest.mark.parametrize("nested", (False, True))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("blocksize", (32, 64, 4096))
@pytest.mark.parametrize("n", (1, 31, 32, 33, 4097, 3 * 4096 + 7))
def test_dequantize_4bit_bit_exact(glue, n, blocksize, out_dtype, quant_type, nested):
    packed, absmax, nest, decoded = quantized(n, blocksize, quant_type, seed=n, nested=nested)
    out = torch.empty(n, dtype=out_dtype)
    dequantize_into(glue, packed, absmax, blocksize, quant_type, out, nest)
    want = reference.dequantize_4bit(packed, decoded, blocksize, quant_type, (n,), out_dtype)
    assert_same(out, want, "dequantized")


@pytest.mark.parametrize("nested", (False, True))
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_4bit_unaligned_takes_the_element_path(glue, out_dtype, nested):
    """Views that start 1 element/byte into their storage: no 16-byte loads or stores."""
    n, blocksize = 4096 + 96, 64
    packed, absmax, nest, decoded = quantized(n, blocksize, "nf4", seed=3, nested=nested)
    packed_view = torch.cat([torch.zeros(1, dtype=torch.uint8), packed])[1:]
    out = torch.empty(n + 1, dtype=out_dtype)[1:]
    assert packed_view.data_ptr() % 16 and out.data_ptr() % 16
    dequantize_into(glue, packed_view, absmax, blocksize, "nf4", out, nest)
    want = reference.dequantize_4bit(packed, decoded, blocksize, "nf4", (n,), out_dtype)
    assert_same(out, want, "dequantized")


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("blocksize", (256, 64, 100))
@pytest.mark.parametrize("n", (1, 15, 16, 17, 5000))
def test_dequantize_blockwise_bit_exact(glue, n, blocksize, out_dtype):
    values = make_values(n, torch.float32, blocksize, seed=n)
    codes, absmax = reference.quantize_blockwise(values, DYNAMIC, blocksize)
    out = torch.empty(n, dtype=out_dtype)
    glue.dequantize_blockwise(codes, absmax, DYNAMIC, blocksize, out)
    want = reference.dequantize_blockwise(codes, absmax, DYNAMIC, blocksize, out_dtype)
    assert_same(out, want, "dequantized")


def test_plan_rejects_what_the_kernels_cannot_do(host):
    packed = torch.zeros(64, dtype=torch.uint8)
    absmax = torch.ones(4, dtype=torch.float32)
    out = torch.empty(128)
    weight = PackedWeight(packed, absmax, 64, "nf4", (128,), None)
    with pytest.raises(ValueError, match="power of two >= 32"):
        host.dequantize_4bit(weight._replace(blocksize=48), out, 0)
    with pytest.raises(ValueError, match="dtype"):
        host.dequantize_4bit(weight, torch.empty(128, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="codec must be an nf4lora.codebook.KernelCodec"):
        host.quantize_4bit(out, 64, "nf4", packed, absmax, 0)
    with pytest.raises(ValueError, match="even"):
        host.quantize_4bit(out, 63, codebook.kernel_codec("nf4"), packed, absmax, 0)
    with pytest.raises(ValueError, match="absmax holds 4 elements, the weight needs 5"):
        larger = weight._replace(packed=torch.zeros(160, dtype=torch.uint8), shape=(320,))
        host.dequantize_4bit(larger, torch.empty(320), 0)
    assert host.DTYPE_IDS == {"float32": 0, "float16": 1, "bfloat16": 2}
    assert not hasattr(host, "QUANT_TYPE_IDS")     # formats cross as data, not ids


# ---- GEMV + LoRA -------------------------------------------------------------------------
def gemv_case(M, N, K, rank, dtype, quant_type, nested, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, K, generator=g) * 0.05
    packed, absmax = reference.quantize_4bit(weight, 64, quant_type)
    W = reference.dequantize_4bit(packed, absmax, 64, quant_type, (N, K), torch.float32)
    nest = None
    if nested:
        q, absmax2, offset = reference.double_quantize(absmax, DYNAMIC)
        W = reference.dequantize_4bit(packed, reference.dequantize_absmax(
            q, absmax2, DYNAMIC, float(offset)), 64, quant_type, (N, K), torch.float32)
        absmax, nest = q, NestedAbsmax(absmax2, DYNAMIC, float(offset), 256)
    x = torch.randn(M, K, generator=g).to(dtype)
    A = (torch.randn(rank, K, generator=g) / math.sqrt(K)).to(dtype) if rank else None
    B = (torch.randn(N, rank, generator=g) * 0.1).to(dtype) if rank else None
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    weight = PackedWeight(packed, absmax, 64, quant_type, (N, K), nest)
    return dict(x=x, weight=weight, W=W, A=A, B=B, bias=bias)


def lora_linear(x, W, A, B, bias, scaling, dtype):
    """x @ W^T + scaling * (x @ A^T) @ B^T + bias, every tensor cast to `dtype` first."""
    y = torch.nn.functional.linear(x.to(dtype), W.to(dtype), None if bias is None else bias.to(dtype))
    if A is not None:
        y = y + scaling * torch.nn.functional.linear(
            torch.nn.functional.linear(x.to(dtype), A.to(dtype)), B.to(dtype))
    return y


GEMV_CASES = [  # (M, N, K, rank): every M; K a multiple of 1024, of 32 only, of nothing;
    # N not a multiple of the rows a CUDA block covers; rank 0, small, and > 32 lanes
    (1, 1, 64, 0), (1, 37, 2048, 16), (2, 19, 96, 3), (3, 50, 1000, 5), (4, 64, 1024, 16),
    (5, 23, 2080, 40), (6, 17, 33, 1), (7, 70, 320, 8), (8, 65, 4096, 16), (8, 9, 1, 2),
]


@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("nested", (False, True))
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("M,N,K,rank", GEMV_CASES)
def test_gemv_4bit_lora_within_the_dtype_baseline(glue, M, N, K, rank, dtype, nested, with_bias):
    quant_type = "fp4" if (M + N) % 3 == 0 else "nf4"
    case = gemv_case(M, N, K, rank, dtype, quant_type, nested, with_bias, seed=M * N + K)
    scaling = 0.5
    y, h = glue.gemv_4bit_lora(case["x"], case["weight"], case["A"], case["B"], scaling,
                               case["bias"])
    assert y.shape == (M, N) and y.dtype == dtype and h.shape == (M, rank) and h.dtype == dtype
    args = (case["x"], case["W"], case["A"], case["B"], case["bias"], scaling)
    exact = lora_linear(*args, torch.float64)
    assert_within_dtype_baseline(y, lora_linear(*args, dtype), exact, "y")
    if rank:
        x, A = case["x"], case["A"]
        assert_within_dtype_baseline(h, torch.nn.functional.linear(x, A),
                                     x.double() @ A.double().t(), "h")


def assert_within_dtype_baseline(actual, baseline, exact, what):
    """|actual - exact| within the error torch makes in the same dtype (`baseline`), but
    never below one unit in the last place of the dtype at the output's largest magnitude
    (small cases can be lucky)."""
    ulp = torch.finfo(actual.dtype).eps * exact.abs().max().item()
    tolerance = max((baseline.double() - exact).abs().max().item(), ulp)
    error = (actual.double() - exact).abs().max().item()
    assert error <= tolerance, f"GEMV {what}: error {error:.3g} > tolerance {tolerance:.3g}"


@pytest.mark.parametrize("M", range(1, 9))
def test_gemv_writes_every_output_exactly(host, M):
    """Geometry: with W = identity-like rows and no LoRA, y[m, n] = x[m, n] exactly, so a
    row written twice, skipped or swapped shows (y starts as NaN)."""
    N = K = 96 + M  # not a multiple of the rows per warp or per block
    weight = torch.eye(N, K)
    packed, absmax = reference.quantize_4bit(weight, 64, "nf4")
    x = torch.arange(M * K, dtype=torch.float32).remainder(251).sub(125).to(torch.bfloat16).reshape(M, K)
    y = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    h = torch.empty((M, 0), dtype=torch.bfloat16)
    host.lora_gemv_4bit(x, PackedWeight(packed, absmax, 64, "nf4", (N, K), None), None, None, 1.0,
                        None, y, h, torch.empty(1, dtype=torch.int32), 0)
    assert torch.equal(y, x[:, :N])


def test_gemv_rejects_bad_shapes(glue):
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    packed, absmax = reference.quantize_4bit(torch.randn(8, 64), 64, "nf4")
    weight = PackedWeight(packed, absmax, 64, "nf4", (8, 64), None)
    with pytest.raises(ValueError, match="1..8 rows"):
        glue.gemv_4bit_lora(x, weight)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        glue.gemv_4bit_lora(x[:2].float(), weight)
    with pytest.raises(ValueError, match="lora_A must be"):
        glue.gemv_4bit_lora(x[:2], weight, lora_A=torch.zeros(4, 63, dtype=torch.bfloat16),
                            lora_B=torch.zeros(8, 4, dtype=torch.bfloat16))



# ---- mixed-adapter batch: the same GEMV, each row its own adapter ------------------------
def mixed_case(M, N, K, ranks, index, dtype, nested, with_bias, seed):
    """gemv_case's weight, x and bias, plus adapters of `ranks` zero-padded to the largest
    (nf4lora.pad_adapters) into lora_A [n, r, K], lora_B [n, N, r], scalings float32 [n]
    (exact in bf16, so the dtype baseline scales exactly too) and adapter_index [M]."""
    case = gemv_case(M, N, K, 0, dtype, "nf4" if seed % 2 else "fp4", nested, with_bias, seed)
    g = torch.Generator().manual_seed(seed + 1)
    As = [(torch.randn(r, K, generator=g) / math.sqrt(K)).to(dtype) for r in ranks]
    Bs = [(torch.randn(N, r, generator=g) * 0.1).to(dtype) for r in ranks]
    case["A"], case["B"] = nf4lora.pad_adapters(As, Bs)
    case["scalings"] = torch.tensor([(0.5, 1.25, 2.0, 0.75)[i % 4] for i in range(len(ranks))])
    case["index"] = torch.tensor(index)
    return case


MIXED_CASES = [  # (M, N, K, ranks, index): every M, -1 rows and repeated adapters, rank 1
    # and 70 (> 32 lanes: two expand steps), K not a multiple of 32 (the element-wise path)
    # or of 1024, N not a multiple of the rows per warp (R = 2 or 4) or per block
    (1, 37, 64, (16,), [0]),
    (1, 19, 96, (3, 5), [-1]),
    (2, 19, 96, (3, 5), [1, -1]),
    (3, 50, 1000, (1, 70), [1, 1, 0]),
    (4, 64, 1024, (16, 16, 16), [2, -1, 2, 0]),
    (5, 23, 2080, (40, 8), [1, 0, -1, 1, 1]),
    (6, 17, 33, (1,), [0, -1, 0, 0, -1, 0]),
    (7, 70, 320, (8, 8, 8, 8), [3, 2, 1, 0, -1, 3, 3]),
    (8, 65, 4096, (16,) * 8, [0, 1, 2, 3, 4, 5, 6, 7]),
    (8, 9, 1, (2, 70), [-1, -1, 1, 0, 1, -1, 0, 0]),
]


def multi_lora_linear(case, dtype):
    """The spec (reference.multi_lora_matmul_4bit on the dequantized W), every tensor cast
    to `dtype` first; and h [M, r] (x[m] @ A_i^T, 0 on -1 rows) in `dtype`."""
    x, A = case["x"].to(dtype), case["A"].to(dtype)
    bias = None if case["bias"] is None else case["bias"].to(dtype)
    y = reference.multi_lora_matmul_4bit(x, case["W"].to(dtype), A, case["B"].to(dtype),
                                         case["scalings"], case["index"], bias)
    rows = case["index"].clamp(min=0)
    h = torch.einsum("mk,mrk->mr", x, A.index_select(0, rows)) * (case["index"] >= 0)[:, None]
    return y, h


@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("M,N,K,ranks,index", MIXED_CASES)
def test_multi_lora_gemv_within_the_dtype_baseline(glue, M, N, K, ranks, index, dtype, with_bias):
    case = mixed_case(M, N, K, ranks, index, dtype, nested=(M % 2 == 0), with_bias=with_bias,
                      seed=M * N + K)
    y, h = glue.multi_lora_gemv_4bit(case["x"], case["weight"], case["A"], case["B"],
                                     case["scalings"], case["index"], case["bias"])
    rank = case["A"].shape[1]
    assert y.shape == (M, N) and y.dtype == dtype and h.shape == (M, rank) and h.dtype == dtype
    baseline_y, baseline_h = multi_lora_linear(case, dtype)
    exact_y, exact_h = multi_lora_linear(case, torch.float64)
    assert_within_dtype_baseline(y, baseline_y, exact_y, "y")
    assert_within_dtype_baseline(h, baseline_h, exact_h, "h")
    assert_same(h[case["index"] < 0], torch.zeros_like(h[case["index"] < 0]), "h of -1 rows")


@pytest.mark.parametrize("uniform", (False, True), ids=("mixed", "one-adapter"))
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("M,N,K,ranks,index", MIXED_CASES)
def test_multi_lora_gemv_rows_are_the_single_adapter_gemv(glue, M, N, K, ranks, index, dtype,
                                                          uniform):
    """Row m with adapter i has the bits of gemv_4bit_lora on the same x with adapter i
    alone and scaling scalings[i] (a -1 row: of the GEMV without LoRA; its h is 0): one
    kernel, the adapter per row. "one-adapter": every row uses the last adapter, and the
    whole y and h are the single-adapter call's."""
    if uniform:
        index = [len(ranks) - 1] * M
    case = mixed_case(M, N, K, ranks, index, dtype, nested=True, with_bias=True, seed=M + K)
    x, weight, A, B, scalings = case["x"], case["weight"], case["A"], case["B"], case["scalings"]
    y, h = glue.multi_lora_gemv_4bit(x, weight, A, B, scalings, case["index"], case["bias"])
    for i in sorted(set(index)):
        rows = case["index"] == i
        if i < 0:
            single_y, _ = glue.gemv_4bit_lora(x, weight, None, None, 1.0, case["bias"])
            single_h = torch.zeros_like(h)
        else:
            single_y, single_h = glue.gemv_4bit_lora(x, weight, A[i], B[i], float(scalings[i]),
                                                     case["bias"])
        assert_same(y[rows], single_y[rows], f"y of adapter {i}'s rows")
        assert_same(h[rows], single_h[rows], f"h of adapter {i}'s rows")
        if uniform:
            assert_same(y, single_y, "y")
            assert_same(h, single_h, "h")


def test_multi_lora_gemv_without_adapters_on_a_row_adds_nothing(glue):
    """A -1 row's y is the base GEMV's, not base + 0 * B: adapter 0's B holds an Inf, which
    a zero t times adapter 0 (the stand-in a clamped index would read) would turn into NaN."""
    M, N, K = 3, 8, 64
    case = mixed_case(M, N, K, (4,), [0, -1, -1], torch.bfloat16, False, False, seed=5)
    case["B"][0, 2, 1] = float("inf")
    y, h = glue.multi_lora_gemv_4bit(case["x"], case["weight"], case["A"], case["B"],
                                     case["scalings"], case["index"], None)
    base, _ = glue.gemv_4bit_lora(case["x"], case["weight"], None, None, 1.0, None)
    assert_same(y[1:], base[1:], "-1 rows")
    assert not y[1:].isnan().any() and y[0, 2].isinf()
    assert_same(h[1:], torch.zeros(2, 4, dtype=torch.bfloat16), "h of -1 rows")


@pytest.mark.parametrize("rank", (0, 5))
@pytest.mark.parametrize("N,K", [(0, 96), (6, 0)])
def test_gemv_with_an_empty_dimension(glue, N, K, rank):
    """N = 0: nothing for the output warps, but h = x @ A^T is still the kernel's to write
    (it returned uninitialized memory before). K = 0: y = 0 and h = 0. Both GEMVs."""
    case = mixed_case(2, N, K, (rank,), [0, -1], torch.bfloat16, False, False, seed=3)
    A, B = case["A"], case["B"]
    y, h = glue.gemv_4bit_lora(case["x"], case["weight"], A[0], B[0], 2.0, None)
    assert y.shape == (2, N) and h.shape == (2, rank)
    assert_same(y, torch.zeros(2, N, dtype=torch.bfloat16), "y")
    want_h = torch.zeros(2, rank, dtype=torch.bfloat16)
    if N == 0:   # h from the same GEMV over a one-row weight
        one_row = gemv_case(2, 1, K, 0, torch.bfloat16, "nf4", False, False, 0)["weight"]
        _, want_h = glue.gemv_4bit_lora(case["x"], one_row, A[0],
                                        torch.zeros(1, rank, dtype=torch.bfloat16), 2.0, None)
    assert_same(h, want_h, "h")
    y, h = glue.multi_lora_gemv_4bit(case["x"], case["weight"], A, B, case["scalings"],
                                     case["index"], None)
    assert_same(y, torch.zeros(2, N, dtype=torch.bfloat16), "mixed y")
    assert_same(h, torch.cat([want_h[:1], torch.zeros_like(want_h[1:])]), "mixed h")


@pytest.fixture(params=["host", "gpu"])
def cuda_op_device(request, monkeypatch):
    """The device on which nf4lora's public ops run the CUDA backend: "host" routes CPU
    tensors to nf4lora.backends.cuda with the host replay as its _C_cuda (the backend made
    available and taking CPU tensors); "gpu" is the real thing (skipped without one)."""
    if request.param == "gpu":
        reason = cuda_backend.availability()
        if reason is not None:
            pytest.skip(f"real CUDA kernels unavailable: {reason}")
        device = torch.device("cuda")
    else:
        monkeypatch.setattr(cuda_backend, "_C_cuda", request.getfixturevalue("host"))
        monkeypatch.setattr(cuda_backend, "_stream", lambda device: 0)
        monkeypatch.setattr(cuda_backend, "availability", lambda: None)
        monkeypatch.setattr(cuda_backend, "DEVICE_TYPES", ("cuda", "cpu"))
        device = torch.device("cpu")
    backends.set_backend("cuda")
    yield device
    backends.set_backend(None)


def op_case(M, dtype, device, seed=11):
    """A mixed batch as the public op takes it (packed + QuantState, quantized on `device`
    by the CUDA backend), over 3 adapters of ranks 6, 70, 1 with -1 rows, and its float64
    spec inputs (multi_lora_linear's keys)."""
    N, K, ranks = 40, 256, (6, 70, 1)
    g = torch.Generator().manual_seed(seed)
    packed, state = nf4lora.functional.quantize_4bit(torch.randn(N, K, generator=g).to(device),
                                                     blocksize=64, compress_statistics=True)
    W = nf4lora.functional.dequantize_4bit(packed, state).cpu().double()
    A, B = nf4lora.pad_adapters([(torch.randn(r, K, generator=g) / 16).to(dtype) for r in ranks],
                                [(torch.randn(N, r, generator=g) / 10).to(dtype) for r in ranks])
    index = torch.tensor([(m * 5 + 2) % (len(ranks) + 1) - 1 for m in range(M)])   # -1 .. 2
    return dict(packed=packed, state=state, W=W, A=A, B=B, x=torch.randn(M, K, generator=g).to(dtype),
                bias=torch.randn(N, generator=g).to(dtype), scalings=torch.tensor([0.5, 2.0, 1.25]),
                index=index)


def run_op(case, device, **change):
    """nf4lora.multi_lora_matmul_4bit on `device` (adapter_index stays on the CPU, as a
    scheduler's would), with `change`d arguments."""
    args = dict(case, **change)
    return nf4lora.multi_lora_matmul_4bit(
        args["x"].to(device), args["packed"], args["state"], args["A"].to(device),
        args["B"].to(device), args["scalings"].tolist(), args["index"], args["bias"].to(device))


def expected_path(M, N, K, dtype, device, grad_input=False):
    """What the CUDA backend's routing should pick here: the GEMV and composite rows of
    matmul_path are the same everywhere; "triton" needs the Triton backend, which the host
    variant has through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return cuda_backend.matmul_path(M, N, K, dtype, capability, cuda_backend._triton_available(),
                                    grad_input=grad_input)


def record_paths(monkeypatch, ran, *, multi=False):
    """Wrap the three routes of the CUDA backend's matmul ops so that each call appends
    its path to `ran` ("gemv", "triton", "composite"; grad-input calls as "... dx")."""
    from nf4lora.backends import triton as triton_backend
    name = "multi_lora_matmul_4bit" if multi else "lora_matmul_4bit"
    routes = [(cuda_backend, "multi_lora_gemv_4bit" if multi else "gemv_4bit_lora", "gemv"),
              (triton_backend, name, "triton"), (composite, name, "composite"),
              (triton_backend, "lora_matmul_4bit_grad_input", "triton dx"),
              (composite, "lora_matmul_4bit_grad_input", "composite dx")]
    for module, attr, label in routes:
        original = getattr(module, attr)

        def wrapped(*args, _original=original, _label=label, **kwargs):
            ran.append(_label)
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, attr, wrapped)


# Triton's interpreter computes tl.dot of two bf16 tiles wrongly (design.md): the rows that
# go to Triton's kernels are checked in fp16 / fp32 on the host, bf16 on a GPU.
@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (8, torch.float16), (9, torch.float16),
                                     (17, torch.float16), (3, torch.float32),
                                     (65, torch.bfloat16)])
def test_multi_lora_matmul_routes_by_matmul_path(cuda_op_device, monkeypatch, M, dtype):
    """nf4lora.multi_lora_matmul_4bit on the CUDA backend: 1..8 rows of fp16/bf16 take the
    mixed-adapter GEMV (one launch), the rows Triton's kernels take (up to its fused_max_m)
    its op, larger M the composite path (the base matmul, then the adapters in torch); all
    are the spec within the dtype's error."""
    case = op_case(M, dtype, cuda_op_device)
    path = expected_path(M, 40, 256, dtype, cuda_op_device)
    assert path == {1: "gemv", 8: "gemv", 65: "composite"}.get(M, path)
    if cuda_op_device.type == "cpu":
        assert path == {9: "triton", 17: "triton", 3: "triton"}.get(M, path)
    ran = []
    record_paths(monkeypatch, ran, multi=True)
    y = run_op(case, cuda_op_device)
    assert ran == [path] and y.device.type == cuda_op_device.type
    baseline_y, _ = multi_lora_linear(case, dtype)
    exact_y, _ = multi_lora_linear(case, torch.float64)
    assert_within_dtype_baseline(y.cpu(), baseline_y, exact_y, "y")


@pytest.mark.parametrize("M,dtype", [(17, torch.float16), (17, torch.bfloat16), (12, torch.float32),
                                     (1, torch.float16)])
def test_lora_matmul_mid_rows_take_triton_forward_and_backward(cuda_op_device, monkeypatch, M,
                                                                dtype):
    """nf4lora.lora_matmul_4bit forward + backward on the CUDA backend. 17 rows (DoRA's
    M = 1 with r = 16) go to the Triton backend's op (its fused kernel: W read packed)
    instead of dequantize + cuBLAS, and so does every backward's grad @ W (no CUDA
    backward kernel: M = 1 too), within the dtype's error of the spec."""
    if cuda_op_device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter: tl.dot of bf16 tiles is wrong (design.md); on a GPU only")
    N, K, r, scaling = 40, 256, 16, 0.5
    g = torch.Generator().manual_seed(M)
    packed, state = nf4lora.functional.quantize_4bit(torch.randn(N, K, generator=g).to(cuda_op_device),
                                                     blocksize=64, compress_statistics=True)
    W = nf4lora.functional.dequantize_4bit(packed, state).cpu().double()
    x = torch.randn(M, K, generator=g).to(dtype)
    A = (torch.randn(r, K, generator=g) / 16).to(dtype)
    B = (torch.randn(N, r, generator=g) / 10).to(dtype)
    grad = torch.randn(M, N, generator=g).to(dtype)
    ran = []
    record_paths(monkeypatch, ran)
    x_dev = x.to(cuda_op_device, copy=True).requires_grad_()
    y = nf4lora.lora_matmul_4bit(x_dev, packed, state, A.to(cuda_op_device), B.to(cuda_op_device),
                                 scaling)
    y.backward(grad.to(cuda_op_device))
    forward = expected_path(M, N, K, dtype, cuda_op_device)
    backward = expected_path(M, N, K, dtype, cuda_op_device, grad_input=True) + " dx"
    if cuda_op_device.type == "cpu":   # the interpreter's Triton: the route under test
        assert (forward, backward) == ("gemv" if M == 1 else "triton", "triton dx")
    assert ran == [forward, backward]

    def spec(dtype):
        xs = x.to(dtype, copy=True).requires_grad_()
        ys = lora_linear(xs, W, A, B, None, scaling, dtype)
        ys.backward(grad.to(dtype))
        return ys.detach(), xs.grad
    (base_y, base_dx), (exact_y, exact_dx) = spec(dtype), spec(torch.float64)
    assert_within_dtype_baseline(y.detach().cpu(), base_y, exact_y, "y")
    assert_within_dtype_baseline(x_dev.grad.cpu(), base_dx, exact_dx, "dx")


def test_triton_route_off_takes_the_composite_path(cuda_op_device, monkeypatch):
    """TRITON_ROUTE_ENABLED = False (the benchmarks' "nf4lora[cuda] no-triton" rows): past
    the GEMV, dequantize + cuBLAS, forward and backward, as before the route existed."""
    monkeypatch.setattr(cuda_backend, "TRITON_ROUTE_ENABLED", False)
    N, K = 40, 256
    packed, state = nf4lora.functional.quantize_4bit(torch.randn(N, K).to(cuda_op_device),
                                                     blocksize=64)
    A, B = torch.randn(16, K) / 16, torch.randn(N, 16) / 10
    ran = []
    record_paths(monkeypatch, ran)
    x = torch.randn(17, K, device=cuda_op_device, dtype=torch.float16, requires_grad=True)
    y = nf4lora.lora_matmul_4bit(x, packed, state, A.to(x), B.to(x), 0.5)
    y.sum().backward()
    assert ran == ["composite", "composite dx"]


def test_dora_at_one_row_reads_w_packed_through_triton(host, monkeypatch):
    """nf4lora.dora_matmul_4bit at M = 1, r = 16 on the CUDA backend (host replay): its
    forward's one call of 1 + 16 rows and its backward's grad @ W both take the Triton
    backend's op (the route issue 15's DoRA <= 1.3x LoRA at M = 1 needs on a GPU), and every
    output and gradient is the spec's within test_dora.py's rule (fp16: the interpreter)."""
    from test_dora import run_and_compare
    reason = backends.availability("triton")
    if reason is not None:
        pytest.skip(f"the Triton backend is unavailable here: {reason}")
    monkeypatch.setattr(cuda_backend, "_C_cuda", host)
    monkeypatch.setattr(cuda_backend, "_stream", lambda device: 0)
    monkeypatch.setattr(cuda_backend, "availability", lambda: None)
    monkeypatch.setattr(cuda_backend, "DEVICE_TYPES", ("cuda", "cpu"))
    ran = []
    record_paths(monkeypatch, ran)
    run_and_compare(torch.float16, 1, in_f=192, out_f=37, r=16, backend="cuda")
    assert ran == ["triton", "triton dx"]


@pytest.mark.parametrize("index,match", [([0, 3], r"adapter_index must lie in \[-1, 2\]"),
                                         ([-2, 0], r"adapter_index must lie in \[-1, 2\]")])
def test_multi_lora_matmul_rejects_an_index_out_of_range(cuda_op_device, index, match):
    """The GPU kernel reads the adapter an index names and cannot check it: the op does
    (nf4lora._ops._check_multi_lora), before anything runs."""
    case = op_case(2, torch.bfloat16, cuda_op_device)
    with pytest.raises(ValueError, match=match):
        run_op(case, cuda_op_device, index=torch.tensor(index))


@pytest.mark.parametrize("change,error,match", [
    (dict(index=torch.tensor([0, 2])), ValueError, "adapter index out of range"),
    (dict(index=torch.tensor([-2, 0])), ValueError, "adapter index out of range"),
    (dict(index=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "adapter_index must be torch.int64"),
    (dict(index=torch.tensor([0])), ValueError, "adapter_index holds 1 elements, the batch needs 2"),
    (dict(scalings=torch.ones(1)), ValueError, "scalings holds 1 elements, the adapter stack needs 2"),
    (dict(scalings=torch.ones(2, dtype=torch.float64)), ValueError, "scalings must be torch.float32"),
    (dict(A=None), ValueError, "a mixed-adapter batch needs lora_A"),
])
def test_multi_lora_binding_guards_its_reads(host, change, error, match):
    """The binding checks what it reads for callers that skip the op's checks; the index's
    values the device cannot check (launch.h), the host replay does, so that no test passes
    the kernel an index that reads outside the stacks."""
    case = mixed_case(2, 8, 64, (4, 4), [0, 1], torch.bfloat16, False, False, seed=1)
    args = dict(A=case["A"], B=case["B"], scalings=case["scalings"], index=case["index"])
    args.update(change)
    with pytest.raises(error, match=match):
        host.multi_lora_gemv_4bit(case["x"], case["weight"], args["A"], args["B"], args["scalings"],
                                  args["index"], None, torch.empty(2, 8, dtype=torch.bfloat16),
                                  torch.empty(2, 4, dtype=torch.bfloat16),
                                  torch.zeros(64, dtype=torch.int32), 0)


def test_multi_lora_gemv_rejects_bad_shapes(glue):
    case = mixed_case(2, 8, 64, (4, 4), [0, 1], torch.bfloat16, False, False, seed=1)
    x, weight, A, B, scalings, index = (case[k] for k in ("x", "weight", "A", "B", "scalings", "index"))
    with pytest.raises(ValueError, match="1..8 rows"):
        glue.multi_lora_gemv_4bit(x.repeat(5, 1), weight, A, B, scalings, index.repeat(5))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        glue.multi_lora_gemv_4bit(x.float(), weight, A.float(), B.float(), scalings, index)
    with pytest.raises(ValueError, match="lora_A must be"):
        glue.multi_lora_gemv_4bit(x, weight, A[0], B, scalings, index)
    with pytest.raises(ValueError, match="lora_A must be"):
        glue.multi_lora_gemv_4bit(x, weight, A, B[:, :, :3], scalings, index)
    with pytest.raises(ValueError, match="scalings must be float32"):
        glue.multi_lora_gemv_4bit(x, weight, A, B, scalings[:1], index)
    with pytest.raises(ValueError, match="adapter_index must be"):
        glue.multi_lora_gemv_4bit(x, weight, A, B, scalings, index[:1])
    with pytest.raises(TypeError, match="bias must be"):
        glue.multi_lora_gemv_4bit(x, weight, A, B, scalings, index, torch.zeros(8))

# ---- routing: matmul_path, a pure function ---------------------------------------------
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
H100, A100 = (9, 0), (8, 0)


@pytest.mark.parametrize("m,n,k,dtype,capability,triton,grad_input,path", [
    (1, 4096, 4096, BF16, H100, True, False, "gemv"),        # decode: the CUDA GEMV
    (8, 4096, 4096, FP16, A100, True, False, "gemv"),
    (8, 4096, 4096, BF16, H100, False, False, "gemv"),       # no Triton needed for it
    (9, 4096, 4096, BF16, H100, True, False, "triton"),      # Triton's GEMV rows
    (17, 4096, 4096, BF16, H100, True, False, "triton"),     # DoRA, M = 1 + r = 16
    (17, 4096, 4096, BF16, H100, False, False, "composite"),  # no Triton: dequantize + cuBLAS
    (17, 4096, 4096, BF16, None, True, False, "triton"),     # CPU tensors: the interpreter
    (17, 4096, 4096, BF16, (7, 5), True, False, "composite"),  # below sm_80: no fused kernel
    (17, 4096, 4096, BF16, (10, 0), True, False, "triton"),  # newer archs: Triton's default
    (39, 4096, 4096, BF16, A100, True, False, "triton"),     # fused_max_m(8.x) = 39
    (40, 4096, 4096, BF16, A100, True, False, "composite"),
    (64, 4096, 4096, BF16, H100, True, False, "triton"),     # fused_max_m(9.x) = 64
    (65, 4096, 4096, BF16, H100, True, False, "composite"),
    (512, 4096, 4096, BF16, H100, True, False, "composite"),
    (3, 4096, 4096, FP32, H100, True, False, "triton"),      # fp32: no CUDA GEMV
    (3, 4096, 4096, FP32, H100, False, False, "composite"),
    (17, 4096, 4095, BF16, H100, True, False, "composite"),  # odd in_features: Triton's rule
    (0, 4096, 4096, BF16, H100, True, False, "composite"),   # empty
    (9, 0, 4096, BF16, H100, True, False, "composite"),
    (1, 4096, 4096, BF16, H100, True, True, "triton"),       # backward: no CUDA kernel
    (1, 4096, 4096, BF16, H100, False, True, "composite"),
    (64, 4096, 4096, BF16, H100, True, True, "triton"),
    (65, 4096, 4096, BF16, H100, True, True, "composite"),
])
def test_matmul_path_by_rows_dtype_triton_and_arch(m, n, k, dtype, capability, triton, grad_input,
                                                   path):
    assert cuda_backend.matmul_path(m, n, k, dtype, capability, triton,
                                    grad_input=grad_input) == path


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (10, 0), None])
def test_matmul_path_hands_triton_exactly_its_fused_rows(capability):
    """Past the CUDA GEMV, the CUDA backend's rows for Triton end where Triton's own
    fused_max_m does (one constant, backends/triton.py FUSED_MAX_M, no copy of it here)."""
    from nf4lora.backends import triton as triton_backend
    limit = triton_backend.fused_max_m(capability)
    paths = [cuda_backend.matmul_path(m, 4096, 4096, BF16, capability, True)
             for m in range(1, limit + 2)]
    gemv = cuda_backend.GEMV_MAX_M
    assert paths == ["gemv"] * gemv + ["triton"] * (limit - gemv) + ["composite"]


# ---- availability, build, roofline ---------------------------------------------------------
def test_backend_without_the_extension_says_how_to_build_it(monkeypatch):
    """NF4LORA_BACKEND=cuda when nf4lora._C_cuda cannot be imported: the error says how
    to build it. The import failure is real: the module is hidden (a None entry in
    sys.modules makes `import` raise ImportError) and nf4lora.backends.cuda re-executed."""
    import nf4lora

    def reload_backend():
        importlib.reload(cuda_backend)

    monkeypatch.setitem(sys.modules, "nf4lora._C_cuda", None)
    monkeypatch.delattr(nf4lora, "_C_cuda", raising=False)
    monkeypatch.setenv("NF4LORA_BACKEND", "cuda")
    try:
        reload_backend()
        assert cuda_backend._C_cuda is None
        with pytest.raises(RuntimeError) as error:
            backends.backend_for(torch.device("cuda"))
        message = str(error.value)
        assert "NF4LORA_BACKEND" in message and "nf4lora._C_cuda" in message, message
        assert "pip install -e ." in message and "nvcc" in message, message
    finally:
        monkeypatch.undo()
        reload_backend()
    assert cuda_backend.DEVICE_TYPES == ("cuda",)


def test_availability_reports_why_not():
    reason = backends.availability("cuda")
    if torch.cuda.is_available() and cuda_backend._C_cuda is not None:
        assert reason is None
    else:
        assert reason and ("pip install -e ." in reason or "torch.cuda.is_available() is False" in reason)


@pytest.mark.skipif(cuda_backend._C_cuda is None, reason="nf4lora._C_cuda not built here")
def test_extension_imports_without_a_gpu():
    """Built with the static CUDA runtime, the extension imports on a GPU-less machine;
    the runtime then reports why it cannot run (no driver / no device)."""
    status = cuda_backend._C_cuda.runtime_status()
    assert isinstance(status, str) and status
    assert cuda_backend._C_cuda.gemv_workspace_bytes(8, 16) == 8 + 4 * 8 * 16


def test_roofline_matches_the_published_lower_bounds():
    """shared/reference/kernel_techniques.md: batch-1 GEMV lower bounds (weights + absmax
    + absmax2 + x + y): 4096x4096 8.67 MB, 2.59 us on H100, 4.25 us on A100;
    11008x4096 23.29 MB, 6.95 us on H100. The CUDA kernels' roofline is nf4lora.roofline's."""
    roofline = importlib.import_module("nf4lora.roofline")
    small = roofline.kernel_roofline("gemv_4bit_lora", M=1, N=4096, K=4096)
    assert small["bytes"] / 1e6 == pytest.approx(8.67, abs=0.01)
    assert small["H100"]["ideal_us"] == pytest.approx(2.59, abs=0.01)
    assert small["A100"]["ideal_us"] == pytest.approx(4.25, abs=0.01)
    large = roofline.kernel_roofline("gemv_4bit_lora", M=1, N=11008, K=4096)
    assert large["bytes"] / 1e6 == pytest.approx(23.29, abs=0.01)
    assert large["H100"]["ideal_us"] == pytest.approx(6.95, abs=0.01)
    # M = 8 with LoRA: still memory-bound for tensor cores, but the SIMT kernel's FMAs
    # (2*8*4096*4096 = 268 MFLOP at 19.5 TFLOP/s) bound it on A100.
    decode = roofline.kernel_roofline("gemv_4bit_lora", M=8, N=4096, K=4096, rank=16, bias=True)
    assert decode["A100"]["kernel_bound"] == "fp32 FMA"
    assert decode["H100"]["ideal_us"] == pytest.approx(decode["H100"]["memory_us"])
    dq = roofline.kernel_roofline("dequantize_4bit", n=4096 * 4096, dtype=torch.bfloat16)
    assert dq["bytes"] == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * 1024 + 1024 + 2 * 4096 * 4096
    for op, shape in (("quantize_4bit", dict(n=4096)), ("quantize_blockwise", dict(n=4096)),
                      ("dequantize_blockwise", dict(n=4096))):
        assert roofline.kernel_roofline(op, **shape)["H100"]["ideal_us"] > 0
    assert "H100" in roofline.format_kernel_roofline(decode)
