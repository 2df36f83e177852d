"""Shared fixtures: the backends to test, and bitsandbytes as the format oracle."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import nf4lora
from nf4lora import backends

# bitsandbytes warns at import that it cannot fetch a faster CPU kernel offline.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:  # the oracle is a test dependency; tests needing it skip
        bnb_functional = None

CPU_BACKENDS = [name for name in ("reference", "cpu", "triton")
                if name != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Run the test once per backend that can run on CPU tensors here."""
    reason = backends.availability(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param} unavailable: {reason}")
    nf4lora.set_backend(request.param)
    yield request.param
    nf4lora.set_backend(None)


@pytest.fixture
def bnb():
    """bitsandbytes.functional, with torch.compile off for the test: its CPU dequantize
    is wrapped in torch.compile(dynamic=False) and would recompile for every shape."""
    if bnb_functional is None:
        pytest.skip("bitsandbytes is not installed (pip install '.[test]')")
    with torch._dynamo.config.patch(disable=True):
        yield bnb_functional
