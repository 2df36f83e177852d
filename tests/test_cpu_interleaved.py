"""The CPU kernels' interleaved copy of a weight (csrc/weight.h, `_C.interleave_4bit`,
`backends.cpu.interleave`) and its life in an eval-mode Linear4bit.

The copy's bytes are checked against the layout written out here in torch ops; the fused
kernel that reads it is checked against float64 in tests/test_cpu_matmul.py (its `layout`
fixture) and under SIMDe emulation (scripts/check_avx512_emulated.sh, cmp_gemv).
"""
from __future__ import annotations

import pytest
import torch

import nf4lora.functional as nf
from nf4lora import reference
from nf4lora._weight import _CACHE_ATTRIBUTE, PackedWeight
from nf4lora.backends import cpu as cpu_backend
from nf4lora.nn import Linear4bit

from conftest import interleaved_copy

pytestmark = pytest.mark.skipif(cpu_backend.availability() is not None,
                                reason=str(cpu_backend.availability()))

ROWS, COLUMNS = 16, 64   # a tile's rows, a group's columns (csrc/weight.h)


def has_kernel() -> bool:
    return cpu_backend._C is not None and cpu_backend._C.has_interleaved_gemv()


def weight_of(out_f, in_f, *, blocksize=64, nested=True, quant_type="nf4", seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed, state = nf.quantize_4bit(torch.randn(out_f, in_f, generator=gen), blocksize=blocksize,
                                     quant_type=quant_type, compress_statistics=nested)
    return packed, state, PackedWeight.from_state(packed, state)


copy_of = interleaved_copy


def expected_copy(weight) -> torch.Tensor:
    """csrc/weight.h's layout: per tile of 16 rows (zero-padded) and group g of 64 columns,
    8 chunks of 32 16-bit words (word 2j + h of chunk c holds, at bits 4s, the code of row j,
    column 64 g + 8 c + 2 s + h), then the 16 rows' block constants as float32."""
    N, K = weight.shape
    tiles, groups = -(-N // ROWS), K // COLUMNS
    flat = weight.packed[: N * K // 2].to(torch.int32)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(N, K)   # high nibble first
    codes = torch.cat([codes, codes.new_zeros(tiles * ROWS - N, K)])
    # [tile, j, g, c, s, h] -> [tile, g, c, j, h, s]
    c = codes.view(tiles, ROWS, groups, 8, 4, 2).permute(0, 2, 3, 1, 5, 4)
    words = (c << torch.tensor([0, 4, 8, 12])).sum(-1).to(torch.int32)          # [t, g, c, j, h]
    word_bytes = torch.stack([words & 0xFF, words >> 8], -1).to(torch.uint8)    # little endian
    word_bytes = word_bytes.reshape(tiles, groups, 8 * 2 * ROWS * 2)
    absmax = weight.absmax
    if weight.nested is not None:
        n = weight.nested
        absmax = reference.dequantize_absmax(weight.absmax, n.absmax, n.code, n.offset, n.blocksize)
    per_group = absmax.repeat_interleave(weight.blocksize // COLUMNS).view(N, groups)
    per_group = torch.cat([per_group, per_group.new_zeros(tiles * ROWS - N, groups)])
    constants = per_group.view(tiles, ROWS, groups).permute(0, 2, 1).contiguous()
    constant_bytes = constants.view(torch.uint8).view(tiles, groups, ROWS * 4)
    return torch.cat([word_bytes, constant_bytes], -1).reshape(-1)


@pytest.mark.parametrize("out_f,in_f,blocksize,nested,quant_type", [
    (1, 64, 64, True, "nf4"), (16, 64, 64, False, "nf4"), (17, 128, 128, True, "fp4"),
    (45, 320, 64, True, "nf4"), (33, 1024, 1024, False, "af4"), (300, 512, 256, True, "nf4"),
])
def test_copy_is_the_layout(out_f, in_f, blocksize, nested, quant_type):
    # (300 x 512 at blocksize 256: nested groups of 256 blocks start mid-tile)
    _, _, weight = weight_of(out_f, in_f, blocksize=blocksize, nested=nested, quant_type=quant_type)
    got = copy_of(weight)
    assert got.numel() == cpu_backend._C.interleaved_bytes(out_f, in_f)
    assert torch.equal(got, expected_copy(weight))


def test_copy_is_the_same_for_any_thread_count():
    _, _, weight = weight_of(1000, 512)
    try:
        copies = []
        for threads in (1, 2):
            cpu_backend._C.set_num_threads(threads)
            copies.append(copy_of(weight))
    finally:
        cpu_backend._C.set_num_threads(0)
    assert torch.equal(copies[0], copies[1])


def test_interleave_refuses_what_it_cannot_lay_out():
    _, _, weight = weight_of(8, 96, blocksize=32)
    out = torch.empty(4096, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiples of 64"):
        cpu_backend._C.interleave_4bit(weight, out)
    _, _, weight = weight_of(8, 128)
    with pytest.raises(ValueError, match="out holds"):
        cpu_backend._C.interleave_4bit(weight, torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        cpu_backend._C.interleave_4bit(weight, torch.empty(4096, dtype=torch.int32))
    assert cpu_backend.interleave(weight_of(8, 96, blocksize=32)[2]) is None


def test_kernel_checks_the_copy_it_is_given():
    _, _, weight = weight_of(32, 128)
    x, y, h = torch.randn(1, 128).bfloat16(), torch.empty(1, 32, dtype=torch.bfloat16), torch.empty(1, 0)
    short = weight._replace(interleaved=torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="interleaved weight holds 100"):
        cpu_backend._C.lora_gemv_4bit(x, short, None, None, 1.0, None, y, h)
    wrong = weight._replace(interleaved=torch.zeros(4608, dtype=torch.int16))
    with pytest.raises(ValueError, match="interleaved weight must be torch.uint8"):
        cpu_backend._C.lora_gemv_4bit(x, wrong, None, None, 1.0, None, y, h)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 2, 3, 9])
def test_kernel_reads_the_copy_where_it_has_one(monkeypatch, isa, dtype, M):
    # A zeroed copy gives y = bias where the copy is read (AVX2 and AVX-512 at every M, the
    # AVX2 tile's halves together or one by one, 16-bit x), and changes nothing where it is
    # not (scalar, float32 x, NF4LORA_CPU_GEMV=float).
    if isa not in cpu_backend._C.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    monkeypatch.setenv("NF4LORA_CPU_ISA", isa)
    _, _, weight = weight_of(40, 256)
    x = torch.randn(M, 256).to(dtype)
    bias = torch.randn(40).to(dtype)

    def run(w):
        y, h = torch.empty(M, 40, dtype=dtype), torch.empty(M, 0, dtype=dtype)
        cpu_backend._C.lora_gemv_4bit(x, w, None, None, 1.0, bias, y, h)
        return y

    rows = run(weight)
    zeroed = run(weight._replace(interleaved=torch.zeros_like(copy_of(weight))))
    assert cpu_backend._C.has_interleaved_gemv() == (isa != "scalar")
    reads_it = isa != "scalar" and dtype != torch.float32
    assert cpu_backend._C.reads_interleaved(dtype) == reads_it
    if reads_it:
        assert torch.equal(zeroed, bias.expand(M, 40))
        # int8 sums on the copy where the ISA has them (avx512bf16), int16 elsewhere
        monkeypatch.setenv("NF4LORA_CPU_GEMV", "int8")
        assert cpu_backend._C.reads_interleaved(dtype)
        assert torch.equal(run(weight._replace(interleaved=torch.zeros_like(copy_of(weight)))), bias.expand(M, 40))
        monkeypatch.setenv("NF4LORA_CPU_GEMV", "float")
        assert torch.equal(run(weight._replace(interleaved=torch.zeros_like(copy_of(weight)))), run(weight))
    else:
        assert torch.equal(zeroed, rows)


def test_weight_slices_leave_the_copy_behind():
    _, _, weight = weight_of(32, 256)
    weight = weight._replace(interleaved=copy_of(weight))
    assert weight.rows(0, 16).interleaved is None
    assert weight.with_absmax_decoded().columns(0, 128).interleaved is None
    assert weight.with_offset_read().interleaved is not None   # the same weight


# ---- an eval-mode Linear4bit ---------------------------------------------------------

def kept_copy(layer):
    cached = getattr(layer.weight.quant_state, _CACHE_ATTRIBUTE, None)
    return None if cached is None else cached[2].interleaved


def layer_of(out_f=48, in_f=256, seed=0):
    torch.manual_seed(seed)
    layer = Linear4bit(in_f, out_f, quant_type="nf4", compute_dtype=torch.bfloat16)
    layer.weight.data.normal_()
    return layer.to("cpu")


@pytest.mark.skipif(not has_kernel(), reason="this CPU's ISA has no kernel for the copy")
def test_eval_layer_keeps_a_copy_and_train_drops_it():
    layer = layer_of()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y_train = layer(x)
        assert kept_copy(layer) is None
        state_before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.eval()
        y_eval = layer(x)
        copy = kept_copy(layer)
        assert copy is not None and torch.equal(copy, copy_of(PackedWeight.from_state(layer.weight, layer.weight.quant_state)))
        layer(x)
        assert kept_copy(layer) is copy                       # made once
        assert not torch.equal(y_eval, y_train)               # the other kernel ran
        torch.testing.assert_close(y_eval, y_train, rtol=0.02, atol=0.02)
        state_after = layer.state_dict()
        assert state_after.keys() == state_before.keys()       # the state dict is the format's
        assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
        layer.train()
        assert kept_copy(layer) is None
        assert torch.equal(layer(x), y_train)


@pytest.mark.skipif(not has_kernel(), reason="this CPU's ISA has no kernel for the copy")
def test_eval_copy_follows_a_new_weight():
    layer, other = layer_of(seed=0), layer_of(seed=1)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        other.eval()
        expected = other(x)
        layer.eval()
        layer(x)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), expected)


@pytest.mark.skipif(not has_kernel(), reason="this CPU's ISA has no kernel for the copy")
def test_a_write_into_the_codes_drops_the_copy():
    packed, state, weight = weight_of(32, 256)
    PackedWeight.keep_interleaved(packed, state, cpu_backend.interleave)
    assert PackedWeight.from_state(packed, state).interleaved is not None
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        packed.view(-1)[:64] = 0x77     # an in-place write: the version counter moves
    kept = PackedWeight.from_state(packed, state)
    assert kept.interleaved is None
    y = cpu_backend.lora_matmul_4bit(x, kept.with_offset_read(), None, None, 1.0, None)[0]
    W = nf.dequantize_4bit(packed, state).double()
    torch.testing.assert_close(y.double(), x.double() @ W.t(), rtol=0.02, atol=0.05)


def test_no_copy_when_turned_off_or_without_the_kernel(monkeypatch):
    monkeypatch.setenv("NF4LORA_CPU_INTERLEAVE", "0")
    layer = layer_of().eval()
    with torch.no_grad():
        layer(torch.randn(1, 256, dtype=torch.bfloat16))
    assert kept_copy(layer) is None
    monkeypatch.delenv("NF4LORA_CPU_INTERLEAVE")
    monkeypatch.setenv("NF4LORA_CPU_ISA", "scalar")
    layer = layer_of().eval()
    with torch.no_grad():
        layer(torch.randn(1, 256, dtype=torch.bfloat16))
    assert kept_copy(layer) is None


@pytest.mark.skipif(not has_kernel(), reason="this CPU's ISA has no kernel for the copy")
def test_no_copy_for_float32_compute():
    # float32 x takes the float decoder on the bitsandbytes layout: a copy would be 0.56
    # bytes per weight that no call reads
    layer = layer_of()
    layer.compute_dtype = torch.float32
    layer.eval()
    x = torch.randn(3, 256)
    with torch.no_grad():
        y = layer(x)
    assert kept_copy(layer) is None
    assert not cpu_backend.reads_interleaved(torch.float32)
    assert cpu_backend.reads_interleaved(torch.bfloat16) and cpu_backend.reads_interleaved(torch.float16)
    W = nf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    expected = x.double() @ W.t() + layer.bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():   # a 16-bit call later: the copy is made then
        layer.compute_dtype = torch.bfloat16
        layer(x.bfloat16())
    assert kept_copy(layer) is not None


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512bf16"])
def test_info_says_whether_eval_layers_interleave(monkeypatch, capsys, isa):
    if isa not in cpu_backend._C.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    from nf4lora import cli
    monkeypatch.setenv("NF4LORA_CPU_ISA", isa)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "eval-mode Linear4bit on CPU" in l)
    assert line.split(": ", 1)[1].startswith("no" if isa == "scalar" else "yes")
    if isa != "scalar":   # up to which M calls read it, with which sums
        assert f"read by every fused call, M <= {cpu_backend.FUSED_MAX_M_INTERLEAVED};" in out
        assert "(int16 sums, 16-bit x)" in line
        monkeypatch.setenv("NF4LORA_CPU_GEMV", "int8")
        assert cli.main(["info"]) == 0
        out = capsys.readouterr().out
        line = next(l for l in out.splitlines() if "eval-mode Linear4bit on CPU" in l)
        assert ("int8 sums" in line) == (isa == "avx512bf16")
        if isa == "avx512bf16":
            assert f"read by every fused call, M <= {cpu_backend.FUSED_MAX_M_INTERLEAVED_INT8};" in out
        monkeypatch.delenv("NF4LORA_CPU_GEMV")
    monkeypatch.setenv("NF4LORA_CPU_INTERLEAVE", "0")
    assert cli.main(["info"]) == 0
    assert "eval-mode Linear4bit on CPU: no" in capsys.readouterr().out


@pytest.mark.skipif(not has_kernel(), reason="this CPU's ISA has no kernel for the copy")
def test_copies_and_pickles_leave_the_copy_behind():
    import copy
    import pickle
    layer = layer_of(64, 512)
    size = len(pickle.dumps(layer))
    layer.eval()
    with torch.no_grad():
        y = layer(torch.ones(1, 512, dtype=torch.bfloat16))
    assert kept_copy(layer) is not None
    assert len(pickle.dumps(layer)) < size + 1024        # the copy (18 KiB) is not in it
    twin = copy.deepcopy(layer)
    assert kept_copy(twin) is None
    with torch.no_grad():
        assert torch.equal(twin(torch.ones(1, 512, dtype=torch.bfloat16)), y)
    assert kept_copy(twin) is not None and kept_copy(twin).data_ptr() != kept_copy(layer).data_ptr()


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512bf16"])
def test_a_copy_keeps_the_fused_path_to_a_larger_m(monkeypatch, isa):
    # where the copy is read (AVX2, AVX-512), the fused path goes to FUSED_MAX_M_INTERLEAVED
    if isa not in cpu_backend._C.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    monkeypatch.setenv("NF4LORA_CPU_ISA", isa)
    _, _, weight = weight_of(32, 256)
    with_copy = weight._replace(interleaved=copy_of(weight))
    assert cpu_backend._C.reads_interleaved(torch.bfloat16) == (isa != "scalar")
    assert not cpu_backend._C.reads_interleaved(torch.float32)
    reads = isa != "scalar"
    largest = cpu_backend.FUSED_MAX_M_INTERLEAVED if reads else cpu_backend.fused_max_m(torch.bfloat16)
    assert cpu_backend.fused_max_m(torch.bfloat16, with_copy) == largest
    assert cpu_backend.matmul_path(largest, with_copy, torch.bfloat16) == "fused"
    assert cpu_backend.matmul_path(largest + 1, with_copy, torch.bfloat16) == "dequantize+gemm"
    assert cpu_backend.fused_max_m(torch.bfloat16, weight) == cpu_backend.fused_max_m(torch.bfloat16)
    assert cpu_backend.fused_max_m(torch.float32, with_copy) == cpu_backend.fused_max_m(torch.float32)
    # the opt-in int8 sums (avx512bf16) keep the fused path further; elsewhere int8 is int16
    monkeypatch.setenv("NF4LORA_CPU_GEMV", "int8")
    int8_largest = cpu_backend.FUSED_MAX_M_INTERLEAVED_INT8 if isa == "avx512bf16" else largest
    assert cpu_backend.fused_max_m(torch.bfloat16, with_copy) == int8_largest
    assert cpu_backend.matmul_path(int8_largest, with_copy, torch.bfloat16) == "fused"
    assert cpu_backend.matmul_path(int8_largest + 1, with_copy, torch.bfloat16) == "dequantize+gemm"
    assert cpu_backend.fused_max_m(torch.bfloat16, weight) == cpu_backend.fused_max_m(torch.bfloat16)
    monkeypatch.setenv("NF4LORA_CPU_GEMV", "float")   # another decoder: the row layout's limits
    assert not cpu_backend._C.reads_interleaved(torch.bfloat16)
    assert cpu_backend.fused_max_m(torch.bfloat16, with_copy) == cpu_backend.fused_max_m(torch.bfloat16)


@pytest.mark.skipif(not {"avx2", "avx512bf16"} <= set(cpu_backend._C.supported_isas())
                    if cpu_backend._C is not None else True,
                    reason="needs a CPU that runs both AVX2 and AVX512-BF16")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("out_f, in_f, blocksize", [(16, 64, 64), (45, 192, 64), (70, 1024, 256)])
def test_avx2_and_avx512_kernels_give_the_same_bytes(monkeypatch, dtype, M, out_f, in_f, blocksize):
    # The AVX2 kernel walks a tile as two halves of 8 rows (together up to 2 rows of x, one
    # by one beyond) and adds each row's two int32 lanes before the fold
    # (gemv_interleaved.h): each fold's sum is the AVX-512 kernel's exactly, so are the
    # bytes, LoRA term and bias included.
    _, _, weight = weight_of(out_f, in_f, blocksize=blocksize, seed=M)
    weight = weight._replace(interleaved=copy_of(weight))
    gen = torch.Generator().manual_seed(out_f + M)
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    A = (torch.randn(8, in_f, generator=gen) / 8).to(dtype)
    B = (torch.randn(out_f, 8, generator=gen) / 8).to(dtype)
    bias = torch.randn(out_f, generator=gen).to(dtype)
    outputs = {}
    for isa in ("avx2", "avx512bf16"):
        monkeypatch.setenv("NF4LORA_CPU_ISA", isa)
        assert cpu_backend._C.reads_interleaved(dtype)
        y, h = torch.empty(M, out_f, dtype=dtype), torch.empty(M, 8, dtype=dtype)
        cpu_backend._C.lora_gemv_4bit(x, weight, A, B, 0.5, bias, y, h)
        outputs[isa] = y
    assert torch.equal(outputs["avx2"], outputs["avx512bf16"])
