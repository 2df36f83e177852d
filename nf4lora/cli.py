"""The `nf4lora` command.

  nf4lora info                    versions, backends and the CPU kernel path in use
  nf4lora bench [SUITE] [...]     a benchmark suite of bench/ (options: nf4lora bench SUITE --help)
      matmul (default)  4-bit matmul, LoRA matmul and a QLoRA layer step vs bitsandbytes,
                        torchao and dense bf16 (bench/bench_matmul.py)
      codec             NF4 quantize / dequantize (bench/bench_codec.py)
      memory            memory of one QLoRA layer's forward + backward (bench/bench_memory.py)
      train             QLoRA training steps (bench/bench_train.py)
      decode            greedy generation of a 1B-class Llama: tokens/s vs bitsandbytes 4-bit and
                        dense bf16, share of read bandwidth (bench/bench_decode.py)
  nf4lora demo [...]              quantize a real model, QLoRA-train it, memory table, kernel timing
  nf4lora analyze MODEL_DIR [...] 4-bit formats x blocksizes x double quant on a model's Linear
                                  weights: error table, JSON, PNG charts (nf4lora/analyze.py)
  nf4lora memory CONFIG [...]     memory budget of inference and (Q)LoRA training for a model
                                  config; --measure checks it on a real run (nf4lora/memory.py)
"""
from __future__ import annotations

import argparse
import importlib
import sys


def _info(_args) -> int:
    import torch

    import nf4lora
    from nf4lora import backends

    print(f"nf4lora {nf4lora.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name in backends.BACKENDS:
        reason = backends.availability(name)
        print(f"  backend {name:<9} {'available' if reason is None else 'unavailable: ' + reason}")
    if backends.availability("cpu") is None:
        import torch

        from nf4lora import _C
        from nf4lora.backends import cpu
        print(f"  cpu kernel path: {_C.isa()} (best of {', '.join(_C.supported_isas())}; "
              "NF4LORA_CPU_ISA picks another)")
        rows = (1, 2, 4, 8, 16, 24, 32)
        print("  cpu matmul path by rows of x: the fused kernel's decoder, or dequantize + GEMM;")
        print("    the fastest measured (backends/cpu.py fused_max_m, csrc/cpu/dispatch.cpp;")
        print("    NF4LORA_CPU_GEMV picks a decoder, int8 = opt-in, less exact than dense bf16;")
        print("    blocksizes not a multiple of 64, or an Inf / NaN in x, take float):")
        print("      M          " + "".join(f"{m:>9}" for m in rows))
        tiles = _C.tile_gemm()
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = str(dtype).replace("torch.", "")
            paths = [cpu.route(m, dtype, cpu.fused_max_m(dtype)).replace("dequantize+gemm", "gemm")
                     for m in rows]
            paths = [_C.gemv_decoder(m, dtype) if path == "fused" else path for m, path in zip(rows, paths)]
            print(f"      {name:<11}" + "".join(f"{path:>9}" for path in paths))
        if tiles == "amx-emulated":
            tile_gemm = "amx, its tile instructions emulated (NF4LORA_CPU_GEMM=amx-emulated: tests only)"
        elif tiles:
            tile_gemm = "amx (NF4LORA_CPU_GEMM=amx)"
        elif _C.has_amx():
            tile_gemm = ("none by default: the AMX kernel is not yet measured against dequantize + "
                         "oneDNN's AMX GEMM;\n    NF4LORA_CPU_GEMM=amx takes it")
        else:
            tile_gemm = "none: no AMX-BF16 here (NF4LORA_CPU_GEMM=amx-emulated runs it emulated)"
        print(f"  cpu tile GEMM (bf16, M >= {cpu.TILE_GEMM_MIN_M}): {tile_gemm}")
        why_not = cpu.interleave_unavailable()
        if why_not is not None:
            interleave = f"no ({why_not})"
        else:
            int8 = _C.gemv_decoder(8, torch.bfloat16) == "int8"
            fused_to = cpu.fused_max_m_interleaved(torch.bfloat16)
            sums = "int8 sums: NF4LORA_CPU_GEMV=int8" if int8 else "int16 sums"
            interleave = (f"yes, an interleaved copy of W ({sums}, 16-bit x),\n    read by every "
                          f"fused call, M <= {fused_to}; 0.56 bytes per weight more while in eval "
                          "(none for float32 compute);\n    NF4LORA_CPU_INTERLEAVE=0: off")
        print(f"  eval-mode Linear4bit on CPU: {interleave}")
        print("  cpu backward grad-input path by rows of grad (backends/cpu.py grad_input_fused_max_m):")
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = str(dtype).replace("torch.", "")
            paths = [cpu.route(m, dtype, cpu.grad_input_fused_max_m(dtype)).replace("dequantize+gemm", "gemm")
                     for m in rows]
            print(f"      {name:<11}" + "".join(f"{path:>9}" for path in paths))
    return 0


# `nf4lora bench SUITE`: the module of bench/ that runs it (its main(argv) parses the rest).
BENCH_SUITES = {"matmul": "bench_matmul", "codec": "bench_codec", "memory": "bench_memory",
                "train": "bench_train", "decode": "bench_decode"}
DEFAULT_BENCH_SUITE = "matmul"


def _load_bench(module: str):
    """bench/<module>.py, or None if there is no such file.

    bench/ is installed as nf4lora.bench; in a source checkout that was not installed it
    is the top-level package `bench` (run from the repository root). An import error
    inside the suite itself (a missing dependency) is raised, not mistaken for absence.
    """
    for package in ("nf4lora.bench", "bench"):
        name = f"{package}.{module}"
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name not in (name, package):
                raise
    return None


def _bench(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):   # the suites (this module's docstring), then
        lines = __doc__.splitlines()              # the default suite's own --help
        start = next(i for i, line in enumerate(lines) if "nf4lora bench" in line)
        end = next(i for i, line in enumerate(lines) if "nf4lora demo" in line)
        print("usage:\n" + "\n".join(lines[start:end]))
        print(f"\nwithout SUITE: {DEFAULT_BENCH_SUITE}, whose options are:\n")
    suite = argv[0] if argv and argv[0] in BENCH_SUITES else DEFAULT_BENCH_SUITE
    if argv and argv[0] == suite:
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"nf4lora bench: unknown suite {argv[0]!r}; choose one of "
              f"{', '.join(BENCH_SUITES)}", file=sys.stderr)
        return 2
    module = _load_bench(BENCH_SUITES[suite])
    if module is None:
        print(f"nf4lora bench {suite}: bench/{BENCH_SUITES[suite]}.py is not in this "
              "installation or checkout", file=sys.stderr)
        return 2
    module.main(argv)      # returns its results dict, not an exit status
    return 0


def _demo(argv: list[str]) -> int:
    from nf4lora import demo
    return demo.main(argv)


def _analyze(argv: list[str]) -> int:
    from nf4lora import analyze
    return analyze.main(argv)


def _memory(argv: list[str]) -> int:
    from nf4lora import memory
    return memory.main(argv)


# Commands that parse their own options: everything after the command name goes to them
# as is. (An argparse REMAINDER positional would reject a leading option such as
# `nf4lora bench --quick`.)
PASSTHROUGH = {"bench": _bench, "demo": _demo, "analyze": _analyze, "memory": _memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nf4lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, backends, CPU kernel path").set_defaults(run=_info)
    commands.add_parser("bench", help="benchmarks: bench [matmul|codec|memory|train|decode] "
                        "(default matmul; --help for options)")
    commands.add_parser("demo", help="quantize + QLoRA-train a real model, memory table, "
                        "kernel timing (--help for options)")
    commands.add_parser("analyze", help="4-bit formats on a model's weights: error table, JSON, "
                        "PNG charts (--help for options)")
    commands.add_parser("memory", help="memory budget of inference and (Q)LoRA training for a "
                        "model config (--help for options)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]](argv[1:])
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
