"""Imports flow one way: nn -> models -> data -> train / eval -> analysis -> plotting -> commands -> cli / api.

Read from the source (no imports run), so a new module is checked without registering it here. The rules
are the ones docs/design/README.md states:

- a module never imports a later layer (lazy imports inside functions count too);
- inference never imports training: nothing under eval/, analysis/, plotting/ or commands other than the
  ``train`` command imports :mod:`protloc.train`;
- nothing imports :mod:`protloc.cli` (only ``python -m protloc``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import protloc

ROOT = Path(protloc.__file__).parent

#: Layer of each sub-package or top-level module; a module may import its own layer or a lower one.
#: The base modules (errors, file writes, configs, the shipped-weight registry) are importable by all.
LAYERS = {
    "errors": 0,
    "_fs": 0,
    "config": 0,
    "pretrained": 0,
    "nn": 1,
    "models": 2,
    "data": 3,
    "train": 4,
    "eval": 4,
    "analysis": 5,
    "plotting": 6,
    "report": 6,
    "commands": 7,
    "demo": 8,
    "api": 9,
    "cli": 9,
    "__main__": 10,
}
#: Allowed imports against the order: the sequence models build on the residue alphabet and tokenizer.
EXCEPTIONS = {("protloc.models.", "protloc.data.sequences")}
#: Sub-packages that run trained models and so must not need the training code.
INFERENCE = ("eval", "analysis", "plotting")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{a.name}" for a in node.names if node.module == "protloc")
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
    return [m for m in found if m == "protloc" or m.startswith("protloc.")]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    names = {_module_name(p).split(".")[1] for p in SOURCES if p != ROOT / "__init__.py"}
    unknown = sorted(names - set(LAYERS))
    assert not unknown, f"give these a layer in LAYERS (and docs/design/README.md): {unknown}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module_name(p))
def test_imports_flow_one_way(path: Path) -> None:
    me = _module_name(path)
    if me == "protloc":
        return
    my_layer = _layer(me)
    sub = me.split(".")[1]
    bad = []
    for target in _imports(path):
        if target == "protloc":
            continue
        layer = _layer(target)
        allowed = any(me.startswith(a) and target == b for a, b in EXCEPTIONS)
        if layer is not None and my_layer is not None and layer > my_layer and not allowed:
            bad.append(f"{target} (layer {layer} > {my_layer})")
        if target.startswith("protloc.train") and sub in INFERENCE:
            bad.append(f"{target} (inference never imports training)")
        if target.startswith("protloc.cli") and me != "protloc.__main__":
            bad.append(f"{target} (nothing imports the CLI)")
    assert not bad, f"{me} imports " + "; ".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    # The rule is not vacuous: an eval module importing a trainer is caught.
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from protloc.train.celle import train_celle\n")
    assert _imports(fake) == ["protloc.train.celle"]
    assert _layer("protloc.train.celle") > _layer("protloc.models.celle")
