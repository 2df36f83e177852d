"""The trial of issue 12's "add an operand" check: a per-output-row scale on the fused LoRA
matmul (DoRA's magnitude over its row norms), y = row_scale * (x W^T + s (x A^T) B^T) + bias.
Forward and every gradient (x, lora_A, lora_B, bias, row_scale) against float64 autograd
through the spec (nf4lora.reference on the dequantized weight), on every backend usable
here; a wrong row_scale is a clear error."""
from __future__ import annotations

import pytest
import torch

import nf4lora
import nf4lora.functional as nf
from nf4lora import _ops, reference
from nf4lora._weight import PackedWeight

from conftest import DTYPES


def operands(dtype, M=5, in_f=192, out_f=37, r=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed, state = nf.quantize_4bit(torch.randn(out_f, in_f, generator=gen), blocksize=64,
                                     compress_statistics=True)
    W = nf.dequantize_4bit(packed, state).double()
    tensors = [torch.randn(M, in_f, generator=gen), torch.randn(r, in_f, generator=gen) * 0.1,
               torch.randn(out_f, r, generator=gen) * 0.1, torch.randn(out_f, generator=gen),
               torch.rand(out_f, generator=gen) + 0.5]
    return packed, state, W, [t.to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 40])   # the fused kernel and dequantize + GEMM on the CPU
def test_row_scale_forward_and_gradients_match_the_spec(dtype, M):
    packed, state, W, (x, A, B, bias, scale) = operands(dtype, M=M)
    y = nf4lora.lora_matmul_4bit(x, packed, state, A, B, 2.0, bias, row_scale=scale)
    grad = torch.randn_like(y)
    y.backward(grad)
    exact_inputs = [t.detach().double().requires_grad_() for t in (x, A, B, bias, scale)]
    exact, _ = reference.lora_matmul_4bit(exact_inputs[0], W, *exact_inputs[1:3], 2.0,
                                          exact_inputs[3], row_scale=exact_inputs[4])
    exact.backward(grad.double())
    # same-dtype baseline: the spec on W rounded to dtype, in dtype, through torch autograd
    base_inputs = [t.detach().clone().requires_grad_() for t in (x, A, B, bias, scale)]
    base, _ = reference.lora_matmul_4bit(base_inputs[0], W.to(dtype), *base_inputs[1:3], 2.0,
                                         base_inputs[3], row_scale=base_inputs[4])
    base.backward(grad)
    ulp = torch.finfo(dtype).eps

    def check(ours, truth, baseline, label):
        err = (ours.double() - truth).abs().max().item()
        base_err = (baseline.double() - truth).abs().max().item()
        assert err <= 2 * base_err + ulp * truth.abs().max().item(), (label, err, base_err)

    check(y.detach(), exact.detach(), base.detach(), "y")
    for name, ours, truth, baseline in zip(("x", "A", "B", "bias", "row_scale"),
                                           (x, A, B, bias, scale), exact_inputs, base_inputs):
        check(ours.grad, truth.grad, baseline.grad, f"d{name}")


def test_without_row_scale_nothing_changes():
    packed, state, _, (x, A, B, bias, _) = operands(torch.bfloat16)
    weight = PackedWeight.from_state(packed, state)
    y0, h0 = _ops.call_lora_matmul_4bit(x.detach(), weight, A.detach(), B.detach(), 2.0, bias.detach())
    y1, h1 = _ops.call_lora_matmul_4bit(x.detach(), weight, A.detach(), B.detach(), 2.0, bias.detach(), None)
    assert torch.equal(y0, y1) and torch.equal(h0, h1)


def test_row_scale_through_the_registered_op():
    packed, state, _, (x, A, B, bias, scale) = operands(torch.float32)
    weight = PackedWeight.from_state(packed, state)
    args = (x.detach(), *weight.op_args(), A.detach(), B.detach(), 2.0, bias.detach(), scale.detach())
    torch.library.opcheck(torch.ops.nf4lora.lora_matmul_4bit.default, args)
    direct, _ = _ops.lora_matmul_4bit_impl(x.detach(), weight, A.detach(), B.detach(), 2.0,
                                           bias.detach(), scale.detach())
    assert torch.equal(torch.ops.nf4lora.lora_matmul_4bit(*args)[0], direct)


@pytest.mark.parametrize("bad,match", [(torch.ones(36), r"row_scale must have shape \[37\], got \[36\]"),
                                       (torch.ones(37, dtype=torch.float64), "row_scale must have the dtype of the activations")])
def test_a_wrong_row_scale_is_a_clear_error(bad, match):
    packed, state, _, (x, A, B, bias, _) = operands(torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        nf4lora.lora_matmul_4bit(x, packed, state, A, B, 2.0, bias, row_scale=bad)
