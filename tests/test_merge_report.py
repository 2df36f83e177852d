"""Merging with numbers (nf4lora.merge): a report per merged layer, merges refused over a
bound that write nothing, and the error-minimizing re-quantization ("search").

Oracles: nf4lora.reference for bytes (reference.quantize_4bit_search is the definition of
the search), float64 recomputation from the spec's dequantization for every reported
number. Shapes are odd on purpose: rows that are not a multiple of the blocksize, an odd
element count (a half-filled last byte), blocks spanning two rows, rank 1.
"""
from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from conftest import assert_same, snapshot
from oracles import bnb_reference_dequantize, decoded_absmax, spec_dequantize
from torch import nn

import nf4lora
from nf4lora import functional, merge, reference
from nf4lora.merge import MergeOptions, MergeRefusedError, merge_options, merge_reports
from nf4lora.nn import Linear4bit, LoraLinear4bit

pytestmark = pytest.mark.usefixtures("one_thread")

# [out, in] of the test layers: 37 x 50 (rows not a multiple of 64, blocks span rows),
# 33 x 65 (2145 weights: odd, the last byte half padding), 24 x 64 (whole blocks).
SHAPES = [(37, 50), (33, 65), (24, 64)]


def _weights(shape, dtype=torch.float32, seed=0):
    """N(0, 1) weights with an all-zero row (all-zero blocks) and one outlier."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=generator)
    W[1] = 0
    W[-1, -1] = 9.0
    return W.to(dtype)


def _layer(shape, quant_type="nf4", nested=True, r=1, b_std=0.3, seed=0):
    """A LoraLinear4bit of rank r around a Linear4bit [out, in] with a trained-looking
    (random) B: b_std 0.3 moves the weights by several 4-bit steps, so the re-quantization
    is a fresh one and plain and search differ."""
    out_features, in_features = shape
    base = Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32,
                      compress_statistics=nested, quant_type=quant_type)
    with torch.no_grad():
        base.weight.data = _weights(shape, seed=seed)
    base.weight._quantize("cpu")
    torch.manual_seed(seed + 1)
    layer = LoraLinear4bit(base, r=r, lora_alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=b_std)
    return layer


def _block_errors(decoded: torch.Tensor, target: torch.Tensor, blocksize=64) -> torch.Tensor:
    """Per block: sum of squares of the float32 difference, in float64 (what the search
    minimizes: reference.block_squared_error)."""
    diff = (decoded.float() - target.float()).reshape(-1)
    diff = torch.nn.functional.pad(diff, (0, -diff.numel() % blocksize))
    return diff.view(-1, blocksize).double().square().sum(1)


# -- the search: bytes, format, never worse than plain ---------------------------------------------

@pytest.mark.parametrize("shape", SHAPES[:2], ids=["37x50", "33x65"])
@pytest.mark.parametrize("quant_type,nested,dtype,storage", [
    ("nf4", True, torch.float32, torch.uint8), ("nf4", False, torch.bfloat16, torch.uint8),
    ("fp4", True, torch.bfloat16, torch.bfloat16), ("fp4", False, torch.float32, torch.uint8)])
def test_search_writes_the_spec_bytes(shape, quant_type, nested, dtype, storage):
    A = _weights(shape, dtype)
    stored, state = merge.quantize_4bit_search(A, blocksize=64, quant_type=quant_type,
                                               compress_statistics=nested, quant_storage=storage)
    packed, scale, double = reference.quantize_4bit_search(
        A, 64, quant_type, functional.dynamic_map("cpu") if nested else None)
    assert stored.dtype == storage
    assert torch.equal(stored.reshape(-1).view(torch.uint8)[: packed.numel()], packed)
    torch.testing.assert_close(decoded_absmax(state), scale, rtol=0, atol=0)
    # Same format as the plain quantization: same fields, and with double quantization the
    # plain offset and nested absmax (the search only picks other 8-bit codes under them).
    _, plain = functional.quantize_4bit(A, blocksize=64, quant_type=quant_type,
                                        compress_statistics=nested, quant_storage=storage)
    assert (state.quant_type, state.blocksize, state.dtype, state.shape, state.nested) == \
        (plain.quant_type, plain.blocksize, plain.dtype, plain.shape, plain.nested)
    assert state.absmax.dtype == plain.absmax.dtype and state.absmax.shape == plain.absmax.shape
    if nested:
        assert torch.equal(state.absmax, double[0])
        assert torch.equal(state.offset, plain.offset) and state.state2 == plain.state2
    assert not torch.equal(state.absmax, plain.absmax)          # the search changed scales


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_search_never_loses_to_plain_and_gains_on_a_fresh_quantization(quant_type, nested):
    A = _weights((96, 128))
    args = dict(blocksize=64, quant_type=quant_type, compress_statistics=nested)
    plain = spec_dequantize(*functional.quantize_4bit(A, **args), torch.float32)
    search = spec_dequantize(*merge.quantize_4bit_search(A, **args), torch.float32)
    plain_errors, search_errors = _block_errors(plain, A), _block_errors(search, A)
    assert (search_errors <= plain_errors).all()          # plain is a candidate of every block
    # Gaussian blocks, fresh: measured 1.101x (NF4 + double quant) and 1.129x (FP4) less
    # squared error; without the search it is 1.0x.
    assert plain_errors.sum() > 1.05 * search_errors.sum()


def test_search_keeps_a_weight_already_on_its_grid():
    """Re-quantizing a dequantized weight: the plain quantization has no error, so every
    block keeps its plain codes and scale (ties go to plain), byte for byte."""
    packed, state = functional.quantize_4bit(_weights((33, 65)), quant_type="nf4")
    W = functional.dequantize_4bit(packed, state)
    again, again_state = merge.quantize_4bit_search(W, quant_type="nf4")
    assert torch.equal(again, packed) and torch.equal(again_state.absmax, state.absmax)


@pytest.mark.parametrize("nested", [False, True])
def test_search_of_an_empty_weight_is_empty(nested):
    stored, state = merge.quantize_4bit_search(torch.zeros(0, 64), compress_statistics=nested)
    assert stored.numel() == 0 and state.absmax.numel() == 0
    assert functional.dequantize_4bit(stored, state).shape == (0, 64)


def test_search_refuses_bad_arguments_and_bad_weights():
    A = _weights((8, 64))
    for grid in [{"steps": ()}, {"steps": (1, 2.5)}, {"steps": (True,)}, {"steps": 3},
                 {"step": -0.01}, {"step": "0.01"}, {"steps": (0, -10), "step": 0.1}]:
        with pytest.raises(ValueError, match="step"):
            merge.quantize_4bit_search(A, **grid)
    A[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf: first in block 3 "):
        merge.quantize_4bit_search(A, quant_type="nf4")
    with pytest.raises(ValueError, match="blocksize"):
        merge.quantize_4bit_search(_weights((8, 64)), blocksize=48)


def test_searched_state_is_read_by_bitsandbytes_as_nf4lora_reads_it(bnb):
    """The searched state travels in bitsandbytes' state-dict form and bitsandbytes'
    QuantState reads it back: same 8-bit codes, nested absmax and offset, and its
    dequantization formula gives the spec's values (not its CPU kernels: see oracles.py)."""
    import bitsandbytes
    A = _weights((37, 50))
    stored, state = merge.quantize_4bit_search(A, quant_type="nf4", compress_statistics=True)
    theirs = bitsandbytes.functional.QuantState.from_dict(state.as_dict(packed=True), "cpu")
    assert torch.equal(theirs.absmax, state.absmax)
    assert torch.equal(theirs.state2.absmax, state.state2.absmax)
    assert float(theirs.offset) == float(state.offset)
    torch.testing.assert_close(bnb_reference_dequantize(stored, theirs),
                               spec_dequantize(stored, state), rtol=0, atol=0)


# -- reports -------------------------------------------------------------------------------------

def _expected_numbers(W: torch.Tensor, delta64: torch.Tensor, merged: torch.Tensor, rows: int):
    """The report's numbers recomputed in float64 from the spec's dequantizations."""
    exact = W.double() + delta64
    error = merged.double() - exact
    x = merge.probe_batch(rows, W.shape[1])
    y_error, y_exact = x @ error.t(), x @ exact.t()
    return dict(max_abs_error=error.abs().max().item(), mean_abs_error=error.abs().mean().item(),
                mse=error.square().mean().item(),
                output_max_abs_error=y_error.abs().max().item(),
                output_relative_error=(y_error.norm() / y_exact.norm()).item())


@pytest.mark.parametrize("requantize", ["plain", "search"])
def test_merge_report_numbers_are_the_spec_errors(requantize, caplog):
    layer = _layer((37, 50), r=1)
    base = layer.base_layer
    W = spec_dequantize(base.weight, base.weight.quant_state, torch.float32)
    delta64 = (layer.lora_B.weight.double() @ layer.lora_A.weight.double()) * layer.scaling
    with caplog.at_level(logging.INFO, logger="nf4lora"):
        error = layer.merge(requantize=requantize, probe_rows=3)
    report = layer.merge_report
    assert report is base.merge_report and error == report.max_abs_error
    assert (report.shape, report.quant_type, report.requantize, report.probe_rows,
            report.merged, report.operation) == ((37, 50), "nf4", requantize, 3, True, "merge")
    merged = spec_dequantize(base.weight, base.weight.quant_state, torch.float32)
    expected = _expected_numbers(W, delta64, merged, 3)
    # float32 B @ A in the merge against float64 here: ~1e-7 relative, far under the errors
    for key, value in expected.items():
        assert getattr(report, key) == pytest.approx(value, rel=1e-5), key
    assert report.max_abs_error > 0.01                 # a real re-quantization, not a no-op
    assert [r.getMessage() for r in caplog.records if r.name.startswith("nf4lora")] == [str(report)]
    assert "3-row probe" in str(report) and f"({requantize})" in str(report)


def test_unmerge_reports_too_and_default_probe_is_16_rows():
    layer = _layer((33, 65), quant_type="fp4", nested=False, r=2)
    layer.merge()
    assert layer.merge_report.probe_rows == merge.PROBE_ROWS == 16
    error = layer.unmerge()
    assert layer.merge_report.operation == "unmerge" and error == layer.merge_report.max_abs_error


def test_search_merge_writes_the_search_of_the_exact_sum_and_beats_plain():
    plain_layer = _layer((33, 65), r=1)
    search_layer = copy.deepcopy(plain_layer)
    W = search_layer.base_layer.dequantized_weight(torch.float32)
    target = W + search_layer._delta()
    plain_layer.merge(requantize="plain")
    with merge_options(requantize="search"):                # options from the context
        search_layer.merge()
    stored, state = merge.quantize_4bit_search(target, quant_type="nf4", compress_statistics=True)
    assert torch.equal(search_layer.base_layer.weight, stored)
    assert torch.equal(search_layer.base_layer.weight.quant_state.absmax, state.absmax)
    assert search_layer.merge_report.requantize == "search"
    assert search_layer.merge_report.mse < plain_layer.merge_report.mse


# -- refusing a merge ------------------------------------------------------------------------------

def test_merge_over_the_bound_is_refused_and_writes_nothing():
    layer = _layer((37, 50), r=1)
    dry_run = copy.deepcopy(layer)
    error = dry_run.merge()
    before = snapshot(layer.base_layer)
    lora_before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(MergeRefusedError, match="exceeds max_error") as refused:
        layer.merge(max_error=0.5 * error)
    assert_same(before, snapshot(layer.base_layer))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in lora_before.items())
    assert not layer.merged
    report = refused.value.report
    assert report is layer.merge_report and not report.merged
    assert report.max_abs_error == pytest.approx(error, rel=0, abs=0)
    layer.merge(max_error=2 * error)                      # a bound it meets: merged
    assert layer.merged and layer.merge_report.merged


def test_bad_options_raise_before_anything_changes():
    layer = _layer((24, 64))
    before = snapshot(layer.base_layer)
    for kwargs, what in [({"requantize": "nearest"}, "requantize"), ({"max_error": -1.0}, "max_error"),
                         ({"max_error": "0.1"}, "max_error"), ({"probe_rows": 0}, "probe_rows")]:
        with pytest.raises(ValueError, match=what):
            layer.merge(**kwargs)
    with pytest.raises(ValueError, match="requantize"):
        with merge_options(requantize="best"):
            pass
    assert_same(before, snapshot(layer.base_layer))
    assert not layer.merged and layer.merge_report is None
    assert MergeOptions() == MergeOptions("plain", None, 16)


def _three_layer_model():
    """Three 4-bit layers with adapters whose merge errors differ by ~4x each."""
    layers = [_layer(shape, r=r, b_std=b_std, seed=seed).base_layer for shape, r, b_std, seed in
              [((37, 50), 1, 0.02, 0), ((50, 37), 3, 0.08, 1), ((33, 65), 2, 0.3, 2)]]
    model = nn.Sequential(*layers)
    nf4lora.add_lora(model, r=2, lora_alpha=4, target_modules=["0", "1", "2"])
    torch.manual_seed(3)
    for i, module in enumerate(model):
        with torch.no_grad():
            module.lora_B.weight.normal_(std=0.02 * 4 ** i)
    return model


def test_merge_lora_merges_what_meets_the_bound_and_keeps_the_rest(caplog):
    model = _three_layer_model()
    dry_run = copy.deepcopy(model)
    nf4lora.merge_lora(dry_run)
    errors = {r.name: r.max_abs_error for r in merge_reports(dry_run)}
    assert sorted(errors) == ["0", "1", "2"] and errors["0"] < errors["1"] < errors["2"]
    bound = (errors["0"] + errors["1"]) / 2
    untouched = {name: snapshot(model.get_submodule(name).base_layer) for name in ("1", "2")}

    with caplog.at_level(logging.INFO, logger="nf4lora"):
        assert nf4lora.merge_lora(model, max_error=bound) is model
    assert type(model[0]) is Linear4bit
    for name, before in untouched.items():
        assert type(model.get_submodule(name)) is LoraLinear4bit
        assert not model.get_submodule(name).merged
        assert_same(before, snapshot(model.get_submodule(name).base_layer))
    summary = merge_reports(model)
    assert [(r.name, r.merged) for r in summary] == [("0", True), ("1", False), ("2", False)]
    assert summary.refused == ["1", "2"]
    assert [r.max_abs_error for r in summary] == [errors[n] for n in ("0", "1", "2")]
    table = str(summary)
    assert table.splitlines()[0].split()[:3] == ["layer", "shape", "requantize"]
    assert "REFUSED" in table and "50x37" in table and "probe batch of 16 rows" in table
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == [f"nf4lora.merge_lora: 2 layer(s) not merged, their error exceeds "
                       f"max_error={bound:g}; they keep their adapters: 1, 2"]
    assert any(table in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)

    nf4lora.merge_lora(model)          # no bound now: the rest merge
    assert all(type(m) is Linear4bit for m in model)
    assert all(r.merged for r in merge_reports(model))


# -- PEFT ------------------------------------------------------------------------------------------

@pytest.fixture
def peft_model():
    """PEFT LoRA (rank 1, random B) on the three 4-bit layers of _three_layer_model."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nf4lora.integrations.peft  # noqa: F401  (registers nf4lora's layer)
    model = nn.Sequential(*[m.base_layer for m in _three_layer_model()])
    config = peft.LoraConfig(r=1, lora_alpha=2, target_modules=["0", "1", "2"],
                             init_lora_weights=False)
    return peft.get_peft_model(model, config)


def test_peft_merge_and_unload_reports_each_layer_through_the_options(peft_model, caplog):
    with merge_options(requantize="search", probe_rows=4), warnings.catch_warnings(), \
            caplog.at_level(logging.INFO, logger="nf4lora"):
        warnings.simplefilter("ignore")               # PEFT's "re-quantizes" warning per layer
        merged = peft_model.merge_and_unload(safe_merge=True)
    summary = merge_reports(merged)
    assert [r.name for r in summary] == ["0", "1", "2"]
    assert all(r.requantize == "search" and r.probe_rows == 4 and r.adapter == "default"
               and r.merged for r in summary)
    logged = [r.getMessage() for r in caplog.records if r.name == "nf4lora.merge"]
    assert len(logged) == 3 and all("adapter 'default' (search)" in m for m in logged)


def test_peft_safe_merge_over_the_bound_is_refused_and_writes_nothing(peft_model):
    layer = peft_model.base_model.model[2]
    before = snapshot(layer.get_base_layer())
    with merge_options(max_error=1e-4), pytest.raises(MergeRefusedError), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(safe_merge=True)
    assert_same(before, snapshot(layer.get_base_layer()))
    assert layer.merged_adapters == [] and not layer.merge_report.merged
    with merge_options(max_error=1e-4), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(max_error=1.0)                        # the argument wins over the context
    assert layer.merged_adapters == ["default"] and layer.merge_report.merged
