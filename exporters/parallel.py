"""Row chunks of a large array processed on a few threads (numpy releases the GIL in its loops).

The exporter's quantizers work on one weight matrix at a time; a chunk of rows keeps their
temporary arrays small (a few MiB, not several copies of the matrix) and independent, so the
chunks run on the CPUs this process may use (``portable_infer.engine.host.cpu_budget``) and the result
is the same, to the bit, on any number of threads.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CHUNK_BYTES = 1 << 20  # float32 input per chunk: its temporaries stay in the CPU's cache (1 MiB: 3x faster than 4)


@functools.cache
def threads() -> int:
    """Worker threads: one per CPU this process may really use (affinity, cgroup quota)."""
    from portable_infer.engine.host import cpu_budget

    return cpu_budget().threads


def row_chunks(rows: int, row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> list[slice]:
    """Consecutive row ranges of about ``chunk_bytes`` each (at least one row)."""
    step = max(1, chunk_bytes // max(row_bytes, 1))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def for_each(fn, parts: list, workers: int | None = None) -> None:
    """``fn(part)`` for every part, on ``workers`` threads (default :func:`threads`); the parts
    must write disjoint outputs. The first exception raised by a part is raised here. A part that
    calls ``for_each`` itself runs its parts in its own thread (the pool's threads may all be busy)."""
    workers = threads() if workers is None else workers
    if workers <= 1 or len(parts) <= 1 or getattr(_worker, "busy", False):
        for p in parts:
            fn(p)
        return
    for _ in _pool(workers).map(functools.partial(_run, fn), parts):  # consumed: a part's exception is raised
        pass


_worker = threading.local()


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """The threads of ``for_each``, started once: a pool per call started two threads per weight
    matrix, hundreds per export."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="exporters.parallel")


def _run(fn, part) -> None:
    _worker.busy = True
    try:
        fn(part)
    finally:
        _worker.busy = False


def transposed(a: np.ndarray | list, dtype=None, strip: int = 16, task: int = 512) -> np.ndarray:
    """``np.ascontiguousarray(a.T.astype(dtype))`` for a 2-D array ``a``, or for the row-wise
    concatenation of a list of them (without making it), in one pass: copied and cast in strips of
    ``strip`` source rows, ``task`` rows to a task on :func:`threads`. numpy's own copy walks the
    source across whole rows for every output row, 5x slower on an embedding table (strips of 16
    rows: 2x faster than 64 or 256 on uint8 and fp16); the cast rounds as ``astype`` does."""
    parts = list(a) if isinstance(a, (list, tuple)) else [a]
    starts = np.cumsum([0] + [len(p) for p in parts]).tolist()
    out = np.empty((parts[0].shape[1], starts[-1]), np.result_type(*parts) if dtype is None else dtype)
    jobs = [(p, start, i, min(i + task, len(p))) for p, start in zip(parts, starts) for i in range(0, len(p), task)]

    def part(job: tuple) -> None:
        p, start, first, end = job
        for i in range(first, end, strip):
            j = min(i + strip, end)
            out[:, start + i:start + j] = p[i:j].T

    for_each(part, jobs)
    return out
