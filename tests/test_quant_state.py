"""QuantState: round trips, devices, legacy access, and every malformed dict rejected."""
import copy
import json
import pickle

import pytest
import torch

import nf4lora.functional as F
from nf4lora.quant_state import QuantState

BLOB = "quant_state.bitsandbytes__nf4"


def _state(nested=True):
    return F.quantize_4bit(torch.randn(40, 70), quant_type="nf4", compress_statistics=nested)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_as_dict_from_dict_round_trip(nested, packed):
    weight, state = _state(nested)
    restored = QuantState.from_dict(state.as_dict(packed=packed), "cpu")
    assert restored == state and restored.nested == nested
    assert torch.equal(F.dequantize_4bit(weight, restored), F.dequantize_4bit(weight, state))


def test_from_dict_accepts_state_dict_prefixes():
    _, state = _state()
    prefixed = {"model.layers.0.q_proj.weight." + k: v for k, v in state.as_dict(packed=True).items()}
    assert QuantState.from_dict(prefixed, "cpu") == state


def test_to_moves_every_tensor_and_returns_self():
    _, state = _state()
    assert state.to("meta") is state
    assert {t.device.type for t in (state.absmax, state.code, state.offset, state.state2.absmax,
                                    state.state2.code)} == {"meta"}


def test_copies_and_pickles_keep_everything():
    _, state = _state()
    assert copy.deepcopy(state) == state
    assert pickle.loads(pickle.dumps(state)) == state


def test_packed_weight_is_kept_until_the_state_or_storage_changes():
    # PackedWeight.from_state keeps the weight it built on the state (its checks cost as
    # much as a small layer's GEMV): the same objects give the same weight, without checks
    from nf4lora._weight import PackedWeight
    packed, state = _state()
    first = PackedWeight.from_state(packed, state)
    assert PackedWeight.from_state(packed.t(), state) is first  # a view of the same bytes
    # a replaced field is a new object: checked and built again (here: refused)
    good_absmax = state.absmax
    state.absmax = good_absmax[:-1]
    with pytest.raises(ValueError, match="absmax"):
        PackedWeight.from_state(packed, state)
    state.absmax = good_absmax.clone()
    again = PackedWeight.from_state(packed, state)
    assert again is not first and again.absmax is state.absmax
    moved = packed.clone()  # other storage: the weight reads the new bytes
    assert PackedWeight.from_state(moved, state).packed.data_ptr() == moved.data_ptr()
    state.state2.absmax = state.state2.absmax.clone()
    assert PackedWeight.from_state(moved, state).nested.absmax is state.state2.absmax
    # the nested offset is read into the kept weight (once, not per op call); writing
    # into it is seen
    assert isinstance(PackedWeight.from_state(moved, state).nested.offset, float)
    state.offset.add_(1.0)
    assert PackedWeight.from_state(moved, state).nested.offset == state.offset.item()
    # the kept weight is not pickled with the state
    assert "_nf4lora_weight" in vars(state)
    assert "_nf4lora_weight" not in vars(pickle.loads(pickle.dumps(state)))


def test_packed_weight_of_a_params4bit_follows_its_storage():
    # from_state reads a tensor subclass's storage without its __torch_function__ (a
    # Params4bit's reads cost ~4 us each through it): a `.data` swap must still be seen
    from nf4lora._weight import PackedWeight
    from nf4lora.nn import Params4bit
    packed, state = _state()
    param = Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True)
    first = PackedWeight.from_state(param, state)
    assert type(first.packed) is torch.Tensor and first.packed.data_ptr() == packed.data_ptr()
    assert PackedWeight.from_state(param, state) is first
    param.data = packed.clone()
    moved = PackedWeight.from_state(param, state)
    assert moved is not first and type(moved.packed) is torch.Tensor
    assert moved.packed.data_ptr() == param.data_ptr() != packed.data_ptr()
    assert torch.equal(moved.packed, first.packed)


def test_legacy_list_access():
    _, state = _state()
    absmax, shape, dtype, blocksize, (offset, state2), quant_type = [state[i] for i in range(6)]
    assert shape == (40, 70) and blocksize == 64 and quant_type == "nf4" and state2 is state.state2
    assert getattr(state, "bitsandbytes__nf4").dtype == torch.uint8  # FSDP's key traversal


def _corrupt(mutate):
    _, state = _state()
    items = state.as_dict(packed=True)
    meta = json.loads(bytes(items[BLOB].tolist()))
    mutate(items, meta)
    if BLOB in items:
        items[BLOB] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return items


@pytest.mark.parametrize("mutate, match", [
    (lambda d, m: d.pop("absmax"), "missing 'absmax'"),
    (lambda d, m: d.pop("nested_absmax"), "missing 'nested_absmax'"),
    (lambda d, m: d.pop(BLOB), "quant_type"),
    (lambda d, m: d.update(bias=torch.zeros(3)), "unknown key 'bias'"),
    (lambda d, m: d.update(absmax=d["absmax"][:-1]), "'absmax' must have 44 elements"),
    (lambda d, m: d.update(absmax=d["absmax"].float()), "'absmax' must be torch.uint8"),
    (lambda d, m: d.update(quant_map=d["quant_map"] * 2), "not the nf4 table"),
    (lambda d, m: d.update(nested_quant_map=d["nested_quant_map"][:10]), "must have 256 elements"),
    (lambda d, m: m.update(blocksize=48), "'blocksize' must be one of"),
    (lambda d, m: m.update(shape=[40, -70]), "'shape' must be a list of sizes"),
    (lambda d, m: m.update(shape=[41, 70]), "'absmax' must have 45 elements"),
    (lambda d, m: m.update(dtype="float128"), "'dtype' must name a torch dtype"),
    (lambda d, m: m.update(quant_type="fp4"), "says quant_type 'fp4'"),
    (lambda d, m: m.update(extra=1), r"unknown entries \['extra'\]"),
    (lambda d, m: m.update(nested_offset="zero"), "'nested_offset' must be a number"),
])
def test_malformed_dicts_are_rejected_with_the_reason(mutate, match):
    with pytest.raises(ValueError, match=match):
        QuantState.from_dict(_corrupt(mutate), "cpu")


def test_malformed_json_blob():
    _, state = _state()
    items = state.as_dict(packed=True)
    items[BLOB] = torch.tensor(list(b'{"quant_type": "nf4", '), dtype=torch.uint8)
    with pytest.raises(ValueError, match="malformed JSON"):
        QuantState.from_dict(items, "cpu")
    items[BLOB] = torch.tensor([0xFF, 0xFE], dtype=torch.uint8)
    with pytest.raises(ValueError, match="malformed JSON"):
        QuantState.from_dict(items, "cpu")
    with pytest.raises(ValueError, match="must be a dict"):
        QuantState.from_dict([("absmax", 1)], "cpu")


# --- 8-bit blockwise states (quantize_blockwise): quant_type None, shape None, a 256-entry map


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shape, dtype, blocksize", [((3, 333), torch.bfloat16, 64),
                                                      ((1001,), torch.float16, 256),
                                                      ((2, 5, 700), torch.float32, 4096)])
def test_8bit_states_round_trip_through_as_dict(nested, packed, shape, dtype, blocksize):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    codes, state = F.quantize_blockwise(x, blocksize=blocksize, nested=nested)
    items = state.as_dict(packed=packed)
    # bitsandbytes' form: no packed blob for quant_type None, even with packed=True.
    assert items["quant_type"] is None and items["shape"] is None
    assert items["quant_map"].shape == (256,)
    restored = QuantState.from_dict(items, "cpu")
    assert restored == state and restored.nested == nested and restored.shape is None
    ours, theirs = F.dequantize_blockwise(codes, restored), F.dequantize_blockwise(codes, state)
    assert ours.dtype == dtype and torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))


def _8bit_formula(codes, code, absmax, blocksize):
    """code[q] * absmax[block], in float32: bitsandbytes' 8-bit semantics."""
    block = torch.arange(codes.numel()) // blocksize
    return code[codes.reshape(-1).long()] * absmax[block]


@pytest.mark.parametrize("nested", [False, True])
def test_8bit_state_dicts_move_between_libraries(bnb, nested):
    x = torch.randn(3, 700, generator=torch.Generator().manual_seed(3))
    # bitsandbytes' state -> nf4lora: every field arrives; dequantizing follows the formula.
    codes, theirs = bnb.quantize_blockwise(x, blocksize=256, nested=nested)
    ours = QuantState.from_dict(theirs.as_dict(packed=True), "cpu")
    assert torch.equal(ours.absmax, theirs.absmax) and torch.equal(ours.code, theirs.code)
    assert (ours.blocksize, ours.dtype, ours.quant_type, ours.shape) == (256, torch.float32, None, None)
    assert ours.nested == nested
    if nested:
        assert torch.equal(ours.offset, theirs.offset)
        assert torch.equal(ours.state2.absmax, theirs.state2.absmax)
        assert torch.equal(ours.state2.code, theirs.state2.code)
        assert ours.state2.blocksize == theirs.state2.blocksize == 256
        absmax = _8bit_formula(ours.absmax, ours.state2.code, ours.state2.absmax, 256) + ours.offset
    else:
        absmax = theirs.absmax
    expected = _8bit_formula(codes, theirs.code, absmax, 256).reshape(x.shape)
    assert torch.equal(F.dequantize_blockwise(codes, ours), expected)
    # nf4lora's state -> bitsandbytes' from_dict: the same fields.
    _, state = F.quantize_blockwise(x, blocksize=256, nested=nested)
    loaded = bnb.QuantState.from_dict(state.as_dict(packed=True), torch.device("cpu"))
    assert torch.equal(loaded.absmax, state.absmax) and torch.equal(loaded.code, state.code)
    assert (loaded.blocksize, loaded.dtype, loaded.quant_type, loaded.shape) == (256, torch.float32, None, None)
    assert loaded.nested == nested
    if nested:
        assert torch.equal(loaded.offset, state.offset)
        assert torch.equal(loaded.state2.absmax, state.state2.absmax)


def _8bit_dict(nested=True):
    _, state = F.quantize_blockwise(torch.randn(5, 300), blocksize=64, nested=nested)
    return state.as_dict()   # 24 blocks; nested: one nested block of 64


@pytest.mark.parametrize("nested, mutate, match", [
    (False, lambda d: d.update(absmax=d["absmax"].half()), "'absmax' must be torch.float32"),
    (True, lambda d: d.update(absmax=d["absmax"].float()), "'absmax' must be torch.uint8"),
    (False, lambda d: d.update(absmax=d["absmax"].reshape(4, 6)), "'absmax' must be a 1-d tensor"),
    (True, lambda d: d.update(nested_absmax=torch.ones(2)), "'nested_absmax' must have 1 elements"),
    (True, lambda d: d.update(nested_quant_map=d["nested_quant_map"][:16]), "'nested_quant_map' must have 256"),
    (False, lambda d: d.update(quant_map=d["quant_map"][:16]), "'quant_map' must have 256 elements"),
    (False, lambda d: d.pop("quant_map"), r"\(8-bit\) is missing 'quant_map'"),
    (True, lambda d: d.pop("nested_offset"), "missing 'nested_offset'"),
    (False, lambda d: d.update(blocksize=0), "'blocksize' must be a positive int"),
    (False, lambda d: d.update(blocksize="64"), "'blocksize' must be a positive int"),
    (False, lambda d: d.update(dtype="int8"), "'dtype' must be one of"),
    (False, lambda d: d.update(shape="5x300"), "'shape' must be None or a list of sizes"),
    (False, lambda d: d.update(shape=[5, 310]), "'absmax' must have 25 elements"),
    (False, lambda d: d.update(quant_type="int8"), "or None for an 8-bit state"),
])
def test_malformed_8bit_dicts_are_rejected_with_the_reason(nested, mutate, match):
    items = _8bit_dict(nested)
    mutate(items)
    with pytest.raises(ValueError, match=match):
        QuantState.from_dict(items, "cpu")


def test_8bit_dict_with_a_consistent_shape_is_accepted():
    # bitsandbytes writes shape None; a shape, if given, must agree with the block count.
    items = _8bit_dict(nested=False)
    items["shape"] = [5, 301]  # 1505 elements in blocks of 64: 24 blocks, as absmax has
    assert QuantState.from_dict(items, "cpu").shape == (5, 301)


def test_4bit_dict_passed_off_as_8bit_is_rejected():
    # quant_type None with a 4-bit state's 16-entry table: the 8-bit checks catch it.
    items = _state(nested=False)[1].as_dict()
    items["quant_type"] = None
    with pytest.raises(ValueError, match="'quant_map' must have 256 elements"):
        QuantState.from_dict(items, "cpu")
