"""Benchmark 4-bit matmul: decode and prefill GEMV/GEMM, LoRA, and a QLoRA training step.

    python -m bench.bench_matmul [--quick] [--providers NAME ...] [--ops OP ...]
                                 [--shapes OUTxIN ...] [--tokens M ...] [--threads N]
                                 [--warm] [--out DIR] [--device cpu|cuda] [--plan]

Ops, on Llama-7B projections (out, in) = (4096, 4096), (11008, 4096), (4096, 11008), bf16
activations x [M, in], NF4 with double quantization, blocksize 64 (perf.md):
  matmul  y = x @ W^T                                   M = 1, 8, 64, 512
  lora    y = x @ W^T + s * (x @ A^T) @ B^T, rank 16    M = 1, 8, 64, 512
  train   the lora layer's forward + backward at M = 512: gradients of x, A and B
          (4096x4096 only unless --shapes is given: see TRAIN_SHAPES)

Providers, all on CPU tensors in one run:
  nf4lora[<backend>]  nf4lora.matmul_4bit / lora_matmul_4bit (fused base + adapter), once per
                      backend usable on CPU ("cpu", "reference"; the reference not in train)
  nf4lora-amx         nf4lora[cpu] with NF4LORA_CPU_GEMM=amx: from M = 16 and past the fused
                      kernel, the AMX tile GEMM (W decoded into bf16 tiles in cache) instead of
                      the fused kernel or dequantize + oneDNN's GEMM (AMX-BF16 CPUs only; auto
                      does not take it until measured)
  nf4lora-eval        an eval-mode nf4lora.nn.Linear4bit under no_grad (matmul): on CPUs with
                      AVX2 or AVX-512 it reads the interleaved copy it builds in its first forward
  nf4lora-eval-int8   the same with the opt-in NF4LORA_CPU_GEMV=int8 (int8 sums, AVX512-VNNI;
                      less exact than dense bf16), only when named in --providers
  bitsandbytes        bitsandbytes.matmul_4bit (its CPU path: which one ran is in the JSON),
                      plus the adapter as PEFT adds it: y + lora_B(lora_A(x)) * s
  bitsandbytes-gemv   an eval-mode bitsandbytes.nn.Linear4bit under no_grad (matmul, M = 1): on
                      CPUs with AVX512-BF16 it repacks its weight and runs its fused gemv_4bit
                      (the notes say whether it did)
  torch-int4          aten._weight_int4pack_mm_for_cpu, group 64 (torch's own int4 weight-only
                      CPU kernel, the one behind torchao's int4 CPU path; M <= 64)
  torchao             linear_nf4 on a to_nf4 weight (matmul rows at M <= 64 only, see below)
  dense-bf16          torch.nn.functional.linear on the bf16 weight: what a user runs without
                      quantization (plus the same PEFT-style adapter)

Bytes one call must move (the basis of GB/s and "% read BW"), with n = out * in:
  4-bit weight  n/2 packed + n/64 qabsmax + 4 per 256 blocks absmax2 = 0.516 n
                (4096x4096: 8.65 MB, 0.29 ms at 30 GB/s: the M = 1 target)
  dense weight  2n
  + x (2 M in) + y (2 M out); lora adds the adapter, 2 r (in + out)
  train: the weight twice (forward, and backward for dx), x, y, dy and dx, the adapter
  read twice (forward, backward)
FLOPs: 2 M n per matmul, + 2 M r (in + out) for the adapter; train: 4 M n + 6 M r (in + out).

--device cuda (scripts/gpu_check.sh): the same ops on CUDA tensors, train at every M (the
backward at decode and prefill sizes), providers nf4lora[cuda], nf4lora[cuda] no-triton
(its route to Triton's kernels off: dequantize + cuBLAS past the CUDA GEMV, the other side
of that route's crossover), nf4lora[triton], nf4lora[triton] no-split-k (split-K off: what
fused_splits buys), bitsandbytes (its CUDA kernels) and dense-bf16; timing, GB/s and shares of the bandwidth as bench_codec's "GPU
mode" says. --plan prints what a run would time and exits (the dry run's check).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import harness
from .bench_codec import (GPU_DEVICE, GPU_REPS, NESTED_BLOCKSIZE, CachedWeight, Quantizer, add_gpu_rates,
                          add_gpu_speedups, bitsandbytes_path, measure_gpu,
                          print_gpu_bandwidth, print_plan, probe_gpu_bandwidth, quantized_bytes)
from .harness import Provider

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]   # q/k/v/o, up/gate, down projections
TOKENS = [1, 8, 64, 512]          # decode (1, 8) to a training micro-batch (512)
TRAIN_TOKENS = 512
# The train op runs on the first shape only unless --shapes says otherwise: torch's bf16
# `grad @ W` (the dx of F.linear's backward, W not transposed) takes ~75 s at M = 512,
# 4096x4096 on this AVX2 CPU (the forward F.linear: 0.8 s; the same product in fp32:
# 0.4 s), and dense-bf16 and bitsandbytes both run it: ~3 min per shape for the two.
TRAIN_SHAPES = SHAPES[:1]
# --quick: the same three orientations, tiny; whole torchao scaler blocks (n % 16384 == 0)
QUICK_SHAPES = [(256, 256), (768, 256), (256, 768)]
QUICK_TOKENS = [1, 64]
QUICK_TRAIN_TOKENS = 64
# The correctness guard: a partial last block and rows that straddle blocks, then an
# aligned shape like the ones timed (a fused kernel may take a different path on each).
GUARD_SHAPES = [(160, 330), (128, 512)]
# On a GPU also shapes whose fused launches split their reduction (4 tiles of 64 steps on
# 100+ SMs: nf4lora.backends.triton.fused_splits picks 8), the forward's in 256x4096, the
# backward's in 4096x256, so split-K cannot post a number unchecked.
GPU_GUARD_SHAPES = GUARD_SHAPES + [(256, 4096), (4096, 256)]
OPS = ("matmul", "lora", "train")
RANK = 16
SCALING = 2.0                     # lora_alpha 32 / r 16, the usual QLoRA setting
DTYPE = torch.bfloat16
BLOCKSIZE = 64
QUANT_TYPE = "nf4"
BASELINE = "bitsandbytes"
DENSE = "dense-bf16"

# Full and --quick presets: probe buffer, cold footprint, and a cap on reps.
FULL = dict(shapes=SHAPES, tokens=TOKENS, train_shapes=TRAIN_SHAPES, train_tokens=TRAIN_TOKENS,
            probe_bytes=harness.GIB, footprint=harness.COLD_FOOTPRINT, max_reps=None)
QUICK = dict(shapes=QUICK_SHAPES, tokens=QUICK_TOKENS, train_shapes=QUICK_SHAPES[:1],
             train_tokens=QUICK_TRAIN_TOKENS, probe_bytes=64 * harness.MIB, footprint=harness.MIB,
             max_reps=2)

# Timing schedule. On this machine kind (2 cores, AVX2, no native bf16 dot product) torch's
# bf16 F.linear runs at ~21 GFLOP/s (fp32: ~115): at M = 64 one 4096x4096 layer takes
# ~200 ms, at M = 512 ~0.8 s (11008x4096: ~2.5 s), against ~1 ms to stream even its dense
# weight. From M = 64 every provider is that far (>100x) above its memory time, so the
# cache state cannot show (bitsandbytes also writes a 34 MB dense W per call, more than the
# 32 MiB L3): two layers alternate, and M = 512 gets one rep. A train step is timed once
# on one layer; dense-bf16's and bitsandbytes' take ~77 s (see TRAIN_SHAPES), so a warm-up
# call of 10 s or more is kept as that sample (milliseconds of first-call costs vanish in
# it) instead of doubling their 2.5 minutes; nf4lora's (~0.4 s) still gets a warm-up.
COMPUTE_BOUND_TOKENS = 64
TRAIN_WARMUP_IS_SAMPLE_S = 10.0
# Slow providers: the reference backend dequantizes in pure PyTorch (~0.6 s per 4096x4096,
# bench_codec), torchao's linear_nf4 takes ~155 ms at M = 1 (perf.md); both write temporaries
# far beyond the L3 on every call, so two layers are already cold, and one rep will do.
# The reference is not in the train rows: its backward is the same bf16 `grad @ W` as
# dense-bf16's (see TRAIN_SHAPES), ~77 s a call, and tells nothing about nf4lora's kernels.
# torchao is left out above M = 64: there it is the same bf16 GEMM as every other
# dequantize-then-matmul provider plus its slow dequantize, ~4 s a call at 11008x4096.
TORCHAO_MAX_TOKENS = 64


def schedule(case: "Case", slow: bool) -> dict:
    """reps and max_layers of one provider on one case (see the numbers above); on a GPU
    every call is milliseconds at most: the full rotation, GPU_REPS passes."""
    if case.weights.device != "cpu":
        return dict(reps=GPU_REPS)
    if case.op == "train":
        return dict(reps=1, max_layers=1, warmup_is_sample_after_s=TRAIN_WARMUP_IS_SAMPLE_S)
    if slow or case.tokens >= 512:
        return dict(reps=1, max_layers=2)
    if case.tokens >= COMPUTE_BOUND_TOKENS:
        return dict(reps=3, max_layers=2)
    return dict(reps=5 if case.tokens == 1 else 3)   # the full cold rotation


# --- weights, cases, bytes -------------------------------------------------------------

@dataclass
class Weights(CachedWeight):
    """One weight shape: the bf16 weight and what every provider derives from it, made once
    and shared by the cases of that shape."""
    shape: tuple[int, int]
    quantizer: Optional[Quantizer]
    _cache: dict = field(default_factory=dict, repr=False)
    device: str = "cpu"

    def dequantized_f32(self) -> torch.Tensor:
        """W as the reference backend (the spec) decodes it, in float32: the guard's oracle."""
        def make():
            from nf4lora import functional
            packed, state = self.quantized_cpu()
            with harness.using_backend("reference"):
                return functional.dequantize_4bit(packed, state, out=torch.empty(
                    self.shape, dtype=torch.float32)).to(self.device)
        return self.cached("dequantized_f32", make)

    def lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) in bf16. B is not PEFT's zero init: a zero B would hide
        a wrong adapter term from the guard."""
        def make():
            generator = torch.Generator().manual_seed(3)
            out_features, in_features = self.shape
            A = torch.randn(RANK, in_features, generator=generator) / in_features ** 0.5
            B = torch.randn(out_features, RANK, generator=generator) / RANK ** 0.5
            return A.to(DTYPE).to(self.device), B.to(DTYPE).to(self.device)
        return self.cached("lora", make)

    def activation(self, name: str, rows: int, features: int, seed: int) -> torch.Tensor:
        def make():
            generator = torch.Generator().manual_seed(seed)
            return torch.randn(rows, features, generator=generator).to(DTYPE).to(self.device)
        return self.cached((name, rows), make)


@dataclass
class Case:
    """One op at one weight shape and token count."""
    op: str
    weights: Weights
    tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.weights.shape

    @property
    def rank(self) -> Optional[int]:
        return None if self.op == "matmul" else RANK

    @property
    def labels(self) -> dict:
        return {"op": self.op, "shape": list(self.shape), "tokens": self.tokens, "rank": self.rank,
                "dtype": str(DTYPE).removeprefix("torch."), "quant_type": QUANT_TYPE,
                "blocksize": BLOCKSIZE, "flops": self.flops}

    def x(self) -> torch.Tensor:
        return self.weights.activation("x", self.tokens, self.shape[1], seed=1)

    def grad_output(self) -> torch.Tensor:
        return self.weights.activation("dy", self.tokens, self.shape[0], seed=2)

    @property
    def flops(self) -> int:
        out_features, in_features = self.shape
        adapter = 2 * self.tokens * RANK * (in_features + out_features)
        base = 2 * self.tokens * out_features * in_features
        return {"matmul": base, "lora": base + adapter, "train": 2 * base + 3 * adapter}[self.op]

    def bytes_moved(self, weight_bytes: int) -> int:
        return op_bytes(self.op, self.shape, self.tokens, weight_bytes)


def op_bytes(op: str, shape: tuple[int, int], tokens: int, weight_bytes: int) -> int:
    """Bytes one call must move, given the bytes of the weight it reads (module docstring)."""
    out_features, in_features = shape
    activations = 2 * tokens * (in_features + out_features)   # bf16 x in, y out
    adapter = 2 * RANK * (in_features + out_features)
    if op == "matmul":
        return weight_bytes + activations
    if op == "lora":
        return weight_bytes + activations + adapter
    return 2 * (weight_bytes + activations + adapter)          # train: forward + backward


def dense_bytes(n: int) -> int:
    return 2 * n


# --- one layer's call --------------------------------------------------------------------

# forward(x, A, B) -> y over one layer's own copy of the weight; A, B None: no adapter.
Forward = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]


def layer_call(case: Case, forward: Forward) -> Callable[[], object]:
    """The zero-argument call that one rotation step times, with its own inputs.
    train: forward, then the gradients of x, A and B (autograd.grad: nothing accumulates
    into .grad between calls), as one QLoRA step of this layer."""
    x = case.x().clone()
    if case.op == "matmul":
        return functools.partial(forward, x, None, None)
    A, B = (t.clone() for t in case.weights.lora())
    if case.op == "lora":
        return functools.partial(forward, x, A, B)
    inputs = tuple(t.requires_grad_() for t in (x, A, B))
    dy = case.grad_output()

    def step():
        return torch.autograd.grad(forward(*inputs), inputs, dy)
    return step


def with_adapter(base: Callable[[torch.Tensor], torch.Tensor]) -> Forward:
    """An unfused adapter on a base layer, as PEFT adds it: base(x) + lora_B(lora_A(x)) * s."""
    def forward(x, A, B):
        y = base(x)
        return y if A is None else y + F.linear(F.linear(x, A), B) * SCALING
    return forward


# --- providers -----------------------------------------------------------------------

@dataclass
class Impl:
    """One implementation: how it builds a layer's forward, what it reads, how slow it is.
    `provider(case)` turns it into the harness' Provider for one case."""
    name: str
    make_forward: Callable[[Case], Forward]     # a fresh, independent copy per call
    weight_bytes: Callable[[int], int]          # bytes of the weight it reads, given numel
    ops: tuple = OPS
    slow: bool = False
    max_tokens: Optional[int] = None
    min_tokens: int = 1
    context: Callable = contextlib.nullcontext
    guarded: bool = False                       # checked against the dequantized weight
    tolerance: float = 1.0                      # times mismatch()'s bf16 tolerance

    def runs(self, case: Case) -> bool:
        return (case.op in self.ops and case.tokens >= self.min_tokens
                and (self.max_tokens is None or case.tokens <= self.max_tokens))

    def bytes_moved(self, case: Case) -> int:
        return case.bytes_moved(self.weight_bytes(case.weights.numel))

    def setup(self, case: Case, n_layers: int):
        return [layer_call(case, self.make_forward(case)) for _ in range(n_layers)]

    def provider(self, case: Case) -> Provider:
        return Provider(self.name, self.setup, self.bytes_moved, **schedule(case, self.slow),
                        context=self.context)


@contextlib.contextmanager
def without_split_k(backend: str):
    """nf4lora `backend` with the Triton fused kernels' split-K off (fused_splits -> 1)."""
    from nf4lora.backends import triton as triton_backend
    with harness.using_backend(backend):
        previous = triton_backend.SPLIT_K_ENABLED
        triton_backend.SPLIT_K_ENABLED = False
        try:
            yield
        finally:
            triton_backend.SPLIT_K_ENABLED = previous


@contextlib.contextmanager
def without_triton_route(backend: str):
    """nf4lora `backend` ("cuda") with its route to Triton's kernels off (backends/cuda.py
    TRITON_ROUTE_ENABLED): dequantize + cuBLAS for every shape past the CUDA GEMV, the other
    side of the crossover that route stands on."""
    from nf4lora.backends import cuda as cuda_backend
    with harness.using_backend(backend):
        previous = cuda_backend.TRITON_ROUTE_ENABLED
        cuda_backend.TRITON_ROUTE_ENABLED = False
        try:
            yield
        finally:
            cuda_backend.TRITON_ROUTE_ENABLED = previous


def nf4lora_impl(backend: str, split_k: bool = True, triton_route: bool = True) -> Impl:
    """split_k=False: the Triton backend without the fused kernels' split-K (GPU rows);
    triton_route=False: the CUDA backend without its route to Triton (GPU rows)."""
    import nf4lora

    def make_forward(case: Case) -> Forward:
        packed, state = case.weights.quantized()
        packed, state = packed.clone(), copy.deepcopy(state)

        def forward(x, A, B):
            if A is None:
                return nf4lora.matmul_4bit(x, packed.t(), state)
            return nf4lora.lora_matmul_4bit(x, packed, state, A, B, SCALING)
        return forward

    reference = backend == "reference"
    context = (harness.using_backend if split_k and triton_route
               else without_split_k if triton_route else without_triton_route)
    return Impl(f"nf4lora[{backend}]" + ("" if split_k else " no-split-k")
                + ("" if triton_route else " no-triton"), make_forward,
                quantized_bytes, ops=("matmul", "lora") if reference else OPS, slow=reference,
                context=functools.partial(context, backend), guarded=True)


NF4LORA_AMX = "nf4lora-amx"


@contextlib.contextmanager
def amx_tiles():
    """nf4lora[cpu] with the tile GEMM on AMX (NF4LORA_CPU_GEMM=amx, read at every call)."""
    with harness.using_backend("cpu"), harness.environment_variable("NF4LORA_CPU_GEMM", "amx"):
        yield


def nf4lora_amx_impl() -> Impl:
    """nf4lora[cpu] with its AMX tile GEMM (csrc/cpu/gemm_tiles.h: W decoded into bf16
    tiles in cache, never materialized) from M = 16 (backends/cpu.py TILE_GEMM_MIN_M) and
    past the fused kernel, where auto takes the fused kernel or dequantize + oneDNN's GEMM
    until this row shows the tiles faster. AMX-BF16 CPUs only; no rows below M = 16 (they
    would be nf4lora[cpu]'s)."""
    from nf4lora.backends import cpu
    return dataclasses.replace(nf4lora_impl("cpu"), name=NF4LORA_AMX, context=amx_tiles,
                               min_tokens=cpu.TILE_GEMM_MIN_M)


NF4LORA_EVAL = "nf4lora-eval"
NF4LORA_EVAL_INT8 = "nf4lora-eval-int8"
# around its calls (the dispatcher reads NF4LORA_CPU_GEMV at every call)
INT8_SUMS = functools.partial(harness.environment_variable, "NF4LORA_CPU_GEMV", "int8")


def nf4lora_eval_impl(int8: bool = False) -> Impl:
    """nf4lora's drop-in for inference: an eval-mode nf4lora.nn.Linear4bit under no_grad on
    the same bytes (NF4, double quant, bf16 compute), as bitsandbytes-gemv is bitsandbytes'.
    On CPUs with an AVX2 or AVX-512 kernel for it, its first forward (the warm-up) builds the
    interleaved copy of the weight that the fused kernel then reads (backends.cpu.interleave;
    the row's bytes are still the format's, for "% read BW"; the copy is 9% more); elsewhere
    it is nf4lora[cpu]. nf4lora_eval_path() says which. int8: the same layer with the opt-in
    NF4LORA_CPU_GEMV=int8 (int8 levels and x, AVX512-VNNI; less exact than dense bf16: the
    README's "CPU matmul"; where the ISA lacks it, what the default gives)."""
    import nf4lora

    def make_forward(case: Case) -> Forward:
        packed, state = case.weights.quantized()
        out_features, in_features = case.shape
        layer = nf4lora.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=DTYPE,
                                      quant_type="nf4", device="meta")
        layer.weight = nf4lora.nn.Params4bit.from_prequantized(packed.clone(), state.as_dict(packed=True),
                                                               device="cpu", module=layer)
        layer.eval()
        nf4lora_eval_layers.append(layer)

        def forward(x, A, B):
            with torch.no_grad():
                return layer(x)
        return forward

    if int8:
        # int8 levels and x, each within 0.5 / 127 of its scale: mean |error| ~4x dense
        # bf16's (tests/test_cpu_matmul.py test_int8_is_less_exact_than_the_16bit_baseline)
        return Impl(NF4LORA_EVAL_INT8, make_forward, quantized_bytes, ops=("matmul",), guarded=True,
                    tolerance=4.0, context=INT8_SUMS)
    return Impl(NF4LORA_EVAL, make_forward, quantized_bytes, ops=("matmul",), guarded=True)


nf4lora_eval_layers: list = []   # the layers nf4lora_eval_impl built, for nf4lora_eval_path()


def nf4lora_eval_path() -> str:
    from nf4lora._weight import PackedWeight
    from nf4lora.backends import cpu
    layers = [layer for layer in nf4lora_eval_layers
              if cpu._C is None or cpu._C.interleavable(layer.in_features, layer.weight.quant_state.blocksize)]
    kept = sum(PackedWeight.kept_interleaved(layer.weight.quant_state) is not None for layer in layers)
    others = len(nf4lora_eval_layers) - len(layers)
    return (f"{NF4LORA_EVAL}: {kept} of {len(layers)} layers read an interleaved copy"
            + (f" ({others} more, the correctness guard's, have in_features not a multiple of 64: "
               "no copy)" if others else "")
            + ("" if kept else " (none: this CPU's ISA has no kernel for one, so the rows are "
                               "nf4lora[cpu]'s kernels)"))


def bitsandbytes_impl(bnb) -> Impl:
    def make_forward(case: Case) -> Forward:
        packed, state = case.weights.quantized()
        # the same bytes, as a bitsandbytes QuantState
        bnb_state = case.weights.cached("bnb_state", lambda: bnb.functional.QuantState.from_dict(
            state.as_dict(packed=True), packed.device))
        packed, bnb_state = packed.clone(), copy.deepcopy(bnb_state)
        return with_adapter(lambda x: bnb.matmul_4bit(x, packed.t(), bnb_state))

    return Impl(BASELINE, make_forward, quantized_bytes, guarded=True)


def torchao_impl(torchao_nf4) -> Impl:
    def make_forward(case: Case) -> Forward:
        base = case.weights.cached("torchao", lambda: torchao_nf4.to_nf4(
            case.weights.weight(), BLOCKSIZE, NESTED_BLOCKSIZE))
        weight = harness.copy_nf4tensor(base)
        return with_adapter(lambda x: torchao_nf4.linear_nf4(x, weight))

    return Impl("torchao", make_forward, quantized_bytes, ops=("matmul",), slow=True,
                max_tokens=TORCHAO_MAX_TOKENS)


BNB_GEMV = "bitsandbytes-gemv"
# bitsandbytes' eval-mode Linear4bit takes its fused gemv_4bit only for one row of x (other
# M are matmul_4bit, the BASELINE row already); TORCH_INT4's kernel is timed up to M = 64.
BNB_GEMV_MAX_TOKENS = 1
TORCH_INT4 = "torch-int4"
INT4_GROUP = 64


def bitsandbytes_gemv_impl(bnb) -> Impl:
    """bitsandbytes' fused CPU GEMV: an eval-mode bnb.nn.Linear4bit under no_grad on the same
    bf16 weight (NF4, double quant, bf16 compute). On CPUs with AVX512-BF16 its first
    forward (the warm-up) repacks the weight for gemv_4bit; elsewhere it is matmul_4bit.
    bnb_gemv_path() says which ran."""
    def make_forward(case: Case) -> Forward:
        out_features, in_features = case.shape
        linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=DTYPE)
        with torch.no_grad():
            linear.weight.copy_(case.weights.weight())
        layer = harness.bitsandbytes_4bit(torch.nn.Sequential(linear), bnb, DTYPE, BLOCKSIZE)[0].eval()
        bnb_gemv_layers.append(layer)

        def forward(x, A, B):
            with torch.no_grad():
                return layer(x)
        return forward

    return Impl(BNB_GEMV, make_forward, quantized_bytes, ops=("matmul",),
                max_tokens=BNB_GEMV_MAX_TOKENS)


bnb_gemv_layers: list = []   # the layers bitsandbytes_gemv_impl built, for bnb_gemv_path()


def bnb_gemv_path() -> str:
    repacked = sum(bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
                   for layer in bnb_gemv_layers)
    return (f"{BNB_GEMV}: {repacked} of {len(bnb_gemv_layers)} layers repacked for bitsandbytes' "
            "fused CPU gemv_4bit" + ("" if repacked else " (none: this CPU lacks AVX512-BF16, so "
                                     "the rows are its matmul_4bit)"))


def int4pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (packed, scales_and_zeros) of torch's int4 weight-only CPU kernel: per
    group of INT4_GROUP inputs, asymmetric, w = (q - 8) * scale + zero, q in 0..15 (the
    layout torchao's int4 weight-only CPU path builds for aten._weight_int4pack_mm_for_cpu)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-6) / 15
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    zero = low + 8 * scale
    scales_and_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1)
    return packed, scales_and_zeros.contiguous().to(DTYPE)


def int4_bytes(n: int) -> int:
    return n // 2 + 2 * 2 * n // INT4_GROUP    # 4-bit codes + a bf16 scale and zero per group


def torch_int4_impl() -> Impl:
    """torch's own int4 weight-only CPU kernel, group 64: the kernel behind torchao's int4
    weight-only CPU path (a different 4-bit format: the same bytes per weight, give or take)."""
    def make_forward(case: Case) -> Forward:
        packed, scales_and_zeros = case.weights.cached("int4pack", lambda: int4pack(case.weights.weight()))
        packed, scales_and_zeros = packed.clone(), scales_and_zeros.clone()
        return with_adapter(lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, INT4_GROUP, scales_and_zeros))

    return Impl(TORCH_INT4, make_forward, int4_bytes, ops=("matmul", "lora"),
                max_tokens=COMPUTE_BOUND_TOKENS)


def dense_impl() -> Impl:
    def make_forward(case: Case) -> Forward:
        weight = case.weights.weight().clone()
        return with_adapter(lambda x: F.linear(x, weight))

    return Impl(DENSE, make_forward, dense_bytes)


def import_torchao_nf4():
    """torchao's module holding to_nf4 and linear_nf4 (its home moved between releases)."""
    return harness.import_first(
        ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
         "torchao.dtypes"), ("to_nf4", "linear_nf4", "NF4Tensor"))


# --- correctness guard ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def guard_weights(shape: tuple[int, int], device: str = "cpu") -> Weights:
    """A small layer quantized by the reference backend, the spec."""
    return Weights(shape, Quantizer([], None), device=device)


def root_sum_squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(sum_k (a_ik b_kj)^2): the size of the terms summed into each element of a @ b."""
    return ((a * a) @ (b * b)).sqrt()


def expected(case: Case) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, exact value in float32, root-sum-square of its terms) of each output of the
    case's call: y, or for train (dx, dA, dB), from the weight the reference decodes."""
    W, x = case.weights.dequantized_f32(), case.x().float()
    if case.op == "matmul":
        return [("y", x @ W.t(), root_sum_squares(x, W.t()))]
    A, B = (t.float() for t in case.weights.lora())
    h = x @ A.t()
    y = x @ W.t() + SCALING * h @ B.t()
    y_terms = root_sum_squares(x, W.t()) + SCALING * root_sum_squares(h, B.t())
    if case.op == "lora":
        return [("y", y, y_terms)]
    g = case.grad_output().float()
    gB = g @ B
    return [("dx", g @ W + SCALING * gB @ A,
             root_sum_squares(g, W) + SCALING * root_sum_squares(gB, A)),
            ("dA", SCALING * gB.t() @ x, SCALING * root_sum_squares(gB.t(), x)),
            ("dB", SCALING * g.t() @ h, SCALING * root_sum_squares(g.t(), h))]


def mismatch(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor,
             scale: float = 1.0) -> Optional[str]:
    """None if got is want up to bf16 arithmetic (times `scale`), else how far off it is.

    bf16 keeps 8 significant bits (unit roundoff u = 2^-9). Each term of a sum carries a
    rounding or two of random sign (W or h rounded to bf16), so the sum is off by ~u times
    the root-sum-square of its terms, and the largest of ~10^5 elements by ~4.5 times that;
    2^-5 = 16 u allows 3.5x more, and 2^-7 |want| two roundings of the result itself.
    (Measured: dequantize-then-bf16-GEMM paths, bitsandbytes' too, peak at 0.4 of this
    tolerance.) A wrong code, scale or nibble order is off by whole terms: far outside.
    """
    if got.shape != want.shape:
        return f"shape {list(got.shape)}, expected {list(want.shape)}"
    error = (got.float() - want).abs()
    tolerance = scale * (2 ** -5 * terms + 2 ** -7 * want.abs())
    bad = error > tolerance
    if not bad.any():
        return None
    worst = int(torch.argmax(error - tolerance))
    return (f"{int(bad.sum())} of {want.numel()} elements off, worst by {error.view(-1)[worst]:.3g} "
            f"(allowed {tolerance.view(-1)[worst]:.3g})")


def check_impl(impl: Impl, ops, tokens, device: str = "cpu") -> Optional[str]:
    """None if `impl` computes every op it runs, at every token count, on the guard shapes
    as float32 math on the reference-decoded weight does (up to bf16), else what differs."""
    for shape in GUARD_SHAPES if device == "cpu" else GPU_GUARD_SHAPES:
        for op in ops:
            for m in tokens:
                case = Case(op, guard_weights(shape, device), m)
                if not impl.runs(case):
                    continue
                got = layer_call(case, impl.make_forward(case))()
                got = got if isinstance(got, tuple) else (got,)
                wanted = expected(case)
                if len(got) != len(wanted):
                    return f"{op} at M={m}: {len(got)} outputs, expected {len(wanted)}"
                for value, (name, want, terms) in zip(got, wanted):
                    why = mismatch(value.detach(), want, terms, impl.tolerance)
                    if why:
                        return f"{op} {name} at M={m}, {shape[0]}x{shape[1]}: {why}"
    return None


def guard(impls: list[Impl], ops, tokens, device: str = "cpu") -> tuple[list[Impl], list[str]]:
    """The impls that pass check_impl (or are not guarded), and a note for each other one."""
    probes = [Provider(impl.name, impl.setup, impl.bytes_moved, context=impl.context,
                       check=functools.partial(check_impl, impl, ops, tokens, device)
                       if impl.guarded else None)
              for impl in impls]
    passed, notes = harness.run_checks(probes)
    names = {p.name for p in passed}
    return [impl for impl in impls if impl.name in names], notes


# --- bitsandbytes' matmul path -------------------------------------------------------

def bitsandbytes_matmul_path(import_messages: list[str]) -> dict:
    """bench_codec's record of bitsandbytes' CPU path, plus its matmul ops. In 0.50,
    matmul_4bit runs op gemm_4bit, whose only CPU implementation is the "default" one:
    dequantize_4bit (native CPU kernel) then F.linear; its fused CPU gemv runs only for
    weights repacked by Linear4bit in eval mode on CPUs with avx512_bf16."""
    path = bitsandbytes_path(import_messages)
    for op in ("gemm_4bit", "gemv_4bit"):
        has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key(f"bitsandbytes::{op}", "CPU")
        path["ops"][op] = "cpu: native library" if has_cpu else "default: dequantize_4bit + F.linear"
    return path


# --- output --------------------------------------------------------------------------

COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("M", "tokens", "d"), ("r", "rank", "d"),
           ("provider", "provider", ""), ("mode", "mode", ""), ("layers", "layers", "d"),
           ("median ms", "median_ms", ".3f"), ("GB/s", "gbs", ".2f"),
           ("% read BW", "pct_read_bw", ".1f"), ("TFLOP/s", "tflops", ".4f"),
           ("cyc/32w", "cycles_per_32_weights", ".1f"),
           (f"x vs {BASELINE}", f"x_vs_{BASELINE}", ".2f"), (f"x vs {DENSE}", f"x_vs_{DENSE}", ".2f")]


def add_cycles_per_32_weights(rows: list[dict], threads: int, notes: list[str]) -> None:
    """One thread only: row["cycles_per_32_weights"] = median time x the CPU's nominal clock
    (/proc/cpuinfo "cpu MHz", the TSC rate on these VMs) / (weights / 32): what decoding and
    multiplying 32 weights costs one core, the unit the kernel comments use."""
    mhz = harness.cpu_mhz()
    if threads != 1 or mhz is None:
        return
    for row in rows:
        if row["op"] in ("matmul", "lora"):
            weights = math.prod(row["shape"])
            row["cycles_per_32_weights"] = row["median_ms"] * 1e-3 * mhz * 1e6 / (weights / 32)
    notes.append(f"cyc/32w: median time x {mhz:.0f} MHz (/proc/cpuinfo) per 32 weights, one thread")


def save_plot(rows: list[dict], bandwidth: dict, path: Path) -> Optional[str]:
    """Median ms per call vs M, log-log, one panel per op x shape, one line per provider,
    and the time to read the 4-bit weight at the probed read bandwidth. Returns a note if
    matplotlib is missing, else None."""
    matplotlib, why, _ = harness.import_optional("matplotlib")
    if matplotlib is None:
        return f"plot: skipped, {why}"
    matplotlib.use("Agg")   # no display here
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["op"] in ("matmul", "lora") and r["mode"] == "cold"]
    if not rows:
        return "plot: skipped, no matmul or lora rows"
    ops = [op for op in ("matmul", "lora") if any(r["op"] == op for r in rows)]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {name: f"C{i}" for i, name in enumerate(providers)}
    fig, axes = plt.subplots(len(ops), len(shapes), figsize=(4.5 * len(shapes), 3.8 * len(ops)),
                             squeeze=False, sharex=True)
    # fixed margins: a layout engine doubles the drawing time (seconds on a busy machine)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.88, wspace=0.3, hspace=0.35)
    for axis_row, op in zip(axes, ops):
        for ax, shape in zip(axis_row, shapes):
            here = [r for r in rows if r["op"] == op and tuple(r["shape"]) == shape]
            for name in providers:
                points = sorted((r["tokens"], r["median_ms"]) for r in here if r["provider"] == name)
                if points:
                    ax.plot(*zip(*points), marker="o", color=colors[name], label=name)
            tokens = sorted({r["tokens"] for r in here})
            if tokens:
                weight = quantized_bytes(math.prod(shape))
                ideal = [op_bytes(op, shape, m, weight) / (bandwidth["read_gbs"] * 1e9) * 1e3
                         for m in tokens]
                ax.plot(tokens, ideal, "--", color="gray", label="4-bit bytes at read BW")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(tokens, [str(m) for m in tokens])
            ax.set_title(f"{op} {shape[0]}x{shape[1]}", fontsize=10)
            ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("M (tokens)")
    for ax in axes[:, 0]:
        ax.set_ylabel("median ms per call (cold)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"bf16 x, NF4 + double quant, blocksize {BLOCKSIZE}, r = {RANK}; "
                 f"{bandwidth['threads']} threads, read {bandwidth['read_gbs']:.1f} GB/s", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- main ----------------------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, int]:
    try:
        out_features, in_features = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OUTxIN such as 4096x11008, got {text!r}") from None
    return out_features, in_features


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_matmul",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, M = 1 and 64, 64 MiB probe, 2 reps: a smoke run, not numbers")
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help=f"only these (nf4lora, nf4lora[cpu], {NF4LORA_EVAL}, {NF4LORA_EVAL_INT8}, nf4lora[reference], {BASELINE}, "
                             f"{BNB_GEMV}, {TORCH_INT4}, "
                             f"torchao, {DENSE})")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="OUTxIN",
                        help="weight shapes (default: the three Llama-7B projections; train: "
                             "4096x4096 only, ~3 min of bf16 baselines per shape)")
    parser.add_argument("--tokens", nargs="+", type=int, metavar="M",
                        help="token counts of the matmul and lora ops (default 1 8 64 512); "
                             "train always runs at M = 512 (64 with --quick)")
    return harness.parse_kernel_bench_args(parser, argv, GPU_PROVIDERS, saves="JSON and PNG",
                                           on_gpu=", train at every M", plans="cases")


GPU_PROVIDERS = ("nf4lora[cuda]", "nf4lora[cuda] no-triton", "nf4lora[triton]",
                 "nf4lora[triton] no-split-k", BASELINE, DENSE)
GPU_COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("M", "tokens", "d"),
               ("provider", "provider", ""), ("layers", "layers", "d"),
               ("median ms", "median_ms", ".4f"), ("kernel ms", "kernel_ms", ".4f"),
               ("GB/s", "gbs", ".0f"), ("% read BW", "pct_read_bw", ".1f"),
               ("% HBM", "pct_nominal_bw", ".1f"), ("TFLOP/s", "tflops", ".1f"),
               (f"x vs {BASELINE}", f"x_vs_{BASELINE}", ".2f"),
               (f"x vs {DENSE}", f"x_vs_{DENSE}", ".2f")]


@dataclass
class Found:
    """The providers that can run here, and what the JSON records about them."""
    impls: list[Impl]
    backends: list[str]             # nf4lora backends usable on CPU tensors
    bnb: object = None              # the bitsandbytes module, if importable
    bnb_messages: list[str] = field(default_factory=list)   # its warnings on import
    torchao_where: Optional[str] = None                     # torchao's NF4 module


def find_gpu_providers(args, notes: list[str]) -> Found:
    """find_providers for --device cuda. --plan builds every GPU provider, usable here or
    not (nothing it builds touches a GPU or imports bitsandbytes)."""
    backends, backend_notes = harness.nf4lora_gpu_backends()
    notes += backend_notes
    if args.plan:
        backends = list(harness.GPU_BACKENDS)
    impls = [nf4lora_impl(backend) for backend in backends]
    if "cuda" in backends:
        impls.append(nf4lora_impl("cuda", triton_route=False))
    if "triton" in backends:
        impls.append(nf4lora_impl("triton", split_k=False))
    bnb, bnb_messages = None, []
    if not args.providers or BASELINE in args.providers:
        if args.plan:
            impls.append(bitsandbytes_impl(None))
        else:
            bnb, why, bnb_messages = harness.import_optional("bitsandbytes")
            if bnb is None:
                notes.append(f"{BASELINE}: skipped, {why}")
            else:
                impls.append(bitsandbytes_impl(bnb))
    impls.append(dense_impl())
    return Found(harness.select(impls, args.providers), backends, bnb, bnb_messages)


def find_providers(args, notes: list[str]) -> Found:
    """The selected providers that import; a note for each that cannot run."""
    if args.device == "cuda":
        return find_gpu_providers(args, notes)

    def wanted(name: str) -> bool:
        return not args.providers or name in args.providers

    backends, backend_notes = harness.nf4lora_cpu_backends()
    notes += backend_notes
    impls = [nf4lora_impl(backend) for backend in backends]
    if "cpu" in backends and wanted(NF4LORA_AMX):
        from nf4lora.backends import cpu
        if cpu._C.has_amx():
            impls.append(nf4lora_amx_impl())
        else:
            notes.append(f"{NF4LORA_AMX}: skipped, this CPU has no AMX-BF16 (or the OS did not grant it)")
    if "cpu" in backends and wanted(NF4LORA_EVAL):
        impls.append(nf4lora_eval_impl())
    if "cpu" in backends and args.providers and NF4LORA_EVAL_INT8 in args.providers:  # opt-in: asked for by name
        impls.append(nf4lora_eval_impl(int8=True))
    bnb, bnb_messages, torchao_where = None, [], None
    bnb_rows = [(name, make) for name, make in ((BASELINE, bitsandbytes_impl),
                                                (BNB_GEMV, bitsandbytes_gemv_impl)) if wanted(name)]
    if bnb_rows:
        bnb, why, bnb_messages = harness.import_optional("bitsandbytes")
        for name, make in bnb_rows:
            if bnb is None:
                notes.append(f"{name}: skipped, {why}")
            else:
                impls.append(make(bnb))
    if wanted(TORCH_INT4):
        if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            impls.append(torch_int4_impl())
        else:
            notes.append(f"{TORCH_INT4}: skipped, this torch has no aten._weight_int4pack_mm_for_cpu")
    if wanted("torchao"):
        torchao_nf4, torchao_where = import_torchao_nf4()
        if torchao_nf4 is None:
            notes.append("torchao: skipped, no to_nf4/linear_nf4/NF4Tensor in torchao.dtypes "
                         "or torchao.quantization")
        else:
            impls.append(torchao_impl(torchao_nf4))
            notes.append(f"torchao: matmul rows at M <= {TORCHAO_MAX_TOKENS} only, 2 layers, 1 rep: "
                         "linear_nf4 dequantizes the whole weight in PyTorch on every "
                         "call (~155 ms at M = 1, 4096x4096)")
    impls.append(dense_impl())
    return Found(harness.select(impls, args.providers), backends, bnb, bnb_messages, torchao_where)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.argv = argv
    with harness.threads_set_to(args.threads):
        preset = QUICK if args.quick else FULL
        notes: list[str] = []
        found = find_providers(args, notes)
        if args.plan:
            return plan(args, preset, found, notes)
        if args.device == "cuda":   # quantized on the CPU (nf4lora's cpu backend), then moved
            with harness.gc_frozen():
                return run_gpu(args, preset, found,
                               Quantizer(harness.nf4lora_cpu_backends()[0], None), notes)
        # Every 4-bit provider reads the same bytes, quantized once per shape: by nf4lora's cpu
        # backend (timed or not), else bitsandbytes, else the reference (~13 s per 4096x4096).
        quantizer_bnb = found.bnb.functional if found.bnb is not None else None
        if quantizer_bnb is None and "cpu" not in found.backends and not args.quick:
            quantizer_bnb, _, _ = harness.import_optional("bitsandbytes.functional")
        quantizer = Quantizer(found.backends, quantizer_bnb)
        with harness.gc_frozen():   # after the imports: see gc_frozen
            return run(args, preset, found, quantizer, notes)


def cases(args, preset: dict, weights: dict) -> list[Case]:
    """Every (op, shape, M) of the run. On a GPU train runs at every M and shape (on a CPU
    at train_tokens on train_shapes only: TRAIN_SHAPES says why)."""
    gpu = args.device == "cuda"
    shapes = args.shapes or preset["shapes"]
    train_shapes = shapes if gpu else args.shapes or preset["train_shapes"]
    tokens = args.tokens or preset["tokens"]
    train_tokens = tokens if gpu else [preset["train_tokens"]]
    return [Case(op, weights[shape], m) for op in args.ops
            for shape in (train_shapes if op == "train" else shapes)
            for m in (train_tokens if op == "train" else tokens)]


def plan(args, preset: dict, found: Found, notes: list[str]) -> dict:
    """--plan: the cases and providers a run would time (scripts/gpu_check.sh --dry-run):
    builds every case and provider, bytes and schedule included, and times nothing."""
    shapes = list(dict.fromkeys((args.shapes or preset["shapes"]) + preset["train_shapes"]))
    weights = {shape: Weights(shape, None, device=args.device) for shape in shapes}
    planned = [impl.provider(case) for case in cases(args, preset, weights)
               for impl in found.impls if impl.runs(case)]
    tokens = args.tokens or preset["tokens"]
    return print_plan(args.device, args.ops, args.shapes or preset["shapes"],
                      list(dict.fromkeys(impl.name for impl in found.impls)), notes,
                      extra=f" tokens={' '.join(map(str, tokens))} rows={len(planned)}")


def run_gpu(args, preset: dict, found: Found, quantizer: Quantizer, notes: list[str]) -> dict:
    """run() on CUDA tensors: guard, probe, time, print and save (no plot)."""
    weights = {}
    for shape in (args.shapes or preset["shapes"]):
        weights[shape] = Weights(shape, quantizer, device=GPU_DEVICE)
    todo = cases(args, preset, weights)
    guard_tokens = sorted({case.tokens for case in todo})
    print(f"checking {', '.join(i.name for i in found.impls if i.guarded)} against the "
          f"reference-decoded weight ...", flush=True)
    impls, failed = guard(found.impls, args.ops, guard_tokens, device=GPU_DEVICE)
    notes += failed
    print("probing GPU memory bandwidth ...", flush=True)
    bandwidth = probe_gpu_bandwidth()
    print_gpu_bandwidth(bandwidth)
    rows = []
    for case in todo:
        providers = [impl.provider(case) for impl in impls if impl.runs(case)]
        print(f"{case.op} {case.shape[0]}x{case.shape[1]} M={case.tokens}: "
              f"{', '.join(p.name for p in providers)}", flush=True)
        case_rows, case_notes = harness.measure_all(providers, [case], measure_one=measure_gpu)
        rows += case_rows
        notes += case_notes
    add_gpu_rates(rows, bandwidth)
    for row in rows:   # TFLOP/s from the GPU time, for the compute-bound calls only
        ms = row.get("kernel_ms") or row["median_ms"]
        row["tflops"] = (row["flops"] / (ms * 1e-3) / 1e12
                         if row["tokens"] >= COMPUTE_BOUND_TOKENS else None)
    for baseline in (BASELINE, DENSE):
        add_gpu_speedups(rows, baseline, ["op", "shape", "tokens"])
    for op in args.ops:
        op_rows = [r for r in rows if r["op"] == op]
        if op_rows:
            print(f"\n{op} (GPU):")
            print(harness.format_table(op_rows, GPU_COLUMNS))
    harness.print_notes(notes)
    return harness.save_run(
        args.out, "matmul-gpu", benchmark="matmul", argv=args.argv, device="cuda",
        metadata=harness.metadata(gpu=bandwidth, weights_quantized_by=quantizer.name,
                                  bitsandbytes=None if found.bnb is None else
                                  getattr(found.bnb, "__version__", None)),
        config={"quick": args.quick, "providers": args.providers, "ops": args.ops,
                "shapes": [list(s) for s in weights], "tokens": args.tokens or preset["tokens"],
                "rank": RANK, "scaling": SCALING, "reps": GPU_REPS,
                "guard_shapes": GPU_GUARD_SHAPES},
        bandwidth=bandwidth, rows=rows, notes=notes)


def run(args, preset: dict, found: Found, quantizer: Quantizer, notes: list[str]) -> dict:
    """Guard, probe, time, print, plot and save (main's body once the imports are done)."""
    impls = found.impls
    shapes = args.shapes or preset["shapes"]
    tokens = args.tokens or preset["tokens"]
    train_shapes = args.shapes or preset["train_shapes"]
    train_tokens = preset["train_tokens"]
    guard_tokens = sorted(set(tokens) | ({train_tokens} if "train" in args.ops else set()))
    print(f"checking {', '.join(i.name for i in impls if i.guarded)} against the reference-decoded "
          f"weight ...", flush=True)
    impls, failed = guard(impls, args.ops, guard_tokens)
    notes += failed

    print("probing memory bandwidth ...", flush=True)
    bandwidth = harness.probe_bandwidth(preset["probe_bytes"])
    print(f"read {bandwidth['read_gbs']:.1f} GB/s, copy {bandwidth['copy_gbs']:.1f} GB/s "
          f"({bandwidth['bytes'] / harness.MIB:.0f} MiB, {bandwidth['threads']} threads)", flush=True)

    weights = {shape: Weights(shape, quantizer) for shape in dict.fromkeys(shapes + train_shapes)}
    rows = []
    for op in args.ops:
        for shape in (train_shapes if op == "train" else shapes):
            for m in ([train_tokens] if op == "train" else tokens):
                case = Case(op, weights[shape], m)
                providers = [impl.provider(case) for impl in impls if impl.runs(case)]
                print(f"{op} {shape[0]}x{shape[1]} M={m}: {', '.join(p.name for p in providers)}",
                      flush=True)
                case_rows, case_notes = harness.measure_all(
                    providers, [case], footprint=preset["footprint"], max_reps=preset["max_reps"],
                    warm=args.warm)
                rows += case_rows
                notes += case_notes

    harness.add_rates(rows, bandwidth)
    harness.add_tflops(rows)
    for row in rows:   # TFLOP/s is the measure of the compute-bound calls only
        if row["tokens"] < COMPUTE_BOUND_TOKENS:
            row["tflops"] = None
    for baseline in (BASELINE, DENSE):
        harness.add_speedups(rows, baseline, ["op", "shape", "tokens", "mode"])
    add_cycles_per_32_weights(rows, bandwidth["threads"], notes)
    if any(impl.name == BNB_GEMV for impl in impls):
        notes.append(bnb_gemv_path())
        bnb_gemv_layers.clear()   # the run's layers (their weights) are not kept past it
    if any(impl.name in (NF4LORA_EVAL, NF4LORA_EVAL_INT8) for impl in impls):
        notes.append(nf4lora_eval_path())
        nf4lora_eval_layers.clear()
    if any(impl.name == NF4LORA_EVAL_INT8 for impl in impls):
        from nf4lora.backends import cpu
        with INT8_SUMS():
            sums = cpu._C.gemv_decoder(8, DTYPE)
        notes.append(f"{NF4LORA_EVAL_INT8}: {sums} sums" + ("" if sums == "int8" else
                     f" ({cpu._C.isa()} has no int8 sums: the rows are {NF4LORA_EVAL}'s)"))
    if any(r["op"] == "train" and r["provider"] in (BASELINE, DENSE) for r in rows):
        notes.append("train: the dense-bf16 and bitsandbytes steps are dominated by torch's bf16 "
                     "grad @ W (dx of F.linear's backward, W not transposed), which on CPUs without "
                     "native bf16 GEMM runs ~100x slower than the forward (bench/README.md)")
    for op in args.ops:
        op_rows = [r for r in rows if r["op"] == op]
        if op_rows:
            print(f"\n{op}:")
            print(harness.format_table(op_rows, COLUMNS))

    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / "matmul-latest.png"
    why = save_plot(rows, bandwidth, plot)
    if why:
        notes.append(why)
        plot = None
    harness.print_notes(notes)

    payload = harness.save_run(
        args.out, "matmul", benchmark="matmul", argv=args.argv,
        metadata=harness.metadata(
            bitsandbytes_path=(bitsandbytes_matmul_path(found.bnb_messages)
                               if found.bnb is not None else None),
            torchao_nf4_module=found.torchao_where, weights_quantized_by=quantizer.name),
        config={"quick": args.quick, "providers": args.providers, "ops": args.ops,
                "shapes": [list(s) for s in shapes], "tokens": tokens,
                "train_shapes": [list(s) for s in train_shapes], "train_tokens": train_tokens,
                "rank": RANK, "scaling": SCALING, "footprint_bytes": preset["footprint"],
                "max_reps": preset["max_reps"], "warm": args.warm, "guard_shapes": GUARD_SHAPES},
        bandwidth=bandwidth, rows=rows, notes=notes, plot=plot.name if plot else None)
    if plot:
        print(f"saved the plot {plot}")
    return payload


if __name__ == "__main__":
    main()
