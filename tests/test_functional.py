"""The bitsandbytes-named API: shapes, defaults, out=, odd sizes, and bad input."""
import pytest
import torch

import nf4lora.functional as F
from nf4lora import reference
from nf4lora._weight import packed_numel

from conftest import DTYPES


@pytest.mark.parametrize("shape", [(0,), (0, 7), (1,), (1, 1), (3,), (2, 3, 65), ()])
@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_shapes_round_trip(backend, shape, dtype):
    x = torch.randn(shape).to(dtype)
    packed, state = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    n = x.numel()
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    assert state.absmax.shape == ((n + 63) // 64,) and state.shape == x.shape
    restored = F.dequantize_4bit(packed, state)
    assert restored.shape == x.shape and restored.dtype == dtype
    expected = reference.dequantize_4bit(*reference.quantize_4bit(x, 64, "nf4"), 64, "nf4", x.shape, dtype)
    if n <= 64:  # one block: the nested absmax decodes exactly (code 0 * 0 + offset)
        assert torch.equal(restored, expected)


def test_defaults_are_bitsandbytes_defaults():
    x = torch.randn(256)
    packed, state = F.quantize_4bit(x)
    assert state.quant_type == "fp4" and state.blocksize == 64 and not state.nested
    codes, state8 = F.quantize_blockwise(x)
    assert state8.blocksize == 4096 and codes.dtype == torch.uint8 and codes.shape == x.shape
    assert F.dequantize_blockwise(codes, state8).shape == x.shape


def test_nf4_and_fp4_wrappers_fix_the_type():
    x = torch.randn(100)
    for quantize, dequantize, name in ((F.quantize_nf4, F.dequantize_nf4, "nf4"),
                                       (F.quantize_fp4, F.dequantize_fp4, "fp4")):
        packed, state = quantize(x, blocksize=32)
        assert state.quant_type == name and state.blocksize == 32
        assert torch.equal(dequantize(packed, state), F.dequantize_4bit(packed, state))


def test_out_parameters_receive_the_result(backend):
    x = torch.randn(10, 33, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    out = torch.empty(10, 33, dtype=torch.float32)
    returned = F.dequantize_4bit(packed, state, out=out)
    assert returned.data_ptr() == out.data_ptr()
    # out's dtype wins: one rounding from float32 to it, not via the state's bfloat16.
    state.dtype = torch.float32
    assert torch.equal(out, F.dequantize_4bit(packed, state))
    # Without a state: absmax and out say everything (bitsandbytes' form).
    packed, state = F.quantize_4bit(x, quant_type="nf4")
    out = torch.empty(10, 33, dtype=torch.bfloat16)
    F.dequantize_4bit(packed, absmax=state.absmax, out=out, quant_type="nf4")
    assert torch.equal(out, F.dequantize_4bit(packed, state))


def test_transposed_packed_weight_comes_back_transposed():
    w = torch.randn(6, 10)
    packed, state = F.quantize_4bit(w, quant_type="nf4")
    assert torch.equal(F.dequantize_4bit(packed.t(), state), F.dequantize_4bit(packed, state).t())


def test_all_zero_block_encodes_as_cuda_does(backend):
    x = torch.zeros(128)
    x[64:] = torch.randn(64)
    packed, state = F.quantize_4bit(x, quant_type="nf4")
    # 0 * (1/0) is NaN, which the CUDA decision tree sends to code 0 (bitsandbytes' CPU: 7).
    assert (packed[:32] == 0).all() and state.absmax[0] == 0
    restored = F.dequantize_4bit(packed, state)
    assert (restored[:64] == 0).all()


def test_negative_zero_and_subnormals_survive(backend):
    x = torch.tensor([-0.0, 0.0, 1e-45, -1e-45, 1e-39, 1.0])
    restored = F.dequantize_4bit(*F.quantize_4bit(x, quant_type="nf4"))
    assert restored[5] == 1.0 and (restored[:5].abs() < 1e-30).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_names_the_first_bad_block(backend, bad):
    x = torch.randn(1000)
    x[200] = bad
    x[900] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf: first in block 3 \(flat elements 192..255\); 2 bad"):
        F.quantize_4bit(x, quant_type="nf4")
    with pytest.raises(ValueError, match="block 0"):
        F.quantize_blockwise(x, blocksize=4096)


def test_huge_block_maxima_refuse_double_quantization():
    x = torch.full((256,), 3e38)
    with pytest.raises(ValueError, match="overflows"):
        F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    F.quantize_4bit(x, quant_type="nf4")  # fine without it


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocksize=48), r"blocksize must be one of \(32, 64"),
    (dict(blocksize=8192), "blocksize must be one of"),
    (dict(quant_type="int8"), r"quant_type must be one of \('nf4', 'fp4', 'af4', 'bof4', 'iq4nl', "
                               r"'int4'\) \(or code= a 16-level code book\), got 'int8'"),
])
def test_bad_arguments_name_the_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.quantize_4bit(torch.randn(64), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.bool])
def test_unsupported_input_dtype(dtype):
    with pytest.raises(ValueError, match=r"A must be one of .*got torch\."):
        F.quantize_4bit(torch.zeros(64, dtype=dtype))


def test_non_tensor_input():
    with pytest.raises(TypeError, match="A must be a tensor"):
        F.quantize_4bit([1.0, 2.0])


def test_quant_storage_must_be_a_dtype():
    with pytest.raises(TypeError, match="quant_storage"):
        F.quantize_4bit(torch.randn(64), quant_storage="bf16")


def test_mismatched_state_is_a_clear_error():
    packed, state = F.quantize_4bit(torch.randn(256), quant_type="nf4")
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="absmax must have 4 elements, got 3"):
        F.dequantize_4bit(packed, state)
    packed, state = F.quantize_4bit(torch.randn(256), quant_type="nf4")
    with pytest.raises(ValueError, match="fewer than the 128"):
        F.dequantize_4bit(packed[:100], state)
    state.dtype = torch.int8
    with pytest.raises(ValueError, match="quant_state.dtype"):
        F.dequantize_4bit(packed, state)
    with pytest.raises(ValueError, match="needs quant_state, or both absmax and out"):
        F.dequantize_4bit(packed)
    with pytest.raises(TypeError, match="quant_state must be a QuantState"):
        F.dequantize_4bit(packed, {"absmax": 1})


def test_nested_state_with_wrong_code_size_is_rejected():
    packed, state = F.quantize_4bit(torch.randn(256), quant_type="nf4", compress_statistics=True)
    state.state2.code = state.state2.code[:128]
    with pytest.raises(ValueError, match="nested_code must have 256 elements"):
        F.dequantize_4bit(packed, state)


def test_gemv_4bit_is_x_times_w_transposed():
    w = torch.randn(24, 64)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    x = torch.randn(1, 64)
    expected = x @ F.dequantize_4bit(packed, state).t()
    torch.testing.assert_close(F.gemv_4bit(x, packed.t(), state=state), expected, rtol=0, atol=0)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 9), (3, 64), (1,)])
def test_packed_codes_must_match_the_state_exactly(quant_storage, shape):
    x = torch.randn(shape)
    packed, state = F.quantize_4bit(x, quant_type="nf4", quant_storage=quant_storage)
    expected = F.dequantize_4bit(packed, state)
    # The exact count works in every layout, including bitsandbytes' transposed [1, k].
    assert torch.equal(F.dequantize_4bit(packed.reshape(-1), state), expected)
    if packed.shape[0] > 1:
        assert torch.equal(F.dequantize_4bit(packed.t(), state).t(), expected)
    # One element more: the state describes a smaller tensor than these bytes hold.
    longer = torch.cat([packed, packed[:1]])
    for dequantize in (F.dequantize_4bit, F.dequantize_nf4):
        with pytest.raises(ValueError, match=f"A holds {packed.numel() + 1} elements of "
                                             f".*more than the {packed.numel()}"):
            dequantize(longer, state)
    with pytest.raises(ValueError, match="more than the"):
        F.dequantize_4bit(longer.t(), state)
    with pytest.raises(ValueError, match="more than the"):
        F.dequantize_4bit(longer, state, out=torch.empty(shape))
    with pytest.raises(ValueError, match="fewer than the"):
        F.dequantize_4bit(packed[:-1], state)


def test_fp4_wrapper_rejects_extra_packed_bytes_too():
    packed, state = F.quantize_fp4(torch.randn(5, 13))
    with pytest.raises(ValueError, match="more than the 33 that the 33 bytes"):
        F.dequantize_fp4(torch.cat([packed, packed[:2]]), state)


def test_packed_numel_rounds_bytes_up_to_whole_storage_elements():
    # 63 codes -> 32 bytes: 32 uint8, 16 bfloat16, 8 float32; 65 codes -> 33 bytes.
    assert [packed_numel((7, 9), d) for d in (torch.uint8, torch.bfloat16, torch.float32)] == [32, 16, 8]
    assert [packed_numel((65,), d) for d in (torch.uint8, torch.bfloat16, torch.float32)] == [33, 17, 9]
    assert packed_numel((0, 5), torch.float32) == 0
    for dtype in (torch.bfloat16, torch.float32, torch.int8):
        packed, _ = F.quantize_4bit(torch.randn(65), quant_storage=dtype)
        assert packed.numel() == packed_numel((65,), dtype)


# A (5, 130) weight: 650 elements, 11 blocks of 64, one nested block of 256.
@pytest.mark.parametrize("nested, corrupt, match", [
    (False, lambda s: setattr(s, "absmax", s.absmax[:-1]), "absmax must have 11 elements, got 10"),
    (False, lambda s: setattr(s, "absmax", torch.cat([s.absmax, s.absmax[:1]])),
     "absmax must have 11 elements, got 12"),
    (False, lambda s: setattr(s, "absmax", s.absmax.half()), "absmax must be torch.float32, got torch.float16"),
    (True, lambda s: setattr(s, "absmax", s.absmax.float()),
     r"absmax \(8-bit codes when nested\) must be torch.uint8, got torch.float32"),
    (True, lambda s: setattr(s, "absmax", s.absmax[:-1]), "must have 11 elements, got 10"),
    (True, lambda s: setattr(s.state2, "absmax", torch.cat([s.state2.absmax] * 2)),
     "nested_absmax must have 1 elements, got 2"),
    (True, lambda s: setattr(s.state2, "code", s.state2.code[:16]), "nested_code must have 256 elements"),
    (False, lambda s: setattr(s, "code", F.create_dynamic_map()),
     "quant_state.code must be the 16-entry nf4 table, got 256 entries"),
    (True, lambda s: setattr(s, "code", s.code[:8]), "16-entry nf4 table, got 8 entries"),
    (True, lambda s: setattr(s, "offset", None), "quant_state.offset is None"),
])
def test_state_mismatches_name_the_field(nested, corrupt, match):
    packed, state = F.quantize_4bit(torch.randn(5, 130), quant_type="nf4", compress_statistics=nested)
    corrupt(state)
    with pytest.raises(ValueError, match=match):
        F.dequantize_4bit(packed, state)


def test_has_avx512bf16_agrees_with_proc_cpuinfo():
    answer = F.has_avx512bf16()
    assert isinstance(answer, bool)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags (not Linux)")
    from nf4lora import backends
    if backends.availability("cpu") is not None:
        assert answer is False  # no native path to use it, as bitsandbytes without its library
    else:
        # The extension's probe also wants AVX512F/BW, which every AVX512-BF16 CPU has.
        assert answer == all(f in flags for f in ("avx512_bf16", "avx512f", "avx512bw"))
