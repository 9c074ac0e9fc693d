"""package/home.py places and locks the default model's directory; the export itself is the entry
points' (loader.default_model), so the package layer never imports the exporter."""

from __future__ import annotations

import ast
from pathlib import Path

from portable_infer.package import home
from portable_infer.package.manifest import MANIFEST_NAME

ROOT = Path(__file__).resolve().parent.parent / "portable_infer"
ENTRY_POINTS = {"loader.py", "cli.py"}  # load() (the default model) and the CLI's export/verify commands


def test_exports_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv(home.HOME_ENV, str(tmp_path))
    calls = []

    def export(path: Path) -> None:
        calls.append(path)
        path.mkdir(parents=True)
        (path / MANIFEST_NAME).write_text("{}")

    stale = home.default_package_dir().parent / f".{home.default_package_dir().name}.partial-123"
    stale.mkdir(parents=True)  # left by a killed export
    first = home.ensure_default_model(export)
    assert first == home.default_package_dir() and calls == [first] and not stale.exists()
    assert home.ensure_default_model(export) == first and calls == [first]


def test_only_the_entry_points_import_the_exporter():
    importers = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "exporters" or n.startswith("exporters.") for n in names):
                importers.add(path.relative_to(ROOT).as_posix())
    assert importers <= ENTRY_POINTS, importers
    assert "loader.py" in importers  # the default model's first use
