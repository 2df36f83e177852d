"""Embedding4bit, EmbeddingNF4, EmbeddingFP4: bitsandbytes' 4-bit embedding tables.

Same constructors as bitsandbytes.nn (no padding_idx, max_norm, sparse...: bitsandbytes takes
none of them), the same quantization (a Params4bit weight, quantized on the first
`.to(device)` / `.cpu()` / `.cuda()` or the first forward, without double quantization) and
the same forward: the selected rows dequantized to the quant state's dtype, then cast to the
layer's `dtype` (the float weight's dtype at construction).

When embedding_dim is a multiple of the blocksize every row is whole blocks, so forward
gathers the selected rows' packed codes and block constants and dequantizes only those: the
table is never dequantized, whatever its size. Otherwise blocks straddle rows and forward
dequantizes the whole table (bitsandbytes does the same, and logs the same warning).

Differences from bitsandbytes, all fixes: the state dict is saved (bitsandbytes raises
NotImplementedError) in Linear4bit's format, `weight` plus `weight.absmax`,
`weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__<type>`, and
loads strictly, all or nothing (shared with Linear4bit); a double-quantized state loads and
runs; indices of the wrong dtype raise TypeError before anything changes.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional, reference
from ..quant_state import QuantState
from .linear4bit import Params4bit, _Layer4bit

__all__ = ["Embedding4bit", "EmbeddingNF4", "EmbeddingFP4"]

logger = logging.getLogger(__name__)

_INDEX_DTYPES = (torch.int64, torch.int32)      # what nn.Embedding accepts


class Embedding4bit(_Layer4bit, nn.Embedding):
    """bitsandbytes' Embedding4bit: a [num_embeddings, embedding_dim] table stored in 4 bits.

    dtype: the dtype of the float table before quantization, and of forward's output.
    """

    _kind = "Embedding4bit"
    _shape_names = ("num_embeddings", "embedding_dim")

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: Optional[torch.dtype] = None,
                 quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8, device=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.dtype
        # No double quantization, as bitsandbytes (a loaded state may still be nested).
        self.weight = Params4bit(self.weight.data, requires_grad=False, compress_statistics=False,
                                 quant_type=quant_type, quant_storage=quant_storage, module=self)
        self.quant_state: Optional[QuantState] = None
        self.quant_storage = quant_storage
        if embedding_dim % self.weight.blocksize:
            # bitsandbytes' wording, through a logger as bitsandbytes does (not warnings).
            logger.warning("Embedding size %s is not divisible by block size %s. This will lead "
                           "to slow inference.", embedding_dim, self.weight.blocksize)

    def extra_repr(self) -> str:
        w = self.weight
        return (f"{super().extra_repr()}, dtype={self.dtype}, quant_type={getattr(w, 'quant_type', None)}, "
                f"quantized={getattr(w, 'bnb_quantized', False)}")

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor) or input.dtype not in _INDEX_DTYPES:
            raise TypeError(f"input must be a tensor of indices (int64 or int32), got "
                            f"{input.dtype if isinstance(input, Tensor) else type(input).__name__}")
        self._fix_quant_state()
        if not self.weight.bnb_quantized:
            # Later calls leave the range check to F.embedding (no device sync); this one
            # checks first so that a bad first call leaves the layer unquantized, as it was.
            if input.numel() and not bool(((input >= 0) & (input < self.num_embeddings)).all()):
                raise IndexError("index out of range in self")      # nn.Embedding's error
            self.weight._quantize(input.device)
        state = self.weight.quant_state
        if self.embedding_dim % state.blocksize == 0:
            rows = self._dequantize_rows(input, state)
        else:
            rows = F.embedding(input, self.dequantized_weight())
        return rows.to(self.dtype)

    def _dequantize_rows(self, input: Tensor, state: QuantState) -> Tensor:
        """Rows `input` of the table in state.dtype, shape [*input.shape, embedding_dim],
        dequantizing only their codes: each row is embedding_dim / blocksize whole blocks."""
        dim = self.embedding_dim
        per_row = dim // state.blocksize
        table = self.weight.data.reshape(-1).view(torch.uint8)[: self.num_embeddings * dim // 2]
        index = input.reshape(-1).to(torch.int64)
        # F.embedding, not indexing: it raises nn.Embedding's IndexError for out-of-range
        # and negative indices (indexing would wrap negative ones around).
        codes = F.embedding(index, table.view(self.num_embeddings, dim // 2))
        blocks = (index.unsqueeze(1) * per_row + torch.arange(per_row, device=index.device)).reshape(-1)
        absmax = state.absmax[blocks]
        if state.state2 is not None:
            # The selected blocks' 8-bit constants no longer line up with their groups of 256,
            # so they are decoded here, by the spec's own rule (code2[q] * absmax2[group] +
            # offset, float32, unfused): the values every backend's nested decode gives.
            nested = state.state2
            absmax = reference.dequantize_absmax(absmax, nested.absmax[blocks // nested.blocksize],
                                                 nested.code, state.offset, nested_blocksize=1)
        rows_state = QuantState(absmax=absmax, shape=torch.Size((*input.shape, dim)), code=state.code,
                                blocksize=state.blocksize, quant_type=state.quant_type,
                                dtype=state.dtype)
        return functional.dequantize_4bit(codes.reshape(-1), rows_state)


class EmbeddingFP4(Embedding4bit):
    """Embedding4bit with quant_type='fp4'."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8,
                 device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, quant_type="fp4",
                         quant_storage=quant_storage, device=device)


class EmbeddingNF4(Embedding4bit):
    """Embedding4bit with quant_type='nf4'."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8,
                 device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, quant_type="nf4",
                         quant_storage=quant_storage, device=device)
