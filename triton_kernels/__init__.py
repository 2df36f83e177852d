"""nf4lora's Triton kernels, shipped inside the wheel as `nf4lora.triton_kernels`.

One op per file (quantize_4bit, dequantize_4bit, blockwise_8bit, gemv, lora_matmul,
lora_matmul_backward), kernels and their launch configs only, built from the shared
per-element helpers in codec.py; `nf4lora.backends.triton` is the launch glue and decides
which kernel a shape takes; nf4lora/roofline.py argues their speed on paper. Every
kernel runs on CPU tensors under TRITON_INTERPRET=1 and compiles for sm_80/sm_90
without a GPU: `python -m nf4lora.triton_kernels.compile_report`.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

from . import blockwise_8bit, dequantize_4bit, quantize_4bit
from . import gemv, lora_matmul, lora_matmul_backward

# Lets nf4lora.backends.triton tell this package from another top-level
# `triton_kernels` distribution when it falls back to that name in a source checkout.
NF4LORA_TRITON_KERNELS = True


class KernelVariants(NamedTuple):
    """A kernel and every (label, signature, launch config) its launcher can choose."""
    name: str
    kernel: Callable
    targets: Callable[[], Iterable[tuple[str, dict, dict]]]


# The kernels the compile report (and tests/test_triton_compile.py) compile for every
# arch. A new kernel file (matmul, gemv, ...) adds its line here and nothing else.
KERNELS: list[KernelVariants] = [
    KernelVariants("quantize_4bit", quantize_4bit.quantize_4bit_kernel,
                   quantize_4bit.compile_targets),
    KernelVariants("dequantize_4bit", dequantize_4bit.dequantize_4bit_kernel,
                   dequantize_4bit.compile_targets),
    KernelVariants("quantize_blockwise", blockwise_8bit.quantize_blockwise_kernel,
                   blockwise_8bit.quantize_compile_targets),
    KernelVariants("dequantize_blockwise", blockwise_8bit.dequantize_blockwise_kernel,
                   blockwise_8bit.dequantize_compile_targets),
    KernelVariants("lora_matmul", lora_matmul.lora_matmul_kernel,
                   lora_matmul.compile_targets),
    KernelVariants("gemv_split_k", gemv.gemv_split_k_kernel, gemv.compile_targets),
    KernelVariants("lora_matmul_grad_input", lora_matmul_backward.lora_matmul_grad_input_kernel,
                   lora_matmul_backward.compile_targets),
    KernelVariants("split_k_reduce", lora_matmul.split_k_reduce_kernel,
                   lora_matmul.reduce_compile_targets),
]


def __getattr__(name):
    # compile_report is imported on first use, not here: `python -m
    # nf4lora.triton_kernels.compile_report` would otherwise find the module already
    # imported by this package and run a second copy (runpy's RuntimeWarning).
    if name == "compile_report":
        from .compile_report import compile_report
        globals()["compile_report"] = compile_report  # shadow the submodule attribute
        return compile_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KERNELS", "KernelVariants", "compile_report", "blockwise_8bit",
           "dequantize_4bit", "quantize_4bit", "gemv", "lora_matmul", "lora_matmul_backward"]
