"""Every 4-bit format on the native kernels: the C++ CPU kernels on every SIMD path this CPU
has (NF4LORA_CPU_ISA), and the CUDA kernels' math through their host replay, against
nf4lora.reference.

The native kernels take a format as data (nf4lora.codebook.kernel_codec: 16 levels to decode,
15 thresholds and 16 codes to encode), so NF4, FP4, the named code books and a custom table
run the same code. Checked here:
  * kernel_codec encodes as reference.encode does, bit for bit, for every format: on every
    threshold, two floats either side, signed zeros, subnormals, infinities, NaN and 10^6
    random float32 bit patterns;
  * quantize and dequantize bit-exact against the reference: 0, 1, odd and
    not-a-multiple-of-the-blocksize sizes, every float dtype in and out, float32 and
    double-quantized block constants, values exactly on every threshold (ties);
  * the fused matmul + LoRA at M = 1 and 5 (the fused kernel, both decoder families) and
    40 (dequantize + GEMM), and its gradients, within twice the error of the same
    computation done by torch in the same dtype (the tests/test_row_scale.py rule);
  * that the cpu backend runs them itself: backend_for picks it, its kernels are called and
    the reference backend never is (a fallback would pass every value test silently).
"""
from __future__ import annotations

import math

import pytest
import torch

import nf4lora
import nf4lora.functional as F
from nf4lora import backends, codebook, reference
from nf4lora._weight import PackedWeight
from nf4lora.backends import NestedAbsmax
from nf4lora.backends import cpu as cpu_backend
from nf4lora.backends import cuda as cuda_backend

from conftest import DTYPES, dequantize_into
from oracles import spec_dequantize
from test_cpu_backend import assert_same, make_values
from test_cpu_matmul import operands, run_op
from test_cuda_host import (DYNAMIC, HALF_DTYPES, assert_within_dtype_baseline, glue, host,  # noqa: F401
                            lora_linear)

pytestmark = pytest.mark.skipif(cpu_backend.availability() is not None,
                                reason=f"cpu backend unavailable: {cpu_backend.availability()}")

# A table given as data: uneven steps, dense near zero, no level at 0 or +-1.
CUSTOM_CODE = torch.linspace(-0.9, 0.8, 16) ** 3
CUSTOM = codebook.format_key("custom", CUSTOM_CODE)
FORMATS = codebook.NAMED_FORMATS + (CUSTOM,)            # nf4, fp4, af4, bof4, iq4nl, int4, custom
SIZES = (0, 1, 2, 63, 65, 127, 4097, 3 * 4096 + 7)       # empty, one, odd, partial last blocks


def format_id(key: str) -> str:
    return "custom" if key == CUSTOM else key


def state_format(key: str) -> dict:
    """The functional API's arguments for format `key`."""
    return {"code": CUSTOM_CODE} if key == CUSTOM else {"quant_type": key}


@pytest.fixture(params=["scalar", "avx2", "avx512", "avx512bf16"])
def isa(request, monkeypatch):
    """Force one SIMD path (NF4LORA_CPU_ISA, read by the kernels at every call)."""
    if request.param not in cpu_backend._C.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} path")
    monkeypatch.setenv("NF4LORA_CPU_ISA", request.param)
    return request.param


@pytest.fixture
def cpu_chosen():
    """The automatic choice for CPU tensors (no set_backend, no NF4LORA_BACKEND)."""
    previous = backends._override
    backends.set_backend(None)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(backends.ENV_VAR, raising=False)
        yield
    backends._override = previous


# ---- the encoder as data -------------------------------------------------------------------

def codec_encode(x: torch.Tensor, key: str) -> torch.Tensor:
    """What the kernels compute from kernel_codec(key): the code of the count of thresholds
    strictly below x, and code 0 for NaN (csrc/nf4_codec.h encode_4bit)."""
    codec = codebook.kernel_codec(key)
    count = (x.unsqueeze(-1) > torch.tensor(codec.thresholds, dtype=torch.float32)).sum(-1)
    codes = torch.tensor(codec.codes, dtype=torch.uint8)[count]
    return torch.where(x.isnan(), torch.zeros_like(codes), codes)


def edge_values(key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every encoder threshold of `key` (kernel_codec's, and FP4's own on |x| for fp4), the
    levels, and the floats one and two steps either side of each, in `dtype`."""
    codec = codebook.kernel_codec(key)
    points = torch.tensor(codec.thresholds + codec.levels, dtype=torch.float32)
    if key == "fp4":
        magnitude = torch.tensor(codebook.FP4_ABS_THRESHOLDS, dtype=torch.float32)
        points = torch.cat([points, magnitude, -magnitude])
    points = points.to(dtype)
    near = [points]
    up = down = points
    for _ in range(2):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.full_like(down, -math.inf))
        near += [up, down]
    return torch.cat(near)


@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_kernel_codec_encodes_as_the_spec(key):
    special = torch.tensor([0.0, -0.0, 2.0 ** -149, -2.0 ** -149, 1e-40, -1e-40, 1.0, -1.0,
                            math.inf, -math.inf, math.nan])
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (1_000_000,), dtype=torch.int64,
                         generator=torch.Generator().manual_seed(0))
    x = torch.cat([edge_values(key), special, bits.to(torch.int32).view(torch.float32),
                   torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 2 - 1])
    assert_same(codec_encode(x, key), reference.encode(x, key), format_id(key))


@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_kernel_codec_is_the_table_and_ascending_thresholds(key):
    codec = codebook.kernel_codec(key)
    assert torch.equal(torch.tensor(codec.levels), codebook.table(key))
    thresholds = torch.tensor(codec.thresholds)
    assert thresholds.numel() == 15 and bool((thresholds[1:] > thresholds[:-1]).all())
    assert sorted(codec.codes) == list(range(16))            # every code reachable once
    if key != "fp4":                                          # the midpoint rule, code = count
        assert torch.equal(thresholds, reference.midpoints(codebook.table(key)))
        assert codec.codes == tuple(range(16))


# ---- quantize / dequantize: every format, every SIMD path ----------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_quantize_4bit_bit_exact(isa, key, dtype):
    for blocksize in (32, 64, 256):
        for n in SIZES:
            x = make_values(n, dtype, blocksize, seed=n + blocksize)   # NaN/inf blocks included
            packed, absmax = cpu_backend.quantize_4bit(x, blocksize, key)
            want_packed, want_absmax = reference.quantize_4bit(x, blocksize, key)
            assert_same(packed, want_packed, f"packed n={n} bs={blocksize}")
            assert_same(absmax, want_absmax, f"absmax n={n} bs={blocksize}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_quantize_4bit_ties_and_edges_bit_exact(isa, key, dtype):
    # Blocks whose absmax is exactly 1.0 or 0.5 (the value itself is in the block, every
    # other one smaller), so the scaled values are the thresholds themselves and their
    # neighbours; an all-zero block (scaled NaN: code 0) and an odd tail after them.
    blocks = []
    for scale in (1.0, 0.5):
        values = (edge_values(key, torch.float32) * scale).to(dtype)
        values = values[values.float().abs() < scale]
        block = torch.cat([values, torch.tensor([scale], dtype=dtype)])
        blocks.append(torch.cat([block, torch.zeros(256 - block.numel(), dtype=dtype)]))
    x = torch.cat(blocks + [torch.zeros(256, dtype=dtype), torch.tensor([-0.0, 3.0, -2.0], dtype=dtype)])
    packed, absmax = cpu_backend.quantize_4bit(x, 256, key)
    want_packed, want_absmax = reference.quantize_4bit(x, 256, key)
    assert_same(packed, want_packed, "packed")
    assert_same(absmax, want_absmax, "absmax")


def nested_constants(absmax: torch.Tensor):
    """(8-bit codes, NestedAbsmax, the float32 constants they decode to): reference double
    quantization of `absmax` (bitsandbytes' layout: 256 codes per nested block)."""
    q, absmax2, offset = reference.double_quantize(absmax, DYNAMIC)
    decoded = reference.dequantize_absmax(q, absmax2, DYNAMIC, float(offset))
    return q, NestedAbsmax(absmax2, DYNAMIC, float(offset), 256), decoded


@pytest.mark.parametrize("nested", [False, True], ids=["float32-absmax", "double-quant"])
@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_dequantize_4bit_bit_exact(isa, key, nested):
    for blocksize in (32, 64, 256):
        for n in SIZES:
            x = make_values(n, torch.float32, blocksize, seed=3 * n + blocksize, finite=True)
            packed, absmax = reference.quantize_4bit(x, blocksize, key)
            constants, nest, decoded = (nested_constants(absmax) if nested and n
                                        else (absmax, None, absmax))
            for out_dtype in DTYPES:
                out = torch.full((n,), 7.0, dtype=out_dtype)
                dequantize_into(cpu_backend, packed, constants, blocksize, key, out, nest)
                want = reference.dequantize_4bit(packed, decoded, blocksize, key, (n,), out_dtype)
                assert_same(out, want, f"n={n} bs={blocksize} -> {out_dtype}")


@pytest.mark.parametrize("double_quant", [False, True], ids=["float32-absmax", "double-quant"])
@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_functional_round_trip_equals_the_reference_backend(isa, key, double_quant):
    # quantize_4bit / dequantize_4bit as users call them: the cpu backend's states and outputs
    # are the reference backend's, byte for byte, odd shapes and every dtype in and out
    for index, shape in enumerate([(1,), (0,), (65,), (3, 67), (2, 3, 129)]):
        for dtype in DTYPES:
            x = make_values(math.prod(shape), dtype, 64, seed=index, finite=True).reshape(shape)
            results = {}
            for backend in ("cpu", "reference"):
                nf4lora.set_backend(backend)
                try:
                    packed, state = F.quantize_4bit(x, compress_statistics=double_quant,
                                                    **state_format(key))
                    results[backend] = (packed, state, F.dequantize_4bit(packed, state))
                finally:
                    nf4lora.set_backend(None)
            (packed, state, restored), (ref_packed, ref_state, ref_restored) = (
                results["cpu"], results["reference"])
            label = f"{format_id(key)} {shape} {dtype}"
            assert_same(packed, ref_packed, label)
            assert state == ref_state, label
            assert_same(restored, ref_restored, label)
            weight = PackedWeight.from_state(packed, state).with_offset_read()
            for out_dtype in DTYPES:
                out = torch.empty(shape, dtype=out_dtype)
                cpu_backend.dequantize_4bit(weight, out)
                assert_same(out, spec_dequantize(packed, state, out_dtype), f"{label} -> {out_dtype}")


# ---- the fused matmul + LoRA and its gradients -----------------------------------------------

def quantized(key: str, out_f: int, in_f: int, nested: bool, seed: int = 0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    packed, state = F.quantize_4bit(w, compress_statistics=nested, **state_format(key))
    return packed, state, F.dequantize_4bit(packed, state).double()


def within_baseline(ours, truth, baseline, dtype, label):
    """|ours - truth| <= 2 |baseline - truth| + one ulp of the output's scale (max norms)."""
    err = (ours.double() - truth).abs().max().item()
    base_err = (baseline.double() - truth).abs().max().item()
    ulp = torch.finfo(dtype).eps * truth.abs().max().item()
    assert err <= 2 * base_err + ulp, f"{label}: error {err:.3g}, same-dtype baseline {base_err:.3g}"


# (M, NF4LORA_CPU_GEMV): the fused kernel at M = 1 and 5 with each decoder family (int16
# levels derived from the table with exact int32 sums, for 16-bit x on the SIMD paths; float
# weights), and dequantize + GEMM at M = 40, where no decoder is chosen.
ROUTES = [(1, "integer"), (1, "float"), (5, "integer"), (5, "float"), (40, "auto")]


@pytest.mark.parametrize("nested", [False, True], ids=["float32-absmax", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,decoder", ROUTES, ids=[f"M{m}-{d}" for m, d in ROUTES])
@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_lora_matmul_forward_within_the_dtype_baseline(isa, monkeypatch, key, M, decoder, dtype,
                                                       nested):
    monkeypatch.setenv("NF4LORA_CPU_GEMV", decoder)
    packed, state, W = quantized(key, 40, 256, nested)
    assert cpu_backend.matmul_path(M, PackedWeight.from_state(packed, state), dtype) == (
        "fused" if M <= cpu_backend.fused_max_m(dtype) else "dequantize+gemm")
    x, A, B, bias = operands(M, 256, 40, 4, dtype)
    y, h = run_op(x, packed, state, A, B, 2.0, bias)
    exact_h = x.double() @ A.double().t()
    within_baseline(h, exact_h, torch.nn.functional.linear(x, A), dtype, "h")
    exact = x.double() @ W.t() + 2.0 * (h.double() @ B.double().t()) + bias.double()
    base = torch.nn.functional.linear(x, W.to(dtype), bias) + 2.0 * torch.nn.functional.linear(
        torch.nn.functional.linear(x, A), B)
    within_baseline(y, exact, base, dtype, f"y {format_id(key)} M={M} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_lora_matmul_gradients_within_the_dtype_baseline(key, M, dtype):
    packed, state, W = quantized(key, 37, 192, nested=True, seed=1)
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(M, 192, generator=gen), torch.randn(4, 192, generator=gen) * 0.1,
               torch.randn(37, 4, generator=gen) * 0.1, torch.randn(37, generator=gen)]
    ours = [t.to(dtype).requires_grad_() for t in tensors]
    y = nf4lora.lora_matmul_4bit(ours[0], packed, state, *ours[1:3], 2.0, ours[3])
    grad = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(grad)
    exact_in = [t.detach().double().requires_grad_() for t in ours]
    exact, _ = reference.lora_matmul_4bit(exact_in[0], W, *exact_in[1:3], 2.0, exact_in[3])
    exact.backward(grad.double())
    base_in = [t.detach().clone().requires_grad_() for t in ours]
    base, _ = reference.lora_matmul_4bit(base_in[0], W.to(dtype), *base_in[1:3], 2.0, base_in[3])
    base.backward(grad)
    within_baseline(y.detach(), exact.detach(), base.detach(), dtype, "y")
    for name, mine, truth, baseline in zip(("x", "lora_A", "lora_B", "bias"), ours, exact_in, base_in):
        within_baseline(mine.grad, truth.grad, baseline.grad, dtype, f"d{name} M={M}")


# ---- no silent fallback ----------------------------------------------------------------------

class CountingModule:
    """Stands in for nf4lora._C: forwards every call, counting them by name."""

    def __init__(self, module):
        self.module, self.calls = module, {}

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)
        return counted


@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_cpu_backend_runs_every_format_itself(cpu_chosen, monkeypatch, key):
    device = torch.device("cpu")
    assert backends.backend_for(device, key) is cpu_backend
    assert cpu_backend.takes_format(key) and cuda_backend.takes_format(key)
    kernels = CountingModule(cpu_backend._C)
    monkeypatch.setattr(cpu_backend, "_C", kernels)
    from nf4lora.backends import reference as reference_backend

    def fell_back(*args, **kwargs):
        raise AssertionError(f"{format_id(key)} ran on the reference backend")
    for name in ("quantize_4bit", "dequantize_4bit"):
        monkeypatch.setattr(reference_backend, name, fell_back)

    packed, state = F.quantize_4bit(torch.randn(48, 128), compress_statistics=True,
                                    **state_format(key))
    F.dequantize_4bit(packed, state)
    for M in (1, 40):        # the fused kernels, then dequantize + GEMM (forward and grad_input)
        x = torch.randn(M, 128, dtype=torch.bfloat16, requires_grad=True)
        A = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
        B = torch.randn(48, 4, dtype=torch.bfloat16, requires_grad=True)
        nf4lora.lora_matmul_4bit(x, packed, state, A, B, 0.5).sum().backward()
    assert kernels.calls.get("quantize_4bit", 0) == 1, kernels.calls
    assert kernels.calls.get("lora_gemv_4bit", 0) == 1, kernels.calls
    assert kernels.calls.get("lora_grad_input_4bit", 0) == 1, kernels.calls  # M = 1's backward
    # F.dequantize_4bit, M = 40's forward and its backward dequantize W (in chunks)
    assert kernels.calls.get("dequantize_4bit", 0) >= 3, kernels.calls


def test_a_malformed_codec_is_refused_by_the_kernels():
    # the bindings check what the kernels index: the sizes, and codes within 0..15
    x, packed, absmax = torch.randn(64), torch.empty(32, dtype=torch.uint8), torch.empty(1)
    codec = codebook.kernel_codec("af4")
    for bad, match in [(codec._replace(codes=codec.codes[:15]), "codec.codes must hold 16 values, got 15"),
                       (codec._replace(codes=(0,) * 15 + (-1,)), r"4-bit codes \(0..15\), got -1"),
                       (codec._replace(thresholds=codec.thresholds + (1.0,)), "thresholds must hold 15"),
                       ("af4", "codec must be an nf4lora.codebook.KernelCodec")]:
        with pytest.raises(ValueError, match=match):
            cpu_backend._C.quantize_4bit(x, 64, bad, packed, absmax)

    short_table = codec._replace(levels=codec.levels[:15])

    class ShortTable(PackedWeight):
        __slots__ = ()
        codec = short_table                                  # shadows PackedWeight.codec

    with pytest.raises(ValueError, match="codec.levels must hold 16 values, got 15"):
        cpu_backend._C.dequantize_4bit(ShortTable(packed, absmax, 64, "af4", (64,), None),
                                       torch.empty(64))


# ---- the CUDA kernels' math, on the CPU (csrc/cuda_host, see tests/test_cuda_host.py) -------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_cuda_quantize_4bit_bit_exact(glue, key, dtype):
    for n in (0, 1, 63, 65, 4097):
        x = make_values(n, dtype, 64, seed=n)
        packed, absmax = glue.quantize_4bit(x, 64, key)
        want_packed, want_absmax = reference.quantize_4bit(x, 64, key)
        assert_same(packed, want_packed, f"packed n={n}")
        assert_same(absmax, want_absmax, f"absmax n={n}")
    edges = torch.cat([edge_values(key), torch.tensor([1.0, math.nan, -0.0, math.inf])]).to(dtype)
    packed, absmax = glue.quantize_4bit(edges, 32, key)
    want_packed, want_absmax = reference.quantize_4bit(edges, 32, key)
    assert_same(packed, want_packed, "edges")
    assert_same(absmax, want_absmax, "edges absmax")


@pytest.mark.parametrize("nested", [False, True], ids=["float32-absmax", "double-quant"])
@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_cuda_dequantize_4bit_bit_exact(glue, key, nested):
    for n in (1, 33, 4097):
        x = make_values(n, torch.float32, 64, seed=n, finite=True)
        packed, absmax = reference.quantize_4bit(x, 64, key)
        constants, nest, decoded = nested_constants(absmax) if nested else (absmax, None, absmax)
        for out_dtype in DTYPES:
            out = torch.empty(n, dtype=out_dtype)
            dequantize_into(glue, packed, constants, 64, key, out, nest)
            assert_same(out, reference.dequantize_4bit(packed, decoded, 64, key, (n,), out_dtype),
                        f"n={n} -> {out_dtype}")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("M,N,K,rank", [(1, 37, 2048, 16), (5, 23, 2080, 40), (8, 9, 96, 2)])
@pytest.mark.parametrize("key", FORMATS, ids=format_id)
def test_cuda_gemv_4bit_lora_within_the_dtype_baseline(glue, key, M, N, K, rank, dtype):
    g = torch.Generator().manual_seed(M + N)
    packed, absmax = reference.quantize_4bit(torch.randn(N, K, generator=g) * 0.05, 64, key)
    q, nest, decoded = nested_constants(absmax)
    W = reference.dequantize_4bit(packed, decoded, 64, key, (N, K), torch.float32)
    x = torch.randn(M, K, generator=g).to(dtype)
    A = (torch.randn(rank, K, generator=g) / math.sqrt(K)).to(dtype)
    B = (torch.randn(N, rank, generator=g) * 0.1).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    y, h = glue.gemv_4bit_lora(x, PackedWeight(packed, q, 64, key, (N, K), nest), A, B, 0.5, bias)
    args = (x, W, A, B, bias, 0.5)
    assert_within_dtype_baseline(y, lora_linear(*args, dtype), lora_linear(*args, torch.float64), "y")
    assert_within_dtype_baseline(h, torch.nn.functional.linear(x, A), x.double() @ A.double().t(), "h")
