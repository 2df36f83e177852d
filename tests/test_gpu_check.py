"""scripts/gpu_check.sh, the one command that runs and times every GPU kernel on a lent
GPU machine: its dry run (here, on every CI run), and the GPU tests it runs that have no
other home.

  * test_dry_run_*: `gpu_check.sh --dry-run` collects the GPU tests (`pytest -m gpu`,
    not zero), has the benchmarks accept the GPU providers (`--device cuda --plan`: codec,
    matmul, multi-lora, dora),
    checks each step's command and runs the summary step; ~20 s on 2 cores.
  * test_triton_codec_on_cuda_*: the Triton codec kernels (quantize, double quantize,
    dequantize, 8-bit blockwise) compiled, on CUDA tensors, bit-exact against
    nf4lora.reference (marked gpu). tests/test_triton_codec.py runs the same kernels
    under the interpreter and forces it on at import, so these live here. The triton
    backend is imported inside the tests, after collection: in a run that also collects
    test_triton_codec.py its interpreter wins and these skip (gpu_check.sh runs
    `pytest -m gpu` on this file without it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nf4lora import reference
from nf4lora._weight import NestedAbsmax, PackedWeight
from nf4lora.codebook import create_dynamic_map

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
DYNAMIC = create_dynamic_map()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


# --- the dry run ---------------------------------------------------------------------------

def run_script(*args, timeout=180):
    env = dict(os.environ, PYTHON=sys.executable)   # the interpreter running these tests
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_collects_the_gpu_tests_and_plans_the_bench(tmp_path):
    result = run_script("--dry-run", str(tmp_path))
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert result.returncode == 0, result.stdout + result.stderr + log
    collected = re.search(r"GPU tests collected: (\d+)", result.stdout)
    assert collected and int(collected.group(1)) > 0, result.stdout
    for step in ("bench codec accepts the GPU providers", "bench matmul accepts the GPU providers",
                 "bench multi-lora accepts --device cuda", "bench dora accepts --device cuda",
                 "setup.py parses",
                 "compile report command", "summary step writes"):
        assert f"dry-run: ok      {step}" in result.stdout, result.stdout
    # Every provider of the real run is in the plans.
    for provider in ("nf4lora[cuda]", "nf4lora[triton]", "nf4lora[triton] no-split-k",
                     "bitsandbytes", "dense-bf16", "copy-bf16",
                     "nf4lora multi_lora_matmul_4bit nf4lora[cuda]", "nf4lora[cuda] no-triton",
                     "nf4lora DoRA nf4lora[cuda]", "nf4lora DoRA, kept norm nf4lora[triton]"):
        assert provider in result.stdout, provider
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"] and not summary["ok"]
    assert summary["env"]["torch"] == torch.__version__
    assert (tmp_path / "gpu_check.txt").read_text().startswith("gpu_check (dry-run)")


@pytest.mark.parametrize("args", [(), ("--quick",), ("--bogus", "out")],
                         ids=["no-out-dir", "quick-no-out-dir", "unknown-option"])
def test_bad_arguments_exit_2_with_usage(args):
    result = run_script(*args, timeout=30)
    assert result.returncode == 2 and "usage: scripts/gpu_check.sh" in result.stderr


# --- the Triton codec kernels on CUDA tensors ----------------------------------------------

@pytest.fixture
def triton_cuda():
    """nf4lora.backends.triton with compiled kernels and a CUDA device, else skip."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: scripts/gpu_check.sh runs these on a GPU")
    from nf4lora.backends import triton as backend   # after collection: see the docstring
    if backend.INTERPRETING:
        pytest.skip("Triton's interpreter is on in this process (TRITON_INTERPRET=1, or "
                    "test_triton_codec.py collected first): run `pytest -m gpu` on this file")
    if backend.availability() is not None:
        pytest.skip(f"triton backend unavailable: {backend.availability()}")
    return backend


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same dtype, shape and bits (so -0.0 vs 0.0 counts)."""
    actual = actual.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.is_floating_point():
        actual, expected = actual.view(BITS[actual.dtype]), expected.view(BITS[expected.dtype])
    bad = (actual != expected).nonzero().flatten()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {actual.numel()} differ, "
                              f"first at {bad[:5].tolist()}")


def make_values(n: int, dtype: torch.dtype, blocksize: int, seed: int) -> torch.Tensor:
    """Normal values at scales 1e-3..1e3 with -0.0, subnormals, an all-zero block and a
    block with a large outlier."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 3, 7)[torch.randint(0, 7, (n,), generator=g)]
    x = (torch.randn(n, generator=g) * scale).to(dtype)
    x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = -0.0
    tiny = 6e-8 if dtype == torch.float16 else 1e-40   # subnormal in the input dtype
    x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = tiny
    if n >= 3 * blocksize:
        x[blocksize:2 * blocksize] = 0.0
        x[2 * blocksize + 1] = 6e4 if dtype == torch.float16 else 1e30
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("n", [1, 4097, 3 * 4096 + 7])
def test_triton_codec_on_cuda_is_bit_exact(triton_cuda, n, blocksize, dtype, quant_type):
    values = make_values(n, dtype, blocksize, seed=n + blocksize)
    packed, absmax = triton_cuda.quantize_4bit(values.cuda(), blocksize, quant_type)
    ref_packed, ref_absmax = reference.quantize_4bit(values, blocksize, quant_type)
    assert_same(packed, ref_packed, "packed codes")
    assert_same(absmax, ref_absmax, "absmax")

    # Double quantization: the mean offset taken on the CPU, as reference.double_quantize.
    ref_q, ref_nested, offset = reference.double_quantize(ref_absmax, DYNAMIC)
    q, nested = triton_cuda.quantize_blockwise((ref_absmax - offset).cuda(), DYNAMIC.cuda(), 256)
    assert_same(q, ref_q, "qabsmax")
    assert_same(nested, ref_nested, "nested absmax")
    assert_same(triton_cuda_dequantize_blockwise(triton_cuda, ref_q, ref_nested),
                reference.dequantize_blockwise(ref_q, ref_nested, DYNAMIC, 256), "8-bit dequantize")

    nested_absmax = NestedAbsmax(ref_nested.cuda(), DYNAMIC.cuda(), float(offset), 256)
    absmax_of_nested = reference.dequantize_absmax(ref_q, ref_nested, DYNAMIC, float(offset))
    for out_dtype in DTYPES:
        for stored, decoded, state in ((ref_absmax, ref_absmax, None),
                                       (ref_q, absmax_of_nested, nested_absmax)):
            out = torch.empty(n, dtype=out_dtype, device="cuda")
            triton_cuda.dequantize_4bit(PackedWeight(ref_packed.cuda(), stored.cuda(), blocksize,
                                                     quant_type, (n,), state), out)
            assert_same(out, reference.dequantize_4bit(ref_packed, decoded, blocksize, quant_type,
                                                       (n,), out_dtype),
                        f"dequantize to {out_dtype}, nested={state is not None}")


def triton_cuda_dequantize_blockwise(backend, codes, absmax):
    out = torch.empty(codes.shape, dtype=torch.float32, device="cuda")
    backend.dequantize_blockwise(codes.cuda(), absmax.cuda(), DYNAMIC.cuda(), 256, out)
    return out
