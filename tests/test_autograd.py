"""matmul_4bit / lora_matmul_4bit against a dense float64 reference.

Tolerances are not guessed: for each case the same computation is also run with plain
torch ops in the same dtype (dense W cast to that dtype, F.linear), and nf4lora's error
against float64 must stay within twice that baseline's own error (plus one ulp of the
output scale, for cases where the baseline happens to be exact).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import nf4lora.autograd as ag
import nf4lora.functional as nf
from nf4lora.autograd import lora_matmul_4bit, matmul_4bit

from oracles import spec_dequantize

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (in_features, out_features, leading dims of x)
SHAPES = [(65, 33, (3,)), (64, 48, (2, 5)), (65, 33, (1,)), (128, 16, (1, 1))]


def _quantized(out_f, in_f, quant_type="nf4", compress_statistics=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    packed, state = nf.quantize_4bit(w, quant_type=quant_type, compress_statistics=compress_statistics)
    dense = nf.dequantize_4bit(packed, state).float()    # the W both paths multiply by
    return packed, state, dense


def _inputs(in_f, out_f, lead, r, dtype, bias, seed=1):
    gen = torch.Generator().manual_seed(seed)
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    x = rnd(*lead, in_f)
    A = rnd(r, in_f, scale=in_f ** -0.5)
    B = rnd(out_f, r, scale=r ** -0.5)
    b = rnd(out_f) if bias else None
    g = rnd(*lead, out_f)           # upstream gradient
    return x, A, B, b, g


def _run(fn, tensors, g):
    """fn(*leaves) -> y; returns y and the grads of every non-None leaf, in float64."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    y = fn(*leaves)
    y.backward(g.to(y.dtype))
    return [y.detach().double()] + [t.grad.double() if t is not None else None for t in leaves]


def _dense_lora(W, scaling):
    def fn(x, A, B, b):
        y = F.linear(x, W.to(x.dtype), b)
        if A is not None:
            y = y + F.linear(F.linear(x, A), B) * scaling
        return y
    return fn


def _check_against_reference(ours, baseline, reference, dtype, label):
    for name, o, base, ref in zip(("y", "dx", "dA", "dB", "dbias"), ours, baseline, reference):
        if ref is None:
            assert o is None
            continue
        assert o.shape == ref.shape, (label, name)
        base_err = (base - ref).abs().max().item()
        our_err = (o - ref).abs().max().item()
        ulp = torch.finfo(dtype).eps * ref.abs().max().item()
        assert our_err <= 2 * base_err + ulp, (
            f"{label} {name}: error {our_err:.3g} vs float64, same-dtype torch baseline {base_err:.3g}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_f,out_f,lead", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_lora_matmul_matches_dense_reference(dtype, in_f, out_f, lead, bias):
    packed, state, W = _quantized(out_f, in_f)
    x, A, B, b, g = _inputs(in_f, out_f, lead, 4, dtype, bias)
    scaling = 2.0
    ours = _run(lambda x, A, B, b: lora_matmul_4bit(x, packed, state, A, B, scaling, b), (x, A, B, b), g)
    baseline = _run(_dense_lora(W, scaling), (x, A, B, b), g)
    reference = _run(_dense_lora(W.double(), scaling), [t.double() if t is not None else None
                                                       for t in (x, A, B, b)], g.double())
    assert ours[0].shape == (*lead, out_f)
    _check_against_reference(ours, baseline, reference, dtype, f"{dtype} {in_f}x{out_f} {lead}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type,compress_statistics", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul_4bit_matches_dense_reference(dtype, quant_type, compress_statistics, bias):
    in_f, out_f, lead = 65, 33, (2, 3)
    packed, state, W = _quantized(out_f, in_f, quant_type, compress_statistics)
    x, _, _, b, g = _inputs(in_f, out_f, lead, 4, dtype, bias)
    fn = lambda x, b: matmul_4bit(x, packed.t(), state, bias=b)   # noqa: E731
    ours = _run(fn, (x, b), g)
    baseline = _run(lambda x, b: F.linear(x, W.to(x.dtype), b), (x, b), g)
    reference = _run(lambda x, b: F.linear(x, W.double(), b),
                     (x.double(), b.double() if b is not None else None), g.double())
    # reorder to (y, dx, dA, dB, dbias) for the shared checker
    pad = lambda r: [r[0], r[1], None, None, r[2]]   # noqa: E731
    _check_against_reference(pad(ours), pad(baseline), pad(reference), dtype, f"{dtype} {quant_type}")


def test_matmul_4bit_orientation_out_and_no_grad():
    packed, state, W = _quantized(33, 65)
    x = torch.randn(4, 65)
    y1 = matmul_4bit(x, packed.t(), state)
    y2 = matmul_4bit(x, packed, state)                     # either orientation of B
    out = torch.empty(4, 33)
    y3 = matmul_4bit(x, packed.t(), state, out=out)
    assert y3 is out
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1, out, rtol=0, atol=0)
    torch.testing.assert_close(y1, F.linear(x, W), rtol=0, atol=0)   # same dequant + linear
    with torch.no_grad():
        assert matmul_4bit(x.requires_grad_(), packed.t(), state).grad_fn is None


def test_accepts_a_bitsandbytes_state(bnb, backend):
    """A bitsandbytes QuantState works as is. The expected values are the spec's
    dequantization of bitsandbytes' bytes followed by F.linear (bitsandbytes' own matmul is
    not the oracle: its CPU path depends on the CPU's instruction set, see tests/oracles.py).
    The reference backend runs exactly these torch ops: equal bits. The cpu backend's fused
    kernel sums in another order: equal to float32 rounding."""
    w = torch.randn(33, 64)
    packed, state = bnb.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    x = torch.randn(2, 3, 64, requires_grad=True)
    bias = torch.randn(33, requires_grad=True)
    g = torch.randn(2, 3, 33)
    W = spec_dequantize(packed, state)
    expected = F.linear(x, W, bias)
    (dx_expected,) = torch.autograd.grad(expected, x, g)
    ours = matmul_4bit(x, packed.t(), state, bias=bias)
    dx_ours, db_ours = torch.autograd.grad(ours, (x, bias), g)
    exact = {"rtol": 0, "atol": 0} if backend == "reference" else {}
    torch.testing.assert_close(ours, expected, **exact)
    torch.testing.assert_close(dx_ours, dx_expected, **exact)
    torch.testing.assert_close(db_ours, g.sum((0, 1)))


@pytest.mark.parametrize("lead", [(3,), (2, 3)])
@pytest.mark.parametrize("lora", [False, True])
def test_output_may_be_modified_in_place(lead, lora):
    """PEFT's AdaLoRA adds to the base layer's output in place; the gradients must still be
    those of the out-of-place sum."""
    out_f, in_f = 33, 65
    packed, state, W = _quantized(out_f, in_f)
    x, A, B, _, _ = _inputs(in_f, out_f, lead, 4, torch.float32, False)
    for t in (x, A, B):
        t.requires_grad_()
    extra = torch.randn(*lead, out_f)
    if lora:
        y = lora_matmul_4bit(x, packed, state, A, B, 0.5)
    else:
        y = matmul_4bit(x, packed.t(), state)
    y += extra
    y.mul_(2).sum().backward()
    expected = F.linear(x.detach(), W) + (0.5 * (x.detach() @ A.detach().t()) @ B.detach().t() if lora else 0)
    torch.testing.assert_close(y.detach(), 2 * (expected + extra), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, 2 * (torch.ones(*lead, out_f) @ (W + (0.5 * B.detach() @ A.detach() if lora else 0))),
                               rtol=1e-5, atol=1e-5)


def test_saves_packed_weight_only_and_dequantizes_again(monkeypatch):
    """No dequantized [out, in] copy is kept for backward; backward reads W packed again."""
    out_f, in_f = 48, 80
    packed, state, _ = _quantized(out_f, in_f)
    calls = []
    for name in ("call_lora_matmul_4bit", "call_lora_matmul_4bit_grad_input"):
        original = getattr(ag._ops, name)
        monkeypatch.setattr(ag._ops, name, lambda *a, _op=original: calls.append(1) or _op(*a))
    saved = []
    x = torch.randn(5, in_f, requires_grad=True)
    A = torch.randn(4, in_f, requires_grad=True)
    B = torch.randn(out_f, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_matmul_4bit(x, packed, state, A, B, 0.5)
    assert len(calls) == 1
    assert saved and all(tuple(t.shape) != (out_f, in_f) for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.uint8) == packed.numel()
    y.sum().backward()
    assert len(calls) == 2
    assert packed.grad is None


def test_frozen_adapter_does_not_save_activations():
    """Only x needs a grad (e.g. a frozen layer inside a trained model): nothing of size M
    is kept for backward, only the packed weight and the small adapter matrices."""
    packed, state, _ = _quantized(48, 80)
    x = torch.randn(64, 80, requires_grad=True)
    for call in (lambda: matmul_4bit(x, packed.t(), state),
                 lambda: lora_matmul_4bit(x, packed, state, torch.randn(4, 80), torch.randn(48, 4), 1.0)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            call()
        assert all(64 not in t.shape for t in saved), [tuple(t.shape) for t in saved]


def test_grad_only_where_required():
    packed, state, W = _quantized(33, 65)
    x = torch.randn(3, 65)
    A = torch.randn(4, 65, requires_grad=True)
    B = torch.randn(33, 4, requires_grad=True)
    bias = torch.randn(33)                      # frozen
    lora_matmul_4bit(x, packed, state, A, B, 1.0, bias).sum().backward()
    assert A.grad is not None and B.grad is not None and x.grad is None and bias.grad is None
    xg = torch.randn(3, 65, requires_grad=True)
    lora_matmul_4bit(xg, packed, state, A.detach(), B.detach(), 1.0).sum().backward()
    torch.testing.assert_close(xg.grad, (torch.ones(3, 33) @ (W + B.detach() @ A.detach())))


def test_empty_batch():
    packed, state, _ = _quantized(33, 65)
    x = torch.randn(0, 65, requires_grad=True)
    A = torch.randn(4, 65, requires_grad=True)
    B = torch.randn(33, 4, requires_grad=True)
    bias = torch.randn(33, requires_grad=True)
    y = lora_matmul_4bit(x, packed, state, A, B, 1.0, bias)
    assert y.shape == (0, 33)
    y.sum().backward()
    assert x.grad.shape == (0, 65) and float(A.grad.abs().sum()) == 0 and float(bias.grad.abs().sum()) == 0


@pytest.mark.parametrize("case,error,word", [
    ("x_last_dim", ValueError, "x"),
    ("x_dtype", TypeError, "x"),
    ("lora_A_shape", ValueError, "lora_A"),
    ("lora_B_shape", ValueError, "lora_B"),
    ("lora_A_dtype", TypeError, "lora_A"),
    ("bias_shape", ValueError, "bias"),
    ("bias_dtype", TypeError, "bias"),
    ("weight_short", ValueError, "weight"),
    ("state_none", ValueError, "quant_state"),
    ("scaling_tensor", TypeError, "scaling"),
])
def test_bad_arguments_name_the_argument(case, error, word):
    packed, state, _ = _quantized(33, 65)
    args = dict(x=torch.randn(3, 65), weight=packed, quant_state=state, lora_A=torch.randn(4, 65),
                lora_B=torch.randn(33, 4), scaling=1.0, bias=torch.randn(33))
    change = {
        "x_last_dim": dict(x=torch.randn(3, 64)),
        "x_dtype": dict(x=torch.randn(3, 65, dtype=torch.float64)),
        "lora_A_shape": dict(lora_A=torch.randn(4, 64)),
        "lora_B_shape": dict(lora_B=torch.randn(33, 5)),
        "lora_A_dtype": dict(lora_A=torch.randn(4, 65, dtype=torch.bfloat16)),
        "bias_shape": dict(bias=torch.randn(32)),
        "bias_dtype": dict(bias=torch.randn(33, dtype=torch.float16)),
        "weight_short": dict(weight=packed[:-1]),
        "state_none": dict(quant_state=None),
        "scaling_tensor": dict(scaling=torch.tensor(1.0)),
    }[case]
    args.update(change)
    with pytest.raises(error, match=word):
        lora_matmul_4bit(**args)
    if case in ("x_last_dim", "x_dtype", "bias_shape", "bias_dtype", "weight_short", "state_none"):
        with pytest.raises(error, match=word):
            matmul_4bit(args["x"], args["weight"].t(), args["quant_state"], bias=args["bias"])


@pytest.mark.parametrize("lead", [(2,), (2, 3)])
def test_in_out_oriented_weight_works_with_a_deprecation_warning(lead):
    """bitsandbytes' tests quantize some weights as [in, out] (transpose_B=False): the result
    is x @ W with a DeprecationWarning, and gradients flow to x and bias."""
    w = torch.randn(65, 33)                      # [in, out]
    packed, state = nf.quantize_4bit(w, quant_type="nf4")
    W = nf.dequantize_4bit(packed, state)        # [65, 33]
    x = torch.randn(*lead, 65, requires_grad=True)
    bias = torch.randn(33, requires_grad=True)
    with pytest.warns(DeprecationWarning, match=r"\[in, out\]"):
        y = matmul_4bit(x, packed.t(), state, bias=bias)
    torch.testing.assert_close(y, F.linear(x, W.t(), bias), rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(*lead, 33) @ W.t())
    torch.testing.assert_close(bias.grad, torch.full((33,), float(x[..., 0].numel())))
    # a square weight is taken as [out, in], as bitsandbytes does: no warning
    packed, state = nf.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matmul_4bit(torch.randn(2, 64), packed.t(), state)


@pytest.mark.parametrize("orientation", ["out_in", "in_out"])
def test_weight_quantized_from_a_tensor_that_requires_grad(orientation):
    """bitsandbytes' tests quantize a weight that requires grad: the state carries no
    autograd history, so the matmul's backward reaches x (and nothing tries to
    backpropagate through the quantization)."""
    w = torch.randn(33, 65, requires_grad=True)
    w_q = w if orientation == "out_in" else w.t()
    packed, state = nf.quantize_4bit(w_q, quant_type="nf4", compress_statistics=True)
    assert not state.absmax.requires_grad and not state.state2.absmax.requires_grad
    x = torch.randn(3, 65, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        y = matmul_4bit(x, packed.t() if orientation == "out_in" else packed, state)
    y.sum().backward()
    W = nf.dequantize_4bit(packed, state)
    W = W if orientation == "out_in" else W.t()
    torch.testing.assert_close(x.grad, torch.ones(3, 33) @ W)
    assert w.grad is None
