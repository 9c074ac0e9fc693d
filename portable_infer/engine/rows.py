"""Rows of fixed KV buffers moved on their own device, for the scheduler's joins and leaves.

:class:`~portable_infer.engine.kv_static.StaticCache` moves rows between a static batch's buffers.
On the CPU that is a numpy copy; on a GPU, through the host, it would copy every buffer out and back in (~19 ms per
leave for SmolLM2 at batch 16 on an H100). :class:`RowMover` runs the shipped graph
``graphs/kv_rows.<dtype>.onnx`` (``y = Slice(Pad(Gather(x, rows), pads), :keep)``, built by
``exporters/runtime_graphs.py``) on the buffers' device, its output bound inside the destination
buffer, so rows move device to device; :meth:`RowMover.fetch` brings just the rows and tokens
the prefix cache keeps to the host. Each run synchronizes its stream before returning (ONNX
Runtime's default), so the model's next run sees the moved rows.
"""

from __future__ import annotations

import numpy as np

from portable_infer.engine.companion import companion_session


class RowMover:
    """Copies rows of one ``[B, H, C, D]`` buffer into consecutive rows of another, on the
    device both live on (``C`` may grow: the tail is zeros)."""

    def __init__(self, session, ort, dtype, provider: str | None = None):
        self.session = companion_session(session, ort, f"kv_rows.{np.dtype(dtype).name}.onnx", provider)
        self.dtype = np.dtype(dtype)

    def copy(self, src, rows, dst, at: int, used: int | None = None) -> None:
        """``dst[at:at + len(rows), :, :C_src] = src[rows]`` (OrtValues on one device); into shorter
        rows (``C_dst < C_src``) only where the rows hold ``used <= C_dst`` tokens: the first C_dst."""
        (_, h, c_src, d), (_, h2, c_dst, d2) = src.shape(), dst.shape()
        if (h, d) != (h2, d2) or (c_dst < c_src and (used is None or used > c_dst)):
            raise ValueError(f"cannot move rows of a {src.shape()} buffer into a {dst.shape()} one"
                             + ("" if used is None else f" (they hold {used} tokens)"))
        b = self._binding(src, rows, max(0, c_dst - c_src), c_dst)
        row_bytes = h * c_dst * d * self.dtype.itemsize
        b.bind_output("y", dst.device_name(), 0, self.dtype, [len(rows), h, c_dst, d], dst.data_ptr() + at * row_bytes)
        self.session.run_with_iobinding(b)

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
