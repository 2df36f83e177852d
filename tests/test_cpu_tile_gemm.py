"""The tile GEMMs (csrc/cpu/gemm_tiles.h): bf16 x @ W^T and the backward's grad @ W from
M = 16 and past the fused kernels (backends/cpu.py route), W decoded into bf16 tiles in cache and
multiplied with AMX's tdpbf16ps. On every CPU it runs with its
tile instructions emulated (NF4LORA_CPU_GEMM=amx-emulated, csrc/cpu/tiles.h EmulatedTiles:
the SDM's semantics in plain C++), through each SIMD path's W decoder; on an AMX-BF16 CPU
also natively, against the same bound.

The bound each output meets, derived, not fitted: the weights are exactly
`dequantize_4bit(..., bfloat16)`, every product of two bf16 is exact in float32, a float32
sum of K terms is within (K - 1) 2^-24 sum|terms| of the exact one, and the result is
rounded once to bf16 (within 2^-8 of it).
"""
from __future__ import annotations

import pytest
import torch

import nf4lora
import nf4lora.functional as nf
from nf4lora._weight import PackedWeight
from nf4lora.backends import cpu as cpu_backend

from test_cpu_matmul import isa  # noqa: F401  (the ISA fixture: NF4LORA_CPU_ISA)

pytestmark = pytest.mark.skipif(cpu_backend.availability() is not None,
                                reason=str(cpu_backend.availability()))

_C = cpu_backend._C
ISAS = _C.supported_isas() if _C is not None else []
HAS_AMX = _C is not None and _C.has_amx()


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv("NF4LORA_CPU_GEMM", "amx-emulated")


def weight_of(N, K, *, blocksize=64, quant_type="nf4", nested=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed, state = nf.quantize_4bit(torch.randn(N, K, generator=gen), blocksize=blocksize,
                                     quant_type=quant_type, compress_statistics=nested)
    return PackedWeight.from_state(packed, state), nf.dequantize_4bit(packed, state)


def bf16_x(M, K, seed=1):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def tile_product(x, weight):
    y = torch.full((x.shape[0], weight.out_features), float("nan"), dtype=torch.bfloat16)
    _C.tile_gemm_4bit(x, weight, y)
    return y


def tile_grad_input(grad, weight):
    dx = torch.full((grad.shape[0], weight.in_features), float("nan"), dtype=torch.bfloat16)
    _C.tile_grad_input_4bit(grad, weight, dx)
    return dx


def assert_within_tile_bound(out, a, b, label=""):
    """out = bf16(float32 sums of a @ b) (forward: x @ W^T; grad-input: grad @ W), each
    element within the bound above."""
    exact = a.double() @ b.double()
    terms = a.double().abs() @ b.double().abs()
    summed = max(a.shape[1] - 1, 0) * 2.0 ** -24 * terms
    bound = 2.0 ** -8 * (exact.abs() + summed) + summed
    err = (out.double() - exact).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{label}: an element is {worst:.3g} past its bound (max error {err.max():.3g})"


# ---- the kernel against its bound -------------------------------------------------------

@pytest.mark.parametrize("M,N,K,blocksize", [
    (1, 1, 64, 64),         # one row of x, one of W: 15 padded rows in each tile
    (16, 16, 32, 32),       # one tile each way, one k step
    (17, 129, 256, 64),     # a second x tile of one row; a 129-row W: a second panel of 1 row
    (40, 200, 320, 64),     # x tiles 3 (a 2 x 2 block and a 1-wide one); W tiles 13
    (70, 130, 2112, 32),    # K past one chunk: 5 x tiles -> chunks of 2048 columns, then 64
    (130, 48, 4096, 256),   # 9 x tiles: chunks of 1792 columns (3 of them, the last 512)
    (33, 20, 4096, 4096),   # a block wider than the chunk target: one chunk of the block
])
def test_matches_float64(isa, emulated, M, N, K, blocksize):
    weight, W = weight_of(N, K, blocksize=blocksize)
    x = bf16_x(M, K)
    assert_within_tile_bound(tile_product(x, weight), x, W.to(torch.bfloat16).t(), f"{isa} {M}x{N}x{K}")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [32, 128, 1024])
def test_formats_and_block_constants(emulated, quant_type, nested, blocksize):
    weight, W = weight_of(37, 2048, blocksize=blocksize, quant_type=quant_type, nested=nested)
    x = bf16_x(29, 2048)
    assert_within_tile_bound(tile_product(x, weight), x, W.to(torch.bfloat16).t(), f"{quant_type} {blocksize}")


@pytest.mark.parametrize("M,N,K,blocksize", [
    (1, 1, 64, 64),         # one row of grad, one of W: padding everywhere
    (16, 32, 32, 32),       # one tile each way, one step
    (17, 129, 256, 64),     # a second grad tile of one row; N = 129: a padded pair of rows
    (40, 600, 640, 64),     # W's rows in chunks of 256 (then 88, padded to 96); panels 512 + 128
    (70, 100, 2112, 32),    # 5 panels of 512 columns, the last 64
    (130, 48, 1024, 256),   # 9 grad tiles (a 1-wide last pair)
    (33, 20, 4096, 4096),   # a block wider than the panel target: one panel of the block
])
def test_grad_input_matches_float64(isa, emulated, M, N, K, blocksize):
    weight, W = weight_of(N, K, blocksize=blocksize)
    grad = bf16_x(M, N)
    assert_within_tile_bound(tile_grad_input(grad, weight), grad, W.to(torch.bfloat16), f"{isa} {M}x{N}x{K}")


@pytest.mark.parametrize("product", [tile_product, tile_grad_input])
def test_same_bytes_for_any_thread_count_and_isa(emulated, monkeypatch, product):
    weight, _ = weight_of(600, 1088)  # 5 forward panels; 3 grad-input panels, 3 row chunks
    a = bf16_x(50, 1088 if product is tile_product else 600)
    outputs = []
    for isa in ISAS:
        monkeypatch.setenv("NF4LORA_CPU_ISA", isa)
        for threads in (1, 2, 3):
            _C.set_num_threads(threads)
            try:
                outputs.append(product(a, weight))
            finally:
                _C.set_num_threads(0)
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


def test_empty_operands(emulated):
    weight, _ = weight_of(8, 128)
    assert tile_product(torch.zeros(0, 128, dtype=torch.bfloat16), weight).shape == (0, 8)
    assert tile_grad_input(torch.zeros(0, 8, dtype=torch.bfloat16), weight).shape == (0, 128)
    no_rows = PackedWeight(torch.zeros(0, dtype=torch.uint8), torch.zeros(0), 64, "nf4", (0, 128), None)
    assert torch.equal(tile_grad_input(torch.zeros(3, 0, dtype=torch.bfloat16), no_rows),
                       torch.zeros(3, 128, dtype=torch.bfloat16))  # sums of nothing
    assert tile_product(torch.ones(3, 128, dtype=torch.bfloat16), no_rows).shape == (3, 0)


def test_float32_output_is_the_unrounded_sums(emulated):
    # (the LoRA epilogue's dtype where the CPU has no bf16 GEMM: the sums, then one rounding)
    weight, W = weight_of(40, 256)
    for a, run in [(bf16_x(20, 256), _C.tile_gemm_4bit), (bf16_x(20, 40), _C.tile_grad_input_4bit)]:
        out_features = 40 if run is _C.tile_gemm_4bit else 256
        wide = torch.empty(20, out_features)
        run(a, weight, wide)
        narrow = torch.empty(20, out_features, dtype=torch.bfloat16)
        run(a, weight, narrow)
        assert torch.equal(wide.to(torch.bfloat16), narrow)
        b = W.to(torch.bfloat16).double()
        b = b.t() if run is _C.tile_gemm_4bit else b
        exact = a.double() @ b
        assert ((wide.double() - exact).abs() <= (a.shape[1] - 1) * 2.0 ** -24 * (a.double().abs() @ b.abs())).all()


def test_subnormal_bf16_counts_as_zero_and_nonfinite_x_propagates(emulated):
    weight, W = weight_of(20, 128)
    x = bf16_x(18, 128)
    tiny = torch.tensor(1e-39).to(torch.bfloat16)  # a bf16 subnormal
    assert tiny.item() != 0
    x_tiny = x.clone()
    x_tiny[3, 5] = tiny
    x_zero = x_tiny.clone()
    x_zero[3, 5] = 0
    assert torch.equal(tile_product(x_tiny, weight), tile_product(x_zero, weight))
    x_bad = x.clone()
    x_bad[2, 7], x_bad[9, 0] = float("nan"), float("inf")
    y = tile_product(x_bad, weight)
    reference = x_bad.float() @ W.to(torch.bfloat16).float().t()
    assert torch.equal(y.isnan(), reference.isnan()) and torch.equal(y.isinf(), reference.isinf())


# ---- the route: lora_matmul_4bit, autograd ----------------------------------------------

def test_taken_only_where_named(monkeypatch):
    weight, _ = weight_of(8, 128)
    beyond = cpu_backend.fused_max_m(torch.bfloat16) + 1
    monkeypatch.delenv("NF4LORA_CPU_GEMM", raising=False)
    assert _C.tile_gemm() == ""  # auto: not until measured on an AMX CPU
    assert cpu_backend.matmul_path(beyond, weight, torch.bfloat16) == "dequantize+gemm"
    grad_beyond = cpu_backend.grad_input_fused_max_m(torch.bfloat16) + 1
    assert cpu_backend.grad_input_path(grad_beyond, weight, torch.bfloat16) == "dequantize+gemm"
    monkeypatch.setenv("NF4LORA_CPU_GEMM", "amx-emulated")
    assert cpu_backend.matmul_path(beyond, weight, torch.bfloat16) == "amx"
    assert cpu_backend.grad_input_path(grad_beyond, weight, torch.bfloat16) == "amx"
    smallest = cpu_backend.TILE_GEMM_MIN_M   # from there, before the fused kernel
    for path in (cpu_backend.matmul_path, cpu_backend.grad_input_path):
        assert path(1, weight, torch.bfloat16) == "fused"
        assert path(smallest, weight, torch.bfloat16) == "amx"
    assert cpu_backend.matmul_path(smallest - 1, weight, torch.bfloat16) == "fused"  # (fused to 24 or 32)
    with_copy = weight._replace(interleaved=torch.zeros(1, dtype=torch.uint8))  # an eval layer's
    assert cpu_backend.matmul_path(smallest, with_copy, torch.bfloat16) == "amx"
    for dtype in (torch.float16, torch.float32):  # AMX-BF16 multiplies bf16 only
        assert cpu_backend.matmul_path(64, weight, dtype) == "dequantize+gemm"
        assert cpu_backend.grad_input_path(64, weight, dtype) == "dequantize+gemm"
    rows_across_blocks, _ = weight_of(8, 100)
    assert cpu_backend.matmul_path(beyond, rows_across_blocks, torch.bfloat16) == "dequantize+gemm"
    assert cpu_backend.grad_input_path(grad_beyond, rows_across_blocks, torch.bfloat16) == "dequantize+gemm"
    monkeypatch.setenv("NF4LORA_CPU_GEMM", "dequantize")
    assert cpu_backend.matmul_path(beyond, weight, torch.bfloat16) == "dequantize+gemm"
    assert cpu_backend.grad_input_path(grad_beyond, weight, torch.bfloat16) == "dequantize+gemm"


def test_environment_is_checked(monkeypatch):
    monkeypatch.setenv("NF4LORA_CPU_GEMM", "tiles")
    with pytest.raises(RuntimeError, match="auto, amx, amx-emulated, dequantize"):
        _C.tile_gemm()
    if not HAS_AMX:
        monkeypatch.setenv("NF4LORA_CPU_GEMM", "amx")
        with pytest.raises(RuntimeError, match="amx-emulated runs the same kernel"):
            _C.tile_gemm()


def test_rejects_what_it_cannot_do(emulated, monkeypatch):
    weight, _ = weight_of(8, 128)
    with pytest.raises(ValueError, match="a bfloat16 x"):
        _C.tile_gemm_4bit(torch.zeros(2, 128, dtype=torch.float16), weight,
                          torch.empty(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="writes bfloat16 or float32"):
        _C.tile_gemm_4bit(torch.zeros(2, 128, dtype=torch.bfloat16), weight,
                          torch.empty(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="a bfloat16 grad"):
        _C.tile_grad_input_4bit(torch.zeros(2, 8), weight, torch.empty(2, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"dx must be \[M, K\]"):
        _C.tile_grad_input_4bit(torch.zeros(2, 8, dtype=torch.bfloat16), weight,
                                torch.empty(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x has 64 columns"):
        _C.tile_gemm_4bit(torch.zeros(2, 64, dtype=torch.bfloat16), weight,
                          torch.empty(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"y must be \[M, N\]"):
        _C.tile_gemm_4bit(torch.zeros(2, 128, dtype=torch.bfloat16), weight,
                          torch.empty(2, 9, dtype=torch.bfloat16))
    across, _ = weight_of(8, 100)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        _C.tile_gemm_4bit(torch.zeros(2, 100, dtype=torch.bfloat16), across,
                          torch.empty(2, 8, dtype=torch.bfloat16))
    monkeypatch.setenv("NF4LORA_CPU_GEMM", "auto")
    with pytest.raises(ValueError, match="no tile GEMM chosen"):
        _C.tile_gemm_4bit(torch.zeros(2, 128, dtype=torch.bfloat16), weight,
                          torch.empty(2, 8, dtype=torch.bfloat16))


def test_lora_matmul_forward_and_gradients(monkeypatch):
    """The LoRA op on the amx path against the dequantize+gemm path it replaces, forward
    and backward. Each path rounds float32 sums of the same products once to the GEMM's
    dtype (the sums' order differs: (len - 1) 2^-24 sum|terms| apart at most), then adds
    the same LoRA term and rounds again; so y and dx differ by at most a rounding of the
    product (where the GEMM is bf16) and one of the result, plus the orders' difference.
    The gradients of lora_A, lora_B and bias never read W: identical."""
    M, N, K, r = 40, 72, 256, 8
    gen = torch.Generator().manual_seed(3)
    packed, state = nf.quantize_4bit(torch.randn(N, K, generator=gen), blocksize=64, quant_type="nf4")
    operands = [bf16_x(M, K), (torch.randn(r, K, generator=gen) * K ** -0.5).to(torch.bfloat16),
                (torch.randn(N, r, generator=gen) * 0.1).to(torch.bfloat16),
                torch.randn(N, generator=gen).to(torch.bfloat16)]
    grad_y = bf16_x(M, N, seed=4)
    results, paths = {}, []
    for name in ("matmul_path", "grad_input_path"):
        real = getattr(cpu_backend, name)
        monkeypatch.setattr(cpu_backend, name, lambda *a, real=real: paths.append(real(*a)) or paths[-1])
    for gemm in ("amx-emulated", "dequantize"):
        monkeypatch.setenv("NF4LORA_CPU_GEMM", gemm)
        x, A, B, b = leaves = [t.clone().requires_grad_(True) for t in operands]
        y = nf4lora.lora_matmul_4bit(x, packed, state, A, B, 2.0, b)
        y.backward(grad_y)
        results[gemm] = y.detach(), [t.grad for t in leaves]
    (y_tiles, grads_tiles), (y_dense, grads_dense) = results["amx-emulated"], results["dequantize"]
    W = nf.dequantize_4bit(packed, state).to(torch.bfloat16).double()
    eps = torch.finfo(torch.bfloat16).eps
    # a bf16 GEMM: both paths round the product to bf16; else the other path sums float32
    # weights, the tile GEMM bf16 ones (within 2^-8 of them)
    native = cpu_backend._native_16bit_gemm(torch.bfloat16)
    for got, want, a, b in [(y_tiles, y_dense, operands[0], W.t()), (grads_tiles[0], grads_dense[0], grad_y, W)]:
        product, terms = a.double() @ b, a.double().abs() @ b.abs()
        orders = 2 * (a.shape[1] - 1) * 2.0 ** -24 * terms
        allowed = eps * want.double().abs() + (eps * product.abs() if native else 2.0 ** -8 * terms) + orders
        assert ((got.double() - want.double()).abs() <= allowed).all()
    assert paths == ["amx", "amx", "dequantize+gemm", "dequantize+gemm"]  # forward, grad-input
    for got, want in zip(grads_tiles[1:], grads_dense[1:]):
        assert torch.equal(got, want)


def test_linear4bit_layer_takes_it(emulated, monkeypatch):
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 96)
    layer = nf4lora.nn.Linear4bit(256, 96, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    x = bf16_x(2 * cpu_backend.fused_max_m(torch.bfloat16), 256)
    paths = []
    real = cpu_backend.matmul_path
    monkeypatch.setattr(cpu_backend, "matmul_path", lambda *a: paths.append(real(*a)) or paths[-1])
    y = layer(x)
    assert paths == ["amx"]
    # the product in the GEMM's dtype (float32 where the CPU has no bf16 GEMM), then the bias
    weight = PackedWeight.from_state(layer.weight.data, layer.weight.quant_state)
    product = torch.empty(x.shape[0], 96, dtype=cpu_backend._compute_dtype(torch.bfloat16))
    _C.tile_gemm_4bit(x, weight, product)
    assert torch.equal(y, (product + layer.bias.to(product.dtype)).to(torch.bfloat16))
    W = nf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert_within_tile_bound(tile_product(x, weight), x, W.t())


# ---- native AMX (AMX-BF16 CPUs only) ------------------------------------------------------

@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX-BF16 (or the OS did not grant it)")
@pytest.mark.parametrize("product", ["forward", "grad_input"])
@pytest.mark.parametrize("M,N,K,blocksize", [(17, 129, 256, 64), (130, 48, 4096, 256), (40, 600, 2112, 32)])
def test_native_amx_matches_float64(monkeypatch, product, M, N, K, blocksize):
    weight, W = weight_of(N, K, blocksize=blocksize)
    W = W.to(torch.bfloat16)
    a, b, run = ((bf16_x(M, K), W.t(), tile_product) if product == "forward"
                 else (bf16_x(M, N), W, tile_grad_input))
    monkeypatch.setenv("NF4LORA_CPU_GEMM", "amx")
    assert_within_tile_bound(run(a, weight), a, b, f"amx {product}")
    _C.set_num_threads(1)
    try:
        assert_within_tile_bound(run(a, weight), a, b, f"amx {product}, one thread")
    finally:
        _C.set_num_threads(0)


def test_info_says_which_tile_gemm(monkeypatch, capsys):
    from nf4lora import cli
    monkeypatch.delenv("NF4LORA_CPU_GEMM", raising=False)
    assert cli.main(["info"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "cpu tile GEMM" in line]
    assert ("none by default" if HAS_AMX else "none: no AMX-BF16 here") in line
    monkeypatch.setenv("NF4LORA_CPU_GEMM", "amx-emulated")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "its tile instructions emulated" in out
    # the tables' columns are M = 1, 2, 4, 8, 16, 24, 32: the tile GEMM from M = 16, and
    # below where the fused kernel stops (grad-input: M = 8 with a native bf16 GEMM)
    forward, grad_input = [line.split()[1:] for line in out.splitlines() if line.strip().startswith("bfloat16")]
    assert forward[4:] == grad_input[4:] == ["amx"] * 3 and "amx" not in forward[:4]
    assert ("amx" in grad_input[:4]) == (8 > cpu_backend.grad_input_fused_max_m(torch.bfloat16))
