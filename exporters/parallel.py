"""Row chunks of a large array processed on a few threads (numpy releases the GIL in its loops).

The exporter's quantizers work on one weight matrix at a time; a chunk of rows keeps their
temporary arrays small (a few MiB, not several copies of the matrix) and independent, so the
chunks run on the CPUs this process may use (``portable_infer.engine.host.cpu_budget``) and the result
is the same, to the bit, on any number of threads.
"""

from __future__ import annotations

import functools
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
    must write disjoint outputs. The first exception raised by a part is raised here."""
    workers = threads() if workers is None else workers
    if workers <= 1 or len(parts) <= 1:
        for p in parts:
            fn(p)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(parts))) as pool:
        for _ in pool.map(fn, parts):  # consumed, so an exception in a part is raised
            pass


def transposed(a: np.ndarray, strip: int = 256) -> np.ndarray:
    """``np.ascontiguousarray(a.T)`` for a 2-D array, copied in strips of ``strip`` source rows
    (on :func:`threads`): numpy's own copy walks the source across whole rows for every output
    row, 5x slower on an embedding table."""
    rows, cols = a.shape
    out = np.empty((cols, rows), a.dtype)

    def part(r: slice) -> None:
        out[:, r] = a[r].T

    for_each(part, [slice(i, min(i + strip, rows)) for i in range(0, rows, strip)])
    return out
