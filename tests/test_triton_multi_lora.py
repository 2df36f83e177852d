"""Mixed-adapter batches in the Triton kernels (nf4lora.backends.triton.multi_lora_matmul_4bit):
each row's adapter computed inside the kernels (the GEMV's per-row shrink programs, the
fused kernel's and the split-K reduction's per-row epilogue: PER_ROW in
triton_kernels/lora_matmul.py and gemv.py), against float64 with the bound from the
same-dtype torch computation (the spec on W dequantized to that dtype), as
tests/test_triton_matmul.py does for one adapter, whose helpers and `device` fixture
(Triton's interpreter on CPU tensors, or a GPU) this file uses.

Odd shapes throughout: N = 70 and K = 96 (no multiple of a 64 tile), M = 1 (the GEMV on
CUDA cores), 5 and 16 (the GEMV's padded tensor-core tile), 19 (the fused path: two row
tiles of the shrink, the second partial) and 64 (one full fused tile), adapters of ranks
1, 70 and 5 zero-padded to 70 (five epilogue chunks, two shrink tiles), indices with -1 and
repeats, and a tile whose rows hold more adapters than another's.
"""
import pytest
import torch

import nf4lora
from nf4lora import reference
from nf4lora.backends import composite
from nf4lora.backends import reference as reference_backend

from test_triton_matmul import (DTYPE_IDS, DTYPES, _quantized, assert_close_to_exact,  # noqa: F401
                                device, kernels, launches, make_weight, routing, to_device,
                                triton_backend, triton_selected)

N, K = 70, 96
RANKS = (1, 70, 5)


def make_adapters(ranks, n, k, dtype, seed=1):
    """(lora_A [len(ranks), r_max, k], lora_B [len, n, r_max], scalings float32): adapters
    of the given ranks, zero-padded (nf4lora.pad_adapters)."""
    gen = torch.Generator().manual_seed(seed)
    As = [(torch.randn(r, k, generator=gen) * k ** -0.5).to(dtype) for r in ranks]
    Bs = [(torch.randn(n, r, generator=gen) * r ** -0.5).to(dtype) for r in ranks]
    A, B = nf4lora.pad_adapters(As, Bs)
    return A, B, torch.tensor([0.5 + i for i in range(len(ranks))])


def index_for(m, n_adapters, seed=2):
    """M indices in [-1, n_adapters - 1] with -1s and repeats: row 0 is -1, the rest drawn."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(-1, n_adapters, (m,), generator=gen)
    index[0] = -1
    return index


def check_forward(device, m, dtype, index, ranks=RANKS, nested=True, bias=True, path=None,
                  splits=None, blocksize=64):
    weight, dense = make_weight(N, K, blocksize, nested)
    A, B, scalings = make_adapters(ranks, N, K, dtype)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(m, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    y = triton_backend.multi_lora_matmul_4bit(
        *(to_device(t, device) for t in (x, weight, A, B, scalings, index, b)), path=path,
        splits=splits).cpu()
    same_dtype = composite.multi_lora_matmul_4bit(reference_backend, x, weight, A, B, scalings,
                                                  index, b)
    exact = reference.multi_lora_matmul_4bit(x.double(), dense.double(), A.double(), B.double(),
                                             scalings.double(), index,
                                             None if b is None else b.double())
    label = (f"{device.type} M={m} {DTYPE_IDS[dtype]} nested={nested} ranks={ranks} "
             f"index={index.tolist()} path={path or routing.matmul_path(m, N, K, None)} "
             f"splits={splits}")
    assert_close_to_exact(y, same_dtype, exact, dtype, label)
    return y


# Every kernel path x dtype, with nesting and bias alternating around them.
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("m", [1, 5, 16, 19, 64])
def test_forward_every_path_and_dtype(device, m, dtype):
    variant = (m + DTYPES.index(dtype)) % 2
    check_forward(device, m, dtype, index_for(m, len(RANKS)), nested=bool(variant),
                  bias=not variant)


@pytest.mark.parametrize("m", [1, 5, 19])
def test_rows_without_adapter_get_the_base_exactly(device, m):
    """All -1: no adapter term at all; the per-row binaries add exactly zero to the base."""
    index = torch.full((m,), -1)
    y = check_forward(device, m, torch.bfloat16, index)
    weight, _ = make_weight(N, K, 64, True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(m, K, generator=gen).to(torch.bfloat16)
    b = torch.randn(N, generator=gen).to(torch.bfloat16)
    base, _ = triton_backend.lora_matmul_4bit(*(to_device(t, device) for t in (x, weight)),
                                              None, None, 1.0, to_device(b, device))
    assert torch.equal(y, base.cpu())


@pytest.mark.parametrize("m,index", [
    (5, [2, 2, 2, 2, 2]),                 # one adapter, repeated: one slot with work
    (3, [1, -1, 1]),
    (19, [0] * 16 + [2, 1, 0]),           # row tile 1: one adapter; tile 2: three
])
def test_index_layouts(device, m, index):
    check_forward(device, m, torch.float16, torch.tensor(index))


@pytest.mark.parametrize("ranks", [(1,), (1, 1, 1), (16, 20)], ids=["r1", "r1x3", "r16-20"])
def test_ranks(device, ranks):
    check_forward(device, 5, torch.bfloat16, index_for(5, len(ranks)), ranks=ranks)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("path,m", [("gemv", 5), ("fused", 19)])
def test_split_k_is_accurate_and_deterministic(device, path, m, splits):
    """GEMV: the per-row shrink's partials over K slices; fused: the per-row epilogue in the
    split-K reduction. A fixed order: the same bits every run."""
    args = (device, m, torch.bfloat16, index_for(m, len(RANKS)))
    first = check_forward(*args, path=path, splits=splits)
    second = check_forward(*args, path=path, splits=splits)
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))


def test_large_m_is_the_composite_path():
    weight, _ = make_weight(N, K, 64, True)
    A, B, scalings = make_adapters(RANKS, N, K, torch.float32)
    x = torch.randn(70, K)
    index = index_for(70, len(RANKS))
    y = triton_backend.multi_lora_matmul_4bit(x, weight, A, B, scalings, index, None)
    assert routing.matmul_path(70, N, K, None) == routing.PATH_COMPOSITE
    assert torch.equal(y, composite.multi_lora_matmul_4bit(triton_backend, x, weight, A, B,
                                                           scalings, index, None))


def test_adapter_slots_and_grid():
    gemv = kernels.gemv
    config = gemv.launch_config(16, "bf16", True, per_row=True)
    # one shrink program per adapter a row tile can hold: min(adapters, rows, 16)
    assert gemv.adapter_slots(8, 8, config) == 8
    assert gemv.adapter_slots(8, 100, config) == 8
    assert gemv.adapter_slots(40, 100, config) == 16
    assert gemv.adapter_slots(40, 3, config) == 3
    assert gemv.adapter_slots(1, 0, gemv.launch_config(1, "bf16", True, per_row=True)) == 1
    # 4096 outputs = 64 W tiles, r = 16: one rank tile x 8 slots; 40 rows: 3 row tiles
    assert gemv.grid(4096, 16, 2, config, slots=8) == (72, 2, 1)
    assert gemv.grid(0, 16, 1, config, m=40, slots=16) == (16, 1, 3)


# ----------------------------------------------------------------------------------------
# Through the public API and autograd, with the triton backend.
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(5,), (2, 9)], ids=["M5", "M18"])
def test_autograd_through_the_kernels(device, lead, triton_selected, launches):
    """Forward on the per-row kernels, backward composite (the grad_input kernel for the
    base, the spec's gradient for the adapters); every gradient against float64."""
    dtype = torch.bfloat16
    packed, state, dense = _quantized(N, K, 64)
    A, B, scalings = make_adapters(RANKS, N, K, dtype)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(*lead, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    grad = torch.randn(*lead, N, generator=gen).to(dtype)
    m = x.numel() // K
    index = index_for(m, len(RANKS)).reshape(lead)

    def run(x, A, B, bias, W=None):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, bias)]
        if W is None:
            y = nf4lora.multi_lora_matmul_4bit(leaves[0], to_device(packed, device),
                                               to_device(state, device), *leaves[1:3],
                                               scalings.to(device), index, leaves[3])
        else:
            y = reference.multi_lora_matmul_4bit(leaves[0].reshape(m, K), W, *leaves[1:3],
                                                 scalings.to(W.dtype), index.reshape(-1),
                                                 leaves[3]).reshape(*lead, N)
        y.backward(grad.to(device=y.device, dtype=y.dtype))
        return [t.detach().cpu() for t in [y] + [leaf.grad for leaf in leaves]]

    ours = run(*(to_device(t, device) for t in (x, A, B, bias)))
    forward = (["gemv_split_k_kernel", "split_k_reduce_kernel"] if m <= routing.GEMV_MAX_M
               else ["gemv_split_k_kernel", "split_k_reduce_kernel", "lora_matmul_kernel"])
    assert launches == forward + ["lora_matmul_grad_input_kernel"]
    baseline = run(x, A, B, bias, dense.to(dtype))
    exact = run(x.double(), A.double(), B.double(), bias.double(), dense.double())
    for name, o, base, ex in zip(("y", "dx", "dA", "dB", "dbias"), ours, baseline, exact):
        assert_close_to_exact(o, base, ex, dtype, f"autograd {lead} {name}")
