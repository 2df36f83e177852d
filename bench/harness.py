"""Shared benchmark machinery: timing, bandwidth probe, cold-cache rotation, metadata,
table printing and JSON saving. The rules it implements are /work/shared/perf.md.

A benchmark script describes each implementation it times as a `Provider`: a name, a
setup function that builds `n_layers` independent copies of the work and returns one
zero-argument callable per copy, and the bytes one call must move. `measure_interleaved`
then, for all the providers of one case,

  1. asks for enough layers that their footprint (bytes moved per call x layers) exceeds
     COLD_FOOTPRINT, so a call never finds its inputs in the 32 MiB L3 left by the last one;
  2. makes one warm-up call (lazy initialization, first-touch page faults of the inputs;
     kept as a sample instead if it takes many seconds and the provider allows it);
  3. calls every layer once per rep, timing each call, the providers' reps taking turns,
     and reports quantiles per call (one thread: the thread's CPU time, one_thread_clock);
  4. optionally loops one layer (cache-resident where it fits) for rows labelled "warm".

Effective bandwidth is provider bytes / median time, set against the copy bandwidth that
`probe_bandwidth` measures in the same run: ratios survive a noisy, shared machine;
absolute numbers do not.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

MIB = 1 << 20
GIB = 1 << 30
# perf.md: cold numbers rotate through layers whose total footprint exceeds 256 MB,
# 8x the 32 MiB L3 of the machines here.
COLD_FOOTPRINT = 256 * MIB
MIN_LAYERS = 2  # even a huge layer alternates with a second one
# Where every benchmark writes its JSON (and plots) unless --out says otherwise: relative,
# so it lands in the directory the command runs from, never inside the installed package
# or the checkout's bench/results (the README's committed numbers; pass --out bench/results
# to refresh those).
DEFAULT_OUT = Path("nf4lora-results")


# --- providers and timing ------------------------------------------------------------

@dataclass
class Provider:
    """One implementation to time.

    setup(case, n_layers) -> list of n_layers zero-argument callables, each running the op
        on its own, independent copy of the inputs (one "layer").
    bytes_moved(case) -> bytes one call must read plus write, the basis of its GB/s.
    reps: passes over the layer set; slow providers ask for fewer.
    max_layers: cap on the rotation, for providers so slow (100x the memory time) that
        their own temporaries flush the caches anyway; the row records the count used.
    context: entered around setup, check and timing (e.g. selecting a backend).
    check: run once before any timing; returns None if the provider's output is right,
        else the reason to skip it (so a fast but wrong kernel cannot post a number).
    warmup_is_sample_after_s: a warm-up call that takes at least this long counts as the
        first timed call instead of being thrown away: against a call of many seconds the
        first-call costs (milliseconds) vanish, and a second call would double the run.
    """
    name: str
    setup: Callable[[Any, int], list[Callable[[], Any]]]
    bytes_moved: Callable[[Any], int]
    reps: int = 5
    max_layers: Optional[int] = None
    context: Callable[[], ContextManager] = contextlib.nullcontext
    check: Optional[Callable[[], Optional[str]]] = None
    warmup_is_sample_after_s: Optional[float] = None


def time_calls(calls: Sequence[Callable[[], Any]], reps: int,
               warmup_is_sample_after_s: Optional[float] = None,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call: one warm-up call, then `reps` passes calling each callable once.

    The result of a call is kept alive until its clock stops, so freeing a large output
    (munmap) is not charged to the op. A warm-up of at least `warmup_is_sample_after_s`
    seconds is kept as the first pass's first call (see Provider). `clock`:
    time.thread_time for a one-thread run on a shared machine (CPU time of this thread,
    which runs all of a one-thread torch op: other processes on the core do not count).
    """
    start = clock()
    result = calls[0]()
    warmup = clock() - start
    del result
    times, skip = [], 0
    if warmup_is_sample_after_s is not None and warmup >= warmup_is_sample_after_s:
        times, skip = [warmup], 1
    for rep in range(reps):
        for call in calls[skip if rep == 0 else 0:]:
            start = clock()
            result = call()
            times.append(clock() - start)
            del result
    return times


def one_thread_clock() -> Callable[[], float]:
    """time.thread_time when torch runs one thread (every kernel of a one-thread op runs on
    the calling thread, and other processes on a shared core do not inflate its CPU time),
    else time.perf_counter."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def quantiles_ms(times: Sequence[float]) -> dict:
    t = torch.tensor(times, dtype=torch.float64) * 1e3
    p20, p50, p80 = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80, "min_ms": float(t.min()),
            "calls": len(times)}


def layers_for(bytes_per_call: int, footprint: int, max_layers: Optional[int] = None) -> int:
    layers = max(MIN_LAYERS, math.ceil(footprint / max(bytes_per_call, 1)))
    return min(layers, max_layers) if max_layers else layers


@contextlib.contextmanager
def gc_frozen():
    """Hide every object alive now from the garbage collector inside the block.

    The objects torch, bitsandbytes and their imports create (~400k with bitsandbytes) are
    never garbage, yet each full gc.collect() walks them: 0.2-0.4 s here, paid by
    `measure_interleaved` after every case. Frozen, a collection takes milliseconds. Enter it after the imports.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_checks(providers: Sequence[Provider]) -> tuple[list[Provider], list[str]]:
    """Providers whose check passes (or that have none), and a note for each other one."""
    passed, notes = [], []
    for provider in providers:
        try:
            with provider.context():
                why = provider.check() if provider.check else None
        except Exception as error:  # a crashing check is a failed check
            why = f"check raised {type(error).__name__}: {error}"
        if why is None:
            passed.append(provider)
        else:
            notes.append(f"{provider.name}: skipped, correctness check failed: {why}")
    return passed, notes


def _timed(call: Callable[[], Any], clock: Callable[[], float]) -> float:
    start = clock()
    result = call()
    elapsed = clock() - start
    del result  # freed after the clock stopped (see time_calls)
    return elapsed


def measure_interleaved(providers: Sequence[Provider], case: Any, *,
                        footprint: int = COLD_FOOTPRINT, max_reps: Optional[int] = None,
                        warm: bool = False) -> tuple[list[dict], list[str]]:
    """Rows for every provider of one case: "cold" (a rotation through enough layers to
    exceed `footprint`), and "warm" (one layer again and again) if asked. Their passes over
    their layers take turns (pass 1 of each, then pass 2 of each, ...), each inside its
    provider's context; `case.labels` is copied into each row.

    Measured one after the other, the providers of a case met different loads from other
    processes: on the shared 2-core machine one run's cold M = 1 rows disagreed 2x per weight
    between two shapes of the same kernel. Taking turns, a burst of load lands on all of them.
    All providers' layers are held at once (a cold footprint each)."""
    clock = one_thread_clock()
    entries, notes, rows = [], [], []
    for provider in providers:
        try:
            nbytes = provider.bytes_moved(case)
            with provider.context():
                calls = provider.setup(case, layers_for(nbytes, footprint, provider.max_layers))
                warmup = _timed(calls[0], clock)
            sample = provider.warmup_is_sample_after_s
            times = [warmup] if sample is not None and warmup >= sample else []
            reps = min(provider.reps, max_reps) if max_reps else provider.reps
            entries.append(dict(provider=provider, calls=calls, reps=reps, nbytes=nbytes,
                                cold=times, warm=[]))
        except Exception as error:
            notes.append(f"{provider.name} on {case.labels}: failed, {type(error).__name__}: {error}")
    modes = ("cold", "warm") if warm else ("cold",)
    for mode in modes:
        for rep in range(max((e["reps"] for e in entries), default=0)):
            for entry in entries:
                if rep >= entry["reps"] or entry.get("failed"):
                    continue
                layers = entry["calls"] if mode == "cold" else [entry["calls"][0]] * len(entry["calls"])
                skip = len(entry[mode]) if rep == 0 else 0   # a warm-up kept as the first sample
                try:
                    with entry["provider"].context():
                        entry[mode] += [_timed(call, clock) for call in layers[skip:]]
                except Exception as error:
                    entry["failed"] = True
                    notes.append(f"{entry['provider'].name} on {case.labels}: failed, "
                                 f"{type(error).__name__}: {error}")
    for entry in entries:
        if entry.get("failed"):
            continue
        for mode in modes:
            layers = len(entry["calls"]) if mode == "cold" else 1
            rows.append({**case.labels, "provider": entry["provider"].name, "mode": mode,
                         "layers": layers, "footprint_bytes": entry["nbytes"] * layers,
                         "bytes": entry["nbytes"], **quantiles_ms(entry[mode])})
    entries.clear()
    gc.collect()
    return rows, notes


def measure_all(providers: Sequence[Provider], cases: Sequence[Any], measure_one=None,
                **options) -> tuple[list[dict], list[str]]:
    """Every case x provider: by default `measure_interleaved` (the providers of a case take
    turns), else `measure_one` per provider; a provider that raises is noted, not fatal."""
    rows, notes = [], []
    for case in cases:
        if measure_one is None:
            case_rows, case_notes = measure_interleaved(providers, case, **options)
            rows += case_rows
            notes += case_notes
            continue
        for provider in providers:
            try:
                rows += measure_one(provider, case, **options)
            except Exception as error:
                notes.append(f"{provider.name} on {case.labels}: failed, "
                             f"{type(error).__name__}: {error}")
                gc.collect()
    return rows, notes


def add_rates(rows: list[dict], bandwidth: dict) -> None:
    """GB/s from bytes and median time, and its share of the probed bandwidths."""
    for row in rows:
        gbs = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
        row["gbs"] = gbs
        row["pct_copy_bw"] = 100 * gbs / bandwidth["copy_gbs"]
        row["pct_read_bw"] = 100 * gbs / bandwidth["read_gbs"]


def add_tflops(rows: list[dict]) -> None:
    """row["tflops"] = row["flops"] / median time, for rows that count their FLOPs."""
    for row in rows:
        flops = row.get("flops")
        row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12 if flops else None


def add_speedups(rows: list[dict], baseline: str, group_keys: Sequence[str]) -> None:
    """row["x_vs_<baseline>"] = baseline median / row median, within rows equal on group_keys."""
    key = "x_vs_" + baseline
    base = {tuple(str(r[k]) for k in group_keys): r["median_ms"]
            for r in rows if r["provider"] == baseline}
    for row in rows:
        ms = base.get(tuple(str(row[k]) for k in group_keys))
        row[key] = ms / row["median_ms"] if ms is not None else None


# --- memory bandwidth ----------------------------------------------------------------

def probe_bandwidth(nbytes: int = GIB, reps: int = 5) -> dict:
    """Streaming read and copy bandwidth over buffers far larger than the L3, in GB/s.

    read: float32 `sum` over nbytes (it keeps up with memory on AVX2);
    copy: `dst.copy_(src)` of nbytes, counted as nbytes read + nbytes written.
    Both buffers are written before timing, so no page is faulted in while timed.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)
    read_s = quantiles_ms(time_calls([src.sum], reps))["median_ms"] * 1e-3
    copy_s = quantiles_ms(time_calls([lambda: dst.copy_(src)], reps))["median_ms"] * 1e-3
    del src, dst
    gc.collect()
    return {"bytes": nbytes, "reps": reps, "threads": torch.get_num_threads(),
            "read_gbs": nbytes / read_s / 1e9, "copy_gbs": 2 * nbytes / copy_s / 1e9,
            "read_op": "float32 tensor.sum()", "copy_op": "dst.copy_(src), read + write counted"}


# --- optional imports and nf4lora backends --------------------------------------------

def import_optional(name: str) -> tuple[Any, Optional[str], list[str]]:
    """(module or None, why not, the package's own warnings and log records while importing)."""
    package = name.split(".")[0]
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            if record.name.startswith(package):
                messages.append(f"{record.name}: {record.getMessage()}")

    handler = _Collect(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(name)
        # not, say, the torch deprecation warnings the import triggers
        messages += [f"{w.category.__name__}: {w.message}" for w in caught if package in w.filename]
        return module, None, messages
    except Exception as error:  # any failure to import means: skip this provider
        return None, f"import {name} failed: {type(error).__name__}: {error}", messages
    finally:
        root.removeHandler(handler)


def import_first(modules: Sequence[str], names: Sequence[str]) -> tuple[Any, Optional[str]]:
    """(the first of `modules` that imports and defines every one of `names`, its name),
    or (None, None): for APIs whose home moved between releases (torchao's NF4)."""
    for where in modules:
        module, _, _ = import_optional(where)
        if module is not None and all(hasattr(module, name) for name in names):
            return module, where
    return None, None


def copy_nf4tensor(tensor):
    """An independent copy of a torchao NF4Tensor (a layer for the rotation).
    NF4Tensor.clone() re-quantizes (seconds for 4096x4096); copying the inner tensors does not."""
    names, meta = tensor.__tensor_flatten__()
    inner = {name: getattr(tensor, name).clone() for name in names}
    return type(tensor).__tensor_unflatten__(inner, meta, tensor.size(), tensor.stride())


def cpu_mhz() -> Optional[float]:
    """The first "cpu MHz" of /proc/cpuinfo (the nominal TSC rate on these VMs), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


@contextlib.contextmanager
def environment_variable(name: str, value: str):
    """os.environ[name] = value inside the block, then as it was (unset if it was)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def threads_set_to(threads: Optional[int]):
    """Run the block on `threads` threads (None: as they are), then restore the count.

    torch's pool takes set_num_threads; other OpenMP runtimes (bitsandbytes links the
    system libgomp) read OMP_NUM_THREADS when they first start threads, so it is set too.
    """
    if not threads:
        yield
        return
    torch_threads = torch.get_num_threads()
    with environment_variable("OMP_NUM_THREADS", str(threads)):
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(torch_threads)


@contextlib.contextmanager
def using_backend(name: str):
    """Force nf4lora backend `name` inside the block, then restore the previous choice."""
    import nf4lora
    previous = nf4lora.get_backend()
    nf4lora.set_backend(name)
    try:
        yield
    finally:
        try:
            nf4lora.set_backend(previous)
        except RuntimeError:  # the previous choice came from an unusable NF4LORA_BACKEND
            nf4lora.set_backend(None)


def spec_weights(model, dtype):
    """(name, Linear4bit, W) for every nf4lora Linear4bit of `model`, W its weight decoded by
    nf4lora.reference (the spec) in `dtype`: what the 4-bit layers compute, in plain torch
    ops, for the benchmarks' correctness references."""
    import nf4lora
    with using_backend("reference"), torch.no_grad():
        return [(name, module, module.dequantized_weight(dtype))
                for name, module in model.named_modules()
                if isinstance(module, nf4lora.nn.Linear4bit)]


GPU_BACKENDS = ("cuda", "triton")


def _usable_backends(names, why_not_here: Callable[[str], Optional[str]]):
    """(the nf4lora backends of `names` that are available and that why_not_here(name)
    does not rule out, a note on each of the others)."""
    from nf4lora import backends
    usable, notes = [], []
    for name in names:
        why = backends.availability(name) or why_not_here(name)
        if why is None:
            usable.append(name)
        else:
            notes.append(f"nf4lora[{name}]: skipped, {why}")
    return usable, notes


def nf4lora_cpu_backends() -> tuple[list[str], list[str]]:
    """(backends that can run on CPU tensors here, notes on the others).

    Triton on CPU runs only under its interpreter, which is a test vehicle, not a
    performance path; GPU backends are timed by the benchmarks' --device cuda.
    """
    nf4lora, reason, _ = import_optional("nf4lora")
    if nf4lora is None:
        return [], [f"nf4lora: skipped, {reason}"]

    def why_not_on_cpu(name: str) -> Optional[str]:
        if name in GPU_BACKENDS:
            return "a GPU backend; this benchmark runs on CPU tensors"
        if "cpu" not in importlib.import_module(f"nf4lora.backends.{name}").DEVICE_TYPES:
            return "does not run on CPU tensors"
        return None
    from nf4lora import backends
    return _usable_backends(backends.BACKENDS, why_not_on_cpu)


def nf4lora_gpu_backends() -> tuple[list[str], list[str]]:
    """(nf4lora backends that run on CUDA tensors here, notes on the others)."""
    if not torch.cuda.is_available():
        return [], [f"{', '.join(f'nf4lora[{name}]' for name in GPU_BACKENDS)}: skipped, "
                    "no CUDA device"]
    from nf4lora.backends import triton as triton_backend

    def why_not_on_gpu(name: str) -> Optional[str]:
        if name == "triton" and triton_backend.INTERPRETING:
            return "TRITON_INTERPRET=1: the interpreter, not the GPU"
        return None
    return _usable_backends(GPU_BACKENDS, why_not_on_gpu)


def add_threads_flag(parser) -> None:
    parser.add_argument("--threads", type=int,
                        help="torch threads and OMP_NUM_THREADS (default: as they are)")


def add_out_flag(parser, saves: str = "JSON") -> None:
    """--out, where the benchmark saves its `saves` (DEFAULT_OUT unless given)."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"{saves} directory (default ./{DEFAULT_OUT})")


def add_device_flags(parser, gpu_rows: str, plans: str) -> None:
    """--device cpu|cuda (cuda: `gpu_rows` run on CUDA tensors) and --plan (print `plans`,
    what a run would time, then exit: gpu_check.sh --dry-run's check)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help=f"cuda: {gpu_rows}")
    parser.add_argument("--plan", action="store_true",
                        help=f"print {plans} a run would time, then exit")


def check_gpu_providers(parser, args, known: Sequence[str]) -> None:
    """--device cuda: every --providers name must select one of `known` (a typo would
    otherwise time nothing, silently)."""
    unknown = [name for name in args.providers or ()
               if not select([Provider(k, None, None) for k in known], [name])]
    if unknown:
        parser.error(f"--device cuda: unknown provider(s) {unknown}; choose from {list(known)}")


def parse_kernel_bench_args(parser, argv, gpu_providers: Sequence[str], *, saves: str = "JSON",
                            on_gpu: str = "", plans: str = "shapes"):
    """Add the flags of the kernel benchmarks (bench_codec, bench_matmul), --threads,
    --warm, --out, --device and --plan, to their own; parse argv; check --providers
    (check_gpu_providers) for --device cuda. The help says what --out receives (`saves`),
    what else --device cuda changes (`on_gpu`) and what --plan lists (`plans`)."""
    add_threads_flag(parser)
    parser.add_argument("--warm", action="store_true", help="also time one layer looped (warm rows)")
    add_out_flag(parser, saves)
    add_device_flags(parser, f"the GPU rows ({', '.join(gpu_providers)}){on_gpu}",
                     f"the providers and {plans}")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        check_gpu_providers(parser, args, gpu_providers)
    return args


def select(providers: list[Provider], wanted: Optional[Sequence[str]]) -> list[Provider]:
    """Providers named in `wanted`; "nf4lora" selects every nf4lora[<backend>], and a name
    selects its variants too ("copy-bf16" also picks "copy-bf16 out=")."""
    if not wanted:
        return providers
    return [p for p in providers
            if any(p.name == w or p.name.startswith((w + "[", w + " ")) for w in wanted)]


# --- metadata ------------------------------------------------------------------------

CPU_FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "f16c", "amx", "avx512", "avx_vnni")


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    l3 = None
    with contextlib.suppress(OSError), open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
        l3 = f.read().strip()
    thp = None
    with contextlib.suppress(OSError), open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()
    return {"model": model, "logical_cpus": os.cpu_count(), "l3": l3,
            "flags": sorted(f for f in flags if f.startswith(CPU_FLAGS_OF_INTEREST)),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "transparent_hugepage": thp}


def package_versions(names: Sequence[str]) -> dict:
    """Installed versions, read from package metadata (no import); None if absent."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def nf4lora_info() -> dict:
    """nf4lora's version, and its C++ extension's ISA path if the extension is built."""
    info = {"version": None, "cpu_isa": None}
    nf4lora, reason, _ = import_optional("nf4lora")
    if nf4lora is None:
        info["error"] = reason
        return info
    info["version"] = getattr(nf4lora, "__version__", None)
    ext, reason, _ = import_optional("nf4lora._C")
    if ext is None:
        info["cpu_isa"] = f"no extension ({reason})"
    elif hasattr(ext, "isa"):
        info["cpu_isa"] = ext.isa()
    return info


def git_revision(path: Path) -> Optional[str]:
    """HEAD's sha, with "-dirty" when tracked files differ from it; None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def metadata(**extra) -> dict:
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "THP_MEM_ALLOC_ENABLE",
                                                "NF4LORA_BACKEND", "TRITON_INTERPRET")},
        "python": platform.python_version(),
        "versions": package_versions(["torch", "triton", "bitsandbytes", "torchao"]),
        "nf4lora": nf4lora_info(),
        "cuda_available": torch.cuda.is_available(),
        "git_sha": git_revision(Path(__file__).resolve().parent),
        **extra,
    }


# --- output --------------------------------------------------------------------------

def format_table(rows: list[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (header, row key, format spec); a missing or None value prints as "-"."""
    def cell(row, key, spec):
        value = row.get(key)
        if isinstance(value, (list, tuple)):  # a shape
            return "x".join(map(str, value))
        return "-" if value is None else format(value, spec)

    cells = [[header for header, _, _ in columns]]
    cells += [[cell(row, key, spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(w) if i else text.ljust(w) for i, (text, w) in
                       enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_json(payload: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write <name>-<timestamp>.json and <name>-latest.json into out_dir, say where (as
    absolute paths: a relative default is easy to lose) and return both paths."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1, default=str) + "\n"
    stamped = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    latest = out_dir / f"{name}-latest.json"
    stamped.write_text(text)
    latest.write_text(text)
    print(f"saved {stamped} and {latest.name}")
    return stamped, latest


def command_line(argv: Optional[Sequence[str]]) -> list[str]:
    """The arguments a benchmark's main(argv) ran with: argv, else the process's own."""
    return sys.argv[1:] if argv is None else list(argv)


def print_notes(notes: Sequence[str]) -> None:
    for note in notes:
        print("note:", note)


def save_run(out_dir: Path, file_name: str, *, benchmark: str, metadata: dict, config: dict,
             argv: Optional[Sequence[str]], **results) -> dict:
    """Save and return a run's payload, the one shape every benchmark writes:
    {"benchmark", "metadata", "config" (with "argv": command_line(argv)), **results},
    as <file_name>-<time>.json and <file_name>-latest.json (save_json)."""
    payload = {"benchmark": benchmark, "metadata": metadata,
               "config": {**config, "argv": command_line(argv)}, **results}
    save_json(payload, out_dir, file_name)
    return payload


def print_and_save_table(args, argv, file_name: str, benchmark: str, heading: str,
                         rows: list[dict], columns) -> dict:
    """The tail of a one-table benchmark: the heading with this CPU's model, the table, then
    save_run with every parsed option but --out as the config."""
    print(f"{heading}; CPU: {cpu_info()['model']}")
    print(format_table(rows, columns))
    config = {k: v for k, v in vars(args).items() if k != "out"}
    return save_run(args.out, file_name, benchmark=benchmark, metadata=metadata(), config=config,
                    argv=argv, rows=rows)


def add_gpu_ratios(rows: list[dict], name: str, baseline_of) -> None:
    """row[name] = the row's median_ms over that of its baseline row (baseline_of(row): a
    row of `rows`, or None), and row["kernel_" + name] the same for the profiler's
    kernel_ms; None where a side is missing. The GPU benchmarks' ratios within a backend."""
    for row in rows:
        base = baseline_of(row)
        row[name] = row["median_ms"] / base["median_ms"] if base else None
        row["kernel_" + name] = (row["kernel_ms"] / base["kernel_ms"]
                                 if base and row.get("kernel_ms") and base.get("kernel_ms") else None)


def print_and_save_gpu_table(args, argv, file_name: str, benchmark: str, heading: str,
                             rows: list[dict], columns, notes: Sequence[str]) -> dict:
    """print_and_save_table for a GPU run: the heading with the GPU's name, the notes, and
    the payload marked device "cuda" with the notes."""
    import torch
    print(f"{heading}; GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(format_table(rows, columns))
    print_notes(notes)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    return save_run(args.out, file_name, benchmark=benchmark, device="cuda", metadata=metadata(),
                    config=config, argv=argv, rows=rows, notes=list(notes))


def load_average() -> Optional[list[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none): other jobs on a
    shared machine distort timings, and the JSON says how busy it was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def bitsandbytes_4bit(model, bnb, compute_dtype, blocksize: int = 64):
    """`model` with every nn.Linear but lm_head replaced by bitsandbytes' Linear4bit (NF4,
    double quantization), quantized on CPU (bitsandbytes >= 0.46 does that), in place:
    what transformers' BitsAndBytesConfig loading builds, flagged as it flags it."""
    from torch import nn
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.split(".")[-1] == "lm_head":
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=blocksize,
                                         compress_statistics=True, quant_type="nf4", module=layer)
        if module.bias is not None:
            layer.bias = module.bias
        layer = layer.to("cpu")                  # quantizes
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.is_loaded_in_4bit = True
    return model


# --- whole-model benchmarks (bench_decode, bench_train) ----------------------------

@dataclass
class ModelProvider:
    """One way to run the benchmark's model: `build(base, modules)` returns the model to
    time from the benchmark's base model (or a function copying it) and the imported
    modules it `needs` (import_providers)."""
    name: str
    how: str                                   # one line: what the user calls
    needs: tuple[str, ...]
    build: Callable[[Any, dict], Any]


def add_model_bench_flags(parser, providers: Sequence[str], model_flags: Sequence[tuple[str, str]],
                          default_model: dict) -> None:
    """The flags of the whole-model benchmarks: --threads, --providers (some of
    `providers`), --out, and one integer flag per (flag, model config key) of model_flags,
    e.g. ("--hidden", "hidden_size"), whose default is default_model's (model_from_args)."""
    add_threads_flag(parser)
    parser.add_argument("--providers", nargs="+", metavar="NAME", choices=providers,
                        help=f"only these ({', '.join(providers)})")
    add_out_flag(parser)
    for flag, key in model_flags:
        parser.add_argument(flag, type=int, dest=key,
                            help=f"model {key} (default {default_model[key]})")


def defaults_from_preset(args, preset: dict, keys: Sequence[str]) -> None:
    """args.<key> = preset[key] for each of `keys` the command line left unset (None)."""
    for key in keys:
        if getattr(args, key, None) is None:
            setattr(args, key, preset[key])


def model_from_args(args, flags: Sequence[tuple[str, str]], preset_model: dict) -> dict:
    """preset_model with the model flags (add_model_bench_flags) that were given."""
    model = dict(preset_model)
    for _, key in flags:
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    return model


def import_providers(providers, always: tuple = ("transformers",)):
    """Import what each provider needs (`import_optional`); a provider whose import fails
    becomes a note, never a crash. Returns (runnable providers, modules by name, notes,
    the messages each module printed while importing)."""
    mods, messages, runnable, notes = {}, {}, [], []
    base_missing = None
    for name in always:
        module, reason, printed = import_optional(name)
        if module is None:
            base_missing = base_missing or reason
        else:
            mods[name], messages[name] = module, printed
    for provider in providers:
        missing = base_missing
        for name in provider.needs:
            if missing:
                break
            if name not in mods:
                module, reason, printed = import_optional(name)
                if module is None:
                    missing = reason
                else:
                    mods[name], messages[name] = module, printed
        if missing:
            notes.append(f"{provider.name}: skipped, {missing}")
        else:
            runnable.append(provider)
    return runnable, mods, notes, messages
