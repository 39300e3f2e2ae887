"""The examples in the core's docstrings run as written."""

import doctest
import importlib
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "evomerge" / "core"
WITH_EXAMPLES = sorted(p.stem for p in CORE.glob("*.py") if ">>> " in p.read_text())


@pytest.mark.parametrize("module", WITH_EXAMPLES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"evomerge.core.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
