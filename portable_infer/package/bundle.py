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

The manifest pins every member by sha256 and names no file outside the bundle (every path it
holds is a relative, listed member; ``package_paths``), so signing the manifest bytes signs every
byte the runtime loads.

:func:`open_bundle` checks a bundle before anything is written (safe member names, no links or
directories, nothing compressed or encrypted, the manifest's schema and paths, members == manifest
files, sizes, the signature when a trusted key is given), then hands it to
:mod:`portable_infer.package.bundle_cache`, which unpacks it once into
``$PORTABLE_INFER_HOME/bundles/<sha256 of manifest.json>/`` (hashing every member on the way)
and, on later opens, reuses that copy only after checking that this bundle file is one that was
verified and that the copy is intact.
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

from portable_infer.errors import BundleError, ChecksumError, InvalidArgumentError, PackageError, SignatureError
from portable_infer.package.home import home
from portable_infer.package.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest
from portable_infer.package.package_paths import check_package, open_regular, path_problem, resolve_inside
from portable_infer.package.signing import load_private_key, load_public_key, verify_signature, write_keypair  # noqa: F401 (API)

logger = logging.getLogger(__name__)

SIGNATURE_NAME = "signature.ed25519"
BUNDLE_SUFFIX = ".pinf"
ALIGN = 4096  # member data starts on a page boundary: mmap-able in place
_CHUNK = 4 << 20
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same package packs to the same bytes
_ALIGN_EXTRA_ID = 0xD935  # the extra-field id zipalign uses for padding


# --- member names ---------------------------------------------------------------------------------
def check_member_name(name: str) -> None:
    """Raise :class:`BundleError` unless ``name`` is a plain relative path inside the bundle.

    The rules of every path a package names (``package_paths.path_problem``): no empty name,
    absolute path, drive letter or ``:``, backslash, control character, or ``.``/``..``/empty
    component (so no ``a//b`` and no directory entries).
    """
    bad = path_problem(name)
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
    with open_regular(resolve_inside(pkg, MANIFEST_NAME, MANIFEST_NAME), MANIFEST_NAME) as f:
        manifest_bytes = f.read(MAX_MANIFEST_BYTES + 1)
    manifest = Manifest.from_bytes(manifest_bytes, str(pkg / MANIFEST_NAME))
    check_package(manifest, pkg, "none")  # paths confined and listed; sizes and hashes checked while copying
    key = load_private_key(sign_key, sign_password) if sign_key is not None else None
    work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        sources = {e.path: pkg / e.path for e in manifest.files}
        if ort:
            from portable_infer.package.ort_format import add_ort_variants

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
    manifest_bytes = read_member(zf, MANIFEST_NAME, path)
    signed = SIGNATURE_NAME in by_name
    if trust is not None:
        if not signed:
            raise SignatureError(f"{path} is not signed, but a trusted key was given ({trust}); sign it with "
                                 f"`portable-infer pack PKG -o {path.name} --sign KEY.pem`, or load without trust")
        verify_signature(manifest_bytes, read_member(zf, SIGNATURE_NAME, path), trust, where=str(path))
    elif signed:
        logger.warning("%s is signed but no trusted key was given, so its signature was not checked; "
                       "pass trust=PUBKEY.pem (--trust) to check it", path)
    manifest = Manifest.from_bytes(manifest_bytes, f"{path}: {MANIFEST_NAME}", BundleError)
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


def open_bundle(path, trust=None, cache_root: Path | None = None, check: str = "sha256") -> Path:
    """Check a ``.pinf`` bundle and unpack it (once) into the cache; returns the package directory.

    Args:
        path: the bundle file.
        trust: an Ed25519 public key (PEM path or bytes). Given: the bundle must be signed by it
            (:class:`SignatureError` otherwise). Not given: a signed bundle loads with a warning.
        cache_root: where unpacked bundles live (default ``$PORTABLE_INFER_HOME/bundles``).
        check: how a reused copy is checked (see :mod:`portable_infer.package.bundle_cache`): "sha256"
            hashes its files, "size" and "none" compare them with what was recorded at unpack.
            A damaged copy is unpacked again; a fresh unpack always hashes every member.

    Returns:
        ``cache_root/<sha256 of manifest.json>``: a complete, checked package directory.
    """
    from portable_infer.package.bundle_cache import open_cached

    path = _bundle_file(path, trust)
    root = Path(cache_root) if cache_root is not None else home() / "bundles"
    with _zip_errors(path):
        with zipfile.ZipFile(path) as zf:
            return open_cached(zf, read_bundle(zf, path, trust), root, check)


def inspect_bundle(path, trust=None) -> BundleInfo:
    """Check a bundle like :func:`open_bundle` does before unpacking, and return what it holds;
    nothing is written."""
    path = _bundle_file(path, trust)
    with _zip_errors(path):
        with zipfile.ZipFile(path) as zf:
            return read_bundle(zf, path, trust)


def _bundle_file(path, trust) -> Path:
    path = Path(path)
    if not path.is_file():
        if path.is_dir() and trust is not None:
            raise SignatureError(f"a trusted key was given, but {path} is a package directory, which carries no "
                                 f"signature; load a signed bundle (portable-infer pack {path} -o MODEL.pinf "
                                 f"--sign KEY.pem) or load without trust")
        raise BundleError(f"{path} is not a bundle file (create one with `portable-infer pack PKG -o MODEL.pinf`)")
    return path


class _zip_errors:
    """zipfile's exceptions for a damaged file -> :class:`BundleError`."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        path = self.path
        if isinstance(exc, zipfile.BadZipFile):
            raise BundleError(f"{path} is not a readable .pinf bundle ({exc}): it is truncated or corrupted, or not "
                              f"a bundle at all (a model is a package directory or a .pinf file); re-copy it or "
                              f"re-pack it with `portable-infer pack`") from exc
        if isinstance(exc, (EOFError, struct.error, NotImplementedError, zipfile.LargeZipFile)):
            raise BundleError(f"{path} is truncated or corrupted ({type(exc).__name__}: {exc}); re-copy or "
                              f"re-pack it") from exc
        if isinstance(exc, OSError) and exc.filename in (None, str(path)):
            raise BundleError(f"{path} cannot be read ({exc.strerror or exc}); check the file and its "
                              f"permissions") from exc
        return False


def read_member(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return zf.read(name)
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{path}: member {name} is corrupted ({exc}); re-copy or re-pack the bundle") from exc
