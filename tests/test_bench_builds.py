"""bench/bench_builds.py, the A/B of several builds' CPU kernels in one process: the module
renaming that lets builds load side by side, the export of a revision or of the working
tree, and a run on the installed extension (no build: building takes minutes). No timing
is asserted (shared/perf.md)."""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_builds  # noqa: E402
from nf4lora.backends import cpu as cpu_backend  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_cpu = pytest.mark.skipif(cpu_backend.availability() is not None,
                               reason=str(cpu_backend.availability()))


def test_rename_module_finds_this_checkouts_anchors(tmp_path):
    for path, _, _ in bench_builds.MODULE_ANCHORS:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, tmp_path / path)
    bench_builds.rename_module(tmp_path, "_C_ab_test")
    assert "PYBIND11_MODULE(_C_ab_test," in (tmp_path / "csrc/bindings.cpp").read_text()
    assert "PYBIND11_MODULE(_C," not in (tmp_path / "csrc/bindings.cpp").read_text()
    assert '"nf4lora._C_ab_test",' in (tmp_path / "setup.py").read_text()
    with pytest.raises(RuntimeError, match="MODULE_ANCHORS is out of date"):
        bench_builds.rename_module(tmp_path, "_C_ab_again")   # the anchors are gone


def test_export_of_a_revision_and_of_the_working_tree(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    head, tree = tmp_path / "head", tmp_path / "tree"
    head.mkdir()
    tree.mkdir()
    bench_builds._export("HEAD", head)
    bench_builds._export(bench_builds.WORKTREE, tree)
    for source in (head, tree):
        assert (source / "setup.py").is_file() and (source / "csrc/bindings.cpp").is_file()
        assert not list(source.glob("nf4lora/*.so"))           # sources only, no build outputs
    # the working tree as it is: this test file is there even before it is committed
    assert (tree / "tests/test_bench_builds.py").read_text() == Path(__file__).read_text()


@needs_cpu
def test_installed_builds_run_side_by_side(tmp_path):
    argv = ["installed", "installed", "--quick", "--layout", "copy", "row", "--rank", "3",
            "--threads", "1", "--out", str(tmp_path)]
    payload = bench_builds.main(argv)
    saved = json.loads((tmp_path / "builds-latest.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(payload["rows"], default=str))
    rows = saved["rows"]
    assert {(r["layout"], r["provider"]) for r in rows} == {
        (layout, build) for layout in ("copy", "row") for build in ("0:installed", "1:installed")}
    for row in rows:
        assert row["same_bytes"] == "same" and row["median_ms"] > 0
        if row["provider"] == "0:installed":
            assert row["time_vs_first"] == 1.0


@needs_cpu
def test_compare_names_a_build_whose_bytes_differ():
    real = cpu_backend._C

    def off_by_one(x, weight, lora_A, lora_B, scaling, bias, y, h):
        real.lora_gemv_4bit(x, weight, lora_A, lora_B, scaling, bias, y, h)
        y.view(-1)[0] += 1.0
    wrong = types.SimpleNamespace(lora_gemv_4bit=off_by_one, interleavable=real.interleavable,
                                  interleaved_bytes=real.interleaved_bytes,
                                  interleave_4bit=real.interleave_4bit)
    case = bench_builds.Case((32, 128), 2, "row", torch.float32, 0)
    same = bench_builds.compare(case, {"a": real, "b": real, "c": wrong})
    assert same["a"] == same["b"] == "same"
    assert same["c"].startswith("max|d| ")
    assert float(same["c"].split()[-1]) >= 0.5
