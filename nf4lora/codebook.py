"""The code books of the bitsandbytes 4-bit and 8-bit formats.

A 4-bit code is an index into a 16-entry table; an 8-bit code (used for the
double-quantized block constants) is an index into a 256-entry table. The tables
here are the ones bitsandbytes stores in checkpoints, value for value.
"""
from __future__ import annotations

import itertools

import torch

# NF4: the bitsandbytes table, hard-coded. Recomputing it from the normal quantiles
# in float32 lands 1 ulp away in 3 entries (bitsandbytes issue #1772), so the table,
# not the formula, is the format. `create_normal_map` below re-derives it as a check.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order; bit 3 is the sign.
# Written as multiples of 1/12 so the division below gives bitsandbytes' float32 values.
_FP4_TWELFTHS = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                 -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# bitsandbytes' FP4 encoder (kernels.cu dQuantizeFP4) compares |x| against these
# hand-rounded literals, a few ulp away from the true midpoints. They are part of the
# format as written by CUDA, so they are kept as literals, sorted ascending.
FP4_ABS_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667,
                      0.4166667, 0.583333, 0.8333333)
# The positive FP4 code for each interval between those thresholds, ascending magnitude:
# 0 -> 0b000, 1/192 -> 0b001, 1/6 -> 0b110, 1/4 -> 0b111, 1/3 -> 0b100, 1/2 -> 0b101,
# 2/3 -> 0b010, 1 -> 0b011.
FP4_CODE_BY_RANK = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)

QUANT_TYPES = ("nf4", "fp4")


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16-entry float32 table of a 4-bit type (bitsandbytes' name and signature)."""
    if typename == "nf4":
        values = torch.tensor(NF4_CODE, dtype=torch.float32)
    elif typename == "fp4":
        values = torch.tensor(_FP4_TWELFTHS, dtype=torch.float32) / 12.0
    else:
        raise ValueError(f"typename must be one of {QUANT_TYPES}, got {typename!r}")
    return values.to(device) if device is not None else values


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """Derive the NF4 table from normal quantiles (needs scipy).

    8 positive and 7 negative quantiles (one more positive so that 0 is exact and
    the table is asymmetric), zeros padded to 256 entries, sorted, scaled to [-1, 1].
    The result is within 1 ulp of `NF4_CODE` (tested); the format uses the table.
    """
    from scipy.stats import norm

    def positive_quantiles(count: int) -> list[float]:
        return norm.ppf(torch.linspace(offset, 0.5, count + 1)[:-1].numpy()).tolist()

    if use_extra_value:
        values = positive_quantiles(8) + [0.0] + [-v for v in positive_quantiles(7)]
    else:
        values = positive_quantiles(7) + [0.0] * 2 + [-v for v in positive_quantiles(7)]
    values += [0.0] * (256 - len(values))
    table = torch.tensor(values, dtype=torch.float32).sort().values
    return table / table.max()


def _pad_to_256(values: list[float]) -> list[float]:
    """Zeros appended up to 256 entries: bitsandbytes keeps every code book 256 long so a
    narrower type can reuse the 8-bit kernels (longer lists are left as they are)."""
    return values + [0.0] * (256 - len(values))


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic map: sorted float32, 256 entries (zero-padded below 8 bits;
    2**total_bits above, as bitsandbytes returns them).

    Exponent i (i = 0..max_exponent_bits-1) owns the midpoints of an evenly spaced
    grid on [0.1, 1], scaled by 10**(i - max_exponent_bits + 1); the grid has
    2**(fraction bits) intervals, and the fraction bits grow with i (an exponent
    with a negative count of fraction bits owns nothing). The bits left over when
    max_exponent_bits < total_bits - 1 add one more grid at the largest exponent.
    0 and 1.0 complete the table. The default (True, 7, 8) spans [-0.99297, 1].

    Argument combinations for which this does not give exactly 2**total_bits
    values (bitsandbytes asserts, or fails on an unbound variable) raise ValueError.
    """
    values: list[float] = []
    non_sign_bits = total_bits - 1

    def grid_midpoints(intervals: int, exponent: int) -> list[float]:
        if intervals < 1:
            return []
        # bitsandbytes scales the float32 midpoints in float32 arithmetic; doing it in
        # float64 and rounding once moves some entries by 1 ulp, so keep float32 here.
        grid = torch.linspace(0.1, 1, intervals + 1, dtype=torch.float32)
        midpoints = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (exponent - max_exponent_bits + 1)
        positive = (scale * midpoints).tolist()
        return positive + ((-scale) * midpoints).tolist() if signed else positive

    for exponent in range(max_exponent_bits):
        # Unsigned maps spend the sign bit on one more fraction bit.
        fraction_bits = exponent + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        values += grid_midpoints(2 ** fraction_bits if fraction_bits >= 0 else 0, exponent)
    leftover = non_sign_bits - max_exponent_bits
    if leftover > 0:
        if max_exponent_bits < 1:
            raise ValueError(f"create_dynamic_map: max_exponent_bits must be >= 1 when "
                             f"total_bits={total_bits}, got {max_exponent_bits}")
        values += grid_midpoints(2 ** leftover - 1, max_exponent_bits - 1)
    values += [0.0, 1.0]
    if len(values) != 2 ** total_bits:
        raise ValueError(f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, "
                         f"total_bits={total_bits}) gives {len(values)} values, not 2**total_bits; "
                         "choose max_exponent_bits so that the values fill the type")
    # Python's stable sort, as bitsandbytes sorts: it decides where -0.0 and 0.0 land.
    return torch.tensor(sorted(_pad_to_256(values)), dtype=torch.float32)


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """bitsandbytes' linear map: evenly spaced values on [-1, 1] (signed) or [0, 1].

    A signed map has 2**total_bits - 1 points, so that 0 is one of them, when add_zero is
    set or total_bits < 8; otherwise 2**total_bits. Below 256 points the zeros that pad
    the table go in the middle (after the first half of the points), not at the end, so
    the result is not sorted; that is bitsandbytes' layout, kept as is.
    """
    if not isinstance(total_bits, int) or total_bits < 0:
        raise ValueError(f"create_linear_map: total_bits must be a non-negative int, got {total_bits!r}")
    count = 2 ** total_bits
    if signed and (add_zero or total_bits < 8):
        count -= 1
    values = torch.linspace(-1.0 if signed else 0.0, 1.0, count, dtype=torch.float32)
    if count == 256:
        return values
    half = count // 2
    padded = values[:half].tolist() + [0.0] * (256 - count) + values[half:].tolist()
    return torch.tensor(padded, dtype=torch.float32)


def create_fp8_map(signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2,
                   total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' small-float map: every value of a (sign, exponent, mantissa) format
    with exponent bias 2**(exponent_bits-1), sorted, zero-padded to 256 below 8 bits and
    divided by its maximum. FP4 is create_fp8_map(True, 2, 1, 4), though the 4-bit code
    book both libraries store is the hard-coded table of get_4bit_type, which differs
    from this map in its smallest magnitude.

    The field widths must add up: exponent_bits + precision_bits + signed == total_bits
    (bitsandbytes asserts this); a signed format needs at least one exponent bit and no
    width may be negative (bitsandbytes fails on those too). Each is a ValueError here.
    """
    sign_bits = 1 if signed else 0
    if exponent_bits + precision_bits + sign_bits != total_bits:
        raise ValueError(f"create_fp8_map: exponent_bits + precision_bits + sign bit must equal "
                         f"total_bits, got {exponent_bits} + {precision_bits} + {sign_bits} != {total_bits}")
    if exponent_bits < sign_bits or precision_bits < 0:
        raise ValueError(f"create_fp8_map: needs exponent_bits >= {sign_bits} and precision_bits >= 0, "
                         f"got {exponent_bits} and {precision_bits}")
    bias = 2 ** (exponent_bits - 1)
    values: list[float] = []
    for exponent in range(2 ** exponent_bits):
        for mantissa_bits in itertools.product((0, 1), repeat=precision_bits):
            fraction = sum(bit * 2.0 ** -(i + 1) for i, bit in enumerate(mantissa_bits))
            if exponent == 0:  # subnormal: no implicit leading 1
                value = fraction * 2.0 ** -bias
            else:
                # bitsandbytes' formula: a larger exponent field is a smaller value
                # (not IEEE's order), which changes how far the subnormals sit below
                # the normals; kept, since these are the values bitsandbytes returns.
                value = (1 + fraction) * 2.0 ** -(exponent - bias - 1)
            values += [value, -value] if signed else [value]
    values.sort()
    if total_bits < 8:
        values = sorted(_pad_to_256(values))
    table = torch.tensor(values, dtype=torch.float32)
    return table / table.max()
