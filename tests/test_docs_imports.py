"""Every ``import`` / ``from ... import`` line of the Python examples in README.md and docs/*.md
names something that exists (modules move; the examples must move with them)."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
IMPORT = re.compile(r"^\s*(?:from\s+(portable_infer[\w.]*|exporters[\w.]*)\s+import\s+([\w\s,()]+)"
                    r"|import\s+(portable_infer[\w.]*|exporters[\w.]*))\s*(?:#.*)?$")


def _imports():
    for doc in DOCS:
        for block in BLOCK.findall(doc.read_text(encoding="utf-8")):
            for line in block.splitlines():
                m = IMPORT.match(line)
                if m:
                    yield pytest.param(m.group(1) or m.group(3), m.group(2), id=f"{doc.name}: {line.strip()}")


IMPORTS = list(_imports())


def test_the_docs_have_examples_to_check():
    assert any("serving.md" in p.id for p in IMPORTS), [p.id for p in IMPORTS]


def _has(mod, name: str) -> bool:
    """``from mod import name`` works: an attribute, or a submodule of a package."""
    if hasattr(mod, name):
        return True
    return hasattr(mod, "__path__") and importlib.util.find_spec(f"{mod.__name__}.{name}") is not None


@pytest.mark.parametrize("module,names", IMPORTS)
def test_doc_import_resolves(module, names):
    mod = importlib.import_module(module)
    for name in re.findall(r"\w+", names or ""):
        assert _has(mod, name), f"{module} has no {name}"
