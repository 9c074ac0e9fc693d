"""benchmarks/step_probe.py keeps up with what it wraps (StaticEngine._step, the slot batch's
overlapped step, the picks worker, the emitter): over a slot-batch scheduler on the CPU it times
each decode step in parts and writes its summary (its GPU figures are in docs/benchmarks.md,
Session 32). In a process of its own: the probe patches classes for good."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from test_static_kv import package  # noqa: E402,F401 - the tiny model with a static variant

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
sys.path.insert(0, {bench!r})
import step_probe
step_probe.MIN_ROWS = 1
step_probe.install({out!r})
import portable_infer
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig
m = portable_infer.load({pkg!r}, "cpu", static_kv=True, intra_op_threads=1)
with Scheduler(m, SchedulerConfig(max_batch=4, prefill_chunk=16, slot_batch=True, emit_thread=True)) as s:
    hs = [s.submit([5 + i, 7, 9, 11], max_new_tokens=12, ignore_eos=True) for i in range(3)]
    print(sum(len([r for r in h]) for h in hs))
"""


def test_the_step_probe_times_a_slot_batch_schedulers_steps(package, tmp_path):
    out = tmp_path / "probe.json"
    code = SCRIPT.format(bench=str(REPO / "benchmarks"), out=str(out), pkg=str(package))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.split()[-1] == "36", run.stdout  # 3 requests x 12 tokens reached their readers
    got = json.loads(out.read_text())  # written at exit
    for key in ("step_prep", "step_prep_cpu", "step_run", "step_post", "overlapped_step", "picks", "deliver"):
        assert got[key]["n"] >= 5 and got[key]["median_ms"] >= 0, (key, got.get(key))
    assert got["step_run"]["median_ms"] > 0 and got["switch_interval_ms"] == 5.0
