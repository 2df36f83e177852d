"""The `nf4lora` command.

  nf4lora info             versions, backends and the CPU kernel path in use
  nf4lora bench [...]      the quantize/dequantize benchmark (bench/bench_codec.py)
  nf4lora demo [...]       quantize a real model, QLoRA-train it, memory table, kernel timing
"""
from __future__ import annotations

import argparse
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
        from nf4lora import _C
        print(f"  cpu kernel path: {_C.isa()}")
    return 0


def _bench(argv: list[str]) -> int:
    try:
        from nf4lora.bench import bench_codec
    except ImportError:  # running from a source checkout without installing
        from bench import bench_codec
    bench_codec.main(argv)      # returns its results dict, not an exit status
    return 0


def _demo(argv: list[str]) -> int:
    from nf4lora import demo
    return demo.main(argv)


# Commands that parse their own options: everything after the command name goes to them
# as is. (An argparse REMAINDER positional would reject a leading option such as
# `nf4lora bench --quick`.)
PASSTHROUGH = {"bench": _bench, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nf4lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, backends, CPU kernel path").set_defaults(run=_info)
    commands.add_parser("bench", help="quantize/dequantize benchmark (--help for options)")
    commands.add_parser("demo", help="quantize + QLoRA-train a real model, memory table, "
                        "kernel timing (--help for options)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]](argv[1:])
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
