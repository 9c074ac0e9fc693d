"""Every path a package names stays inside the package.

A package is a trust boundary: the manifest, the graphs and the tokenizer files come from whoever
built the package, not from us. The rules, checked at ``pack``, when a bundle is read and at load:

- *Syntax* (:func:`check_path`, when the manifest is parsed): every name — variant ``file``\\ s,
  tokenizer, config and chat-template files, ``files[].path`` — is a relative POSIX path: not
  empty, no leading ``/``, no ``:`` (drive letters, alternate streams), no backslash, no NUL or
  other control character, no empty, ``.`` or ``..`` component.
- *Listing* (manifest parse): every file the runtime opens is one of ``files[]``, so it is
  size- or hash-checked with the rest; ONNX external data is found in the graphs themselves
  (:mod:`portable_infer.package.onnx_refs`) and must be listed too (:func:`check_package`).
- *Resolution* (:func:`resolve_inside`, before a file is opened or even ``stat``-ed): the path,
  with every symbolic link followed, stays inside the package directory. A file outside is never
  looked at, so an error discloses nothing about it.

``check="none"`` skips sizes and hashes, never these rules.
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

from portable_infer.errors import PackageError, UnsafePathError

MAX_PATH = 1024
FIX = ("a package may only name files inside itself, by relative paths without '..', drive letters or "
       "backslashes; re-export the package, or ask its publisher for one")


def path_problem(name) -> str | None:
    """Why ``name`` is not a safe package-relative path, or None when it is."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name or len(name) > MAX_PATH:
        return "is empty or over-long"
    if not name.isprintable() and any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        return "holds a lone surrogate (not valid Unicode)"
    if "\x00" in name:
        return "contains a NUL character"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if name.startswith("/"):
        return "is absolute"
    if ":" in name:
        return "has a drive letter or ':'"
    if "\\" in name:
        return "contains a backslash"
    parts = name.split("/")
    if ".." in parts:
        return "climbs out with a '..' component"
    if "." in parts or "" in parts:
        return "has an empty or '.' component (not normalised)"
    return None


def check_path(field: str, name) -> str:
    """``name`` when it is a safe relative path, else :class:`UnsafePathError` naming ``field``."""
    problem = path_problem(name)
    if problem:
        raise UnsafePathError(f"manifest.json: {field} = {name!r} {problem}; {FIX}", field=field,
                              path=name if isinstance(name, str) else None)
    return name


def resolve_inside(package: Path, rel: str, field: str) -> Path:
    """``package / rel`` after checking that it resolves (symbolic links followed) inside ``package``.

    Nothing about the target is read when it is outside: not whether it exists, not its size.
    """
    check_path(field, rel)
    root = Path(package).resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise UnsafePathError(f"{field} = {rel!r} resolves outside the package {package} (a symbolic link leads "
                              f"out of it); {FIX}", field=field, path=rel)
    return Path(package) / rel


def open_regular(path: Path, field: str):
    """Open a package file for reading, refusing anything but a regular file (a FIFO would block)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PackageError(f"{path} ({field}) is missing from the package; re-export or re-copy the package") from None
    except OSError as exc:
        raise PackageError(f"{path} ({field}) cannot be read ({exc.strerror}); check its permissions") from exc
    if not stat.S_ISREG(st.st_mode):
        raise PackageError(f"{path} ({field}) is not a regular file; a package holds regular files only")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise PackageError(f"{path} ({field}) cannot be read ({exc.strerror}); check its permissions") from exc


def named_paths(manifest) -> list:
    """(field, path) for every file the manifest names outside files[]: the graphs the runtime
    opens, the tokenizer and chat template it reads, the tokenizer config it does not."""
    out = [(f"variants[{i}].file", v.file) for i, v in enumerate(manifest.variants)]
    t = manifest.tokenizer
    out += [(f"tokenizer.{k}", p) for k, p in (("file", t.file), ("config_file", t.config_file),
                                                ("chat_template_file", t.chat_template_file)) if p is not None]
    return out


def check_listed(manifest) -> None:
    """Every file the manifest names is one of its files[] (so it is size- and hash-checked)."""
    listed = {e.path for e in manifest.files}
    for field, rel in named_paths(manifest):
        check_path(field, rel)
        if rel not in listed:
            raise UnsafePathError(f"manifest.json: {field} = {rel!r} is not listed in files[], so it would be "
                                  f"opened unchecked; {FIX}", field=field, path=rel)


def check_package(manifest, package: Path, check: str = "sha256") -> None:
    """Confine every path of a package directory; then check its files at level ``check``.

    Every runtime-opened file (graphs, tokenizer, chat template) and every external-data file
    its graphs reference must resolve inside ``package`` and be listed in ``files[]``;
    ``check`` "sha256" / "size" then checks each listed file (see ``Manifest.verify_files``).

    Raises:
        UnsafePathError: a path leaves the package or is not listed.
        PackageError / ChecksumError: a file is missing, not regular, or does not match.
    """
    from portable_infer.package.onnx_refs import graph_refs

    package = Path(package)
    listed = {e.path for e in manifest.files}
    check_listed(manifest)
    for field, rel in named_paths(manifest):
        resolve_inside(package, rel, field)
    for i, v in enumerate(manifest.variants):
        field = f"variants[{i}].file"
        with open_regular(package / v.file, field) as f:
            locations = graph_refs(f, v.file)
        base = posixpath.dirname(v.file)
        for loc in sorted(locations):
            where = f"{field} ({v.file}) external data location"
            check_path(where, loc)
            rel = posixpath.join(base, loc) if base else loc
            if rel not in listed:
                raise UnsafePathError(f"{where} {loc!r} is not listed in the manifest's files[], so it would be "
                                      f"loaded unchecked; {FIX}", field=where, path=loc)
            resolve_inside(package, rel, where)
    if check != "none":
        manifest.verify_files(package, hash_files=check == "sha256")
