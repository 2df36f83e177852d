"""Shared fixtures: the backends to test, and bitsandbytes as the format oracle."""
from __future__ import annotations

import os
import warnings

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The variable
# must be set before anything imports triton (bitsandbytes below does), or triton's
# library functions are compiled-mode and the interpreter cannot call them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import nf4lora  # noqa: E402
from nf4lora import backends  # noqa: E402
from nf4lora._weight import PackedWeight  # noqa: E402

# bitsandbytes warns at import that it cannot fetch a faster CPU kernel offline.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:  # the oracle is a test dependency; tests needing it skip
        bnb_functional = None

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: runs kernels on a CUDA device, skipped without one; `pytest -m gpu` "
        "is the set scripts/gpu_check.sh runs (its --dry-run checks it is not empty)")


def pytest_collection_modifyitems(items):
    # test_cuda_host.py's "gpu" variant of its `glue` and `cuda_op_device` fixtures: the
    # real nf4lora._C_cuda on CUDA tensors (the file's own "host" variant replays the
    # kernels on the CPU).
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "gpu" in (callspec.params.get("glue"),
                                              callspec.params.get("cuda_op_device")):
            item.add_marker(pytest.mark.gpu)


# The backends every functional test runs on. Triton's interpreter is ~100x slower, so
# the Triton kernels are checked against the reference in their own files on small sizes
# (tests/test_triton_*.py) rather than through every test here.
CPU_BACKENDS = ["reference", "cpu"]
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


@pytest.fixture
def bnb_nn():
    """bitsandbytes.nn (skips the test without bitsandbytes)."""
    if bnb_functional is None:
        pytest.skip("bitsandbytes is not installed (pip install '.[test]')")
    import bitsandbytes
    return bitsandbytes.nn


@pytest.fixture
def hide_optional_imports(monkeypatch):
    """hide("bitsandbytes", "torchao"): bench.harness.import_optional fails for modules with
    those prefixes, as if they were not installed (for the benchmarks' skip-with-a-note
    tests; the test module has put the repository root on sys.path)."""
    from bench import harness
    real_import = harness.import_optional

    def hide(*prefixes: str) -> None:
        def fake_import(name):
            if name.startswith(prefixes):
                return None, f"import {name} failed: not installed (simulated)", []
            return real_import(name)
        monkeypatch.setattr(harness, "import_optional", fake_import)
    return hide


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: extra threads only add synchronization, which on a loaded 2-core
    machine made each op 10-30x slower. Use as `pytestmark = pytest.mark.usefixtures(...)`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quiet_eager():
    """Eager mode and no warnings: bitsandbytes' CPU dequantize is wrapped in torch.compile
    and would recompile for every layer shape; transformers and PEFT warn about things
    irrelevant to the tests."""
    with torch._dynamo.config.patch(disable=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def interleaved_copy(weight):
    """The CPU kernels' interleaved copy of a PackedWeight (csrc/weight.h), built whatever
    the active ISA (backends.cpu.interleave builds one only where a kernel reads it)."""
    from nf4lora.backends import cpu
    N, K = weight.shape
    out = torch.empty(cpu._C.interleaved_bytes(N, K), dtype=torch.uint8)
    cpu._C.interleave_4bit(weight.with_offset_read(), out)
    return out


def dequantize_into(backend, packed, absmax, blocksize, quant_type, out, nested):
    """backend.dequantize_4bit of the codes of a tensor of out's shape, into out."""
    backend.dequantize_4bit(PackedWeight(packed, absmax, blocksize, quant_type, tuple(out.shape),
                                         nested), out)


# -- a 4-bit layer's whole state, for "a bad input leaves the module untouched" tests --------

def snapshot(module):
    """Everything that defines a 4-bit layer's state, cloned: its state dict and the
    identity, type and settings of its weight and quant state."""
    snap = {k: v.clone() for k, v in module.state_dict().items()}
    w = module.weight
    snap["_meta"] = (type(w), w.dtype, tuple(w.shape), getattr(w, "bnb_quantized", None),
                     id(w), id(getattr(w, "quant_state", None)), id(module.quant_state),
                     getattr(w, "quant_type", None), getattr(w, "quant_storage", None))
    return snap


def assert_same(before, after):
    """Two snapshots are equal, tensors byte for byte (packed codes stored as a float dtype
    can read as NaN, which torch.equal calls unequal)."""
    assert before.keys() == after.keys()
    for key in before:
        if key == "_meta":
            assert before[key] == after[key]
        else:
            a, b = before[key], after[key]
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(
                a.contiguous().reshape(-1).view(torch.uint8),
                b.contiguous().reshape(-1).view(torch.uint8)), key


# -- edits that make a 4-bit state dict malformed -------------------------------------------

def sd_drop(key):
    return lambda sd: sd.pop(key)


def sd_set(key, value):
    """sd[key] = value(sd)."""
    return lambda sd: sd.__setitem__(key, value(sd))


def sd_blob(edit, key="weight.quant_state.bitsandbytes__nf4"):
    """Apply `edit` to the decoded JSON of the packed quant-state entry."""
    import json

    def apply(sd):
        entries = json.loads(bytes(sd[key].tolist()))
        edit(entries)
        sd[key] = torch.tensor(list(json.dumps(entries).encode()), dtype=torch.uint8)
    return apply


def assert_peft_merge_requantizes(layer, x):
    """A PEFT adapter layer over an nf4lora Linear4bit: merge() re-quantizes W + delta (off by
    the 4-bit rounding of the sum, no more), the merged layer is its base layer alone, and
    unmerge() brings W back within two such roundings. Returns the merged base layer."""
    base = layer.get_base_layer()
    W0 = base.dequantized_weight(torch.float32)
    exact = W0 + layer.get_delta_weight("default").float()
    with torch.no_grad():
        y_adapter = layer(x)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    error = (base.dequantized_weight(torch.float32) - exact).abs().max().item()
    assert 0 < error < 0.5 * exact.abs().max().item()          # 4-bit rounding of the sum
    with torch.no_grad():                   # merged: the base layer alone, off by that rounding
        y_merged = layer(x)
        torch.testing.assert_close(y_merged, base(x), rtol=0, atol=0)
    assert (y_merged - y_adapter).abs().max().item() <= error * x.abs().sum(-1).max().item()
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.unmerge()
    assert not layer.merged
    assert (base.dequantized_weight(torch.float32) - W0).abs().max().item() <= 2 * error + 1e-6
    return base


def malformed_4bit_weight_edits() -> dict:
    """Named edits that break a 4-bit layer's `weight*` entries (its bias and shape-specific
    edits are the test file's)."""
    return {
        "missing weight.absmax": sd_drop("weight.absmax"),
        "missing weight.nested_absmax": sd_drop("weight.nested_absmax"),
        "missing quant_state blob": sd_drop("weight.quant_state.bitsandbytes__nf4"),
        "missing weight": sd_drop("weight"),
        "extra weight.key": sd_set("weight.foo", lambda sd: torch.zeros(1)),
        "short packed weight": sd_set("weight", lambda sd: sd["weight"][:-1]),
        "short absmax": sd_set("weight.absmax", lambda sd: sd["weight.absmax"][:-1]),
        "wrong quant_map": sd_set("weight.quant_map", lambda sd: sd["weight.quant_map"] * 2),
        "blob bad blocksize": sd_blob(lambda d: d.__setitem__("blocksize", 48)),
        "packed weight without state": lambda sd: [sd.pop(k) for k in list(sd)
                                                   if k.startswith("weight.")],
    }


def saved_bench_payload(out_dir, name: str, payload: dict) -> dict:
    """The JSON a benchmark saved into out_dir (one stamped file and <name>-latest.json),
    checked against what its main() returned."""
    import json
    saved = json.loads((out_dir / f"{name}-latest.json").read_text())
    assert len(list(out_dir.glob(f"{name}-2*.json"))) == 1
    assert saved["rows"] == json.loads(json.dumps(payload["rows"], default=str))
    assert saved["benchmark"] == name
    return saved


def run_quick_bench(main, argv, out_dir, monkeypatch) -> dict:
    """A whole-model benchmark's main(argv + ["--out", out_dir]) (bench_decode, bench_train,
    run with --threads), checked to undo its --threads: torch's thread count is as before."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")     # main sets it; restored after the test
    threads = torch.get_num_threads()
    payload = main([*argv, "--out", str(out_dir)])
    assert torch.get_num_threads() == threads
    return payload


def rows_by_provider(saved: dict, providers: set, bitsandbytes_provider: str) -> dict:
    """{provider: row} of a saved benchmark run, checked to hold exactly `providers`, plus
    bitsandbytes_provider where bitsandbytes imports (the test module has put the
    repository root on sys.path)."""
    from bench import harness
    expected = set(providers)
    if harness.import_optional("bitsandbytes")[0] is not None:
        expected.add(bitsandbytes_provider)
    rows = {row["provider"]: row for row in saved["rows"]}
    assert set(rows) == expected, saved["notes"]
    return rows
