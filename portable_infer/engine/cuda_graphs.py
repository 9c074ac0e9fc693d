"""What the engines' CUDA graphs share: decode batch buckets, graph ids, run options.

A captured graph replays one step's kernels on the addresses it was captured with, so a decode
step runs at one of a few batch sizes (:func:`bucket`: the rows rounded up), each with buffers
and a graph of its own, captured once (the static engine's slot batch, the paged engine's decode
steps). ONNX Runtime keeps captured graphs per session by id, and more than one engine may run
over one session (the tuner's timing engines, then the model's): ids are unique in the process.
"""

from __future__ import annotations

import itertools
import threading

from portable_infer.engine.memory import GRAPH_ID_KEY

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)  # then multiples of 64
NO_SYNC_KEY = "disable_synchronize_execution_providers"  # run option: return before the device is done
_IDS = itertools.count(1)
_IDS_LOCK = threading.Lock()


def bucket(n: int, limit: int) -> int:
    """The decode batch size for ``n`` rows: the smallest bucket >= ``n``, at most ``limit``."""
    size = next((b for b in BUCKETS if b >= n), -(-n // 64) * 64)
    return min(size, limit)


def new_graph_id() -> int:
    """An id no other graph of this process has."""
    with _IDS_LOCK:
        return next(_IDS)


def run_options(ort, device: str, graph_id: int, sync: bool = True):
    """Run options that replay CUDA graph ``graph_id`` (-1: run without a graph) on CUDA. Set on
    every device: ONNX Runtime's Python ``run_with_iobinding`` reads the key on each run, and an
    unset key costs a raised and caught exception there (30-75 us a step, ONNX Runtime 1.32);
    providers without graph capture ignore it. ``sync=False``: the run returns without waiting
    for the device (the caller synchronizes the binding's outputs)."""
    ro = ort.RunOptions()
    ro.add_run_config_entry(GRAPH_ID_KEY, str(graph_id if device == "cuda" else -1))
    if not sync:
        ro.add_run_config_entry(NO_SYNC_KEY, "1")
    return ro
