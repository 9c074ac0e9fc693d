"""Memory the engines give back, and what one token of KV costs.

ONNX Runtime's CPU arena keeps the peak of the largest call's activations for the life of the
process, and glibc keeps large freed buffers in the C heap; both engines give that memory back
through the helpers here. :func:`bytes_per_token` is the one KV size rule: the caches' ``nbytes``,
the static engine's buffers and the scheduler's KV budget all count with it.
"""

from __future__ import annotations

import ctypes

import numpy as np

# A call that brings at least this many new tokens (batch x sequence: a prefill, a prefill
# chunk) ends by giving the CPU arena's free chunks back to the OS (ONNX Runtime's arena
# shrinkage): without it the arena keeps the peak of the largest call's activations for the
# life of the process. Decode steps (one token per row) leave the arena alone: shrinking every
# step would free and fault in the same memory again every token.
SHRINK_MIN_TOKENS = 64
# When a cache of at least this many bytes is dropped, the engine's trim gives its memory back
# (a growing cache's KV lives in the arena: ONNX Runtime allocates the presents).
TRIM_MIN_BYTES = 16 << 20
_SHRINK_KEY = "memory.enable_memory_arena_shrinkage"
GRAPH_ID_KEY = "gpu_graph_id"  # the run option naming the CUDA graph a run captures or replays (-1: none)


def bytes_per_token(layout) -> int:
    """KV bytes one token takes over all layers (keys and values) of a :class:`~portable_infer.package.manifest.KVLayout`."""
    return 2 * len(layout.past) * layout.num_kv_heads * layout.head_dim * np.dtype(layout.dtype).itemsize


def release_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc's ``malloc_trim``; a no-op where the
    C library has none). Large buffers freed after glibc raised its mmap threshold stay in the
    heap otherwise: a dropped 93 MB static KV cache kept the process 97 MB above its rest."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError, TypeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None  # resolved on first use


def shrink_run_options(session, ort):
    """RunOptions that shrink the CPU arena at the end of a run, or None when the session has no
    CPU arena (``low_memory``: nothing to shrink, and ONNX Runtime refuses the option then)."""
    try:
        arena = session.get_session_options().enable_cpu_mem_arena
    except Exception:  # noqa: BLE001 - a session stand-in (tests) without options: no shrinking
        return None
    if not arena:
        return None
    ro = ort.RunOptions()
    ro.add_run_config_entry(_SHRINK_KEY, "cpu:0")
    ro.add_run_config_entry(GRAPH_ID_KEY, "-1")  # no graph; and a key read on every run (static._run_options)
    return ro
