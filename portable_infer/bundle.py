"""``.pinf`` bundles: a whole model package in one file, optionally signed.

A bundle is a zip file whose members are STORED (not compressed) and start on 4096-byte
boundaries, so a reader can memory-map or stream any member straight out of it::

    MODEL.pinf (zip, stored)
    ├── manifest.json          first: the package manifest; its files[] pins every member's sha256
    ├── signature.ed25519      optional: 64-byte Ed25519 signature over the manifest.json bytes
    ├── generation_config.json
    ├── model.onnx             ┐ every file of manifest.files[], nothing else,
    ├── model.onnx.data        │ each member's data 4096-byte aligned
    └── ...                    ┘

The manifest pins every member by sha256, so signing the manifest bytes signs the bundle.

:func:`open_bundle` checks a bundle before anything is written (safe member names, no links or
directories, nothing compressed or encrypted, members == manifest files, sizes, the signature
when a trusted key is given), then unpacks it into ``$PORTABLE_INFER_HOME/bundles/<sha256 of
manifest.json>/`` through a temporary directory and one atomic rename, hashing every member on
the way. A later open finds that directory (its manifest bytes equal the bundle's) and reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import struct
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError, ChecksumError, InvalidArgumentError, PackageError, SignatureError, require
from .home import home
from .manifest import MANIFEST_NAME, FileEntry, Manifest

logger = logging.getLogger(__name__)

SIGNATURE_NAME = "signature.ed25519"
BUNDLE_SUFFIX = ".pinf"
ALIGN = 4096  # member data starts on a page boundary: mmap-able in place
MAX_MANIFEST_BYTES = 16 << 20
_CHUNK = 4 << 20
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same package packs to the same bytes
_ALIGN_EXTRA_ID = 0xD935  # the extra-field id zipalign uses for padding


# --- member names ---------------------------------------------------------------------------------
def check_member_name(name: str) -> None:
    """Raise :class:`BundleError` unless ``name`` is a plain relative path inside the bundle.

    Rejected: empty names, absolute paths, drive letters and ``:``, backslashes, ``.``/``..``
    or empty components (so no ``a//b`` and no directory entries), control characters.
    """
    bad = None
    if not name or len(name) > 1024:
        bad = "empty or over-long"
    elif name.startswith("/") or ":" in name:
        bad = "absolute"
    elif "\\" in name:
        bad = "contains a backslash"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        bad = "contains a control character"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        bad = "has an empty, '.' or '..' component"
    if bad:
        raise BundleError(f"bundle member name {name!r} is unsafe ({bad}); refusing to unpack the bundle: "
                          f"it was not written by `portable-infer pack`, or was tampered with")


def _check_entry(info: zipfile.ZipInfo) -> None:
    check_member_name(info.filename)
    mode = info.external_attr >> 16
    if info.is_dir() or (stat.S_IFMT(mode) and not stat.S_ISREG(mode)):
        raise BundleError(f"bundle member {info.filename!r} is a directory, link or device entry "
                          f"(mode {oct(mode)}); bundles hold regular files only")
    if info.flag_bits & 0x1:
        raise BundleError(f"bundle member {info.filename!r} is encrypted; bundles are not encrypted")
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise BundleError(f"bundle member {info.filename!r} is compressed; `portable-infer pack` stores "
                          f"members uncompressed (so weights can be memory-mapped): re-pack it")


# --- signing ----------------------------------------------------------------------------------------
def _crypto():
    require("cryptography", extra="sign")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519, InvalidSignature


def _key_bytes(key) -> bytes:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    try:
        return Path(key).read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read key file {key}: {exc}") from exc


def load_private_key(key, password: bytes | None = None):
    """An Ed25519 private key from a PEM file path (or PEM bytes)."""
    serialization, ed25519, _ = _crypto()
    try:
        k = serialization.load_pem_private_key(_key_bytes(key), password=password)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"signing key {key!r} is not a readable PEM private key ({exc}); create one "
                                   f"with: openssl genpkey -algorithm ed25519 -out key.pem") from exc
    if not isinstance(k, ed25519.Ed25519PrivateKey):
        raise InvalidArgumentError(f"signing key {key!r} is a {type(k).__name__}, bundles are signed with "
                                   f"Ed25519: openssl genpkey -algorithm ed25519 -out key.pem")
    return k


def load_public_key(key):
    """An Ed25519 public key from a PEM (or OpenSSH ``ssh-ed25519``) file path or bytes."""
    serialization, ed25519, _ = _crypto()
    data = _key_bytes(key)
    try:
        k = (serialization.load_ssh_public_key(data) if data.lstrip().startswith(b"ssh-")
             else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"trusted key {key!r} is not a readable public key ({exc}); derive it with: "
                                   f"openssl pkey -in key.pem -pubout -out key.pub.pem") from exc
    if not isinstance(k, ed25519.Ed25519PublicKey):
        raise InvalidArgumentError(f"trusted key {key!r} is a {type(k).__name__}; bundles use Ed25519 keys")
    return k


def write_keypair(private_path, public_path) -> None:
    """Create an Ed25519 key pair as PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key)."""
    serialization, ed25519, _ = _crypto()
    k = ed25519.Ed25519PrivateKey.generate()
    Path(private_path).write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    os.chmod(private_path, 0o600)
    Path(public_path).write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))


def verify_signature(manifest_bytes: bytes, signature: bytes, trust, where: str = "bundle") -> None:
    """Raise :class:`SignatureError` unless ``signature`` signs ``manifest_bytes`` under ``trust``."""
    _, _, invalid = _crypto()
    key = load_public_key(trust)
    try:
        key.verify(signature, manifest_bytes)
    except invalid:
        raise SignatureError(f"{where}: the Ed25519 signature does not match the trusted key {trust}: the "
                             f"bundle was modified after signing, or signed with another key") from None


# --- pack -------------------------------------------------------------------------------------------
def pack(package, out, *, sign_key=None, sign_password: bytes | None = None, ort=False,
         overwrite: bool = False) -> Path:
    """Write a model package directory as one ``.pinf`` bundle (atomically).

    Args:
        package: a model package directory (its files are checked against the manifest on the way).
        out: the bundle file to write.
        sign_key: an Ed25519 private key (PEM path or bytes); adds ``signature.ed25519``.
        sign_password: the PEM's password, when it is encrypted.
        ort: also store ONNX Runtime (ORT) format graphs and ``required_operators.config``:
            True for the graph the CPU provider would run, or a list of variant names.
        overwrite: replace an existing ``out``.

    Returns:
        The bundle path.

    Example:
        >>> pack("smollm2-int4", "smollm2.pinf", sign_key="key.pem")  # doctest: +SKIP
    """
    pkg, out = Path(package), Path(out)
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{out} already exists; choose another output or pass overwrite=True (--force)")
    manifest = Manifest.load(pkg)
    manifest_bytes = (pkg / MANIFEST_NAME).read_bytes()
    for entry in manifest.files:
        check_member_name(entry.path)
    key = load_private_key(sign_key, sign_password) if sign_key is not None else None
    work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        sources = {e.path: pkg / e.path for e in manifest.files}
        if ort:
            from .ort_format import add_ort_variants

            manifest, extra = add_ort_variants(manifest, pkg, work / "ort", ort)
            manifest_bytes = manifest.to_json().encode("utf-8")
            sources.update(extra)
        signature = key.sign(manifest_bytes) if key is not None else None
        tmp = work / "bundle.pinf"
        _write_zip(tmp, manifest_bytes, signature, manifest.files, sources)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("packed %s into %s (%s)", pkg, out, "signed" if key is not None else "unsigned")
    return out


def _aligned_info(name: str, size: int, offset: int) -> tuple:
    """A ZipInfo whose data will start on an ALIGN boundary when its header is written at ``offset``."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.file_size = size
    info.CRC = info.compress_size = 0  # zipfile fills them in after writing; the header length is the same
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for the local header
    base = offset + len(info.FileHeader(zip64)) + 6  # + the padding field's own header
    pad = (-base) % ALIGN
    info.extra = struct.pack("<HHH", _ALIGN_EXTRA_ID, 2 + pad, ALIGN) + bytes(pad)
    return info, zip64


def _write_zip(path: Path, manifest_bytes: bytes, signature, files, sources: dict) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        def put(name: str, size: int, chunks, entry: FileEntry | None = None) -> None:
            info, zip64 = _aligned_info(name, size, zf.start_dir)
            h, n = hashlib.sha256(), 0
            with zf.open(info, "w", force_zip64=zip64) as w:
                for block in chunks:
                    h.update(block)
                    n += len(block)
                    w.write(block)
            info.extra = b""  # the padding is needed in the local header only
            if entry is not None and (n != entry.size or h.hexdigest() != entry.sha256):
                raise ChecksumError(f"{sources[name]} does not match its size/sha256 in manifest.json; the "
                                    f"package is corrupted: re-export it before packing")

        put(MANIFEST_NAME, len(manifest_bytes), [manifest_bytes])
        if signature is not None:
            put(SIGNATURE_NAME, len(signature), [signature])
        for entry in files:
            src = sources[entry.path]
            if not src.is_file():
                raise PackageError(f"{src} is listed in manifest.json but missing; re-export the package")
            with open(src, "rb") as f:
                put(entry.path, entry.size, iter(lambda: f.read(_CHUNK), b""), entry)


# --- open -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundleInfo:
    """What :func:`read_bundle` found: the manifest (bytes and parsed) and whether it was signed."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signed: bool

    @property
    def key(self) -> str:
        """The sha256 of the manifest bytes: names the unpacked directory."""
        return hashlib.sha256(self.manifest_bytes).hexdigest()


def read_bundle(zf: zipfile.ZipFile, path: Path, trust=None) -> BundleInfo:
    """Check an open bundle without writing anything; see the module docstring for what is checked."""
    infos = zf.infolist()
    for info in infos:
        _check_entry(info)
    names = [i.filename for i in infos]
    folded = [n.casefold() for n in names]
    if len(set(folded)) != len(folded):
        raise BundleError(f"{path} has duplicate member names (case-insensitively); refusing to unpack it")
    by_name = {i.filename: i for i in infos}
    if MANIFEST_NAME not in by_name:
        raise BundleError(f"{path} has no {MANIFEST_NAME}: it is not a model bundle (create one with "
                          f"`portable-infer pack PKG -o MODEL.pinf`)")
    if by_name[MANIFEST_NAME].file_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {MANIFEST_NAME} is {by_name[MANIFEST_NAME].file_size} bytes, over the "
                          f"{MAX_MANIFEST_BYTES} limit; the bundle is corrupted")
    manifest_bytes = _read_member(zf, MANIFEST_NAME, path)
    signed = SIGNATURE_NAME in by_name
    if trust is not None:
        if not signed:
            raise SignatureError(f"{path} is not signed, but a trusted key was given ({trust}); sign it with "
                                 f"`portable-infer pack PKG -o {path.name} --sign KEY.pem`, or load without trust")
        verify_signature(manifest_bytes, _read_member(zf, SIGNATURE_NAME, path), trust, where=str(path))
    elif signed:
        logger.warning("%s is signed but no trusted key was given, so its signature was not checked; "
                       "pass trust=PUBKEY.pem (--trust) to check it", path)
    manifest = _parse_manifest(manifest_bytes, path)
    expected = {e.path: e for e in manifest.files}
    for entry_path in expected:
        check_member_name(entry_path)
    allowed = set(expected) | {MANIFEST_NAME, SIGNATURE_NAME}
    extra = sorted(set(names) - allowed)
    missing = sorted(set(expected) - set(names))
    if extra or missing:
        raise BundleError(f"{path} does not match its manifest: " + "; ".join(
            s for s in (f"members not in the manifest: {extra[:5]}" if extra else "",
                        f"files missing: {missing[:5]}" if missing else "") if s)
            + "; the bundle is incomplete or was tampered with: re-pack it")
    for name, entry in expected.items():
        if by_name[name].file_size != entry.size:
            raise BundleError(f"{path}: member {name} is {by_name[name].file_size} bytes, the manifest says "
                              f"{entry.size}; the bundle is corrupted: re-pack or re-copy it")
    return BundleInfo(path, manifest, manifest_bytes, signed)


def open_bundle(path, trust=None, cache_root: Path | None = None) -> Path:
    """Check a ``.pinf`` bundle and unpack it (once) into the cache; returns the package directory.

    Args:
        path: the bundle file.
        trust: an Ed25519 public key (PEM path or bytes). Given: the bundle must be signed by it
            (:class:`SignatureError` otherwise). Not given: a signed bundle loads with a warning.
        cache_root: where unpacked bundles live (default ``$PORTABLE_INFER_HOME/bundles``).

    Returns:
        ``cache_root/<sha256 of manifest.json>``: a complete, checked package directory.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir() and trust is not None:
            raise SignatureError(f"a trusted key was given, but {path} is a package directory, which carries no "
                                 f"signature; load a signed bundle (portable-infer pack {path} -o MODEL.pinf "
                                 f"--sign KEY.pem) or load without trust")
        raise BundleError(f"{path} is not a bundle file (create one with `portable-infer pack PKG -o MODEL.pinf`)")
    root = Path(cache_root) if cache_root is not None else home() / "bundles"
    try:
        with zipfile.ZipFile(path) as zf:
            info = read_bundle(zf, path, trust)
            dest = root / info.key
            if _matches(dest, info.manifest_bytes):
                logger.info("bundle %s: reusing %s", path, dest)
                return dest
            return _unpack(zf, info, dest)
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{path} is not a readable .pinf bundle ({exc}): it is truncated or corrupted, or not a "
                          f"bundle at all (a model is a package directory or a .pinf file); re-copy it or re-pack "
                          f"it with `portable-infer pack`") from exc
    except (EOFError, struct.error) as exc:  # zipfile's errors on some truncations
        raise BundleError(f"{path} is truncated ({type(exc).__name__}: {exc}); re-copy or re-pack it") from exc


def _matches(dest: Path, manifest_bytes: bytes) -> bool:
    try:
        return (dest / MANIFEST_NAME).read_bytes() == manifest_bytes
    except OSError:
        return False


def _unpack(zf: zipfile.ZipFile, info: BundleInfo, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for entry in info.manifest.files:
            target = tmp / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with zf.open(entry.path) as src, open(target, "xb") as dst:
                while block := src.read(_CHUNK):
                    h.update(block)
                    dst.write(block)
            if h.hexdigest() != entry.sha256:
                raise BundleError(f"{info.path}: member {entry.path} does not match its sha256 in the manifest; "
                                  f"the bundle is corrupted: re-copy or re-pack it")
        (tmp / MANIFEST_NAME).write_bytes(info.manifest_bytes)  # last: marks the directory complete
        _publish(tmp, dest, info.manifest_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("bundle %s unpacked into %s", info.path, dest)
    return dest


def _publish(tmp: Path, dest: Path, manifest_bytes: bytes) -> None:
    """Rename ``tmp`` to ``dest`` atomically; a concurrent unpack of the same bundle may win."""
    try:
        os.rename(tmp, dest)
        return
    except OSError:
        if _matches(dest, manifest_bytes):  # another process unpacked the same bundle first
            return
    # dest exists but does not hold this manifest (damaged by hand): move it aside, then replace
    stale = dest.parent / f".{dest.name}.stale-{uuid.uuid4().hex[:8]}"
    os.rename(dest, stale)
    os.rename(tmp, dest)
    shutil.rmtree(stale, ignore_errors=True)


def _read_member(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return zf.read(name)
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{path}: member {name} is corrupted ({exc}); re-copy or re-pack the bundle") from exc


def _parse_manifest(data: bytes, path: Path) -> Manifest:
    import json

    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: {MANIFEST_NAME} is not valid JSON ({exc}); the bundle is corrupted") from exc
    if not isinstance(obj, dict):
        raise BundleError(f"{path}: {MANIFEST_NAME} does not hold a JSON object; the bundle is corrupted")
    return Manifest.from_dict(obj)
