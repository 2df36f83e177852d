"""Importing nf4lora prints nothing, warnings on or off: not nf4lora itself, and not the
third-party packages it imports (PEFT's import pulls in transformers' quantizers, torchao
and bitsandbytes, which log at import that optional native pieces could not be loaded).
Each case runs in a fresh interpreter, since an import happens once per process."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

MODULES = ["nf4lora", "nf4lora.functional", "nf4lora.nn", "nf4lora.cli", "nf4lora.demo",
           "nf4lora.integrations.peft"]


@pytest.mark.parametrize("warning_flags", [[], ["-W", "default"]], ids=["plain", "W-default"])
@pytest.mark.parametrize("module", MODULES)
def test_import_prints_nothing(module, warning_flags, tmp_path):
    if module.endswith(".peft"):
        pytest.importorskip("peft")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, *warning_flags, "-c", f"import {module}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", f"import {module} printed:\n{result.stdout}{result.stderr}"


def test_quiet_imports_is_scoped():
    """The silencing covers the import inside the block only: logger levels and warning
    filters are back afterwards, so later warnings still show."""
    from nf4lora.integrations import _IMPORT_NOISE_LOGGERS, _quiet_imports

    levels = {name: logging.getLogger(name).level for name in _IMPORT_NOISE_LOGGERS}
    filters = list(warnings.filters)
    with _quiet_imports():
        assert logging.getLogger("torchao").getEffectiveLevel() >= logging.ERROR
        warnings.warn("hidden inside the block")        # would raise under -W error
    assert {name: logging.getLogger(name).level for name in _IMPORT_NOISE_LOGGERS} == levels
    assert warnings.filters == filters
    with pytest.warns(UserWarning, match="shown after the block"):
        warnings.warn("shown after the block")
