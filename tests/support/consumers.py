"""The consumer libraries (GPTQModel, transformers' integrations, compressed-tensors, llama.cpp, peft,
bitsandbytes) that the tests load qaas' outputs with.

`scripts/setup.sh` installs them all (the `consumers` extra, GPTQModel with --no-deps). A test that
needs one calls `require(...)`: in CI (`CI` set) a missing library fails the test, since a green run
must mean every format was read by its real consumer; on a developer's machine it is a skip that says
how to install it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

INSTALL_HINT = "run scripts/setup.sh (installs the `consumers` extra and GPTQModel)"


def missing(reason: str) -> None:
    """Fail in CI, skip elsewhere, naming what is missing."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} -- CI must have it: {INSTALL_HINT}", pytrace=False)
    pytest.skip(f"{reason}; {INSTALL_HINT}", allow_module_level=True)


def require(module: str) -> ModuleType:
    """Import `module` (e.g. "gptqmodel", "llama_cpp") or fail/skip the calling test."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing(f"{module} is not importable ({exc})")
        raise  # not reached: missing() raises
