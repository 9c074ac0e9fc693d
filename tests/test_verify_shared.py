"""verify_package (exporters/verify.py) runs the transformers reference once per input, whatever
the number of variants, and holds one ONNX session at a time.

Seeds: the random ids come from ``np.random.default_rng(seed)`` with a printed seed (set
``VERIFY_SEED`` to replay)."""

from __future__ import annotations

import os
import weakref

import numpy as np
import pytest

from portable_infer.package import manifest as mf

VARIANTS = ("portable", "fused", "fused-int8", "static")
# the quality check's positions without a tokenizer: the greedy steps and the fixed ids' (as a text)
QUALITY_STEPS = 128 + 64 - 1  # verify.AGREEMENT_STEPS + verify.FIXED_IDS - 1


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("VERIFY_SEED") or np.random.SeedSequence().entropy % 2**31)
    print(f"VERIFY_SEED={s}")
    return s


@pytest.fixture(scope="module")
def int4_package(tiny_llama, tmp_path_factory):
    from exporters.export import export

    return export(tiny_llama.source, tmp_path_factory.mktemp("verify_shared") / "pkg", precision="int4",
                  verify=False, variants=VARIANTS)


class CountingModel:
    """The reference model, counting its forward passes and generate calls and the ids it saw."""

    def __init__(self, model):
        self.model, self.forwards, self.generates, self.inputs = model, 0, 0, []

    def __call__(self, **kwargs):
        self.forwards += 1
        self.inputs.append(kwargs["input_ids"].numpy().copy())
        return self.model(**kwargs)

    def generate(self, *args, **kwargs):
        self.generates += 1
        return self.model.generate(*args, **kwargs)


def _verify(package, tiny_llama, seed, only=()):
    from exporters.sources import open_source
    from exporters.verify import verify_package

    model = CountingModel(tiny_llama.model)
    report = verify_package(package, mf.Manifest.load(package), open_source(tiny_llama.source), model=model,
                            only=only, rng=np.random.default_rng(seed))
    return model, report


def test_the_reference_runs_once_per_input_not_per_variant(int4_package, tiny_llama, seed):
    one, report_one = _verify(int4_package, tiny_llama, seed, only=("portable",))
    every, report = _verify(int4_package, tiny_llama, seed)
    assert set(report) == set(VARIANTS) and set(report_one) == {"portable"}
    assert one.generates == 1 and one.forwards > 1  # the checks ran
    assert (every.forwards, every.generates) == (one.forwards, one.generates)  # four variants, one reference
    # the same random ids (same seed), so the shared variant's report is the same
    assert all(np.array_equal(a, b) for a, b in zip(one.inputs, every.inputs))
    assert report["portable"] == report_one["portable"]
    for name, r in report.items():  # every check and gate still ran on every variant
        assert None not in (r.full, r.cached, r.greedy, r.quality), (name, r)
        assert r.greedy.steps == 16 and r.quality.steps == QUALITY_STEPS, (name, r)


def test_one_onnx_session_at_a_time(int4_package, tiny_llama, seed, monkeypatch):
    """Each decoder is freed before the next one is made (each session holds its own weights)."""
    from exporters import verify

    made, alive_at_creation = [], []
    real = verify.decoder

    def tracking(*args, **kwargs):
        alive_at_creation.append(sum(ref() is not None for ref in made))
        dec = real(*args, **kwargs)
        made.append(weakref.ref(dec))
        return dec

    monkeypatch.setattr(verify, "decoder", tracking)
    _verify(int4_package, tiny_llama, seed)
    assert len(made) == len(VARIANTS)
    assert alive_at_creation == [0] * len(VARIANTS), alive_at_creation


def test_the_reference_model_is_let_go_before_the_first_session(int4_package, tiny_llama, seed, monkeypatch):
    """The export path (no model passed): the reference's weights are freed once its results are
    computed, so they are never resident beside an ONNX session."""
    from exporters import verify
    from exporters.sources import open_source

    loaded, alive_at_session = [], []
    real = verify.decoder

    def load_reference(src, table_bits=None):
        model = CountingModel(tiny_llama.model)
        loaded.append(weakref.ref(model))
        return model

    def tracking(*args, **kwargs):
        alive_at_session.append(loaded[0]() is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "load_reference", load_reference)
    monkeypatch.setattr(verify, "decoder", tracking)
    report = verify.verify_package(int4_package, mf.Manifest.load(int4_package), open_source(tiny_llama.source),
                                   rng=np.random.default_rng(seed))
    assert set(report) == set(VARIANTS) and len(loaded) == 1
    assert alive_at_session == [False] * len(VARIANTS), alive_at_session


def test_the_verify_command_prints_the_report_in_the_manifest_form(int4_package, capsys):
    """``portable-infer verify``: the typed report of every variant, as manifest.json holds it."""
    import json

    from portable_infer import cli
    from portable_infer.package.verification import VariantReport

    assert cli.main(["verify", str(int4_package)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == set(VARIANTS)
    for name, d in printed.items():
        r = VariantReport.from_json(d)
        assert r.to_json() == d and r.greedy.steps == 16 and r.quality.steps == QUALITY_STEPS, (name, d)
