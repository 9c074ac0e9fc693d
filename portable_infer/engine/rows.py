"""Rows of fixed KV buffers moved on their own device, for the scheduler's joins and leaves.

:class:`~portable_infer.engine.kv_static.StaticCache` moves rows between a static batch's buffers.
On the CPU that is a numpy copy; on a GPU, through the host, it would copy every buffer out and
back in (~19 ms per leave for SmolLM2 at batch 16 on an H100). :class:`RowMover` runs shipped
graphs (built by ``exporters/runtime_graphs.py``) on the buffers' device instead:
:meth:`RowMover.scatter` (``graphs/kv_scatter.<dtype>.onnx``) moves any rows into any rows, its
output bound to the destination buffer itself, every row of a join or a compaction in one run per
buffer (one run per row made a 128-row compaction at the 8B shape take ~0.5 s on the H200);
:meth:`RowMover.fetch` (``graphs/kv_rows.<dtype>.onnx``) brings just the rows and tokens the
prefix cache keeps to the host. Each run synchronizes its stream before returning (ONNX Runtime's
default), so the model's next run sees the moved rows.
"""

from __future__ import annotations

import numpy as np

from portable_infer.engine.companion import companion_session


class RowMover:
    """Moves rows of ``[B, H, C, D]`` buffers on the device they live on (``C`` may grow: the
    tail is zeros), or fetches them to the host."""

    def __init__(self, session, ort, dtype, provider: str | None = None):
        self.session = companion_session(session, ort, f"kv_rows.{np.dtype(dtype).name}.onnx", provider)
        self.scatter_session = companion_session(session, ort, f"kv_scatter.{np.dtype(dtype).name}.onnx", provider)
        self.ort = ort
        self.dtype = np.dtype(dtype)

    def scatter(self, pairs: list, rows, at) -> None:
        """``dst[at[k]] = src[rows[k]]`` for each ``(src, dst)`` pair of OrtValues on one device (the
        source's capacity may be smaller: the tail is zeros); the other rows of ``dst`` keep their
        values, and ``src`` may be ``dst`` (a row may move onto one that moves too). The indices
        go to the device once for all the pairs."""
        if not pairs or not len(rows):
            return
        rows, at = np.asarray(rows, np.int64), np.asarray(at, np.int64)
        if rows.shape != at.shape or len(np.unique(at)) != len(at):
            raise ValueError(f"moving rows {rows.tolist()} into {at.tolist()}: one distinct target a row")
        src0, dst0 = pairs[0]
        (_, h, c_src, d), (b_dst, h2, c_dst, d2) = src0.shape(), dst0.shape()
        if (h, d) != (h2, d2) or c_dst < c_src or at.min() < 0 or at.max() >= b_dst:
            raise ValueError(f"cannot move rows of a {src0.shape()} buffer into rows {at.tolist()} of a {dst0.shape()} one")
        device = dst0.device_name()
        put = lambda a: self.ort.OrtValue.ortvalue_from_numpy(a, device, 0)  # noqa: E731
        b = self.scatter_session.io_binding()
        b.bind_ortvalue_input("rows", put(rows))
        b.bind_ortvalue_input("at", put(at[:, None].copy()))
        b.bind_cpu_input("pads", np.array([0, 0, 0, 0, 0, 0, c_dst - c_src, 0], np.int64))  # Pad reads it on the host
        for src, dst in pairs:
            if src.shape()[1:] != src0.shape()[1:] or dst.shape() != dst0.shape():
                raise ValueError(f"buffers of one move differ in shape: {src.shape()} -> {dst.shape()}")
            b.bind_ortvalue_input("x", dst)
            b.bind_ortvalue_input("src", src)
            b.bind_output("y", device, 0, self.dtype, dst.shape(), dst.data_ptr())  # in place: x's memory
            self.scatter_session.run_with_iobinding(b)

    def fetch(self, src, rows, keep: int) -> np.ndarray:
        """``src[rows, :, :keep]`` as a host array (only those bytes leave the device)."""
        b = self._binding(src, rows, 0, keep)
        b.bind_output("y", "cpu")
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    def _binding(self, src, rows, grow: int, keep: int):
        b = self.session.io_binding()
        b.bind_ortvalue_input("x", src)
        b.bind_cpu_input("rows", np.asarray(rows, np.int64))
        b.bind_cpu_input("pads", np.array([0, 0, 0, 0, 0, 0, grow, 0], np.int64))
        b.bind_cpu_input("keep", np.array([keep], np.int64))
        return b
