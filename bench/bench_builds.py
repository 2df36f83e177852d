"""A/B the CPU extension of several builds of nf4lora in one process: the fused matmul
(`_C.lora_gemv_4bit`, the op behind decode and small batches) of each build on the same
weights and activations, the builds' passes taking turns (harness.measure_interleaved), and
each build's output compared with the first build's, bit for bit.

Why one process: a kernel change moves a few percent, less than a shared 2-core VM drifts
between two runs (10-15% on the Zen 1 VMs of this project). Taking turns in one process,
the drift lands on every build alike; this is how the README's "in one process against the
old build" numbers are measured.

Builds (positional; the first is the baseline of the ratios and of the byte comparison):
  REV        a git revision of this checkout (sha, branch, HEAD~1, ...), built once and
             kept in ~/.cache/nf4lora/builds/<sha> (NF4LORA_BUILD_CACHE moves it)
  .          the working tree as it is, uncommitted edits and new files included (rebuilt
             on every run, into <cache>/worktree)
  installed  the nf4lora._C this Python imports (no build)
A build is the CPU extension alone (NF4LORA_SKIP_CUDA_BUILD=1, ~2 min on a 2-core Zen 1),
its module renamed (`rename_module`) so that several load side by side. Every build is
called with this checkout's PackedWeight; a revision whose binding reads other fields fails
with a note. The interleaved copy (--layout copy, what an eval-mode Linear4bit reads) is
made by each build's own `interleave_4bit`. TSC/32w: a call's wall time in TSC ticks (the
"cpu MHz" of /proc/cpuinfo) per 32 weights of W.

    python -m bench.bench_builds HEAD~1 . [--shapes 4096x4096] [--tokens 1 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import nf4lora.functional as nf
from nf4lora._weight import PackedWeight

from . import harness

REPO = Path(__file__).resolve().parent.parent
WORKTREE, INSTALLED = ".", "installed"
# Where a build names its module: each text must occur exactly once (tests check it).
MODULE_ANCHORS = (("csrc/bindings.cpp", "PYBIND11_MODULE(_C,", "PYBIND11_MODULE({name},"),
                  ("setup.py", '"nf4lora._C",', '"nf4lora.{name}",'))

COLUMNS = [("shape", "shape", "s"), ("M", "tokens", "d"), ("layout", "layout", "s"),
           ("build", "provider", "s"), ("mode", "mode", "s"), ("median ms", "median_ms", ".4f"),
           ("p20", "p20_ms", ".4f"), ("p80", "p80_ms", ".4f"), ("TSC/32w", "tsc_per_32w", ".2f"),
           ("time vs first", "time_vs_first", ".3f"), ("bytes", "same_bytes", "s")]


def cache_dir() -> Path:
    return Path(os.environ.get("NF4LORA_BUILD_CACHE", Path.home() / ".cache" / "nf4lora" / "builds"))


def rename_module(source: Path, name: str) -> None:
    """Make the extension under `source` build as nf4lora.<name> (MODULE_ANCHORS)."""
    for path, anchor, renamed in MODULE_ANCHORS:
        file = source / path
        text = file.read_text()
        if text.count(anchor) != 1:
            raise RuntimeError(f"{path}: expected {anchor!r} once, found it {text.count(anchor)} times "
                               "(bench_builds.MODULE_ANCHORS is out of date)")
        file.write_text(text.replace(anchor, renamed.format(name=name)))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


def _export(build: str, into: Path) -> None:
    """The sources of `build` (a revision, or the working tree) into `into`."""
    if build == WORKTREE:
        for path in _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
            if path and (REPO / path).is_file():
                (into / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / path, into / path)
        return
    archive = subprocess.run(["git", "archive", build], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def build_module(build: str):
    """The extension module of `build` (see the module docstring), built if needed."""
    if build == INSTALLED:
        from nf4lora import _C
        return _C
    sha = "worktree" if build == WORKTREE else _git("rev-parse", "--verify", build + "^{commit}").strip()
    target = cache_dir() / sha
    name = "_C_ab_" + hashlib.sha1(sha.encode()).hexdigest()[:10]
    found = sorted(target.glob(name + "*.so")) if build != WORKTREE and target.is_dir() else []
    if not found:
        with tempfile.TemporaryDirectory(prefix="nf4lora-build-") as tmp:
            source = Path(tmp)
            _export(build, source)
            rename_module(source, name)
            print(f"building {build} ({sha[:12]}) ...", flush=True)
            done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace",
                                   "-j", str(os.cpu_count() or 1)], cwd=source, capture_output=True,
                                  text=True, env={**os.environ, "NF4LORA_SKIP_CUDA_BUILD": "1"})
            if done.returncode != 0:
                raise RuntimeError(f"building {build} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
            shutil.rmtree(target, ignore_errors=True)   # (the working tree's last build)
            target.mkdir(parents=True)
            for so in (source / "nf4lora").glob(name + "*.so"):
                shutil.copy2(so, target / so.name)
            found = sorted(target.glob(name + "*.so"))
    spec = importlib.util.spec_from_file_location("nf4lora." + name, found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Case:
    shape: tuple[int, int]
    tokens: int
    layout: str            # "copy" (the interleaved copy) or "row" (the bitsandbytes bytes)
    dtype: torch.dtype
    rank: int

    @property
    def labels(self) -> dict:
        return {"shape": "x".join(map(str, self.shape)), "tokens": self.tokens, "layout": self.layout}


_weights: dict = {}   # (shape, layer) -> PackedWeight, shared by every build; one shape at a time


def packed_weight(shape: tuple[int, int], layer: int) -> PackedWeight:
    """NF4, double quantization, blocksize 64, of a seeded random normal W."""
    key = (shape, layer)
    if key not in _weights:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(layer))
        packed, state = nf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        _weights[key] = PackedWeight.from_state(packed, state).with_offset_read()
    return _weights[key]


def operands(case: Case) -> dict:
    """x and the LoRA factors (None at rank 0) of a case, the same for every build (seeded)."""
    (N, K), M, r = case.shape, case.tokens, case.rank
    gen = torch.Generator().manual_seed(1)
    return {"x": torch.randn(M, K, generator=gen).to(case.dtype),
            "lora_A": (torch.randn(r, K, generator=gen) * K ** -0.5).to(case.dtype) if r else None,
            "lora_B": torch.randn(N, r, generator=gen).to(case.dtype) if r else None}


def call_of(module, case: Case, weight: PackedWeight, ops: dict):
    """One call of the build's fused matmul on `weight`; returns (y, h)."""
    (N, _), M = case.shape, case.tokens
    y = torch.empty(M, N, dtype=case.dtype)
    h = torch.empty(M, case.rank, dtype=case.dtype)

    def call():
        module.lora_gemv_4bit(ops["x"], weight, ops["lora_A"], ops["lora_B"], 0.5, None, y, h)
        return y, h
    return call


def with_layout(module, weight: PackedWeight, layout: str) -> PackedWeight:
    if layout == "row":
        return weight
    N, K = weight.out_features, weight.in_features
    if not module.interleavable(K, weight.blocksize):
        raise ValueError(f"{N}x{K}: no interleaved copy (K and the blocksize must be multiples of 64)")
    copy = torch.empty(module.interleaved_bytes(N, K), dtype=torch.uint8)
    module.interleave_4bit(weight, copy)
    return weight._replace(interleaved=copy)


def provider_of(name: str, module, reps: int) -> harness.Provider:
    def setup(case: Case, n_layers: int):
        ops = operands(case)
        return [call_of(module, case, with_layout(module, packed_weight(case.shape, i), case.layout), ops)
                for i in range(n_layers)]

    def bytes_moved(case: Case) -> int:
        N, K = case.shape
        return N * K // 2 + N * K // 64 + case.tokens * (N + K) * case.dtype.itemsize
    return harness.Provider(name, setup, bytes_moved, reps=reps)


def compare(case: Case, modules: dict) -> dict:
    """Per build: "same" when its y and h equal the first build's bit for bit, else the
    largest |difference| of y."""
    ops, outputs = operands(case), {}
    for name, module in modules.items():
        y, h = call_of(module, case, with_layout(module, packed_weight(case.shape, 0), case.layout), ops)()
        outputs[name] = (y.clone(), h.clone())
    first_y, first_h = next(iter(outputs.values()))
    return {name: "same" if torch.equal(y, first_y) and torch.equal(h, first_h)
            else f"max|d| {(y.double() - first_y.double()).abs().max().item():.3g}"
            for name, (y, h) in outputs.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_builds",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", help="git revisions, '.' (the working tree), 'installed'")
    parser.add_argument("--shapes", nargs="+", default=["4096x4096"], help="OUTxIN (default 4096x4096)")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4], help="rows of x (default 1 4)")
    parser.add_argument("--layout", nargs="+", choices=("copy", "row"), default=["copy"],
                        help="copy: the interleaved copy (eval Linear4bit); row: the bitsandbytes bytes")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--rank", type=int, default=0, help="LoRA rank (0: none)")
    parser.add_argument("--reps", type=int, default=9, help="passes over each build's layers")
    parser.add_argument("--quick", action="store_true", help="256x512, M = 1, 8 MiB rotation, 2 reps")
    harness.add_threads_flag(parser)
    parser.add_argument("--warm", action="store_true", help="also time one layer looped (warm rows)")
    harness.add_out_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens, args.reps = ["256x512"], [1], min(args.reps, 2)
    footprint = 8 * harness.MIB if args.quick else harness.COLD_FOOTPRINT
    names = [f"{i}:{build}" for i, build in enumerate(args.builds)]
    modules = {name: build_module(build) for name, build in zip(names, args.builds)}
    dtype = getattr(torch, args.dtype)
    cases = [Case(tuple(int(v) for v in shape.lower().split("x")), M, layout, dtype, args.rank)
             for shape in args.shapes for M in args.tokens for layout in args.layout]
    rows, notes = [], []
    with harness.threads_set_to(args.threads), torch.no_grad():
        for module in modules.values():
            module.set_num_threads(args.threads or 0)
        providers = [provider_of(name, module, args.reps) for name, module in modules.items()]
        with harness.gc_frozen():
            for case in cases:
                if any(shape != case.shape for shape, _ in _weights):
                    _weights.clear()   # (the cases go shape by shape: hold one shape's layers)
                try:
                    same = compare(case, modules)
                except Exception as error:   # a build that cannot run this case
                    notes.append(f"{case.labels}: {type(error).__name__}: {error}")
                    continue
                case_rows, case_notes = harness.measure_interleaved(providers, case, footprint=footprint,
                                                                    warm=args.warm)
                notes += case_notes
                for row in case_rows:
                    row["same_bytes"] = same[row["provider"]]
                rows += case_rows
        for module in modules.values():
            module.set_num_threads(0)
    _weights.clear()
    hz = (harness.cpu_mhz() or 0) * 1e6
    first = {(r["shape"], r["tokens"], r["layout"], r["mode"]): r["median_ms"]
             for r in rows if r["provider"] == names[0]}
    for row in rows:
        N, K = map(int, row["shape"].split("x"))
        row["tsc_per_32w"] = row["median_ms"] * 1e-3 * hz / (N * K / 32) if hz else None
        base = first.get((row["shape"], row["tokens"], row["layout"], row["mode"]))
        row["time_vs_first"] = row["median_ms"] / base if base else None   # (None: the first failed)
    harness.print_notes(notes)
    heading = (f"fused matmul of {len(names)} builds in one process, {args.dtype} x, rank {args.rank}, "
               f"{torch.get_num_threads() if args.threads is None else args.threads} thread(s), "
               f"load average {harness.load_average()}")
    return harness.print_and_save_table(args, argv, "builds", "builds", heading, rows, COLUMNS)


if __name__ == "__main__":
    main()
