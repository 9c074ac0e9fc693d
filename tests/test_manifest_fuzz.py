"""A malformed manifest is a PackageError, wherever it is read: ``load``, ``inspect``, bundles.

2,000 seeded mutations of a real exported manifest, with a verification report in schema 2 or
schema 1 (type swaps, deletions, wrapping, hostile paths, and raw-byte damage: truncation, bit
flips, deep nesting, huge integers, NaN, duplicate keys, non-UTF-8) go through
``portable_infer.load`` and ``portable-infer inspect``; each must load or raise a
PortableInferError. Set PORTABLE_INFER_FUZZ_SEED to replay another run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
from pathlib import Path

import pytest

import portable_infer
from portable_infer.package import manifest as mf
from portable_infer.package import manifest_schema as schema
from portable_infer.package import verification
from portable_infer.cli import main
from portable_infer.errors import ManifestError, PackageError, PortableInferError, SchemaVersionError
from portable_infer.package.package_info import describe

from _trust import copy_package, full_package, manifest_dict  # noqa: F401

SEED = int(os.environ.get("PORTABLE_INFER_FUZZ_SEED", "16002000"))
TRIALS = 2000
JUNK = [None, 0, -1, 1, 7, True, False, 1.0, 2.5, -0.0, 1e308, "", "x", "../../etc/passwd", "/etc/passwd",
        "C:\\evil", "a\x00b", [], [1, "a"], [[]], {}, {"a": 1}, {"name": []}, "\ud800"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(tmp_path / "home"))


def _load(pkg, check="size"):
    return portable_infer.load(pkg, "cpu", intra_op_threads=1, check=check)


def _write(pkg: Path, data) -> None:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode("utf-8", "surrogatepass")
    (pkg / mf.MANIFEST_NAME).write_bytes(raw)


# --- the schema table is the dataclasses ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(schema.TABLES))
def test_schema_table_lists_every_dataclass_field(name):
    cls = getattr(mf, name, None) or getattr(verification, name)
    table = schema.TABLES[name].fields
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(table) == set(fields), f"{name}: the schema table and the dataclass disagree"
    for key, (_, required) in table.items():
        has_default = (fields[key].default is not dataclasses.MISSING
                       or fields[key].default_factory is not dataclasses.MISSING)
        assert required != has_default or name in ("Manifest", "TokenizerInfo", "GenerationDefaults"), key


# --- named cases ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [True, 1.0, "1", 2.0, "2", schema.SCHEMA_VERSION + 1, 0, None, [1]])
def test_schema_version_must_be_an_integer_this_runtime_reads(full_package, version):
    d = manifest_dict(full_package)
    d["schema_version"] = version
    with pytest.raises(SchemaVersionError, match="schema_version"):
        mf.Manifest.from_dict(d)


ISSUE_CASES = {  # the untyped escapes the issue's fuzz run found, and their kin
    "files[0].path is a list": lambda d: d["files"][0].update(path=[]),
    "variant name is a list": lambda d: d["variants"][1].update(name=["fused"]),
    "agreed steps is a dict": lambda d: d.update(verification={"fused-int8": {"quality": {"agreed": {}, "steps": 8}}}),
    "verification entry is a string": lambda d: d.update(verification={"fused": "ok"}),
    "greedy steps is a string": lambda d: d.update(verification={"fused": {"greedy": {"steps": "12",
                                                                                      "identical_prefix": 3}}}),
    "more agreed steps than steps": lambda d: d.update(verification={"fused": {"agreement": {"agreed": 9, "steps": 8}}}),
    "perplexity without its reference": lambda d: d.update(
        verification={"fused": {"quality": {"agreed": 8, "steps": 8, "perplexity": 2.0}}}),
    "unknown report field": lambda d: d.update(verification={"fused": {"int4_fit": {}}}),
    "schema-1 quality in a schema-2 manifest": lambda d: d.update(
        verification={"fused": {"quality": {"top1_agreement": 1.0, "top1_agree_steps": "8/8"}}}),
    "shape holds a dict": lambda d: d["variants"][0]["inputs"][0].update(shape=[{"a": 1}]),
    "kv dtype is not a dtype": lambda d: d["variants"][0]["kv"].update(dtype="floaty"),
    "kv past pair of three": lambda d: d["variants"][0]["kv"]["past"][0].append("x"),
    "num_layers is true": lambda d: d["model"].update(num_layers=True),
    "vocab is a float": lambda d: d["model"].update(vocab_size=256.0),
    "eos id past the vocab": lambda d: d["tokenizer"].update(eos_token_ids=[10**6]),
    "top_p above 1": lambda d: d["generation"].update(top_p=3),
    "temperature is a string": lambda d: d["generation"].update(temperature="0.7"),
    "source nested too deep": lambda d: d.update(source={"a": json.loads("[" * 40 + "]" * 40)}),
    "unknown variant field": lambda d: d["variants"][0].update(surprise=1),
    "duplicate variant names": lambda d: d["variants"].append(copy.deepcopy(d["variants"][0])),
    "no variants": lambda d: d.update(variants=[]),
    "sha256 not hex": lambda d: d["files"][0].update(sha256="Z" * 64),
    "files listed twice": lambda d: d["files"].append(copy.deepcopy(d["files"][0])),
}


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_named_malformations_are_manifest_errors(full_package, tmp_path, case, capsys):
    pkg = copy_package(full_package, tmp_path / "pkg")
    d = manifest_dict(pkg)
    ISSUE_CASES[case](d)
    _write(pkg, d)
    with pytest.raises(ManifestError) as info:
        _load(pkg)
    assert info.value.field and "re-export" in str(info.value)
    assert main(["inspect", str(pkg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


RAW_CASES = {
    "deep nesting": b'{"schema_version": 1, "source": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge integer": b'{"schema_version": 1' + b"0" * 5000 + b"}",
    "huge integer value": b'{"schema_version": 1, "x": ' + b"9" * 5000 + b"}",
    "NaN": b'{"schema_version": 1, "x": NaN}',
    "duplicate key": b'{"schema_version": 1, "schema_version": 1}',
    "not UTF-8": b'{"schema_version": 1, "x": "\xff\xfe"}',
    "lone surrogate escape": b'{"schema_version": 1, "exporter_version": "\\ud800"}',
    "truncated": b'{"schema_version": 1, "model": {"archi',
    "empty": b"",
    "a list": b"[1, 2]",
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_unreadable_manifest_bytes_are_package_errors(full_package, tmp_path, case, capsys):
    pkg = copy_package(full_package, tmp_path / "pkg")
    _write(pkg, RAW_CASES[case])
    with pytest.raises(PackageError):
        _load(pkg)
    assert main(["inspect", str(pkg)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_inspect_describes_a_good_package(full_package):
    text = describe(full_package)
    assert "variant      fused" in text and "files " in text


# --- 2,000 seeded mutations -------------------------------------------------------------------------------
def _paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix, k
        yield from _paths(v, prefix + (k,))


def _mutate_tree(d: dict, rng: random.Random) -> dict:
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(d))
        prefix, key = rng.choice(paths)
        parent = d
        for k in prefix:
            parent = parent[k]
        value = parent[key]
        op = rng.random()
        if isinstance(parent, dict) and op < 0.25:
            del parent[key]
        elif op < 0.35:
            parent[key] = [value]
        elif op < 0.42:
            parent[key] = {"v": value}
        elif op < 0.5 and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = rng.choice([str(value), float(value), -value, value * 10**6, True])
        elif op < 0.55 and isinstance(value, list) and value:
            parent[key] = value + [copy.deepcopy(rng.choice(value))]
        else:
            parent[key] = copy.deepcopy(rng.choice(JUNK))
    return d


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(6)
    if op == 0:
        return raw[:rng.randrange(len(raw))]
    if op == 1:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == 2:
        at = rng.randrange(len(raw))
        return raw[:at] + bytes([rng.randrange(128, 256)]) + raw[at:]
    if op == 3:
        depth = rng.choice([50, 2000, 50_000])
        return raw[:-2] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    if op == 4:
        return raw.replace(b'"num_layers": ', b'"num_layers": ' + b"1" * rng.choice([20, 5000]), 1)
    return raw.replace(b'"precision": ', rng.choice([b'"precision": NaN, "precision": ', b'"precision": 1e999, "x": ']), 1)


def _bases(pkg: Path) -> tuple:
    """The package's manifest with a verification report in every field: in schema 2 (the lean
    check's, converted) and in schema 1 (the full check's), from tests/golden/manifest_schema1.json."""
    golden = json.loads((Path(__file__).parent / "golden" / "manifest_schema1.json").read_text())
    base = manifest_dict(pkg)
    v2 = mf.Manifest.from_dict({**base, **golden["lean_check"]}).to_dict()
    return v2, {**base, **golden["full_check"]}


def test_fuzzed_manifests_load_or_raise_portable_infer_errors(full_package, tmp_path, capsys):
    print(f"manifest fuzz seed {SEED} (PORTABLE_INFER_FUZZ_SEED={SEED} replays it)")
    rng = random.Random(SEED)
    pkg = copy_package(full_package, tmp_path / "pkg")
    bases = _bases(pkg)
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(TRIALS):
        base = rng.choice(bases)
        data = (_mutate_bytes(json.dumps(base).encode(), rng) if rng.random() < 0.15
                else _mutate_tree(copy.deepcopy(base), rng))
        _write(pkg, data)
        check = rng.choice(["size", "none"])
        for step, run in (("load", lambda: _load(pkg, check)), ("inspect", lambda: describe(pkg))):
            try:
                run()
                outcomes["loaded"] += step == "load"
            except PortableInferError:
                outcomes["refused"] += step == "load"
            except Exception as exc:  # noqa: BLE001 - the point of the test
                shown = data[:300] if isinstance(data, bytes) else json.dumps(data)[:300]
                pytest.fail(f"seed {SEED}, trial {trial}, {step}: {type(exc).__name__}: {exc} for {shown!r}")
        if trial % 50 == 0:  # the CLI too: a typed message, never a traceback
            assert main(["inspect", str(pkg)]) in (0, 2)
            assert "Traceback" not in capsys.readouterr().err
    print(outcomes)
    assert outcomes["loaded"] > 20 and outcomes["refused"] > TRIALS // 2  # both paths were exercised
