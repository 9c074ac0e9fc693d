"""KV buffers on a device, taken from a session's memory arena rather than ONNX Runtime's
Python-side one.

``OrtValue.ortvalue_from_shape_and_type`` takes device memory from an arena of ONNX Runtime's
Python binding that grows in powers of two (its default ``kNextPowerOfTwo``; no Python option
changes it). On an H200 each 1.68 GiB KV buffer cost 2 GiB that way: a KV budget sized from the
free memory ran out of it 20 GiB early (``benchmarks/gpu_kv_memory.py``, docs/benchmarks.md
session 22). The buffers here are the output of a companion session over
``kv_zeros.<dtype>.onnx`` (ConstantOfShape) on the model session's provider with its options,
whose arena grows by what is asked (``arena_extend_strategy=kSameAsRequested``, the CUDA
provider's default here), on device 0 (the only one an engine runs on: ``session.make_engine``).
Zero-filled.
"""

from __future__ import annotations

import logging

import numpy as np

from portable_infer.engine.companion import companion_session

logger = logging.getLogger(__name__)


class DeviceZeros:
    """Zero-filled buffers on ``session``'s device: ``zeros(shape, dtype)`` -> OrtValue."""

    def __init__(self, session, ort, provider: str, device: str):
        if device == "cuda":  # TensorRT's sessions too: the buffer is plain CUDA memory
            provider = "CUDAExecutionProvider"
        self.session, self.ort, self.provider, self.device = session, ort, provider, device
        self._sessions: dict = {}  # dtype name -> its kv_zeros session (made on first use)

    def zeros(self, shape, dtype):
        name = np.dtype(dtype).name
        companion = self._sessions.get(name)
        if companion is None:
            companion = self._sessions[name] = companion_session(self.session, self.ort, f"kv_zeros.{name}.onnx",
                                                                 self.provider)
        b = companion.io_binding()
        b.bind_cpu_input("shape", np.asarray(shape, np.int64))
        b.bind_output("y", self.device)
        companion.run_with_iobinding(b)
        return b.get_outputs()[0]


class KVBuffers:
    """An engine's part that makes its KV buffers (a mixin: it reads the engine's ``session``,
    ``ort``, ``provider`` and ``device``): on the CPU as before (ONNX Runtime's CPU memory,
    committed as it is written), elsewhere zero-filled from a session arena (:class:`DeviceZeros`);
    where that companion cannot run, from ONNX Runtime's Python-side allocator (logged: a budget
    sized from the device's memory may then not fit)."""

    _zeros = None  # DeviceZeros, made on first use; False: it could not run here

    def kv_buffer(self, shape, dtype):
        if self.device == "cpu" or self._zeros is False:
            return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), self.device, 0)
        if self._zeros is None:
            try:
                zeros = DeviceZeros(self.session, self.ort, self.provider, self.device)
                value = zeros.zeros(shape, dtype)
            except Exception as exc:  # noqa: BLE001 - the Python-side allocator still works
                logger.warning("KV buffers come from ONNX Runtime's Python-side allocator, which rounds them up "
                               "(kv_zeros could not run: %s: %s)", type(exc).__name__, exc)
                self._zeros = False
                return self.kv_buffer(shape, dtype)
            self._zeros = zeros
            return value
        return self._zeros.zeros(shape, dtype)
