"""The Triton codec kernels, run on CPU tensors by Triton's interpreter, equal the
reference bit for bit: packed bytes, absmax, 8-bit qabsmax, nested absmax and every
dequantized output (compared as raw bits, so -0.0 vs 0.0 counts; NaN by position).

The interpreter runs each program as numpy calls, about 0.1-0.5 s per launch here, so
sizes stay small and the full cross product is only taken where it is cheap.
"""
import os

# Must precede the first import of triton_kernels: Triton picks interpreter or compiler
# when `@triton.jit` runs, and codec.py reads the variable at the same moment.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from nf4lora import backends, codebook, reference  # noqa: E402
from conftest import dequantize_into
from nf4lora.backends import NestedAbsmax, PackedWeight  # noqa: E402
from nf4lora.backends import triton as triton_backend  # noqa: E402
from nf4lora.codebook import FP4_ABS_THRESHOLDS, create_dynamic_map, get_4bit_type  # noqa: E402

assert triton_backend.INTERPRETING, (
    "nf4lora.backends.triton was imported before this module set TRITON_INTERPRET=1; "
    "run the Triton tests with TRITON_INTERPRET=1 in the environment")
if triton_backend.availability() is not None:
    pytest.skip(f"triton backend unavailable: {triton_backend.availability()}",
                allow_module_level=True)

# Padding rows of a partial tile are all-zero blocks: 1/0 and 0*inf in numpy warn.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DYNAMIC_CODE = create_dynamic_map()
SIZES = (1, 63, 64, 65, 4097)
BLOCKSIZES = (32, 64, 256)
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.uint8: torch.uint8}


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits; NaN must sit at the same places (any payload)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}")
    if actual.is_floating_point():
        nan = expected.isnan()
        assert torch.equal(actual.isnan(), nan), "NaN positions differ"
        actual, expected = actual[~nan], expected[~nan]
    bits = _BITS[actual.dtype]
    bad = (actual.view(bits) != expected.view(bits)).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} of {actual.numel()} differ, first at {bad[:5].tolist()}: "
        f"{actual[bad[:5]].tolist()} != {expected[bad[:5]].tolist()}")


def check_quantize_4bit(values, blocksize, quant_type):
    packed, absmax = triton_backend.quantize_4bit(values, blocksize, quant_type)
    expected_packed, expected_absmax = reference.quantize_4bit(values, blocksize, quant_type)
    assert_bit_exact(packed, expected_packed)
    assert_bit_exact(absmax, expected_absmax)
    return expected_packed, expected_absmax


def check_double_quantize(absmax):
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    qabsmax, nested_absmax = triton_backend.quantize_blockwise(absmax - offset, DYNAMIC_CODE, 256)
    expected_q, expected_nested, expected_offset = reference.double_quantize(absmax, DYNAMIC_CODE)
    assert_bit_exact(qabsmax, expected_q)
    assert_bit_exact(nested_absmax, expected_nested)
    return NestedAbsmax(expected_nested, DYNAMIC_CODE, float(expected_offset), 256), expected_q


def check_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, nested=None):
    out = torch.empty(shape, dtype=dtype)
    dequantize_into(triton_backend, packed, absmax, blocksize, quant_type, out, nested)
    if nested is not None:
        absmax = reference.dequantize_absmax(absmax, nested.absmax, nested.code, nested.offset,
                                             nested.blocksize)
    assert_bit_exact(out, reference.dequantize_4bit(packed, absmax, blocksize, quant_type,
                                                    shape, dtype))


def round_trip(values, blocksize, quant_type, out_dtypes=(torch.float32,), nested=(False, True)):
    """Quantize, double-quantize and dequantize `values`, each step checked."""
    packed, absmax = check_quantize_4bit(values, blocksize, quant_type)
    nested_absmax, qabsmax = check_double_quantize(absmax)
    for out_dtype in out_dtypes:
        for is_nested in nested:
            check_dequantize_4bit(packed, qabsmax if is_nested else absmax, blocksize,
                                  quant_type, values.shape, out_dtype,
                                  nested_absmax if is_nested else None)


# -- sizes x blocksizes x quant types (float32 in and out; dtypes below) --------------

@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_sizes(n, blocksize, quant_type):
    torch.manual_seed(n * blocksize)
    round_trip(torch.randn(n), blocksize, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_blocksize_4096(quant_type):
    torch.manual_seed(4096)
    round_trip(torch.randn(2 * 4096 + 3), 4096, quant_type, nested=(True,))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_empty_tensor_launches_nothing(quant_type):
    values = torch.empty(0, 5)
    packed, absmax = check_quantize_4bit(values, 64, quant_type)
    assert packed.shape == (0,) and absmax.shape == (0,)
    codes, nested = triton_backend.quantize_blockwise(absmax, DYNAMIC_CODE, 256)
    assert codes.shape == (0,) and nested.shape == (0,)
    out = torch.empty(0, 5, dtype=torch.bfloat16)
    dequantize_into(triton_backend, packed, absmax, 64, quant_type, out, None)
    triton_backend.dequantize_4bit(PackedWeight(packed, codes, 64, quant_type, (0, 5),
                                                NestedAbsmax(nested, DYNAMIC_CODE, 0.0, 256)), out)


# -- dtypes and shapes -----------------------------------------------------------------

@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("in_dtype", FLOAT_DTYPES)
def test_every_input_and_output_dtype(in_dtype, quant_type):
    torch.manual_seed(7)
    values = (torch.randn(33, 31) * 3).to(in_dtype)  # 1023 elements: odd, partial block
    round_trip(values, 64, quant_type, out_dtypes=FLOAT_DTYPES)


@pytest.mark.parametrize("shape", [(3, 5, 7), (64, 33), (2, 3, 64)])
def test_multidimensional_shapes(shape):
    torch.manual_seed(len(shape))
    round_trip(torch.randn(shape, dtype=torch.bfloat16), 32, "nf4",
               out_dtypes=(torch.bfloat16,))


def test_packed_bytes_stored_as_another_dtype():
    # quant_storage: bitsandbytes keeps the bytes as e.g. bf16 for FSDP; same bytes.
    packed, absmax = reference.quantize_4bit(torch.randn(256), 64, "nf4")
    check_dequantize_4bit(packed.view(torch.bfloat16).reshape(-1, 1), absmax, 64, "nf4",
                          (16, 16), torch.float16)


# -- special values --------------------------------------------------------------------

def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Blocks of 32: all +0, all -0, mixed signed zeros, denormals only, denormals with
    normals, the largest finite values, one Inf, one NaN, and values exactly on the
    encoders' thresholds (ties go to the lower code)."""
    info = torch.finfo(dtype)
    tiny = info.smallest_normal
    denormals = torch.tensor([tiny / 2, -tiny / 4, tiny / 8, -tiny / 16] * 8)
    mixed = torch.tensor([1.0, -tiny / 2, tiny / 4, 0.0] * 8)
    largest = torch.tensor([info.max, -info.max / 3, info.max / 7, 1.0] * 8)
    zeros_signed = torch.tensor([0.0, -0.0] * 16)
    with_inf = torch.cat([torch.tensor([float("inf")]), torch.linspace(-2, 2, 31)])
    with_nan = torch.cat([torch.tensor([float("nan")]), torch.linspace(-2, 2, 31)])
    # absmax 1 (from the 1.0 entry), so scaled == x: exactly on the thresholds.
    nf4_ties = torch.cat([torch.tensor([1.0]), reference.nf4_thresholds(),
                          -reference.nf4_thresholds()[:16]])
    fp4_thresholds = torch.tensor(FP4_ABS_THRESHOLDS, dtype=torch.float32)
    fp4_ties = torch.cat([torch.tensor([1.0]), fp4_thresholds, -fp4_thresholds,
                          torch.zeros(17)])
    blocks = [torch.zeros(32), -torch.zeros(32), zeros_signed, denormals, mixed, largest,
              with_inf, with_nan, nf4_ties, fp4_ties]
    return torch.cat([block.to(dtype) for block in blocks])


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_special_values(dtype, quant_type):
    values = special_values(dtype)
    packed, absmax = check_quantize_4bit(values, 32, quant_type)
    assert absmax[7].isnan(), "a NaN in a block must make its absmax NaN"
    assert (packed[:48] == 0).all(), "all-zero blocks encode as code 0 (CUDA semantics)"
    for out_dtype in FLOAT_DTYPES:
        check_dequantize_4bit(packed, absmax, 32, quant_type, values.shape, out_dtype)


def test_blockwise_8bit_special_values():
    # The 8-bit encoder's edge cases: exact code values, midpoints between neighbours
    # (ties go to the pivot), 0, -0.0, the ends of the map and denormals, all scaled by
    # absmax 1 so they reach the search unchanged; then a NaN in the last block.
    code = DYNAMIC_CODE
    midpoints = (code[:-1] + code[1:]) * 0.5
    values = torch.cat([torch.tensor([1.0, -1.0, 0.0, -0.0, 1e-40, -1e-41]), code, midpoints])
    with_nan = torch.cat([values, torch.tensor([float("nan")])])
    for blocksize, tested in ((64, values), (256, values), (4096, values), (64, with_nan)):
        codes, absmax = triton_backend.quantize_blockwise(tested, code, blocksize)
        expected_codes, expected_absmax = reference.quantize_blockwise(tested, code, blocksize)
        assert_bit_exact(codes, expected_codes)
        assert_bit_exact(absmax, expected_absmax)


@pytest.mark.parametrize("scales", ["tiny", "wide"])
def test_nested_absmax_at_extreme_scales(scales):
    # tiny: every absmax near float32's smallest normal, so the nested products
    # code2[q] * absmax2 are denormal (a flush-to-zero would show). wide: absmax from
    # 1e-30 to 1e30 in one nested block, so the offset swamps the small ones.
    torch.manual_seed(3)
    if scales == "tiny":
        values = torch.randn(64 * 300) * 1e-37
    else:
        scale = torch.logspace(-30, 30, 61).repeat_interleave(64)
        values = torch.randn(scale.numel()).clamp(-3, 3) * scale
    for quant_type in QUANT_TYPES:
        round_trip(values, 64, quant_type, out_dtypes=(torch.float32, torch.bfloat16),
                   nested=(True,))


# -- 8-bit blockwise, on its own ---------------------------------------------------------

def test_dynamic_search_bounds_follow_from_final_pivot():
    # codec.encode_dynamic derives the reference's `lower`/`upper` from the final pivot;
    # check that on all 2**7 up/down paths of the search.
    for path in range(2 ** 7):
        pivot, lower, upper = 127, 0, 255
        for i, step in enumerate((64, 32, 16, 8, 4, 2, 1)):
            if path >> i & 1:
                lower, pivot = pivot, pivot + step
            else:
                upper, pivot = pivot, pivot - step
        assert (lower, upper) == (max(pivot - 1, 0), pivot + 1), path


def test_blockwise_8bit_dense_sweep():
    values = torch.cat([torch.tensor([1.0]), torch.linspace(-1, 1, 40001)])
    codes, absmax = triton_backend.quantize_blockwise(values, DYNAMIC_CODE, 4096)
    expected_codes, expected_absmax = reference.quantize_blockwise(values, DYNAMIC_CODE, 4096)
    assert_bit_exact(codes, expected_codes)
    assert_bit_exact(absmax, expected_absmax)


@pytest.mark.parametrize("blocksize", (32, 256, 4096))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_blockwise_8bit_round_trip(dtype, blocksize):
    torch.manual_seed(blocksize)
    values = torch.randn(4097).to(dtype)
    codes, absmax = triton_backend.quantize_blockwise(values, DYNAMIC_CODE, blocksize)
    expected_codes, expected_absmax = reference.quantize_blockwise(values, DYNAMIC_CODE,
                                                                   blocksize)
    assert_bit_exact(codes, expected_codes)
    assert_bit_exact(absmax, expected_absmax)
    out = torch.empty(values.shape, dtype=dtype)
    triton_backend.dequantize_blockwise(codes, absmax, DYNAMIC_CODE, blocksize, out)
    assert_bit_exact(out, reference.dequantize_blockwise(codes, absmax, DYNAMIC_CODE,
                                                         blocksize, dtype))


# -- the backend as the registry sees it -------------------------------------------------

def test_backend_runs_cpu_tensors_when_interpreting():
    assert backends.availability("triton") is None
    assert "cpu" in triton_backend.DEVICE_TYPES and "cuda" in triton_backend.DEVICE_TYPES


def test_non_power_of_two_blocksize_is_rejected():
    with pytest.raises(ValueError, match="blocksize"):
        triton_backend.quantize_4bit(torch.randn(96), 48, "nf4")
    out = torch.empty(96)
    with pytest.raises(ValueError, match="blocksize"):
        triton_backend.dequantize_4bit(PackedWeight(torch.zeros(48, dtype=torch.uint8), torch.ones(2),
                                                    48, "nf4", (96,), None), out)


@pytest.mark.parametrize("quant_type", ["af4", "bof4", "iq4nl", "int4", "custom"])
def test_code_books_round_trip_bit_exact(quant_type):
    # any 16-entry table: quantize by its midpoints, decode by it, as the spec does
    key = (codebook.format_key("custom", torch.linspace(-0.9, 0.8, 16)) if quant_type == "custom"
           else quant_type)
    values = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    values[:64] = 0.0                               # an all-zero block: code 0
    values[64:70] = codebook.table(key)[[0, 5, 9, 15, 3, 7]] * values[64:128].abs().max()
    round_trip(values, 64, key, out_dtypes=(torch.float32, torch.bfloat16))


def test_every_code_book_stays_on_the_triton_backend():
    # the Triton kernels take any table (so do the C++ and CUDA ones:
    # tests/test_native_codebooks.py)
    key = codebook.format_key("custom", torch.linspace(-0.9, 0.8, 16))
    previous = backends.get_backend()
    backends.set_backend("triton")
    try:
        for quant_type in ("nf4", "fp4", "af4", "int4", key):
            assert backends.backend_for(torch.device("cpu"), quant_type) is triton_backend
    finally:
        backends.set_backend(previous)
    if backends.availability("cpu") is None:
        from nf4lora.backends import cpu as cpu_backend
        assert cpu_backend.takes_format("af4") and cpu_backend.takes_format(key)


def test_tables_come_from_the_codebook():
    for quant_type in QUANT_TYPES:
        assert torch.equal(triton_backend._table(quant_type, torch.device("cpu")),
                           get_4bit_type(quant_type))
