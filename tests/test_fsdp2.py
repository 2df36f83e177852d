"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over QLoRA layers, two CPU processes (gloo).

With quant_storage=torch.bfloat16 the packed 4-bit weight is a bf16 [k, 1] parameter like
every other parameter of a bf16 model, so FSDP2 shards it along dim 0 and all-gathers it
with the rest (one uniform-dtype collective: the point of quant_storage, bitsandbytes
PR #970). Nothing in nf4lora knows about FSDP: FSDP2 swaps each Params4bit for a plain
DTensor parameter, and Linear4bit restores the quant state it keeps on the module
(`Linear4bit._fix_quant_state`, as bitsandbytes' `fix_4bit_weight_quant_state_from_module`).

Checked here:
- the training losses of 2 ranks x half the batch equal those of 1 process on the whole batch;
- the packed bytes round-trip exactly: each rank's shard is its slice of the original
  bytes, and the all-gathered weight is the original weight, bit for bit;
- the sharded model's state dict, gathered, carries the quant state and loads into an
  unsharded nf4lora model, which then computes what the trained FSDP model computes.

The test spawns its own processes (no torchrun), joins them with a timeout and kills them
on failure, so it cannot hang. 15-35 s on 2 cores depending on load, most of it the
workers' interpreter start-up (import torch) and gloo set-up.
"""
from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nf4lora.nn import Linear4bit, LoraLinear4bit

WORLD = 2
STEPS = 4
BATCH = 16                  # 8 rows per rank
DIMS = ((36, 45), (45, 64))  # 36*45 codes = 405 bf16 elements: odd, so FSDP2 pads a shard
CLASSES = 8
TIMEOUT = 45                # seconds for the whole distributed run (then fail, never hang)

# Half-batch losses averaged over ranks vs one full-batch loss: the same math, but the
# gradient is summed in a different order and reduced in bf16 (FSDP2 reduce-scatters the
# bf16 LoRA gradients), so the Adam steps differ by bf16 rounding. Measured: at most 6.4e-5
# relative over 4 steps; 2e-3 is half a bf16 ulp (2^-8 = 3.9e-3) and still far below the
# ~5% per-step change of the loss, so a wrong gradient (e.g. a garbled weight shard) fails.
LOSS_RTOL = 2e-3


def build_model(storage: torch.dtype = torch.bfloat16) -> nn.Module:
    """Two QLoRA layers (NF4, double quantization, LoRA r=8) and a trainable bf16 head,
    the same on every rank and in the reference (seeded)."""
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in DIMS:
        base = Linear4bit(fan_in, fan_out, compute_dtype=torch.bfloat16, quant_type="nf4",
                          quant_storage=storage).to("cpu")       # .to() quantizes
        base.bias.requires_grad_(False)
        lora = LoraLinear4bit(base, r=8, lora_alpha=16)
        nn.init.normal_(lora.lora_B.weight, std=0.02)    # non-zero, so lora_A trains from step 1
        layers += [lora, nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(DIMS[-1][1], CLASSES))
    return model.to(torch.bfloat16)     # LoRA and head to bf16; the packed weights ignore casts


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, DIMS[0][0], generator=g).bfloat16(), torch.randint(0, CLASSES, (BATCH,), generator=g)


def train(model: nn.Module, x, y, steps: int = STEPS, on_step=None) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(on_step(loss.detach()) if on_step else loss.item())
    return losses


def packed_bytes(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().reshape(-1).view(torch.uint8).clone()
            for name, p in module.named_parameters() if name.endswith("base_layer.weight")}


def _worker(rank: int, port: int, results) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          GLOO_SOCKET_IFNAME="lo")   # loopback only
        torch.set_num_threads(1)                     # two processes on two cores
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (WORLD,))
        model = build_model()
        original = packed_bytes(model)
        for layer in model[0], model[2]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

        # Sharding: each rank holds its dim-0 slice of the packed bf16 codes.
        shards = {}
        for name, p in model.named_parameters():
            if name.endswith("base_layer.weight"):
                assert isinstance(p, DTensor) and p.dtype == torch.bfloat16, (name, type(p), p.dtype)
                local = p.to_local().reshape(-1)
                full = original[name].view(torch.bfloat16)
                chunk = -(-full.numel() // WORLD)                   # FSDP2: ceil-sized chunks
                expected = full[rank * chunk:(rank + 1) * chunk]
                shards[name] = (local.numel(), full.numel())
                assert torch.equal(local.view(torch.uint8), expected.view(torch.uint8)), name

        x, y = batch()
        rows = BATCH // WORLD
        x_local, y_local = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]

        def global_loss(loss):                      # mean of the two half-batch losses
            dist.all_reduce(loss)
            return loss.item() / WORLD
        import warnings
        with warnings.catch_warnings():
            # LoraLinear4bit returns a reshape of the matmul result, which FSDP2 flags in
            # case the caller modifies it in place; nothing here does.
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            losses = train(model, x_local, y_local, on_step=global_loss)

            # All-gather round trip: the full packed weight is the original, bit for bit.
            gathered = {name: p.full_tensor().reshape(-1).view(torch.uint8)
                        for name, p in model.named_parameters() if name in original}
            round_trip = {name: torch.equal(gathered[name], original[name]) for name in original}

            # State dict: gathered to full tensors, with the quant state.
            state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                     for k, v in model.state_dict().items()}
            with torch.no_grad():
                logits = model(x).float()
        # As bytes: a tensor put on a torch.multiprocessing queue travels as a shared-memory
        # handle that dies with this process.
        buffer = io.BytesIO()
        torch.save(dict(losses=losses, shards=shards, round_trip=round_trip,
                        state=state if rank == 0 else None, logits=logits), buffer)
        results.put((rank, buffer.getvalue()))
        dist.destroy_process_group()
    except BaseException:                            # report, never hang the parent
        results.put((rank, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed() -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, results), daemon=True)
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    out = {}
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(out) < WORLD:
            try:
                rank, result = results.get(timeout=1)
            except queue.Empty:
                crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if crashed:                          # died without reporting (e.g. a signal)
                    raise AssertionError(f"a worker exited with code {crashed[0]} and no result")
                if time.monotonic() > deadline:
                    raise AssertionError(f"FSDP2 run did not finish within {TIMEOUT} s")
                continue
            if isinstance(result, str):
                raise AssertionError(f"rank {rank} failed:\n{result}")
            out[rank] = torch.load(io.BytesIO(result))
    finally:
        for p in procs:
            p.join(timeout=3)
        for p in procs:                              # only our own children, by handle
            if p.is_alive():
                p.kill()
                p.join(timeout=3)
    return out


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_fsdp2_qlora_matches_single_process():
    results = run_distributed()

    # One process, whole batch, no FSDP.
    reference_model = build_model()
    x, y = batch()
    reference = train(reference_model, x, y)

    for rank in range(WORLD):
        r = results[rank]
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference),
                                   rtol=LOSS_RTOL, atol=0)
        assert all(r["round_trip"].values()), r["round_trip"]
    # the odd-length weight (405 bf16 elements) really was split unevenly, 203 + 202
    assert [results[rank]["shards"]["0.base_layer.weight"] for rank in range(WORLD)] == [(203, 405), (202, 405)]
    assert reference[-1] < reference[0]              # it trained
    print("\nFSDP2 losses (rank 0):", [f"{v:.5f}" for v in results[0]["losses"]],
          "\nsingle process:       ", [f"{v:.5f}" for v in reference])

    # The gathered state dict is a normal nf4lora checkpoint: the packed bf16 codes plus
    # their quant state, loadable into an unsharded model that then computes the same logits.
    state = results[0]["state"]
    assert state["0.base_layer.weight"].dtype == torch.bfloat16
    assert "0.base_layer.weight.quant_state.bitsandbytes__nf4" in state
    fresh = build_model()
    with torch.no_grad():                            # make sure every value is loaded
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = fresh(x).float()
    torch.testing.assert_close(logits, results[0]["logits"], rtol=0, atol=0)
    torch.testing.assert_close(results[1]["logits"], results[0]["logits"], rtol=0, atol=0)
