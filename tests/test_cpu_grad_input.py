"""The cpu backend's fused grad-input (`_C.lora_grad_input_4bit`, csrc/cpu/gemv_body.h
grad_input_panel_impl): dx = grad @ W + grad_h @ lora_A with W read packed, the backward of
a 4-bit matmul for x at small M, against float64 math on the dequantized weight.

Tolerance as in tests/test_cpu_matmul.py: the same product computed by torch in the same
dtype (W dequantized to that dtype) sets the baseline error against float64; the kernel's
must stay within twice that plus one ulp of the output scale. Every SIMD path this CPU
supports runs (NF4LORA_CPU_ISA); the AVX-512 ones also run under SIMDe emulation in
scripts/check_avx512_emulated.sh (cmp_grad_input).
"""
from __future__ import annotations

import json

import pytest
import torch

import nf4lora
import nf4lora.functional as nf
from nf4lora import _ops, codebook, reference
from nf4lora._weight import PackedWeight
from nf4lora.backends import cpu as cpu_backend

from conftest import DTYPES
from test_cpu_matmul import assert_within_baseline, isa  # noqa: F401  (the ISA fixture)

pytestmark = pytest.mark.skipif(cpu_backend.availability() is not None,
                                reason=str(cpu_backend.availability()))

CUSTOM_CODE = torch.linspace(-0.9, 0.8, 16) ** 3  # uneven, no level at 0 or +-1
FORMATS = {"nf4": {"quant_type": "nf4"}, "fp4": {"quant_type": "fp4"}, "custom": {"code": CUSTOM_CODE}}


def quantized(out_f, in_f, *, fmt="nf4", nested=True, blocksize=64, seed=0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    packed, state = nf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested,
                                     **FORMATS[fmt])
    return PackedWeight.from_state(packed, state), nf.dequantize_4bit(packed, state).double()


def operands(M, out_f, in_f, r, dtype, seed=3):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(M, out_f, generator=gen).to(dtype)
    if not r:
        return grad, None, None
    A = (torch.randn(r, in_f, generator=gen) * in_f ** -0.5).to(dtype)
    return grad, A, torch.randn(M, r, generator=gen).to(dtype)


def check(M, out_f, in_f, r, dtype, **quant):
    """dx from the fused kernel directly (where it can run) and from the op (routed)."""
    weight, W = quantized(out_f, in_f, **quant)
    grad, A, grad_h = operands(M, out_f, in_f, r, dtype)
    exact = reference.lora_matmul_4bit_grad_input(
        grad.double(), W, None if A is None else A.double(), None if grad_h is None else grad_h.double())
    base = reference.lora_matmul_4bit_grad_input(grad, W.to(dtype), A, grad_h)
    label = f"dx M={M} {out_f}x{in_f} r={r} {dtype} {quant}"
    routed = _ops.lora_matmul_4bit_grad_input(grad, *weight.op_args(), A, grad_h)
    assert routed.dtype == dtype and routed.shape == (M, in_f)
    assert_within_baseline(routed, base, exact, dtype, label + " (routed)")
    if in_f % weight.blocksize:  # only the dequantize + GEMM path takes it
        return routed
    dx = cpu_backend._fused_grad_input(grad, weight.with_offset_read(), A, grad_h)
    assert_within_baseline(dx, base, exact, dtype, label)
    if cpu_backend.grad_input_path(M, weight, dtype) == "fused":
        assert torch.equal(routed, dx)  # the op runs the same kernel
    return dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 32])
def test_matches_float64(isa, dtype, M):
    # out = 150: two slabs of 64 rows and a short one, rows not a multiple of the 4 (or 2)
    # that go through the accumulators together
    check(M, 150, 256, 16, dtype)


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("out_f,in_f,blocksize", [(1, 64, 64), (37, 1088, 64), (5, 4160, 32),
                                                  (70, 1024, 1024), (3, 96, 32)])
def test_odd_shapes_and_panels(isa, M, out_f, in_f, blocksize):
    # 1088 / 4160 columns: panels of up to 2048 / M columns and a short last one; a block of
    # 1024 is one panel by itself; one row of W
    check(M, out_f, in_f, 3, torch.bfloat16, blocksize=blocksize)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_formats_and_block_constants(isa, fmt, nested, blocksize):
    # 768 / blocksize = 24, 12, 6, 3 blocks per row: the nested groups of 256 blocks start
    # mid-row
    check(2, 45, 768, 5, torch.float32, fmt=fmt, nested=nested, blocksize=blocksize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [0, 1, 7])
def test_with_and_without_lora(isa, dtype, r):
    check(2, 33, 128, r, dtype)


def test_empty():
    weight, _ = quantized(40, 128)
    grad = torch.empty(0, 40, dtype=torch.bfloat16)
    assert cpu_backend._fused_grad_input(grad, weight, None, None).shape == (0, 128)
    dx = _ops.lora_matmul_4bit_grad_input(grad, *weight.op_args(), None, None)
    assert dx.shape == (0, 128)


def test_same_bytes_for_any_thread_count():
    weight, _ = quantized(300, 4096)
    grad, A, grad_h = operands(3, 300, 4096, 8, torch.bfloat16)
    results = []
    try:
        for threads in (1, 2, 1, 2):
            cpu_backend._C.set_num_threads(threads)
            results.append(cpu_backend._fused_grad_input(grad, weight.with_offset_read(), A, grad_h))
    finally:
        cpu_backend._C.set_num_threads(0)
    assert all(torch.equal(dx, results[0]) for dx in results[1:])


def test_routing():
    weight, _ = quantized(8, 128)
    for dtype in DTYPES:
        largest = cpu_backend.grad_input_fused_max_m(dtype)
        assert cpu_backend.grad_input_path(1, weight, dtype) == "fused"
        assert cpu_backend.grad_input_path(largest, weight, dtype) == "fused"
        assert cpu_backend.grad_input_path(largest + 1, weight, dtype) == "dequantize+gemm"
        assert cpu_backend.grad_input_path(0, weight, dtype) == "dequantize+gemm"
    # a dtype the CPU multiplies natively crosses over sooner, and so does the AVX2 kernel
    # (the measured constants)
    unnative = (cpu_backend.GRAD_INPUT_FUSED_MAX_M_AVX2 if cpu_backend._C.isa() == "avx2"
                else cpu_backend.GRAD_INPUT_FUSED_MAX_M)
    assert cpu_backend.grad_input_fused_max_m(torch.float32) == unnative
    assert cpu_backend.grad_input_fused_max_m(torch.bfloat16) == (
        cpu_backend.GRAD_INPUT_FUSED_MAX_M_NATIVE_GEMM
        if cpu_backend._C.native_16bit_gemm(torch.bfloat16) else unnative)
    weight, _ = quantized(8, 100)  # rows do not start on block boundaries
    assert cpu_backend.grad_input_path(1, weight, torch.bfloat16) == "dequantize+gemm"
    check(2, 8, 100, 3, torch.bfloat16)  # and that path still gives the right dx


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_avx2_crosses_over_sooner(monkeypatch, isa):
    # float32 grad (no native 16-bit GEMM on any CPU): the AVX2 kernel up to
    # GRAD_INPUT_FUSED_MAX_M_AVX2 rows, the others up to GRAD_INPUT_FUSED_MAX_M
    if isa not in cpu_backend._C.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    monkeypatch.setenv("NF4LORA_CPU_ISA", isa)
    weight, _ = quantized(8, 128)
    largest = (cpu_backend.GRAD_INPUT_FUSED_MAX_M_AVX2 if isa == "avx2" else cpu_backend.GRAD_INPUT_FUSED_MAX_M)
    assert cpu_backend.grad_input_fused_max_m(torch.float32) == largest
    assert cpu_backend.grad_input_path(largest, weight, torch.float32) == "fused"
    assert cpu_backend.grad_input_path(largest + 1, weight, torch.float32) == "dequantize+gemm"


def test_info_reports_the_grad_input_path(capsys):
    from nf4lora import cli
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu backward grad-input path by rows of grad" in out
    rows = (1, 2, 4, 8, 16, 24, 32)
    fused_bf16 = sum(m <= cpu_backend.grad_input_fused_max_m(torch.bfloat16) for m in rows)
    line = next(l for l in out.splitlines()[out.splitlines().index(
        "  cpu backward grad-input path by rows of grad (backends/cpu.py grad_input_fused_max_m):") + 1:]
        if l.strip().startswith("bfloat16"))
    assert line.split()[1:] == ["fused"] * fused_bf16 + ["gemm"] * (len(rows) - fused_bf16)


def test_kernel_rejects_what_it_cannot_do():
    packed = torch.zeros(200, dtype=torch.uint8)
    weight = PackedWeight(packed, torch.ones(7), 64, "nf4", (4, 100), None)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        cpu_backend._C.lora_grad_input_4bit(torch.zeros(1, 4), weight, None, None, torch.empty(1, 100))
    weight = PackedWeight(packed, torch.ones(4), 64, "nf4", (4, 64), None)
    with pytest.raises(ValueError, match="null LoRA pointer"):
        cpu_backend._C.lora_grad_input_4bit(torch.zeros(1, 4), weight, torch.zeros(2, 64), None,
                                            torch.empty(1, 64))
    with pytest.raises(ValueError, match="grad has 5 columns"):
        cpu_backend._C.lora_grad_input_4bit(torch.zeros(1, 5), weight, None, None, torch.empty(1, 64))


@pytest.mark.parametrize("M", [1, 5])
def test_autograd_takes_the_fused_kernel(monkeypatch, M):
    # the backward of nf4lora.lora_matmul_4bit gets dx from the fused kernel at small M
    calls = []
    real = cpu_backend._fused_grad_input

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(cpu_backend, "_fused_grad_input", counted)
    gen = torch.Generator().manual_seed(7)
    packed, state = nf.quantize_4bit(torch.randn(96, 256, generator=gen), quant_type="nf4",
                                     compress_statistics=True)
    W = nf.dequantize_4bit(packed, state).double()
    x = torch.randn(M, 256, generator=gen).to(torch.bfloat16).requires_grad_()
    A = (torch.randn(4, 256, generator=gen) * 0.1).to(torch.bfloat16).requires_grad_()
    B = (torch.randn(96, 4, generator=gen) * 0.1).to(torch.bfloat16).requires_grad_()
    y = nf4lora.lora_matmul_4bit(x, packed, state, A, B, 2.0)
    dy = torch.randn(M, 96, generator=gen).to(torch.bfloat16)
    y.backward(dy)
    assert calls == [(M, 96)]
    grad_h = (dy.double() @ B.double()) * 2.0
    exact = dy.double() @ W + grad_h @ A.double()
    base = dy @ W.to(torch.bfloat16) + grad_h.to(torch.bfloat16) @ A
    assert_within_baseline(x.grad, base, exact, torch.bfloat16, "x.grad")


def test_bench_quick_run(capsys, tmp_path):
    from bench import bench_grad_input
    threads = torch.get_num_threads()
    payload = bench_grad_input.main(["--shapes", "40x128", "--tokens", "1", "3", "--repeats", "1",
                                     "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "fused ms" in out and len([l for l in out.splitlines() if l.strip().startswith("40x128")]) == 2
    assert torch.get_num_threads() == threads  # restored
    saved = json.loads((tmp_path / "grad-input-latest.json").read_text())
    assert saved["rows"] == payload["rows"] and [row["tokens"] for row in saved["rows"]] == [1, 3]
    assert all((row["amx_ms"] is None) != cpu_backend._C.has_amx() for row in saved["rows"])
