"""Where a served decode step's time goes, inside the engine process (a probe, not product code).

``gpu_serving.py``'s ``+probe`` config extra loads this in every Python process of the server
(through a ``sitecustomize``); it wraps, in the process that runs steps:

- ``StaticEngine._step`` (decode steps of at least MIN_ROWS rows): its host part before the run
  (the staging arrays, the two ``update_inplace`` uploads; ``_cpu``: the thread's CPU time in it,
  against the wall time: the rest waited, for the GIL or the copy), the run (``run_with_iobinding``: the
  device's time, plus the wait for the GIL after it returns), and the part after (the ids' copy);
- the slot batch's overlapped step: the whole forward as the step clock counts it;
- the picks worker, the emitter and the outbox's sends: when each of their calls ran, relative to
  the run they overlapped (a thread still in Python when the run returns holds the GIL the step
  loop then waits for, up to the switch interval).

Every PERIOD steps it writes medians and quartiles to ``PORTABLE_INFER_PROBE`` (a JSON path).
"""

from __future__ import annotations

import atexit
import json
import os
import statistics
import threading
import time

MIN_ROWS = 64  # decode steps smaller than this are not recorded (warm-up, ramps)
PERIOD = 200  # steps between two writes of the summary (and one at exit)

_rec: dict = {}
_lock = threading.Lock()
_last_run: list = [0.0, 0.0]  # the last decode run's start and end (perf_counter)
_steps = [0]


def _add(key: str, value: float) -> None:
    with _lock:
        _rec.setdefault(key, []).append(value)


def _summary() -> dict:
    out = {}
    with _lock:
        items = {k: list(v) for k, v in _rec.items()}
    for k, v in items.items():
        v = sorted(v)
        q = lambda f: v[min(len(v) - 1, int(f * len(v)))]  # noqa: E731
        out[k] = {"n": len(v), "median_ms": 1e3 * statistics.median(v), "p25_ms": 1e3 * q(0.25),
                  "p75_ms": 1e3 * q(0.75), "p95_ms": 1e3 * q(0.95)}
    out["switch_interval_ms"] = 1e3 * __import__("sys").getswitchinterval()
    return out


def _write(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_summary(), f, indent=1)
    os.replace(tmp, path)


def _timed_call(fn, key: str):
    """``fn`` wrapped: its duration under ``key``, and when it started and ended counted from the
    start of the last decode run (``key``_start / ``key``_end: past the run's device time, the
    call held the GIL as the run returned)."""
    def wrapped(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            e = time.perf_counter()
            _add(key, e - t)
            if _last_run[0]:
                _add(f"{key}_start", t - _last_run[0])
                _add(f"{key}_end", e - _last_run[0])
    return wrapped


def install(path: str) -> None:
    from portable_infer.engine import static
    from portable_infer.serving import engine_core, running_batch, scheduler_queues, slot_batch

    step = static.StaticEngine._step

    def probed_step(self, ids, rows, cache, want, meanwhile=None, session=None):
        if ids.shape[0] < MIN_ROWS or ids.shape[1] != 1 or session not in (None, self.session):
            return step(self, ids, rows, cache, want, meanwhile, session)  # (a CPU batched companion's: not timed)
        sess = self.session  # the tuner's engines share it: its marks live on it
        if not getattr(sess, "_probed", False):
            run = sess.run_with_iobinding
            marks = sess._probe_marks = [0.0, 0.0, 0.0]  # the run's start, end, and the thread's CPU at its start

            def timed_run(*a, **kw):
                marks[2] = time.thread_time()
                marks[0] = _last_run[0] = time.perf_counter()
                try:
                    return run(*a, **kw)
                finally:
                    marks[1] = _last_run[1] = time.perf_counter()
            sess.run_with_iobinding = timed_run
            sess._probed = True
        t0, c0 = time.perf_counter(), time.thread_time()
        out = step(self, ids, rows, cache, want, meanwhile, session)
        t1 = time.perf_counter()
        s, e, c = sess._probe_marks
        _add("step_prep", s - t0)
        _add("step_prep_cpu", c - c0)
        _add("step_run", e - s)
        _add("step_post", t1 - e)
        _steps[0] += 1
        if _steps[0] % PERIOD == 0:
            _write(path)
        return out

    static.StaticEngine._step = probed_step
    atexit.register(lambda: _rec and _write(path))
    overlapped = slot_batch.SlotBatch._overlapped

    def probed_overlapped(self, how, view, rows, seqs, early=None):
        t = time.perf_counter()
        try:
            return overlapped(self, how, view, rows, seqs, early)
        finally:
            if view.batch >= MIN_ROWS:
                _add("overlapped_step", time.perf_counter() - t)
    slot_batch.SlotBatch._overlapped = probed_overlapped
    running_batch.RunningBatch._picks_handed_over = _timed_call(running_batch.RunningBatch._picks_handed_over, "picks")
    scheduler_queues.RequestQueues.deliver = _timed_call(scheduler_queues.RequestQueues.deliver, "deliver")
    engine_core.Outbox.send = _timed_call(engine_core.Outbox.send, "outbox_send")


if os.environ.get("PORTABLE_INFER_PROBE"):
    install(os.environ["PORTABLE_INFER_PROBE"])
