"""The `nf4lora` command.

  nf4lora info             versions, backends and the CPU kernel path in use
  nf4lora bench [...]      the quantize/dequantize benchmark (bench/bench_codec.py)
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


def _bench(args) -> int:
    try:
        from nf4lora.bench import bench_codec
    except ImportError:  # running from a source checkout without installing
        from bench import bench_codec
    return bench_codec.main(args.bench_args) or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nf4lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, backends, CPU kernel path").set_defaults(run=_info)
    bench = commands.add_parser("bench", help="quantize/dequantize benchmark (--help for options)",
                                add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
