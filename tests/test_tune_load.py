"""Measured variant choice through load(): which variants compete, the cache, prefer, the switch.

Timings are faked (``measure.step_seconds`` replaced by a table) so the choice is deterministic;
one test times the real graphs and checks only that a candidate was chosen and cached.
"""

from __future__ import annotations

import json
import shutil

import pytest

import portable_infer
from portable_infer.engine import measure, tune
from portable_infer.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def int4_package(tiny_llama, tmp_path_factory):
    """tiny_llama at int4, with the int8 twins recorded as past the quality gate."""
    from exporters.export import export

    pkg = export(tiny_llama.source, tmp_path_factory.mktemp("tune") / "int4", precision="int4", verify=False)
    data = json.loads((pkg / "manifest.json").read_text())
    for v in data["variants"]:
        if v["name"] != "portable":
            data.setdefault("verification", {}).setdefault(v["name"], {})["quality"] = {
                "agreed": 99, "steps": 100, "perplexity": 1.001, "perplexity_reference": 1.0}  # 99 %, +0.1 %
    (pkg / "manifest.json").write_text(json.dumps(data))
    return pkg


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Measuring on, a fresh cache, and faked step times: {variant name: seconds}."""
    monkeypatch.setenv(tune.TUNE_ENV, "1")
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(tmp_path / "home"))
    times, calls = {}, []

    def fake(engine, vocab_size, batch, steps=measure.STEPS, context=measure.PROMPT_TOKENS):
        calls.append((engine.variant.name, batch))
        return times.get(engine.variant.name, 1.0) * (batch ** 0.5)
    monkeypatch.setattr(measure, "step_seconds", fake)
    return times, calls


def static_names(pkg):
    return [v["name"] for v in json.loads((pkg / "manifest.json").read_text())["variants"]
            if v["name"].startswith("static") and v["name"] != "static-dense"]  # a companion, never a candidate


def test_fastest_gated_variant_runs_and_is_cached(int4_package, tuning):
    times, calls = tuning
    names = static_names(int4_package)
    assert "static" in names and len(names) >= 2, names
    fastest = [n for n in names if n != "static"][-1]
    times.update({n: 0.010 for n in names})
    times[fastest] = 0.004
    m = portable_infer.load(int4_package, "cpu")
    assert m.variant == fastest
    assert sorted(n for n, _ in calls) == sorted(names)
    n = len(calls)
    again = portable_infer.load(int4_package, "cpu")
    assert again.variant == fastest and len(calls) == n  # from the cache: nothing timed
    cached = tune.cached_decisions(measure.tune_cache_dir(), int4_package)
    assert [d["chosen"] for d in cached] == [fastest]


@pytest.mark.parametrize("winner", ["rule", "other"])
def test_one_session_alive_at_a_time(int4_package, tuning, monkeypatch, winner):
    """Each candidate's session is released before the next is made (tuning peaks at one graph's
    memory); the rule's variant is timed first, and made again where it wins after another."""
    import gc
    import weakref

    times, calls = tuning
    made = []
    real = measure.make_engine

    def counting(sel, *args, **kwargs):
        made.append(weakref.ref(sel.session))
        gc.collect()
        alive = [r for r in made if r() is not None]
        assert len({id(r()) for r in alive}) == 1, f"{len(alive)} sessions alive while timing {sel.variant.name}"
        return real(sel, *args, **kwargs)
    monkeypatch.setattr(measure, "make_engine", counting)
    names = static_names(int4_package)
    monkeypatch.setenv(tune.TUNE_ENV, "0")
    rule = portable_infer.load(int4_package, "cpu").variant  # the rule's choice
    monkeypatch.setenv(tune.TUNE_ENV, "1")
    times.update({n: 0.010 for n in names})
    fastest = rule if winner == "rule" else next(n for n in names if n != rule)
    times[fastest] = 0.001
    made.clear()
    calls.clear()
    m = portable_infer.load(int4_package, "cpu", tune_batch=8)
    assert m.variant == fastest
    assert calls[0][0] == rule and [b for _, b in calls[:2]] == [1, 8]  # the rule's first, all batches in a row
    assert len(made) == 2 * len(names) + 1  # one engine per timing, and the model's own


def test_exact_wins_a_near_tie(int4_package, tuning):
    times, _ = tuning
    times.update({n: 0.0100 for n in static_names(int4_package)})
    times["static"] = 0.0102
    assert portable_infer.load(int4_package, "cpu").variant == "static"


def test_prefer_exact_runs_only_exact_graphs(int4_package, tuning):
    times, calls = tuning
    times.update({n: 0.001 for n in static_names(int4_package)})
    times["static"] = 0.05
    m = portable_infer.load(int4_package, "cpu", prefer="exact")
    assert m.variant == "static" and calls == []  # one exact static graph: nothing to race


def test_tune_batch_is_timed(int4_package, tuning):
    _, calls = tuning
    portable_infer.load(int4_package, "cpu", tune_batch=8)
    assert {b for _, b in calls} == {1, 8}


def test_switch_off_keeps_the_rules(int4_package, tuning, monkeypatch):
    times, calls = tuning
    monkeypatch.setenv(tune.TUNE_ENV, "0")
    times.update({n: 0.001 for n in static_names(int4_package)})
    times["static-int8"] = 0.05
    assert portable_infer.load(int4_package, "cpu").variant == "static-int8" and calls == []  # the gated twin


def test_below_the_gate_does_not_compete(int4_package, tuning, tmp_path):
    times, calls = tuning
    pkg = tmp_path / "ungated"
    shutil.copytree(int4_package, pkg)
    data = json.loads((pkg / "manifest.json").read_text())
    data["verification"] = {}
    (pkg / "manifest.json").write_text(json.dumps(data))
    times.update({n: 0.001 for n in static_names(pkg)})
    times["static"] = 0.05
    assert portable_infer.load(pkg, "cpu").variant == "static" and calls == []


@pytest.mark.parametrize("kwargs", [dict(prefer="fast"), dict(prefer="exact", accuracy_level=4),
                                    dict(tune_batch=0), dict(tune_batch=True)])
def test_bad_preferences_are_typed(int4_package, kwargs):
    with pytest.raises(InvalidArgumentError):
        portable_infer.load(int4_package, "cpu", **kwargs)


def test_real_timing_chooses_a_candidate(int4_package, monkeypatch, tmp_path):
    monkeypatch.setenv(tune.TUNE_ENV, "1")
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(tmp_path / "home"))
    m = portable_infer.load(int4_package, "cpu")
    cached = tune.cached_decisions(measure.tune_cache_dir(), int4_package)
    assert len(cached) == 1 and cached[0]["chosen"] == m.variant
    assert set(cached[0]["timings_ms"]) == set(static_names(int4_package))
    assert all(ms["1"] > 0 for ms in cached[0]["timings_ms"].values())


def test_tune_command_measures_again_and_doctor_shows_it(int4_package, tuning, capsys):
    from portable_infer.cli import main

    times, calls = tuning
    times.update({n: 0.010 for n in static_names(int4_package)})
    times["static"] = 0.002
    assert main(["tune", "--model", str(int4_package), "--provider", "cpu"]) == 0
    n = len(calls)
    assert n == len(static_names(int4_package))
    out = json.loads(capsys.readouterr().out)
    assert out["variant"] == "static" and out["decisions"][0]["chosen"] == "static"
    assert main(["tune", "--model", str(int4_package), "--provider", "cpu"]) == 0
    assert len(calls) == 2 * n  # tune always measures, the cache notwithstanding
    capsys.readouterr()
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "ISA:" in text and "measured choice: static on CPUExecutionProvider" in text


def test_inspect_shows_the_host_and_the_measured_choice(int4_package, tuning):
    from portable_infer.package.package_info import describe

    assert "no variant choice cached" in describe(int4_package)
    times, _ = tuning
    times.update({n: 0.010 for n in static_names(int4_package)})
    times["static"] = 0.002
    portable_infer.load(int4_package, "cpu")
    text = describe(int4_package)
    assert "host " in text and "ISA:" in text
    assert "measured     static on CPUExecutionProvider" in text
