"""What every setup step of the CPU comparison shares (standard library only).

The ``.bench/`` layout, a competitor venv's interpreter, a command run with its output logged, an
export run inside a venv, and the mark a finished step leaves. ``setup_competitors.py`` prepares
SmolLM2's files and the venvs with them, ``llama1b.py`` the 1B-shape model's, and ``compare_cpu.py``
runs its own steps the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import isa_mask  # beside this file, stdlib only

logger = logging.getLogger("setup_steps")

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench"
VENV_ROOT = BENCH / "venvs"
LOGS = BENCH / "logs"
PROJECT_PYTHON = REPO / ".venv" / "bin" / "python"  # the project's venv (our runners, exports)
MARK = ".complete"  # left in (or beside) a step's output once the step finished


@dataclass(frozen=True)
class Export:
    """A model export run inside a competitor's venv; ``args`` get {hf} and {out} filled in."""

    venv: str
    out: Path
    args: tuple[str, ...]


def genai_export(out: Path, precision: str, cache: str, block: int | None = None) -> Export:
    """ONNX Runtime GenAI's model builder, on the CPU, at ``precision`` (fp32, int4) into ``out``
    (its intermediate files in ``.bench/cache/<cache>``); ``block``: its int4 block size
    (``--extra_options block_size=``; its default is 32)."""
    extra = ("--extra_options", f"block_size={block}") if block else ()
    return Export("ortgenai", out, ("-m", "onnxruntime_genai.models.builder", "-i", "{hf}", "-o", "{out}",
                                    "-p", precision, "-e", "cpu", "-c", str(BENCH / "cache" / cache), *extra))


# benchmarks/isa_mask.py's level in a process tree whose CPUID it masks (None: not masked).
ISA_MASK = os.environ.get(isa_mask.ENV) or None


def venv_dir(name: str) -> str:
    """A venv's folder name: llama.cpp's ISA is fixed when it is compiled, so under an ISA mask it
    has its own build, ``llamacpp-<level>`` (the others dispatch at run time)."""
    return f"{name}-{ISA_MASK}" if name == "llamacpp" and ISA_MASK else name


def venv_python(name: str) -> Path:
    return VENV_ROOT / venv_dir(name) / "bin" / "python"


def run_logged(cmd: list[str], log_name: str, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` under ``nice -n 5`` with output to ``.bench/logs/<log_name>.log``."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{log_name}.log"
    full_env = {**os.environ, "PIP_CACHE_DIR": str(BENCH / "pip-cache"),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    logger.info("  $ %s   (log: %s)", " ".join(cmd), log.relative_to(REPO))
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(["nice", "-n", "5", *cmd], stdout=f, stderr=subprocess.STDOUT,
                              env=full_env, cwd=REPO)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"step failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"--- {log} ---\n{tail}")
    logger.info("  done in %.0f s", time.perf_counter() - start)


def ensure_export(exp: Export, hf: Path, label: str) -> None:
    """Run export ``exp`` of the HF folder ``hf`` unless its output is marked complete."""
    if (exp.out / MARK).is_file():
        logger.info("export %s: %s exists, skipped", label, exp.out.relative_to(REPO))
        return
    logger.info("export %s: into %s", label, exp.out.relative_to(REPO))
    if exp.out.exists():
        shutil.rmtree(exp.out)
    args = [a.format(hf=hf, out=exp.out) for a in exp.args]
    run_logged([str(venv_python(exp.venv)), *args], f"export-{label}")
    (exp.out / MARK).write_text("ok\n")
