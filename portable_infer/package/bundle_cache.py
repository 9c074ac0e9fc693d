"""The unpack cache of ``.pinf`` bundles: one checked directory per manifest, reused safely.

``open_cached`` unpacks a bundle into ``<root>/<sha256 of manifest.json>/`` once and reuses it
afterwards. The directory holds the package files (read-only, mode 0444) and ``.unpacked.json``,
a stamp written when every member had been hashed against the manifest::

    {"files":   {path: [size, mtime_ns, ctime_ns, inode]}   each unpacked file, as written
     "digests": [sha256 of a whole bundle file, ...]        bundles verified member by member
     "seen":    [[realpath, size, mtime_ns, ctime_ns, inode, device], ...]   where they were seen}

Reuse, in this order:

1. *This bundle file is one that was verified.* Its ``stat`` matches one in ``seen`` (the cheap
   path: nothing is read), else its sha256 is in ``digests`` (a copy: one read), else every member
   is hashed against the manifest as on a first unpack — a corrupted copy fails exactly as it
   would with an empty cache, and a good one (say, the signed twin of an unsigned bundle: same
   manifest, other bytes) is recorded.
2. *The copy is intact*, at the load's ``check`` level: "sha256" hashes every file; "size" and
   "none" compare each file's size, mtime, ctime and inode with the stamp. Writing a file, even
   one made writable first and touched back to its old mtime, changes its ctime, which no
   unprivileged process can set; only damage below the file system (bit rot) needs "sha256".
   A damaged copy is unpacked again from the (just verified) bundle.

Unpacking runs under ``<root>/.lock`` (an advisory lock): it first removes ``.*.partial-*``
directories that a killed process left (nobody else can be writing them while we hold the
lock), checks the free space, and writes ``.<key>.partial-XXXX``, whose graphs must name only
listed files inside it (``package_paths.check_package``), renamed into place at the end.
Disk faults are :class:`BundleError`: no space ("needs N MB free in DIR"), a read-only or
forbidden cache ("set PORTABLE_INFER_HOME"); nothing half-written stays.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import uuid
import zipfile
from pathlib import Path

from portable_infer.errors import BundleError
from portable_infer.package.home import HOME_ENV, FileLock
from portable_infer.package.manifest import MANIFEST_NAME, sha256_file
from portable_infer.package.package_paths import check_package

logger = logging.getLogger(__name__)

STAMP = ".unpacked.json"
LOCK = ".lock"
MAX_SEEN = 16
_CHUNK = 4 << 20
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def open_cached(zf: zipfile.ZipFile, info, root: Path, check: str) -> Path:
    """The checked package directory of the bundle ``info`` (from ``bundle.read_bundle``)."""
    dest = root / info.key
    stamp = _read_stamp(dest)
    if stamp is not None:
        _vouch_for_bundle(zf, info, dest, stamp)
        if _intact(dest, info, stamp, check):
            logger.info("bundle %s: reusing %s", info.path, dest)
            return dest
        logger.warning("the unpacked copy %s of %s is damaged or incomplete; unpacking it again", dest, info.path)
    return _unpack(zf, info, root, dest, damaged=stamp is not None)


# --- 1. is this bundle one that was verified? -------------------------------------------------------
def _sighting(path: Path) -> list:
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _vouch_for_bundle(zf: zipfile.ZipFile, info, dest: Path, stamp: dict) -> None:
    seen = _sighting(info.path)
    if seen in stamp["seen"]:
        return
    digest = sha256_file(info.path)
    if digest not in stamp["digests"]:
        logger.info("bundle %s differs from the one unpacked into %s; checking every member", info.path, dest)
        verify_members(zf, info)  # raises as it would on a first unpack
        stamp["digests"].append(digest)
    stamp["seen"] = (stamp["seen"] + [seen])[-MAX_SEEN:]
    try:
        _write_json(dest / STAMP, stamp)
    except OSError as exc:  # a read-only cache can still be used; the next open checks again
        logger.info("could not update %s (%s)", dest / STAMP, exc.strerror)


def verify_members(zf: zipfile.ZipFile, info) -> None:
    """Hash every member of the bundle against the manifest; nothing is written."""
    for entry in info.manifest.files:
        copy_member(zf, info, entry, None)


def copy_member(zf: zipfile.ZipFile, info, entry, dst) -> None:
    """Stream one member (into ``dst``, a binary file, when given), checking its sha256."""
    h = hashlib.sha256()
    with zf.open(entry.path) as src:
        while block := src.read(_CHUNK):
            h.update(block)
            if dst is not None:
                dst.write(block)
    if h.hexdigest() != entry.sha256:
        raise BundleError(f"{info.path}: member {entry.path} does not match its sha256 in the manifest; "
                          f"the bundle is corrupted: re-copy or re-pack it")


# --- 2. is the unpacked copy intact? -----------------------------------------------------------------
def _file_stamp(path: Path) -> list:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _intact(dest: Path, info, stamp: dict, check: str) -> bool:
    try:
        if (dest / MANIFEST_NAME).read_bytes() != info.manifest_bytes:
            return False
        for entry in info.manifest.files:
            path = dest / entry.path
            now = _file_stamp(path)
            if check == "sha256":
                if now[0] != entry.size or sha256_file(path) != entry.sha256:
                    return False
            elif now != stamp["files"].get(entry.path):
                return False
    except OSError:
        return False
    return True


# --- unpacking ----------------------------------------------------------------------------------------
def _unpack(zf: zipfile.ZipFile, info, root: Path, dest: Path, damaged: bool) -> Path:
    needed = sum(e.size for e in info.manifest.files) + len(info.manifest_bytes)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(root / LOCK) as lock:
            if not damaged and _done_meanwhile(info, dest):
                return dest
            if lock.locked:
                remove_stale(root)
            _check_space(root, needed)
            tmp = root / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            _extract(zf, info, tmp)
            _publish(tmp, dest)
    except OSError as exc:
        raise _disk_error(exc, root, needed) from exc
    finally:
        if tmp is not None and tmp.exists():
            rmtree(tmp)
    logger.info("bundle %s unpacked into %s", info.path, dest)
    return dest


def _done_meanwhile(info, dest: Path) -> bool:
    """Another process unpacked this very bundle file while we waited for the lock."""
    stamp = _read_stamp(dest)
    return stamp is not None and _sighting(info.path) in stamp["seen"] and _intact(dest, info, stamp, "size")


def _extract(zf: zipfile.ZipFile, info, tmp: Path) -> None:
    seen = _sighting(info.path)  # before reading; compared again at the end
    digest = sha256_file(info.path)
    files = {}
    for entry in info.manifest.files:
        target = tmp / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as dst:
            copy_member(zf, info, entry, dst)
        os.chmod(target, 0o444)  # read-only: nothing writes into the cache by accident
        files[entry.path] = _file_stamp(target)
    (tmp / MANIFEST_NAME).write_bytes(info.manifest_bytes)
    os.chmod(tmp / MANIFEST_NAME, 0o444)
    check_package(info.manifest, tmp, "none")  # the graphs' external data: refused before it is published
    if _sighting(info.path) != seen:
        raise BundleError(f"{info.path} changed while it was being unpacked; load it again once it is complete")
    stamp = {"files": files, "digests": [digest], "seen": [seen]}
    _write_json(tmp / STAMP, stamp)  # last: marks the directory complete


def _publish(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; a damaged or unstamped ``dest`` is moved aside first."""
    if dest.exists() or dest.is_symlink():
        stale = dest.parent / f".{dest.name}.partial-old-{uuid.uuid4().hex[:8]}"
        os.rename(dest, stale)
        os.rename(tmp, dest)
        rmtree(stale)
    else:
        os.rename(tmp, dest)


def remove_stale(root: Path) -> None:
    """Remove the partial directories a killed unpack left. Call with ``root``'s lock held."""
    for stale in root.glob(".*.partial-*"):
        logger.warning("removing %s, left by an interrupted unpack", stale)
        rmtree(stale)


def _check_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed:
        raise BundleError(f"unpacking needs {_mb(needed)} MB free in {root}, and {free / 2**20:.1f} MB are; free some "
                          f"space or set {HOME_ENV} to a disk with room")


def _disk_error(exc: OSError, root: Path, needed: int) -> BundleError:
    if exc.errno in _NO_SPACE:
        return BundleError(f"no space left while unpacking: it needs {_mb(needed)} MB free in {root}; free some "
                           f"space or set {HOME_ENV} to a disk with room; nothing was left behind")
    if exc.errno in _READ_ONLY:
        return BundleError(f"cannot write the bundle cache {root} ({exc.strerror}): it is read-only or not ours; "
                           f"set {HOME_ENV} to a writable directory, or unpack the bundle once where it is "
                           f"writable and load the package directory")
    return BundleError(f"unpacking into {root} failed ({exc.strerror or exc}); nothing was left behind")


def _mb(n: int) -> int:
    return -(-n // 2**20)


# --- small helpers -----------------------------------------------------------------------------------------
def _read_stamp(dest: Path) -> dict | None:
    try:
        stamp = json.loads((dest / STAMP).read_bytes())
        ok = (isinstance(stamp, dict) and isinstance(stamp.get("files"), dict)
              and isinstance(stamp.get("digests"), list) and isinstance(stamp.get("seen"), list))
        return stamp if ok else None
    except (OSError, ValueError, RecursionError):
        return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(obj), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rmtree(path: Path) -> None:
    """Remove a directory tree, read-only files included (Windows refuses to delete those)."""
    def retry(func, p, *_):
        os.chmod(p, stat.S_IWRITE | stat.S_IREAD | stat.S_IEXEC)
        func(p)

    kw = {"onexc": retry} if sys.version_info >= (3, 12) else {"onerror": retry}
    try:
        shutil.rmtree(path, **kw)
    except OSError as exc:
        logger.warning("could not remove %s (%s)", path, exc.strerror)
