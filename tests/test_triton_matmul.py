"""The Triton matmul kernels against float64: run by Triton's interpreter on CPU tensors,
and (the `gpu` variants, scripts/gpu_check.sh) compiled, on CUDA tensors.

  lora_matmul.py           fused dequantize-matmul + LoRA + bias (16 < M <= FUSED_MAX_M),
                           split-K mode + its reduction kernel
  gemv.py                  split-K GEMV + LoRA + bias, deterministic two-pass (M <= 16)
  lora_matmul_backward.py  dx = dy @ W + grad_h @ A with W read packed (split-K too)

Devices: every kernel test takes the `device` fixture, "cpu" (the interpreter) or
"cuda" (marked gpu). One process runs one of them: Triton fixes interpreter or compiler
when the kernels are imported, so without a GPU (or with TRITON_INTERPRET=1) the "cuda"
variants skip, and with a GPU and TRITON_INTERPRET unset (`pytest -m gpu` on this file
alone, as scripts/gpu_check.sh runs it) the "cpu" variants skip. The yardsticks are
always computed on the CPU.

Accuracy rule (flash-attention's): the exact answer is float64 arithmetic on the
float32 dequantized reference weight. The same computation in the test's dtype with
torch ops (the composite path: W dequantized to that dtype, F.linear, addmm) has some
error against it; the kernel's error must be at most twice that, plus one ulp of the
output's scale (for cases where torch happens to be exact). Both errors are printed.

The interpreter runs each program as numpy calls (0.2-0.6 s per launch here), so shapes
stay small (K, N <= 200) and the cross product is sampled, not taken whole: every M
path x dtype x nested is covered with LoRA and bias, and each other axis (blocksize,
shape, quant type, LoRA/bias on/off, rank, split count) is swept around it.
"""
import importlib
import os

import pytest  # noqa: E402
import torch  # noqa: E402

# Must precede the first import of triton_kernels: Triton picks interpreter or compiler
# when `@triton.jit` runs. Where a GPU exists the environment decides (module docstring).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
import torch.nn.functional as F  # noqa: E402

import nf4lora  # noqa: E402
import nf4lora.functional as nf  # noqa: E402
from nf4lora import codebook, reference  # noqa: E402
from nf4lora.backends import NestedAbsmax, PackedWeight, composite  # noqa: E402
from nf4lora.backends import reference as reference_backend  # noqa: E402
from nf4lora.backends import triton as triton_backend  # noqa: E402
from nf4lora.codebook import create_dynamic_map  # noqa: E402

if triton_backend.availability() is not None:
    pytest.skip(f"triton backend unavailable: {triton_backend.availability()}",
                allow_module_level=True)

kernels = triton_backend._kernels
routing = triton_backend   # matmul_path, fused_splits, GEMV_MAX_M, FUSED_MAX_M, PATH_*
roofline = importlib.import_module("nf4lora.roofline")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """The device the kernels run on (module docstring)."""
    if request.param == "cpu" and not triton_backend.INTERPRETING:
        pytest.skip("the kernels were imported compiled (TRITON_INTERPRET unset): CPU "
                    "tensors need the interpreter")
    if request.param == "cuda" and (triton_backend.INTERPRETING
                                    or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA device and the compiled kernels (TRITON_INTERPRET unset): "
                    "scripts/gpu_check.sh runs these")
    return torch.device(request.param)


def to_device(value, device):
    """A tensor, PackedWeight, QuantState or None on `device` (a copy)."""
    if value is None or device.type == "cpu":
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, PackedWeight):
        nested = value.nested
        if nested is not None:
            nested = nested._replace(absmax=nested.absmax.to(device),
                                     code=nested.code.to(device))
        return value._replace(packed=value.packed.to(device), absmax=value.absmax.to(device),
                              nested=nested)
    return type(value).from_dict(value.as_dict(packed=True), device)   # a QuantState

DYNAMIC_CODE = create_dynamic_map()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------------------
# Inputs and the two yardsticks (float64 exact, same-dtype torch).
# ----------------------------------------------------------------------------------------

def make_weight(n, k, blocksize, nested, quant_type="nf4", seed=0):
    """(PackedWeight [n, k], its float32 dequantization per the reference)."""
    gen = torch.Generator().manual_seed(seed)
    packed, absmax = reference.quantize_4bit(torch.randn(n, k, generator=gen), blocksize,
                                             quant_type)
    nested_absmax = None
    if nested:
        qabsmax, absmax2, offset = reference.double_quantize(absmax, DYNAMIC_CODE)
        nested_absmax = NestedAbsmax(absmax2, DYNAMIC_CODE, float(offset), 256)
        absmax = reference.dequantize_absmax(qabsmax, absmax2, DYNAMIC_CODE, float(offset))
        stored_absmax = qabsmax
    else:
        stored_absmax = absmax
    dense = reference.dequantize_4bit(packed, absmax, blocksize, quant_type, (n, k),
                                      torch.float32)
    return PackedWeight(packed, stored_absmax, blocksize, quant_type, (n, k), nested_absmax), dense


def make_inputs(m, n, k, r, dtype, bias, seed=1):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    x = rnd(m, k)
    lora_A = rnd(r, k, scale=k ** -0.5) if r is not None else None
    lora_B = rnd(n, r, scale=r ** -0.5 if r else 1.0) if r is not None else None
    return x, lora_A, lora_B, (rnd(n) if bias else None)


def exact_forward(x, dense, lora_A, lora_B, scaling, bias):
    """(y, h) in float64 from the float32 dequantized weight: no rounding anywhere."""
    x = x.double()
    y = x @ dense.double().T
    h = None
    if lora_A is not None:
        h = x @ lora_A.double().T
        y = y + scaling * (h @ lora_B.double().T)
    if bias is not None:
        y = y + bias.double()
    return y, h


def torch_forward(x, weight, lora_A, lora_B, scaling, bias):
    """The same-dtype torch computation: the composite path over the reference backend."""
    return composite.lora_matmul_4bit(reference_backend, x, weight, lora_A, lora_B, scaling,
                                      bias)


def assert_close_to_exact(ours, torch_result, exact, dtype, label):
    """err(ours) <= 2 * err(torch, same dtype) + one ulp of the output's scale."""
    assert ours.shape == exact.shape and ours.dtype == dtype, (label, ours.shape, ours.dtype)
    our_error = (ours.double() - exact).abs().max().item() if exact.numel() else 0.0
    torch_error = (torch_result.double() - exact).abs().max().item() if exact.numel() else 0.0
    ulp = torch.finfo(dtype).eps * (exact.abs().max().item() if exact.numel() else 0.0)
    assert our_error <= 2 * torch_error + ulp, (
        f"{label}: error {our_error:.3g} vs float64; same-dtype torch {torch_error:.3g}, "
        f"ulp term {ulp:.3g}")


def check_forward(device, m, n, k, blocksize, dtype, nested, r, bias, quant_type="nf4",
                  scaling=0.5, path=None, splits=None):
    weight, dense = make_weight(n, k, blocksize, nested, quant_type)
    x, lora_A, lora_B, b = make_inputs(m, n, k, r, dtype, bias)
    y, h = triton_backend.lora_matmul_4bit(
        *(to_device(t, device) for t in (x, weight, lora_A, lora_B)), scaling,
        to_device(b, device), path=path, splits=splits)
    y, h = y.cpu(), h.cpu()
    y_torch, h_torch = torch_forward(x, weight, lora_A, lora_B, scaling, b)
    y_exact, h_exact = exact_forward(x, dense, lora_A, lora_B, scaling, b)
    label = (f"{device.type} M={m} N={n} K={k} bs={blocksize} {DTYPE_IDS[dtype]} "
             f"nested={nested} r={r} bias={bias} {quant_type} "
             f"path={path or routing.matmul_path(m, n, k, None)} splits={splits}")
    assert_close_to_exact(y, y_torch, y_exact, dtype, label + " y")
    if lora_A is None:
        assert h.shape == (m, 0), label
    else:
        assert_close_to_exact(h, h_torch, h_exact, dtype, label + " h")
    return y, h


# ----------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------

# (N, K, blocksize): no dimension a multiple of a tile (64) or of 16 where avoidable;
# K % blocksize != 0 in the first two, so quantization blocks straddle rows of W, and
# K < blocksize in the third, so one block spans several rows.
SHAPES = [(97, 150, 32), (70, 200, 64), (130, 98, 256)]
MS = (1, 3, 17, 64)   # gemv M == 1 (CUDA cores), gemv padded to 16, fused, fused full tile


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("m", MS)
def test_forward_every_path_dtype_and_nesting(device, m, dtype, nested):
    n, k, blocksize = SHAPES[(MS.index(m) + DTYPES.index(dtype)) % len(SHAPES)]
    check_forward(device, m, n, k, blocksize, dtype, nested, r=5, bias=True)


@pytest.mark.parametrize("k", [64, 150, 192])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("m", [3, 17])
def test_forward_blocksizes_and_row_layouts(device, m, blocksize, k):
    # fp32: the tightest tolerance, where a wrong absmax for a few elements shows.
    check_forward(device, m, 45, k, blocksize, torch.float32, nested=True, r=4, bias=False)


@pytest.mark.parametrize("has_lora,bias", [(False, False), (False, True), (True, False),
                                           (True, True)], ids=["plain", "bias", "lora",
                                                               "lora+bias"])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_forward_lora_and_bias_on_and_off(device, m, has_lora, bias):
    # r = 20: two LoRA chunks of 16, the second partial.
    check_forward(device, m, 81, 128, 64, torch.float16, nested=True,
                  r=20 if has_lora else None, bias=bias)


@pytest.mark.parametrize("m,r", [(3, 70), (17, 70), (1, 1), (17, 0)])
def test_forward_ranks(device, m, r):
    # r = 70: two LoRA-shrink tiles in the GEMV, five expand chunks; r = 1; r = 0.
    check_forward(device, m, 66, 96, 64, torch.bfloat16, nested=False, r=r, bias=True)


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_forward_fp4(device, m, nested):
    check_forward(device, m, 50, 160, 64, torch.float16, nested, r=3, bias=True,
                  quant_type="fp4")


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("quant_type", ["iq4nl", "custom"])
def test_forward_code_books(device, m, quant_type):
    # the kernels read the 16-entry table as data: any code book (a custom one by its key)
    key = codebook.format_key("custom", torch.linspace(-0.9, 0.8, 16)) if quant_type == "custom" else quant_type
    check_forward(device, m, 50, 160, 64, torch.bfloat16, True, r=3, bias=True, quant_type=key)


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 5])
def test_gemv_split_k_is_accurate_and_deterministic(device, m, splits):
    # K = 320: 3 steps of 128 (M == 1) or 5 of 64 (M = 5), so every split count is real.
    first = check_forward(device, m, 90, 320, 64, torch.bfloat16, nested=True, r=6,
                          bias=True, path="gemv", splits=splits)
    second = check_forward(device, m, 90, 320, 64, torch.bfloat16, nested=True, r=6,
                           bias=True, path="gemv", splits=splits)
    for a, b in zip(first, second):   # a fixed reduction order: the same bits every run
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


# The fused kernels' split-K mode. K = 320 is 5 steps of 64 (fp16/bf16) or 10 of 32
# (fp32), so 2 and 3 slices are uneven, and 5 of 64 leaves one step per slice.
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_fused_split_k_is_accurate_and_deterministic(device, dtype, splits):
    nested = splits != 3
    args = (device, 17, 90, 320, 64, dtype, nested)
    first = check_forward(*args, r=20, bias=True, path="fused", splits=splits)
    second = check_forward(*args, r=20, bias=True, path="fused", splits=splits)
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    for a, b in zip(first, second):   # a fixed reduction order: the same bits every run
        assert torch.equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize("has_lora,bias", [(False, False), (False, True), (True, False)],
                         ids=["plain", "bias", "lora"])
def test_fused_split_k_lora_and_bias_on_and_off(device, has_lora, bias):
    # M = 64: one full M tile; N = 130: a partial N tile, so the reduction masks columns.
    check_forward(device, 64, 130, 256, 32, torch.bfloat16, nested=False,
                  r=20 if has_lora else None, bias=bias, path="fused", splits=2)


def test_fused_split_heuristic():
    split = routing.fused_splits
    # H100, 132 SMs. 4096 x 4096: 64 tiles of 64 columns, 64 steps of 64 -> 2 slices (one
    # wave of 128 programs); 11008 outputs: 172 tiles -> 3 (516 programs, 4 waves of 1/3).
    assert split(64, 64, 132) == 2
    assert split(172, 64, 132) == 3
    # Enough tiles already (fp32's 32-wide tiles: 128), or too short a reduction (K = 512:
    # 8 steps, one slice of MIN_K_STEPS_PER_SPLIT): no split.
    assert split(128, 64, 132) == 1
    assert split(64, 8, 132) == 1
    # Never more than MAX_SPLITS, nor slices shorter than MIN_K_STEPS_PER_SPLIT steps.
    for tiles in (1, 5, 64, 133, 1000):
        for steps in (1, 16, 64, 172, 10_000):
            s = split(tiles, steps, 132)
            assert 1 <= s <= routing.MAX_SPLITS
            assert s == 1 or steps // s >= routing.MIN_K_STEPS_PER_SPLIT
    previous = routing.SPLIT_K_ENABLED
    routing.SPLIT_K_ENABLED = False
    try:
        assert split(64, 64, 132) == 1
    finally:
        routing.SPLIT_K_ENABLED = previous


def test_gemv_split_heuristic():
    # 4096 x 4096 on a 132-SM H100 with BLOCK_N = 64: 65 tiles (one of them the LoRA shrink).
    splits, k_per_split = kernels.gemv.num_splits(1, 4096, 65, 132, 128)
    assert splits > 1 and k_per_split % 128 == 0 and splits * k_per_split >= 4096
    assert (splits - 1) * k_per_split < 4096                      # no empty split
    # M = 16: each split's K slice >= 64 * M, so the fp32 workspace stays <= 1/4 of W.
    splits, k_per_split = kernels.gemv.num_splits(16, 4096, 65, 132, 64)
    assert k_per_split >= 64 * 16
    assert kernels.gemv.num_splits(1, 100, 1000, 132, 128) == (1, 128)


# ----------------------------------------------------------------------------------------
# Backward dx.
# ----------------------------------------------------------------------------------------

def check_grad_input(device, m, n, k, blocksize, dtype, nested, r, scaling=0.5, path=None,
                     splits=None, quant_type="nf4"):
    weight, dense = make_weight(n, k, blocksize, nested, quant_type)
    _, lora_A, lora_B, _ = make_inputs(m, n, k, r, dtype, bias=False)
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(m, n, generator=gen).to(dtype)
    grad_h = None if lora_A is None else ((grad @ lora_B) * scaling)
    dx = triton_backend.lora_matmul_4bit_grad_input(
        *(to_device(t, device) for t in (grad, weight, lora_A, grad_h)), path=path,
        splits=splits).cpu()
    dx_torch = composite.lora_matmul_4bit_grad_input(reference_backend, grad, weight, lora_A,
                                                     grad_h)
    dx_exact = grad.double() @ dense.double()
    if lora_A is not None:
        dx_exact = dx_exact + grad_h.double() @ lora_A.double()
    assert_close_to_exact(dx, dx_torch, dx_exact, dtype,
                          f"dx {device.type} M={m} N={n} K={k} bs={blocksize} "
                          f"{DTYPE_IDS[dtype]} nested={nested} r={r} splits={splits}")
    return dx


@pytest.mark.parametrize("m", [1, 17])
def test_grad_input_code_book(device, m):
    # the backward kernels read the same table argument as the forward ones
    key = codebook.format_key("custom", torch.linspace(-0.9, 0.8, 16))
    check_grad_input(device, m, 50, 160, 64, torch.bfloat16, nested=True, r=3, quant_type=key)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("m", MS)
def test_grad_input(device, m, dtype):
    n, k, blocksize = SHAPES[(MS.index(m) + DTYPES.index(dtype)) % len(SHAPES)]
    check_grad_input(device, m, n, k, blocksize, dtype,
                     nested=bool((MS.index(m) + DTYPES.index(dtype)) % 2), r=20)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_grad_input_without_lora(device, dtype):
    check_grad_input(device, 3, 97, 150, 32, dtype, nested=True, r=None)


# Split-K over the reduction axis (N = out_features): N = 330 is 6 steps of 64 (fp16/bf16)
# or 11 of 32 (fp32), uneven slices for 2 and 4; K = 150 leaves a partial dx tile.
@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("m,r", [(1, 20), (17, None)], ids=["M1-lora", "M17-plain"])
def test_grad_input_split_k_is_accurate_and_deterministic(device, m, r, dtype, splits):
    args = (device, m, 330, 150, 64, dtype, dtype != torch.float16, r)
    first = check_grad_input(*args, path="fused", splits=splits)
    second = check_grad_input(*args, path="fused", splits=splits)
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(first.view(bits), second.view(bits))


# ----------------------------------------------------------------------------------------
# Autograd through the public API with the triton backend.
# ----------------------------------------------------------------------------------------

@pytest.fixture
def triton_selected():
    nf4lora.set_backend("triton")
    yield
    nf4lora.set_backend(None)


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records `kernel[grid]` launches by name."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    log = []
    for module, name in ((kernels.gemv, "gemv_split_k_kernel"),
                         (kernels.lora_matmul, "lora_matmul_kernel"),
                         (kernels.lora_matmul, "split_k_reduce_kernel"),
                         (kernels.lora_matmul_backward, "lora_matmul_grad_input_kernel")):
        monkeypatch.setattr(module, name, _LaunchSpy(getattr(module, name), name, log))
    return log


def _quantized(out_f, in_f, blocksize, seed=0):
    gen = torch.Generator().manual_seed(seed)
    selected = nf4lora.get_backend()
    nf4lora.set_backend("reference")   # quantized by the spec, not by the code under test
    try:
        packed, state = nf.quantize_4bit(torch.randn(out_f, in_f, generator=gen),
                                         blocksize=blocksize, compress_statistics=True,
                                         quant_type="nf4")
        dense = nf.dequantize_4bit(packed, state).float()
    finally:
        nf4lora.set_backend(selected)
    return packed, state, dense


def _leaves_and_grads(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in tensors]
    y = fn(*leaves)
    y.backward(grad.to(y.dtype))
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def _dense_lora(dense, scaling):
    def fn(x, lora_A, lora_B, bias):
        return (F.linear(x, dense.to(x.dtype), bias)
                + F.linear(F.linear(x, lora_A), lora_B) * scaling)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 9)], ids=["M1", "M3", "M18"])
def test_autograd_grads_through_lora_matmul_4bit(device, lead, dtype, triton_selected,
                                                 launches):
    out_f, in_f, r, scaling = 70, 130, 6, 2.0
    m = lead[0] * (lead[1] if len(lead) > 1 else 1)
    assert routing.matmul_path(m, out_f, in_f, None) in (routing.PATH_GEMV, routing.PATH_FUSED)
    packed, state, dense = _quantized(out_f, in_f, 64)
    gen = torch.Generator().manual_seed(3)
    x, lora_A, lora_B, bias = (torch.randn(*shape, generator=gen).to(dtype) for shape in
                               ((*lead, in_f), (r, in_f), (out_f, r), (out_f,)))
    lora_A, lora_B = lora_A * in_f ** -0.5, lora_B * r ** -0.5
    grad = torch.randn(*lead, out_f, generator=gen).to(dtype)
    packed.requires_grad_(False)
    on_device = [to_device(t, device) for t in (x, lora_A, lora_B, bias, grad)]
    packed_on, state_on = to_device(packed, device), to_device(state, device)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = _leaves_and_grads(
            lambda x, a, b, c: nf4lora.lora_matmul_4bit(x, packed_on, state_on, a, b,
                                                        scaling, c),
            on_device[:4], on_device[4])
    ours = [t.cpu() for t in ours]
    # Saved for backward: the packed weight and its state, never a dense W.
    assert all(tuple(t.shape) != (out_f, in_f) for t in saved)
    # The GEMV's second pass is the split-K reduction (with h from its workspace).
    forward = (["gemv_split_k_kernel", "split_k_reduce_kernel"] if m <= routing.GEMV_MAX_M
               else ["lora_matmul_kernel"])
    assert launches == forward + ["lora_matmul_grad_input_kernel"]
    baseline = _leaves_and_grads(_dense_lora(dense, scaling), (x, lora_A, lora_B, bias), grad)
    exact = _leaves_and_grads(_dense_lora(dense.double(), scaling),
                              [t.double() for t in (x, lora_A, lora_B, bias)], grad.double())
    for name, o, base, ex in zip(("y", "dx", "dA", "dB", "dbias"), ours, baseline, exact):
        assert_close_to_exact(o, base, ex, dtype, f"autograd {lead} {DTYPE_IDS[dtype]} {name}")
    assert packed_on.grad is None


def test_autograd_matmul_4bit_without_lora(device, triton_selected):
    packed, state, dense = _quantized(33, 98, 32)
    x = torch.randn(5, 98, dtype=torch.float16)
    bias = torch.randn(33, dtype=torch.float16)
    x_on, bias_on = (to_device(t, device).requires_grad_(True) for t in (x, bias))
    y = nf4lora.matmul_4bit(x_on, to_device(packed, device).t(), to_device(state, device),
                            bias=bias_on)
    grad = torch.randn(5, 33, dtype=torch.float16)
    dx, dbias = (t.cpu() for t in torch.autograd.grad(y, (x_on, bias_on),
                                                      to_device(grad, device)))
    y = y.detach().cpu()
    exact = x.double() @ dense.double().T + bias.double()
    assert_close_to_exact(y, F.linear(x, dense.half(), bias), exact, torch.float16, "y")
    assert_close_to_exact(dx, grad @ dense.half(), grad.double() @ dense.double(),
                          torch.float16, "dx")
    torch.testing.assert_close(dbias, grad.sum(0))


# ----------------------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------------------

def test_dispatch_thresholds():
    choose = routing.matmul_path
    h100, a100, turing = (9, 0), (8, 0), (7, 5)
    assert choose(1, 4096, 4096, h100) == choose(16, 4096, 4096, h100) == routing.PATH_GEMV
    assert choose(17, 4096, 4096, h100) == choose(64, 4096, 4096, h100) == routing.PATH_FUSED
    assert choose(65, 4096, 4096, h100) == routing.PATH_COMPOSITE
    assert choose(39, 4096, 4096, a100) == routing.PATH_FUSED
    assert choose(40, 4096, 4096, a100) == routing.PATH_COMPOSITE
    assert choose(1, 4096, 4096, turing) == routing.PATH_COMPOSITE   # no bf16 MMA before sm_80
    assert choose(1, 4096, 4095, h100) == routing.PATH_COMPOSITE     # odd in_features
    assert choose(0, 4096, 4096, h100) == routing.PATH_COMPOSITE
    # The thresholds are the roofline ridge points (H100 capped at one 64-row M tile).
    assert routing.FUSED_MAX_M[8] == int(roofline.memory_bound_max_m(roofline.A100))
    assert routing.FUSED_MAX_M[9] == min(int(roofline.memory_bound_max_m(roofline.H100)),
                                       kernels.lora_matmul.TILES["bf16"][0])


@pytest.mark.parametrize("m,k", [(65, 96), (3, 97), (0, 96)], ids=["large-M", "odd-K", "empty"])
def test_composite_fallback_is_the_composite_path(m, k):
    weight, _ = make_weight(40, k, 32, nested=True)
    x, lora_A, lora_B, bias = make_inputs(m, 40, k, 4, torch.float32, bias=True)
    y, h = triton_backend.lora_matmul_4bit(x, weight, lora_A, lora_B, 0.5, bias)
    y_torch, h_torch = torch_forward(x, weight, lora_A, lora_B, 0.5, bias)
    assert torch.equal(y, y_torch) and torch.equal(h, h_torch)
    grad = torch.randn(m, 40)
    dx = triton_backend.lora_matmul_4bit_grad_input(grad, weight, lora_A, grad @ lora_B)
    assert torch.equal(dx, composite.lora_matmul_4bit_grad_input(
        reference_backend, grad, weight, lora_A, grad @ lora_B))


def test_forced_path_errors_name_the_constraint():
    weight, _ = make_weight(40, 97, 32, nested=False)
    x = torch.randn(3, 97)
    with pytest.raises(ValueError, match="even in_features"):
        triton_backend.lora_matmul_4bit(x, weight, None, None, 1.0, None, path="fused")
    weight, _ = make_weight(40, 96, 32, nested=False)
    with pytest.raises(ValueError, match="M <= 16"):
        triton_backend.lora_matmul_4bit(torch.randn(17, 96), weight, None, None, 1.0, None,
                                        path="gemv")


# ----------------------------------------------------------------------------------------
# Roofline.
# ----------------------------------------------------------------------------------------

def test_roofline_ridge_points_and_report():
    assert roofline.memory_bound_max_m(roofline.H100) == pytest.approx(76.15, abs=0.01)
    assert roofline.memory_bound_max_m(roofline.A100) == pytest.approx(39.47, abs=0.01)
    rows = roofline.roofline_rows()
    kernel_names = {row["kernel"] for row in rows}
    assert {"gemv_split_k", "lora_matmul", "lora_matmul_grad_input", "composite"} <= kernel_names
    assert all(row["bytes"] > 0 and row["flops"] > 0 and row["ideal_us"] > 0 for row in rows)
    # The fused path moves ~1/8 of the composite path's bytes at decode sizes.
    by_key = {(row["kernel"], row["gpu"], row["M"], row["N"], row["K"]): row for row in rows}
    gemv = by_key[("gemv_split_k", "H100", 1, 4096, 4096)]
    comp = by_key[("composite", "H100", 1, 4096, 4096)]
    assert comp["bytes"] > 7 * gemv["bytes"]
    text = roofline.format_roofline(rows)
    assert "H100" in text and "A100" in text and "lora_matmul" in text
