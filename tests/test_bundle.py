"""``.pinf`` bundles: pack/load round trip, signatures, and every way a bundle can be bad.

Each bad bundle must fail with a typed error *before* anything is unpacked into the cache.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import portable_infer
from portable_infer.package.bundle import ALIGN, SIGNATURE_NAME, pack, write_keypair
from portable_infer.cli import main
from portable_infer.errors import BundleError, SignatureError

pytest.importorskip("cryptography")

PROMPT = [5, 17, 99, 3, 42, 7]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A fresh PORTABLE_INFER_HOME per test: the unpack cache starts empty."""
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    write_keypair(d / "key.pem", d / "key.pub.pem")
    write_keypair(d / "other.pem", d / "other.pub.pem")
    return d


@pytest.fixture(scope="module")
def signed(tiny_llama, keys, tmp_path_factory) -> Path:
    return pack(tiny_llama.package, tmp_path_factory.mktemp("b") / "tiny.pinf", sign_key=keys / "key.pem")


@pytest.fixture(scope="module")
def unsigned(tiny_llama, tmp_path_factory) -> Path:
    return pack(tiny_llama.package, tmp_path_factory.mktemp("b") / "tiny.pinf")


@pytest.fixture(scope="module")
def reference(tiny_llama) -> list:
    return portable_infer.load(tiny_llama.package, "cpu", intra_op_threads=1).generate_ids(PROMPT, max_new_tokens=12)


def _load(path, **kw):
    return portable_infer.load(path, "cpu", intra_op_threads=1, **kw)


def _nothing_unpacked(home: Path) -> bool:
    bundles = home / "bundles"
    return not bundles.exists() or not any(p.name != ".lock" for p in bundles.iterdir())  # .lock: the unpack lock


def _zip(dst: Path, members: dict) -> Path:
    """A hand-made zip of ``members`` ({name: bytes}), STORED."""
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def _members(bundle: Path) -> dict:
    with zipfile.ZipFile(bundle) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


# --- round trip -------------------------------------------------------------------------------------
def test_round_trip_greedy_equal_and_layout(signed, keys, reference, home, tiny_llama):
    model = _load(signed, trust=keys / "key.pub.pem")
    assert model.generate_ids(PROMPT, max_new_tokens=12) == reference
    manifest_bytes = (tiny_llama.package / "manifest.json").read_bytes()
    assert model.path == home / "bundles" / hashlib.sha256(manifest_bytes).hexdigest()
    raw = signed.read_bytes()
    with zipfile.ZipFile(signed) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos[:2]] == ["manifest.json", SIGNATURE_NAME]
    assert sorted(i.filename for i in infos[2:]) == sorted(e.path for e in model.manifest.files)
    for i in infos:  # stored, and each member's data starts on a page: mmap-able in place
        assert i.compress_type == zipfile.ZIP_STORED
        name_len, extra_len = struct.unpack("<HH", raw[i.header_offset + 26:i.header_offset + 30])
        assert (i.header_offset + 30 + name_len + extra_len) % ALIGN == 0


def test_pack_is_reproducible(tiny_llama, unsigned, tmp_path):
    assert pack(tiny_llama.package, tmp_path / "again.pinf").read_bytes() == unsigned.read_bytes()


def test_second_load_reuses_the_unpacked_directory(unsigned, home):
    first = _load(unsigned).path
    stamps = {p: p.stat().st_mtime_ns for p in [first, *first.iterdir()]}
    second = _load(unsigned).path
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in [first, *first.iterdir()]} == stamps
    assert sorted(p.name for p in (home / "bundles").iterdir()) == [".lock", first.name]  # no partials left


def test_unpacked_directory_is_checked_and_unpacked_again_when_damaged(unsigned):
    path = _load(unsigned).path
    data = path / "model.onnx.data"
    good = data.read_bytes()
    blob = bytearray(good)
    blob[100] ^= 0xFF
    data.chmod(0o644)  # unpacked files are read-only
    data.write_bytes(bytes(blob))
    assert _load(unsigned).path == path  # the damaged copy is found and replaced from the bundle
    assert data.read_bytes() == good


def test_cli_pack_then_load_with_trust(tiny_llama, keys, tmp_path, reference, capsys):
    out = tmp_path / "cli.pinf"
    assert main(["pack", str(tiny_llama.package), "-o", str(out), "--sign", str(keys / "key.pem")]) == 0
    assert str(out) in capsys.readouterr().out
    assert main(["pack", str(tiny_llama.package), "-o", str(out)]) == 2  # exists, no --force
    assert _load(out, trust=keys / "key.pub.pem").generate_ids(PROMPT, max_new_tokens=12) == reference


# --- signatures -------------------------------------------------------------------------------------
def test_wrong_key_is_a_signature_error(signed, keys, home):
    with pytest.raises(SignatureError, match="does not match the trusted key"):
        _load(signed, trust=keys / "other.pub.pem")
    assert _nothing_unpacked(home)


def test_tampered_signature_is_a_signature_error(signed, keys, tmp_path, home):
    members = _members(signed)
    members[SIGNATURE_NAME] = bytes(b ^ 1 if i == 0 else b for i, b in enumerate(members[SIGNATURE_NAME]))
    bad = _zip(tmp_path / "bad.pinf", members)
    with pytest.raises(SignatureError):
        _load(bad, trust=keys / "key.pub.pem")
    assert _nothing_unpacked(home)


def test_modified_manifest_breaks_the_signature(signed, keys, tmp_path):
    members = _members(signed)
    members["manifest.json"] = members["manifest.json"].replace(b'"exporter_version":', b'"exporter_version" :')
    bad = _zip(tmp_path / "bad.pinf", members)
    with pytest.raises(SignatureError):
        _load(bad, trust=keys / "key.pub.pem")


def test_unsigned_bundle_with_trust_is_an_error(unsigned, keys, home, tiny_llama):
    with pytest.raises(SignatureError, match="not signed"):
        _load(unsigned, trust=keys / "key.pub.pem")
    with pytest.raises(SignatureError, match="package directory"):
        _load(tiny_llama.package, trust=keys / "key.pub.pem")
    assert _nothing_unpacked(home)


def test_signed_bundle_without_trust_warns(signed, caplog, reference):
    with caplog.at_level(logging.WARNING, logger="portable_infer.package.bundle"):
        model = _load(signed)
    assert "signature was not checked" in caplog.text
    assert model.generate_ids(PROMPT, max_new_tokens=12) == reference


# --- corruption ---------------------------------------------------------------------------------------
def test_flipped_byte_in_weights_is_an_error(unsigned, tmp_path, home):
    with zipfile.ZipFile(unsigned) as zf:
        info = zf.getinfo("model.onnx.data")
    raw = bytearray(unsigned.read_bytes())
    raw[info.header_offset + ALIGN + 1000] ^= 0x01  # inside the member's data (aligned past its header)
    bad = tmp_path / "flipped.pinf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="corrupted"):
        _load(bad)
    assert _nothing_unpacked(home)


def test_member_replaced_with_valid_crc_fails_its_sha256(unsigned, tmp_path, home):
    members = _members(unsigned)
    blob = bytearray(members["model.onnx.data"])
    blob[1000] ^= 0x01
    members["model.onnx.data"] = bytes(blob)  # the zip's own CRC is recomputed: only the sha256 catches it
    with pytest.raises(BundleError, match="sha256"):
        _load(_zip(tmp_path / "swapped.pinf", members))
    assert _nothing_unpacked(home)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_bundle_is_an_error(unsigned, tmp_path, home, keep):
    raw = unsigned.read_bytes()
    bad = tmp_path / "truncated.pinf"
    bad.write_bytes(raw[:int(len(raw) * keep)])
    with pytest.raises(BundleError, match="truncated|corrupted"):
        _load(bad)
    assert _nothing_unpacked(home)


def test_extra_and_missing_members_are_errors(unsigned, tmp_path, home):
    members = _members(unsigned)
    with pytest.raises(BundleError, match="not in the manifest"):
        _load(_zip(tmp_path / "extra.pinf", {**members, "extra.bin": b"x"}))
    del members["model.onnx.data"]
    with pytest.raises(BundleError, match="missing"):
        _load(_zip(tmp_path / "missing.pinf", members))
    assert _nothing_unpacked(home)


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt", "..\\evil.txt",
                                  "C:evil.txt", "a//evil.txt", "./evil.txt"])
def test_path_traversal_member_is_rejected_before_unpacking(unsigned, tmp_path, home, name):
    members = _members(unsigned)
    bad = _zip(tmp_path / "evil.pinf", {**members, name: b"pwned"})
    with pytest.raises(BundleError, match="unsafe"):
        _load(bad)
    assert _nothing_unpacked(home)
    assert not list(tmp_path.rglob("evil.txt"))


@pytest.mark.parametrize("mode", [stat.S_IFLNK | 0o777, stat.S_IFDIR | 0o755])
def test_link_and_directory_entries_are_rejected(unsigned, tmp_path, home, mode):
    members = _members(unsigned)
    info = zipfile.ZipInfo("model.onnx.data")
    info.external_attr = mode << 16
    with zipfile.ZipFile(tmp_path / "link.pinf", "w") as zf:
        for name, data in members.items():
            zf.writestr(info if name == "model.onnx.data" else name, b"/etc/passwd" if name == info.filename else data)
    with pytest.raises(BundleError, match="directory, link"):
        _load(tmp_path / "link.pinf")
    assert _nothing_unpacked(home)


def test_compressed_member_is_rejected(unsigned, tmp_path):
    with zipfile.ZipFile(tmp_path / "deflated.pinf", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in _members(unsigned).items():
            zf.writestr(name, data)
    with pytest.raises(BundleError, match="compressed"):
        _load(tmp_path / "deflated.pinf")


def test_not_a_zip_is_an_error(tmp_path):
    junk = tmp_path / "junk.pinf"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(BundleError):
        _load(junk)


def test_interrupted_unpack_leaves_nothing_usable(unsigned, home, monkeypatch):
    import portable_infer.package.bundle_cache as bundle_cache

    def boom(tmp, dest):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_cache, "_publish", boom)
    with pytest.raises(KeyboardInterrupt):
        _load(unsigned)
    assert _nothing_unpacked(home)
    monkeypatch.undo()
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(home))
    assert _load(unsigned).path.parent == home / "bundles"


def test_copy_of_a_bundle_reuses_the_same_directory(unsigned, tmp_path):
    copy = tmp_path / "copy.pinf"
    shutil.copyfile(unsigned, copy)
    assert _load(copy).path == _load(unsigned).path
