"""The README's "## Use" examples run as written, each on its own (as a reader pastes one),
in a fresh interpreter, in an empty working directory, with the Hugging Face hub offline:
an example that needs a download, a name it never defined or an API that moved fails here."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def use_section_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block between "## Use" and the next "## "."""
    text = README.read_text()
    start = text.index("\n## Use\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else None]
    first_line = text[:start].count("\n") + 1
    return [(first_line + section[:m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", section, re.S)]


BLOCKS = use_section_blocks()


def test_use_section_has_the_examples():
    assert len(BLOCKS) >= 2
    qlora = next(code for _, code in BLOCKS if "add_lora" in code)
    for name in ("from_config", "replace_linear", "backward", "merge_lora",
                 "save_pretrained_4bit", "load_pretrained_4bit"):
        assert name in qlora, name


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_use_example_runs(line, code, tmp_path):
    script = tmp_path / f"readme_line_{line}.py"
    # blank lines up to the block keep the README's line numbers in a traceback
    script.write_text("\n" * (line - 1) + code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README.md:{line} failed:\n{result.stdout}\n{result.stderr}"
