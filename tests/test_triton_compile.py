"""Every Triton kernel, in every configuration its launcher can choose, compiles for
sm_80 and sm_90 on this GPU-less machine, with no register spills; and the codec kernels
hold no fused multiply-add and no flush-to-zero instruction (either would break their
bit-exactness with the reference, which the interpreter tests cannot see).

Compiling takes about 1 s per variant on a cold Triton cache (~/.triton/cache), a few
minutes for the whole set on 2 cores, and about 15 s warm.
"""
import ast
import importlib
from pathlib import Path

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)


def _kernels_package():
    # Imported here, not at module import: collecting this file must not fix the
    # interpreter/compiler choice before test_triton_codec.py sets TRITON_INTERPRET=1.
    try:
        return importlib.import_module("nf4lora.triton_kernels")
    except ModuleNotFoundError:
        return importlib.import_module("triton_kernels")


@pytest.fixture(scope="module")
def report():
    return _kernels_package().compile_report(ARCHS)


def test_every_kernel_and_config_compiles_for_each_arch(report):
    package = _kernels_package()
    expected = {(entry.name, label, f"sm_{arch}")
                for entry in package.KERNELS for label, _, _ in entry.targets()
                for arch in ARCHS}
    compiled = {(row["kernel"], row["config"].rsplit(" ", 1)[0], row["arch"]) for row in report}
    assert compiled == expected
    assert all(row["registers"] > 0 for row in report)


def test_no_kernel_spills_registers(report):
    spilled = [row for row in report if row["spills"] != 0]
    assert not spilled, spilled


def test_codec_kernels_have_no_fma_and_no_flush_to_zero(report):
    # The nested absmax decode is a multiply then an add; Triton contracts that into
    # fma.rn.f32 by default, so codec.multiply_add_unfused must keep them apart.
    offending = [row for row in report if row["fma"] or row["ftz"]]
    assert not offending, offending


def test_split_k_variants_keep_the_pipeline(report):
    # The split-K binaries of the fused kernels must compile like their unsplit twins (no
    # LoRA, no bias): the same shared memory, i.e. the same 3-stage cp.async pipeline, and
    # about the same registers. Without tl.multiple_of on the slice start the compiler could
    # not prove the loads aligned and dropped the pipeline (sm_90 bf16 forward: 141
    # registers and 18 KB of shared memory, against 74 and 38 KB unsplit).
    unsplit_suffix = {"lora_matmul": "lora=False bias=False",
                      "lora_matmul_grad_input": "lora=False"}
    by_config = {(row["kernel"], row["arch"], row["config"]): row for row in report}
    checked = 0
    for (kernel, arch, config), row in by_config.items():
        if kernel not in unsplit_suffix or " split_k " not in f" {config} ":
            continue
        twin = by_config[(kernel, arch, config.replace("split_k", unsplit_suffix[kernel]))]
        assert row["shared_bytes"] == twin["shared_bytes"], (row, twin)
        assert row["registers"] <= twin["registers"] + 8, (row, twin)
        checked += 1
    assert checked == 2 * 6 * len(ARCHS)   # 2 kernels x (3 dtypes x nested or not) x archs


def test_the_kernel_package_imports_nothing_from_nf4lora():
    """Dependencies run one way (issue 12): nf4lora imports the kernels, never the reverse;
    the code books and thresholds reach the kernels as arguments from the launcher."""
    imports = []
    for path in sorted(Path(_kernels_package().__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imports += [(path.name, node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imports.append((path.name, node.lineno, node.module))
    assert imports, "no imports found: the check looked in the wrong place"
    upward = [entry for entry in imports if entry[2].split(".")[0] == "nf4lora"]
    assert not upward, upward
