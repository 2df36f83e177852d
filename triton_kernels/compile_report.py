"""Compile every Triton kernel for each GPU arch without a GPU, and report its resources.

    python -m nf4lora.triton_kernels.compile_report [--arch 80 --arch 90] [--jobs N]

For each kernel registered in `nf4lora.triton_kernels.KERNELS`, each configuration its
launcher can choose (constexprs, argument dtypes, num_warps), each size specialization
and each arch, the kernel goes through `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`, which needs no driver, and yields one row:
kernel, arch, config, registers, spills, shared_bytes (plus fma and ftz, below).

How the numbers are read in triton 3.9 without a GPU:
  * `CompiledKernel.n_regs` / `n_spills` only exist after `_init_handles()` loads the
    cubin through the CUDA driver, so they cannot be read here.
  * registers and spills come from `cuobjdump --dump-resource-usage` on the very cubin
    Triton built (the cuobjdump bundled with Triton, else the one on PATH): "REG" is
    the register count; spills is (STACK + LOCAL) / 4, per-thread local memory in 32-bit
    words, the unit of the driver's `n_spills` (CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4).
    REG equals what `ptxas -v` prints for the same PTX with Triton's flags (checked for
    sm_80 with the bundled CUDA 12.9 ptxas and sm_90 with its ptxas-blackwell 13.x);
    re-running ptxas costs 0.2-0.45 s per kernel, cuobjdump 0.01 s.
  * shared_bytes is `compiled.metadata.shared`, Triton's shared-memory allocation.
  * fma / ftz count `fma.` and `.ftz` instructions in the PTX: the codec kernels must
    have neither (a fused multiply-add or a flushed denormal breaks bit-exactness).

Specializations: Triton also compiles per argument property. Pointers are taken 16-byte
aligned (torch's allocator returns 256-byte-aligned storage, so contiguous tensors it
made are). Integer sizes divisible by 16 or not is a second variant (it decides whether
masked loads/stores can be vectorized): listed with --all-sizes / all_sizes=True. An
integer argument equal to 1 becomes a constant in Triton 3.9 (n == 1); that variant only
removes code and is not listed.

Compiling takes about 1 s per variant, so variants are spread over `jobs` subprocesses
(default: one per CPU). A process running Triton's interpreter (TRITON_INTERPRET=1) has
interpreter kernels, which cannot be compiled; there the work always goes to
subprocesses with the variable unset.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ARCHS = (80, 90)
# Size-argument specializations: (label, sizes divisible by 16). The report compiles the
# first (every weight shape in practice: out * in is a multiple of 16) unless asked for
# all. Last checked, the second had no spills except quantize_blockwise bs=32 with
# fp16/bf16 input on sm_80: 8 bytes (one STL/LDL pair per thread), ptxas's choice at
# 40 registers, not register pressure.
SIZE_SPECIALIZATIONS = (("n%16=0", True), ("n%16!=0", False))
# Launch options, not constexprs: they go to triton.compile's options, not the signature.
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
_RESOURCE_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")
_FMA = re.compile(r"^\s*(@%p\d+\s+)?fma\.", re.MULTILINE)
_FTZ = re.compile(r"\.ftz\b")
COLUMNS = ("kernel", "arch", "config", "registers", "spills", "shared_bytes", "fma", "ftz")


def _tasks(archs, all_sizes: bool):
    """Every (kernel entry, label, signature, config, sizes divisible, arch), in order."""
    from . import KERNELS
    sizes = SIZE_SPECIALIZATIONS if all_sizes else SIZE_SPECIALIZATIONS[:1]
    return [(entry, label, signature, config, divisible, size_label, arch)
            for entry in KERNELS
            for label, signature, config in entry.targets()
            for size_label, divisible in sizes
            for arch in archs]


def _divisibility_attrs(kernel, signature: dict, sizes_divisible: bool) -> dict:
    """The `tt.divisibility` hints Triton's launcher would attach (see module doc)."""
    attrs = {}
    for index, param in enumerate(kernel.params):
        kind = signature.get(param.name, "constexpr")
        if isinstance(kind, tuple):  # float scalars (the encoder's thresholds): no hints
            continue
        pointer = kind.startswith("*")
        size = kind in ("i32", "i64") and sizes_divisible and not param.do_not_specialize
        if pointer or size:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def compile_variant(kernel, signature: dict, config: dict, arch: int,
                    sizes_divisible: bool = True):
    """triton.compile one configuration of `kernel` for sm_<arch>; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget

    constexprs = {name: value for name, value in config.items() if name not in _LAUNCH_OPTIONS}
    options = {name: value for name, value in config.items() if name in _LAUNCH_OPTIONS}
    source = triton.compiler.ASTSource(
        kernel, signature={**signature, **{name: "constexpr" for name in constexprs}},
        constexprs=constexprs, attrs=_divisibility_attrs(kernel, signature, sizes_divisible))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _cuobjdump() -> str:
    try:
        from triton import knobs
        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:  # a triton without the NVIDIA backend's bundled binaries
        pass
    path = shutil.which("cuobjdump")
    if path is None:
        raise RuntimeError("cuobjdump not found (bundled with triton's NVIDIA backend, or "
                           "in the CUDA toolkit's bin)")
    return path


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spilled 32-bit words per thread) of a single-kernel cubin."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    match = _RESOURCE_USAGE.search(dump)
    if match is None:
        raise RuntimeError(f"could not parse cuobjdump --dump-resource-usage:\n{dump}")
    registers, stack, local = (int(group) for group in match.groups())
    return registers, (stack + local) // 4


def _row(task) -> dict:
    entry, label, signature, config, divisible, size_label, arch = task
    compiled = compile_variant(entry.kernel, signature, config, arch, divisible)
    registers, spills = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return dict(kernel=entry.name, arch=f"sm_{arch}", config=f"{label} {size_label}",
                registers=registers, spills=spills, shared_bytes=compiled.metadata.shared,
                fma=len(_FMA.findall(ptx)), ftz=len(_FTZ.findall(ptx)))


def _interpreting() -> bool:
    from .codec import INTERPRETING
    return bool(INTERPRETING)


def _rows_from_subprocesses(archs, jobs: int, all_sizes: bool) -> list[dict]:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    environment.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", __name__, "--json", "--jobs", "1", "--shards", str(jobs)]
    for arch in archs:
        command += ["--arch", str(arch)]
    if all_sizes:
        command.append("--all-sizes")
    workers = [subprocess.Popen(command + ["--shard", str(shard)], env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for shard in range(jobs)]
    indexed_rows = []
    for worker in workers:
        stdout, stderr = worker.communicate()
        if worker.returncode != 0:
            raise RuntimeError(f"compile worker failed ({' '.join(worker.args)}):\n{stderr}")
        indexed_rows += json.loads(stdout)
    return [row for _, row in sorted(indexed_rows, key=lambda item: item[0])]


def compile_report(archs=ARCHS, jobs: int | None = None, all_sizes: bool = False) -> list[dict]:
    """One dict per (kernel, config, size specialization, arch) with keys kernel, arch,
    config, registers, spills, shared_bytes, fma, ftz; every kernel in KERNELS.
    `all_sizes` adds the sizes-not-divisible-by-16 variants (twice the compile time)."""
    archs = tuple(archs)
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1 or _interpreting():
        return _rows_from_subprocesses(archs, jobs, all_sizes)
    return [_row(task) for task in _tasks(archs, all_sizes)]


def format_table(rows: list[dict]) -> str:
    widths = {c: max([len(c)] + [len(str(row[c])) for row in rows]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS),
             "  ".join("-" * widths[c] for c in COLUMNS)]
    lines += ["  ".join(str(row[c]).ljust(widths[c]) for c in COLUMNS) for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append",
                        help=f"compute capability, repeatable (default: {ARCHS})")
    parser.add_argument("--jobs", type=int, default=None,
                        help="compile processes (default: one per CPU)")
    parser.add_argument("--all-sizes", action="store_true",
                        help="also compile the sizes-not-divisible-by-16 variants")
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    # Internal: a worker compiles every `shards`-th task starting at `shard`.
    parser.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    if args.shard is not None:
        tasks = list(enumerate(_tasks(archs, args.all_sizes)))[args.shard::args.shards]
        print(json.dumps([(index, _row(task)) for index, task in tasks]))
        return
    rows = compile_report(archs, args.jobs, args.all_sizes)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))


if __name__ == "__main__":
    # Run the package's copy of this module, so `__name__` names the importable module
    # the workers are started with (not "__main__").
    import importlib
    importlib.import_module(__spec__.name).main()
