"""Embedding4bit / EmbeddingNF4 / EmbeddingFP4 against bitsandbytes.nn (the oracle for
constructors, bytes and state-dict format) and the spec (tests/oracles.py, the oracle for
values: bitsandbytes' CPU kernels are machine-dependent), plus loading, bad input, the
rows-only forward, copy/pickle and meta-device construction."""
from __future__ import annotations

import copy
import inspect
import io
import json
import logging
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import nf4lora.functional as nf
from nf4lora import reference
from nf4lora.nn import Embedding4bit, EmbeddingFP4, EmbeddingNF4, Params4bit

from conftest import assert_same, malformed_4bit_weight_edits, sd_blob, sd_set, snapshot
from oracles import decoded_absmax, spec_dequantize
from test_format_vs_bitsandbytes import assert_codes_match_bitsandbytes

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGES = (torch.uint8, torch.bfloat16)


def _dense(vocab, dim, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Embedding(vocab, dim, dtype=dtype)


def _packed_dict(weight, quant_type="nf4", nested=False, blocksize=64, storage=torch.uint8):
    """The state dict of a 4-bit table, quantized by nf4lora.functional."""
    packed, state = nf.quantize_4bit(weight.detach(), blocksize=blocksize, compress_statistics=nested,
                                     quant_type=quant_type, quant_storage=storage)
    return {"weight": packed, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}


def _layer(vocab, dim, dtype=torch.float32, quant_type="nf4", nested=False, blocksize=64,
           storage=torch.uint8, seed=0):
    layer = Embedding4bit(vocab, dim, dtype=dtype, quant_type=quant_type, quant_storage=storage)
    sd = _packed_dict(_dense(vocab, dim, dtype, seed).weight, quant_type, nested, blocksize, storage)
    layer.load_state_dict(sd, strict=True)
    return layer


def _spec_forward(layer, index):
    """The spec: dequantize the whole table, look the rows up, cast to the layer's dtype."""
    table = spec_dequantize(layer.weight, layer.weight.quant_state)
    return F.embedding(index, table).to(layer.dtype)


def _same_bytes(a, b) -> bool:
    """Equal dtype, shape and bytes (packed codes stored as bf16 may read as NaN)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))






# -- bitsandbytes: constructors and format ----------------------------------------------------

def test_signatures_match_bitsandbytes(bnb_nn):
    def names_and_defaults(cls):
        return [(p.name, p.default) for p in inspect.signature(cls.__init__).parameters.values()]
    for ours, theirs in [(Embedding4bit, bnb_nn.Embedding4bit), (EmbeddingNF4, bnb_nn.EmbeddingNF4),
                         (EmbeddingFP4, bnb_nn.EmbeddingFP4)]:
        assert names_and_defaults(ours) == names_and_defaults(theirs)
    assert Embedding4bit(4, 64).weight.quant_type == "fp4"       # bitsandbytes' default
    assert EmbeddingNF4(4, 64).weight.quant_type == "nf4"
    assert EmbeddingFP4(4, 64).weight.quant_type == "fp4"
    layer = EmbeddingNF4(4, 64, dtype=torch.bfloat16)
    assert isinstance(layer, torch.nn.Embedding) and type(layer.weight) is Params4bit
    assert layer.dtype == torch.bfloat16 and layer.padding_idx is None
    assert not layer.weight.requires_grad and layer.weight.module is layer


def _bnb_layer(bnb_nn, vocab, dim, dtype, quant_type, storage):
    layer = bnb_nn.Embedding4bit(vocab, dim, dtype=dtype, quant_type=quant_type, quant_storage=storage)
    layer.load_state_dict(_dense(vocab, dim, dtype).state_dict())
    return layer.to("cpu")


def _bnb_state_dict(layer):
    """bitsandbytes' Embedding4bit cannot save (NotImplementedError): its format is its
    Linear4bit's, i.e. the packed weight plus `weight.` + its quant state's packed dict."""
    stats = layer.weight.quant_state.as_dict(packed=True)
    return {"weight": layer.weight.data, **{"weight." + k: v for k, v in stats.items()}}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("vocab,dim", [(1, 64), (7, 96), (33, 100)])
def test_state_dict_matches_bitsandbytes(bnb_nn, quant_type, dtype, storage, vocab, dim):
    ours = Embedding4bit(vocab, dim, dtype=dtype, quant_type=quant_type, quant_storage=storage)
    ours_dense = _dense(vocab, dim, dtype).weight.detach()
    ours.load_state_dict({"weight": ours_dense})
    ours = ours.to("cpu")
    theirs = _bnb_layer(bnb_nn, vocab, dim, dtype, quant_type, storage)
    with pytest.raises(NotImplementedError):
        theirs.state_dict()
    sd_ours, sd_theirs = ours.state_dict(), _bnb_state_dict(theirs)
    assert list(sd_ours) == list(sd_theirs)
    for key in sd_ours:
        a, b = sd_ours[key], sd_theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if key == "weight":
            # Codes equal except where bitsandbytes' CPU path is known to depart from its CUDA
            # kernels, which nf4lora follows (FP4: the sign of a zero, exact midpoints).
            assert_codes_match_bitsandbytes(ours_dense, 64, quant_type, a, b)
        else:
            assert torch.equal(a, b), key


@pytest.mark.parametrize("nested", [False, True])
def test_format_loads_both_ways(bnb_nn, nested):
    """bitsandbytes' bytes and state load into nf4lora strictly, and nf4lora's dict (double
    quantized too) loads into bitsandbytes' Embedding4bit through its from_prequantized."""
    vocab, dim = 9, 128
    theirs = _bnb_layer(bnb_nn, vocab, dim, torch.float32, "nf4", torch.uint8)
    sd = _bnb_state_dict(theirs)
    ours = EmbeddingNF4(vocab, dim)
    ours.load_state_dict(sd, strict=True)
    assert ours.weight.bnb_quantized and ours.quant_state is ours.weight.quant_state
    for key, value in ours.state_dict().items():
        assert torch.equal(value, sd[key]), key
    index = torch.tensor([8, 0, 3, 3])
    assert torch.equal(ours(index), F.embedding(index, spec_dequantize(sd["weight"], theirs.weight.quant_state)))

    sd = _layer(vocab, dim, nested=nested).state_dict()
    stats = {k: v for k, v in sd.items() if k != "weight"}
    back = bnb_nn.EmbeddingNF4(vocab, dim, device="meta")
    # a copy: bitsandbytes' QuantState.from_dict unpacks the blob into the dict it is given
    back.weight = bnb_nn.Params4bit.from_prequantized(sd["weight"], dict(stats), device="cpu",
                                                      module=back)
    assert torch.equal(back.weight.data, sd["weight"])
    assert {"weight." + k: v for k, v in back.weight.quant_state.as_dict(packed=True).items()}.keys() \
        == stats.keys()
    for key, value in back.weight.quant_state.as_dict(packed=True).items():
        assert torch.equal(value, stats["weight." + key]), key


# -- forward: exact values ------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [1, 7, 1000])
@pytest.mark.parametrize("dim", [64, 96, 100])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("storage", STORAGES)
def test_forward_equals_spec(vocab, dim, dtype, quant_type, nested, storage):
    """Bit for bit. Blocksize 64: 64 takes the rows-only path, 96 and 100 the whole-table one
    (blocks straddle rows); blocksize 32 sends 96 down the rows-only path too. vocab 1000
    has 1000+ blocks, so double-quantized constants span several groups of 256."""
    torch.manual_seed(vocab + dim)
    index = torch.randint(0, vocab, (3, 5))
    index[0, :2] = torch.tensor([0, vocab - 1])
    for blocksize in (64, 32):
        layer = _layer(vocab, dim, dtype, quant_type, nested, blocksize, storage)
        out = layer(index)
        assert out.shape == (3, 5, dim) and out.dtype == dtype
        assert torch.equal(out, _spec_forward(layer, index))


@pytest.mark.parametrize("dim", [64, 100])
@pytest.mark.parametrize("shape", [(), (0,), (4,), (2, 3, 4), (1, 1, 1, 1), (0, 5)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_any_index_shape(dim, shape, index_dtype):
    layer = _layer(11, dim, nested=True)
    torch.manual_seed(1)
    index = torch.randint(0, 11, shape, dtype=index_dtype)
    out = layer(index)
    assert out.shape == (*shape, dim)
    assert torch.equal(out, _spec_forward(layer, index.long()))


def test_output_dtype_is_the_layers(bnb_nn):
    """As bitsandbytes: dequantize to the state's dtype, then cast to the layer's `dtype`
    (here a bf16 table loaded into a float32 layer)."""
    sd = _packed_dict(_dense(5, 64, torch.bfloat16).weight)
    layer = Embedding4bit(5, 64)
    layer.load_state_dict(sd, strict=True)
    index = torch.tensor([4, 1])
    out = layer(index)
    assert out.dtype == torch.float32 and layer.weight.quant_state.dtype == torch.bfloat16
    assert torch.equal(out, F.embedding(index, spec_dequantize(layer.weight, layer.weight.quant_state)).float())


def test_quantizes_on_first_move_and_first_forward():
    dense = _dense(9, 64)
    packed, _ = nf.quantize_4bit(dense.weight.detach(), quant_type="nf4")  # no double quantization
    moved = EmbeddingNF4(9, 64)
    moved.load_state_dict(dense.state_dict())
    assert not moved.weight.bnb_quantized and moved.weight.shape == (9, 64)
    param = moved.weight
    moved.cpu()
    assert moved.weight is param and param.bnb_quantized and not param.compress_statistics
    assert moved.quant_state is param.quant_state and torch.equal(param.data, packed)
    before = param.data.clone()
    moved.half()                                            # a dtype cast leaves the codes alone
    assert torch.equal(moved.weight.data, before) and moved.dtype == torch.float32

    first = EmbeddingNF4(9, 64)
    first.load_state_dict(dense.state_dict())
    index = torch.tensor([[8, 2], [2, 0]])
    out = first(index)
    assert first.weight.bnb_quantized and torch.equal(first.weight.data, packed)
    assert torch.equal(out, _spec_forward(first, index))


# -- forward: only the selected rows are dequantized -------------------------------------------

@pytest.fixture
def dequantize_spy(monkeypatch):
    calls = []
    real = nf.dequantize_4bit

    def spy(A, quant_state=None, *args, **kwargs):
        calls.append((A.detach().reshape(-1).view(torch.uint8).clone(), tuple(quant_state.shape)))
        return real(A, quant_state, *args, **kwargs)
    monkeypatch.setattr(nf, "dequantize_4bit", spy)
    return calls


@pytest.mark.parametrize("nested", [False, True])
def test_large_vocab_dequantizes_only_selected_rows(dequantize_spy, nested):
    """2^20 x 64 NF4 codes (32 MiB packed; 256 MiB as float32 were it ever dequantized):
    built on meta, loaded pre-quantized, looked up. dequantize sees exactly the selected
    rows' bytes; each row equals the spec's dequantization of that row alone (a row is
    whole blocks in the flat-block format)."""
    vocab, dim, blocksize = 1 << 20, 64, 64
    torch.manual_seed(0)
    packed = torch.randint(0, 256, (vocab * dim // 2, 1), dtype=torch.uint8)
    absmax = torch.rand(vocab * dim // blocksize) + 0.5
    if nested:
        qabsmax, state2 = nf.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
        stats = {"absmax": qabsmax, "quant_map": nf.get_4bit_type("nf4"), "nested_absmax": state2.absmax,
                 "nested_quant_map": state2.code,
                 "quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps({
                     "quant_type": "nf4", "blocksize": blocksize, "dtype": "bfloat16",
                     "shape": [vocab, dim], "nested_blocksize": 256, "nested_dtype": "float32",
                     "nested_offset": absmax.mean().item()}).encode()), dtype=torch.uint8)}
    else:
        stats = {"absmax": absmax, "quant_map": nf.get_4bit_type("nf4"),
                 "quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps({
                     "quant_type": "nf4", "blocksize": blocksize, "dtype": "bfloat16",
                     "shape": [vocab, dim]}).encode()), dtype=torch.uint8)}
    layer = EmbeddingNF4(vocab, dim, dtype=torch.bfloat16, device="meta")
    layer.load_state_dict({"weight": packed, **{"weight." + k: v for k, v in stats.items()}}, strict=True)
    index = torch.tensor([[vocab - 1, 0, 777_777], [3, 3, 524_289]])
    out = layer(index)
    assert out.shape == (2, 3, dim) and out.dtype == torch.bfloat16
    rows = packed.view(vocab, dim // 2)
    assert len(dequantize_spy) == 1
    seen, shape = dequantize_spy[0]
    assert shape == (2, 3, dim) and torch.equal(seen, rows[index.reshape(-1)].reshape(-1))
    constants = decoded_absmax(layer.weight.quant_state)
    for r, row in zip(index.reshape(-1).tolist(), out.reshape(-1, dim)):
        expected = reference.dequantize_4bit(rows[r], constants[r:r + 1], blocksize, "nf4", (dim,),
                                             torch.bfloat16)
        assert torch.equal(row, expected)


def test_straddling_blocks_dequantize_the_table(dequantize_spy):
    """embedding_dim not a multiple of the blocksize: the whole table, as bitsandbytes."""
    layer = _layer(7, 100)
    layer(torch.tensor([1, 2]))
    assert [shape for _, shape in dequantize_spy] == [(7, 100)]


def test_warns_like_bitsandbytes(caplog):
    with caplog.at_level(logging.WARNING, logger="nf4lora"), warnings.catch_warnings():
        warnings.simplefilter("error")          # a logger message, not a Python warning
        EmbeddingFP4(3, 128)
        EmbeddingFP4(3, 100)
    assert [r.getMessage() for r in caplog.records] == [
        "Embedding size 100 is not divisible by block size 64. This will lead to slow inference."]


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [64, 100])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("bad", [[0, 7], [-1], [[2], [8]]])
def test_out_of_range_index_raises_like_nn_embedding(dim, quantized, bad):
    dense = _dense(7, dim)
    index = torch.tensor(bad)
    with pytest.raises(IndexError, match="index out of range"):
        dense(index)
    layer = EmbeddingNF4(7, dim)
    layer.load_state_dict(dense.state_dict())
    if quantized:
        layer.cpu()
    _assert_rejected_unchanged(layer, index, IndexError, "index out of range")
    assert layer.weight.bnb_quantized == quantized


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("index", [torch.tensor([1.0]), torch.tensor([1], dtype=torch.uint8),
                                   torch.tensor([True]), [1, 2]])
def test_non_index_input_is_a_type_error_and_changes_nothing(quantized, index):
    layer = EmbeddingNF4(7, 64)
    if quantized:
        layer.cpu()
    _assert_rejected_unchanged(layer, index, TypeError, "input must be a tensor of indices")


def _assert_rejected_unchanged(layer, index, error, match):
    """layer(index) raises error, and the layer's state is as before the call."""
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        layer(index)
    assert_same(before, snapshot(layer))


def _malformed_cases():
    setv, blob = sd_set, sd_blob
    return {
        **malformed_4bit_weight_edits(),
        "extra key": setv("bias", lambda sd: torch.zeros(7)),
        "blob wrong shape": blob(lambda d: d.__setitem__("shape", [7, 32])),
        "blob transposed shape": blob(lambda d: d.__setitem__("shape", [64, 7])),
        "dense weight wrong shape": lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("weight.")]
        and sd.__setitem__("weight", torch.zeros(7, 65)),
    }


@pytest.mark.parametrize("case", sorted(_malformed_cases()))
@pytest.mark.parametrize("target_quantized", [True, False])
def test_malformed_dict_leaves_module_untouched(case, target_quantized):
    source = _layer(7, 64, nested=True, seed=5).state_dict()
    _malformed_cases()[case](source)
    target = _layer(7, 64, seed=1) if target_quantized else EmbeddingNF4(7, 64)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict"):
        target.load_state_dict(source, strict=True)
    assert_same(before, snapshot(target))


# -- state dict round trips, meta, copy and pickle ---------------------------------------------

@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("storage", STORAGES)
def test_state_dict_round_trip_strict(tmp_path, nested, storage):
    from safetensors.torch import load_file, save_file
    source = _layer(13, 96, torch.bfloat16, "fp4", nested, 32, storage)
    index = torch.tensor([[12, 0], [5, 5]])
    sd = source.state_dict()
    save_file(sd, tmp_path / "emb.safetensors")
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    for loaded in (sd, load_file(tmp_path / "emb.safetensors"), torch.load(buffer, weights_only=True)):
        for fresh in (Embedding4bit(13, 96, dtype=torch.bfloat16), Embedding4bit(13, 96).cpu()):
            fresh.load_state_dict(loaded, strict=True)
            assert fresh.weight.quant_type == "fp4" and fresh.weight.quant_storage == storage
            assert fresh.weight.compress_statistics == nested and fresh.weight.blocksize == 32
            assert list(fresh.state_dict()) == list(sd)
            for key, value in fresh.state_dict().items():
                assert _same_bytes(value, sd[key]), key
            assert torch.equal(fresh(index).to(torch.bfloat16), source(index))


def test_dense_dict_into_quantized_layer():
    layer = _layer(7, 64)
    dense = _dense(7, 64, seed=9)
    layer.load_state_dict(dense.state_dict(), strict=True)
    packed, _ = nf.quantize_4bit(dense.weight.detach(), quant_type="nf4")
    assert torch.equal(layer.weight.data, packed)


def test_meta_construction_then_load():
    """Built on meta (empty init, as transformers does), the layer takes the checkpoint's
    tensors and device, pre-quantized or dense."""
    source = _layer(10, 128, torch.float16, nested=True)
    index = torch.tensor([9, 0, 4])
    meta = EmbeddingNF4(10, 128, dtype=torch.float16, device="meta")
    assert meta.weight.device.type == "meta"
    meta.load_state_dict(source.state_dict(), strict=True)
    assert meta.weight.device.type == "cpu" and type(meta.weight) is Params4bit
    assert torch.equal(meta(index), source(index))
    dense = _dense(10, 128, torch.float16)
    meta = EmbeddingNF4(10, 128, dtype=torch.float16, device="meta")
    meta.load_state_dict(dense.state_dict(), strict=True)
    assert not meta.weight.bnb_quantized and meta.weight.device.type == "cpu"
    assert torch.equal(meta(index), _spec_forward(meta, index))


def test_deepcopy_and_pickle_keep_state():
    layer = _layer(9, 64, nested=True)
    index = torch.tensor([[1, 8], [0, 0]])
    y = layer(index)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)),
                  torch.load(buffer, weights_only=False)):
        w = clone.weight
        assert type(w) is Params4bit and w.bnb_quantized and w.quant_type == "nf4"
        assert w.module is clone and clone.quant_state is w.quant_state
        assert w.quant_state == layer.weight.quant_state and w.quant_state is not layer.weight.quant_state
        assert w.data.data_ptr() != layer.weight.data.data_ptr()
        assert torch.equal(clone(index), y)


def test_restores_quant_state_dropped_by_a_wrapper():
    """FSDP can swap the weight for a plain Parameter of the packed data; the module's copy
    of the quant state brings it back on the next forward (as bitsandbytes does)."""
    layer = _layer(9, 64)
    index = torch.tensor([3, 1])
    y = layer(index)
    layer.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)
    assert torch.equal(layer(index), y)
    assert isinstance(layer.weight, Params4bit) and layer.weight.quant_state is layer.quant_state
