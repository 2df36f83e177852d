"""bitsandbytes (its CPU build) is the oracle for the format.

What must be identical: dequantizing a given state (either library's, either way
through as_dict/from_dict) by nf4lora and by bitsandbytes' reference semantics
(tests/oracles.py: never its CPU kernels, whose results depend on the CPU's instruction
set), absmax, the JSON blob and state-dict keys. What may differ,
and only where bitsandbytes' CPU path is known to depart from its CUDA kernels (which
nf4lora follows): a 4-bit code for a value within a few ulp of a threshold (bitsandbytes
CPU divides in the partial block and uses exact FP4 midpoints), the sign of an FP4 zero,
an all-zero block (CUDA: 0x00, CPU: 0x77), blocks with a subnormal absmax (CPU clamps it
at 1e-38), and 8-bit codes near a midpoint (CPU reads a 65536-bin approximate table).
"""
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import nf4lora.functional as F
from nf4lora import codebook, reference

from conftest import DTYPES
from oracles import bnb_reference_dequantize, spec_dequantize

SHAPES = [(1,), (2,), (63,), (64,), (65,), (4096 + 7,), (33, 65), (3, 5, 129)]
BLOCKSIZES = [32, 64, 256, 4096]
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def _thresholds(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return reference.nf4_thresholds()
    table = codebook.get_4bit_type("fp4")
    magnitudes = table[list(codebook.FP4_CODE_BY_RANK)]
    exact = (magnitudes[1:] + magnitudes[:-1]) / 2
    cuda = torch.tensor(codebook.FP4_ABS_THRESHOLDS)
    both = torch.cat([exact, cuda])
    return torch.cat([both, -both])


def assert_codes_match_bitsandbytes(x, blocksize, quant_type, ours, theirs):
    """Equal 4-bit codes, except in the documented CPU-vs-CUDA corners."""
    n = x.numel()
    ours = reference.unpack_nibbles(ours.reshape(-1).view(torch.uint8), n)
    theirs = reference.unpack_nibbles(theirs.reshape(-1).view(torch.uint8), n)
    differs = ours != theirs
    if not differs.any():
        return
    absmax, scaled = reference._scale_blocks(x, blocksize)
    scaled = scaled.reshape(-1)[:n]
    block_absmax = absmax.repeat_interleave(blocksize)[:n]
    distance = (scaled.unsqueeze(1) - _thresholds(quant_type)).abs().min(dim=1).values
    near_threshold = distance <= 8 * torch.finfo(torch.float32).eps
    degenerate_block = block_absmax < SMALLEST_NORMAL            # all-zero or subnormal absmax
    fp4_zero = (ours & 7 == 0) & (theirs & 7 == 0) if quant_type == "fp4" else torch.zeros_like(differs)
    explained = near_threshold | degenerate_block | fp4_zero
    unexplained = differs & ~explained
    assert not unexplained.any(), (
        f"{int(unexplained.sum())} codes differ from bitsandbytes unexplained, e.g. at "
        f"{unexplained.nonzero()[:5].flatten().tolist()}: ours {ours[unexplained][:5].tolist()} "
        f"theirs {theirs[unexplained][:5].tolist()} scaled {scaled[unexplained][:5].tolist()}")


def _sample(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_codes_and_absmax_match(backend, bnb, quant_type, dtype, blocksize):
    for shape in SHAPES:
        x = _sample(shape, dtype)
        ours, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        theirs, their_state = bnb.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert torch.equal(state.absmax, their_state.absmax)
        assert_codes_match_bitsandbytes(x, blocksize, quant_type, ours, theirs)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_libraries_dequantize_each_others_states_identically(backend, bnb, quant_type,
                                                                   nested, dtype):
    for shape in SHAPES:
        for blocksize in (32, 64, 256):
            x = _sample(shape, dtype, seed=1)
            # bitsandbytes' state, dequantized by both
            theirs, their_state = bnb.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                                    compress_statistics=nested)
            expected = bnb_reference_dequantize(theirs, their_state).reshape(shape)
            assert torch.equal(F.dequantize_4bit(theirs, their_state).reshape(shape), expected)
            via_dict = F.QuantState.from_dict(their_state.as_dict(packed=True), "cpu")
            assert torch.equal(F.dequantize_4bit(theirs, via_dict), expected)
            # nf4lora's state, dequantized by both
            ours, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                          compress_statistics=nested)
            mine = F.dequantize_4bit(ours, state)
            assert mine.shape == shape and mine.dtype == dtype
            assert torch.equal(bnb_reference_dequantize(ours, state).reshape(shape), mine)
            their_view = bnb.QuantState.from_dict(state.as_dict(packed=True), torch.device("cpu"))
            assert torch.equal(bnb_reference_dequantize(ours, their_view).reshape(shape), mine)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32, torch.int8])
def test_quant_storage_holds_the_same_bytes(backend, bnb, quant_storage):
    x = _sample((64, 96), torch.bfloat16, seed=2)
    ours, state = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True,
                                  quant_storage=quant_storage)
    theirs, _ = bnb.quantize_4bit(x, quant_type="nf4", compress_statistics=True,
                                  quant_storage=quant_storage)
    assert ours.dtype == quant_storage and ours.shape == theirs.shape
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    assert torch.equal(F.dequantize_4bit(ours, state), bnb_reference_dequantize(ours, state))


def test_bitsandbytes_cpu_kernel_bug_blocks_spanning_rows_is_not_ours(backend, bnb):
    """A 64x96 weight has blocks of 64 that span rows. bitsandbytes 0.50.2's native CPU
    dequantize splits such blocks at the row end on AVX-512 CPUs (max error 2.2 on an AMD
    EPYC with AVX512-BF16; right on AVX2-only CPUs); its own reference formula and
    nf4lora follow the flat-block format. nf4lora is checked against the spec here,
    whatever bitsandbytes' kernel returns on this CPU."""
    x = _sample((64, 96), torch.float32, seed=5)
    packed, state = bnb.quantize_4bit(x, quant_type="nf4", blocksize=64)
    assert torch.equal(F.dequantize_4bit(packed, state), spec_dequantize(packed, state))
    assert torch.equal(F.dequantize_4bit(packed, state), bnb_reference_dequantize(packed, state))


def test_packed_state_dict_matches_bitsandbytes_key_for_key(backend, bnb):
    x = _sample((128, 80), torch.bfloat16, seed=3)
    _, state = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    _, their_state = bnb.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    ours, theirs = state.as_dict(packed=True), their_state.as_dict(packed=True)
    assert list(ours) == list(theirs)
    blob = "quant_state.bitsandbytes__nf4"
    assert torch.equal(ours[blob], theirs[blob])  # same JSON, byte for byte
    for key in ("quant_map", "nested_quant_map", "nested_absmax"):
        assert torch.equal(ours[key], theirs[key])


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_8bit_blockwise_matches_up_to_the_cpu_lookup_table(backend, bnb, blocksize):
    code = codebook.create_dynamic_map()
    x = _sample((3 * blocksize + 5,), torch.float32, seed=4)
    ours, state = F.quantize_blockwise(x, blocksize=blocksize)
    theirs, their_state = bnb.quantize_blockwise(x, code=code, blocksize=blocksize)
    assert torch.equal(state.absmax, their_state.absmax)
    differs = ours != theirs
    # bitsandbytes' CPU table has 2**16 bins over [-1, 1]: it can only pick the neighbour
    # of the exact code, and only within one bin (3.1e-5) of the midpoint between them.
    assert ((ours.long() - theirs.long()).abs()[differs] == 1).all()
    scaled = (x / state.absmax.repeat_interleave(blocksize)[: x.numel()])[differs]
    midpoint = (code[ours[differs].long()] + code[theirs[differs].long()]) / 2
    assert ((scaled - midpoint).abs() < 2.0 / 2**16).all()
    # bitsandbytes' 8-bit semantics, code[q] * absmax[block], on its own state
    expected = reference.dequantize_blockwise(theirs, their_state.absmax, their_state.code, blocksize)
    assert torch.equal(F.dequantize_blockwise(theirs, their_state), expected)


# Values that stress the encoder: zeros of both signs, subnormals, the extremes of
# each dtype, and values that scale to exactly a threshold (absmax 1 in the block).
_SPECIAL = [0.0, -0.0, 1e-45, -1e-40, 1e-30, 1.0, -1.0, 0.5, 0.0397901, -0.8480964, 65504.0, -3e38]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), n=st.integers(0, 300), dtype=st.sampled_from(DTYPES),
       blocksize=st.sampled_from([32, 64, 128]), quant_type=st.sampled_from(["nf4", "fp4"]),
       nested=st.booleans())
def test_property_matches_bitsandbytes(bnb, data, n, dtype, blocksize, quant_type, nested):
    finite_max = torch.finfo(dtype).max
    values = data.draw(st.lists(
        st.one_of(st.floats(-4.0, 4.0, width=32), st.sampled_from(_SPECIAL)), min_size=n, max_size=n))
    x = torch.tensor([v for v in values if abs(v) <= finite_max], dtype=torch.float32)
    x = x.to(dtype)
    if x.numel() and data.draw(st.booleans()):
        x[: min(blocksize, x.numel())] = 0  # an all-zero block
    if nested and x.float().abs().sum() > 1e37:  # the mean of block maxima may overflow
        nested = False
    ours, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                  compress_statistics=nested)
    theirs, their_state = bnb.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    assert ours.shape == theirs.shape
    assert_codes_match_bitsandbytes(x, blocksize, quant_type, ours, theirs)
    restored = F.dequantize_4bit(ours, state)
    assert restored.shape == x.shape and restored.dtype == dtype
    assert torch.equal(restored, bnb_reference_dequantize(ours, state).reshape(x.shape))
    if not nested and x.numel():
        # Decoding is within half the widest code gap of each block's scale.
        bound = state.absmax.repeat_interleave(blocksize)[: x.numel()] * (0.17 if quant_type == "fp4" else 0.16)
        assert ((restored.float() - x.float()).abs() <= bound * (1 + 1e-2) + 1e-30).all()
        assert math.isfinite(restored.float().abs().max().item())
