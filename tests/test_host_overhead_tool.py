"""benchmarks/host_overhead.py's null engine keeps up with the engines' interface: the real
scheduler runs over it to the end (its figures are in docs/benchmarks.md; session 31 found it
failing at once after StaticEngine.buffer gained ``most=``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_host_overhead_runs_the_scheduler_over_its_null_engine(tiny_text_package):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), str(tiny_text_package),
                          "--streams", "1", "4", "--prompt", "16", "--new", "16", "--seed", "7"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 4 ")]
    assert len(rows) == 2, run.stdout
