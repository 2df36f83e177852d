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
