"""The docstring examples of the public API run here (``>>>`` blocks, doctest with ELLIPSIS and
NORMALIZE_WHITESPACE): an example that drifts from the code fails the suite."""

import doctest
import importlib

import pytest

MODULES = ["jlora.core.api", "jlora.core.lift", "jlora.core.state", "jlora.methods.lora"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no >>> examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (see above)"
