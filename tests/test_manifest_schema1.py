"""Manifest schema versions: a schema-1 package (exporters up to 0.3.0) still loads, its free-form
verification report read as the typed one; a later schema is refused with a SchemaVersionError
that says to upgrade.

The schema-1 form comes from tests/golden/manifest_schema1.json (what the 0.3.0 exporter wrote:
``schema_version`` and the free-form report, as the full check and as the lean check recorded
it), laid over a package exported today (every other field is the same in both schemas), so the
test does not depend on today's writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import portable_infer
from portable_infer.cli import main
from portable_infer.errors import ManifestError, SchemaVersionError
from portable_infer.package import manifest as mf
from portable_infer.package.variants import passes_gate
from portable_infer.package.verification import Quality, WeightFit

from _trust import copy_package, manifest_dict, write_manifest

GOLDEN = json.loads((Path(__file__).parent / "golden" / "manifest_schema1.json").read_text())
CHECKS = ("full_check", "lean_check")


@pytest.fixture(scope="module")
def int4_package(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama at int4 (portable, fused, fused-int8, static, static-int8), not verified."""
    from exporters.export import export

    return export(tiny_llama.source, tmp_path_factory.mktemp("schema1") / "pkg", precision="int4", verify=False)


def as_schema1(pkg: Path, dst: Path, check: str) -> Path:
    """A copy of ``pkg`` whose manifest.json is in schema 1's form (the golden's ``check``),
    its files[] re-checksummed as the package format requires."""
    out = copy_package(pkg, dst)
    d = manifest_dict(out)
    d.update(GOLDEN[check])
    write_manifest(out, d, refresh=True)
    return out


@pytest.mark.parametrize("check", CHECKS)
def test_a_schema1_package_loads_with_its_report_typed(int4_package, tmp_path, check):
    pkg = as_schema1(int4_package, tmp_path / "pkg", check)
    old = GOLDEN[check]["verification"]
    assert manifest_dict(pkg)["schema_version"] == 1

    model = portable_infer.load(pkg, "cpu", intra_op_threads=1)
    m = model.manifest
    assert m.schema_version == mf.SCHEMA_VERSION == 2
    assert set(m.verification) == set(old)
    for name, r in m.verification.items():
        d = old[name]
        for key in ("quality", "agreement"):  # the counts kept, the derived values recomputed exactly
            q = getattr(r, key)
            assert (q is None) == (key not in d), (check, name, key)
            if q is not None:
                assert (q.top1_agreement, q.agree_steps) == (d[key]["top1_agreement"], d[key]["top1_agree_steps"])
                assert q.perplexity_delta == d[key].get("perplexity_delta"), (check, name, q)
        for key in ("full", "cached", "reference_logits"):
            diff = getattr(r, key)
            want = d.get(key) and (d[key]["max_abs"], d[key]["max_rel"])
            assert (diff and (diff.max_abs, diff.max_rel)) == want, (check, name, key)
        assert r.reference == d.get("reference") and r.dropped == d.get("dropped")
        assert (r.greedy and (r.greedy.steps, r.greedy.identical_prefix)) == (
            d.get("greedy") and (d["greedy"]["steps"], d["greedy"]["identical_prefix"]))
        want = d.get("consistency") and d["consistency"]["padded"]["max_rel"]
        assert (r.consistency and r.consistency.padded.max_rel) == want, (check, name)
        assert r.weight_fit == (WeightFit(**d["weight_fit"]) if "weight_fit" in d else None)
    # the quality gate reads the converted report: static-int8 (126/128) passed, fused-int8 (121/128) did not
    assert passes_gate(m.verification["static-int8"]) and not passes_gate(m.verification["fused-int8"])
    assert model.variant == "static-int8"
    assert portable_infer.load(pkg, "cpu", intra_op_threads=1, static_kv=False).variant == "fused"
    assert len(model.generate_ids([5, 6, 7], max_new_tokens=4)) == 4
    # saved again, the manifest is schema 2 and reads back equal
    again = json.loads(m.to_json())
    assert again["schema_version"] == 2 and mf.Manifest.from_dict(again) == m
    assert again["verification"]["static-int8"]["quality"] == {
        "agreed": 126, "steps": 128, "perplexity": old["static-int8"]["quality"]["perplexity"],
        "perplexity_reference": old["static-int8"]["quality"]["perplexity_reference"]}


def test_inspect_shows_a_schema1_report(int4_package, tmp_path, capsys):
    pkg = as_schema1(int4_package, tmp_path / "pkg", "full_check")
    assert main(["inspect", str(pkg)]) == 0
    out = capsys.readouterr().out
    assert ("verified     static-int8: max rel diff 3.44e-02, greedy 16/16, top-1 126/128, ppl 263.600; "
            "runs by default") in out
    assert "fused-int8: " in out and "below the quality gate" in out
    assert "static-q4: " in out and "left out of the package: top-1 agreement 97/128" in out


@pytest.mark.parametrize("breakage, field", [
    (lambda r: r["fused"].update(notes="hand-written"), "verification.fused"),  # a key no exporter wrote
    (lambda r: r["fused"]["quality"].pop("top1_agree_steps"), "verification.fused.quality.top1_agree_steps"),
    (lambda r: r["fused"]["quality"].update(top1_agree_steps="127 of 128"),
     "verification.fused.quality.top1_agree_steps"),
    (lambda r: r["fused"]["quality"].update(top1_agree_steps="129/128"), "verification.fused.quality"),
    (lambda r: r["fused"]["quality"].pop("perplexity_reference"), "verification.fused.quality"),
    (lambda r: r["fused"]["quality"].update(agreed=127, steps=128), "verification.fused.quality"),  # schema 2's keys
])
def test_a_schema1_report_holds_only_what_schema1_exporters_wrote(int4_package, tmp_path, breakage, field):
    """Unknown keys are refused, not kept: no reader of a schema-1 package ever read one, and the
    typed report has no untyped corner to carry them in."""
    pkg = as_schema1(int4_package, tmp_path / "pkg", "full_check")
    d = manifest_dict(pkg)
    breakage(d["verification"])
    write_manifest(pkg, d)
    with pytest.raises(ManifestError) as info:
        mf.Manifest.load(pkg)
    assert info.value.field == field and "re-export" in str(info.value)


def test_a_later_schema_is_refused_saying_to_upgrade(int4_package, tmp_path, capsys):
    pkg = copy_package(int4_package, tmp_path / "pkg")
    d = manifest_dict(pkg)
    d["schema_version"] = mf.SCHEMA_VERSION + 1
    write_manifest(pkg, d)
    with pytest.raises(SchemaVersionError, match=r"schema_version is 3, newer .* upgrade portable-infer"):
        portable_infer.load(pkg, "cpu")
    assert main(["inspect", str(pkg)]) == 2
    assert "pip install -U portable-infer" in capsys.readouterr().err


def test_agreement_counts_give_the_derived_values():
    q = Quality(agreed=126, steps=128, perplexity=263.6, perplexity_reference=262.41)
    assert (q.top1_agreement, q.agree_steps, q.perplexity_delta) == (126 / 128, "126/128", 263.6 / 262.41 - 1)
    assert Quality(agreed=32, steps=32).perplexity_delta is None
