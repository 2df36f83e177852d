"""The C++ CPU backend (nf4lora._C via nf4lora.backends.cpu) against the spec, bit for bit.

Every comparison is exact: packed bytes and 8-bit codes with torch.equal, float outputs
with equal NaN positions and equal bits elsewhere (the sign of zero included). Each test
runs once per SIMD path this CPU has (NF4LORA_CPU_ISA=scalar|avx2|avx512|avx512bf16); a path the
CPU lacks is skipped with the reason.
"""
from __future__ import annotations

import functools
import math

import os

import pytest
import torch

from nf4lora import codebook, reference
from conftest import dequantize_into
from nf4lora.backends import NestedAbsmax, PackedWeight
from nf4lora.backends import cpu as cpu_backend
from nf4lora.codebook import FP4_ABS_THRESHOLDS, create_dynamic_map, get_4bit_type

pytestmark = pytest.mark.skipif(cpu_backend.availability() is not None,
                                reason=f"cpu backend unavailable: {cpu_backend.availability()}")

if cpu_backend.availability() is None:
    from nf4lora import _C
else:  # keeps collection working; every test is skipped above
    _C = None

ISAS = ("scalar", "avx2", "avx512", "avx512bf16")
SIZES = (0, 1, 2, 63, 64, 65, 127, 4097, 3 * 4096 + 7)
BLOCKSIZES = (32, 64, 128, 256, 1024, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT_TYPES = ("nf4", "fp4")
DYNAMIC = create_dynamic_map()
# Large finite magnitudes per dtype (float16 tops out at 65504).
LARGE = {torch.float32: 1e30, torch.float16: 6e4, torch.bfloat16: 1e30}
# A subnormal of each dtype.
TINY = {torch.float32: 1e-40, torch.float16: 6e-8, torch.bfloat16: 1e-40}


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Force one SIMD path through NF4LORA_CPU_ISA (read by the kernels at every call)."""
    if request.param not in _C.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} path "
                    f"(supported: {', '.join(_C.supported_isas())})")
    monkeypatch.setenv("NF4LORA_CPU_ISA", request.param)
    assert _C.isa() == request.param
    return request.param


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    if not actual.is_floating_point():
        if not torch.equal(actual, expected):
            bad = (actual != expected).nonzero()[:5].flatten().tolist()
            pytest.fail(f"{what}: differ at {bad}: {actual.flatten()[bad]} vs {expected.flatten()[bad]}")
        return
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    a = actual[~nan_a].view(bits[actual.dtype])
    e = expected[~nan_e].view(bits[actual.dtype])
    if not torch.equal(a, e):
        bad = (a != e).nonzero()[:5].flatten().tolist()
        pytest.fail(f"{what}: differ at {bad}: {actual[~nan_a][bad]} vs {expected[~nan_e][bad]}")


def make_values(n: int, dtype: torch.dtype, blocksize: int, seed: int, finite: bool = False):
    """Normal values at several scales plus the edge cases: an all-zero block, -0.0,
    subnormals, large magnitudes, and (unless finite) NaN and +-inf in other blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 3, 7)[torch.randint(0, 7, (n,), generator=g)]
    x = x.to(dtype)
    if n == 0:
        return x
    x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = -0.0
    x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = TINY[dtype]
    x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = -TINY[dtype]
    if n >= 3 * blocksize:  # keep some blocks clean of the extremes
        x[blocksize:2 * blocksize] = 0.0  # an all-zero block: absmax 0, codes 0
        x[2 * blocksize + 1] = LARGE[dtype]
        x[2 * blocksize + 2] = -LARGE[dtype]
        x[2 * blocksize + 3:3 * blocksize] *= 1e-3  # values far below the block's absmax
        if not finite and n >= 6 * blocksize:
            x[3 * blocksize + 5] = float("nan")
            x[4 * blocksize + 6] = float("inf")
            x[5 * blocksize + 7] = float("-inf")
    return x


def tie_values(dtype: torch.dtype, quant_type: str) -> torch.Tensor:
    """Values whose scaled form is exactly on (and one ulp around) every decision
    threshold: each block's absmax is 1.0 or 0.5, so x * (1 / absmax) is exact."""
    if quant_type == "nf4":
        thresholds = reference.nf4_thresholds()
    else:
        t = torch.tensor(FP4_ABS_THRESHOLDS, dtype=torch.float32)
        thresholds = torch.cat([t, -t])
    pieces = []
    for scale in (1.0, 0.5):
        t = (thresholds * scale).to(dtype)  # exact for float32; nearest for 16-bit
        up = torch.nextafter(t, torch.full_like(t, math.inf))
        down = torch.nextafter(t, torch.full_like(t, -math.inf))
        block = torch.cat([t, up, down, get_4bit_type(quant_type).to(dtype) * scale])
        block = torch.cat([block, torch.tensor([scale], dtype=dtype)])  # the absmax
        pad = 64 - block.numel()
        pieces.append(torch.cat([block, torch.zeros(pad, dtype=dtype)]))
    return torch.cat(pieces)


# ---------------------------------------------------------------------------------
# the codec header's conversions (its formats are data: tests/test_native_codebooks.py)
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_conversion_matches_torch(dtype):
    """nf4_codec.h float_to_{fp16,bf16}_bits == torch's .to(dtype), incl. ties,
    subnormals, overflow to inf; NaN stays NaN."""
    g = torch.Generator().manual_seed(1)
    random_bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, -65520.0,
                          6.1035156e-05, 6.0e-05, 5.96e-08, 2.98e-08, 2.9802322e-08, 2.99e-08,
                          1e-45, -1e-45, 1e-40, 3.3895314e38, 3.4028235e38, math.inf, -math.inf,
                          math.nan], dtype=torch.float32)
    # every fp16/bf16 value and the midpoints between neighbours (ties to even)
    halves = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(dtype).float()
    mids = (halves.double()[:-1] + halves.double()[1:]).div(2).float()
    x = torch.cat([edges, random_bits.to(torch.int32).view(torch.float32), halves, mids])
    x = x.contiguous()
    out = torch.empty(x.numel(), dtype=dtype)
    _C.convert_float(x, out)
    assert_same(out, x.to(dtype), f"float32 -> {dtype}")


# ---------------------------------------------------------------------------------
# 4-bit quantize / dequantize
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_matches_reference(isa, quant_type, dtype, blocksize):
    for n in SIZES:
        x = make_values(n, dtype, blocksize, seed=n)
        packed, absmax = cpu_backend.quantize_4bit(x, blocksize, quant_type)
        ref_packed, ref_absmax = reference.quantize_4bit(x, blocksize, quant_type)
        assert_same(packed, ref_packed, f"packed n={n}")
        assert_same(absmax, ref_absmax, f"absmax n={n}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_ties_and_special_blocks(isa, quant_type, dtype):
    x = tie_values(dtype, quant_type)
    specials = torch.tensor([0.0] * 64 + [-0.0] * 64 + [TINY[dtype]] + [0.0] * 63, dtype=dtype)
    x = torch.cat([x, specials, torch.tensor([7.0], dtype=dtype)])  # odd n: a padding nibble
    for blocksize in (32, 64, 128):
        packed, absmax = cpu_backend.quantize_4bit(x, blocksize, quant_type)
        ref_packed, ref_absmax = reference.quantize_4bit(x, blocksize, quant_type)
        assert_same(packed, ref_packed, f"packed bs={blocksize}")
        assert_same(absmax, ref_absmax, f"absmax bs={blocksize}")


@pytest.mark.parametrize("shape", [(3, 5, 7), (64, 65), (2, 3, 4097)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_shapes(isa, shape, dtype):
    x = make_values(math.prod(shape), dtype, 64, seed=7, finite=True).reshape(shape)
    packed, absmax = cpu_backend.quantize_4bit(x, 64, "nf4")
    ref_packed, ref_absmax = reference.quantize_4bit(x, 64, "nf4")
    assert_same(packed, ref_packed, "packed")
    assert_same(absmax, ref_absmax, "absmax")
    for out_dtype in DTYPES:
        out = torch.empty(shape, dtype=out_dtype)
        dequantize_into(cpu_backend, packed, absmax, 64, "nf4", out, None)
        assert_same(out, reference.dequantize_4bit(packed, absmax, 64, "nf4", shape, out_dtype))


def _absmax_cases(blocks: int, g: torch.Generator) -> torch.Tensor:
    """Block constants with every edge case: 0, subnormal, huge, inf, NaN."""
    absmax = torch.rand(blocks, generator=g) * 3
    specials = torch.tensor([0.0, 1e-40, 1e30, 3e38, math.inf, math.nan, 1.0, 0.5])
    k = min(blocks, specials.numel())
    absmax[torch.randperm(blocks, generator=g)[:k]] = specials[:k]
    return absmax


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_4bit_matches_reference(isa, quant_type, out_dtype, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    for n in SIZES:
        blocks = reference.num_blocks(n, blocksize)
        packed = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
        absmax = _absmax_cases(blocks, g)
        out = torch.full((n,), 123.0, dtype=out_dtype)
        dequantize_into(cpu_backend, packed, absmax, blocksize, quant_type, out, None)
        expected = reference.dequantize_4bit(packed, absmax, blocksize, quant_type, (n,), out_dtype)
        assert_same(out, expected, f"n={n}")


@functools.lru_cache(maxsize=None)
def nested_case(quant_type: str, blocksize: int, nested_blocksize: int, n: int):
    """Reference inputs and outputs for the nested test (shared by every ISA's run)."""
    dtype = DTYPES[n % 3]  # the input dtype only shapes the absmax values
    x = make_values(n, dtype, blocksize, seed=n + 1, finite=True)
    packed, absmax = reference.quantize_4bit(x, blocksize, quant_type)
    qabsmax, absmax2, offset = reference.double_quantize(absmax, DYNAMIC, nested_blocksize)
    nested = NestedAbsmax(absmax2, DYNAMIC, float(offset), nested_blocksize)
    decoded = reference.dequantize_absmax(qabsmax, absmax2, DYNAMIC, float(offset), nested_blocksize)
    expected = {out_dtype: reference.dequantize_4bit(packed, decoded, blocksize, quant_type, (n,),
                                                     out_dtype) for out_dtype in DTYPES}
    return packed, qabsmax, nested, expected


@pytest.mark.parametrize("nested_blocksize", [256, 4])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_4bit_nested_matches_reference(isa, quant_type, blocksize, nested_blocksize):
    """Double quantization: the absmax decode fused into the 4-bit decode."""
    for n in SIZES:
        packed, qabsmax, nested, expected = nested_case(quant_type, blocksize, nested_blocksize, n)
        for out_dtype in DTYPES:
            out = torch.empty(n, dtype=out_dtype)
            dequantize_into(cpu_backend, packed, qabsmax, blocksize, quant_type, out, nested)
            assert_same(out, expected[out_dtype], f"n={n} -> {out_dtype}")


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_4bit_misaligned_output(isa, out_dtype):
    """An output view at an odd offset (unaligned vector stores) and a large output
    (>= 4 MiB: the kernels advise huge pages for it) give the reference bytes."""
    n = (4 << 20) // out_dtype.itemsize + 4097
    g = torch.Generator().manual_seed(5)
    packed = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
    absmax = _absmax_cases(reference.num_blocks(n, 64), g)
    expected = reference.dequantize_4bit(packed, absmax, 64, "nf4", (n,), out_dtype)
    for out in (torch.empty(n, dtype=out_dtype), torch.empty(n + 1, dtype=out_dtype)[1:]):
        dequantize_into(cpu_backend, packed, absmax, 64, "nf4", out, None)
        assert_same(out, expected, f"offset={out.data_ptr() % 64}")


@pytest.mark.parametrize("stream", ["0", "1"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_dequantize_4bit_streaming_stores(isa, blocksize, stream, monkeypatch):
    """Non-temporal output stores (automatic only for outputs of 16 MiB and more; forced
    here with NF4LORA_CPU_STREAM=1, which still declines a misaligned output) and plain
    ones (=0) give the reference bytes, whole and partial blocks, on both kinds of output."""
    monkeypatch.setenv("NF4LORA_CPU_STREAM", stream)
    for n in (63, 4097, 3 * 4096 + 7, 100_003):
        packed, qabsmax, nested, expected = nested_case("nf4", blocksize, 256, n)
        for out_dtype in DTYPES:
            for out in (torch.empty(n, dtype=out_dtype), torch.empty(n + 1, dtype=out_dtype)[1:]):
                dequantize_into(cpu_backend, packed, qabsmax, blocksize, "nf4", out, nested)
                assert_same(out, expected[out_dtype], f"n={n} -> {out_dtype}, offset={out.data_ptr() % 64}")


# ---------------------------------------------------------------------------------
# 8-bit blockwise (double quantization)
# ---------------------------------------------------------------------------------
def dynamic_tie_values() -> torch.Tensor:
    """Scaled values exactly on the float32 midpoints of the dynamic map (and one ulp
    around), plus the map itself, in a block whose absmax is 1.0."""
    mids = (DYNAMIC[:-1] + DYNAMIC[1:]) * 0.5
    up = torch.nextafter(mids, torch.full_like(mids, 2.0))
    down = torch.nextafter(mids, torch.full_like(mids, -2.0))
    return torch.cat([mids, up, down, DYNAMIC, torch.tensor([1.0, -1.0, 0.0, -0.0])])


@pytest.mark.parametrize("blocksize", [256, 64, 100, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_blockwise_matches_reference(isa, dtype, blocksize):
    for n in SIZES:
        x = make_values(n, dtype, blocksize, seed=n + 2)
        if dtype == torch.float32:
            x = torch.cat([dynamic_tie_values(), x])
        codes, absmax = cpu_backend.quantize_blockwise(x, DYNAMIC, blocksize)
        ref_codes, ref_absmax = reference.quantize_blockwise(x, DYNAMIC, blocksize)
        assert_same(codes, ref_codes, f"codes n={n}")
        assert_same(absmax, ref_absmax, f"absmax n={n}")


@pytest.mark.parametrize("blocksize", [256, 64, 100])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_blockwise_matches_reference(isa, out_dtype, blocksize):
    g = torch.Generator().manual_seed(3)
    for n in SIZES:
        codes = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        absmax = _absmax_cases(reference.num_blocks(n, blocksize), g)
        out = torch.empty(n, dtype=out_dtype)
        cpu_backend.dequantize_blockwise(codes, absmax, DYNAMIC, blocksize, out)
        expected = reference.dequantize_blockwise(codes, absmax, DYNAMIC, blocksize, out_dtype)
        assert_same(out, expected, f"n={n}")


# ---------------------------------------------------------------------------------
# threads, ISA selection, property test
# ---------------------------------------------------------------------------------
def test_thread_count_does_not_change_results(isa):
    """Block ranges per thread (static; chunks taken in turn for dequantize_4bit): 1 and
    2 OpenMP threads give identical bytes.
    (Large enough for the kernels to actually fork: >= 2 * 32768 elements.)"""
    x = make_values(300_001, torch.bfloat16, 64, seed=11, finite=True)
    results = []
    try:
        for threads in (1, 2):
            _C.set_num_threads(threads)
            assert _C.num_threads() == threads
            packed, absmax = cpu_backend.quantize_4bit(x, 64, "nf4")
            offset = absmax.mean()
            qabsmax, absmax2 = cpu_backend.quantize_blockwise(absmax - offset, DYNAMIC, 256)
            out = torch.empty(x.numel(), dtype=torch.bfloat16)
            nested = NestedAbsmax(absmax2, DYNAMIC, float(offset), 256)
            dequantize_into(cpu_backend, packed, qabsmax, 64, "nf4", out, nested)
            out8 = torch.empty(qabsmax.numel(), dtype=torch.float32)
            cpu_backend.dequantize_blockwise(qabsmax, absmax2, DYNAMIC, 256, out8)
            results.append((packed, absmax, qabsmax, absmax2, out, out8))
    finally:
        _C.set_num_threads(0)
    for one, two in zip(*results):
        assert_same(one, two)


def test_isa_selection_errors(monkeypatch):
    assert _C.supported_isas()[0] == "scalar"
    monkeypatch.setenv("NF4LORA_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="expected one of"):
        _C.isa()
    for name in ISAS:
        if name not in _C.supported_isas():
            monkeypatch.setenv("NF4LORA_CPU_ISA", name)
            with pytest.raises(RuntimeError, match="does not support"):
                cpu_backend.quantize_4bit(torch.ones(8), 64, "nf4")
    monkeypatch.delenv("NF4LORA_CPU_ISA")
    assert _C.isa() == _C.supported_isas()[-1]


# The /proc/cpuinfo flags each path needs (csrc/cpu/dispatch.cpp asks the same of cpuid).
ISA_FLAGS = {"avx2": {"avx2", "f16c", "fma"}, "avx512": {"avx512f", "avx512bw"},
             "avx512bf16": {"avx512f", "avx512bw", "avx512_bf16"}}


def _cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs Linux's /proc/cpuinfo")
def test_every_path_this_cpu_has_runs_natively():
    """Where the CPU has AVX-512 (or AVX2), its kernels must be built and selectable, so the
    per-ISA tests above run them instead of skipping; a CPU without them is covered by
    scripts/check_avx512_emulated.sh (SIMDe). .ci/run prints which of the two applies."""
    flags = _cpuinfo_flags()
    expected = {isa for isa, needs in ISA_FLAGS.items() if needs <= flags}
    assert expected <= set(_C.supported_isas()), (expected, _C.supported_isas())
    assert not (set(_C.supported_isas()) - {"scalar"}) - expected      # nothing the CPU lacks


def test_bad_arguments_raise():
    x, packed, absmax = torch.zeros(10), torch.zeros(5, dtype=torch.uint8), torch.zeros(1)
    with pytest.raises(ValueError, match="even"):
        _C.quantize_4bit(x, 33, codebook.kernel_codec("nf4"), packed, absmax)
    with pytest.raises(ValueError, match="codec must be an nf4lora.codebook.KernelCodec"):
        _C.quantize_4bit(x, 64, "nf4", packed, absmax)
    bad_codes = codebook.kernel_codec("nf4")._replace(codes=(16,) * 16)
    with pytest.raises(ValueError, match=r"codec.codes must be 4-bit codes \(0..15\), got 16"):
        _C.quantize_4bit(x, 64, bad_codes, packed, absmax)
    short = codebook.kernel_codec("nf4")._replace(thresholds=(0.0,) * 14)
    with pytest.raises(ValueError, match="codec.thresholds must hold 15 values, got 14"):
        _C.quantize_4bit(x, 64, short, packed, absmax)
    with pytest.raises(ValueError, match="dtype"):
        _C.dequantize_4bit(PackedWeight(packed, absmax, 64, "nf4", (10,), None),
                           torch.zeros(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="null"):
        _C.quantize_blockwise(x, None, 256, torch.zeros(10, dtype=torch.uint8), absmax)
    with pytest.raises(ValueError, match="absmax must be torch.float32"):
        _C.dequantize_4bit(PackedWeight(packed, packed, 64, "nf4", (10,), None), x)
    with pytest.raises(ValueError, match="packed weight holds 5 elements, the weight needs 6"):
        _C.dequantize_4bit(PackedWeight(packed, absmax, 64, "nf4", (12,), None), torch.zeros(12))


def test_ids_come_from_the_extension():
    """The binding maps torch dtypes to the kernels' ids itself; Python never spells an
    id. Formats have none: they cross as data (codebook.kernel_codec)."""
    assert _C.DTYPE_IDS == {"float32": 0, "float16": 1, "bfloat16": 2}
    assert not hasattr(_C, "QUANT_TYPE_IDS")
    assert _C.native_16bit_gemm(torch.float32)


def test_availability_and_device_types():
    assert cpu_backend.availability() is None
    assert cpu_backend.DEVICE_TYPES == ("cpu",)
    assert _C.num_threads() >= 1


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@pytest.mark.parametrize("isa_name", ISAS)
@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True,
                                 allow_subnormal=True), max_size=300),
       dtype=st.sampled_from(DTYPES), out_dtype=st.sampled_from(DTYPES),
       blocksize=st.sampled_from(BLOCKSIZES), quant_type=st.sampled_from(QUANT_TYPES))
def test_property_round_trip_matches_reference(isa_name, values, dtype, out_dtype, blocksize,
                                               quant_type):
    if isa_name not in _C.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa_name} path")
    import os
    previous = os.environ.get("NF4LORA_CPU_ISA")
    os.environ["NF4LORA_CPU_ISA"] = isa_name
    try:
        x = torch.tensor(values, dtype=torch.float32).to(dtype)
        packed, absmax = cpu_backend.quantize_4bit(x, blocksize, quant_type)
        ref_packed, ref_absmax = reference.quantize_4bit(x, blocksize, quant_type)
        assert_same(packed, ref_packed, "packed")
        assert_same(absmax, ref_absmax, "absmax")
        out = torch.empty(x.numel(), dtype=out_dtype)
        dequantize_into(cpu_backend, packed, absmax, blocksize, quant_type, out, None)
        assert_same(out, reference.dequantize_4bit(packed, absmax, blocksize, quant_type,
                                                   (x.numel(),), out_dtype), "dequantized")
    finally:
        if previous is None:
            os.environ.pop("NF4LORA_CPU_ISA", None)
        else:
            os.environ["NF4LORA_CPU_ISA"] = previous
