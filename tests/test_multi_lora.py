"""Mixed-adapter batches (issue 15 item 2): nf4lora.multi_lora_matmul_4bit against the spec
(nf4lora.reference.multi_lora_matmul_4bit on the dequantized weight) in float64 on every CPU
backend: forward and every gradient, odd shapes, rank 1 and 70 (padded with a smaller one),
adapter_index with -1 and repeated indices, leading dims; each row equals the single-adapter
call on it; the op nf4lora::multi_lora_matmul_4bit passes opcheck and traces as one graph
node; bad input is a clear error. The Triton kernels: tests/test_triton_multi_lora.py."""
from __future__ import annotations

import pytest
import torch

import nf4lora
import nf4lora.functional as nf
from nf4lora import reference
from nf4lora._weight import PackedWeight
from nf4lora.backends import composite, cpu as cpu_backend

from conftest import DTYPES
from test_cpu_matmul import isa, sums    # noqa: F401  (fixtures: NF4LORA_CPU_ISA / _GEMV)


def weight(out_f=37, in_f=192, seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed, state = nf.quantize_4bit(torch.randn(out_f, in_f, generator=gen), blocksize=64,
                                     compress_statistics=True)
    return packed, state, nf.dequantize_4bit(packed, state).double()


def adapters(ranks, out_f, in_f, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    As = [(torch.randn(r, in_f, generator=gen) * 0.1).to(dtype) for r in ranks]
    Bs = [(torch.randn(out_f, r, generator=gen) * 0.1).to(dtype) for r in ranks]
    return As, Bs


def assert_within_baseline(ours, baseline, exact, dtype, label):
    err = (ours.double() - exact).abs().max().item()
    base_err = (baseline.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err <= 2 * base_err + ulp, (label, err, base_err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ranks,index", [
    ((1, 70, 5), [2, -1, 0, 2, 1, 1, -1, 0]),      # r = 1 and 70 padded together, -1, repeats
    ((16,), [0, 0, 0]),                              # one adapter for every row
    ((4, 4), [-1]),                                  # base only
])
def test_forward_and_gradients_match_the_spec(backend, dtype, ranks, index):
    packed, state, W = weight()
    As, Bs = adapters(ranks, 37, 192, dtype)
    A, B = nf4lora.pad_adapters(As, Bs)
    scalings = [0.5 * (i + 1) for i in range(len(ranks))]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(len(index), 192, generator=gen).to(dtype)
    bias = torch.randn(37, generator=gen).to(dtype)
    idx = torch.tensor(index)
    inputs = [t.clone().requires_grad_() for t in (x, A, B, bias)]
    y = nf4lora.multi_lora_matmul_4bit(inputs[0], packed, state, inputs[1], inputs[2], scalings,
                                       idx, inputs[3])
    grad = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(grad)
    s = torch.tensor(scalings)
    exact_in = [t.detach().double().requires_grad_() for t in (x, A, B, bias)]
    exact = reference.multi_lora_matmul_4bit(exact_in[0], W, exact_in[1], exact_in[2], s, idx,
                                             exact_in[3])
    exact.backward(grad.double())
    base_in = [t.detach().clone().requires_grad_() for t in (x, A, B, bias)]
    base = reference.multi_lora_matmul_4bit(base_in[0], W.to(dtype), base_in[1], base_in[2], s,
                                            idx, base_in[3])
    base.backward(grad)
    assert_within_baseline(y.detach(), base.detach(), exact.detach(), dtype, "y")
    for name, ours, truth, baseline in zip("x A B bias".split(), inputs, exact_in, base_in):
        assert_within_baseline(ours.grad, baseline.grad, truth.grad, dtype, f"d{name}")
    # the padding of the smaller adapters gets no gradient that could grow it
    for i, r in enumerate(ranks):
        assert not inputs[1].grad[i, r:].any() and not inputs[2].grad[i, :, r:].any()


@pytest.mark.parametrize("m,n", [(3, 5), (5, 5), (9, 3)], ids=["rows<n", "rows=n", "rows>n"])
def test_both_forms_of_the_spec_are_the_definition(m, n):
    """reference.multi_lora_delta gathers per row (M <= n) or goes through the stacked
    adapters (M > n); each, and its gradient (multi_lora_delta_grad), is the row-by-row
    definition, in float64."""
    gen = torch.Generator().manual_seed(6)
    x, A, B = (torch.randn(*shape, generator=gen, dtype=torch.float64)
               for shape in ((m, 24), (n, 4, 24), (n, 10, 4)))
    scalings = torch.rand(n, generator=gen) + 0.5
    index = torch.randint(-1, n, (m,), generator=gen)
    index[0] = -1
    grad = torch.randn(m, 10, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    rows = [leaves[0][k] @ leaves[1][i].T @ leaves[2][i].T * scalings[i].double() if i >= 0
            else torch.zeros(10, dtype=torch.float64) for k, i in enumerate(index.tolist())]
    definition = torch.stack(rows)
    definition.backward(grad)
    torch.testing.assert_close(reference.multi_lora_delta(x, A, B, scalings, index), definition)
    for got, leaf in zip(reference.multi_lora_delta_grad(grad, x, A, B, scalings, index), leaves):
        torch.testing.assert_close(got, leaf.grad)


def test_each_row_is_its_own_single_adapter_call():
    packed, state, _ = weight()
    As, Bs = adapters((3, 8), 37, 192, torch.float32)
    A, B = nf4lora.pad_adapters(As, Bs)
    x = torch.randn(2, 3, 192, generator=torch.Generator().manual_seed(4))   # leading dims
    idx = torch.tensor([[1, -1, 0], [0, 1, 1]])
    y = nf4lora.multi_lora_matmul_4bit(x, packed, state, A, B, [2.0, 0.25], idx)
    assert y.shape == (2, 3, 37)
    for b in range(2):
        for m in range(3):
            i = int(idx[b, m])
            single = (nf4lora.matmul_4bit(x[b, m:m + 1], packed.t(), state) if i < 0 else
                      nf4lora.lora_matmul_4bit(x[b, m:m + 1], packed, state, As[i], Bs[i],
                                               [2.0, 0.25][i]))
            torch.testing.assert_close(y[b, m:m + 1], single, rtol=1e-5, atol=1e-5)


def test_the_registered_op(backend):
    packed, state, W = weight()
    A, B = nf4lora.pad_adapters(*adapters((3, 8), 37, 192, torch.float32))
    gen = torch.Generator().manual_seed(5)
    x, bias = torch.randn(5, 192, generator=gen), torch.randn(37, generator=gen)
    scalings, index = torch.tensor([2.0, 0.25]), torch.tensor([1, -1, 0, 1, 1])
    args = (x, *PackedWeight.from_state(packed, state).op_args(), A, B, scalings, index, bias)
    torch.library.opcheck(torch.ops.nf4lora.multi_lora_matmul_4bit.default, args)
    expected = reference.multi_lora_matmul_4bit(x, W.float(), A, B, scalings, index, bias)
    torch.testing.assert_close(torch.ops.nf4lora.multi_lora_matmul_4bit(*args), expected,
                               rtol=1e-5, atol=1e-5)


def test_compiles_as_one_graph_forward_and_backward():
    packed, state, _ = weight()
    A, B = nf4lora.pad_adapters(*adapters((3, 8), 37, 192, torch.float32))
    index = torch.tensor([1, -1, 0, 1])

    def f(x, A, B):
        return nf4lora.multi_lora_matmul_4bit(x, packed, state, A, B, [2.0, 0.25], index).square().sum()

    leaves = [t.clone().requires_grad_() for t in (torch.randn(4, 192), A, B)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(f(*leaves), leaves)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("change,error,match", [
    (dict(index=torch.tensor([0, 2])), ValueError, r"adapter_index must lie in \[-1, 1\]"),
    (dict(index=torch.tensor([0, -2])), ValueError, r"adapter_index must lie in \[-1, 1\]"),
    (dict(index=torch.tensor([0.0, 1.0])), TypeError, "adapter_index must be an integer tensor"),
    (dict(index=torch.tensor([0, 1, 1])), ValueError, "adapter_index must have x's leading shape"),
    (dict(B=torch.zeros(2, 37, 5)), ValueError, "lora_B must be"),
    (dict(A=torch.zeros(2, 4, 100)), ValueError, "lora_A must be"),
    (dict(scalings=[1.0]), ValueError, "scalings must hold one number per adapter"),
    (dict(A=torch.zeros(2, 4, 192, dtype=torch.float64)), TypeError, "lora_A must have the dtype of the activations"),
    (dict(index=torch.tensor([True, False])), TypeError, "adapter_index must be an integer tensor"),
    (dict(index=torch.tensor([0, 1], device="meta")), ValueError,
     "adapter_index must be on the activations' device"),
    (dict(A=torch.zeros(0, 4, 192), B=torch.zeros(0, 37, 4), scalings=[], index=torch.tensor([-1, -1])),
     ValueError, "at least one adapter"),
])
def test_bad_input_is_a_clear_error(change, error, match):
    packed, state, _ = weight()
    args = dict(A=torch.zeros(2, 4, 192), B=torch.zeros(2, 37, 4), scalings=[1.0, 2.0],
                index=torch.tensor([0, 1]))
    args.update(change)
    with pytest.raises(error, match=match):
        nf4lora.multi_lora_matmul_4bit(torch.zeros(2, 192), packed, state, args["A"], args["B"],
                                       args["scalings"], args["index"])


def test_pad_adapters_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="as many lora_A as lora_B"):
        nf4lora.pad_adapters([torch.zeros(2, 8)], [])
    with pytest.raises(ValueError, match="adapter 1"):
        nf4lora.pad_adapters([torch.zeros(2, 8), torch.zeros(3, 8)],
                             [torch.zeros(5, 2), torch.zeros(5, 2)])


# ---- the cpu backend's fused kernel (_C.multi_lora_gemv_4bit) --------------------------
# Each row's adapter inside the fused GEMV: its h (phase 2) and epilogue read that row's
# adapter of the stack. Checked against the float64 spec within the same-dtype baseline
# (the CPU's best SIMD path, both decoder families), bit for bit against the
# single-adapter kernel on the same rows on every SIMD path and decoder this CPU has (the
# fixtures of test_cpu_matmul.py, which checks each path's accuracy), and that no fallback
# ran.

needs_cpu = pytest.mark.skipif(cpu_backend.availability() is not None,
                               reason=str(cpu_backend.availability()))


@pytest.fixture
def cpu_kernel(monkeypatch):
    """The cpu backend, its composite fallback turned into an error: what passes ran the
    fused kernel."""
    def no_fallback(*args, **kwargs):
        raise AssertionError("the cpu backend fell back to the composite path")
    monkeypatch.setattr(composite, "multi_lora_matmul_4bit", no_fallback)
    nf4lora.set_backend("cpu")
    yield
    nf4lora.set_backend(None)


def mixed_batch(M, ranks, dtype, out_f=37, in_f=192, blocksize=64, seed=7):
    """(packed, state, W float64, x, A, B, bias, scalings tensor, index): index has -1 and
    repeats wherever M allows, the adapters' ranks padded to the largest."""
    gen = torch.Generator().manual_seed(seed)
    packed, state = nf.quantize_4bit(torch.randn(out_f, in_f, generator=gen), blocksize=blocksize,
                                     compress_statistics=True)
    A, B = nf4lora.pad_adapters(*adapters(ranks, out_f, in_f, dtype, seed=seed + 1))
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen).to(dtype)
    n = len(ranks)
    index = torch.tensor([(m * 5 + 2) % (n + 1) - 1 for m in range(M)])   # -1 .. n-1, cycling
    scalings = torch.tensor([0.5 + 0.75 * i for i in range(n)])
    return (packed, state, nf.dequantize_4bit(packed, state).double(), x, A, B, bias, scalings,
            index)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", range(1, 10))   # every tile height, and 8 + 1
@pytest.mark.parametrize("ranks", [(1, 70, 5), (16,) * 3], ids=["r1-70-5", "r16"])
def test_cpu_kernel_matches_the_spec(cpu_kernel, sums, dtype, M, ranks):
    packed, state, W, x, A, B, bias, scalings, index = mixed_batch(M, ranks, dtype)
    assert cpu_backend.matmul_path(M, PackedWeight.from_state(packed, state), dtype) == "fused"
    y = nf4lora.multi_lora_matmul_4bit(x, packed, state, A, B, scalings, index, bias)
    exact = reference.multi_lora_matmul_4bit(x.double(), W, A.double(), B.double(), scalings,
                                             index, bias.double())
    base = reference.multi_lora_matmul_4bit(x, W.to(dtype), A, B, scalings, index, bias)
    assert_within_baseline(y, base, exact, dtype, f"y M={M} {sums}")


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,in_f,out_f,blocksize", [(8, 1088, 23, 64), (11, 2112, 40, 32),
                                                    (4, 1024, 17, 1024)])
def test_cpu_kernel_rows_are_the_single_adapter_kernel(cpu_kernel, isa, sums, dtype, M, in_f,
                                                       out_f, blocksize):
    """Row m with adapter i has the bytes of the single-adapter kernel on the same x with
    adapter i (a -1 row: of the matmul without adapter): one kernel, the adapter per row.
    The shapes take the 8-row tile's K slices, a short last tile, a block of 1024."""
    packed, state, _, x, A, B, bias, scalings, index = mixed_batch(
        M, (3, 8, 1), dtype, out_f, in_f, blocksize)
    y = nf4lora.multi_lora_matmul_4bit(x, packed, state, A, B, scalings, index, bias)
    weight = PackedWeight.from_state(packed, state).with_offset_read()
    for i in range(-1, A.shape[0]):
        rows = index == i
        single = (cpu_backend.lora_matmul_4bit(x, weight, None, None, 1.0, bias)[0] if i < 0 else
                  cpu_backend.lora_matmul_4bit(x, weight, A[i], B[i], float(scalings[i]), bias)[0])
        assert torch.equal(y[rows], single[rows]), (i, isa, sums)


@needs_cpu
def test_cpu_kernel_bytes_do_not_depend_on_threads(cpu_kernel):
    packed, state, _, x, A, B, bias, scalings, index = mixed_batch(
        7, (16, 4, 9), torch.bfloat16, out_f=1000, in_f=512)
    results = []
    try:
        for threads in (1, 2, 1, 2):
            cpu_backend._C.set_num_threads(threads)
            results.append(nf4lora.multi_lora_matmul_4bit(x, packed, state, A, B, scalings, index,
                                                          bias))
    finally:
        cpu_backend._C.set_num_threads(0)
    for y in results[1:]:
        assert torch.equal(y, results[0])


@needs_cpu
def test_cpu_large_batches_take_the_composite_path(monkeypatch):
    """Beyond the fused kernel's rows (matmul_path): the dequantize+gemm matmul, then the
    adapters gathered (composite), still the spec."""
    M = cpu_backend.fused_max_m(torch.float32) + 1
    packed, state, W, x, A, B, bias, scalings, index = mixed_batch(M, (2, 6), torch.float32)
    calls = []
    original = composite.multi_lora_matmul_4bit
    monkeypatch.setattr(composite, "multi_lora_matmul_4bit",
                        lambda *args: calls.append(1) or original(*args))
    nf4lora.set_backend("cpu")
    try:
        y = nf4lora.multi_lora_matmul_4bit(x, packed, state, A, B, scalings, index, bias)
    finally:
        nf4lora.set_backend(None)
    assert calls == [1]
    exact = reference.multi_lora_matmul_4bit(x.double(), W, A.double(), B.double(), scalings,
                                             index, bias.double())
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)


@needs_cpu
@pytest.mark.parametrize("change,match", [
    (dict(index=torch.tensor([0, 2])), "adapter index out of range"),
    (dict(index=torch.tensor([-2, 0])), "adapter index out of range"),
    (dict(index=torch.tensor([0, 1], dtype=torch.int32)), "adapter_index must be torch.int64"),
    (dict(index=torch.tensor([0])), "adapter_index holds 1 elements, the batch needs 2"),
    (dict(scalings=torch.ones(1)), "scalings holds 1 elements, the adapter stack needs 2"),
    (dict(scalings=torch.ones(2, dtype=torch.float64)), "scalings must be torch.float32"),
    (dict(A=None), "a mixed-adapter batch needs lora_A"),
])
def test_cpu_kernel_guards_its_reads(change, match):
    """The binding and kernel check what would read out of bounds, for callers that skip the
    op's checks."""
    packed, state = weight()[:2]
    args = dict(A=torch.zeros(2, 4, 192), B=torch.zeros(2, 37, 4), scalings=torch.ones(2),
                index=torch.tensor([0, 1]))
    args.update(change)
    packed_weight = PackedWeight.from_state(packed, state).with_offset_read()
    with pytest.raises(ValueError, match=match):
        cpu_backend._C.multi_lora_gemv_4bit(torch.zeros(2, 192), packed_weight, args["A"],
                                            args["B"], args["scalings"], args["index"], None,
                                            torch.empty(2, 37), torch.empty(2, 4))
