"""The ``>>>`` examples in protloc's docstrings run and give what they show.

Every module of the package whose source holds an example is collected (so a new example is tested without
registering it here); examples marked ``# doctest: +SKIP`` need user files and are skipped by doctest itself.
A stale example (a preset changed, an output shape moved) fails here, not in a user's session.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import protloc


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(protloc.__path__, prefix="protloc."):
        spec = importlib.util.find_spec(info.name)
        origin = getattr(spec, "origin", None)
        if origin and origin.endswith(".py") and ">>>" in Path(origin).read_text(encoding="utf-8"):
            names.append(info.name)
    return sorted(names)


MODULES = _modules_with_examples()


def test_examples_are_found():
    # The model and building-block modules document their use with runnable examples (STYLE.md).
    for name in ("protloc.models.celle", "protloc.models.cytoself", "protloc.nn.quantize", "protloc.config"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module):
        # compileflags=0: the examples run as typed in a user's REPL, without the module's
        # `from __future__ import annotations` (under it, a dataclass defined in an example has string
        # annotations that typing.get_type_hints resolves in protloc's module, not the example's namespace).
        runner.run(test, compileflags=0)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see the output)"
