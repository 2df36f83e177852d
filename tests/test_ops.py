"""The op registry: schemas and fake functions (opcheck), torch.compile, backend choice."""
import pytest
import torch
from torch.library import opcheck

import nf4lora
import nf4lora.functional as F
from nf4lora import _ops, backends
from nf4lora._weight import PackedWeight


def _cases():
    x = torch.randn(3, 130, dtype=torch.bfloat16)
    packed, absmax = _ops.quantize_4bit(x, 64, "nf4")
    code = F.dynamic_map("cpu")
    offset = absmax.mean()
    qabsmax, absmax2 = _ops.quantize_blockwise(absmax - offset, code, 256)

    def nested_weight(shape):
        return (packed, qabsmax, 64, "nf4", shape, absmax2, code, offset, 256)
    ops = torch.ops.nf4lora
    weight = (packed, qabsmax, 64, "nf4", [3, 130], absmax2, code, offset, 256)
    xs = torch.randn(5, 130, dtype=torch.bfloat16)
    lora_A = torch.randn(4, 130, dtype=torch.bfloat16)
    lora_B = torch.randn(3, 4, dtype=torch.bfloat16)
    # in_features 128, a multiple of the blocksize: the cpu backend's fused kernel for M <= 16
    packed128, absmax128 = _ops.quantize_4bit(torch.randn(3, 128), 64, "nf4")
    weight128 = (packed128, absmax128, 64, "nf4", [3, 128], None, None, None, 256)
    return [
        (ops.lora_matmul_4bit.default, (xs, *weight, lora_A, lora_B, 0.5, torch.randn(3).bfloat16()), {}),
        (ops.lora_matmul_4bit.default, (xs[:, :128].contiguous(), *weight128, lora_A[:, :128].contiguous(),
                                        lora_B, 0.5, None), {}),
        (ops.lora_matmul_4bit.default, (xs, *weight, None, None, 1.0, None), {}),
        (ops.lora_matmul_4bit_grad_input.default,
         (torch.randn(5, 3, dtype=torch.bfloat16), *weight, lora_A, torch.randn(5, 4).bfloat16()), {}),
        (ops.quantize_4bit.default, (x, 64, "fp4"), {}),
        (ops.dequantize_4bit.default, (packed, absmax, 64, "nf4", [3, 130], None, None, None, 256,
                                       torch.float16), {}),
        (ops.dequantize_4bit.default, (*nested_weight([390]), torch.bfloat16), {}),
        (ops.dequantize_4bit_out.default, (*nested_weight([390]), torch.empty(390)), {}),
        (ops.quantize_blockwise.default, (x, code, 256), {}),
        (ops.dequantize_blockwise.default, (qabsmax, absmax2, code, 256, torch.float32), {}),
    ]


def test_opcheck_every_op(backend):
    for op, args, kwargs in _cases():
        opcheck(op, args, kwargs)


def test_compiles_as_one_graph(backend):
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)

    def restore(packed):
        return F.dequantize_4bit(packed, state) * 2

    compiled = torch.compile(restore, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(packed), restore(packed))


def test_set_backend_and_environment(monkeypatch):
    assert "reference" in nf4lora.available_backends()
    nf4lora.set_backend("reference")
    assert nf4lora.get_backend() == "reference"
    nf4lora.set_backend(None)
    monkeypatch.setenv("NF4LORA_BACKEND", "reference")
    assert backends.backend_for(torch.device("cpu")).__name__ == "nf4lora.backends.reference"


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    with pytest.raises(RuntimeError, match="unknown backend 'nope'"):
        nf4lora.set_backend("nope")
    monkeypatch.setenv("NF4LORA_BACKEND", "cuda")
    if backends.availability("cuda") is None:
        pytest.skip("a CUDA build is present")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' \(requested via NF4LORA_BACKEND\) is not available"):
        F.quantize_4bit(torch.randn(64))


def test_environment_is_read_at_every_call_and_unset_means_automatic(monkeypatch):
    """NF4LORA_BACKEND set or removed while running takes effect at the next op (get_backend
    reads os.environ's own dict where it can, which os.environ's writes keep current)."""
    monkeypatch.delenv("NF4LORA_BACKEND", raising=False)
    assert nf4lora.get_backend() is None
    monkeypatch.setenv("NF4LORA_BACKEND", "reference")
    assert nf4lora.get_backend() == "reference"
    assert backends.backend_for(torch.device("cpu")).__name__ == "nf4lora.backends.reference"
    monkeypatch.setenv("NF4LORA_BACKEND", "")
    assert nf4lora.get_backend() is None
    monkeypatch.delenv("NF4LORA_BACKEND")
    assert nf4lora.get_backend() is None


def test_no_backend_for_cuda_tensors_names_both_reasons(monkeypatch):
    """The automatic choice for CUDA tensors is cuda, else triton; with neither usable the
    error gives both reasons (it used to blame NF4LORA_BACKEND, which nobody had set)."""
    monkeypatch.delenv("NF4LORA_BACKEND", raising=False)
    monkeypatch.setattr(backends._module("cuda"), "availability", lambda: "no CUDA here")
    monkeypatch.setattr(backends._module("triton"), "availability", lambda: "no Triton here")
    with pytest.raises(RuntimeError, match=r"no nf4lora backend runs CUDA tensors here "
                                           r"\(cuda: no CUDA here; triton: no Triton here\)"):
        backends.backend_for(torch.device("cuda"))
    monkeypatch.setattr(backends._module("triton"), "availability", lambda: None)
    assert backends.backend_for(torch.device("cuda")).__name__ == "nf4lora.backends.triton"


def test_eager_calls_skip_the_dispatcher_only_when_nothing_needs_the_op(monkeypatch):
    """call_lora_matmul_4bit runs the op's function directly in plain eager mode (same
    result) and goes through torch's dispatcher under a dispatch mode such as fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    packed, absmax = _ops.quantize_4bit(torch.randn(8, 128), 64, "nf4")
    weight = PackedWeight(packed, absmax, 64, "nf4", (8, 128), None)
    x = torch.randn(2, 128)
    direct = _ops.call_lora_matmul_4bit(x, weight, None, None, 1.0, None)
    through_op = _ops.lora_matmul_4bit(x, *weight.op_args(), None, None, 1.0, None)
    assert torch.equal(direct[0], through_op[0])

    used = []
    monkeypatch.setattr(_ops, "lora_matmul_4bit_impl", lambda *a: used.append(a) or through_op)
    _ops.call_lora_matmul_4bit(x, weight, None, None, 1.0, None)
    assert len(used) == 1
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_y, _ = _ops.call_lora_matmul_4bit(mode.from_tensor(x), weight, None, None, 1.0, None)
    assert len(used) == 1 and fake_y.shape == (2, 8)
