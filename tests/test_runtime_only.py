"""A runtime-only install (the four core dependencies, no exporter stack) loads a .pinf and generates.

Slow: makes a virtualenv and installs onnxruntime, numpy, tokenizers and jinja2 into it from the
configured package index. Set PORTABLE_INFER_WHEELHOUSE to a folder of wheels to install with
``--no-index --find-links`` instead (offline). Skips when the packages cannot be fetched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import portable_infer
from portable_infer.package.bundle import pack, write_keypair

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# pyproject's [project] dependencies, read from it so the two cannot drift apart
CORE = [d.split(";")[0].strip() for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
NETWORK_HINTS = ("No matching distribution", "Could not find a version", "NewConnectionError",
                 "Failed to establish", "Network is unreachable", "Temporary failure in name resolution")

SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    absent = {m: importlib.util.find_spec(m) is None for m in ("torch", "transformers", "onnx", "optimum")}
    import portable_infer
    m = portable_infer.load(sys.argv[1], "cpu", intra_op_threads=1)
    ids = m.generate_ids([5, 17, 99, 3, 42, 7], max_new_tokens=12)
    text = m.generate("Hello", max_new_tokens=4, ignore_eos=True)
    try:
        portable_infer.load(sys.argv[1], "cpu", trust=sys.argv[2])
        trust_error = None
    except portable_infer.DependencyError as exc:  # signature checks need the [sign] extra
        trust_error = str(exc)
    heavy = sorted(n for n in ("exporters", "torch", "transformers", "onnx") if n in sys.modules)
    try:
        import exporters.export
        exporter_error = None
    except ImportError as exc:
        exporter_error = exc.name
    print(json.dumps({"absent": absent, "ids": ids, "text": text, "trust_error": trust_error,
                      "exporter_error": exporter_error, "imported": heavy}))
""")


def _pip(venv_python: Path, *args: str) -> None:
    wheelhouse = os.environ.get("PORTABLE_INFER_WHEELHOUSE")
    offline = ["--no-index", "--find-links", wheelhouse] if wheelhouse else []
    cmd = [sys.executable, "-m", "pip", "--python", str(venv_python), "install", "-q", *offline, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        if any(h in out for h in NETWORK_HINTS):
            pytest.skip(f"cannot fetch packages for the runtime-only venv: {out[-500:]}")
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")


def make_runtime_venv(root: Path) -> Path:
    """python -m venv, then the repo with --no-deps, then the four core packages only."""
    src = root / "src"  # a copy: building in the repo would leave build/ and *.egg-info there
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("portable_infer", "exporters"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    _pip(python, "--no-deps", str(src))
    _pip(python, "--only-binary", ":all:", *CORE)
    return python


@pytest.fixture(scope="module")
def runtime_python(tmp_path_factory) -> Path:
    return make_runtime_venv(tmp_path_factory.mktemp("runtime_only"))


def test_runtime_only_venv_loads_a_bundle_and_generates(runtime_python, tiny_text_package, tmp_path):
    pytest.importorskip("cryptography")
    write_keypair(tmp_path / "key.pem", tmp_path / "key.pub.pem")
    bundle = pack(tiny_text_package, tmp_path / "tiny.pinf", sign_key=tmp_path / "key.pem")
    want = portable_infer.load(tiny_text_package, "cpu", intra_op_threads=1).generate_ids(
        [5, 17, 99, 3, 42, 7], max_new_tokens=12)
    env = {**os.environ, "PORTABLE_INFER_HOME": str(tmp_path / "home")}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(runtime_python), "-c", SCRIPT, str(bundle), str(tmp_path / "key.pub.pem")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(out["absent"].values()), out["absent"]  # torch, transformers, onnx, optimum not installed
    assert out["imported"] == []  # and nothing tried to import the exporter stack
    assert out["exporter_error"] in ("onnx", "torch", "transformers")  # the exporter cannot run here
    assert out["ids"] == want  # the same greedy tokens as the full install
    assert isinstance(out["text"], str)
    assert out["trust_error"] and 'portable-infer[sign]' in out["trust_error"]
    cli = subprocess.run([str(runtime_python.parent / "portable-infer"), "generate", "--model", str(bundle),
                          "--max-new-tokens", "3", "Hi"], capture_output=True, text=True, env=env, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
