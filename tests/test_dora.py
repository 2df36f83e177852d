"""DoRA on a 4-bit weight (issue 15, item 1): nf4lora.dora_matmul_4bit, its norms
(row_sq_norms_4bit, dora_row_norms_4bit) and its op, against float64 autograd through the
spec (nf4lora.reference.dora_matmul_4bit on the dequantized weight), every dtype, every
gradient (x, lora_A, lora_B, bias, magnitude), odd shapes, on every backend usable here
(the Triton kernels through the interpreter); bad input is a clear error."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():   # before the first Triton import: see test_triton_matmul.py
    os.environ["TRITON_INTERPRET"] = "1"

import nf4lora  # noqa: E402
import nf4lora.functional as nf  # noqa: E402
from nf4lora import _ops, autograd, backends, reference  # noqa: E402
from nf4lora._weight import PackedWeight  # noqa: E402
from nf4lora.backends import composite  # noqa: E402

from conftest import DTYPES  # noqa: E402


def quantized(out_f, in_f, seed=0, nested=True, blocksize=64, quant_type="nf4"):
    gen = torch.Generator().manual_seed(seed)
    packed, state = nf.quantize_4bit(torch.randn(out_f, in_f, generator=gen), blocksize=blocksize,
                                     compress_statistics=nested, quant_type=quant_type)
    return packed, state, nf.dequantize_4bit(packed, state).double()


def operands(dtype, M=5, in_f=192, out_f=37, r=4, seed=0, nested=True):
    packed, state, W = quantized(out_f, in_f, seed, nested)
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = [torch.randn(M, in_f, generator=gen), torch.randn(r, in_f, generator=gen) * 0.1,
               torch.randn(out_f, r, generator=gen) * 0.1, torch.randn(out_f, generator=gen)]
    magnitude = (torch.rand(out_f, generator=gen) + 0.5) * W.norm(dim=1).float()
    return (packed, state, W, [t.to(dtype).requires_grad_() for t in tensors]
            + [magnitude.requires_grad_()])


def check_close(ours, truth, baseline, dtype, label):
    """Ours within twice the same-dtype baseline's own error against float64, plus one ulp
    of the scale (flash-attention's rule, as every matmul test here)."""
    err = (ours.double() - truth).abs().max().item()
    base_err = (baseline.double() - truth).abs().max().item()
    ulp = torch.finfo(dtype).eps
    assert err <= 2 * base_err + ulp * truth.abs().max().item(), (label, err, base_err)


def run_and_compare(dtype, M, in_f=192, out_f=37, r=4, nested=True, scaling=2.0, x_shape=None,
                    backend=None):
    """The DoRA matmul (on `backend`, else the current one; the weight is quantized before
    switching) against float64 and the same-dtype baseline, forward and every gradient."""
    packed, state, W, (x, A, B, bias, m) = operands(dtype, M, in_f, out_f, r, nested=nested)
    if x_shape is not None:
        x = x.detach().reshape(*x_shape, in_f).requires_grad_()
    previous = nf4lora.get_backend()
    nf4lora.set_backend(backend or previous)
    try:
        y = nf4lora.dora_matmul_4bit(x, packed, state, A, B, scaling, m, bias)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
        y.backward(grad.to(dtype))
    finally:
        nf4lora.set_backend(previous)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], out_f)
    exact_in = [t.detach().double().requires_grad_() for t in (x, A, B, bias, m)]
    exact = reference.dora_matmul_4bit(exact_in[0].reshape(-1, in_f), W, *exact_in[1:3], scaling,
                                       exact_in[4], exact_in[3])
    exact.backward(grad.double().reshape(-1, out_f))
    # same-dtype baseline: the spec on W rounded to dtype, in dtype (what PEFT computes on a
    # dense layer), the magnitude float32 as PEFT keeps it
    base_in = [t.detach().clone().requires_grad_() for t in (x, A, B, bias, m)]
    base = reference.dora_matmul_4bit(base_in[0].reshape(-1, in_f), W.to(dtype), *base_in[1:3],
                                      scaling, base_in[4], base_in[3])
    base.backward(grad.to(dtype).reshape(-1, out_f))
    check_close(y.detach().reshape(-1, out_f), exact.detach(), base.detach(), dtype, "y")
    for name, ours, truth, baseline in zip(("x", "lora_A", "lora_B", "bias", "magnitude"),
                                           (x, A, B, bias, m), exact_in, base_in):
        assert ours.grad is not None and ours.grad.dtype == ours.dtype, name
        check_close(ours.grad, truth.grad, baseline.grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 40])   # M + r rows: the fused kernel and dequantize + GEMM
def test_dora_forward_and_gradients_match_the_spec(backend, dtype, M):
    run_and_compare(dtype, M)


@pytest.mark.parametrize("r", [1, 70])
@pytest.mark.parametrize("in_f,out_f,nested", [(192, 37, False), (100, 33, True), (64, 1, True)])
def test_dora_odd_shapes_and_ranks(r, in_f, out_f, nested):
    # in 100: blocks span rows (no fused CPU kernel); out 1; r 70 > in for the smallest
    run_and_compare(torch.bfloat16, 3, in_f, out_f, r, nested)


def test_dora_leading_dims_and_empty_batch():
    run_and_compare(torch.float32, 6, x_shape=(2, 3))
    packed, state, _, (x, A, B, bias, m) = operands(torch.float32, M=0)
    y = nf4lora.dora_matmul_4bit(x, packed, state, A, B, 2.0, m, bias)
    y.sum().backward()
    assert y.shape == (0, 37) and torch.count_nonzero(m.grad) == 0 and torch.count_nonzero(A.grad) == 0


def test_dora_norm_is_detached():
    """DoRA section 4.3: with the norm detached, lora_A/lora_B get only the row-scaled LoRA
    gradient. Differentiating through the norm changes dA noticeably here, so the spec
    comparison above could not pass with an attached norm; this pins the difference."""
    packed, state, W, (x, A, B, bias, m) = operands(torch.float32, M=4)
    B = (B.detach() * 20).requires_grad_()     # a delta large enough to move the norms
    nf4lora.dora_matmul_4bit(x, packed, state, A, B, 2.0, m, bias).sum().backward()
    attached_A = A.detach().double().requires_grad_()
    norm = reference.dora_row_norms(W, attached_A, B.detach().double(), 2.0)
    y = reference.lora_matmul_4bit(x.detach().double(), W, attached_A, B.detach().double(), 2.0,
                                   bias.detach().double(), row_scale=m.detach().double() / norm)[0]
    y.sum().backward()
    assert (A.grad.double() - attached_A.grad).abs().max() > 1e-2


def test_dora_without_grad_matches_the_autograd_path():
    packed, state, _, (x, A, B, bias, m) = operands(torch.bfloat16, M=3)
    y = nf4lora.dora_matmul_4bit(x, packed, state, A, B, 2.0, m, bias)
    with torch.no_grad():
        y0 = nf4lora.dora_matmul_4bit(x, packed, state, A, B, 2.0, m, bias)
    assert torch.equal(y.detach(), y0)


def test_a_fresh_adapter_has_row_scale_one():
    """magnitude = ||W||_row and B = 0 (PEFT's init): the forward's norm equals the magnitude
    to the bit (both come from row_sq_norms_4bit, the cross terms are exactly 0), so the
    row scale is exactly 1 and a fresh DoRA layer is its LoRA layer."""
    packed, state, _, (x, A, _, _, _) = operands(torch.bfloat16, M=4)
    B = torch.zeros(37, 4, dtype=torch.bfloat16)
    m = nf4lora.dora_row_norms_4bit(packed, state, A.float(), B.float(), 2.0)
    weight = PackedWeight.from_state(packed, state)
    sq = nf4lora.row_sq_norms_4bit(packed, state)
    _, _, norm = autograd._dora_forward(x.detach(), weight, A.detach(), B, 2.0, sq)
    assert torch.equal(norm, m) and torch.equal(m, sq.sqrt())


# --- the norms -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 192), (33, 100), (1, 1), (0, 64), (5, 0), (300, 96)])
@pytest.mark.parametrize("nested", [False, True])
def test_row_sq_norms_match_the_spec(backend, shape, nested, monkeypatch):
    # chunks of 2048 elements: several chunks, each starting on a block boundary
    monkeypatch.setattr(composite, "CHUNK_ELEMENTS", 2048)
    if 0 in shape:
        packed, state = nf.quantize_4bit(torch.randn(shape), blocksize=64,
                                         compress_statistics=nested)
        W = torch.zeros(shape, dtype=torch.float64)
    else:
        packed, state, W = quantized(*shape, nested=nested)
    ours = nf4lora.row_sq_norms_4bit(packed, state)
    assert ours.dtype == torch.float32 and ours.shape == (shape[0],)
    exact = W.square().sum(1)
    assert torch.allclose(ours.double(), exact, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


def test_row_sq_norms_read_w_in_bounded_chunks(monkeypatch):
    """The chunked pass never dequantizes more than CHUNK_ELEMENTS (rounded up to whole
    blocks) at once: no full-precision W."""
    monkeypatch.setattr(composite, "CHUNK_ELEMENTS", 1024)
    packed, state, W = quantized(300, 96, nested=True)   # blocks span rows: granule 2 rows
    backend = backends.backend_for(torch.device("cpu"), "nf4")
    sizes = []
    original = backend.dequantize_4bit
    monkeypatch.setattr(backend, "dequantize_4bit", lambda w, out: (sizes.append(out.numel()),
                                                                    original(w, out))[1])
    nf4lora.row_sq_norms_4bit(packed, state)
    assert len(sizes) > 1 and max(sizes) <= 1024


@pytest.mark.parametrize("dtype", DTYPES)
def test_dora_row_norms_match_the_spec(backend, dtype):
    packed, state, W, (_, A, B, _, _) = operands(dtype, r=6)
    ours = nf4lora.dora_row_norms_4bit(packed, state, A, B, 2.0)
    exact = reference.dora_row_norms(W, A.detach().double(), B.detach().double(), 2.0)
    base = reference.dora_row_norms(W.to(dtype), A.detach(), B.detach(), 2.0)
    check_close(ours, exact, base, dtype, "norm")


def test_row_sq_norms_through_the_registered_op():
    packed, state, W = quantized(37, 192)
    weight = PackedWeight.from_state(packed, state)
    torch.library.opcheck(torch.ops.nf4lora.row_sq_norms_4bit.default, weight.op_args())
    assert torch.equal(torch.ops.nf4lora.row_sq_norms_4bit(*weight.op_args()),
                       _ops.row_sq_norms_4bit_impl(weight))


def test_dora_compiles_to_the_same_result():
    packed, state, _, (x, A, B, bias, m) = operands(torch.float32, M=3)
    args = (x.detach(), packed, state, A.detach(), B.detach(), 2.0, m.detach(), bias.detach())
    compiled = torch.compile(nf4lora.dora_matmul_4bit, backend="eager", fullgraph=True)
    assert torch.equal(compiled(*args), nf4lora.dora_matmul_4bit(*args))


def test_dora_on_triton_kernels_under_the_interpreter():
    reason = backends.availability("triton")
    if reason is not None or "cpu" not in backends._module("triton").DEVICE_TYPES:
        pytest.skip(f"Triton's interpreter unavailable here: {reason}")
    run_and_compare(torch.float32, 3, in_f=128, out_f=20, r=4, backend="triton")


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("edit,error,match", [
    (dict(m=torch.ones(36)), ValueError, r"magnitude must have shape \[out_features=37\]"),
    (dict(m=torch.ones(37, dtype=torch.int64)), TypeError, "magnitude"),
    (dict(sq=torch.ones(37, dtype=torch.float64)), TypeError, "weight_sq_norms must be torch.float32"),
    (dict(sq=torch.ones(5)), ValueError, r"weight_sq_norms must have shape"),
    (dict(scaling=torch.tensor(2.0)), TypeError, "scaling must be a Python number"),
    (dict(A=None), ValueError, "lora_A and lora_B are required"),
])
def test_bad_dora_input_is_a_clear_error(edit, error, match):
    packed, state, _, (x, A, B, bias, m) = operands(torch.float32)
    args = dict(A=A, m=m, sq=None, scaling=2.0) | edit
    with pytest.raises(error, match=match):
        nf4lora.dora_matmul_4bit(x, packed, state, args["A"], B, args["scaling"], args["m"], bias,
                                 weight_sq_norms=args["sq"])


# --- the layers: LoraLinear4bit(use_dora=True), add_lora(use_dora=True) ---------------------

def dora_layer(dtype=torch.float32, dropout=0.0, seed=0):
    from nf4lora.nn import Linear4bit, LoraLinear4bit
    torch.manual_seed(seed)
    dense = torch.nn.Linear(96, 40)
    base = Linear4bit(96, 40, quant_type="nf4", compute_dtype=dtype)
    base.load_state_dict(dense.state_dict())
    layer = LoraLinear4bit(base, 4, 8, lora_dropout=dropout, use_dora=True)
    with torch.no_grad():   # as if trained: B nonzero, magnitudes away from the norms
        layer.lora_B.weight.normal_(std=0.05)
        layer.lora_magnitude_vector.weight.mul_(torch.rand(40) + 0.5)
    return layer


def layer_spec(layer, x, dropped=None):
    """PEFT's DoRA layer in float64 on the dequantized weight: base(x) + (f - 1) base(xd) +
    f s B A xd, f = m / ||W + s B A||_row, xd = dropout(x) (x without dropout)."""
    base = layer.base_layer
    W = base.dequantized_weight(torch.float32).double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    f = layer.lora_magnitude_vector.weight.double() / reference.dora_row_norms(W, A, B, layer.scaling)
    x, xd = x.double(), (x if dropped is None else dropped).double()
    return (torch.nn.functional.linear(x, W, base.bias.double()) + (f - 1) * (xd @ W.t())
            + f * layer.scaling * (xd @ A.t() @ B.t()))


def test_dora_layer_starts_as_its_base_layer():
    from nf4lora.nn import Linear4bit, LoraLinear4bit
    base = Linear4bit(96, 40, quant_type="nf4", compute_dtype=torch.float32)
    layer = LoraLinear4bit(base, 4, 8, use_dora=True)
    W = base.dequantized_weight(torch.float32).double()
    torch.testing.assert_close(layer.lora_magnitude_vector.weight.double(), W.norm(dim=1),
                               rtol=1e-6, atol=0)
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} >= {
        "lora_A.weight", "lora_B.weight", "lora_magnitude_vector.weight"}


def test_dora_layer_forward_and_magnitude_gradient_match_peft_s_math():
    layer = dora_layer()
    x = torch.randn(5, 96)
    y = layer(x)
    torch.testing.assert_close(y.double(), layer_spec(layer, x), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    m = layer.lora_magnitude_vector.weight
    exact_m = m.detach().double().requires_grad_()
    W = layer.base_layer.dequantized_weight(torch.float32).double()
    A, B = layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double()
    f = exact_m / reference.dora_row_norms(W, A, B, layer.scaling)
    (f * (x.double() @ W.t() + layer.scaling * x.double() @ A.t() @ B.t())).sum().backward()
    torch.testing.assert_close(m.grad.double(), exact_m.grad, rtol=1e-4, atol=1e-4)


def test_dora_layer_with_dropout_follows_peft():
    layer = dora_layer(dropout=0.3).train()
    x = torch.randn(4, 96)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    dropped = layer.lora_dropout(x)
    torch.testing.assert_close(y.double(), layer_spec(layer, x, dropped), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert layer.lora_magnitude_vector.weight.grad is not None


def test_dora_layer_merge_and_unmerge():
    layer = dora_layer().eval()
    x = torch.randn(3, 96)
    W0 = layer.base_layer.dequantized_weight(torch.float32)
    W = W0.double()
    A, B = layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double()
    target = layer_spec(layer, torch.eye(96)).t() - layer.base_layer.bias.double().unsqueeze(1)
    layer.merge()
    merged = layer.base_layer.dequantized_weight(torch.float32).double()
    error = layer.merge_report.max_abs_error
    assert (merged - target).abs().max().item() <= error + 1e-5
    assert (W + layer.scaling * B @ A - target).abs().max().item() > 2 * error   # not LoRA's merge
    # a merge changed the bytes: the cached ||W_o||^2 follows them
    torch.testing.assert_close(layer.base_layer.row_sq_norms().double(), merged.square().sum(1),
                               rtol=1e-5, atol=0)
    layer.unmerge()
    assert not layer.merged
    assert (layer.base_layer.dequantized_weight(torch.float32) - W0).abs().max().item() < 4 * error


def test_add_lora_with_dora():
    from nf4lora.nn import LoraLinear4bit
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    nf4lora.replace_linear(model, quant_type="nf4", progress=False)
    nf4lora.add_lora(model, r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=True)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(layers) == 2 and all(m.use_dora for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{p}.weight" for i in (0, 2)
                         for p in ("lora_A", "lora_B", "lora_magnitude_vector")}
    model(torch.randn(2, 64)).sum().backward()


# --- the kept norm (gradient accumulation, evaluation) -------------------------------------

def test_a_kept_norm_gives_the_same_result_without_a_s_rows(monkeypatch):
    packed, state, _, (x, A, B, bias, m) = operands(torch.float32, M=3)
    y0, norm = nf4lora.dora_matmul_4bit(x, packed, state, A, B, 2.0, m, bias, return_norm=True)
    assert norm.dtype == torch.float32 and not norm.requires_grad
    y0.sum().backward()
    grads0 = [t.grad.clone() for t in (x, A, B, bias, m)]
    for t in (x, A, B, bias, m):
        t.grad = None
    rows = []
    original = _ops.call_lora_matmul_4bit
    monkeypatch.setattr(_ops, "call_lora_matmul_4bit",
                        lambda x2, *a, **k: (rows.append(x2.shape[0]), original(x2, *a, **k))[1])
    y1 = nf4lora.dora_matmul_4bit(x, packed, state, A, B, 2.0, m, bias, weight_norm=norm)
    y1.sum().backward()
    assert rows == [3]                                   # x's rows only: no A rows appended
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for g0, t in zip(grads0, (x, A, B, bias, m)):
        torch.testing.assert_close(t.grad, g0, rtol=1e-5, atol=1e-5)


def test_the_layer_keeps_the_norm_until_its_adapter_changes(monkeypatch):
    layer = dora_layer()
    rows = []
    original = _ops.call_lora_matmul_4bit
    monkeypatch.setattr(_ops, "call_lora_matmul_4bit",
                        lambda x2, *a, **k: (rows.append(x2.shape[0]), original(x2, *a, **k))[1])
    x = torch.randn(2, 96)
    first = layer(x)
    second = layer(x)                                   # A, B unchanged: the norm is kept
    assert rows == [2 + 4, 2]
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)
    optimizer = torch.optim.SGD([layer.lora_A.weight, layer.lora_B.weight], lr=0.5)
    second.sum().backward()
    optimizer.step()                                    # in place: versions change
    third = layer(x)
    assert rows == [6, 2, 6]
    torch.testing.assert_close(third.double(), layer_spec(layer, x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        layer.lora_B.weight.mul_(2)                     # any in-place write counts
    layer(x)
    assert rows[-1] == 6
