"""Kernel switches raced as session environments (``ProviderSpec.session_envs``): the variables set
only while a session is made, the candidates the tuner times, and the choice through load().

CPU sessions have no such switch of their own, so the CPU row is given one for these tests
(``PI_TEST_SWITCH``); what each session was made with is read back from ONNX Runtime's
InferenceSession calls, and step times are faked per session.
"""

from __future__ import annotations

import os
from types import MappingProxyType

import pytest

import portable_infer
from portable_infer.engine import measure, providers, tune
from portable_infer.package.manifest import Manifest

VAR = "PI_TEST_SWITCH"


def test_variables_are_set_while_a_session_is_made_then_restored(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    monkeypatch.setenv("PI_TEST_KEPT", "mine")
    with providers.session_env_vars({VAR: "0", "PI_TEST_KEPT": "theirs"}):
        assert os.environ[VAR] == "0" and os.environ["PI_TEST_KEPT"] == "theirs"
    assert VAR not in os.environ and os.environ["PI_TEST_KEPT"] == "mine"
    with pytest.raises(RuntimeError):
        with providers.session_env_vars({VAR: "1"}):
            raise RuntimeError("the session failed")
    assert VAR not in os.environ


def test_cuda_races_xqa_off_on_static_graphs_unless_the_user_chose(monkeypatch, tiny_llama):
    cuda = next(s for s in providers.PROVIDERS if s.key == "cuda")
    variants = {v.name: v for v in Manifest.load(tiny_llama.package).variants}
    monkeypatch.delenv("ORT_ENABLE_XQA", raising=False)
    assert measure.session_envs(cuda, variants["static"]) == ["", "xqa-off"]
    assert measure.session_envs(cuda, variants["fused"]) == [""]  # KV growth is not raced, nor its kernels
    monkeypatch.setenv("ORT_ENABLE_XQA", "1")  # the user's setting decides
    assert measure.session_envs(cuda, variants["static"]) == [""]
    assert measure.candidate_name("static", "xqa-off") == "static+xqa-off"


@pytest.fixture
def switched(monkeypatch, tmp_path, tiny_llama):
    """The CPU row with one switch; measuring on, a fresh cache; step times faked by the value of
    the switch each timed session was made with: {None or "1": seconds}."""
    import onnxruntime as ort

    saved = providers.CPU.session_envs  # a frozen row: set for this test only, restored below
    object.__setattr__(providers.CPU, "session_envs", MappingProxyType({"test-switch": {VAR: "1"}}))
    monkeypatch.delenv(VAR, raising=False)
    monkeypatch.setenv(tune.TUNE_ENV, "1")
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(tmp_path / "home"))
    made, times, timed = {}, {None: 0.010, "1": 0.010}, []
    real = ort.InferenceSession

    def session(*args, **kw):
        s = real(*args, **kw)
        made[id(s)] = os.environ.get(VAR)
        return s

    def fake(engine, vocab_size, batch, steps=measure.STEPS, context=measure.PROMPT_TOKENS):
        timed.append((made[id(engine.session)], batch, context))
        if times[made[id(engine.session)]] is None:
            raise RuntimeError("out of memory")
        return times[made[id(engine.session)]]
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(measure, "step_seconds", fake)
    yield made, times, timed
    object.__setattr__(providers.CPU, "session_envs", saved)


def load(pkg):
    return portable_infer.load(pkg, "cpu", static_kv=True, accuracy_level=1)


def test_the_faster_switch_runs_and_is_cached(switched, tiny_llama):
    made, times, timed = switched
    times["1"] = 0.004
    m = load(tiny_llama.package)
    assert m.variant == "static" and made[id(m.engine.session)] == "1"
    assert m.session_env == "test-switch" and "variant=static+test-switch," in repr(m)  # what runs, named
    assert [v for v, _, _ in timed] == [None, "1"]  # as is, then with the switch
    assert {c for _, _, c in timed} == {measure.SWITCH_CONTEXT}  # long enough for attention to show
    assert os.environ.get(VAR) is None  # only while the session was made
    cached = tune.cached_decisions(measure.tune_cache_dir(), tiny_llama.package)
    assert [d["chosen"] for d in cached] == ["static+test-switch"]
    n = len(timed)
    again = load(tiny_llama.package)
    assert made[id(again.engine.session)] == "1" and len(timed) == n  # from the cache


def test_as_is_wins_when_faster(switched, tiny_llama):
    made, times, _ = switched
    times["1"] = 0.030
    m = load(tiny_llama.package)
    assert made[id(m.engine.session)] is None and m.session_env == "" and "variant=static," in repr(m)


def test_a_switch_that_fails_does_not_compete(switched, tiny_llama, caplog):
    made, times, _ = switched
    times["1"] = None  # its timing raises
    m = load(tiny_llama.package)
    assert made[id(m.engine.session)] is None and m.session_env == "" and "variant=static," in repr(m)
    assert "static+test-switch did not run on this host" in caplog.text
    cached = tune.cached_decisions(measure.tune_cache_dir(), tiny_llama.package)
    assert cached[0]["chosen"] == "static" and cached[0]["timings_ms"]["static+test-switch"]["1"] == float("inf")


def test_the_users_variable_is_not_raced(switched, tiny_llama, monkeypatch):
    made, _, timed = switched
    monkeypatch.setenv(VAR, "7")
    m = load(tiny_llama.package)
    assert made[id(m.engine.session)] == "7" and timed == []  # one candidate left: nothing timed
    assert os.environ[VAR] == "7"  # left as the user set it


def test_an_unknown_switch_is_refused(tiny_llama):
    man = Manifest.load(tiny_llama.package)
    with pytest.raises(ValueError, match="no session environment 'nope'"):
        providers.select_session(man.variants, tiny_llama.package, "cpu", session_env="nope")


def test_serve_times_its_max_batch():
    from portable_infer.cli import _load_kwargs, build_parser

    ns = build_parser().parse_args(["serve", "--max-batch", "64"])
    assert _load_kwargs(ns)["tune_batch"] == 64
    ns = build_parser().parse_args(["tune", "--batch", "8"])
    assert _load_kwargs(ns)["tune_batch"] == 8


def test_a_candidate_session_is_made_once_for_every_batch_size_and_kept_if_it_wins(switched, tiny_llama):
    made, times, timed = switched
    times["1"] = 0.004
    m = portable_infer.load(tiny_llama.package, "cpu", static_kv=True, accuracy_level=1, tune_batch=4)
    assert sorted((v or "", b) for v, b, _ in timed) == [("", 1), ("", 4), ("1", 1), ("1", 4)]
    switched_sessions = [k for k, v in made.items() if v == "1"]
    assert switched_sessions == [id(m.engine.session)]  # made once, timed at 1 and 4, then run


def test_a_cached_switch_that_no_longer_starts_runs_as_is(switched, tiny_llama, monkeypatch, caplog):
    made, times, _ = switched
    times["1"] = 0.004
    assert made[id(load(tiny_llama.package).engine.session)] == "1"  # measured and cached
    real = providers._start

    def refuse(*args, **kw):
        if args[-1].get(VAR) == "1":  # the environment the session would be made with
            raise RuntimeError("CUDA out of memory")
        return real(*args, **kw)
    monkeypatch.setattr(providers, "_start", refuse)
    m = load(tiny_llama.package)
    assert made[id(m.engine.session)] is None and "did not start" in caplog.text


def test_a_timing_prefill_in_row_groups_is_the_prefill_at_once(tiny_llama, monkeypatch):
    """Beyond PREFILL_TOKENS the timed rows prefill in groups into one buffer (as the scheduler's
    chunks): the decode step after it computes what it does after one prefill of every row."""
    import numpy as np

    m = portable_infer.load(tiny_llama.package, "cpu", static_kv=True, accuracy_level=1)
    seed = int(np.random.default_rng().integers(1 << 31))
    print("seed", seed)
    ids = np.random.default_rng(seed).integers(3, 200, (5, 6))
    steps = []
    for limit in (10_000, 12):  # all rows at once; two rows a forward
        monkeypatch.setattr(measure, "PREFILL_TOKENS", limit)
        cache = measure._prefilled(m.engine, ids, 16)
        assert (cache.owner is None) == (limit == 10_000)  # grouped: a view of the one buffer
        mask = np.ones((5, 7), np.int64)
        steps.append(m.engine.forward(ids[:, -1:], mask, cache))
    np.testing.assert_allclose(steps[0], steps[1], rtol=1e-5, atol=1e-5)


def test_when_the_running_session_cannot_be_timed_it_runs_untimed(switched, tiny_llama, caplog):
    made, times, _ = switched
    times[None] = None  # timing the session as is raises (out of memory, say)
    m = load(tiny_llama.package)
    assert made[id(m.engine.session)] is None and "running it without measuring" in caplog.text
    assert tune.cached_decisions(measure.tune_cache_dir(), tiny_llama.package) == []  # nothing decided
