"""tools/shape_check.py: each kind of broken limit and an import circle is found and reported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "shape_check.py"


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300)


def _tree(tmp_path: Path) -> Path:
    """A package with one violation of each kind, plus code just inside every limit."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    # a module of 401 lines (one line over)
    (pkg / "big.py").write_text("".join(f"x{i} = {i}\n" for i in range(401)))
    # a module of exactly 400 lines: not reported
    (pkg / "edge.py").write_text("".join(f"y{i} = {i}\n" for i in range(400)))
    body81 = "".join(f"    v{i} = {i}\n" for i in range(80))  # def line + 80 = 81 lines
    body80 = "".join(f"    w{i} = {i}\n" for i in range(79))  # def line + 79 = 80 lines
    (pkg / "funcs.py").write_text(f"def long_one():\n{body81}\n\ndef fine():\n{body80}")
    methods = "".join(f"    def m{i}(self):\n        return {i}\n\n" for i in range(84))  # 1 + 252 - 1
    (pkg / "classes.py").write_text(f"class Big:\n{methods}".rstrip() + "\n")
    # a circle a -> b -> c -> a through module-level imports (relative, absolute, from-import)
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("import pkg.sub.c\n")
    (pkg / "sub" / "c.py").write_text("from pkg.a import something\n")
    # imports that do NOT make a circle: one side under TYPE_CHECKING (the other inside a function)
    (pkg / "lazy1.py").write_text("def f():\n    from pkg import lazy2\n")
    (pkg / "lazy2.py").write_text(textwrap.dedent("""\
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pkg import lazy1
        """))
    return tmp_path


def test_synthetic_tree_reports_each_kind(tmp_path):
    root = _tree(tmp_path)
    out = _run("--root", str(root), "pkg")
    print(out.stdout)
    lines = out.stdout.splitlines()
    assert out.returncode == 1, out.stderr
    assert "module    pkg/big.py  401 lines (limit 400)" in lines
    assert "function  pkg/funcs.py:1  long_one  81 lines (limit 80)" in lines
    big_class = [line for line in lines if line.startswith("class ")]
    assert big_class == ["class     pkg/classes.py:1  Big  252 lines (limit 250)"], big_class
    assert "cycle     pkg.a -> pkg.b -> pkg.sub.c -> pkg.a" in lines
    for name in ("edge.py", "fine", "lazy1", "lazy2", " m1 "):
        assert not any(name in line for line in lines), (name, lines)
    assert lines[-1] == "shape_check: 4 problem(s)"


def test_a_circle_closed_inside_a_function_is_found(tmp_path):
    """A function-level import closes a circle when the function runs: reported, marked ``~>``."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "x.py").write_text("import os\n\nclass K:\n    def run(self):\n        from pkg.sub import y\n")
    (pkg / "sub" / "y.py").write_text("from pkg import x\n")
    # a package's __init__ initialised on the way is not an edge: z -> pkg.sub.w only
    (pkg / "sub" / "w.py").write_text("")
    (pkg / "z.py").write_text("from pkg.sub.w import something\n")
    out = _run("--root", str(tmp_path), "pkg")
    print(out.stdout)
    assert out.returncode == 1
    assert out.stdout.splitlines() == ["cycle     pkg.sub.y -> pkg.x ~> pkg.sub.y", "shape_check: 1 problem(s)"]


def test_repository_has_no_import_circle():
    """portable_infer and exporters import each other in one direction only, lazy imports included."""
    out = _run()
    print(out.stdout)
    assert not [line for line in out.stdout.splitlines() if line.startswith("cycle ")]


def test_methods_are_named_with_their_class(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "".join(f"        v{i} = {i}\n" for i in range(85))
    (pkg / "m.py").write_text(f"class K:\n    def run(self):\n{body}")
    out = _run("--root", str(tmp_path), "pkg")
    assert out.returncode == 1
    assert "function  pkg/m.py:2  K.run  86 lines (limit 80)" in out.stdout.splitlines()


def test_clean_tree_exits_zero(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import m\n")
    (pkg / "m.py").write_text("import os\n\ndef f():\n    return os.sep\n")
    out = _run("--root", str(tmp_path), "pkg")
    assert out.returncode == 0, out.stdout
    assert out.stdout.splitlines() == ["shape_check: ok"]


def test_repository_report_is_printed():
    """Runs the check on the repository itself and prints what it finds. Whether the repository is
    clean is a gate the coordinator sets (the exit status); this asserts only the report's form."""
    out = _run()
    print(out.stdout)
    assert out.returncode in (0, 1), out.stderr
    lines = out.stdout.splitlines()
    assert lines and lines[-1] in ("shape_check: ok", f"shape_check: {len(lines) - 1} problem(s)")
    assert (out.returncode == 0) == (lines[-1] == "shape_check: ok")
    kinds = ("module ", "function ", "class ", "cycle ")
    assert all(line.startswith(kinds) for line in lines[:-1]), lines
