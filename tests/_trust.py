"""Helpers of the package trust-boundary tests: a tiny package that names every kind of file
(graphs with external data, tokenizer, tokenizer config, chat template), manifest rewriting, and
hand-made (optionally signed) bundles."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from portable_infer.package import manifest as mf
import portable_infer
from portable_infer.package.bundle import SIGNATURE_NAME, write_keypair

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def full_package(tiny_text_package, tmp_path_factory) -> Path:
    """tiny_text_package plus a chat template and a tokenizer config: every path field in use."""
    out = tmp_path_factory.mktemp("full") / "pkg"
    shutil.copytree(tiny_text_package, out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}), encoding="utf-8")
    d = manifest_dict(out)
    d["tokenizer"].update(chat_template_file="chat_template.jinja", config_file="tokenizer_config.json")
    write_manifest(out, d, refresh=True)
    return out


def manifest_dict(pkg: Path) -> dict:
    return json.loads((pkg / mf.MANIFEST_NAME).read_text(encoding="utf-8"))


def write_manifest(pkg: Path, d: dict, refresh: bool = False) -> None:
    """Write ``d`` as the package's manifest; ``refresh``: files[] recomputed from the directory."""
    if refresh:
        d["files"] = [{"path": e.path, "sha256": e.sha256, "size": e.size} for e in mf.file_entries(pkg)]
    (pkg / mf.MANIFEST_NAME).write_text(json.dumps(d, indent=2), encoding="utf-8")


def copy_package(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, symlinks=True))


def members(bundle: Path) -> dict:
    with zipfile.ZipFile(bundle) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def make_bundle(dst: Path, manifest: dict | bytes, files: dict, sign_key: Path | None = None) -> Path:
    """A STORED zip: manifest first, then the signature (over the manifest bytes) when
    ``sign_key`` is given, then ``files`` ({name: bytes}) — what a hostile publisher can build."""
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest, indent=2).encode()
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(mf.MANIFEST_NAME, data)
        if sign_key is not None:
            from portable_infer.package.signing import load_private_key

            zf.writestr(SIGNATURE_NAME, load_private_key(sign_key).sign(data))
        for name, blob in files.items():
            zf.writestr(name, blob)
    return dst


def package_files(pkg: Path, d: dict) -> dict:
    """{path: bytes} of every files[] entry of ``d`` that exists inside ``pkg``."""
    out = {}
    for f in d["files"]:
        p = pkg / f["path"]
        if p.is_file() and not p.is_symlink():
            out[f["path"]] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """An Ed25519 key pair (key.pem, key.pub.pem) for signed bundles."""
    d = tmp_path_factory.mktemp("keys")
    write_keypair(d / "key.pem", d / "key.pub.pem")
    return d


def load_cpu(path, check="sha256", **kw):
    """load() on the CPU, one thread, at the given check level."""
    return portable_infer.load(path, "cpu", intra_op_threads=1, check=check, **kw)
