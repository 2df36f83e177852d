"""QuantState: what dequantizing a 4-bit or 8-bit blockwise tensor takes, and its state-dict form.

The fields, their meaning and the serialized keys are bitsandbytes' (see
shared/reference/nf4_format.md section 4), so states move between the two libraries
through `as_dict(packed=True)` / `from_dict`. Unlike bitsandbytes, `from_dict`
checks everything it reads and says what is wrong, instead of failing later in a
kernel with a shape error.

Code-book formats other than NF4/FP4 (nf4lora.codebook: "af4", "bof4", "iq4nl", "int4",
and "custom" tables) use the same keys, with the table in `quant_map`, except that their
packed entry is 'quant_state.nf4lora__<quant_type>' instead of
'quant_state.bitsandbytes__<quant_type>': bitsandbytes (which accepts only its two names
there) and transformers' bitsandbytes loader then refuse such a dict instead of decoding
it as NF4 or FP4. NF4/FP4 dicts are byte for byte what bitsandbytes writes.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from ._weight import BLOCKSIZES, FLOAT_DTYPES
from .codebook import CODEBOOK_FORMATS, CUSTOM, FORMATS, QUANT_TYPES, check_code, get_4bit_type

PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
# The packed entry of a code-book format that bitsandbytes cannot decode (module docstring).
NF4LORA_PACKED_KEY_PREFIX = "quant_state.nf4lora__"
_BLOB_NAMES = {**{"bitsandbytes__" + q: q for q in QUANT_TYPES},
               **{"nf4lora__" + f: f for f in CODEBOOK_FORMATS + (CUSTOM,)}}
TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape",
             "nested_blocksize", "nested_dtype", "nested_offset")


def packed_key(quant_type: str) -> str:
    """The packed entry's key for a 4-bit format: bitsandbytes' for NF4/FP4, nf4lora's for
    every other code book."""
    prefix = PACKED_KEY_PREFIX if quant_type in QUANT_TYPES else NF4LORA_PACKED_KEY_PREFIX
    return prefix + quant_type


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling bitsandbytes writes."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, key: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"quant state {key!r} must name a torch dtype, got {name!r}")
    return dtype


class QuantState:
    """State of a blockwise-quantized tensor (bitsandbytes' field names).

    absmax:     float32 [blocks], or uint8 [blocks] codes when double-quantized (nested)
    shape:      torch.Size of the original tensor
    code:       the 16-entry table (4-bit, indexed by code) or 256-entry map (8-bit)
    dtype:      the original dtype, and the dtype dequantization returns by default
    blocksize, quant_type ('nf4' | 'fp4' | a code-book format of nf4lora.codebook, 'custom'
                when `code` is a table given as data; None for 8-bit states)
    offset:     float32 0-d tensor, the mean subtracted before double quantization
    state2:     the nested QuantState (absmax2 float32, code = dynamic map, blocksize 256)
    """

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None,
                 dtype=None, offset=None, state2=None):
        self.absmax = absmax
        self.shape = shape
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def __getattr__(self, name):
        # FSDP's state-dict traversal resolves the key "weight.quant_state.bitsandbytes__nf4"
        # (or ".nf4lora__af4") with getattr on this object; answer it with the packed blob.
        if name in _BLOB_NAMES:
            packed = self.as_dict(packed=True)
            if "quant_state." + name in packed:
                return packed["quant_state." + name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getitem__(self, index):
        """The list layout of bitsandbytes < 0.41 states, for old call sites."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][index]

    def __repr__(self) -> str:
        return (f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape or ())}, "
                f"dtype={self.dtype}, blocksize={self.blocksize}, nested={self.nested}, "
                f"device={self.absmax.device})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        def same(a, b):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                return a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
            return a == b
        return all(same(getattr(self, f), getattr(other, f)) for f in
                   ("absmax", "shape", "code", "dtype", "blocksize", "quant_type",
                    "offset", "state2"))

    __hash__ = None

    def __getstate__(self) -> dict[str, Any]:
        # not the PackedWeight that PackedWeight.from_state keeps here: a cache of this
        # process (its key holds object ids)
        return {k: v for k, v in self.__dict__.items() if k != "_nf4lora_weight"}

    def to(self, device) -> "QuantState":
        """Move every tensor to `device`, in place (as bitsandbytes does); returns self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state-dict form. packed=True: tensors only, the scalars JSON-encoded into
        one uint8 tensor under 'quant_state.bitsandbytes__<quant_type>' (safetensors-safe),
        byte for byte what bitsandbytes writes ('quant_state.nf4lora__<quant_type>' for the
        code books bitsandbytes cannot decode, `packed_key`). An 8-bit state (quant_type
        None) has no packed form: like bitsandbytes, packed=True then returns the plain dict."""
        items: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            items.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                # A copy, so safetensors does not see the dynamic map shared between layers.
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": dtype_name(self.state2.dtype),
                "nested_offset": self.offset.item(),
            })
        if not packed or self.quant_type is None:
            return items
        tensors = {k: v for k, v in items.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in items.items() if not isinstance(v, torch.Tensor)}
        blob = json.dumps(scalars).encode("utf-8")
        tensors[packed_key(self.quant_type)] = torch.tensor(list(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device=None) -> "QuantState":
        """Rebuild a state from `as_dict` output, packed or not: a 4-bit state, or an 8-bit
        one from `quantize_blockwise` (quant_type None; bitsandbytes never packs those).

        Keys may carry a prefix (e.g. 'weight.absmax'); only the last component counts.
        Every key, type, size and value is checked; a bad one raises ValueError naming it.
        """
        items = _unpack(qs_dict)
        if "quant_type" not in items:
            raise ValueError("quant state is missing 'quant_type' (and has no packed "
                             "'quant_state.bitsandbytes__nf4|fp4' entry holding it)")
        quant_type = items["quant_type"]
        if quant_type is None:
            return cls._from_8bit_items(items, device)
        if quant_type not in FORMATS:
            raise ValueError(f"quant state names the 4-bit format {quant_type!r}, which this version "
                             f"of nf4lora does not know (it knows {FORMATS}, or None for an "
                             "8-bit state)")
        for key in ("absmax", "quant_map", "blocksize", "dtype", "shape"):
            if key not in items:
                raise ValueError(f"quant state is missing {key!r}")
        blocksize = items["blocksize"]
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"quant state 'blocksize' must be one of {BLOCKSIZES}, got {blocksize!r}")
        dtype = dtype_from_name(items["dtype"], "dtype")
        shape = items["shape"]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"quant state 'shape' must be a list of sizes, got {shape!r}")
        shape = torch.Size(shape)
        blocks = math.ceil(math.prod(shape) / blocksize)

        quant_map = _tensor(items, "quant_map", torch.float32, (16,))
        if quant_type == CUSTOM:
            check_code(quant_map, "quant state 'quant_map'")
        elif not torch.equal(quant_map.cpu(), get_4bit_type(quant_type)):
            raise ValueError(f"quant state 'quant_map' is not the {quant_type} table")

        absmax, offset, state2 = cls._absmax_items(items, blocks, device)
        return cls(absmax=absmax, shape=shape, code=quant_map.to(device),
                   blocksize=blocksize, quant_type=quant_type, dtype=dtype,
                   offset=offset, state2=state2)

    @classmethod
    def _from_8bit_items(cls, items: dict[str, Any], device) -> "QuantState":
        """An 8-bit blockwise state: bitsandbytes writes quant_type None, shape None and the
        256-entry map as 'quant_map'. Without a shape the block count is absmax's own; a
        nested absmax is still checked against it."""
        for key in ("absmax", "quant_map", "blocksize", "dtype"):
            if key not in items:
                raise ValueError(f"quant state (8-bit) is missing {key!r}")
        blocksize = items["blocksize"]
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
            raise ValueError(f"quant state 'blocksize' must be a positive int, got {blocksize!r}")
        dtype = dtype_from_name(items["dtype"], "dtype")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"quant state 'dtype' must be one of {FLOAT_DTYPES}, got {dtype}")
        absmax = items["absmax"]
        if not isinstance(absmax, torch.Tensor) or absmax.dim() != 1:
            got = tuple(absmax.shape) if isinstance(absmax, torch.Tensor) else type(absmax).__name__
            raise ValueError(f"quant state 'absmax' must be a 1-d tensor (one entry per block), got {got}")
        shape = items.get("shape")
        if shape is None:
            blocks = absmax.numel()
        elif isinstance(shape, (list, tuple)) and all(isinstance(d, int) and d >= 0 for d in shape):
            shape = torch.Size(shape)
            blocks = math.ceil(math.prod(shape) / blocksize)
        else:
            raise ValueError(f"quant state 'shape' must be None or a list of sizes, got {shape!r}")
        code = _tensor(items, "quant_map", torch.float32, (256,))
        absmax, offset, state2 = cls._absmax_items(items, blocks, device)
        return cls(absmax=absmax, shape=shape, code=code.to(device), blocksize=blocksize,
                   dtype=dtype, offset=offset, state2=state2)

    @classmethod
    def _absmax_items(cls, items: dict[str, Any], blocks: int, device):
        """(absmax, offset, state2) for `blocks` blocks: float32 absmax, or uint8 codes plus
        the nested level when any 'nested_*' key is present (then all five must be)."""
        nested_keys = [k for k in items if k.startswith("nested_")]
        if not nested_keys:
            return _tensor(items, "absmax", torch.float32, (blocks,)).to(device), None, None
        for key in ("nested_absmax", "nested_quant_map", "nested_blocksize",
                    "nested_dtype", "nested_offset"):
            if key not in items:
                raise ValueError(f"quant state has {nested_keys} but is missing {key!r}")
        nested_blocksize = items["nested_blocksize"]
        if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
            raise ValueError(f"quant state 'nested_blocksize' must be a positive int, got {nested_blocksize!r}")
        if not isinstance(items["nested_offset"], (int, float)):
            raise ValueError(f"quant state 'nested_offset' must be a number, got {items['nested_offset']!r}")
        absmax = _tensor(items, "absmax", torch.uint8, (blocks,))
        state2 = cls(
            absmax=_tensor(items, "nested_absmax", torch.float32,
                           (math.ceil(blocks / nested_blocksize),)).to(device),
            code=_tensor(items, "nested_quant_map", torch.float32, (256,)).to(device),
            blocksize=nested_blocksize,
            dtype=dtype_from_name(items["nested_dtype"], "nested_dtype"),
        )
        offset = torch.tensor(float(items["nested_offset"]), dtype=torch.float32, device=device)
        return absmax.to(device), offset, state2


def _unpack(qs_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip key prefixes and decode the packed JSON blob; reject unknown keys."""
    if not isinstance(qs_dict, dict):
        raise ValueError(f"quant state must be a dict, got {type(qs_dict).__name__}")
    items: dict[str, Any] = {}
    blobs = [k for k in qs_dict if "quant_state." in k
             or k.startswith(("bitsandbytes__", "nf4lora__"))]
    if len(blobs) > 1:
        raise ValueError(f"quant state has more than one packed entry: {blobs}")
    for key, value in qs_dict.items():
        if key in blobs:
            name = key.split(".")[-1]
            if name not in _BLOB_NAMES:
                prefix, _, fmt = name.partition("__")
                if fmt in FORMATS:
                    raise ValueError(f"quant state key {key!r}: the {fmt!r} format's packed entry "
                                     f"is {packed_key(fmt)!r}")
                if prefix in ("bitsandbytes", "nf4lora") and fmt:
                    raise ValueError(f"quant state key {key!r} names the 4-bit format {fmt!r}, which "
                                     f"this version of nf4lora does not know (it knows {FORMATS})")
                raise ValueError(f"quant state key {key!r} must end in one of {sorted(_BLOB_NAMES)}")
            if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
                raise ValueError(f"quant state {key!r} must be a uint8 tensor of JSON bytes")
            try:
                decoded = json.loads(bytes(value.cpu().reshape(-1).tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"quant state {key!r} holds malformed JSON: {error}") from None
            if not isinstance(decoded, dict):
                raise ValueError(f"quant state {key!r} must hold a JSON object")
            unknown = set(decoded) - set(JSON_KEYS)
            if unknown:
                raise ValueError(f"quant state {key!r} has unknown entries {sorted(unknown)}")
            if decoded.get("quant_type", _BLOB_NAMES[name]) != _BLOB_NAMES[name]:
                raise ValueError(f"quant state {key!r} says quant_type {decoded.get('quant_type')!r}")
            items.update(decoded)
        else:
            name = key.split(".")[-1]
            if name not in TENSOR_KEYS + JSON_KEYS:
                raise ValueError(f"quant state has unknown key {key!r}; expected keys ending in "
                                 f"{TENSOR_KEYS + ('quant_state.bitsandbytes__nf4|fp4',)}")
            items[name] = value
    return items


def _tensor(items: dict[str, Any], key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    value = items[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"quant state {key!r} must be a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(f"quant state {key!r} must be {dtype}, got {value.dtype}")
    if value.numel() != math.prod(shape):
        raise ValueError(f"quant state {key!r} must have {math.prod(shape)} elements "
                         f"(shape {tuple(shape)}), got shape {tuple(value.shape)}")
    return value.reshape(shape)
