"""Params4bit / Linear4bit against bitsandbytes.nn.Linear4bit (the oracle for bytes, state
dicts and behaviour; the spec, tests/oracles.py, for values), plus state-dict loading,
atomicity on bad input, copy/pickle and device/dtype moves."""
from __future__ import annotations

import copy
import io
import logging
import pickle
import warnings

import pytest
import torch

import nf4lora.functional as nf
from nf4lora.nn import Linear4bit, LinearFP4, LinearNF4, Params4bit

from conftest import assert_same, malformed_4bit_weight_edits, sd_blob, sd_drop, sd_set, snapshot
from oracles import SpecLinear, spec_dequantize

IN, OUT = 65, 33          # odd sizes: a partial last block and an odd number of codes


def _dense(in_f=IN, out_f=OUT, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


def _ours(quant_type="nf4", compress_statistics=True, bias=True, quant_storage=torch.uint8,
          seed=0, in_f=IN, out_f=OUT):
    layer = Linear4bit(in_f, out_f, bias=bias, quant_type=quant_type,
                       compress_statistics=compress_statistics, quant_storage=quant_storage)
    layer.load_state_dict(_dense(in_f, out_f, bias, seed).state_dict())
    return layer.to("cpu")


def _theirs(bnb_nn, quant_type="nf4", compress_statistics=True, bias=True,
            quant_storage=torch.uint8, seed=0, in_f=IN, out_f=OUT):
    layer = bnb_nn.Linear4bit(in_f, out_f, bias=bias, quant_type=quant_type,
                              compress_statistics=compress_statistics, quant_storage=quant_storage)
    layer.load_state_dict(_dense(in_f, out_f, bias, seed).state_dict())
    return layer.to("cpu")


def _bound(x, layer):
    """Error bound for two computations of x @ W^T whose W differ by at most an ulp or so:
    a few ulps of the compute dtype times sum_k |x_k| |W_jk|."""
    W = layer.dequantized_weight(torch.float32)
    return 4 * torch.finfo(x.dtype).eps * (x.float().abs() @ W.abs().t()).max().item()






# -- equality with bitsandbytes ----------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_and_forward_match_bitsandbytes(bnb_nn, quant_type, compress_statistics, bias):
    ours = _ours(quant_type, compress_statistics, bias)
    theirs = _theirs(bnb_nn, quant_type, compress_statistics, bias)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for key in sd_ours:
        assert sd_ours[key].dtype == sd_theirs[key].dtype and sd_ours[key].shape == sd_theirs[key].shape, key
        if key == "weight" and quant_type == "fp4":
            # bitsandbytes' CPU path writes +0 (code 0) where its CUDA kernel writes -0 (code 8)
            # for tiny negative values; nf4lora follows CUDA. The dequantized values agree.
            theirs_w = nf.dequantize_4bit(sd_theirs["weight"], theirs.weight.quant_state)
            torch.testing.assert_close(ours.dequantized_weight(), theirs_w, rtol=0, atol=0)
        else:
            assert torch.equal(sd_ours[key], sd_theirs[key]), key
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # fresh layers per dtype: the first forward fixes compute_dtype in both libraries
        a, b = copy.deepcopy(ours), copy.deepcopy(theirs)
        a.compute_type_is_set = b.compute_type_is_set = False
        x = torch.randn(2, 3, IN, dtype=dtype, requires_grad=True)
        ya = a(x)
        b.set_compute_type(x)           # bitsandbytes' rule for the compute dtype (pure Python)
        assert a.compute_dtype == b.compute_dtype
        # bitsandbytes' semantics on its own bytes, decoded by the spec (its CPU kernels are
        # not an oracle, tests/oracles.py): dequantize to the compute dtype, F.linear.
        yb = SpecLinear(spec_dequantize(b.weight, b.weight.quant_state), b.bias, b.compute_dtype)(x)
        assert ya.dtype == yb.dtype == dtype
        # Both dequantize into the compute dtype and call F.linear: equal up to ulps of W.
        tol = _bound(x, a)
        torch.testing.assert_close(ya, yb, rtol=0, atol=tol)
        g = torch.randn_like(ya)
        (dxa,) = torch.autograd.grad(ya, x, g)
        (dxb,) = torch.autograd.grad(yb, x, g)
        torch.testing.assert_close(dxa, dxb, rtol=0, atol=4 * torch.finfo(dtype).eps
                                   * (g.float().abs().reshape(-1, OUT) @ a.dequantized_weight(torch.float32).abs()).max().item())


def test_quant_storage_bfloat16(bnb_nn):
    # An even byte count: bitsandbytes cannot store an odd one as bf16 (nf4lora pads it).
    ours = _ours(quant_storage=torch.bfloat16, in_f=64)
    theirs = _theirs(bnb_nn, quant_storage=torch.bfloat16, in_f=64)
    assert ours.weight.dtype == torch.bfloat16 and ours.weight.quant_storage == torch.bfloat16
    assert torch.equal(ours.weight.data.view(torch.uint8), theirs.weight.data.view(torch.uint8))
    x = torch.randn(4, 64)
    expected = SpecLinear(spec_dequantize(theirs.weight, theirs.weight.quant_state), theirs.bias, None)(x)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=_bound(x, ours))
    # a dtype cast of the model must not touch the packed codes stored as bf16
    before = ours.weight.data.clone()
    ours.half()
    ours.to(torch.float32)
    assert ours.weight.dtype == torch.bfloat16 and torch.equal(ours.weight.data.view(torch.uint8),
                                                               before.view(torch.uint8))
    # and the state dict round-trips
    fresh = Linear4bit(64, OUT, quant_type="nf4", quant_storage=torch.bfloat16)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), ours(x), rtol=0, atol=0)
    # odd byte count: nf4lora pads to a whole bf16 element instead of dropping the last codes
    odd = _ours(quant_storage=torch.bfloat16)
    x = torch.randn(4, IN)
    torch.testing.assert_close(odd(x), _ours()(x), rtol=0, atol=0)


def test_linear_nf4_fp4_and_signature(bnb_nn):
    assert LinearNF4(8, 4).weight.quant_type == "nf4"
    assert LinearFP4(8, 4).weight.quant_type == "fp4"
    assert Linear4bit(8, 4).weight.quant_type == "fp4"          # bitsandbytes' default
    import inspect
    for ours, theirs in [(Linear4bit, bnb_nn.Linear4bit), (LinearNF4, bnb_nn.LinearNF4),
                         (LinearFP4, bnb_nn.LinearFP4)]:
        def names_and_defaults(cls):
            return [(p.name, p.default) for p in inspect.signature(cls.__init__).parameters.values()]
        assert names_and_defaults(ours) == names_and_defaults(theirs)
    assert isinstance(Linear4bit(8, 4), torch.nn.Linear)         # PEFT/transformers check this


# -- loading both ways ----------------------------------------------------------------------

@pytest.mark.parametrize("compress_statistics", [True, False])
def test_nf4lora_dict_loads_in_bitsandbytes(bnb_nn, compress_statistics):
    ours = _ours(compress_statistics=compress_statistics)
    sd = ours.state_dict()
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    theirs = bnb_nn.Linear4bit(IN, OUT, quant_type="nf4", device="meta")
    theirs.weight = bnb_nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=theirs)
    theirs.bias = torch.nn.Parameter(sd["bias"])
    x = torch.randn(5, IN)
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=_bound(x, ours))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [True, False])
def test_bitsandbytes_dict_loads_strict(bnb_nn, quant_type, compress_statistics):
    theirs = _theirs(bnb_nn, quant_type, compress_statistics)
    sd = theirs.state_dict()
    for quantized_first in (False, True):
        ours = Linear4bit(IN, OUT, quant_type="fp4" if quant_type == "nf4" else "nf4")
        if quantized_first:
            ours = ours.to("cpu")
        ours.load_state_dict(sd, strict=True)
        assert ours.weight.bnb_quantized and ours.weight.quant_type == quant_type
        assert ours.weight.compress_statistics == compress_statistics
        assert ours.quant_state is ours.weight.quant_state
        assert list(ours.state_dict()) == list(sd)
        for key, value in ours.state_dict().items():
            assert torch.equal(value, sd[key]), key
        x = torch.randn(3, IN)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=_bound(x, ours))


def test_safetensors_and_torch_save_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file
    ours = _ours()
    save_file(ours.state_dict(), tmp_path / "layer.safetensors")
    fresh = Linear4bit(IN, OUT, quant_type="nf4")
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"), strict=True)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    fresh2 = Linear4bit(IN, OUT, quant_type="nf4")
    fresh2.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.randn(3, IN)
    torch.testing.assert_close(fresh(x), ours(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh2(x), ours(x), rtol=0, atol=0)


def test_dense_dict_loads_into_quantized_layer():
    """An nn.Linear checkpoint into an already-quantized layer is quantized on load, with the
    layer's settings and its recorded original dtype."""
    ours = _ours(compress_statistics=False)
    dense = _dense(seed=7)
    ours.load_state_dict(dense.state_dict(), strict=True)
    packed, _ = nf.quantize_4bit(dense.weight.detach(), quant_type="nf4")
    assert torch.equal(ours.weight.data, packed)
    assert torch.equal(ours.bias.detach(), dense.bias.detach())


def test_strict_false_reports_and_keeps_layer():
    """A layer loads all its entries or none, strict or not (torch passes strict=True to
    _load_from_state_dict either way, so the layer cannot tell)."""
    ours = _ours()
    sd = _ours(seed=3).state_dict()
    del sd["bias"]
    before = snapshot(ours)
    result = ours.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == []
    assert_same(before, snapshot(ours))
    result = ours.load_state_dict({}, strict=False)
    assert sorted(result.missing_keys) == ["bias", "weight"]


def _malformed_cases():
    drop, setv, blob = sd_drop, sd_set, sd_blob
    return {
        **malformed_4bit_weight_edits(),
        "missing bias": drop("bias"),
        "extra key": setv("extra", lambda sd: torch.zeros(1)),
        "float absmax when nested": setv("weight.absmax", lambda sd: sd["weight.absmax"].float()),
        "bias shape": setv("bias", lambda sd: torch.zeros(OUT + 1)),
        "bias not a tensor": setv("bias", lambda sd: [0.0] * OUT),
        "garbage blob": setv("weight.quant_state.bitsandbytes__nf4",
                             lambda sd: torch.tensor([123, 34, 113], dtype=torch.uint8)),
        "blob wrong shape": blob(lambda d: d.__setitem__("shape", [OUT, IN - 1])),
        "blob transposed shape": blob(lambda d: d.__setitem__("shape", [IN, OUT])),
        "blob bad dtype": blob(lambda d: d.__setitem__("dtype", "float99")),
        "blob unknown entry": blob(lambda d: d.__setitem__("color", "red")),
        "dense weight wrong shape": lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("weight.")]
        and sd.__setitem__("weight", torch.zeros(OUT, IN + 1)),
    }


@pytest.mark.parametrize("case", sorted(_malformed_cases()))
@pytest.mark.parametrize("target_quantized", [True, False])
def test_malformed_dict_leaves_module_untouched(case, target_quantized):
    source = _ours(seed=5).state_dict()
    _malformed_cases()[case](source)
    target = _ours(seed=1) if target_quantized else Linear4bit(IN, OUT, quant_type="nf4")
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict") as info:
        target.load_state_dict(source, strict=True)
    message = str(info.value)
    assert "weight" in message or "bias" in message or "extra" in message
    assert_same(before, snapshot(target))


def test_malformed_blob_error_is_specific():
    source = _ours().state_dict()
    source["weight.absmax"] = source["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match="absmax"):
        _ours(seed=1).load_state_dict(source)


# -- Params4bit: quantize on move, copy, pickle ------------------------------------------

def test_quantizes_on_first_move_and_first_forward():
    layer = Linear4bit(IN, OUT, quant_type="nf4")
    assert not layer.weight.bnb_quantized and layer.weight.shape == (OUT, IN)
    with pytest.raises(AttributeError):
        layer.weight.absmax
    meta = layer.weight.to("meta")                         # meta: no quantization
    assert isinstance(meta, Params4bit) and not meta.bnb_quantized and meta.device.type == "meta"

    layer = Linear4bit(IN, OUT, quant_type="nf4")
    w = layer.weight.data.clone()
    param = layer.weight
    layer.cpu()
    assert layer.weight is param and param.bnb_quantized
    assert layer.quant_state is param.quant_state
    packed, _ = nf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    assert torch.equal(param.data, packed)
    state = param.quant_state
    layer.to("cpu")                                        # a later move keeps the state
    assert layer.weight.quant_state is state and torch.equal(layer.weight.data, packed)

    fresh = Linear4bit(IN, OUT, quant_type="nf4")          # first forward quantizes
    fresh(torch.randn(2, IN))
    assert fresh.weight.bnb_quantized and fresh.compute_dtype == torch.float32

    # the FSDP/compile views of the state
    assert param.absmax is state.absmax and param.quant_map is state.code
    assert param.nested_absmax is state.state2.absmax and param.nested_offset is state.offset
    assert param.nested_blocksize == 256 and param.nested_quant_map is state.state2.code


def test_params4bit_to_returns_params4bit():
    p = Params4bit(torch.randn(OUT, IN), quant_type="nf4")
    q = p.to("cpu")
    assert q is p and p.bnb_quantized and not p.requires_grad
    r = p.to("cpu", torch.float16)
    assert isinstance(r, Params4bit) and r.dtype == torch.uint8 and r.quant_state is p.quant_state
    assert isinstance(p.cpu(), Params4bit)


def test_compute_dtype_from_first_input():
    layer = _ours()
    layer.compute_type_is_set = False
    layer(torch.randn(2, IN, dtype=torch.bfloat16))
    assert layer.compute_dtype == torch.bfloat16
    fixed = Linear4bit(IN, OUT, quant_type="nf4", compute_dtype=torch.float32)
    y = fixed(torch.randn(2, IN, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and fixed.compute_dtype == torch.float32



@pytest.mark.parametrize("lead,ending", [((1,), "slow inference."),
                                         ((2, 3), "slow inference or training speed.")])
def test_float16_input_logs_bitsandbytes_warning(caplog, lead, ending):
    """fp16 input with the default float32/None compute dtype: bitsandbytes' logger warning,
    word for word (single-row inputs say 'inference.')."""
    half = Linear4bit(IN, OUT, quant_type="nf4")
    with caplog.at_level(logging.WARNING, logger="nf4lora"), warnings.catch_warnings():
        warnings.simplefilter("error")          # a logger message, not a Python warning
        half(torch.randn(*lead, IN, dtype=torch.float16))
    assert [r.getMessage() for r in caplog.records] == [
        "Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 "
        f"(default). This will lead to {ending}"]


@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16])
def test_float32_bias_and_float16_input(compute_dtype):
    """Returns float16, as bitsandbytes does; the bias takes the compute dtype (bitsandbytes
    casts it in place, and its test_linear_kbit_fp32_bias checks for it)."""
    layer = Linear4bit(32, 64, quant_type="nf4", compute_dtype=compute_dtype).to("cpu")
    assert layer.bias.dtype == torch.float32
    x = torch.randn(16, 8, 32, dtype=torch.float16)
    W = layer.dequantized_weight(torch.float32)
    bias32 = layer.bias.detach().clone()
    y = layer(x)
    assert y.dtype == torch.float16
    dtype = compute_dtype or torch.float16
    assert layer.bias.dtype == dtype
    expected = torch.nn.functional.linear(x.to(dtype), W.to(dtype), bias32.to(dtype)).to(torch.float16)
    torch.testing.assert_close(y, expected, rtol=0, atol=_bound(x.to(dtype), layer) + 1e-3)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_is_an_error_and_changes_nothing(compute_dtype, dtype):
    layer = Linear4bit(IN, OUT, quant_type="nf4", compute_dtype=compute_dtype)   # not yet quantized
    before = snapshot(layer)
    with pytest.raises(TypeError, match="x must be a float tensor"):
        layer(torch.ones(2, IN, dtype=dtype))
    assert_same(before, snapshot(layer))
    assert not layer.weight.bnb_quantized
    quantized = _ours()
    with pytest.raises(TypeError, match="x must be a float tensor"):
        quantized(torch.ones(2, IN, dtype=dtype))


def test_params4bit_survives_chunk_and_split():
    """FSDP2 shards a parameter with torch.chunk: each piece is a Params4bit with the whole
    weight's quant state and settings, as bitsandbytes' __torch_function__ keeps them."""
    weight = _ours(quant_type="fp4", quant_storage=torch.bfloat16).weight
    rows = weight.shape[0]
    for pieces in (torch.chunk(weight, 2), weight.chunk(3), torch.split(weight, 100),
                   weight.split([5, rows - 5])):
        assert isinstance(pieces, tuple) and sum(p.shape[0] for p in pieces) == rows
        for piece in pieces:
            assert type(piece) is Params4bit and piece.quant_state is weight.quant_state
            assert (piece.quant_type, piece.blocksize, piece.quant_storage, piece.bnb_quantized,
                    piece.compress_statistics, piece.module) == (
                "fp4", weight.blocksize, torch.bfloat16, True, weight.compress_statistics, weight.module)
        assert torch.equal(torch.cat([p.data for p in pieces]).view(torch.uint8),
                           weight.data.view(torch.uint8))


def test_deepcopy_and_pickle_keep_state():
    layer = _ours()
    x = torch.randn(3, IN)
    y = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        w = clone.weight
        assert type(w) is Params4bit and w.bnb_quantized and w.quant_type == "nf4"
        assert w.module is clone and clone.quant_state is w.quant_state
        assert w.quant_state == layer.weight.quant_state
        assert w.quant_state is not layer.weight.quant_state
        assert w.data.data_ptr() != layer.weight.data.data_ptr()
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
    p = pickle.loads(pickle.dumps(layer.weight))
    assert type(p) is Params4bit and p.quant_state == layer.weight.quant_state and p.module is None
    p2 = copy.deepcopy(layer.weight)
    assert type(p2) is Params4bit and p2.quant_state == layer.weight.quant_state
    assert p2.module is layer                   # copying a weight alone keeps its module link
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def test_from_prequantized_checks_data():
    layer = _ours()
    sd = layer.state_dict()
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    p = Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert p.bnb_quantized and p.quant_state == layer.weight.quant_state and p.quant_storage == torch.uint8
    with pytest.raises(ValueError, match="data"):
        Params4bit.from_prequantized(sd["weight"][:-1], stats, device="cpu")
    with pytest.raises(ValueError, match="absmax"):
        Params4bit.from_prequantized(sd["weight"], {**stats, "weight.absmax": stats["weight.absmax"][:3]},
                                     device="cpu")


def test_nan_weight_raises_and_keeps_layer():
    layer = Linear4bit(IN, OUT, quant_type="nf4")
    with torch.no_grad():
        layer.weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.to("cpu")
    assert not layer.weight.bnb_quantized and layer.weight.shape == (OUT, IN)


def test_meta_layer_loads_checkpoint():
    """A layer built on meta (empty init, as transformers does) takes the checkpoint's
    tensors and device, pre-quantized or dense."""
    source = _ours()
    x = torch.randn(3, IN)
    meta = Linear4bit(IN, OUT, quant_type="nf4", device="meta")
    meta.load_state_dict(source.state_dict(), strict=True)
    assert meta.weight.device.type == "cpu" and meta.bias.device.type == "cpu"
    torch.testing.assert_close(meta(x), source(x), rtol=0, atol=0)
    dense = _dense()
    meta = Linear4bit(IN, OUT, quant_type="nf4", device="meta")
    meta.load_state_dict(dense.state_dict(), strict=True)
    assert not meta.weight.bnb_quantized and meta.weight.device.type == "cpu"
    torch.testing.assert_close(meta.to("cpu")(x), source(x), rtol=0, atol=0)


def test_restores_quant_state_dropped_by_a_wrapper():
    """FSDP can swap the weight for a plain Parameter of the packed data; the module's copy of
    the quant state brings it back on the next forward (as bitsandbytes does)."""
    layer = _ours()
    x = torch.randn(2, IN)
    y = layer(x)
    layer.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    assert isinstance(layer.weight, Params4bit) and layer.weight.quant_state is layer.quant_state
