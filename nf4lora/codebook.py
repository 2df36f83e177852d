"""The code books of the 4-bit formats and of bitsandbytes' 8-bit maps: the one place
that knows their levels.

A 4-bit code is an index into a 16-entry table; an 8-bit code (used for the
double-quantized block constants) is an index into a 256-entry table. NF4 and FP4 are
the tables bitsandbytes stores in checkpoints, value for value. The other 4-bit formats
("code books", `CODEBOOK_FORMATS`, and any table passed as `code=`) share one rule:

  * the table holds 16 finite, strictly increasing float32 levels within [-1, 1] (values
    are scaled into [-1, 1] by their block's absmax first; a level beyond it is a table
    that was not normalized), and the code is the level's index. The levels need not
    reach -1 or 1: the block's absmax element then takes the outermost level, which is
    what the MSE-optimal tables do (fit_codebook: +-0.953 at blocksize 64 on Gaussian
    weights, 4.6% less error than pinning +-1 and 0);
  * a value x (already scaled by 1/absmax) gets the nearest level, ties to the lower
    level: the code is the number of float32 midpoints (levels[i] + levels[i+1]) / 2
    strictly below x. NF4 has always been encoded so here (bitsandbytes 0.50's CPU path
    does the same; its CUDA literals are those midpoints to within 1 float32 ulp), so NF4
    is this rule applied to the NF4 table. NaN (an all-zero block) gets code 0, as in
    bitsandbytes' CUDA kernel.

FP4 is the exception: its table is in bit-pattern order (bit 3 is the sign, +0 and -0 are
both codes) and its encoder uses CUDA's hand-rounded thresholds, so it keeps its own
encoder (reference.encode_fp4). Decoding is table[code] * absmax for every format.

Below the QuantState, a format is named by its *format key* (`format_key`): the quant
type for named formats, or "custom:" + the 16 levels' float32 bit patterns in hex for a
table given as data. The key is a plain string, so it crosses the torch.library op
schemas (a `str` argument) without a schema change, and `table(key)` rebuilds the exact
table from it. The C++ and CUDA kernels take a key's `kernel_codec`: its table, and one
encoder rule for every format (FP4's included), as data.
"""
from __future__ import annotations

import functools
import itertools
import math
import struct
import weakref
from typing import Iterable, NamedTuple, Sequence, Union

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

# The 4-bit types bitsandbytes itself reads and writes (its state-dict key names them).
QUANT_TYPES = ("nf4", "fp4")

# AF4, "AbnormalFloat" (D. Yoshida, "NF4 Isn't Information Theoretically Optimal (and that's
# Good)", arXiv:2306.06965, 2023): levels minimizing the mean absolute error of
# absmax-normalized Gaussian blocks. The paper tunes a table per blocksize; this is its
# blocksize-64 table (the one its code and bitsandbytes' get_4bit_type("af4") carry; bitsandbytes
# lists it in descending order, here it is ascending so that the code is the rank).
AF4_CODE = (
    -1.0, -0.69441008, -0.51243739, -0.3736951, -0.25607552, -0.14982478, -0.04934812, 0.0,
    0.04273164, 0.12934483, 0.21961274, 0.31675666, 0.42563882, 0.55496234, 0.72424863, 1.0,
)

# BOF4, "4-bit block-wise optimal float" (P. Blumenberg, T. Graave, T. Fingscheidt, "Improving
# Block-Wise LLM Quantization by 4-bit Block-Wise Optimal Float (BOF4): Analysis and
# Variations", arXiv:2505.06653, 2025): levels minimizing the MSE of the *weights* (not of
# the normalized values, as AF4 does for the absolute error) under blocksize-64 absmax
# normalization of Gaussian weights, by a Lloyd iteration. The paper's printed table was not
# available to this project offline, so these are nf4lora's reproduction of that definition
# with NF4's and AF4's structure kept (-1, 0 and 1 exact): fit_codebook(torch.randn(2**24)
# after torch.manual_seed(0), blocksize=64, pinned=(-1, 0, 1)); tests/test_codebooks.py
# re-derives them from other samples within 5e-3. Whether the paper pins these three levels
# is not known here: check against its table before quoting these numbers as the paper's.
# Unpinned, the Gaussian optimum (ends at +-0.953, no zero) has 4.6% less error on Gaussian
# data but clips real outliers: on MiniLM at blocksize 256 it dropped the embedding cosine
# to 0.91 (NF4: 0.97). BOF4-S (signed absmax normalization) is not offered: it needs a
# signed block scale, which the bitsandbytes format (an unsigned float32 absmax, or its
# 8-bit double quantization) cannot store.
BOF4_CODE = (
    -1.0, -0.753381073474884, -0.5791909694671631, -0.4385473430156708,
    -0.316720187664032, -0.2059674710035324, -0.10148855298757553, 0.0,
    0.08868586272001266, 0.17943768203258514, 0.2744189500808716, 0.37615036964416504,
    0.48878297209739685, 0.6187903881072998, 0.779052734375, 1.0,
)

# IQ4_NL (llama.cpp, ggml/src/ggml-common.h `kvalues_iq4nl`): int8 levels, normalized here
# by 127 so that the largest magnitude is exactly 1 (-127/127 = -1; the top level is
# 113/127 = 0.8898). llama.cpp fits each block's scale to these levels; here the block scale
# is bitsandbytes' absmax, so a positive absmax element lands on 0.8898 * absmax.
IQ4NL_INT8 = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# INT4: the two's-complement grid -8..7 divided by 8 (uniform steps of 1/8, an exact zero,
# every code used; the positive absmax element lands on 7/8). Chosen over -7..7 / 7, whose
# 15 levels leave one code unused (bitsandbytes' get_4bit_type("int4") is that table with
# both +0 and -0, which its kernels never read); the finer step gives a lower MSE on
# Gaussian-like blocks (step 1/8 vs 1/7: (7/8)**2 = 0.77 of the rounding error of the bulk).
INT4_INTEGERS = tuple(range(-8, 8))

# Named code-book formats (sorted tables, midpoint encoder), in the order analyze lists them.
CODEBOOK_FORMATS = ("af4", "bof4", "iq4nl", "int4")
NAMED_FORMATS = QUANT_TYPES + CODEBOOK_FORMATS
# A table passed as data (`code=`): its QuantState's quant_type, and its format key's prefix.
CUSTOM = "custom"
FORMATS = NAMED_FORMATS + (CUSTOM,)
_CUSTOM_KEY_PREFIX = CUSTOM + ":"


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16-entry float32 table of a named 4-bit format (bitsandbytes' name and signature),
    indexed by code: "nf4", "fp4" (bit-pattern order), "af4", "bof4", "iq4nl", "int4"
    (ascending). `blocksize` is accepted for bitsandbytes' signature; every table here is
    the same for all blocksizes (AF4's is its blocksize-64 table)."""
    if typename == "nf4":
        values = torch.tensor(NF4_CODE, dtype=torch.float32)
    elif typename == "fp4":
        values = torch.tensor(_FP4_TWELFTHS, dtype=torch.float32) / 12.0
    elif typename == "af4":
        values = torch.tensor(AF4_CODE, dtype=torch.float32)
    elif typename == "bof4":
        values = torch.tensor(BOF4_CODE, dtype=torch.float32)
    elif typename == "iq4nl":
        values = torch.tensor(IQ4NL_INT8, dtype=torch.float32) / 127.0
    elif typename == "int4":
        values = torch.tensor(INT4_INTEGERS, dtype=torch.float32) / 8.0
    else:
        raise ValueError(f"typename must be one of {NAMED_FORMATS}, got {typename!r}")
    return values.to(device) if device is not None else values


# --- code books as data --------------------------------------------------------------------

def check_code(code, name: str = "code") -> torch.Tensor:
    """`code` as a float32 CPU tensor [16] if it is a usable code book (see the module
    docstring), else a ValueError that says what is wrong and how to fix it."""
    if isinstance(code, torch.Tensor):
        values = code.detach().to("cpu", torch.float32).reshape(-1)
    else:
        try:
            values = torch.tensor(code, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{name} must be 16 numbers (a tensor or a sequence), got "
                             f"{type(code).__name__}: {error}") from None
    if values.numel() != 16:
        raise ValueError(f"{name} must have 16 levels (one per 4-bit code), got {values.numel()}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} must be finite, got {values.tolist()}")
    ordered = values.sort().values
    if (ordered[1:] == ordered[:-1]).any():
        repeated = sorted({v for v, w in zip(ordered[1:].tolist(), ordered[:-1].tolist()) if v == w})
        hint = (" (FP4's table holds +0 and -0 in bit-pattern order: use quant_type='fp4')"
                if repeated == [0.0] else "")
        raise ValueError(f"{name} levels must be distinct, {repeated} repeats{hint}")
    if not torch.equal(values, ordered):
        raise ValueError(f"{name} levels must be sorted ascending (the code is the level's rank): "
                         f"sort it, e.g. torch.sort(code).values; got {values.tolist()}")
    largest = values.abs().max().item()
    if largest > 1.0:
        raise ValueError(f"{name} levels must lie within [-1, 1] (values are scaled by their "
                         f"block's absmax first), got max |level| = {largest}: normalize the "
                         f"table, e.g. code / {largest}")
    return values


def _custom_key(values: torch.Tensor) -> str:
    bits = struct.pack("<16f", *values.tolist())
    return _CUSTOM_KEY_PREFIX + bits.hex()


# Custom keys already built, by the code tensor's id: (a weak reference to it, its version
# counter then, the key). Every op call on a custom-format weight asks for its key
# (PackedWeight.from_state); checking and encoding the table each time cost ~55 us, ~7%
# of a 4096x4096 M = 1 matmul. An in-place write to the table bumps its version.
_CUSTOM_KEYS: dict[int, tuple] = {}


def format_key(quant_type: str, code=None, name: str = "quant_state.code") -> str:
    """The format key of a QuantState's (quant_type, code): the name of a named format (its
    table is fixed, `code` is not read), or for quant_type "custom" the checked `code`
    (called `name` in errors) encoded exactly; that reads its 16 values (a device sync
    when they are on a GPU) the first time for each table tensor and version."""
    if quant_type in NAMED_FORMATS:
        return quant_type
    if quant_type != CUSTOM:
        raise ValueError(f"quant_type must be one of {FORMATS}, got {quant_type!r}")
    if code is None:
        raise ValueError(f"a {CUSTOM!r} quant_type needs its code book ({name})")
    if not isinstance(code, torch.Tensor) or torch.compiler.is_compiling():
        return _custom_key(check_code(code, name))
    cached = _CUSTOM_KEYS.get(id(code))
    if cached is not None and cached[0]() is code and cached[1] == code._version:
        return cached[2]
    key = _custom_key(check_code(code, name))
    if cached is None or cached[0]() is not code:     # a new tensor: forget it when it dies
        weakref.finalize(code, _CUSTOM_KEYS.pop, id(code), None)
    _CUSTOM_KEYS[id(code)] = (weakref.ref(code), code._version, key)
    return key


def is_format_key(key) -> bool:
    """Whether `key` names a 4-bit format (a named format or a well-formed custom key)."""
    if key in NAMED_FORMATS:
        return True
    if not isinstance(key, str) or not key.startswith(_CUSTOM_KEY_PREFIX):
        return False
    digits = key[len(_CUSTOM_KEY_PREFIX):]
    return len(digits) == 128 and all(c in "0123456789abcdef" for c in digits)


def table(key: str, device=None) -> torch.Tensor:
    """The float32 [16] table of a format key, indexed by code (bit-exact for custom keys)."""
    if key in NAMED_FORMATS:
        return get_4bit_type(key, device)
    if not is_format_key(key):
        raise ValueError(f"quant_type must be one of {NAMED_FORMATS} or a custom code-book key, "
                         f"got {key!r}")
    values = struct.unpack("<16f", bytes.fromhex(key[len(_CUSTOM_KEY_PREFIX):]))
    return torch.tensor(values, dtype=torch.float32, device=device)


# --- a format as the native kernels take it -----------------------------------------------

class KernelCodec(NamedTuple):
    """A 4-bit format as the C++ CPU and CUDA kernels take it (csrc/nf4_codec.h CodeTable and
    CodeEncoder): data only, so one kernel serves every format, NF4 and FP4 included."""
    levels: tuple       # 16 floats (float32 values): code c decodes to levels[c] * absmax
    thresholds: tuple   # 15 ascending floats: a scaled x has count = #(thresholds < x)
    codes: tuple        # 16 ints: the code of each count (NaN gets code 0 whatever its count)


@functools.lru_cache(maxsize=256)
def kernel_codec(key: str) -> KernelCodec:
    """The kernels' decoder and encoder of format `key` (a format key): decoding is
    `table(key)`, and encoding by (thresholds, codes) gives `reference.encode(x, key)` bit
    for bit (tests/test_native_codebooks.py checks it on every threshold and its neighbours).

    A table of ascending levels (every format but FP4): the thresholds are its float32
    midpoints (`reference.midpoints`) and the code is the count: `reference.encode_sorted`.

    FP4 (`reference.encode_fp4`: the sign bit for x < 0, the magnitude from the rank of |x|,
    the number of the 7 CUDA thresholds t strictly below |x|) becomes 15 thresholds on x:

        next_down(-t[6]) < ... < next_down(-t[0]) < -2**-149 < t[0] < ... < t[6]

    * x >= 0, -0.0 included: above the first 8 (-2**-149 is the negative float nearest zero),
      so count = 8 + #(t < x) = 8 + rank, code by_rank[rank];
    * x < 0, at most -2**-149: x > next_down(-t[i]) exactly when x >= -t[i], i.e. t[i] >= |x|,
      so count = #(t >= |x|) = 7 - rank, ties on |x| keeping the lower magnitude as |x| > t
      does; code 0b1000 | by_rank[rank].
    NaN is above none (count 0); the kernels give it code 0 explicitly, as encode_fp4 does.
    """
    levels = table(key)
    if key != "fp4":
        from .reference import midpoints      # the spec's own midpoints (no import cycle)
        return KernelCodec(tuple(levels.tolist()), tuple(midpoints(levels).tolist()),
                           tuple(range(16)))
    t = torch.tensor(FP4_ABS_THRESHOLDS, dtype=torch.float32)
    below_negated = torch.nextafter(-t.flip(0), torch.tensor(-math.inf))
    negative_nearest_zero = torch.tensor([-2.0 ** -149], dtype=torch.float32)
    thresholds = torch.cat([below_negated, negative_nearest_zero, t])
    codes = [0b1000 | FP4_CODE_BY_RANK[7 - count] for count in range(8)] + list(FP4_CODE_BY_RANK)
    return KernelCodec(tuple(levels.tolist()), tuple(thresholds.tolist()), tuple(codes))


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


# --- fitting a code book to weights ----------------------------------------------------------

def fit_codebook(tensors: Union[torch.Tensor, Iterable[torch.Tensor]], blocksize: int = 64, *,
                 pinned: Sequence[float] = (), max_iter: int = 1000, tol: float = 1e-7) -> torch.Tensor:
    """16 sorted levels that minimize the squared error of `tensors` quantized blockwise with
    them (Lloyd-Max / weighted k-means on absmax-normalized blocks; the any4 and BOF4 idea).

    Each tensor is split into blocks of `blocksize` as quantize_4bit splits it and scaled by
    its blocks' 1/absmax exactly as the quantizer does (float32). The error of a weight
    w = absmax * x quantized to level q is absmax**2 * (x - q)**2, so the iteration is
    k-means on the normalized values x weighted by absmax**2:
      assign  every x to its nearest level, ties to the lower (the quantizer's float32
              midpoint rule);
      update  every level to the absmax**2-weighted mean of the x assigned to it (a level
              that gets no value, or is pinned, keeps its place);
    until no level moves by more than `tol` or after `max_iter` rounds. Each round costs
    microseconds: the values are sorted once, so a cell's sums are two prefix-sum lookups.

    It starts from the NF4 levels, so the result is deterministic, and no round raises the
    error: the result is never worse than NF4 on these tensors (nor than NF4 with the pinned
    levels moved in). `pinned`: values in [-1, 1] kept exactly as levels, each replacing the
    NF4 level nearest to it; (-1, 0, 1) keeps NF4's structure (the blocks' absmax elements
    and zeros exact). Unpinned, the outermost levels settle inside [-1, 1] (about +-0.95 at
    blocksize 64 on Gaussian weights) and no level sits at 0: the lowest squared error, but
    outliers are clipped, which can cost more in a model's output than the error suggests
    (README, Quantization lab). Double quantization of the block constants is not modelled.
    Returns float32 [16], a valid `code=` for quantize_4bit.
    """
    from .reference import _scale_blocks      # the quantizer's own scaling (no import cycle)

    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    levels = torch.tensor(NF4_CODE, dtype=torch.float64)
    fixed = torch.zeros(16, dtype=torch.bool)
    for value in pinned:
        if not (isinstance(value, (int, float)) and -1.0 <= value <= 1.0):
            raise ValueError(f"pinned levels must be numbers within [-1, 1], got {value!r}")
        index = int((levels - value).abs().argmin())
        if fixed[index]:
            raise ValueError(f"pinned levels {list(pinned)} are too close together: two of them "
                             f"replace the same NF4 level {NF4_CODE[index]}")
        levels[index], fixed[index] = value, True
    if not bool((levels[1:] > levels[:-1]).all()):
        raise ValueError(f"pinned levels {list(pinned)} do not fit between the NF4 levels in order")

    normalized, weights = [], []
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"tensors[{index}] must be a float tensor, got {got}")
        n = tensor.numel()
        if n == 0:
            continue
        absmax, scaled = _scale_blocks(tensor.detach().to("cpu", torch.float32), blocksize)
        if not torch.isfinite(absmax).all():
            raise ValueError(f"tensors[{index}] contains NaN or Inf")
        x = scaled.reshape(-1)[:n]                       # the padding is not a weight
        w = (absmax.double() ** 2).repeat_interleave(blocksize)[:n]
        keep = w > 0                                     # all-zero blocks: no error to fit
        normalized.append(x[keep])
        weights.append(w[keep])
    if sum(x.numel() for x in normalized) == 0:
        raise ValueError("fit_codebook needs at least one non-zero weight")
    x, order = torch.cat(normalized).sort()
    w = torch.cat(weights)[order]
    zero_one = torch.zeros(1, dtype=torch.float64)
    cum_w = torch.cat([zero_one, w.cumsum(0)])
    cum_wx = torch.cat([zero_one, (w * x.double()).cumsum(0)])

    for _ in range(max_iter):
        midpoints = ((levels[:-1] + levels[1:]) / 2).float()
        # values <= a midpoint belong to the cell below it (ties to the lower level)
        edges = torch.cat([torch.zeros(1, dtype=torch.long),
                           torch.searchsorted(x, midpoints, right=True),
                           torch.tensor([x.numel()])])
        mass = cum_w[edges[1:]] - cum_w[edges[:-1]]
        centroids = (cum_wx[edges[1:]] - cum_wx[edges[:-1]]) / mass.clamp_min(1e-300)
        updated = torch.where(fixed | (mass == 0), levels, centroids)
        moved = (updated - levels).abs().max().item()
        levels = updated
        if moved < tol:
            break
    return check_code(levels.float(), "fit_codebook's result")
