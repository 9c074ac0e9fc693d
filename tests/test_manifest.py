"""manifest.json: a golden test of what the exporter writes, and the schema's error paths.

The golden file pins the exporter <-> runtime contract for a fixed tiny llama (GQA, untied, with a
word-level tokenizer and a chat template). Volatile fields are dropped before comparing: sha256
values and file sizes, the source path and hash, exporter_version and verification. After an
intended change of the contract, regenerate it with ``UPDATE_GOLDEN=1 pytest tests/test_manifest.py``
and review the diff.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from portable_infer.package import manifest as mf
from portable_infer.errors import ChecksumError, PackageError, SchemaVersionError
from portable_infer.package.manifest import Manifest

GOLDEN = Path(__file__).parent / "golden" / "manifest_tiny_llama.json"
SEED = 20240601  # fixed: the golden must not depend on the run
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-5)
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINY["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE}))


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from exporters.export import export

    root = tmp_path_factory.mktemp("manifest")
    torch.manual_seed(SEED)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(root / "hf")
    write_tokenizer(root / "hf")
    return export(root / "hf", root / "pkg", precision="fp32", verify=False)


@pytest.fixture
def package_copy(package, tmp_path) -> Path:
    return Path(shutil.copytree(package, tmp_path / "pkg"))


def stable(d: dict) -> dict:
    """The manifest dict without the fields that change from run to run or release to release."""
    d = copy.deepcopy(d)
    for key in ("exporter_version", "verification"):
        d.pop(key, None)
    d["source"] = {k: v for k, v in d["source"].items() if k not in ("path", "sha256")}
    d["files"] = [{"path": f["path"]} for f in d["files"]]
    return d


# --- the golden file ------------------------------------------------------------------------------
def test_manifest_matches_golden(package):
    got = stable(json.loads((package / mf.MANIFEST_NAME).read_text()))
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got == want, (
        "manifest.json differs from tests/golden/manifest_tiny_llama.json; if the contract change is "
        "intended, regenerate it with UPDATE_GOLDEN=1 and review the diff")


def test_golden_states_the_contract():
    """Read the golden by eye once, then keep the points that matter asserted here."""
    g = json.loads(GOLDEN.read_text())
    m = g["model"]
    assert g["schema_version"] == mf.SCHEMA_VERSION and g["precision"] == "fp32"
    assert (m["architecture"], m["num_layers"], m["num_heads"], m["num_kv_heads"], m["head_dim"],
            m["hidden_size"], m["vocab_size"], m["max_context"]) == ("llama", 2, 4, 2, 16, 64, 128, 512)
    portable = next(v for v in g["variants"] if v["name"] == "portable")
    assert portable["file"] == "model.onnx" and portable["logits"] == "all"
    kv = portable["kv"]
    assert kv["layout"] == "BHSD" and kv["num_kv_heads"] == 2 and kv["head_dim"] == 16
    assert kv["past"] == [["past_key_values.0.key", "past_key_values.0.value"],
                          ["past_key_values.1.key", "past_key_values.1.value"]]
    assert kv["present"] == [["present.0.key", "present.0.value"], ["present.1.key", "present.1.value"]]
    inputs = {t["name"]: t for t in portable["inputs"]}
    outputs = {t["name"]: t for t in portable["outputs"]}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["past_key_values.0.key"]["shape"] == ["batch", 2, "past_sequence", 16]
    assert outputs["present.1.value"]["shape"] == ["batch", 2, "total_sequence", 16]
    assert outputs["logits"]["shape"] == ["batch", "sequence", 128] and outputs["logits"]["dtype"] == "float32"
    tok = g["tokenizer"]
    assert (tok["file"], tok["chat_template_file"], tok["bos_token_id"], tok["eos_token_ids"], tok["add_bos"]) == (
        "tokenizer.json", "chat_template.jinja", 1, [2], True)
    paths = {f["path"] for f in g["files"]}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "generation_config.json"} <= paths
    assert mf.MANIFEST_NAME not in paths


def test_files_list_every_file_of_the_package_with_hash_and_size(package):
    m = Manifest.load(package)
    on_disk = sorted(p.relative_to(package).as_posix() for p in package.rglob("*")
                     if p.is_file() and p.name != mf.MANIFEST_NAME)
    assert [f.path for f in m.files] == on_disk
    for f in m.files:
        assert f.size == (package / f.path).stat().st_size and len(f.sha256) == 64
    m.verify_files(package)  # a fresh package passes


# --- (de)serialisation ----------------------------------------------------------------------------
def test_round_trip(package):
    m = Manifest.load(package)
    assert Manifest.from_dict(m.to_dict()) == m
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    assert json.loads(m.to_json()) == json.loads((package / mf.MANIFEST_NAME).read_text())


def test_round_trip_keeps_every_field_type(package):
    """Tuples stay tuples (the dataclasses are hashable, comparable) after a JSON round trip."""
    m = Manifest.from_dict(json.loads(Manifest.load(package).to_json()))
    v = m.variants[0]
    assert isinstance(m.variants, tuple) and isinstance(v.inputs[0].shape, tuple)
    assert isinstance(v.kv.past[0], tuple) and isinstance(m.model.layer_types, tuple)
    assert isinstance(m.tokenizer.eos_token_ids, tuple) and isinstance(m.files[0], mf.FileEntry)


@pytest.mark.parametrize("version", [mf.SCHEMA_VERSION + 1, 0, None, str(mf.SCHEMA_VERSION)])
def test_unknown_schema_version(package, version):
    d = Manifest.load(package).to_dict()
    d["schema_version"] = version
    with pytest.raises(SchemaVersionError, match="schema_version") as info:
        Manifest.from_dict(d)
    assert str(mf.SCHEMA_VERSION) in str(info.value) and "re-export" in str(info.value)


def test_unknown_schema_version_on_disk(package_copy):
    path = package_copy / mf.MANIFEST_NAME
    d = json.loads(path.read_text())
    path.write_text(json.dumps({**d, "schema_version": 99}))
    with pytest.raises(SchemaVersionError):
        Manifest.load(package_copy)


MALFORMED = {
    "no model": lambda d: d.pop("model"),
    "no variants": lambda d: d.pop("variants"),
    "variants not a list": lambda d: d.update(variants=5),
    "variant lacks kv": lambda d: d["variants"][0].pop("kv"),
    "unknown model field": lambda d: d["model"].update(flux_capacitor=1),
    "model is a list": lambda d: d.update(model=[1, 2]),
    "tokenizer eos is null": lambda d: d["tokenizer"].update(eos_token_ids=None),
    "file entry lacks size": lambda d: d["files"][0].pop("size"),
    "source is a string": lambda d: d.update(source="hf"),
    "verification is a string": lambda d: d.update(verification="passed"),
}


@pytest.mark.parametrize("breakage", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_manifest(package, breakage):
    d = Manifest.load(package).to_dict()
    MALFORMED[breakage](d)
    with pytest.raises(PackageError, match="malformed"):
        Manifest.from_dict(d)


def _paths(node, prefix=()):
    """Every (container path, key) in a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix, k
        yield from _paths(v, prefix + (k,))


def test_fuzzed_manifests_fail_only_with_package_errors(package):
    """Random deletions and type swaps anywhere in the tree: a Manifest or a PackageError, never
    a raw KeyError / TypeError / ValueError / AttributeError."""
    import random

    seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    base = Manifest.load(package).to_dict()
    junk = [None, 0, -1, 2.5, "", "x", [], [1, "a"], {}, {"a": 1}, True]
    for trial in range(300):
        d = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            paths = list(_paths(d))
            if not paths:
                break
            prefix, key = rng.choice(paths)
            parent = d
            for k in prefix:
                parent = parent[k]
            if isinstance(parent, dict) and rng.random() < 0.4:
                del parent[key]
            else:
                parent[key] = copy.deepcopy(rng.choice(junk))
        try:
            Manifest.from_dict(d)
        except PackageError:
            pass
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"seed {seed}, trial {trial}: {type(exc).__name__}: {exc} for {json.dumps(d)[:400]}")


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "JSON object"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
])
def test_unreadable_manifest_file(package_copy, content, match):
    path = package_copy / mf.MANIFEST_NAME
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PackageError, match=match):
        Manifest.load(package_copy)


def test_not_a_package(tmp_path):
    with pytest.raises(PackageError, match="not a model package"):
        Manifest.load(tmp_path)


def test_unknown_variant_name(package):
    with pytest.raises(PackageError, match="no graph variant 'tensorrt'"):
        Manifest.load(package).variant("tensorrt")


# --- verify_files ---------------------------------------------------------------------------------
def test_flipped_byte_is_a_checksum_error(package_copy):
    m = Manifest.load(package_copy)
    data = package_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    m.verify_files(package_copy, hash_files=False)  # same size: only the hash can tell
    with pytest.raises(ChecksumError, match="sha256") as info:
        m.verify_files(package_copy)
    assert "model.onnx.data" in str(info.value)


def test_truncated_file_is_a_checksum_error(package_copy):
    m = Manifest.load(package_copy)
    path = package_copy / "model.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    for hash_files in (True, False):
        with pytest.raises(ChecksumError, match="truncated") as info:
            m.verify_files(package_copy, hash_files=hash_files)
        assert "model.onnx" in str(info.value)


def test_missing_file_is_a_package_error(package_copy):
    m = Manifest.load(package_copy)
    (package_copy / "tokenizer.json").unlink()
    with pytest.raises(PackageError, match="missing") as info:
        m.verify_files(package_copy)
    assert not isinstance(info.value, ChecksumError) and "tokenizer.json" in str(info.value)
