"""torch.compile(fullgraph=True) with the default inductor backend on CPU, over a tiny
QLoRA model: forward and backward match eager.

Both entry points are in the model: a LoraLinear4bit (lora_matmul_4bit) and a frozen
Linear4bit with a bias (matmul_4bit), NF4 with double quantization, fp32 compute.
fullgraph=True fails on any graph break, so this also checks that the autograd Function,
the QuantState it carries and the nf4lora ops trace as one graph.

Tolerance, derived rather than guessed: eager fp32 is compared with a float64 evaluation
of the same math (the same dequantized W, the same LoRA weights), which gives eager's own
rounding error e per output. Compiled code computes the same fp32 math with other fusions
and reduction orders, so it is also about e away from float64 and at most ~2e from eager;
the check allows 4e. Measured (2 cores, AVX2): output e = 3.6e-7 (|y| <= 0.93), compiled
vs eager 1.2e-7 (0.33e); gradients e = 2e-10 .. 1.9e-9, compiled vs eager 0.75e-0.9e.

Compile time: ~10-20 s on 2 cores (inductor's C++ build of a few small kernels), less
with a warm inductor cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nf4lora.nn import Linear4bit, LoraLinear4bit


class TinyQLoRA(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        up = Linear4bit(64, 128, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
        self.up = LoraLinear4bit(up, r=4, lora_alpha=8)
        nn.init.normal_(self.up.lora_B.weight, std=0.1)     # PEFT inits B to 0: make it count
        self.down = Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu")

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))

    def float64_forward(self, x, lora_A, lora_B):
        """The same math in float64, from the same dequantized weights (LoRA weights given)."""
        up, down = self.up, self.down
        w_up = up.base_layer.dequantized_weight(torch.float32).double()
        w_down = down.dequantized_weight(torch.float32).double()
        h = F.linear(x, w_up, up.base_layer.bias.double())
        h = h + F.linear(F.linear(x, lora_A), lora_B) * up.scaling
        return F.linear(F.gelu(h), w_down, down.bias.double())


def run(forward, model, x):
    """Output and the gradients of a scalar loss w.r.t. x and the LoRA weights."""
    x = x.detach().clone().requires_grad_(True)
    params = [model.up.lora_A.weight, model.up.lora_B.weight]
    y = forward(x)
    grads = torch.autograd.grad(y.square().mean(), [x, *params])
    return [y.detach(), *grads]


def run_float64(model, x):
    leaves = [t.detach().double().requires_grad_(True)
              for t in (x, model.up.lora_A.weight, model.up.lora_B.weight)]
    y = model.float64_forward(*leaves)
    grads = torch.autograd.grad(y.square().mean(), leaves)
    return [y.detach(), *grads]


NAMES = ("output", "grad x", "grad lora_A", "grad lora_B")


def test_compile_fullgraph_inductor_matches_eager():
    torch._dynamo.reset()
    model = TinyQLoRA()
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))

    eager = run(model, model, x)
    exact = run_float64(model, x)
    compiled_model = torch.compile(model, fullgraph=True)       # default backend: inductor
    compiled = run(compiled_model, model, x)

    for name, e, c, r in zip(NAMES, eager, compiled, exact):
        eager_error = (e.double() - r).abs().max().item()
        diff = (c.double() - e.double()).abs().max().item()
        print(f"{name:12s} |ref| {r.abs().max().item():.3g}  eager-vs-float64 {eager_error:.3g}  "
              f"compiled-vs-eager {diff:.3g}")
        assert eager_error < 1e-5 * r.abs().max().item() + 1e-12, name   # eager itself is sane
        assert diff <= 4 * eager_error + 1e-12, (name, diff, eager_error)

    # Same shapes again: no recompilation (no guard on a per-call object such as a
    # fresh QuantState or Params4bit wrapper).
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run(compiled_model, model, x)
    for c, a in zip(compiled, again):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
