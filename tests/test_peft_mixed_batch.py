"""PEFT's mixed-adapter batches (`adapter_names=`) on nf4lora layers: LoraLinear4bitPeft runs
them as one nf4lora.multi_lora_matmul_4bit call (the 4-bit weight read once for the batch)
where PEFT's own loop runs the base layer, then each adapter on its sub-batch.

Checked against three things: float64 (a dense twin of the model, its Linear weights the
spec's dequantization of the 4-bit bytes, with the same adapters, in float64), PEFT's own
loop on the same nf4lora layers (the same-dtype baseline: the error bound is derived from
its error against float64), and each row run alone with its adapter set. Forward and every
gradient, "__base__" rows, adapters of ranks 1, 4 (rsLoRA) and 70 in one batch, repeated
names, through PeftModel (several layers) and generate. Where the op cannot express an
adapter (lora_bias, a LoRA variant, active dropout, extra forward arguments) PEFT's loop
runs, and it is checked that it does.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import nf4lora
from nf4lora import reference

transformers = pytest.importorskip("transformers")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.lora.layer import LoraLayer

    import nf4lora.integrations.peft as nf4peft
    from nf4lora.integrations.peft import LoraLinear4bitPeft

from test_peft_methods import _models as nf4_and_dense_models   # noqa: E402  (dense twin)

pytestmark = pytest.mark.usefixtures("one_thread", "quiet_eager")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
N_WRAPPED = 2 * len(TARGETS)          # 2 decoder layers
# rank 1, rank 70 (more than hidden = 64: A [70, 64]) and rsLoRA: one padded batch
ADAPTERS = {"a": dict(r=1, lora_alpha=2), "b": dict(r=70, lora_alpha=16),
            "c": dict(r=4, lora_alpha=8, use_rslora=True)}
NAMES = ["b", "__base__", "a", "b", "c"]      # "__base__", a repeated name, every adapter
# The gradients of the model's LoRA weights pass through attention, both decoder layers and
# the other adapters' layers, where the two float32 computations round in other orders:
# ours / PEFT loop's max error against float64 measured up to 1.8 (2 threads) and 2.2 (one
# thread) over the 48 weights here, 3 allowed; the logits and the single-layer checks keep 2.
MODEL_GRAD_FACTOR = 3.0


@pytest.fixture
def multi_calls(monkeypatch):
    """Records the adapters' ranks of each multi_lora_matmul_4bit call of the PEFT layer."""
    calls = []
    original = nf4peft.multi_lora_matmul_4bit

    def spy(*args, **kwargs):
        calls.append(tuple(args[3].shape))      # lora_A [n, r_max, in]
        return original(*args, **kwargs)
    monkeypatch.setattr(nf4peft, "multi_lora_matmul_4bit", spy)
    return calls


@pytest.fixture
def peft_loop(monkeypatch):
    """Call to make the nf4lora layers run PEFT's own sub-batch loop instead."""
    def use_loop():
        monkeypatch.setattr(LoraLinear4bitPeft, "_mixed_batch_plain", lambda self, names: False)
    return use_loop


def _peft_models(compute_dtype=torch.float32, **config):
    """(nf4lora PeftModel, dense float64 twin PeftModel): the same adapters ADAPTERS on both."""
    nf4, dense = nf4_and_dense_models(compute_dtype)
    models = []
    for model in (nf4, dense.double()):
        torch.manual_seed(1)
        names = iter(ADAPTERS)
        first = next(names)
        pm = get_peft_model(model, _config(first, **config), adapter_name=first)
        for name in names:
            pm.add_adapter(name, _config(name, **config))
        models.append(pm.eval())
    ours, twin = models
    for pm in models:        # PEFT trains the active adapter only; here every one is checked
        for name, param in pm.named_parameters():
            param.requires_grad_("lora_" in name)
    for name in ADAPTERS:    # the twin's adapters = ours, exactly (float32 -> float64)
        set_peft_model_state_dict(twin, {k: v.double() for k, v in
                                         get_peft_model_state_dict(ours, adapter_name=name).items()},
                                  adapter_name=name)
    return ours, twin


def _config(name, **extra):
    return LoraConfig(target_modules=TARGETS, init_lora_weights=False, **ADAPTERS[name], **extra)


def _ids(batch=len(NAMES), seed=0):
    return torch.randint(0, 128, (batch, 6), generator=torch.Generator().manual_seed(seed))


def _error(got, exact) -> float:
    return (got.double() - exact).abs().max().item()


def _assert_within_baseline(ours, baselines, exact, dtype, label, factor=2.0):
    """|ours - float64| <= factor * the largest same-dtype baseline's |error| + one ulp of
    the largest value."""
    err = _error(ours, exact)
    base_err = max(_error(baseline, exact) for baseline in baselines)
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err <= factor * base_err + ulp, (label, err, base_err, ulp)


def _logits_and_grads(pm, ids, names):
    """Logits of a mixed batch and the gradients of their sum of squares w.r.t. every LoRA
    weight (eval mode: PeftModel refuses adapter_names in training mode; no dropout then)."""
    pm.zero_grad()
    logits = pm(input_ids=ids, adapter_names=names).logits
    logits.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if "lora_" in n}
    return logits.detach(), grads


# -- the model: PeftModel(..., adapter_names=...) through two decoder layers --------------------

def test_model_forward_and_gradients_match_peft_and_float64(multi_calls, peft_loop):
    ours, twin = _peft_models()
    ids = _ids()
    logits, grads = _logits_and_grads(ours, ids, NAMES)
    # one call per wrapped layer, every adapter of the batch padded to rank 70
    assert multi_calls == [(3, 70, 64) if i % 4 != 3 else (3, 70, 128) for i in range(N_WRAPPED)]
    exact, exact_grads = _logits_and_grads(twin, ids, NAMES)
    peft_loop()
    multi_calls.clear()
    loop, loop_grads = _logits_and_grads(ours, ids, NAMES)
    assert not multi_calls
    assert (exact - twin(input_ids=ids).logits.detach()).abs().max() > 1e-1   # adapters act
    _assert_within_baseline(logits, [loop], exact, torch.float32, "logits")
    assert len(grads) == 2 * N_WRAPPED * len(ADAPTERS)
    for name, grad in grads.items():
        _assert_within_baseline(grad, [loop_grads[name]], exact_grads[name], torch.float32, name,
                                factor=MODEL_GRAD_FACTOR)
        assert grad.abs().max() > 0, name            # every used adapter gets a gradient


def test_each_row_is_its_adapter_alone(multi_calls):
    ours, _ = _peft_models()
    ids = _ids()
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=NAMES).logits
        for row, name in enumerate(NAMES):
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours(input_ids=ids[row:row + 1]).logits
            else:
                ours.set_adapter(name)
                alone = ours(input_ids=ids[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():           # only "__base__": the base model, no call
        multi_calls.clear()
        with ours.disable_adapter():
            base = ours(input_ids=ids[:2]).logits
        assert torch.equal(ours(input_ids=ids[:2], adapter_names=["__base__"] * 2).logits, base)
    assert not multi_calls


def test_generate_routes_and_matches_peft_loop(multi_calls, peft_loop):
    ours, _ = _peft_models()
    ids = _ids(batch=3)
    names = ["c", "__base__", "a"]
    tokens = ours.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False)
    assert multi_calls and len(multi_calls) % N_WRAPPED == 0   # every step, every layer
    peft_loop()
    assert torch.equal(tokens, ours.generate(input_ids=ids, adapter_names=names, max_new_tokens=4,
                                             do_sample=False))


# -- one layer ---------------------------------------------------------------------------------

def _layer(pm):
    return pm.base_model.model.model.layers[1].mlp.down_proj      # [64, 128]


def _layer_float64(layer, x, names):
    """Each sample m: base(x[m]) + its adapter alone, in float64 from the dequantized weight."""
    base = layer.get_base_layer()
    W = base.dequantized_weight(torch.float32).double()
    y = torch.nn.functional.linear(x.double(), W, None if base.bias is None else base.bias.double())
    return torch.stack([
        y[m] + x[m].double() @ layer.lora_A[name].weight.double().T
        @ layer.lora_B[name].weight.double().T * layer.scaling[name]
        if name in layer.lora_A else y[m] for m, name in enumerate(names)])


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_forward_and_gradients(compute_dtype, multi_calls):
    """y, dx and every adapter weight's gradient against float64. The routed call computes
    the adapters in the base layer's compute dtype (their weights cast to it, as the fused
    single-adapter path does) in the op's gathered form; the bound is twice the larger error
    of two same-dtype baselines: PEFT's loop on the same layer with its adapter weights in
    that dtype, and the spec (nf4lora.reference) on the padded adapters in that dtype. (In
    float32 the gathered form's h = x A^T, a batched GEMV, sums 128 terms with up to 4x the
    error of PEFT's per-sub-batch GEMM: the loop alone would be the wrong yardstick.)"""
    ours, _ = _peft_models(compute_dtype)
    layer = _layer(ours)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(len(NAMES), 3, 128, generator=gen)        # [batch, tokens, in]
    grad = torch.randn(len(NAMES), 3, 64, generator=gen)

    def run(forward, layer, dtype):
        """[y, dx, dA per adapter, dB per adapter] of forward(x) on `layer`'s weights."""
        params = [layer.lora_A[n].weight for n in ADAPTERS] + [layer.lora_B[n].weight for n in ADAPTERS]
        leaf = x.to(dtype).requires_grad_()
        y = forward(leaf)
        return [y.detach()] + list(torch.autograd.grad(y, [leaf, *params], grad.to(y.dtype)))

    ours_out = run(lambda t: layer(t, adapter_names=NAMES), layer, torch.float32)
    assert multi_calls == [(3, 70, 128)]
    loop_layer = copy.deepcopy(layer)
    for module in (loop_layer.lora_A, loop_layer.lora_B):
        module.to(compute_dtype)
    loop_out = run(lambda t: LoraLayer._mixed_batch_forward(loop_layer, t, adapter_names=NAMES),
                   loop_layer, torch.float32)
    spec_out = run(lambda t: _layer_spec(layer, t, NAMES, compute_dtype), layer, compute_dtype)
    exact_layer = copy.deepcopy(layer).double()
    exact_out = run(lambda t: _layer_spec(exact_layer, t, NAMES, torch.float64), exact_layer,
                    torch.float64)
    labels = ["y", "dx"] + [f"dA[{n}]" for n in ADAPTERS] + [f"dB[{n}]" for n in ADAPTERS]
    for label, o, loop, spec, exact in zip(labels, ours_out, loop_out, spec_out, exact_out):
        _assert_within_baseline(o, [loop, spec], exact, compute_dtype, label)


def _layer_spec(layer, x, names, dtype):
    """The spec of the routed call in `dtype`: base(x) once, each sample's adapter gathered
    (nf4lora.reference.multi_lora_matmul_4bit on the dequantized weight and the adapters of
    `names` zero-padded and stacked, in `dtype`)."""
    base = layer.get_base_layer()
    W = base.dequantized_weight(torch.float32).to(dtype)
    used = sorted({n for n in names if n in layer.lora_A})
    A, B = nf4lora.pad_adapters([layer.lora_A[n].weight.to(dtype) for n in used],
                                [layer.lora_B[n].weight.to(dtype) for n in used])
    index = torch.tensor([used.index(n) if n in used else -1 for n in names])
    index = index[:, None].expand(x.shape[:-1]).reshape(-1)
    scalings = torch.tensor([layer.scaling[n] for n in used], dtype=torch.float64)
    x2 = x.to(dtype).reshape(-1, x.shape[-1])
    y = reference.multi_lora_matmul_4bit(x2, W, A, B, scalings, index,
                                         None if base.bias is None else base.bias.to(dtype))
    return y.reshape(*x.shape[:-1], -1)


def test_the_stack_is_reused_only_while_the_weights_are_unchanged():
    """Outside autograd the cast, padded stack of the batch's adapters is kept between calls
    (generate's steps) and rebuilt after an in-place write to a weight (an optimizer step,
    load_state_dict) or for another set of adapters."""
    ours, _ = _peft_models()
    layer = _layer(ours)
    x = torch.randn(len(NAMES), 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        layer(x, adapter_names=NAMES)
        stack = layer._nf4lora_adapter_stack
        layer(x, adapter_names=list(reversed(NAMES)))           # the same adapters
        assert layer._nf4lora_adapter_stack is stack
        layer.lora_B["b"].weight.mul_(2)
        updated = layer(x, adapter_names=NAMES)
        assert layer._nf4lora_adapter_stack is not stack
        torch.testing.assert_close(updated.double(), _layer_float64(layer, x, NAMES),
                                   rtol=1e-5, atol=1e-5)
        stack = layer._nf4lora_adapter_stack
        layer(x[:2], adapter_names=["a", "c"])
        assert layer._nf4lora_adapter_stack[1][0].shape == (2, 4, 128)    # ranks 1, 4


# -- what stays on PEFT's loop -----------------------------------------------------------------

def test_lora_bias_variant_dropout_and_extra_arguments_keep_peft_loop(multi_calls):
    ours, _ = _peft_models()
    layer = _layer(ours)
    x = torch.randn(len(NAMES), 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = _layer_float64(layer, x, NAMES)
        torch.testing.assert_close(layer(x, adapter_names=NAMES).double(), expected,
                                   rtol=1e-5, atol=1e-5)
    assert len(multi_calls) == 1
    assert layer._mixed_batch_plain(["__base__", "not-on-this-layer"])

    layer.lora_bias["a"] = True                     # a term the op does not have
    assert not layer._mixed_batch_plain(NAMES) and layer._mixed_batch_plain(["b", "c"])
    layer.lora_bias["a"] = False
    layer.lora_variant["c"] = object()              # DoRA & co.: their own forward
    assert not layer._mixed_batch_plain(NAMES) and layer._mixed_batch_plain(["a", "b"])
    del layer.lora_variant["c"]
    layer.lora_dropout["b"] = torch.nn.Dropout(0.5)
    layer.train()                                   # active dropout: PEFT drops out per sub-batch
    assert not layer._mixed_batch_plain(NAMES)
    layer.eval()                                    # inactive in eval mode
    assert layer._mixed_batch_plain(NAMES)

    multi_calls.clear()
    layer.lora_bias["a"] = True
    with torch.no_grad():
        torch.testing.assert_close(layer(x, adapter_names=NAMES).double(), expected,
                                   rtol=1e-5, atol=1e-5)    # lora_B's bias is zero
    assert not multi_calls


def test_bad_adapter_names_are_peft_errors():
    ours, _ = _peft_models()
    with pytest.raises(ValueError, match="non-existing adapter"):
        ours(input_ids=_ids(batch=2), adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        _layer(ours)(torch.randn(2, 128), adapter_names=["a"])
