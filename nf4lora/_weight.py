"""A packed 4-bit tensor as every layer below `nn` sees it: built once, checked once.

`PackedWeight` is the one representation of a quantized tensor (a weight [out, in] for the
matmul ops, any shape for dequantize) from the autograd Functions down to a backend's
kernel launch:

    nn / functional       PackedWeight.from_state(packed, quant_state)   checks everything
    autograd              passes it through
    _ops (torch.library)  weight.op_args() -> schema arguments -> PackedWeight.from_op_args
    backends              read its fields

Both constructors run the same `_check`, and this module owns the error types of the
checks every entry point makes (`check_float`, `check_quant_args`, `check_tensor`), so
the same mistake raises the same error wherever it is made:

    DtypeError (a TypeError and a ValueError)   a tensor of the wrong dtype
    TypeError                                   not a tensor at all
    ValueError                                  a wrong shape, size, device or setting

DtypeError is both because torch and nf4lora's autograd call a wrong dtype a TypeError
while bitsandbytes' functional API raises ValueError; drop-in code may catch either.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import reference
from .codebook import NAMED_FORMATS, KernelCodec, format_key, is_format_key, kernel_codec

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256     # double quantization: one float32 absmax2 per 256 absmax codes


class DtypeError(TypeError, ValueError):
    """A tensor of the wrong dtype."""


# --- the checks every entry point shares -------------------------------------------------

def check_tensor(name: str, t, dtype=None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise DtypeError(f"{name} must be {dtype}, got {t.dtype}")


def check_float(name: str, t) -> None:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise DtypeError(f"{name} must be one of {FLOAT_DTYPES}, got {t.dtype}")


def check_quant_args(blocksize, quant_type) -> None:
    """`quant_type` is a format key: a named format or a custom code book's key
    (nf4lora.codebook.format_key)."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if not is_format_key(quant_type):
        raise ValueError(f"quant_type must be one of {NAMED_FORMATS} (or code= a 16-level "
                         f"code book), got {quant_type!r}")


def check_sized(name: str, t, dtype: torch.dtype, numel: int, device) -> None:
    """`t` is a tensor of `dtype` with `numel` elements on `device`."""
    check_tensor(name, t, dtype)
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()} "
                         f"(shape {tuple(t.shape)})")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def packed_bytes(n: int) -> int:
    """Bytes holding n 4-bit codes: two per byte, an odd tail padded."""
    return (n + 1) // 2


def num_blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def packed_numel(shape, storage: torch.dtype) -> int:
    """Elements of `storage` holding the codes of `shape`: the packed bytes, the last
    element zero-padded when they do not fill it (functional.quantize_4bit's layout)."""
    return -(-packed_bytes(math.prod(shape)) // storage.itemsize)


def check_packed(data, shape, name: str = "A") -> None:
    """Packed codes of a tensor of `shape` fill exactly `packed_numel(shape, data.dtype)`
    elements, in any layout ([k, 1], its transpose [1, k], or flat). Fewer would read past
    the end; more means the state belongs to another tensor (bitsandbytes refuses it too)."""
    check_tensor(name, data)
    if data.is_complex() or data.dtype == torch.bool:
        raise DtypeError(f"{name} must be an integer or float storage dtype, got {data.dtype}")
    elements = packed_numel(shape, data.dtype)
    if data.numel() != elements:
        relation = "fewer" if data.numel() < elements else "more"
        raise ValueError(f"{name} holds {data.numel()} elements of {data.dtype}, {relation} than the "
                         f"{elements} that the {packed_bytes(math.prod(shape))} bytes of packed codes "
                         f"of shape {list(shape)} fill (got shape {list(data.shape)})")


# Where a quant state keeps the last PackedWeight it described (PackedWeight.from_state).
_CACHE_ATTRIBUTE = "_nf4lora_weight"
_STATE_FIELDS = ("absmax", "shape", "blocksize", "quant_type", "code", "dtype", "offset", "state2")


_OFFSET_FIELD = _STATE_FIELDS.index("offset")
_read_state_fields = operator.attrgetter(*_STATE_FIELDS)   # one C call (runs on every op call)
_NO_NESTED = (None,) * 3


def _state_objects(quant_state) -> tuple:
    """The objects a PackedWeight is built from: the state's fields and its nested state's."""
    try:
        objects = _read_state_fields(quant_state)
    except AttributeError:  # a duck-typed state without some of them
        objects = tuple(getattr(quant_state, f, None) for f in _STATE_FIELDS)
    state2 = objects[-1]
    return objects + (_NO_NESTED if state2 is None else (getattr(state2, "absmax", None),
                                                         getattr(state2, "code", None),
                                                         getattr(state2, "blocksize", None)))


def _state_sources(packed: Tensor, objects: tuple) -> tuple:
    """Identifies (packed, the state's `objects`) for PackedWeight.from_state's cache: the
    packed storage (address, size, dtype, device), the nested offset's version (its value
    is read into the kept weight) and the identities of the objects."""
    offset = objects[_OFFSET_FIELD]
    return ((packed.data_ptr(), packed.numel(), packed.dtype, packed.device,
             offset._version if isinstance(offset, Tensor) else None) + tuple(map(id, objects)))


def contents_key(*tensors: Tensor) -> tuple:
    """What identifies the contents of `tensors` for a cache of something derived from them:
    device, storage address and version counter (every in-place write through autograd's
    view bumps it: optimizer steps, load_state_dict, init; a new tensor has a new address).
    Equal keys mean unchanged contents, up to writes through `.data`."""
    return tuple((t.device, t.data_ptr(), t._version) for t in tensors)


# --- the descriptor ----------------------------------------------------------------------

class NestedAbsmax(NamedTuple):
    """Double quantization: absmax[i] = code[q[i]] * absmax2[i // blocksize] + offset."""
    absmax: Tensor                  # float32 [ceil(blocks / blocksize)]
    code: Tensor                    # float32 [256], the dynamic map
    offset: Union[Tensor, float]    # a 0-d tensor until an op reads it (torch.compile never
                                    # sees its value), a float from then on
    blocksize: int


class PackedWeight(NamedTuple):
    """4-bit codes of a tensor of `shape` (a weight is [out_features, in_features])."""
    packed: Tensor                  # uint8, flat, >= ceil(n/2) bytes
    absmax: Tensor                  # float32 [blocks], or uint8 codes [blocks] when nested
    blocksize: int
    quant_type: str                 # the format key: "nf4", "fp4", a named code book ("af4",
                                    # ...) or "custom:<hex>" carrying a custom table exactly
                                    # (nf4lora.codebook.format_key / table)
    shape: tuple
    nested: Optional[NestedAbsmax]
    # The CPU kernels' interleaved copy of a matmul weight (nf4lora.backends.cpu.interleave,
    # csrc/weight.h), which the fused GEMV reads instead of `packed` where its kernel runs;
    # None: the row layout. A cache of the same codes (an eval-mode Linear4bit keeps one),
    # never part of the format: op_args, rows and columns leave it out.
    interleaved: Optional[Tensor] = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def codec(self) -> KernelCodec:
        """The format as the native kernels take it: the 16 levels they decode to (and the
        encoder, unused here). Cached per format key: the bindings read it on every call."""
        return kernel_codec(self.quant_type)

    @classmethod
    def from_state(cls, packed: Tensor, quant_state, name: str = "weight") -> "PackedWeight":
        """The packed codes `packed` (any storage dtype, [k, 1], [1, k] or flat) described by
        `quant_state` (nf4lora's QuantState or bitsandbytes', duck-typed).

        The checks cost ~11 us (~23 us through Params4bit's __torch_function__), a quarter
        of a 64 x 4096 layer's M = 1 forward, on every call. So the state keeps the last
        weight it described (attribute `_nf4lora_weight`) with the identities of what it
        was built from: the same packed storage and the same state objects describe the
        same weight (replacing absmax, state2, shape, ... makes a new object; writing
        into a tensor changes no metadata the checks read)."""
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            # traced (compile, fake tensors: the memory planner): nothing to keep, and no
            # value may be read
            return cls._from_state(packed, quant_state, name)
        objects = _state_objects(quant_state)
        subclass = type(packed) is not Tensor and isinstance(packed, Tensor)
        if subclass:  # (Params4bit) read without __torch_function__, ~4 us a read on a 2-core
            # Zen 1: 2.7 us less than reading an as_subclass(Tensor) alias
            with torch._C.DisableTorchFunctionSubclass():
                sources = _state_sources(packed, objects)
        else:
            sources = _state_sources(packed, objects)
        cached = getattr(quant_state, _CACHE_ATTRIBUTE, None)
        if cached is not None and cached[0] == sources:
            weight = cached[2]
            if weight.interleaved is None or cached[3] == weight.versions():
                return weight
            # the codes or constants were written since the copy was made: drop it
            weight = weight._replace(interleaved=None)
            setattr(quant_state, _CACHE_ATTRIBUTE, (sources, objects, weight, None))
            return weight
        # the kept weight has the nested offset read (with_offset_read: on a GPU a sync, once
        # per state instead of once per op call); its version is in the key
        weight = cls._from_state(packed.as_subclass(Tensor) if subclass else packed, quant_state, name)
        if weight.device.type != "meta":
            weight = weight.with_offset_read()
        try:  # (the objects themselves are kept, so their ids stay unique while cached)
            setattr(quant_state, _CACHE_ATTRIBUTE, (sources, objects, weight, None))
        except AttributeError:  # a state type that takes no attributes: no cache
            pass
        return weight

    @classmethod
    def keep_interleaved(cls, packed: Tensor, quant_state, make) -> None:
        """Keep an interleaved copy (`make(weight)`, None: none) of the weight that
        (packed, quant_state) describe in from_state's cache, so that every op on that
        weight reads it, until the codes or constants are written (their storages' version
        counters are checked at each from_state) or `drop_interleaved`. An eval-mode
        Linear4bit calls this (nn.linear4bit) on every call: with the copy there already it
        returns at once (the next from_state checks the copy is current)."""
        if cls.kept_interleaved(quant_state) is not None:
            return
        weight = cls.from_state(packed, quant_state)
        if weight.interleaved is not None:
            return
        cached = getattr(quant_state, _CACHE_ATTRIBUTE, None)
        if cached is None or cached[2] is not weight:  # traced, or a state without the cache
            return
        copy = make(weight)
        if copy is not None:
            setattr(quant_state, _CACHE_ATTRIBUTE, (cached[0], cached[1], weight._replace(interleaved=copy),
                                                    weight.versions()))

    @staticmethod
    def kept_interleaved(quant_state) -> Optional[Tensor]:
        """The interleaved copy from_state's cache holds for this state (current or not:
        from_state checks that), or None."""
        cached = getattr(quant_state, _CACHE_ATTRIBUTE, None)
        return None if cached is None else cached[2].interleaved

    @staticmethod
    def drop_interleaved(quant_state) -> None:
        """Forget the interleaved copy kept by `keep_interleaved` (its memory goes with it)."""
        cached = getattr(quant_state, _CACHE_ATTRIBUTE, None)
        if cached is not None and cached[2].interleaved is not None:
            setattr(quant_state, _CACHE_ATTRIBUTE, cached[:2] + (cached[2]._replace(interleaved=None), None))

    def versions(self) -> tuple:
        """The version counters of the tensors holding the codes and constants (every
        in-place write through torch bumps one; `.data` writes do not): with from_state's
        key (their storages and objects), what a derived copy must match to be current."""
        nested = self.nested
        if nested is None:
            return (self.packed._version, self.absmax._version)
        return (self.packed._version, self.absmax._version, nested.absmax._version, nested.code._version)

    @classmethod
    def _from_state(cls, packed: Tensor, quant_state, name: str) -> "PackedWeight":
        fields = ("absmax", "shape", "blocksize", "quant_type", "state2", "dtype")
        if not all(hasattr(quant_state, f) for f in fields):
            raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
        if quant_state.shape is None:
            raise ValueError("quant_state.shape is None; a 4-bit state needs the original shape")
        if quant_state.dtype not in FLOAT_DTYPES:
            raise ValueError(f"quant_state.dtype must be one of {FLOAT_DTYPES}, got {quant_state.dtype}")
        # A named format's table is not read (it is fixed by its name), only its size checked:
        # comparing values would cost a device sync on every call. A custom code book is
        # read: its values are its format key, the only way the table crosses the op schemas.
        code = getattr(quant_state, "code", None)
        if code is not None and code.numel() != 16:
            raise ValueError(f"quant_state.code must be the 16-entry {quant_state.quant_type} table, "
                             f"got {code.numel()} entries (an 8-bit state's 256-entry map?)")
        key = format_key(quant_state.quant_type, code)
        shape = tuple(int(d) for d in quant_state.shape)
        check_packed(packed, shape, name)
        flat = packed.detach().reshape(-1)
        nested = None
        if quant_state.state2 is not None:
            state2 = quant_state.state2
            if getattr(quant_state, "offset", None) is None:
                raise ValueError("quant_state.offset is None, but a nested state (state2) needs "
                                 "the offset its absmax was double-quantized around")
            offset = quant_state.offset
            if not isinstance(offset, Tensor):
                offset = torch.tensor(float(offset), dtype=torch.float32)
            nested = NestedAbsmax(state2.absmax, state2.code, offset, state2.blocksize)
        weight = cls(flat if flat.dtype == torch.uint8 else flat.view(torch.uint8),
                     quant_state.absmax, quant_state.blocksize, key, shape, nested)
        weight._check()
        return weight

    def op_args(self) -> tuple:
        """The weight as the torch.library schemas take it (see `from_op_args`)."""
        nested = self.nested
        if nested is None:
            return (self.packed, self.absmax, self.blocksize, self.quant_type, list(self.shape),
                    None, None, None, NESTED_BLOCKSIZE)
        return (self.packed, self.absmax, self.blocksize, self.quant_type, list(self.shape),
                nested.absmax, nested.code, torch.as_tensor(nested.offset, dtype=torch.float32),
                nested.blocksize)

    @classmethod
    def from_op_args(cls, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                     shape: list, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                     nested_offset: Optional[Tensor], nested_blocksize: int) -> "PackedWeight":
        """Rebuild (and check) what `op_args` flattened."""
        if nested_absmax is None:
            if nested_code is not None or nested_offset is not None:
                raise ValueError("nested_code/nested_offset given without nested_absmax")
            nested = None
        else:
            if nested_code is None or nested_offset is None:
                raise ValueError("nested_absmax needs nested_code and nested_offset")
            nested = NestedAbsmax(nested_absmax, nested_code, nested_offset, nested_blocksize)
        check_tensor("packed weight", packed, torch.uint8)
        weight = cls(packed.reshape(-1), absmax, blocksize, quant_type,
                     tuple(int(d) for d in shape), nested)
        weight._check()
        return weight

    def _check(self) -> None:
        """Everything the kernels trust: sizes, dtypes, devices, settings. Metadata only
        (no value is read), so torch.compile traces it without a graph break."""
        check_quant_args(self.blocksize, self.quant_type)
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape must be non-negative, got {list(self.shape)}")
        n, device = self.numel, self.packed.device
        if self.packed.numel() < packed_bytes(n):
            raise ValueError(f"packed weight holds {self.packed.numel()} bytes, fewer than the "
                             f"{packed_bytes(n)} that shape {list(self.shape)} needs")
        blocks = num_blocks(n, self.blocksize)
        nested = self.nested
        if nested is None:
            check_sized("absmax", self.absmax, torch.float32, blocks, device)
            return
        if not isinstance(nested.blocksize, int) or nested.blocksize <= 0:
            raise ValueError(f"nested_blocksize must be a positive int, got {nested.blocksize!r}")
        check_sized("absmax (8-bit codes when nested)", self.absmax, torch.uint8, blocks, device)
        check_sized("nested_absmax", nested.absmax, torch.float32,
                    num_blocks(blocks, nested.blocksize), device)
        check_sized("nested_code", nested.code, torch.float32, 256, device)
        if isinstance(nested.offset, Tensor) and nested.offset.numel() != 1:
            raise ValueError(f"nested_offset must hold one value, got shape {tuple(nested.offset.shape)}")

    @property
    def row_granule(self) -> int:
        """Rows between the starts of row slices that `rows` can cut: a slice must start on
        a block (and, when nested, a nested-block) boundary so that its constants are a
        suffix of the weight's arrays. 1 for in_features a multiple of blocksize * 256."""
        unit = self.blocksize * (self.nested.blocksize if self.nested is not None else 1)
        return unit // math.gcd(self.in_features, unit)

    def rows(self, n0: int, n1: int) -> "PackedWeight":
        """Rows n0 <= n < n1 of a 2-D weight as a weight of their own, sharing its storage
        (no copy); n0 a multiple of `row_granule`."""
        K = self.in_features
        if n0 % self.row_granule or not 0 <= n0 <= n1 <= self.out_features:
            raise ValueError(f"rows {n0}..{n1} of {list(self.shape)}: the start must be a multiple "
                             f"of {self.row_granule} within the weight")
        n, block = (n1 - n0) * K, n0 * K // self.blocksize
        blocks = num_blocks(n, self.blocksize)
        nested = self.nested
        if nested is not None:
            first = block // nested.blocksize
            nested = nested._replace(absmax=nested.absmax[
                first:first + num_blocks(blocks, nested.blocksize)])
        return self._replace(packed=self.packed[n0 * K // 2:][:packed_bytes(n)],
                             absmax=self.absmax[block:block + blocks], shape=(n1 - n0, K),
                             nested=nested, interleaved=None)

    def with_absmax_decoded(self) -> "PackedWeight":
        """The same weight with double-quantized block constants decoded to float32 by the
        spec's rule (reference.dequantize_absmax, which every kernel matches bit for bit):
        4 bytes per block (1 MiB for 4096x4096 at blocksize 64), and a cut of it (`rows`
        at any block boundary, `columns`) needs no nested-block alignment."""
        nested = self.nested
        if nested is None:
            return self
        absmax = reference.dequantize_absmax(self.absmax, nested.absmax, nested.code,
                                             nested.offset, nested.blocksize)
        return self._replace(absmax=absmax, nested=None)

    def columns(self, c0: int, c1: int, out: Optional[Tensor] = None) -> "PackedWeight":
        """Columns c0 <= c < c1 of a 2-D weight as a weight [out_features, c1 - c0] of its
        own: a copy of those columns' packed bytes (into `out`, a uint8 buffer of at least
        out_features * (c1 - c0) / 2 bytes, if given) and block constants (a column panel
        is strided in the packed layout). Needs rows of whole blocks (in_features a multiple
        of blocksize), c0 and c1 on block boundaries, and float32 block constants
        (`with_absmax_decoded` first: a nested group of 256 blocks spans columns)."""
        N, K, bs = self.out_features, self.in_features, self.blocksize
        if self.nested is not None:
            raise ValueError("columns of a weight with double-quantized absmax: decode it "
                             "first (with_absmax_decoded)")
        if K % bs:
            raise ValueError(f"columns of {list(self.shape)}: in_features must be a multiple of "
                             f"blocksize {bs}, so that every row holds whole blocks")
        if c0 % bs or c1 % bs or not 0 <= c0 <= c1 <= K:
            raise ValueError(f"columns {c0}..{c1} of {list(self.shape)}: both ends must be "
                             f"multiples of blocksize {bs} within the weight")
        width = (c1 - c0) // 2                                      # packed bytes a row
        if out is None:
            out = torch.empty(N * width, dtype=torch.uint8, device=self.device)
        check_tensor("out", out, torch.uint8)
        if out.numel() < N * width:
            raise ValueError(f"out holds {out.numel()} bytes, fewer than the {N * width} of the panel")
        out = out[: N * width]
        rows = self.packed[: N * K // 2].view(N, K // 2)[:, c0 // 2:c1 // 2]
        if rows.storage_offset() % 4 == 0 and out.storage_offset() % 4 == 0:
            # copied as 4-byte words (a block of >= 32 codes is >= 4 words): torch copies
            # strided uint8 8x slower (2048 columns of 4096x4096: 1.13 vs 0.14 ms, Zen 4)
            out.view(torch.int32).view(N, width // 4).copy_(rows.view(torch.int32))
        else:
            out.view(N, width).copy_(rows)
        absmax = self.absmax.view(N, K // bs)[:, c0 // bs:c1 // bs]
        return self._replace(packed=out, absmax=absmax.contiguous().view(-1), shape=(N, c1 - c0),
                             interleaved=None)

    def with_offset_read(self) -> "PackedWeight":
        """The same weight with the nested offset as a checked Python float: what the
        kernels take. Reads a value (a device sync on GPU), so only ops call it."""
        if self.nested is None or not isinstance(self.nested.offset, Tensor):
            return self
        offset = float(self.nested.offset)
        if not math.isfinite(offset):
            raise ValueError(f"nested_offset must be finite, got {offset}")
        return self._replace(nested=self.nested._replace(offset=offset))
