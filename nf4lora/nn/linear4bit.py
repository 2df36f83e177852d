"""Params4bit and Linear4bit: bitsandbytes' 4-bit layer, same names, fields and state dict.

Behaviour follows bitsandbytes.nn (shared/reference/nf4_format.md section 5): a Linear4bit
holds a float weight until its first `.to(device)` / `.cuda()` / `.cpu()` or its first
forward, which quantize it; the state dict has bitsandbytes' keys (`weight`,
`weight.absmax`, `weight.quant_map`, `weight.nested_*`,
`weight.quant_state.bitsandbytes__<type>`, `bias`). Differences, all fixes:

- `load_state_dict(strict=True)` works, for nf4lora-, bitsandbytes- and plain
  nn.Linear-saved dicts (bitsandbytes has no `_load_from_state_dict`: its issue #1946).
  Everything is checked before anything is assigned, so a bad dict leaves the layer as it was.
- pickle keeps the Params4bit type and quant state (bitsandbytes' unpickles to a plain
  Parameter), deepcopy links the copy's weight to the copied module, not the original.
- A quantized weight ignores dtype casts (`model.half()`, `model.to(torch.bfloat16)`):
  its storage holds packed codes, which a numeric cast would destroy when quant_storage
  is a float dtype. The compute dtype is the layer's `compute_dtype`, not the storage's.
- quant_type also takes nf4lora's code-book formats ("af4", "bof4", "iq4nl", "int4") and
  any 16-level table (quant_type=<tensor>; the weight's quant_type is then "custom"); their
  state dicts carry the table and load back here, not in bitsandbytes (quant_state.py).

The layer-generic part (quant-state restore, state dict save/load, copy/pickle) is
`_Layer4bit`, shared with nn/embedding4bit.py's Embedding4bit.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import functional
from .._weight import PackedWeight, check_packed, contents_key
from ..backends import backend_for
from ..backends import cpu as cpu_backend
from ..codebook import CUSTOM, check_code
from ..autograd import matmul_4bit, row_sq_norms_4bit
from ..quant_state import QuantState

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4"]

logger = logging.getLogger(__name__)

# Attributes a Params4bit carries besides its data (bitsandbytes' names).
_FIELDS = ("blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage",
           "bnb_quantized", "module", "custom_code")


# Ops whose pieces keep the Params4bit type and fields (nn.Parameter returns plain tensors).
_SPLITS = (torch.chunk, torch.split, Tensor.chunk, Tensor.split)


def in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without a call where it already is (a no-op `.to()` still costs ~1 us,
    ~3 us on a 2-core EPYC Zen 1: the layers' forwards run this on every call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _check_packed(data: Tensor, state: QuantState, name: str = "weight") -> Tensor:
    """Packed data must hold exactly the codes of `state` (two per byte, padded to whole
    elements of its dtype); returns it as bitsandbytes' [k, 1] layout."""
    try:
        check_packed(data, state.shape, name)
    except TypeError as error:      # a state dict entry of the wrong kind is a ValueError here
        raise ValueError(str(error)) from None
    if data.dim() > 2:
        raise ValueError(f"{name} must be [k, 1] packed codes, got shape {list(data.shape)}")
    return data.reshape(-1, 1)


def _set_data(param: nn.Parameter, tensor: Tensor) -> None:
    """param.data = tensor, also from meta to a real device, where torch's set_data refuses
    (incompatible tensor types): then the contents are swapped, keeping the object."""
    if param.device.type == "meta" and tensor.device.type != "meta":
        if isinstance(param, Params4bit):
            new = Params4bit(tensor, requires_grad=param.requires_grad, **param._fields())
        else:
            new = nn.Parameter(tensor, requires_grad=param.requires_grad)
        torch.utils.swap_tensors(param, new)
    else:
        param.data = tensor


def _rebuild_params4bit(data: Tensor, requires_grad: bool) -> "Params4bit":
    """pickle's constructor for Params4bit (the state follows through __setstate__)."""
    return Params4bit(data, requires_grad=requires_grad)


def _state_property(name: str, getter, nested: bool = False) -> property:
    """A read-only view of a quant-state field, e.g. `weight.absmax`.

    FSDP resolves state-dict keys such as 'weight.absmax' with getattr on the parameter,
    and torch.compile traces properties (not __getattr__) on tensor subclasses (#1904).
    """
    def get(self):
        qs = self.__dict__.get("quant_state")
        if qs is not None and (not nested or qs.state2 is not None):
            return getter(qs)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
    return property(get, doc=f"quant_state's {name} (AttributeError when there is none)")


class Params4bit(nn.Parameter):
    """A weight that is 4-bit once quantized: `data` holds packed codes, `quant_state`
    what it takes to dequantize them. Frozen by default (QLoRA trains adapters).

    quant_type: a named format ("fp4", "nf4", "af4", ...) or a 16-level code book (a
    tensor or sequence, checked here); a code book makes quant_type "custom" and is kept
    as `custom_code` until the first quantization. From then on the quant state's table
    is the format (a loaded custom state brings its own)."""

    def __new__(cls, data: Optional[Tensor] = None, requires_grad: bool = False,
                quant_state: Optional[QuantState] = None, blocksize: Optional[int] = None,
                compress_statistics: bool = True, quant_type="fp4",
                quant_storage: torch.dtype = torch.uint8, module: Optional[nn.Module] = None,
                bnb_quantized: bool = False, custom_code: Optional[Tensor] = None,
                **kwargs) -> "Params4bit":
        # **kwargs: transformers builds `Params4bit(w, **old_param.__dict__)`, which can
        # carry unrelated attributes.
        data = torch.empty(0) if data is None else data.detach()
        if not isinstance(quant_type, str):
            custom_code, quant_type = check_code(quant_type, "quant_type (a code book)"), CUSTOM
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = functional.DEFAULT_BLOCKSIZE if blocksize is None else blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        self.custom_code = custom_code
        return self

    def format_args(self) -> dict[str, Any]:
        """quantize_4bit's format arguments for this weight: {"quant_type": name}, or for a
        custom code book {"code": table} (the quant state's once quantized)."""
        if self.quant_type != CUSTOM:
            return {"quant_type": self.quant_type}
        state = self.quant_state if self.bnb_quantized else None
        code = state.code if state is not None else self.custom_code
        if code is None:
            raise ValueError("this Params4bit's quant_type is 'custom' but it has no code book: "
                             "pass the 16 levels as quant_type=")
        return {"code": code}

    # -- quantization and device moves ---------------------------------------------------

    def _quantize(self, device, dtype: Optional[torch.dtype] = None) -> "Params4bit":
        """Quantize the float data on `device` (cast to `dtype` first, if given), in place:
        the module keeps this object."""
        self._quantize_from(self.data.to(device=device, dtype=dtype))
        return self

    def _quantize_from(self, dense: Tensor) -> None:
        """Become the quantization of `dense` [out, in] with this weight's settings
        (blocksize, quant type, double quantization, storage). Nothing changes if it raises."""
        packed, state = functional.quantize_4bit(
            dense.contiguous(), blocksize=self.blocksize,
            compress_statistics=self.compress_statistics, quant_storage=self.quant_storage,
            **self.format_args())
        self._set_quantized(packed, state)

    def _set_quantized(self, packed: Tensor, state: QuantState) -> None:
        _set_data(self, packed)
        self.quant_state = state
        self.bnb_quantized = True
        if self.module is not None:
            self.module.quant_state = state

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            # e.g. model.to("cuda", torch.bfloat16) before quantizing: cast, then quantize
            return self._quantize(device, dtype)
        if self.bnb_quantized:
            dtype = None              # packed codes: a numeric cast would destroy them
            if self.quant_state is not None and device is not None:
                self.quant_state.to(device)   # in place, as bitsandbytes (shared by copies)
        moved = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        return Params4bit(moved, requires_grad=self.requires_grad, **self._fields())

    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def xpu(self, device=None, non_blocking: bool = False):
        return self.to(device="xpu" if device is None else device, non_blocking=non_blocking)

    # Module.half()/float()/... call these directly, not .to(): route them through .to()
    # so a quantized weight ignores them too.
    def half(self, *args, **kwargs):
        return self.to(torch.float16)

    def float(self, *args, **kwargs):
        return self.to(torch.float32)

    def bfloat16(self, *args, **kwargs):
        return self.to(torch.bfloat16)

    def double(self, *args, **kwargs):
        return self.to(torch.float64)

    # -- construction from a saved state -------------------------------------------------

    @classmethod
    def from_prequantized(cls, data: Tensor, quantized_stats: dict[str, Any],
                          requires_grad: bool = False, device="cuda",
                          module: Optional[nn.Module] = None, **kwargs) -> "Params4bit":
        """A quantized weight from saved packed codes and the `weight.*` quant-state
        entries (bitsandbytes' signature; quant_storage becomes data.dtype). Both are
        checked first: a malformed or mismatched state raises ValueError."""
        state = QuantState.from_dict(quantized_stats, device=device)
        data = _check_packed(data, state, "data")
        self = cls(data.to(device), requires_grad=requires_grad, quant_state=state,
                   blocksize=state.blocksize, compress_statistics=state.nested,
                   quant_type=state.quant_type, quant_storage=data.dtype, module=module,
                   bnb_quantized=True)
        if module is not None:
            module.quant_state = state
        return self

    # -- splitting (FSDP2 shards a parameter with torch.chunk) ----------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func in _SPLITS and isinstance(result, (tuple, list)):
            # Each piece stays a Params4bit carrying the whole weight's quant state, as in
            # bitsandbytes: the pieces are shards of one packed tensor.
            source = args[0]
            return type(result)(cls(piece, requires_grad=source.requires_grad, **source._fields())
                                for piece in result)
        return result

    # -- copy and pickle -----------------------------------------------------------------

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name, None) for name in _FIELDS}

    def __getstate__(self) -> dict[str, Any]:
        state = self._fields()
        # Not the module: pickling a parameter should not pickle its whole layer.
        # Linear4bit.__setstate__ re-links its weight when the layer itself is unpickled.
        state["module"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in _FIELDS:
            setattr(self, name, state.get(name))

    def __reduce_ex__(self, protocol):
        # nn.Parameter's reduce rebuilds a plain Parameter and loses the subclass.
        return (_rebuild_params4bit, (self.data, self.requires_grad), self.__getstate__())

    def __deepcopy__(self, memo):
        new = Params4bit(copy.deepcopy(self.data, memo), requires_grad=self.requires_grad)
        memo[id(self)] = new
        fields = self._fields()
        fields["quant_state"] = copy.deepcopy(fields["quant_state"], memo)
        # The copied module if the module is being copied too, else the same one.
        fields["module"] = memo.get(id(self.module), self.module)
        new.__setstate__(fields)
        return new

    def __copy__(self):
        return Params4bit(self.data, requires_grad=self.requires_grad, **self._fields())

    # -- views of the quant state (FSDP state-dict traversal, torch.compile) -------------

    absmax = _state_property("absmax", lambda qs: qs.absmax)
    code = _state_property("code", lambda qs: qs.code)
    quant_map = _state_property("quant_map", lambda qs: qs.code)
    offset = _state_property("offset", lambda qs: qs.offset)
    state2 = _state_property("state2", lambda qs: qs.state2)
    nested_absmax = _state_property("nested_absmax", lambda qs: qs.state2.absmax, nested=True)
    nested_blocksize = _state_property("nested_blocksize", lambda qs: qs.state2.blocksize, nested=True)
    nested_quant_map = _state_property("nested_quant_map", lambda qs: qs.state2.code, nested=True)
    nested_dtype = _state_property("nested_dtype", lambda qs: qs.state2.dtype, nested=True)
    nested_offset = _state_property("nested_offset", lambda qs: qs.offset)

    def __repr__(self) -> str:
        kind = f"quantized {self.quant_state!r}" if self.bnb_quantized else "not yet quantized"
        return f"Params4bit({kind}, data shape={list(self.shape)}, storage={self.dtype})"


class _Layer4bit:
    """What every layer holding a Params4bit `weight` shares (Linear4bit, Embedding4bit):
    restoring a quant state a wrapper dropped, bitsandbytes' state-dict format, all-or-nothing
    loading, the dense view of the weight, and re-linking the weight after copy/pickle.

    A layer class lists it before its torch base (`class Linear4bit(_Layer4bit, nn.Linear)`)
    and sets `_kind` (its name in messages) and `_shape_names` (the attributes giving the
    dense weight's shape, in order). A `bias` parameter is loaded too when the layer has one.
    """

    _kind = "Layer4bit"
    _shape_names: tuple[str, ...] = ()

    def _weight_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in self._shape_names)

    def _fix_quant_state(self) -> None:
        """FSDP (and other wrappers) can replace the weight by a plain Parameter and drop its
        quant state; the module keeps a copy to restore it from (bitsandbytes does the same)."""
        if getattr(self.weight, "quant_state", None) is not None:
            return
        if not isinstance(self.weight, Params4bit):
            if self.quant_state is None:
                raise RuntimeError(f"{self._kind} weight lost its quant state and the module has none")
            self.weight = Params4bit(self.weight.data, quant_storage=self.quant_storage,
                                     bnb_quantized=True, module=self)
        if self.weight.bnb_quantized:
            if self.quant_state is None:
                raise RuntimeError(f"{self._kind} weight is marked quantized but has no quant state")
            self.weight.quant_state = self.quant_state

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The weight as a dense tensor of its original shape (for merging, inspection, export)."""
        if not self.weight.bnb_quantized:
            return self.weight.data.to(dtype or self.weight.dtype)
        state = self.weight.quant_state
        out = torch.empty(tuple(state.shape), dtype=dtype or state.dtype, device=self.weight.device)
        return functional.dequantize_4bit(self.weight.data.reshape(-1), state, out=out)

    # -- state dict ----------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)   # weight (and bias)
        state = getattr(self.weight, "quant_state", None)
        if state is None and not isinstance(self.weight, Params4bit):
            # FSDP2 swaps the weight for a plain (DTensor) parameter without the quant
            # state; the module's copy still describes the packed bytes (as in forward).
            state = self.quant_state
        if state is not None:
            for key, value in state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Load a 4-bit (nf4lora or bitsandbytes) or a dense (torch layer) state dict.

        All or nothing per layer: everything is checked first, and on any error or any
        missing/unexpected key under this layer's prefix nothing is assigned; the problems
        go to load_state_dict, which raises (errors always, missing/unexpected keys with
        strict=True) or returns them (strict=False). All or nothing even for strict=False
        because torch always passes strict=True down to this method, so a layer cannot
        tell a strict load, which must leave it untouched, from a lenient one.
        A dense weight is quantized now if this layer is already quantized, else kept
        until the first .to()/forward, as the torch layer's would be.
        """
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

        bias = getattr(self, "bias", None)      # None without a bias, and for layers that have none
        mine = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        weight_entries = {k: v for k, v in mine.items() if k == "weight" or k.startswith("weight.")}
        missing = [prefix + "weight"] if "weight" not in mine else []
        if bias is not None and "bias" not in mine:
            missing.append(prefix + "bias")
        unexpected = [prefix + k for k in mine if k not in weight_entries
                      and not (k == "bias" and bias is not None)]
        missing_keys.extend(missing)
        unexpected_keys.extend(unexpected)

        errors = []
        apply_weight = apply_bias = None
        try:
            apply_weight = self._plan_weight(weight_entries)
        except (ValueError, TypeError, RuntimeError) as error:
            errors.append(f"While loading {prefix}weight into {type(self).__name__}: {error}")
        if bias is not None and "bias" in mine:
            try:
                apply_bias = self._plan_bias(mine["bias"])
            except ValueError as error:
                errors.append(f"While loading {prefix}bias into {type(self).__name__}: {error}")
        error_msgs.extend(errors)
        if errors or missing or unexpected:
            return      # leave the layer exactly as it was
        if apply_weight is not None:
            apply_weight()
        if apply_bias is not None:
            apply_bias()

    def _target_device(self, incoming: Tensor) -> torch.device:
        # A layer built on meta (empty init) takes the checkpoint's device.
        device = self.weight.device
        return incoming.device if device.type == "meta" else device

    def _plan_weight(self, entries: dict[str, Any]):
        """Check the `weight` / `weight.*` entries; return a function assigning them (or None
        when there is no weight to load)."""
        shape = self._weight_shape()
        weight = entries.get("weight")
        stats = {k: v for k, v in entries.items() if k != "weight"}
        if weight is None:
            if stats:
                raise ValueError(f"has quant-state entries {sorted(stats)} but no 'weight'")
            return None
        if not isinstance(weight, Tensor):
            raise ValueError(f"expected a tensor, got {type(weight).__name__}")
        param = self.weight
        device = self._target_device(weight)

        if stats:   # pre-quantized: packed codes + quant state
            state = QuantState.from_dict(stats, device=device)
            if tuple(state.shape) != shape:
                raise ValueError(f"the quant state describes shape {list(state.shape)}, this layer "
                                 f"is [{', '.join(self._shape_names)}] = {list(shape)}")
            packed = _check_packed(weight, state).to(device, copy=True)

            def apply():
                param._set_quantized(packed, state)
                param.blocksize = state.blocksize
                param.compress_statistics = state.nested
                param.quant_type = state.quant_type
                param.custom_code = None        # the loaded state's table is the format now
                param.quant_storage = packed.dtype
                self.quant_storage = packed.dtype
            return apply

        if tuple(weight.shape) != shape or not weight.is_floating_point():
            hint = (" (a packed 4-bit weight needs its 'weight.absmax', 'weight.quant_map' and "
                    "'weight.quant_state.bitsandbytes__*' entries)" if weight.shape[-1:] == (1,) else "")
            raise ValueError(f"expected a float weight of shape {list(shape)} or a packed 4-bit "
                             f"weight with its quant state; got {weight.dtype} {list(weight.shape)}{hint}")
        if param.bnb_quantized:
            # Quantize now (before assigning anything, so a NaN leaves the layer untouched),
            # in the original dtype the current state records.
            packed, state = functional.quantize_4bit(
                weight.detach().to(device=device, dtype=param.quant_state.dtype).contiguous(),
                blocksize=param.blocksize, compress_statistics=param.compress_statistics,
                quant_storage=param.quant_storage, **param.format_args())
            return lambda: param._set_quantized(packed, state)
        dense = weight.detach().to(device=device, dtype=param.dtype, copy=True)

        def apply_dense():
            _set_data(param, dense)
        return apply_dense

    def _plan_bias(self, bias: Any):
        shape = tuple(self.bias.shape)
        if not isinstance(bias, Tensor) or tuple(bias.shape) != shape or not bias.is_floating_point():
            got = f"{bias.dtype} {list(bias.shape)}" if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"expected a float tensor of shape {list(shape)}, got {got}")
        value = bias.detach().to(device=self._target_device(bias), dtype=self.bias.dtype, copy=True)

        def apply():
            _set_data(self.bias, value)
        return apply

    # -- copy and pickle -------------------------------------------------------------------

    def __setstate__(self, state):
        # deepcopy and pickle both land here: point the weight back at this module
        # (Params4bit does not pickle its module, and a deepcopy must not keep the original).
        super().__setstate__(state)
        weight = self._parameters.get("weight")
        if isinstance(weight, Params4bit):
            weight.module = self
            if weight.quant_state is not None:
                self.quant_state = weight.quant_state


class Linear4bit(_Layer4bit, nn.Linear):
    """bitsandbytes' Linear4bit: y = x @ dequantize(W)^T + b, W stored in 4 bits.

    Quantizes on the first `.to(device)` / `.cuda()` / `.cpu()` or the first forward.
    compute_dtype: the dtype of the matmul; when None, the first forward sets it from an
    fp32/bf16 input (fp16 inputs keep None, i.e. run in fp16), as bitsandbytes does.
    quant_type: "fp4" (bitsandbytes' default), "nf4", a code-book format ("af4", "bof4",
    "iq4nl", "int4") or a 16-level table (see functional.quantize_4bit). Every backend's
    kernels (C++ CPU, CUDA, Triton) take every format: the table is data.
    """

    _kind = "Linear4bit"
    _shape_names = ("out_features", "in_features")

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_type="fp4", quant_storage: torch.dtype = torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(self.weight.data, requires_grad=False,
                                 compress_statistics=compress_statistics, quant_type=quant_type,
                                 quant_storage=quant_storage, module=self)
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_state: Optional[QuantState] = None
        self.quant_storage = quant_storage

    def extra_repr(self) -> str:
        w = self.weight
        return (f"{super().extra_repr()}, quant_type={getattr(w, 'quant_type', None)}, "
                f"compute_dtype={self.compute_dtype}, quantized={getattr(w, 'bnb_quantized', False)}")

    # -- forward -----------------------------------------------------------------------------

    def _set_compute_type(self, x: Tensor) -> None:
        if x.dtype in (torch.float32, torch.bfloat16):
            self.compute_dtype = x.dtype      # safe to compute in: use it
        elif x.dtype == torch.float16 and self.compute_dtype in (None, torch.float32):
            # bitsandbytes' wording, through a logger as bitsandbytes does (not warnings).
            what = "inference." if x.numel() == x.shape[-1] else "inference or training speed."
            logger.warning("Input type into Linear4bit is torch.float16, but "
                           "bnb_4bit_compute_dtype=torch.float32 (default). This will lead to "
                           "slow %s", what)

    def prepare(self, x: Tensor) -> torch.dtype:
        """Everything forward does before the matmul: check x, restore a dropped quant state,
        quantize on first use, fix the compute dtype, cast the bias. Returns the dtype to
        compute in."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a float tensor (float32, float16 or bfloat16), got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        # (the parameters are read from `_parameters`: `self.weight` goes through
        # Module.__getattr__, 1.8 us on a 2-core EPYC Zen 1, and this runs on every call)
        weight = self._parameters["weight"]
        if getattr(weight, "quant_state", None) is None:
            self._fix_quant_state()
            weight = self._parameters["weight"]
        if not weight.bnb_quantized:
            weight._quantize(x.device)
        if not self.compute_type_is_set:
            self._set_compute_type(x)
            self.compute_type_is_set = True
        dtype = self.compute_dtype or x.dtype
        bias = self._parameters["bias"]
        if bias is not None and bias.dtype != dtype:
            # As bitsandbytes does: the bias itself takes the compute dtype, once, instead of
            # a cast on every call (its test_linear_kbit_fp32_bias checks the bias dtype).
            bias.data = bias.data.to(dtype)
        if not self.training and x.is_cpu:
            self._keep_interleaved(weight, dtype)
        return dtype

    def _keep_interleaved(self, weight: "Params4bit", dtype: torch.dtype) -> None:
        """In eval mode on a CPU: make the weight's interleaved copy for the fused kernel
        (backends.cpu.interleave: small-M calls 1.4-2.3x faster, for 0.56 bytes per weight
        more; none where the CPU has no kernel for it, NF4LORA_CPU_INTERLEAVE=0, or the
        kernel would not read it for activations of `dtype`: float32's) and keep it in the
        weight state's cache (PackedWeight.keep_interleaved) until train() or a write into
        the codes. bitsandbytes repacks its weight for its CPU kernel in eval mode too; here
        the weight, its state and the state dict stay in the format."""
        state = weight.quant_state
        if PackedWeight.kept_interleaved(state) is not None or torch.compiler.is_compiling():
            return  # (traced code reads the row layout: the op schema has no place for a copy)
        if (cpu_backend.reads_interleaved(dtype)   # (first: a float32 call asks at every call)
                and backend_for(weight.device, state.quant_type) is cpu_backend):
            PackedWeight.keep_interleaved(weight, state, cpu_backend.interleave)

    def train(self, mode: bool = True):
        if mode:  # the interleaved copy is an eval-mode cache (see _keep_interleaved)
            state = getattr(self.weight, "quant_state", None)
            if state is not None:
                PackedWeight.drop_interleaved(state)
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.prepare(x)
        # the weight as stored: matmul_4bit takes either orientation (bitsandbytes passes
        # weight.t(), a Params4bit op through __torch_function__, ~2 us a call)
        weight = self._parameters["weight"]
        y = matmul_4bit(in_dtype(x, dtype), weight, weight.quant_state, bias=self._parameters["bias"])
        return in_dtype(y, x.dtype)


    def row_sq_norms(self) -> Tensor:
        """||W_o||^2 of the 4-bit weight's rows, float32 [out_features]: the frozen weight's
        part of DoRA's norm (nf4lora.row_sq_norms_4bit), computed once from the packed bytes
        and kept until the bytes or their state change (a merge, a load, an in-place write:
        the key is the storage, its version counter and the QuantState object)."""
        self._fix_quant_state()
        if not self.weight.bnb_quantized:
            self.weight._quantize(self.weight.device)
        weight, state = self.weight, self.weight.quant_state
        key = contents_key(weight)
        cached = self.__dict__.get("_row_sq_norms")
        if cached is None or cached[0] != key or cached[1] is not state:
            cached = self.__dict__["_row_sq_norms"] = (key, state, row_sq_norms_4bit(weight, state))
        return cached[2]


class LinearFP4(Linear4bit):
    """Linear4bit with quant_type='fp4'."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None,
                 compress_statistics=True, quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype,
                         compress_statistics, "fp4", quant_storage, device)


class LinearNF4(Linear4bit):
    """Linear4bit with quant_type='nf4' (QLoRA's NormalFloat4)."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None,
                 compress_statistics=True, quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype,
                         compress_statistics, "nf4", quant_storage, device)
