"""The code books equal bitsandbytes' value for value."""
import pytest
import torch

from nf4lora import codebook, reference


def test_4bit_tables_equal_bitsandbytes(bnb):
    for name in codebook.QUANT_TYPES:
        assert torch.equal(codebook.get_4bit_type(name), bnb.get_4bit_type(name, device="cpu"))


def test_normal_map_rederives_nf4_within_one_ulp():
    derived = codebook.create_normal_map()
    nonzero = torch.cat([derived[:7], derived[7:8], derived[-8:]])  # 7 negative, 0, 8 positive
    table = codebook.get_4bit_type("nf4")
    ulp = torch.nextafter(table.abs(), torch.tensor(float("inf"))) - table.abs()
    assert ((nonzero - table).abs() <= ulp).all()
    assert derived.shape == (256,) and (derived == 0).sum() == 256 - 15


def test_normal_map_equals_bitsandbytes(bnb):
    for extra in (True, False):
        assert torch.equal(codebook.create_normal_map(use_extra_value=extra),
                           bnb.create_normal_map(use_extra_value=extra))


@pytest.mark.parametrize("args", [(True, 7, 8), (False, 7, 8), (True, 4, 8), (True, 5, 8)])
def test_dynamic_map_equals_bitsandbytes(bnb, args):
    ours = codebook.create_dynamic_map(*args)
    assert ours.shape == (256,) and torch.equal(ours, bnb.create_dynamic_map(*args))


def _bnb_or_error(builder, *args):
    """bitsandbytes' table, or None where bitsandbytes refuses the arguments (an assert,
    or an accidental TypeError/UnboundLocalError on a degenerate width)."""
    try:
        return builder(*args)
    except (AssertionError, TypeError, ValueError, NameError):
        return None


def _same_bits(ours, theirs):
    """Equal bit for bit: also tells -0.0 from 0.0 (where the sort put them) and NaN."""
    return (ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
            and torch.equal(ours.view(torch.int32), theirs.view(torch.int32)))


def _check_against(builder, ours_builder, args):
    theirs = _bnb_or_error(builder, *args)
    if theirs is None:
        with pytest.raises(ValueError, match=ours_builder.__name__):
            ours_builder(*args)
        return False
    ours = ours_builder(*args)
    assert _same_bits(ours, theirs), args
    return True


def test_dynamic_map_equals_bitsandbytes_over_every_width(bnb):
    # Every (signed, max_exponent_bits, total_bits) with widths up to 9 bits, including
    # max_exponent_bits >= total_bits (which raised TypeError) and the narrow widths
    # bitsandbytes zero-pads to 256 entries.
    built = 0
    for signed in (True, False):
        for total_bits in range(0, 10):
            for max_exponent_bits in range(-1, total_bits + 3):
                built += _check_against(bnb.create_dynamic_map, codebook.create_dynamic_map,
                                        (signed, max_exponent_bits, total_bits))
    assert built >= 70  # the comparison ran on many valid widths, not only on refusals
    assert codebook.create_dynamic_map(True, 5, 5).shape == (256,)
    assert codebook.create_dynamic_map(True, 8, 8).shape == (256,)


def test_linear_map_equals_bitsandbytes(bnb):
    for signed in (True, False):
        for add_zero in (True, False):
            for total_bits in range(0, 10):
                assert _check_against(bnb.create_linear_map, codebook.create_linear_map,
                                      (signed, total_bits, add_zero))
    with pytest.raises(ValueError, match="total_bits"):
        codebook.create_linear_map(True, -1)


def test_fp8_map_equals_bitsandbytes(bnb):
    built = 0
    for signed in (True, False):
        for total_bits in range(0, 10):
            for exponent_bits in range(-1, total_bits + 2):
                for precision_bits in range(-1, total_bits + 2):
                    built += _check_against(bnb.create_fp8_map, codebook.create_fp8_map,
                                            (signed, exponent_bits, precision_bits, total_bits))
    assert built > 80
    # The widths must add up, as bitsandbytes asserts; the message says which.
    with pytest.raises(ValueError, match="must equal total_bits"):
        codebook.create_fp8_map(True, 4, 4, 8)


def test_map_builders_are_exported_from_functional():
    import nf4lora.functional as F
    for name in ("create_linear_map", "create_fp8_map", "create_dynamic_map"):
        assert name in F.__all__ and getattr(F, name) is getattr(codebook, name)
    assert torch.equal(F.create_fp8_map(True, 4, 3, 8)[[0, -1]], torch.tensor([-1.0, 1.0]))


def test_dynamic_map_range():
    table = codebook.create_dynamic_map()
    assert table[-1] == 1.0 and abs(table[0].item() + 0.99297) < 1e-5
    assert (table[1:] >= table[:-1]).all()


def test_nf4_thresholds_are_the_cuda_literals():
    # The literals of bitsandbytes' CUDA decision tree (kernels.cu dQuantizeNF4).
    literals = torch.tensor([-0.8480964, -0.6106329, -0.4599953, -0.3396794, -0.2346074,
                             -0.1379117, -0.0455250, 0.0397901, 0.1202553, 0.2035213,
                             0.2920138, 0.3893125, 0.5016634, 0.6427869, 0.8614784])
    assert (reference.nf4_thresholds() - literals).abs().max() < 1e-7


def test_fp4_thresholds_sit_between_the_magnitudes():
    table = codebook.get_4bit_type("fp4")
    magnitudes = table[list(codebook.FP4_CODE_BY_RANK)]
    assert (magnitudes[1:] > magnitudes[:-1]).all()  # ranks are ascending magnitudes
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    thresholds = torch.tensor(codebook.FP4_ABS_THRESHOLDS)
    assert (thresholds - midpoints).abs().max() < 1e-6  # hand-rounded, a few ulp off


def test_unknown_type_is_rejected():
    with pytest.raises(ValueError, match=r"typename must be one of \('nf4', 'fp4', 'af4'"):
        codebook.get_4bit_type("int8")
