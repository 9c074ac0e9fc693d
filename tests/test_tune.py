"""Measured variant choice: the decision on faked timings, the on-disk cache and its key."""

from __future__ import annotations

import dataclasses
import json

import pytest

from portable_infer.engine import tune
from portable_infer.engine.tune import Candidate, TuneKey

EXACT, INT8, Q4 = Candidate("static", True), Candidate("static-int8", False), Candidate("static-q4", False)


def key(**kw) -> TuneKey:
    base = dict(package="d" * 64, cpu="Fake EPYC", isa=("avx2", "fma"), ort="1.32.0",
                provider="CPUExecutionProvider", threads=2, batches=(1,), prefer="speed",
                candidates=("static", "static-int8"))
    return TuneKey(**{**base, **kw})


def faked(ms: dict):
    calls = []

    def time_variant(name, batch):
        calls.append((name, batch))
        return ms[name][batch] / 1000.0
    return time_variant, calls


def test_fastest_wins():
    t, _ = faked({"static": {1: 30.0}, "static-int8": {1: 10.0}})
    assert tune.choose([EXACT, INT8], t, key(), None).chosen == "static-int8"


def test_exact_wins_within_margin():
    # 3 % slower than the int8 twin: within EXACT_MARGIN, so accuracy is not traded for noise
    t, _ = faked({"static": {1: 10.3}, "static-int8": {1: 10.0}})
    assert tune.choose([EXACT, INT8], t, key(), None).chosen == "static"
    t, _ = faked({"static": {1: 10.0 * (1 + tune.EXACT_MARGIN) + 0.2}, "static-int8": {1: 10.0}})
    assert tune.choose([EXACT, INT8], t, key(), None).chosen == "static-int8"


def test_batches_weigh_equally():
    # q4 is fastest at batch 1 by 10 %, int8 fastest at 16 by 40 %: int8 has the better mean ratio
    ms = {"static-int8": {1: 11.0, 16: 60.0}, "static-q4": {1: 10.0, 16: 100.0}}
    t, calls = faked(ms)
    k = key(batches=(1, 16), candidates=("static-int8", "static-q4"))
    assert tune.choose([INT8, Q4], t, k, None).chosen == "static-int8"
    assert sorted(calls) == sorted((n, b) for n in ms for b in (1, 16))


def test_single_candidate_is_not_timed():
    t, calls = faked({})
    assert tune.choose([EXACT], t, key(), None).chosen == "static" and calls == []


def test_cached_decision_is_reused(tmp_path):
    t, calls = faked({"static": {1: 30.0}, "static-int8": {1: 10.0}})
    first = tune.choose([EXACT, INT8], t, key(), tmp_path)
    assert first.measured and len(calls) == 2
    again = tune.choose([EXACT, INT8], t, key(), tmp_path)
    assert again.chosen == "static-int8" and not again.measured and len(calls) == 2
    assert again.timings_ms == {"static": {1: 30.0}, "static-int8": {1: 10.0}}
    tune.choose([EXACT, INT8], t, key(), tmp_path, remeasure=True)
    assert len(calls) == 4


@pytest.mark.parametrize("change", [dict(isa=("avx2", "fma", "avx512f", "avx512_vnni")), dict(ort="1.33.0"),
                                    dict(threads=4), dict(cpu="Fake Xeon"), dict(provider="OpenVINOExecutionProvider"),
                                    dict(package="e" * 64), dict(batches=(1, 16)), dict(prefer="exact")])
def test_key_changes_with_what_changes_the_answer(change, tmp_path):
    assert key().digest() != key(**change).digest()
    t, calls = faked({"static": {1: 30.0, 16: 60.0}, "static-int8": {1: 10.0, 16: 60.0}})
    tune.choose([EXACT, INT8], t, key(), tmp_path)
    n = len(calls)
    tune.choose([EXACT, INT8], t, key(**change), tmp_path)
    assert len(calls) > n  # a different host, runtime or request measures again


def test_damaged_or_stale_cache_measures_again(tmp_path):
    t, calls = faked({"static": {1: 30.0}, "static-int8": {1: 10.0}})
    tune.choose([EXACT, INT8], t, key(), tmp_path)
    path = tmp_path / f"{key().digest()}.json"
    path.write_text("{not json")
    assert tune.choose([EXACT, INT8], t, key(), tmp_path).measured
    data = json.loads(path.read_text())
    data["chosen"] = "gone-variant"
    path.write_text(json.dumps(data))
    assert tune.choose([EXACT, INT8], t, key(), tmp_path).chosen == "static-int8" and len(calls) == 6


def test_unwritable_cache_still_decides(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t, _ = faked({"static": {1: 30.0}, "static-int8": {1: 10.0}})
    assert tune.choose([EXACT, INT8], t, key(), blocker / "sub").chosen == "static-int8"


def test_cached_decisions_lists_by_package(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "manifest.json").write_text('{"schema_version": 1}')
    k = tune.host_key(pkg, "CPUExecutionProvider", 2, (1,), "speed", [EXACT, INT8], "1.32.0")
    t, _ = faked({"static": {1: 30.0}, "static-int8": {1: 10.0}})
    tune.choose([EXACT, INT8], t, k, tmp_path / "tune")
    tune.choose([EXACT, INT8], t, dataclasses.replace(k, package="f" * 64), tmp_path / "tune")
    assert len(tune.cached_decisions(tmp_path / "tune")) == 2
    assert [d["chosen"] for d in tune.cached_decisions(tmp_path / "tune", pkg)] == ["static-int8"]


def test_env_switch(monkeypatch):
    monkeypatch.setenv(tune.TUNE_ENV, "0")
    assert not tune.enabled()
    monkeypatch.setenv(tune.TUNE_ENV, "1")
    assert tune.enabled()


def test_timing_warms_up_by_time_so_a_cold_start_does_not_decide(monkeypatch):
    """A session's first steps after another session ran are slow on a small host (the other's
    threads still spin): median_step_s keeps warming until ``warmup_s`` has passed (at most
    ``warmup_max`` steps), so the timed steps are the steady ones. A fake clock: each step
    advances it, cold steps by 8 ms, then 4 ms."""
    import time

    from portable_infer.engine import tune

    clock, calls = [0.0], [0]

    def step():
        calls[0] += 1
        clock[0] += 0.008 if calls[0] <= 5 else 0.004

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    assert tune.median_step_s(step, steps=6, warmup=1) == pytest.approx(0.008)  # one warm-up: the cold steps count
    clock[0], calls[0] = 0.0, 0
    assert tune.median_step_s(step, steps=6, warmup=1, warmup_s=0.05) == pytest.approx(0.004)
    assert calls[0] == 8 + 6  # warm until 52 ms had passed, then six timed
    clock[0], calls[0] = 0.0, 0
    tune.median_step_s(step, steps=6, warmup=1, warmup_s=10.0, warmup_max=20)
    assert calls[0] == 20 + 6  # never more than warmup_max untimed steps
