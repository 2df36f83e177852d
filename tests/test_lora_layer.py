"""LoraLinear4bit: PEFT's init and forward (PEFT's own bnb LoRA layer is the oracle),
gradients, dropout semantics, merge/unmerge."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import nf4lora.functional as nf
from nf4lora.nn import Linear4bit, LoraLinear4bit

from oracles import spec_twin

IN, OUT, R = 65, 33, 4


def _base(quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8, bias=True, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(IN, OUT, bias=bias)
    layer = Linear4bit(IN, OUT, bias=bias, quant_type=quant_type,
                       compress_statistics=compress_statistics, quant_storage=quant_storage)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")


def _lora(base=None, r=R, alpha=8, dropout=0.0, rslora=False, seed=1, random_B=True):
    torch.manual_seed(seed)
    layer = LoraLinear4bit(base if base is not None else _base(), r, alpha, dropout, rslora)
    if random_B:                   # a fresh adapter is a no-op; make it do something
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layer


def _expected(layer, x):
    """base(x) + scaling * B A x in float64 from the dequantized weight."""
    W = layer.base_layer.dequantized_weight(torch.float32).double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    b = layer.base_layer.bias.double() if layer.base_layer.bias is not None else None
    xd = x.double()
    return F.linear(xd, W, b) + F.linear(F.linear(xd, A), B) * layer.scaling


def test_init_names_and_scaling():
    layer = _lora(random_B=False)
    names = dict(layer.named_parameters())
    assert {"lora_A.weight", "lora_B.weight", "base_layer.weight", "base_layer.bias"} == set(names)
    assert layer.lora_A.weight.shape == (R, IN) and layer.lora_B.weight.shape == (OUT, R)
    assert layer.lora_A.weight.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(IN)       # kaiming_uniform(a=sqrt(5)) on fan_in = IN
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert layer.scaling == 8 / R
    assert _lora(rslora=True).scaling == 8 / math.sqrt(R)
    x = torch.randn(3, IN)          # a fresh adapter leaves the base output unchanged
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="Linear4bit"):
        LoraLinear4bit(torch.nn.Linear(IN, OUT), R, 8)
    with pytest.raises(ValueError, match="r must"):
        LoraLinear4bit(_base(), 0, 8)


def _peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import bitsandbytes
            from peft import LoraConfig
            from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
        except ImportError:
            pytest.skip("bitsandbytes / peft not installed")
    return bitsandbytes, LoraConfig, PeftLinear4bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lora_on_bitsandbytes(dtype, use_rslora):
    """Same init (same RNG draws) and same output as PEFT's LoRA layer on bitsandbytes'
    Linear4bit holding the same 4-bit weight."""
    bnb, LoraConfig, PeftLinear4bit = _peft()
    ours_base = _base()
    theirs_base = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4", device="meta")
    sd = ours_base.state_dict()
    theirs_base.weight = bnb.nn.Params4bit.from_prequantized(
        sd["weight"], {k: v for k, v in sd.items() if k.startswith("weight.")}, device="cpu",
        module=theirs_base)
    theirs_base.bias = torch.nn.Parameter(sd["bias"].clone())
    config = LoraConfig(r=R, lora_alpha=8, use_rslora=use_rslora)
    torch.manual_seed(1)
    theirs = PeftLinear4bit(theirs_base, "default", config, r=R, lora_alpha=8, use_rslora=use_rslora)
    torch.manual_seed(1)
    ours = LoraLinear4bit(ours_base, R, 8, use_rslora=use_rslora)
    assert torch.equal(ours.lora_A.weight, theirs.lora_A["default"].weight)
    assert ours.scaling == theirs.scaling["default"]
    torch.nn.init.normal_(theirs.lora_B["default"].weight, std=0.1)
    with torch.no_grad():
        ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)
    x = torch.randn(2, 3, IN, dtype=dtype)
    # bitsandbytes' base layer decoded by the spec (its CPU kernels are not an oracle:
    # tests/oracles.py); PEFT's adapter path as it is
    ya, yb = ours(x), spec_twin(theirs)(x)
    assert ya.dtype == yb.dtype == dtype
    # PEFT adds base and adapter outputs after casting each to x's dtype; nf4lora adds in the
    # compute dtype and casts once: they differ by the final rounding, one ulp of the output.
    ulp = torch.finfo(dtype).eps * yb.abs().max().item()
    assert (ya.float() - yb.float()).abs().max().item() <= 2 * ulp + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_grads(dtype):
    layer = _lora()
    layer.base_layer.compute_dtype, layer.base_layer.compute_type_is_set = dtype, True
    x = torch.randn(2, 5, IN, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 5, OUT)
    expected = _expected(layer, x.detach())
    # bound: a few ulps of the compute dtype over sum |x| |W_eff|
    W_eff = layer.base_layer.dequantized_weight(torch.float32) + layer.scaling * (
        layer.lora_B.weight @ layer.lora_A.weight).detach()
    bound = 8 * torch.finfo(dtype).eps * (x.detach().float().abs() @ W_eff.abs().t()).max().item()
    assert (y.double() - expected).abs().max().item() <= bound
    y.float().pow(2).sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert layer.lora_A.weight.grad.dtype == torch.float32        # grads reach fp32 params
    assert layer.base_layer.weight.grad is None and x.grad.shape == x.shape
    assert torch.isfinite(layer.lora_A.weight.grad).all() and layer.lora_A.weight.grad.abs().sum() > 0


def test_grads_match_float64_reference():
    layer = _lora()
    x = torch.randn(7, IN)
    g = torch.randn(7, OUT)
    layer(x).backward(g)
    A = layer.lora_A.weight.detach().double().requires_grad_()
    B = layer.lora_B.weight.detach().double().requires_grad_()
    W = layer.base_layer.dequantized_weight(torch.float32).double()
    y = F.linear(x.double(), W) + F.linear(F.linear(x.double(), A), B) * layer.scaling
    y.backward(g.double())
    torch.testing.assert_close(layer.lora_A.weight.grad.double(), A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.grad.double(), B.grad, rtol=1e-5, atol=1e-5)


def test_dropout_applies_to_the_adapter_input_only():
    layer = _lora(dropout=0.5)
    x = torch.randn(4, IN)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x).double() + F.linear(
        F.linear(dropped.double(), layer.lora_A.weight.double()), layer.lora_B.weight.double()) * layer.scaling
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    layer.eval()                          # eval: no dropout, the single fused call
    torch.testing.assert_close(layer(x).double(), _expected(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_type,compress_statistics,quant_storage",
                         [("nf4", True, torch.uint8), ("fp4", False, torch.bfloat16)])
def test_merge_unmerge(quant_type, compress_statistics, quant_storage):
    base = _base(quant_type, compress_statistics, quant_storage)
    layer = _lora(base)
    x = torch.randn(6, IN)
    y_adapter = layer(x)
    W0 = base.dequantized_weight(torch.float32)
    packed0 = base.weight.data.clone()
    exact = W0 + layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight).detach()

    error = layer.merge()
    assert layer.merged and isinstance(error, float)
    W1 = base.dequantized_weight(torch.float32)
    assert error == pytest.approx((W1 - exact).abs().max().item(), abs=0)
    assert 0 < error < 0.5 * exact.abs().max().item()
    state = base.weight.quant_state           # same settings after re-quantization
    assert (state.quant_type, state.nested, base.weight.dtype, base.weight.quant_storage) == \
        (quant_type, compress_statistics, quant_storage, quant_storage)
    assert base.quant_state is state
    # merged forward = base alone, off the adapter forward by at most error * sum |x|
    y_merged = layer(x)
    assert (y_merged - y_adapter).abs().max().item() <= error * x.abs().sum(-1).max().item() + 1e-4
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()

    error2 = layer.unmerge()
    assert not layer.merged and error2 > 0
    W2 = base.dequantized_weight(torch.float32)
    # lossy: close to the original weight, within the two re-quantization errors
    assert (W2 - W0).abs().max().item() <= error + error2 + 1e-6
    assert not torch.equal(base.weight.data, packed0) or error == 0
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_of_zero_adapter_is_requantization_only():
    base = _base(compress_statistics=False)
    layer = _lora(base, random_B=False)
    before = base.weight.data.clone()
    # re-quantizing an already-quantized weight gives back the same codes for NF4
    # (each value is on the grid, the block absmax is unchanged)
    error = layer.merge()
    assert torch.equal(base.weight.data, before)
    assert error == 0.0
    # consistency with functional: same bytes as quantizing the dequantized weight directly
    packed, _ = nf.quantize_4bit(base.dequantized_weight(), quant_type="nf4")
    assert torch.equal(packed, before)


def test_torch_compile_fullgraph():
    """One graph, forward and backward, no graph breaks (aot_eager: no C++ compiler needed)."""
    layer = _lora()
    x = torch.randn(3, IN, requires_grad=True)
    y0 = layer(x)
    grads0 = torch.autograd.grad(y0.sum(), [x, layer.lora_A.weight, layer.lora_B.weight])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y1 = compiled(x)
    grads1 = torch.autograd.grad(y1.sum(), [x, layer.lora_A.weight, layer.lora_B.weight])
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
