"""The code books of the bitsandbytes 4-bit and 8-bit formats.

A 4-bit code is an index into a 16-entry table; an 8-bit code (used for the
double-quantized block constants) is an index into a 256-entry table. The tables
here are the ones bitsandbytes stores in checkpoints, value for value.
"""
from __future__ import annotations

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


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map: 256 sorted float32 values in [-0.99297, 1].

    Exponent i (i = 0..max_exponent_bits-1) owns the midpoints of an evenly spaced
    grid of 2**(free bits)+1 points on [0.1, 1], scaled by 10**(i - max_exponent_bits
    + 1); the free bits shrink as the exponent grows. 0 and 1.0 complete the table.
    """
    values: list[float] = []
    # One bit is set aside for the sign even when unsigned; there it adds a fraction bit.
    non_sign_bits = total_bits - 1
    linear_items = 2 ** (non_sign_bits - max_exponent_bits) - 1

    def grid_midpoints(count: int, exponent: int) -> list[float]:
        # bitsandbytes scales the float32 midpoints in float32 arithmetic; doing it in
        # float64 and rounding once moves some entries by 1 ulp, so keep float32 here.
        grid = torch.linspace(0.1, 1, count, dtype=torch.float32)
        scaled = (10 ** (exponent - max_exponent_bits + 1)) * ((grid[:-1] + grid[1:]) / 2.0)
        return scaled.tolist() + ((-scaled).tolist() if signed else [])

    for exponent in range(max_exponent_bits):
        fraction_bits = exponent + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        values += grid_midpoints(2 ** fraction_bits + 1, exponent)
    if linear_items > 0:
        values += grid_midpoints(linear_items + 1, max_exponent_bits - 1)
    values += [0.0, 1.0]
    assert len(values) <= 2 ** total_bits
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(values, dtype=torch.float32).sort().values
