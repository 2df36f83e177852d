"""Benchmark NF4 quantize and dequantize (bf16 weights, double quantization, blocksize 64).

    python -m bench.bench_codec [--quick] [--providers NAME ...] [--threads N] [--out DIR] [--warm]
                                [--device cpu|cuda] [--plan]

Providers, all on CPU tensors in one run (perf.md):
  nf4lora[<backend>]  nf4lora.functional, once per backend usable on CPU ("cpu", "reference")
  bitsandbytes        bitsandbytes.functional (its CPU path: which one ran is in the JSON)
  torchao             torchao's NF4Tensor: to_nf4 / get_original_weight
  copy-bf16           dequantize only: a dense bf16 clone of the output size, the practical
                      ceiling for an op that writes a fresh bf16 tensor

--device cuda (scripts/gpu_check.sh): the same ops on CUDA tensors, providers nf4lora[cuda],
nf4lora[triton], bitsandbytes (its CUDA kernels) and copy-bf16, timed as the "GPU mode"
section below says. --plan prints what a run would time and exits (the dry run's check).

Bytes an op must move, per weight of n elements with b = n / 64 blocks
(4096 x 4096: 42.2 MB for dequantize, 42.2 MB for quantize, 1.4 ms at 30 GB/s):
  dequantize: n/2 packed + b qabsmax (uint8) + 4 * ceil(b/256) absmax2 + 2n output
  quantize:   2n input + n/2 packed + b qabsmax + 4 * ceil(b/256) absmax2
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import harness
from .harness import Provider

SHAPES = [(4096, 4096), (11008, 4096)]    # Llama-7B q/k/v/o and up/gate projections
QUICK_SHAPES = [(256, 256), (768, 256)]   # whole scaler blocks, as torchao requires
GUARD_SHAPE = (160, 330)                  # 825 blocks: a partial last block and nested block
DTYPE = torch.bfloat16
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
QUANT_TYPE = "nf4"
BASELINE = "bitsandbytes"
OPS = ("dequantize", "quantize")

# Full and --quick presets: probe buffer, cold footprint, and a cap on reps.
FULL = dict(shapes=SHAPES, probe_bytes=harness.GIB, footprint=harness.COLD_FOOTPRINT, max_reps=None)
QUICK = dict(shapes=QUICK_SHAPES, probe_bytes=64 * harness.MIB, footprint=harness.MIB, max_reps=2)

# Per-call time on this machine kind at 4096 x 4096, which sets the reps below:
# reference dequantize ~0.6 s, quantize ~13 s; torchao dequantize ~0.4 s, to_nf4 ~3 s;
# bitsandbytes quantize ~0.9 s (pure PyTorch on CPU). Those runs are >100x the memory
# time and allocate temporaries far beyond the L3, so a short rotation is already cold.
FAST = dict(reps=5)
SLOW = dict(reps=2)
VERY_SLOW = dict(reps=1, max_layers=2)


# --- cases and bytes -----------------------------------------------------------------

def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def quantized_bytes(n: int) -> int:
    """Packed codes + uint8 qabsmax + float32 absmax2 of a double-quantized weight."""
    blocks = num_blocks(n, BLOCKSIZE)
    return num_blocks(n, 2) + blocks + 4 * num_blocks(blocks, NESTED_BLOCKSIZE)


class CachedWeight:
    """The random bf16 weight of `self.shape` and what is derived from it, each made once,
    on `self.device`. For dataclasses with the fields shape, quantizer (a Quantizer),
    _cache (a dict) and device ("cpu" or "cuda")."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def cached(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def weight(self) -> torch.Tensor:
        return self.cached("weight", lambda: random_weight(self.shape).to(self.device))

    def quantized_cpu(self):
        """(packed uint8 [n/2, 1], nf4lora QuantState) of weight() on the CPU, from the
        fastest CPU quantizer."""
        return self.cached("quantized_cpu", lambda: self.quantizer.quantize(self.weight().cpu()))

    def quantized(self):
        """quantized_cpu() on self.device: every provider reads the same bytes."""
        def make():
            packed, state = self.quantized_cpu()
            if self.device == "cpu":
                return packed, state
            return packed.to(self.device), type(state).from_dict(state.as_dict(packed=True),
                                                                 torch.device(self.device))
        return self.cached("quantized", make)


@dataclass
class Case(CachedWeight):
    """One op on one weight shape; caches the inputs every provider derives from."""
    op: str
    shape: tuple[int, int]
    quantizer: "Quantizer"
    _cache: dict = field(default_factory=dict, repr=False)
    device: str = "cpu"

    @property
    def labels(self) -> dict:
        return {"op": self.op, "shape": list(self.shape), "dtype": str(DTYPE).removeprefix("torch."),
                "quant_type": QUANT_TYPE, "blocksize": BLOCKSIZE, "nested_blocksize": NESTED_BLOCKSIZE}


def op_bytes(case: Case) -> int:
    return quantized_bytes(case.numel) + 2 * case.numel  # bf16 in or out, packed out or in


def copy_bytes(case: Case) -> int:
    return 2 * 2 * case.numel


def random_weight(shape, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(DTYPE)


def clones(tensor: torch.Tensor, n: int) -> list[torch.Tensor]:
    """n independent copies: same values, separate memory (contents do not change timing)."""
    return [tensor.clone() for _ in range(n)]


# --- the quantizer that makes dequantize inputs ------------------------------------------

class Quantizer:
    """Quantizes each case's weight once for every dequantize provider.

    nf4lora's own cpu backend when built; otherwise bitsandbytes, whose bytes are the
    same format (its states are converted with as_dict/from_dict), since the reference
    takes ~13 s per 4096 x 4096; otherwise the reference.
    """

    def __init__(self, nf4lora_backends: list[str], bnb=None):
        self.bnb = bnb
        if "cpu" in nf4lora_backends:
            self.backend = "cpu"
        elif bnb is not None:
            self.backend = None  # bitsandbytes
        else:
            self.backend = "reference"
        self.name = f"nf4lora[{self.backend}]" if self.backend else "bitsandbytes"

    def quantize(self, weight: torch.Tensor):
        from nf4lora import functional as F
        args = dict(blocksize=BLOCKSIZE, compress_statistics=True, quant_type=QUANT_TYPE)
        if self.backend is None:
            packed, state = self.bnb.quantize_4bit(weight, **args)
            return packed, F.QuantState.from_dict(state.as_dict(packed=True), weight.device)
        with harness.using_backend(self.backend):
            return F.quantize_4bit(weight, **args)


# --- providers -----------------------------------------------------------------------

def nf4lora_provider(op: str, backend: str, into_out: bool = False,
                     device: str = "cpu") -> Provider:
    """into_out: dequantize into a preallocated tensor (`out=`, what a reused weight
    buffer does), which leaves out the page faults of a fresh 33 MB output: on this VM
    those cost more than the kernel itself."""
    from nf4lora import functional as F

    def setup(case: Case, n: int):
        if op == "dequantize":
            packed, state = case.quantized()
            return [functools.partial(F.dequantize_4bit, p, copy.deepcopy(state),
                                      out=torch.empty(case.shape, dtype=DTYPE, device=case.device)
                                      if into_out else None)
                    for p in clones(packed, n)]
        return [functools.partial(F.quantize_4bit, w, blocksize=BLOCKSIZE, compress_statistics=True,
                                  quant_type=QUANT_TYPE) for w in clones(case.weight(), n)]

    speed = FAST if backend != "reference" else (SLOW if op == "dequantize" else VERY_SLOW)
    return Provider(f"nf4lora[{backend}]" + (" out=" if into_out else ""), setup, op_bytes, **speed,
                    context=functools.partial(harness.using_backend, backend),
                    # the reference is the oracle; every other backend must match it
                    check=None if backend == "reference" else
                    functools.partial(check_against_reference, op, backend, device))


def bitsandbytes_provider(op: str, bnb) -> Provider:
    def setup(case: Case, n: int):
        if op == "dequantize":
            packed, state = case.quantized()
            bnb_state = bnb.QuantState.from_dict(state.as_dict(packed=True), packed.device)
            return [functools.partial(bnb.dequantize_4bit, p, copy.deepcopy(bnb_state))
                    for p in clones(packed, n)]
        return [functools.partial(bnb.quantize_4bit, w, blocksize=BLOCKSIZE, compress_statistics=True,
                                  quant_type=QUANT_TYPE) for w in clones(case.weight(), n)]

    return Provider(BASELINE, setup, op_bytes, **(FAST if op == "dequantize" else dict(reps=3)))


def torchao_provider(op: str, to_nf4, NF4Tensor) -> Provider:
    def copy_nf4(t):
        # NF4Tensor.clone() re-quantizes (seconds); copying the inner tensors does not.
        names, meta = t.__tensor_flatten__()
        inner = {name: getattr(t, name).clone() for name in names}
        return NF4Tensor.__tensor_unflatten__(inner, meta, t.size(), t.stride())

    def setup(case: Case, n: int):
        if op == "dequantize":
            base = case.cached("torchao", lambda: to_nf4(case.weight(), BLOCKSIZE, NESTED_BLOCKSIZE))
            return [copy_nf4(base).get_original_weight for _ in range(n)]
        return [functools.partial(to_nf4, w, BLOCKSIZE, NESTED_BLOCKSIZE)
                for w in clones(case.weight(), n)]

    return Provider("torchao", setup, op_bytes, **(SLOW if op == "dequantize" else VERY_SLOW))


def copy_provider(into_out: bool = False) -> Provider:
    """A bf16 copy of the output's size: clone (fresh memory) or copy_ into existing memory."""
    def setup(case: Case, n: int):
        if into_out:
            return [functools.partial(torch.empty_like(w).copy_, w) for w in clones(case.weight(), n)]
        return [w.clone for w in clones(case.weight(), n)]
    return Provider("copy-bf16" + (" out=" if into_out else ""), setup, copy_bytes, **FAST)


def import_torchao_nf4():
    """(to_nf4, NF4Tensor, where) from torchao: its home moved between releases."""
    for where in ("torchao.quantization", "torchao.dtypes.nf4tensor", "torchao.dtypes"):
        module, _, _ = harness.import_optional(where)
        if module is not None and hasattr(module, "to_nf4") and hasattr(module, "NF4Tensor"):
            return module.to_nf4, module.NF4Tensor, where
    return None, None, None


def build_providers(op: str, backends: list[str], bnb, torchao_nf4,
                    device: str = "cpu") -> list[Provider]:
    providers = [nf4lora_provider(op, backend, device=device) for backend in backends]
    if op == "dequantize":
        providers += [nf4lora_provider(op, backend, into_out=True, device=device)
                      for backend in backends if backend != "reference"]
    if bnb is not None:
        providers.append(bitsandbytes_provider(op, bnb))
    if torchao_nf4[0] is not None:
        providers.append(torchao_provider(op, *torchao_nf4[:2]))
    if op == "dequantize":
        providers += [copy_provider(), copy_provider(into_out=True)]
    return providers


# --- correctness guard ---------------------------------------------------------------

def check_against_reference(op: str, backend: str, device: str = "cpu") -> Optional[str]:
    """None if nf4lora `backend` on `device` matches the reference (on the CPU) bit for
    bit on one small layer, else what differs."""
    from nf4lora import functional as F
    weight = random_weight(GUARD_SHAPE, seed=1)
    args = dict(blocksize=BLOCKSIZE, compress_statistics=True, quant_type=QUANT_TYPE)
    with harness.using_backend("reference"):
        ref_packed, ref_state = F.quantize_4bit(weight, **args)
        ref_dequantized = F.dequantize_4bit(ref_packed, ref_state)
    with harness.using_backend(backend):
        if op == "dequantize":
            state = F.QuantState.from_dict(ref_state.as_dict(packed=True), torch.device(device))
            dequantized = F.dequantize_4bit(ref_packed.to(device), state).cpu()
            bad = int((dequantized != ref_dequantized).sum())
            return f"dequantize_4bit differs in {bad} of {weight.numel()} elements" if bad else None
        packed, state = F.quantize_4bit(weight.to(device), **args)
    if device != "cpu":
        packed, state = packed.cpu(), F.QuantState.from_dict(state.as_dict(packed=True),
                                                              torch.device("cpu"))
    pairs = {"packed codes": (packed, ref_packed), "qabsmax": (state.absmax, ref_state.absmax),
             "absmax2": (state.state2.absmax, ref_state.state2.absmax),
             "offset": (state.offset, ref_state.offset)}
    wrong = [name for name, (got, want) in pairs.items() if not torch.equal(got, want)]
    return f"quantize_4bit differs in {', '.join(wrong)}" if wrong else None


# --- bitsandbytes' CPU path ----------------------------------------------------------

def bitsandbytes_path(import_messages: list[str]) -> dict:
    """Which bitsandbytes implementation runs each op here: its native CPU library
    (a "CPU" kernel registered for the op) or the pure-PyTorch "default" kernel."""
    import bitsandbytes.cextension as ext
    from bitsandbytes.functional import has_avx512bf16
    native = getattr(getattr(ext.lib, "_lib", None), "_name", None)
    ops = {}
    for op in ("quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise"):
        has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key(f"bitsandbytes::{op}", "CPU")
        ops[op] = "cpu: native library" if has_cpu else "default: pure PyTorch"
    return {"backend": getattr(ext, "BNB_BACKEND", None), "native_library": native, "ops": ops,
            # bitsandbytes fetches a faster CPU gemm from the hub only with AVX512-BF16.
            "hub_kernel": "attempted" if has_avx512bf16() else "not attempted (no avx512_bf16)",
            "import_messages": import_messages}


# --- GPU mode (--device cuda) ----------------------------------------------------------
# The ops on CUDA tensors, for scripts/gpu_check.sh (bench_matmul uses the same helpers).
# Each provider is timed two ways over a rotation of layers whose footprint is 256 MiB,
# 4-5x the 50-60 MB L2 of an H100/H200, so every call reads its weight from HBM:
#   median_ms  CUDA events around each call, calls back to back after one warm-up pass
#              (Triton's JIT, cuBLAS heuristics, the caching allocator): the time a call
#              takes in an eager loop, what the CPU adds between launches included;
#   kernel_ms  the GPU's busy time per call, the durations of the kernels and copies the
#              calls launched (torch.profiler, CUDA activity only): the basis of GB/s and
#              of the share of the probed bandwidth (% read BW) and of the card's nominal
#              bandwidth (% HBM). At M = 1 the two differ by Python and launch overhead.

GPU_DEVICE = "cuda"
GPU_COLD_FOOTPRINT = 256 * harness.MIB
GPU_PROBE_BYTES = 2 * harness.GIB
GPU_REPS = 3
# Nominal HBM bandwidth (spec sheets), first substring of the device name that matches.
NOMINAL_HBM_BYTES_S = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                       ("H200", 4.8e12), ("A100", 2.039e12))
GPU_PROVIDERS = ("nf4lora[cuda]", "nf4lora[triton]", BASELINE, "copy-bf16")


def nominal_hbm_gbs(name: str) -> Optional[float]:
    return next((bw / 1e9 for key, bw in NOMINAL_HBM_BYTES_S if key in name), None)


def gpu_time_calls(calls, reps: int) -> list[float]:
    """Seconds per call from CUDA events, after one warm-up call of each callable."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        for call in calls:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            result = call()
            end.record()
            events.append((start, end))
            del result
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e-3 for start, end in events]


def gpu_kernel_seconds(calls) -> Optional[float]:
    """Mean GPU busy time per call: the summed durations of the kernels and copies one
    pass over `calls` launches (torch.profiler, CUDA activity); None if it cannot say."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for call in calls:
                call()
            torch.cuda.synchronize()
        total_us = sum(event.time_range.elapsed_us() for event in prof.events()
                       if event.device_type == DeviceType.CUDA)
    except Exception:   # no CUPTI, or a profiler API this torch does not have
        return None
    return total_us * 1e-6 / len(calls) if total_us > 0 else None


def probe_gpu_bandwidth(nbytes: int = GPU_PROBE_BYTES, reps: int = 10) -> dict:
    """HBM read and copy bandwidth of the current GPU, in GB/s, over buffers far larger
    than its L2 (harness.probe_bandwidth's GPU twin); plus the card's name, SMs, L2 and
    nominal bandwidth."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=GPU_DEVICE)
    dst = torch.empty_like(src)
    read_s = harness.quantiles_ms(gpu_time_calls([src.sum], reps))["median_ms"] * 1e-3
    copy_s = harness.quantiles_ms(gpu_time_calls([functools.partial(dst.copy_, src)],
                                                 reps))["median_ms"] * 1e-3
    del src, dst
    torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"bytes": nbytes, "reps": reps, "threads": torch.get_num_threads(),
            "device": props.name, "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count, "l2_bytes": getattr(props, "L2_cache_size", None),
            "read_gbs": nbytes / read_s / 1e9, "copy_gbs": 2 * nbytes / copy_s / 1e9,
            "nominal_gbs": nominal_hbm_gbs(props.name),
            "read_op": "float32 tensor.sum() on the GPU",
            "copy_op": "dst.copy_(src) on the GPU, read + write counted"}


def measure_gpu(provider: Provider, case, *, footprint: int = GPU_COLD_FOOTPRINT,
                max_reps: Optional[int] = None) -> list[dict]:
    """harness.measure_interleaved's row for one provider on CUDA tensors (see the section comment)."""
    nbytes = provider.bytes_moved(case)
    reps = min(provider.reps, max_reps) if max_reps else provider.reps
    with provider.context():
        calls = provider.setup(case, harness.layers_for(nbytes, footprint, provider.max_layers))
        times = gpu_time_calls(calls, reps)
        kernel_s = gpu_kernel_seconds(calls)
    row = {**case.labels, "provider": provider.name, "mode": "cold", "layers": len(calls),
           "footprint_bytes": nbytes * len(calls), "bytes": nbytes, **harness.quantiles_ms(times),
           "kernel_ms": None if kernel_s is None else kernel_s * 1e3}
    del calls
    gc.collect()
    torch.cuda.empty_cache()
    return [row]


def add_gpu_rates(rows: list[dict], bandwidth: dict) -> None:
    """GB/s from the kernel time (the event time where the profiler gave none), and its
    share of the probed read and copy bandwidth and of the nominal HBM bandwidth."""
    for row in rows:
        seconds = (row.get("kernel_ms") or row["median_ms"]) * 1e-3
        gbs = row["bytes"] / seconds / 1e9
        row["gbs"] = gbs
        row["pct_read_bw"] = 100 * gbs / bandwidth["read_gbs"]
        row["pct_copy_bw"] = 100 * gbs / bandwidth["copy_gbs"]
        row["pct_nominal_bw"] = (100 * gbs / bandwidth["nominal_gbs"]
                                 if bandwidth.get("nominal_gbs") else None)


def print_gpu_bandwidth(bandwidth: dict) -> None:
    nominal = bandwidth.get("nominal_gbs")
    print(f"{bandwidth['device']} (sm_{bandwidth['capability'].replace('.', '')}, "
          f"{bandwidth['sms']} SMs): read {bandwidth['read_gbs']:.0f} GB/s, copy "
          f"{bandwidth['copy_gbs']:.0f} GB/s"
          + (f", nominal {nominal:.0f} GB/s" if nominal else ""), flush=True)


def add_gpu_speedups(rows: list[dict], baseline: str, group_keys) -> None:
    """harness.add_speedups on the GPU time (kernel_ms, else median_ms)."""
    def ms(row):
        return row.get("kernel_ms") or row["median_ms"]
    base = {tuple(str(r[k]) for k in group_keys): ms(r) for r in rows if r["provider"] == baseline}
    for row in rows:
        baseline_ms = base.get(tuple(str(row[k]) for k in group_keys))
        row["x_vs_" + baseline] = baseline_ms / ms(row) if baseline_ms else None


def print_plan(device: str, ops, shapes, provider_names, notes, extra: str = "") -> dict:
    """--plan: what a run would time, without timing (scripts/gpu_check.sh --dry-run)."""
    print(f"plan: device={device} ops={' '.join(ops)} shapes="
          f"{' '.join(f'{o}x{i}' for o, i in shapes)}{extra}")
    print(f"plan: providers {', '.join(provider_names) or '(none)'}")
    for note in notes:
        print("plan: note:", note)
    return {"plan": True, "device": device, "ops": list(ops), "providers": list(provider_names),
            "notes": notes}


# --- main ----------------------------------------------------------------------------

COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("provider", "provider", ""),
           ("mode", "mode", ""), ("layers", "layers", "d"), ("median ms", "median_ms", ".3f"),
           ("GB/s", "gbs", ".2f"), ("% copy BW", "pct_copy_bw", ".1f"),
           (f"x vs {BASELINE}", f"x_vs_{BASELINE}", ".2f")]


def gpu_roofline(ops, shapes) -> list[dict]:
    """GPU speed on paper (no GPU here, nf4lora.roofline): bytes, FLOPs and ideal time on
    H100 / A100 of the codec kernels for the same shapes, the CUDA decode GEMV, and the
    Triton backend's matmul paths, printed under the CPU table."""
    from nf4lora import roofline

    rows = [roofline.kernel_roofline(f"{op}_4bit", n=math.prod(shape), dtype=DTYPE,
                                     blocksize=BLOCKSIZE)
            for op in ops for shape in shapes]
    # The CUDA decode GEMV with fused LoRA (rank 16), at the batch sizes it serves.
    rows += [roofline.kernel_roofline("gemv_4bit_lora", M=m, N=shape[0], K=shape[1], rank=16,
                                      dtype=DTYPE, blocksize=BLOCKSIZE)
             for shape in shapes for m in (1, 8)]
    print("\nGPU roofline (on paper; the same bytes bound the CUDA and Triton kernels):")
    for row in rows:
        print(roofline.format_kernel_roofline(row))
    print()
    try:  # the Triton matmul paths: their split heuristics come from the kernels (triton)
        rows += roofline.print_roofline()
    except ImportError as error:
        print(f"(Triton matmul roofline skipped: {error})")
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_codec", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, 64 MiB probe, 2 reps: a smoke run, not numbers")
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help="only these (nf4lora, nf4lora[cpu], nf4lora[reference], bitsandbytes, "
                             "torchao, copy-bf16)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    return harness.parse_kernel_bench_args(parser, argv, GPU_PROVIDERS)


GPU_COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("provider", "provider", ""),
               ("layers", "layers", "d"), ("median ms", "median_ms", ".4f"),
               ("kernel ms", "kernel_ms", ".4f"), ("GB/s", "gbs", ".0f"),
               ("% read BW", "pct_read_bw", ".1f"), ("% HBM", "pct_nominal_bw", ".1f"),
               (f"x vs {BASELINE}", f"x_vs_{BASELINE}", ".2f")]


def main_gpu(args, argv) -> dict:
    """--device cuda: main's steps on CUDA tensors (see "GPU mode")."""
    shapes = QUICK["shapes"] if args.quick else SHAPES
    if args.plan:   # every GPU provider, available here or not: nothing touches a GPU
        backends, notes = list(harness.GPU_BACKENDS), harness.nf4lora_gpu_backends()[1]
        bnb = "not imported by --plan"   # builds the provider; only its setup would use it
    else:
        backends, notes = harness.nf4lora_gpu_backends()
        bnb, bnb_messages = None, []
        if not args.providers or BASELINE in args.providers:
            bnb, why, bnb_messages = harness.import_optional("bitsandbytes.functional")
            if bnb is None:
                notes.append(f"{BASELINE}: skipped, {why}")
    providers = {op: harness.select(build_providers(op, backends, bnb, (None, None, None),
                                                    device=GPU_DEVICE), args.providers)
                 for op in args.ops}
    if args.plan:
        names = list(dict.fromkeys(p.name for op in args.ops for p in providers[op]))
        return print_plan("cuda", args.ops, shapes, names, notes)
    quantizer = Quantizer(harness.nf4lora_cpu_backends()[0], None)
    print("probing GPU memory bandwidth ...", flush=True)
    bandwidth = probe_gpu_bandwidth()
    print_gpu_bandwidth(bandwidth)
    rows = []
    for op in args.ops:
        checked, failed = harness.run_checks(providers[op])
        notes += [f"{op}: {note}" for note in failed]
        for shape in shapes:
            print(f"{op} {shape[0]}x{shape[1]}: {', '.join(p.name for p in checked)}", flush=True)
            case_rows, case_notes = harness.measure_all(
                checked, [Case(op, shape, quantizer, device=GPU_DEVICE)], measure_one=measure_gpu)
            rows += case_rows
            notes += case_notes
    add_gpu_rates(rows, bandwidth)
    add_gpu_speedups(rows, BASELINE, ["op", "shape"])
    print()
    print(harness.format_table(rows, GPU_COLUMNS))
    harness.print_notes(notes)
    return harness.save_run(
        args.out, "codec-gpu", benchmark="codec", argv=argv, device="cuda",
        metadata=harness.metadata(
            gpu=bandwidth, dequantize_inputs_from=quantizer.name,
            bitsandbytes_cuda=None if bnb is None else str(getattr(bnb, "__file__", ""))),
        config={"quick": args.quick, "providers": args.providers, "ops": args.ops,
                "shapes": [list(s) for s in shapes], "footprint_bytes": GPU_COLD_FOOTPRINT,
                "reps": GPU_REPS},
        bandwidth=bandwidth, rows=rows, notes=notes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plan and args.device == "cpu":
        return print_plan("cpu", args.ops, QUICK["shapes"] if args.quick else SHAPES,
                          args.providers or [], [])
    with harness.threads_set_to(args.threads):
        return main_gpu(args, argv) if args.device == "cuda" else main_cpu(args, argv)


def main_cpu(args, argv) -> dict:
    """main's steps on CPU tensors: providers, guard, bandwidth probe, timing, save."""
    preset = QUICK if args.quick else FULL

    def wanted(name: str) -> bool:
        return not args.providers or name in args.providers

    backends, notes = harness.nf4lora_cpu_backends()
    bnb, bnb_messages, torchao_nf4 = None, [], (None, None, None)
    if wanted(BASELINE):
        bnb, why, bnb_messages = harness.import_optional("bitsandbytes.functional")
        if bnb is None:
            notes.append(f"bitsandbytes: skipped, {why}")
    if wanted("torchao"):
        torchao_nf4 = import_torchao_nf4()
        if torchao_nf4[0] is None:
            notes.append("torchao: skipped, no to_nf4/NF4Tensor in torchao.quantization or torchao.dtypes")
    if bnb is None and "cpu" not in backends and not args.quick:
        # not timed, but it makes the dequantize inputs 15x faster than the reference
        bnb, _, bnb_messages = harness.import_optional("bitsandbytes.functional")
    quantizer = Quantizer(backends, bnb)

    print("probing memory bandwidth ...", flush=True)
    bandwidth = harness.probe_bandwidth(preset["probe_bytes"])
    print(f"read {bandwidth['read_gbs']:.1f} GB/s, copy {bandwidth['copy_gbs']:.1f} GB/s "
          f"({bandwidth['bytes'] / harness.MIB:.0f} MiB, {bandwidth['threads']} threads)", flush=True)

    rows = []
    for op in args.ops:
        providers = harness.select(build_providers(op, backends, bnb, torchao_nf4), args.providers)
        providers, failed = harness.run_checks(providers)
        notes += [f"{op}: {note}" for note in failed]
        for shape in preset["shapes"]:
            print(f"{op} {shape[0]}x{shape[1]}: {', '.join(p.name for p in providers)}", flush=True)
            case_rows, case_notes = harness.measure_all(
                providers, [Case(op, shape, quantizer)], footprint=preset["footprint"],
                max_reps=preset["max_reps"], warm=args.warm)
            rows += case_rows
            notes += case_notes

    harness.add_rates(rows, bandwidth)
    harness.add_speedups(rows, BASELINE, ["op", "shape", "mode"])
    print()
    print(harness.format_table(rows, COLUMNS))
    harness.print_notes(notes)
    roofline = gpu_roofline(args.ops, preset["shapes"])
    return harness.save_run(
        args.out, "codec", benchmark="codec", argv=argv,
        metadata=harness.metadata(
            bitsandbytes_path=bitsandbytes_path(bnb_messages) if bnb is not None else None,
            torchao_nf4_module=torchao_nf4[2], dequantize_inputs_from=quantizer.name),
        config={"quick": args.quick, "providers": args.providers, "ops": args.ops,
                "shapes": [list(s) for s in preset["shapes"]],
                "footprint_bytes": preset["footprint"], "max_reps": preset["max_reps"],
                "warm": args.warm},
        bandwidth=bandwidth, rows=rows, notes=notes, gpu_roofline=roofline)


if __name__ == "__main__":
    main()
