"""The bundle unpack cache under damage and disk faults.

A modified copy of a bundle fails exactly as it would with an empty cache, even when a good copy
was unpacked before; a damaged unpacked copy is unpacked again from the bundle at every check
level; a full disk and a read-only home are typed errors that leave nothing behind; what a
killed unpack left is removed by the next one. Random damage is seeded (PORTABLE_INFER_FUZZ_SEED).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

import portable_infer
from portable_infer.package import bundle_cache
from portable_infer.package.bundle import ALIGN, pack, write_keypair
from portable_infer.cli import main
from portable_infer.errors import BundleError, PortableInferError

from _trust import full_package, make_bundle, manifest_dict, package_files, keys, load_cpu as _load  # noqa: F401

pytest.importorskip("cryptography")

SEED = int(os.environ.get("PORTABLE_INFER_FUZZ_SEED", "16002000"))
PROMPT = [5, 17, 99, 3, 42, 7]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def bundle(full_package, tmp_path_factory) -> Path:
    return pack(full_package, tmp_path_factory.mktemp("b") / "tiny.pinf")


def _outcome(fn):
    """The class of what ``fn`` raised (None when it returned); only typed errors are allowed."""
    try:
        fn()
        return None
    except PortableInferError as exc:
        return type(exc)


def _leftovers(home: Path) -> list:
    root = home / "bundles"
    return sorted(p.name for p in root.iterdir() if p.name != ".lock") if root.exists() else []


def _flip(src: Path, dst: Path, at: int) -> Path:
    raw = bytearray(src.read_bytes())
    raw[at] ^= 0x01
    dst.write_bytes(bytes(raw))
    return dst


def _data_offset(bundle: Path, member: str) -> int:
    with zipfile.ZipFile(bundle) as zf:
        return zf.getinfo(member).header_offset + ALIGN  # member data starts on the next page


# --- a modified bundle never rides on a good cache ------------------------------------------------
def test_corrupted_copy_fails_as_with_an_empty_cache(bundle, tmp_path, home):
    bad = _flip(bundle, tmp_path / "copy.pinf", _data_offset(bundle, "model.onnx.data") + 1000)
    cold = _outcome(lambda: _load(bad))
    assert cold is BundleError
    _load(bundle)  # a good copy unpacked: same manifest, same cache directory
    for check in ("sha256", "size", "none"):
        with pytest.raises(BundleError, match="sha256|corrupted"):
            _load(bad, check)


def test_bundle_modified_in_place_is_checked_again(bundle, tmp_path):
    mine = Path(shutil.copyfile(bundle, tmp_path / "mine.pinf"))
    _load(mine, "size")
    _flip(mine, mine, _data_offset(mine, "model.onnx.data") + 77)
    with pytest.raises(BundleError, match="sha256|corrupted"):
        _load(mine, "size")


def test_good_copy_and_signed_twin_reuse_the_unpacked_directory(full_package, bundle, tmp_path, keys):
    first = _load(bundle).path
    stamp = (first / bundle_cache.STAMP).stat().st_mtime_ns
    assert _load(bundle, "size").path == first and (first / bundle_cache.STAMP).stat().st_mtime_ns == stamp
    twin = pack(full_package, tmp_path / "signed.pinf", sign_key=keys / "key.pem")  # same manifest, other bytes
    files = {p: p.stat().st_ino for p in first.iterdir() if p.name != bundle_cache.STAMP}
    assert _load(twin, trust=keys / "key.pub.pem").path == first
    assert {p: p.stat().st_ino for p in first.iterdir() if p.name != bundle_cache.STAMP} == files  # not rewritten


@pytest.mark.parametrize("seed_offset", range(3))
def test_seeded_flips_and_truncations_behave_as_on_an_empty_cache(bundle, tmp_path, monkeypatch, seed_offset):
    """Each damaged bundle: loaded with an empty cache and with the good bundle already unpacked;
    the outcome (success or the error class) must be the same, and typed."""
    rng = random.Random(SEED + seed_offset)
    print(f"bundle damage seed {SEED + seed_offset}")
    size = bundle.stat().st_size
    warm = tmp_path / "warm"
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(warm))
    _load(bundle)
    for trial in range(20):
        bad = tmp_path / f"bad{trial}.pinf"
        if trial % 4 == 3:
            bad.write_bytes(bundle.read_bytes()[:rng.randrange(size)])
        else:
            _flip(bundle, bad, rng.randrange(size))
        for check in ("sha256", "size"):
            monkeypatch.setenv("PORTABLE_INFER_HOME", str(tmp_path / f"cold{trial}{check}"))
            cold = _outcome(lambda: _load(bad, check))
            monkeypatch.setenv("PORTABLE_INFER_HOME", str(warm))
            hot = _outcome(lambda: _load(bad, check))
            assert cold == hot, f"seed {SEED + seed_offset}, trial {trial}, {check}: {cold} cold, {hot} warm"
        bad.unlink()


# --- a damaged unpacked copy is unpacked again --------------------------------------------------------
@pytest.mark.parametrize("check", ["sha256", "size", "none"])
@pytest.mark.parametrize("how", ["flip", "flip, mtime restored", "deleted", "replaced"])
def test_damaged_unpacked_copy_is_unpacked_again(bundle, full_package, check, how):
    path = _load(bundle).path
    data = path / "model.onnx.data"
    good = data.read_bytes()
    st = data.stat()
    if how == "deleted":
        data.unlink()
    elif how == "replaced":
        data.unlink()
        data.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    else:
        data.chmod(0o644)
        with open(data, "r+b") as f:
            f.seek(len(good) // 2)
            f.write(bytes([good[len(good) // 2] ^ 0x10]))
        data.chmod(0o444)
        if how == "flip, mtime restored":
            os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    model = _load(bundle, check)
    assert model.path == path and data.read_bytes() == good
    reference = _load(full_package).generate_ids(PROMPT, max_new_tokens=8)
    assert model.generate_ids(PROMPT, max_new_tokens=8) == reference


def test_unpacked_files_are_read_only(bundle):
    path = _load(bundle).path
    for p in path.iterdir():
        if p.name != bundle_cache.STAMP:
            assert not os.stat(p).st_mode & 0o222, p


# --- disk faults ---------------------------------------------------------------------------------------------
def test_no_space_while_unpacking_is_typed_and_leaves_nothing(bundle, home, monkeypatch):
    real = bundle_cache.copy_member
    written = []

    def fill_the_disk(zf, info, entry, dst):
        if dst is not None and written:
            dst.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(entry.path)
        return real(zf, info, entry, dst)

    monkeypatch.setattr(bundle_cache, "copy_member", fill_the_disk)
    with pytest.raises(BundleError, match=r"needs \d+ MB free in .*bundles") as info:
        _load(bundle)
    assert "PORTABLE_INFER_HOME" in str(info.value)
    assert _leftovers(home) == []
    monkeypatch.setattr(bundle_cache, "copy_member", real)
    assert _load(bundle).path.parent == home / "bundles"


def test_too_little_free_space_is_refused_before_writing(bundle, home, monkeypatch):
    monkeypatch.setattr(bundle_cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 9, 1))
    with pytest.raises(BundleError, match=r"needs 1 MB free in .*bundles, and 0.0 MB are"):
        _load(bundle)
    assert _leftovers(home) == []


def test_read_only_home_is_typed(bundle, home, monkeypatch):
    real_mkdir = os.mkdir

    def read_only(path, *a, **kw):
        if str(path).startswith(str(home)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(BundleError, match="read-only") as info:
        _load(bundle)
    assert "PORTABLE_INFER_HOME" in str(info.value) and str(home / "bundles") in str(info.value)
    assert not home.exists()


def test_read_only_home_for_the_default_model_is_typed(home, monkeypatch):
    pytest.importorskip("exporters.export")
    real_mkdir = os.mkdir

    def read_only(path, *a, **kw):
        if str(path).startswith(str(home)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(PortableInferError, match="PORTABLE_INFER_HOME") as info:
        portable_infer.load(None, "cpu")
    assert str(home / "models") in str(info.value)


def test_read_only_cache_still_serves_what_it_holds(bundle, tmp_path, monkeypatch):
    path = _load(bundle).path

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(bundle_cache, "_write_json", read_only)
    copy = Path(shutil.copyfile(bundle, tmp_path / "copy.pinf"))  # a new sighting: the stamp cannot record it
    assert _load(copy, "size").path == path


# --- what a killed unpack left -------------------------------------------------------------------------------
def test_stale_partials_are_removed_by_the_next_unpack(bundle, home):
    root = home / "bundles"
    stale = [root / ".0123abcd.partial-dead0001", root / f".{'f' * 64}.partial-old-dead0002"]
    for d in stale:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "weights").write_bytes(b"x" * 1000)
        (d / "sub" / "weights").chmod(0o444)
    _load(bundle)
    assert not any(d.exists() for d in stale)
    assert len(_leftovers(home)) == 1


def test_unpack_killed_midway_is_cleaned_up(bundle, home, tmp_path):
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import time
        import portable_infer
        from portable_infer.package import bundle_cache
        real = bundle_cache.copy_member
        def slow(zf, info, entry, dst):
            real(zf, info, entry, dst)
            if dst is not None:
                open({str(ready)!r}, "w").close()
                time.sleep(600)
        bundle_cache.copy_member = slow
        portable_infer.load({str(bundle)!r}, "cpu")
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PORTABLE_INFER_HOME": str(home)})
    try:
        for _ in range(1200):  # wait (up to 2 min) until it is writing
            if ready.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), "the child never started unpacking"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    partials = [p for p in (home / "bundles").iterdir() if ".partial-" in p.name]
    assert partials, "the killed unpack should have left its partial directory"
    assert _load(bundle).path.parent == home / "bundles"
    assert not any(p.exists() for p in partials) and len(_leftovers(home)) == 1


# --- inspect reads bundles -------------------------------------------------------------------------------------
def test_inspect_accepts_bundles(full_package, bundle, tmp_path, keys, capsys, home):
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bundle       {bundle} (unsigned)") and "variant      fused" in out
    signed = pack(full_package, tmp_path / "signed.pinf", sign_key=keys / "key.pem")
    assert main(["inspect", str(signed), "--trust", str(keys / "key.pub.pem")]) == 0
    assert "signature checked" in capsys.readouterr().out
    write_keypair(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    assert main(["inspect", str(signed), "--trust", str(tmp_path / "other.pub.pem")]) == 2
    assert "does not match the trusted key" in capsys.readouterr().err
    assert not (home / "bundles").exists()  # inspect unpacks nothing


@pytest.mark.parametrize("damage", ["bad manifest", "truncated", "not a zip"])
def test_inspect_on_a_bad_bundle_prints_a_typed_error(full_package, bundle, tmp_path, capsys, damage):
    if damage == "bad manifest":
        d = manifest_dict(full_package)
        files = package_files(full_package, d)
        d["variants"][0]["file"] = ["model.onnx"]
        bad = make_bundle(tmp_path / "bad.pinf", d, files)
    elif damage == "truncated":
        bad = tmp_path / "bad.pinf"
        bad.write_bytes(bundle.read_bytes()[:5000])
    else:
        bad = tmp_path / "bad.pinf"
        bad.write_bytes(hashlib.sha256(b"x").digest() * 100)
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
