"""The cpu backend's matmul ops: the fused small-M kernel (`_C.lora_gemv_4bit`) and the
dequantize+gemm path for large M, against float64 math on the dequantized weight.

Tolerances as in test_autograd.py: the same product is also computed with plain torch
ops in the same dtype (W dequantized to that dtype, F.linear); nf4lora's error against
float64 must stay within twice that baseline's error plus one ulp of the output scale.
Every SIMD path this CPU supports runs (NF4LORA_CPU_ISA). Determinism: identical bytes
for 1 and 2 threads, across runs, and from concurrent Python threads.
"""
from __future__ import annotations

import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import nf4lora.functional as nf
from nf4lora import _ops
from nf4lora._weight import PackedWeight
from nf4lora.codebook import NAMED_FORMATS
from nf4lora.backends import cpu as cpu_backend

from conftest import DTYPES, interleaved_copy

pytestmark = pytest.mark.skipif(cpu_backend.availability() is not None,
                                reason=str(cpu_backend.availability()))

ISAS = cpu_backend._C.supported_isas() if cpu_backend._C is not None else []


@pytest.fixture(params=["scalar", "avx2", "avx512", "avx512bf16"])
def isa(request, monkeypatch):
    if request.param not in ISAS:
        pytest.skip(f"this CPU cannot run the {request.param} path")
    monkeypatch.setenv("NF4LORA_CPU_ISA", request.param)
    return request.param


@pytest.fixture(params=["integer", "float"])
def sums(request, monkeypatch):
    """The fused kernel's two decoder families (NF4LORA_CPU_GEMV): int16 levels with exact
    int32 sums per group of 64 (16-bit x on avx2/avx512/avx512bf16), and float weights."""
    monkeypatch.setenv("NF4LORA_CPU_GEMV", request.param)
    return request.param


LAYOUT = "rows"  # how run_op hands the weight to the kernels (the `layout` fixture)


@pytest.fixture(params=["rows", "interleaved"])
def layout(request, monkeypatch):
    """The weight as the fused kernel reads it: its bitsandbytes-layout bytes alone, or with
    an interleaved copy beside them (csrc/weight.h), which the dispatcher reads where the
    ISA has that kernel (AVX-512) and the call takes integer sums, and ignores elsewhere."""
    monkeypatch.setattr(sys.modules[__name__], "LAYOUT", request.param)
    return request.param


def with_interleaved_copy(weight):
    """The weight with an interleaved copy, built whatever the active ISA (an ISA without
    the kernel must ignore it), where the layout allows one (K and blocksize of 64)."""
    N, K = weight.shape
    if N * K == 0 or not cpu_backend._C.interleavable(K, weight.blocksize):
        return weight
    return weight._replace(interleaved=interleaved_copy(weight))


def quantized(out_f, in_f, *, quant_type="nf4", nested=True, blocksize=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    packed, state = nf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                     compress_statistics=nested)
    return packed, state, nf.dequantize_4bit(packed, state).double()


def operands(M, in_f, out_f, r, dtype, bias=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    A = rnd(r, in_f, scale=in_f ** -0.5) if r else None
    B = rnd(out_f, r, scale=r ** -0.5) if r else None
    return rnd(M, in_f), A, B, (rnd(out_f) if bias else None)


def run_op(x, packed, state, A, B, scaling, bias):
    weight = PackedWeight.from_state(packed, state)
    if LAYOUT == "interleaved":  # (the op's schema has no place for the copy: called directly)
        return _ops.lora_matmul_4bit_impl(x, with_interleaved_copy(weight), A, B, scaling, bias)
    return _ops.lora_matmul_4bit(x, *weight.op_args(), A, B, scaling, bias)


def assert_within_baseline(ours, baseline, exact, dtype, label):
    base_err = (baseline.double() - exact).abs().max().item()
    our_err = (ours.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert our_err <= 2 * base_err + ulp, (
        f"{label}: error {our_err:.3g} vs float64, same-dtype torch baseline {base_err:.3g}")


def check_forward(M, in_f, out_f, r, dtype, *, bias=True, scaling=2.0, **quant):
    packed, state, W = quantized(out_f, in_f, **quant)
    x, A, B, b = operands(M, in_f, out_f, r, dtype, bias)
    y, h = run_op(x, packed, state, A, B, scaling, b)
    assert y.dtype == h.dtype == dtype and y.shape == (M, out_f) and h.shape == (M, r)
    # float64 truth; the LoRA term from the h the op returned (rounded to dtype, as saved)
    exact = x.double() @ W.t()
    base = F.linear(x, W.to(dtype), b)
    if r:
        exact_h = x.double() @ A.double().t()
        assert_within_baseline(h, F.linear(x, A), exact_h, dtype, "h")
        exact = exact + scaling * (h.double() @ B.double().t())
        base = base + scaling * F.linear(F.linear(x, A), B)
    if b is not None:
        exact = exact + b.double()
    assert_within_baseline(y, base, exact, dtype, f"y M={M} {in_f}x{out_f} r={r} {dtype}")
    return y, h


# ---- the fused kernel ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 32, 61])
def test_fused_matches_float64(isa, sums, layout, dtype, M):
    check_forward(M, 256, 40, 16, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,in_f,blocksize", [(8, 1088, 64), (16, 2112, 32), (9, 1024, 1024),
                                              (17, 4160, 64)])
def test_fused_k_slices(isa, sums, layout, dtype, M, in_f, blocksize):
    # 8-row tiles walk W in slices holding 16 KiB of x: 512 float32 columns (1024 for
    # bf16 pairs). These rows take 2-9 slices, the last one short, or one block larger
    # than a slice, and the 9th and 17th rows of x take the unsliced 1-row tile; 37 rows
    # of W are 3 groups of 16.
    check_forward(M, in_f, 37, 3, dtype, blocksize=blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_fused_quant_formats(isa, sums, layout, quant_type, nested, blocksize):
    # 768 / blocksize = 24, 12, 6, 3 blocks per row: the nested blocks of 256 blocks
    # start mid-row (the kernel carries the nested index across rows)
    check_forward(2, 768, 23, 5, torch.bfloat16, quant_type=quant_type, nested=nested,
                  blocksize=blocksize)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f", [1088, 4096])
def test_integer_sums_are_more_exact_than_the_16bit_baseline(isa, layout, monkeypatch, dtype, in_f):
    # The integer decoder's own error (levels and x each within 0.5 / 16383 of a group's
    # max |x|) must stay below rounding W to the activation dtype, which the same-dtype
    # baseline does. Mean |error| over 1024 outputs, with the output's own rounding (the
    # float64 result rounded to dtype) as the floor: ours may add at most half of what the
    # baseline adds to it. Measured (bf16 / fp16, K = 4096): floor 0.0746 / 0.0090, ours
    # 0.0748 / 0.0098, baseline 0.117 / 0.0143. 8-bit x would add ~4x the baseline's. The
    # interleaved kernel's W levels are coarser (2047 for bf16 x, 8191 for fp16:
    # gemv_interleaved.h): 4095 failed this for fp16 in a simulation (0.0117 > 0.0115).
    if isa == "scalar":
        pytest.skip("the scalar path has no integer decoder")
    monkeypatch.setenv("NF4LORA_CPU_GEMV", "integer")
    packed, state, W = quantized(512, in_f)
    x, _, _, _ = operands(2, in_f, 512, 0, dtype, bias=False)
    y, _ = run_op(x, packed, state, None, None, 1.0, None)
    exact = x.double() @ W.t()
    floor = (exact.to(dtype).double() - exact).abs().mean().item()
    ours = (y.double() - exact).abs().mean().item()
    baseline = (F.linear(x, W.to(dtype)).double() - exact).abs().mean().item()
    assert baseline > 1.2 * floor  # the baseline's weight rounding is visible at all
    assert ours <= floor + 0.5 * (baseline - floor), (ours, floor, baseline)


@pytest.mark.parametrize("special", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_x_gives_what_float_math_gives(isa, sums, layout, special):
    # An Inf or NaN has no int16 level: with one in x the call takes the float decoder, so
    # a row with Inf is +-Inf or NaN exactly where dequantize + float math has them.
    packed, state, W = quantized(24, 128)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x[1, 70] = special
    y, _ = run_op(x, packed, state, None, None, 1.0, None)
    expected = x.float() @ W.float().t()
    assert torch.equal(y.float().isnan(), expected.isnan())
    assert torch.equal(y.float().isinf(), expected.isinf())
    assert torch.equal(y.float()[expected.isinf()], expected[expected.isinf()])
    assert y[[0, 2]].isfinite().all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_float_decoders_use_the_dequantized_weights_at_any_scale(isa, monkeypatch, quant_type):
    # One-hot rows of x pick single weights, so y is the decoder's weight exactly (rounded
    # to x's dtype): float32 level * constant, or for AVX512-BF16's decoder that rounded to
    # bf16 (dequantize_4bit to bf16), read as 0 where subnormal (vdpbf16ps does). Each row
    # of W has one kind of block constant: products with the levels that are subnormal or
    # round up to the smallest normal bf16 (the decoder's table rounds those exactly:
    # vcvtneps2bf16 would flush them to 0), huge (some round up to inf in bf16), inf and
    # NaN (0 * inf = NaN across the row, as in float math).
    monkeypatch.setenv("NF4LORA_CPU_GEMV", "float")
    rows = [[1e-40, 3e-39, 5e-45, 1.1754942e-38], [1.2e-38, 1.5e-37, 2e-36, 1.0],
            [3.3e38, 1e30, 2.0, 0.0], [3.4028235e38, 3.39e38, 1.0, 7.0],
            [float("inf"), 1.0, 1.0, 1.0], [float("nan"), 1.0, 1.0, 1.0]]
    columns = [0, 63, 64, 130, 200, 255]
    w = torch.randn(len(rows), 256, generator=torch.Generator().manual_seed(3))
    w[:, columns[::2]] = 10.0  # the largest level, 1.0, at half of the picked columns
    packed, state = nf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    state.absmax = torch.tensor(rows, dtype=torch.float32).reshape(-1)
    for dtype in (torch.bfloat16, torch.float16):
        decoder = cpu_backend._C.gemv_decoder(len(columns), dtype)
        W = nf.dequantize_4bit(packed, state)
        if decoder == "bf16":
            W = W.to(torch.bfloat16)
            W[W.abs() < torch.finfo(torch.bfloat16).tiny] = 0
        x = torch.zeros(len(columns), 256, dtype=dtype)
        x[torch.arange(len(columns)), columns] = 1
        y, _ = run_op(x, packed, state, None, None, 1.0, None)
        expected = (x.double()[:, None, :] * W.double()[None, :, :]).sum(-1).to(dtype)
        assert torch.equal(y.isnan(), expected.isnan()), decoder
        assert torch.equal(y[~y.isnan()], expected[~expected.isnan()]), decoder
        if dtype == torch.bfloat16:  # the cases occur: tiny and overflowing weights
            assert expected[:, 0].ne(0).any() and expected[:, 3].isinf().any()


def test_gemv_decoder_choice(isa, monkeypatch, capsys):
    # the measured defaults (csrc/cpu/dispatch.cpp): integer sums for 16-bit x, but bf16 x
    # on avx512bf16 beyond 3 rows (vdpbf16ps was faster there); float32 x always float
    C = cpu_backend._C
    integer = isa != "scalar"
    assert C.gemv_decoder(1, torch.float32) == "float"
    assert C.gemv_decoder(8, torch.float16) == ("integer" if integer else "float")
    assert C.gemv_decoder(3, torch.bfloat16) == ("integer" if integer else "float")
    assert C.gemv_decoder(4, torch.bfloat16) == {"avx512bf16": "bf16", "scalar": "float"}.get(isa, "integer")
    monkeypatch.setenv("NF4LORA_CPU_GEMV", "float")
    assert C.gemv_decoder(1, torch.bfloat16) == ("bf16" if isa == "avx512bf16" else "float")
    monkeypatch.setenv("NF4LORA_CPU_GEMV", "integer")
    assert C.gemv_decoder(32, torch.bfloat16) == ("integer" if integer else "float")
    assert C.gemv_decoder(32, torch.float32) == "float"
    from nf4lora import cli
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"cpu kernel path: {isa}" in out
    assert f"bfloat16     {C.gemv_decoder(1, torch.bfloat16):>7}" in out


def test_gemv_decoder_override_is_checked(monkeypatch):
    packed, state, _ = quantized(8, 128)
    monkeypatch.setenv("NF4LORA_CPU_GEMV", "int4")
    with pytest.raises(RuntimeError,
                       match="NF4LORA_CPU_GEMV=int4: expected one of auto, integer, int8, float"):
        run_op(torch.randn(1, 128, dtype=torch.bfloat16), packed, state, None, None, 1.0, None)


def test_int8_decoder_is_opt_in(isa, monkeypatch, capsys):
    # never chosen by auto; NF4LORA_CPU_GEMV=int8 takes it where the ISA has it (avx512bf16:
    # VNNI), elsewhere what "integer" gives (the more exact int16 decoder), float32 x float
    C = cpu_backend._C
    for m in (1, 4, 8, 16, 32):
        for dtype in DTYPES:
            assert C.gemv_decoder(m, dtype) != "int8"
    monkeypatch.setenv("NF4LORA_CPU_GEMV", "int8")
    expected = {"avx512bf16": "int8", "scalar": "float"}.get(isa, "integer")
    for m in (1, 8, 32):
        assert C.gemv_decoder(m, torch.bfloat16) == C.gemv_decoder(m, torch.float16) == expected
        assert C.gemv_decoder(m, torch.float32) == "float"
    from nf4lora import cli
    assert cli.main(["info"]) == 0
    assert f"bfloat16     {expected:>7}" in capsys.readouterr().out


# ---- the opt-in int8 decoder (avx512bf16, NF4LORA_CPU_GEMV=int8) ----------------------

@pytest.fixture
def int8(monkeypatch):
    if "avx512bf16" not in ISAS:
        pytest.skip("the int8 decoder needs the avx512bf16 path (AVX512-BF16 + VNNI)")
    monkeypatch.setenv("NF4LORA_CPU_ISA", "avx512bf16")
    monkeypatch.setenv("NF4LORA_CPU_GEMV", "int8")


def block_constants(state):
    """The float32 block constants as the kernels compute them (nf4_codec.h
    decode_nested_absmax: code2[q] * absmax2, then + offset, two float32 roundings)."""
    if not state.nested:
        return state.absmax.float()
    q = state.absmax.long()
    absmax2 = state.state2.absmax.float().repeat_interleave(state.state2.blocksize)[:q.numel()]
    return state.state2.code.float()[q] * absmax2 + state.offset.float()


def int8_emulation(x, packed, state, K):
    """y of the int8 decoder in float64 from its exact integer sums: levels round(127 *
    level), x per 64 columns round(x * float32(127 / max|x|)), the int32 sum of each
    (row of x, row of W, 64 columns) exact, times float32(block constant * float32(max|x| /
    127^2)). Returns (y, sum over the groups of |fold * sum|) for the float32 rounding slack."""
    M = x.shape[0]
    levels = torch.round(state.code.float() * 127.0).clamp(-127, 127).double()
    b = packed.flatten()
    codes = torch.stack([b >> 4, b & 15], 1).flatten().long()
    w_levels = levels[codes].view(-1, K // 64, 64)                   # [N, G, 64]
    xg = x.float().view(M, K // 64, 64)
    max_abs = xg.abs().amax(2)                                        # [M, G]
    to_level = torch.where(max_abs > 0, torch.tensor(127.0) / max_abs, torch.zeros(()))
    x_levels = torch.round((xg * to_level[..., None]).clamp(-127, 127)).double()
    sums = torch.einsum("mgk,ngk->mng", x_levels, w_levels)          # exact in float64
    x_scale = (max_abs.double() / (127.0 * 127.0)).float()            # [M, G]
    per_group = block_constants(state).repeat_interleave(state.blocksize // 64).view(-1, K // 64)
    fold = (per_group[None] * x_scale[:, None, :]).double()          # float32 products
    terms = fold * sums
    return terms.sum(2), terms.abs().sum(2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,blocksize,quant_type,nested", [
    (1, 320, 64, "nf4", True),      # a half last step (2.5 steps of 128)
    (2, 768, 256, "fp4", False),
    (3, 1088, 64, "iq4nl", True),   # a custom table; a half last step
    (5, 512, 128, "nf4", False),
    (8, 4096, 64, "nf4", True),     # K in slices (8-row tile)
    (9, 1152, 128, "fp4", True),    # an 8-row tile and a 1-row tile
    (70, 256, 64, "nf4", True),     # past the int16 copy's crossover (FUSED_MAX_M_INTERLEAVED)
])
def test_int8_sums_are_exact(int8, layout, dtype, M, K, blocksize, quant_type, nested):
    # The kernel's integer sums equal the emulation's (vpdpbusd on level + 128 with the
    # -128 * sum(x) start), on the row layout and on the interleaved copy (the same sum per
    # group of 64, another float order): what is left is float32 rounding (the fold, the
    # chains, < 1e-5 of the sum of |terms|) and one rounding to the output dtype. A wrong
    # start, lane -> scale group mapping, element order or level scale is off by far more,
    # and so are int16 sums (what the copy's kernel would give had it not taken int8).
    if layout == "rows" and M > cpu_backend.fused_max_m(dtype):
        pytest.skip("past its crossover the row layout takes dequantize + GEMM")
    packed, state, _ = quantized(40, K, quant_type=quant_type, nested=nested, blocksize=blocksize)
    x, _, _, _ = operands(M, K, 40, 0, dtype, bias=False)
    y, _ = run_op(x, packed, state, None, None, 1.0, None)
    emulated, magnitude = int8_emulation(x, packed, state, K)
    ulp = torch.finfo(dtype).eps * emulated.abs()
    err = (y.double() - emulated).abs()
    assert (err <= ulp + 1e-5 * magnitude).all(), (err - ulp).max().item()


def int8_error_bound(x, W, constants, blocksize):
    """Worst case of the int8 quantization against float64, per output: each weight within
    0.5 / 127 of its block constant c and each x within 0.5 / 127 of its group's max|x|
    (g): |x w - x' w'| <= |x| c / 254 + |w| g / 254 + c g / 254^2."""
    M, K = x.shape
    g = x.double().view(M, K // 64, 64).abs().amax(2).repeat_interleave(64, 1)    # [M, K]
    c = constants.double().repeat_interleave(blocksize).view(W.shape[0], K)          # [N, K]
    return (x.double().abs() @ c.t() + g @ W.abs().t() + g @ c.t() / 254) / 254


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,r,bias", [(1, 0, False), (4, 8, True), (9, 3, True)])
def test_int8_within_its_quantization_bound(int8, layout, dtype, M, r, bias):
    # LoRA and bias: the LoRA term from the returned h (float math, as in check_forward)
    packed, state, W = quantized(48, 1088, nested=True)
    x, A, B, b = operands(M, 1088, 48, r, dtype, bias)
    y, h = run_op(x, packed, state, A, B, 2.0, b)
    exact = x.double() @ W.t()
    sum_abs = x.double().abs() @ W.abs().t()
    if r:
        exact = exact + 2.0 * (h.double() @ B.double().t())
        sum_abs = sum_abs + 2.0 * (h.double().abs() @ B.double().abs().t())
    if b is not None:
        exact = exact + b.double()
        sum_abs = sum_abs + b.double().abs()
    bound = (int8_error_bound(x, W, block_constants(state), 64) + 1e-5 * sum_abs
             + torch.finfo(dtype).eps * exact.abs())
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), (err / bound).max().item()
    # a worst case: measured 0.58 against 20 here (errors of random sign mostly cancel);
    # but above what the int16 decoder could be off by (its bound is 127 / 16383 of this)
    assert err.max() > 127 / 16383 * bound.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_is_less_exact_than_the_16bit_baseline(int8, layout, dtype):
    # What the docs say: opt-in because it is less exact than dense bf16 (README "CPU
    # matmul"). Mean |error| vs float64 over 1024 outputs, K = 4096: measured (bf16 / fp16)
    # int8 0.44 / 0.42, dense baseline 0.117 / 0.0143, int16 0.075 / 0.0098.
    packed, state, W = quantized(512, 4096)
    x, _, _, _ = operands(2, 4096, 512, 0, dtype, bias=False)
    exact = x.double() @ W.t()
    y, _ = run_op(x, packed, state, None, None, 1.0, None)
    ours = (y.double() - exact).abs().mean().item()
    baseline = (F.linear(x, W.to(dtype)).double() - exact).abs().mean().item()
    assert ours > 2 * baseline, (ours, baseline)
    assert ours < 40 * baseline, (ours, baseline)


@pytest.mark.parametrize("special", [float("inf"), float("nan")])
def test_int8_nonfinite_x_takes_the_float_decoder(int8, special):
    packed, state, W = quantized(24, 256)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    finite, _ = run_op(x, packed, state, None, None, 1.0, None)
    x[1, 70] = special
    y, _ = run_op(x, packed, state, None, None, 1.0, None)
    expected = x.float() @ W.float().t()
    assert torch.equal(y.float().isnan(), expected.isnan())
    assert torch.equal(y.float().isinf(), expected.isinf())
    # rows 0 and 2: the float (vdpbf16ps) decoder's, not the int8 one's
    float_dec = (y[[0, 2]].double() - x[[0, 2]].double() @ W.t()).abs().max()
    int8_dec = (finite[[0, 2]].double() - x[[0, 2]].double() @ W.t()).abs().max()
    assert float_dec < int8_dec


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r,bias", [(0, True), (0, False), (1, True), (7, False), (24, True)])
def test_fused_lora_ranks_and_bias(isa, layout, r, bias, dtype):
    check_forward(4, 128, 17, r, dtype, bias=bias)


def test_fused_is_used_for_small_M_and_dequantize_gemm_otherwise():
    packed, state, _ = quantized(8, 128)
    weight = PackedWeight.from_state(packed, state)
    for dtype in DTYPES:
        largest = cpu_backend.fused_max_m(dtype)
        assert cpu_backend.matmul_path(1, weight, dtype) == "fused"
        assert cpu_backend.matmul_path(largest, weight, dtype) == "fused"
        assert cpu_backend.matmul_path(largest + 1, weight, dtype) == "dequantize+gemm"
    # a dtype the CPU multiplies natively crosses over sooner (the measured constants)
    assert cpu_backend.fused_max_m(torch.float32) == cpu_backend.FUSED_MAX_M
    assert cpu_backend.fused_max_m(torch.bfloat16) == (
        cpu_backend.FUSED_MAX_M_NATIVE_GEMM if cpu_backend._C.native_16bit_gemm(torch.bfloat16)
        else cpu_backend.FUSED_MAX_M)
    packed, state, _ = quantized(8, 100)  # rows do not start on block boundaries
    weight = PackedWeight.from_state(packed, state)
    assert cpu_backend.matmul_path(1, weight, torch.bfloat16) == "dequantize+gemm"


def test_fused_kernel_rejects_what_it_cannot_do():
    y, h = torch.empty(1, 4), torch.empty(1, 0)
    packed = torch.zeros(200, dtype=torch.uint8)
    x = torch.zeros(1, 100)
    weight = PackedWeight(packed, torch.ones(7), 64, "nf4", (4, 100), None)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        cpu_backend._C.lora_gemv_4bit(x, weight, None, None, 1.0, None, y, h)
    x = torch.zeros(1, 64)
    weight = PackedWeight(packed, torch.ones(4), 64, "nf4", (4, 64), None)
    with pytest.raises(ValueError, match="null LoRA pointer"):
        cpu_backend._C.lora_gemv_4bit(x, weight, torch.zeros(4, 64), None, 1.0, None, y, h)
    with pytest.raises(ValueError, match="x has 100 features"):
        cpu_backend._C.lora_gemv_4bit(torch.zeros(1, 100), weight, None, None, 1.0, None, y, h)


# ---- dequantize + gemm ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_f,out_f", [(256, 40), (100, 33), (1, 5), (33, 1)])
def test_dequantize_gemm_matches_float64(dtype, in_f, out_f):
    check_forward(cpu_backend.FUSED_MAX_M + 8, in_f, out_f, 4, dtype)


@pytest.mark.parametrize("in_f", [256, 192, 100])
def test_dequantize_gemm_in_chunks(monkeypatch, in_f):
    # a chunk of ~2 KiB: many chunks, each starting on a nested-block boundary
    monkeypatch.setattr(cpu_backend, "CHUNK_BYTES", 2048)
    M = cpu_backend.FUSED_MAX_M + 8
    y, _ = check_forward(M, in_f, 300, 3, torch.bfloat16)
    monkeypatch.setattr(cpu_backend, "CHUNK_BYTES", 1 << 30)
    y_one_chunk, _ = check_forward(M, in_f, 300, 3, torch.bfloat16)
    torch.testing.assert_close(y, y_one_chunk, rtol=0, atol=0)  # float32 sums, one rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 40])
def test_grad_input_matches_float64(monkeypatch, dtype, M):
    monkeypatch.setattr(cpu_backend, "CHUNK_BYTES", 4096)
    packed, state, W = quantized(70, 128)
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(M, 70, generator=gen).to(dtype)
    A = (torch.randn(6, 128, generator=gen) * 0.1).to(dtype)
    grad_h = torch.randn(M, 6, generator=gen).to(dtype)
    dx = _ops.lora_matmul_4bit_grad_input(grad, *PackedWeight.from_state(packed, state).op_args(), A, grad_h)
    exact = grad.double() @ W + grad_h.double() @ A.double()
    base = grad @ W.to(dtype) + grad_h @ A
    assert_within_baseline(dx, base, exact, dtype, f"dx M={M} {dtype}")


def test_workspace_is_reused_and_released():
    packed, state, _ = quantized(64, 128)
    x = torch.randn(cpu_backend.FUSED_MAX_M + 1, 128, dtype=torch.bfloat16)
    run_op(x, packed, state, None, None, 1.0, None)
    first = cpu_backend._thread.buffers[torch.float32].data_ptr()
    run_op(x, packed, state, None, None, 1.0, None)
    assert cpu_backend._thread.buffers[torch.float32].data_ptr() == first
    cpu_backend.release_workspace()
    assert cpu_backend._thread.buffers == {}


# ---- determinism and threads -----------------------------------------------------------

@pytest.mark.parametrize("gemv", ["auto", "int8"])
@pytest.mark.parametrize("M", [1, 5, 48])
@pytest.mark.parametrize("N", [1000, 1200])  # two threads: 8 chunks of rows; 5 evened to 6
def test_same_bytes_for_any_thread_count_and_run(layout, M, N, gemv, monkeypatch):
    monkeypatch.setenv("NF4LORA_CPU_GEMV", gemv)
    packed, state, _ = quantized(N, 512)
    x, A, B, b = operands(M, 512, N, 8, torch.bfloat16)
    results = []
    try:
        for threads in (1, 2, 1, 2):
            cpu_backend._C.set_num_threads(threads)
            results.append(run_op(x, packed, state, A, B, 0.5, b))
    finally:
        cpu_backend._C.set_num_threads(0)
    for y, h in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(h, results[0][1])


def test_concurrent_python_threads_get_the_same_outputs():
    layers = [quantized(300, 256, seed=s)[:2] for s in range(3)]
    inputs = [operands(M, 256, 300, 4, torch.bfloat16, seed=M) for M in (1, 7, 48)]
    expected = {(i, j): run_op(x, *layers[i], A, B, 1.5, b)[0]
                for i in range(3) for j, (x, A, B, b) in enumerate(inputs)}
    failures = []

    def worker(seed):
        order = sorted(expected, key=lambda key: hash((seed, key)))
        for _ in range(3):
            for i, j in order:
                x, A, B, b = inputs[j]
                if not torch.equal(run_op(x, *layers[i], A, B, 1.5, b)[0], expected[i, j]):
                    failures.append((seed, i, j))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_gemm_forward_in_bounded_chunks(dtype, monkeypatch):
    """The forward's dequantize+gemm path computes each output column in one chunk's GEMM,
    so W is dequantized a bounded chunk at a time in every dtype (also with a native bf16
    GEMM, where the backward's sum over W's rows keeps W whole) and the bytes equal the
    one-chunk product's."""
    packed, state, _ = quantized(300, 256)
    x = torch.randn(40, 256).to(dtype)                       # M = 40: dequantize + GEMM
    weight = PackedWeight.from_state(packed, state).with_offset_read()
    assert cpu_backend.matmul_path(40, weight, dtype) == "dequantize+gemm"
    monkeypatch.setattr(cpu_backend, "CHUNK_BYTES", 1 << 40)   # one chunk: all of W
    cpu_backend.release_workspace()
    whole, _ = cpu_backend.lora_matmul_4bit(x, weight, None, None, 1.0, None)
    chunk = 64 * 256 * 4      # 64 float32 rows: the smallest cut with double quant (row_granule)
    monkeypatch.setattr(cpu_backend, "CHUNK_BYTES", chunk)
    cpu_backend.release_workspace()
    chunked, _ = cpu_backend.lora_matmul_4bit(x, weight, None, None, 1.0, None)
    assert torch.equal(chunked, whole)
    workspace = cpu_backend._thread.buffers[cpu_backend._compute_dtype(dtype)]
    assert workspace.numel() * workspace.element_size() <= chunk
    cpu_backend.release_workspace()


# ---- the backward's grad @ W by column panels ------------------------------------------

PANEL_FORMATS = {**{name: {"quant_type": name} for name in NAMED_FORMATS},
                 "custom": {"code": torch.linspace(-0.9, 0.8, 16) ** 3}}


def weight_and_dense(out_f, in_f, *, blocksize=64, nested=True, fmt="nf4", seed=0):
    """A PackedWeight (offset read, as the ops pass it) and its dequantized float32 W."""
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    packed, state = nf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested,
                                     **PANEL_FORMATS[fmt])
    return (PackedWeight.from_state(packed, state).with_offset_read(),
            nf.dequantize_4bit(packed, state).float())


@pytest.mark.parametrize("fmt", list(PANEL_FORMATS))
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize,out_f,in_f", [(64, 37, 64), (64, 37, 320), (32, 5, 96),
                                                  (128, 3, 384), (256, 7, 512), (1024, 2, 2048)])
def test_columns_dequantize_to_the_columns_of_w(fmt, nested, blocksize, out_f, in_f):
    # every panel on block boundaries, of a weight whose nested groups of 256 blocks start
    # mid-row (37 x 320 at blocksize 64: 5 blocks a row), bit for bit; a packed buffer that
    # does not start on a 4-byte word takes the byte-wise copy
    weight, W = weight_and_dense(out_f, in_f, blocksize=blocksize, nested=nested, fmt=fmt)
    decoded = weight.with_absmax_decoded()
    assert decoded.nested is None and decoded.absmax.dtype == torch.float32
    whole = torch.empty(out_f, in_f)
    cpu_backend.dequantize_4bit(decoded, whole)
    assert torch.equal(whole, W)                        # the spec's absmax rule, bit for bit
    shifted = torch.zeros(decoded.packed.numel() + 1, dtype=torch.uint8)
    shifted[1:] = decoded.packed
    cuts = range(0, in_f + 1, blocksize)
    for packed in (decoded.packed, shifted[1:]):
        source = decoded._replace(packed=packed)
        for c0 in cuts:
            for c1 in (c for c in cuts if c >= c0):
                panel = source.columns(c0, c1)
                assert panel.shape == (out_f, c1 - c0)
                got = torch.empty(out_f, c1 - c0)
                cpu_backend.dequantize_4bit(panel, got)
                assert torch.equal(got, W[:, c0:c1]), (c0, c1)


def test_columns_reject_what_they_cannot_cut():
    weight, _ = weight_and_dense(8, 256)
    with pytest.raises(ValueError, match="double-quantized absmax"):
        weight.columns(0, 64)
    weight = weight.with_absmax_decoded()
    for c0, c1 in [(32, 64), (0, 100), (64, 0), (0, 320)]:
        with pytest.raises(ValueError, match="multiples of blocksize 64"):
            weight.columns(c0, c1)
    with pytest.raises(ValueError, match="fewer than the 256"):
        weight.columns(0, 64, out=torch.empty(255, dtype=torch.uint8))
    odd, _ = weight_and_dense(8, 100, nested=False)
    with pytest.raises(ValueError, match="in_features must be a multiple of blocksize"):
        odd.columns(0, 64)


def grad_input_by_hand(grad, W, A, grad_h, dtype):
    """The whole-W product the panels must reproduce: grad @ W in the GEMM dtype, then the
    LoRA term, then one rounding to grad's dtype (the path before the panels)."""
    dx = grad.to(dtype) @ W.to(dtype)
    if A is not None:
        dx.addmm_(grad_h.to(dtype), A.to(dtype))
    return dx.to(grad.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 40])
@pytest.mark.parametrize("blocksize,out_f,in_f,columns", [
    (64, 37, 64, 256),        # K = blocksize: one panel narrower than the panel width
    (64, 300, 1088, 256),     # K a multiple of 64, not of 256: a short last panel
    (64, 1, 512, 128),        # one row of W
    (32, 70, 96, 32),         # panels of one block
    (128, 33, 640, 256),      # blocksize 128: panels of 2 blocks, a short last one
    (256, 9, 768, 256), (1024, 5, 2048, 256)])   # a panel is one block / rounded up to one
def test_grad_input_by_panels_equals_the_whole_w_product(monkeypatch, dtype, M, blocksize,
                                                         out_f, in_f, columns):
    # The panel width is forced small (PANEL_BYTES 0: PANEL_MIN_COLUMNS decides), so most
    # shapes take several panels; M = 1 takes this path when called directly. Every element
    # of dx is still one GEMM's sum over all of W's rows: the same bytes as the whole-W
    # product (oneDNN's sums do not depend on the panel), and within the same-dtype
    # baseline's error against float64.
    monkeypatch.setattr(cpu_backend, "PANEL_BYTES", 0)
    monkeypatch.setattr(cpu_backend, "PANEL_MIN_COLUMNS", columns)
    weight, W = weight_and_dense(out_f, in_f, blocksize=blocksize)
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(M, out_f, generator=gen).to(dtype)
    A = (torch.randn(6, in_f, generator=gen) * in_f ** -0.5).to(dtype)
    grad_h = torch.randn(M, 6, generator=gen).to(dtype)
    dx = cpu_backend._unfused_grad_input(grad, weight, A, grad_h, "dequantize+gemm")
    assert dx.dtype == dtype and dx.shape == (M, in_f)
    gemm_dtype = cpu_backend._compute_dtype(dtype)
    assert torch.equal(dx, grad_input_by_hand(grad, W, A, grad_h, gemm_dtype))
    exact = grad.double() @ W.double() + grad_h.double() @ A.double()
    base = grad @ W.to(dtype) + grad_h @ A
    assert_within_baseline(dx, base, exact, dtype, f"dx M={M} {out_f}x{in_f} {dtype}")
    without_lora = cpu_backend._unfused_grad_input(grad, weight, None, None, "dequantize+gemm")
    assert torch.equal(without_lora, grad_input_by_hand(grad, W, None, None, gemm_dtype))


@pytest.mark.parametrize("fmt", list(PANEL_FORMATS))
@pytest.mark.parametrize("nested", [True, False])
def test_grad_input_by_panels_in_every_format(monkeypatch, fmt, nested):
    monkeypatch.setattr(cpu_backend, "PANEL_BYTES", 0)
    monkeypatch.setattr(cpu_backend, "PANEL_MIN_COLUMNS", 64)
    weight, W = weight_and_dense(45, 320, nested=nested, fmt=fmt)
    grad = torch.randn(40, 45, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    dx = cpu_backend._unfused_grad_input(grad, weight, None, None, "dequantize+gemm")
    gemm_dtype = cpu_backend._compute_dtype(torch.bfloat16)
    assert torch.equal(dx, grad_input_by_hand(grad, W, None, None, gemm_dtype))


@pytest.mark.parametrize("out_f,in_f", [(0, 128), (5, 0), (0, 0)])
def test_grad_input_by_panels_of_an_empty_weight(out_f, in_f):
    weight, _ = weight_and_dense(out_f, in_f)
    grad = torch.randn(40, out_f).to(torch.bfloat16)
    dx = cpu_backend._unfused_grad_input(grad, weight, None, None, "dequantize+gemm")
    assert dx.shape == (40, in_f) and torch.equal(dx, torch.zeros_like(dx))
    grad = torch.empty(0, out_f, dtype=torch.bfloat16)
    assert cpu_backend._unfused_grad_input(grad, weight, None, None, "dequantize+gemm").shape == (0, in_f)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_workspace_is_a_panel_not_all_of_w(monkeypatch, dtype):
    """The backward's dequantize+gemm path holds one column panel of W, also where the
    GEMM runs in bf16 (the whole-W path held all of W there, and in float32 it held
    CHUNK_BYTES of rows: made unbounded here, so that either old behaviour fails)."""
    monkeypatch.setattr(cpu_backend, "CHUNK_BYTES", 1 << 40)
    monkeypatch.setattr(cpu_backend, "PANEL_BYTES", 0)
    monkeypatch.setattr(cpu_backend, "PANEL_MIN_COLUMNS", 128)
    N, K = 300, 1024
    weight, W = weight_and_dense(N, K)
    grad = torch.randn(40, N).to(dtype)
    cpu_backend.release_workspace()
    try:
        dx = _ops.lora_matmul_4bit_grad_input(grad, *weight.op_args(), None, None)
        buffers = cpu_backend._thread.buffers
        gemm_dtype = cpu_backend._compute_dtype(dtype)
        assert buffers[gemm_dtype].numel() == N * 128 < N * K
        assert buffers[torch.uint8].numel() == N * 128 // 2       # the panel's packed bytes
        assert set(buffers) == {gemm_dtype, torch.uint8}
        assert torch.equal(dx, grad_input_by_hand(grad, W, None, None, gemm_dtype))
    finally:
        cpu_backend.release_workspace()


def test_grad_input_panel_width_is_bounded_in_bytes():
    # ~PANEL_BYTES of the GEMM dtype, a whole number of blocks, at least PANEL_MIN_COLUMNS
    # (and one block); all of a narrow W in one panel
    seen = {}
    for (N, K), dtype, blocksize in [((4096, 4096), torch.bfloat16, 64),
                                     ((11008, 4096), torch.bfloat16, 64),
                                     ((4096, 4096), torch.float32, 64),
                                     ((64, 4096), torch.bfloat16, 64),
                                     ((4096, 8192), torch.bfloat16, 4096)]:
        weight = PackedWeight(torch.zeros(N * K // 2, dtype=torch.uint8),
                              torch.zeros(N * K // blocksize), blocksize, "nf4", (N, K), None)
        real = cpu_backend.dequantize_4bit
        widths = []
        try:
            cpu_backend.dequantize_4bit = lambda w, out: widths.append(w.in_features)
            list(cpu_backend._column_panels(weight, dtype))
        finally:
            cpu_backend.dequantize_4bit = real
            cpu_backend.release_workspace()
        assert sum(widths) == K and all(w % blocksize == 0 for w in widths)
        seen[N, K, dtype.itemsize, blocksize] = widths[0]
    min_columns, panel = cpu_backend.PANEL_MIN_COLUMNS, cpu_backend.PANEL_BYTES
    assert seen[4096, 4096, 2, 64] == max(min_columns, panel // (2 * 4096))
    assert seen[11008, 4096, 2, 64] == max(min_columns, panel // (2 * 11008) // 64 * 64)
    assert seen[4096, 4096, 4, 64] == max(min_columns, panel // (4 * 4096))
    assert seen[64, 4096, 2, 64] == 4096
    assert seen[4096, 8192, 2, 4096] == 4096
