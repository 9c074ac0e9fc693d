"""A small ONNX graph builder that streams weights straight into an external-data file.

Each op method appends one node and returns its output name, so model code reads like the math::

    y = g.mul(g.div(x, g.sqrt(g.add(g.reduce_mean(g.mul(x, x), [-1]), eps))), w)

Weights go to ``<model>.onnx.data`` as they are added (aligned, so ONNX Runtime can memory-map
them), through a writing thread that also hashes the file, and are then dropped: an export holds
about one weight tensor at a time, plus at most 64 MiB (or one larger weight) waiting to be
written.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_ALIGN = 4096  # page-aligned: ONNX Runtime memory-maps aligned external data instead of copying it
_INLINE_BYTES = 1024  # smaller initializers stay inside the .onnx file
_PENDING_BYTES = 64 << 20  # weight bytes waiting for the writing thread, at most (or one larger weight)
_SAMPLES, _SAMPLE_BYTES = 64, 1024  # a large weight's dedup key hashes 64 pieces of 1 KiB

NP_TO_ONNX = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,
    np.dtype("int8"): TensorProto.INT8,
    np.dtype("uint8"): TensorProto.UINT8,
    np.dtype("bool"): TensorProto.BOOL,
}


class ExternalDataWriter:
    """Appends raw tensor bytes to one file and hands back ONNX external-data references.

    Identical bytes are stored once: a second graph built on the same writer (the static-KV
    variant beside the fused one) references the first graph's weights instead of copying them.
    The bytes are written (and hashed, for the manifest) on a background thread in the order they
    came (:class:`_OrderedFile`), so converting the next weight overlaps writing this one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = _OrderedFile(self.path)
        self._offset = 0
        self._seen: dict[tuple, list[int]] = {}  # dedup key -> offsets of the tensors stored under it

    def write(self, array: np.ndarray) -> tuple[int, int]:
        """(offset, length) of the C-contiguous ``array``'s bytes in the file; the array is written
        later (:class:`_OrderedFile`) and must not change afterwards."""
        raw = memoryview(array.reshape(-1).view(np.uint8))
        key = _dedup_key(raw)
        for offset in self._seen.get(key, ()):
            # a small tensor's key is the sha256 of all its bytes; a large one's is checked byte by byte
            if len(raw) <= _SAMPLES * _SAMPLE_BYTES or self._file.read(offset, len(raw)) == raw:
                return offset, len(raw)
        offset = self._append(raw)
        self._seen.setdefault(key, []).append(offset)
        return offset, len(raw)

    def _append(self, raw: memoryview) -> int:
        pad = (-self._offset) % _ALIGN
        if pad:
            self._file.append(memoryview(bytes(pad)))
            self._offset += pad
        offset = self._offset
        self._file.append(raw)
        self._offset += len(raw)
        return offset

    def close(self) -> str:
        """Write what is still pending and close the file; the file's sha256 (hex)."""
        return self._file.close()


def _dedup_key(raw: memoryview) -> tuple:
    """(length, sha256 of the bytes): of all of them up to ``_SAMPLES`` pieces' worth, else of
    ``_SAMPLES`` evenly spread pieces (hashing every byte of every weight cost as much as writing it)."""
    n = len(raw)
    if n > _SAMPLES * _SAMPLE_BYTES:
        starts = np.linspace(0, n - _SAMPLE_BYTES, _SAMPLES).astype(np.int64)
        raw = b"".join(raw[a:a + _SAMPLE_BYTES] for a in starts.tolist())
    return n, hashlib.sha256(raw).digest()


class _OrderedFile:
    """A file that background threads write, in the order of :meth:`append`, and hash (on a second
    thread, beside the writes) as they go: the manifest's sha256 without reading the file again.
    At most ``pending`` bytes (or one larger buffer) wait, so the memory they hold stays bounded."""

    def __init__(self, path: Path, pending: int = _PENDING_BYTES):
        self.path = path
        self._f = open(path, "wb", buffering=0)
        self._sha = hashlib.sha256()
        self._cond = threading.Condition()
        self._limit = pending
        self._error: BaseException | None = None
        jobs = (self._write, self._sha.update)
        self._queues = tuple(queue.SimpleQueue() for _ in jobs)
        self._pending = [0] * len(jobs)  # bytes each thread has still to take
        self._threads = [threading.Thread(target=self._run, args=(i, job), name=f"{path.name} {i}", daemon=True)
                         for i, job in enumerate(jobs)]
        for t in self._threads:
            t.start()

    def append(self, raw: memoryview) -> None:
        with self._cond:
            while max(self._pending) and max(self._pending) + len(raw) > self._limit and self._error is None:
                self._cond.wait()
            self._raise()
            self._pending = [n + len(raw) for n in self._pending]
        for q in self._queues:
            q.put(raw)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes already appended (waits until they are written)."""
        with self._cond:
            while self._pending[0] and self._error is None:
                self._cond.wait()
            self._raise()
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def close(self) -> str:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        self._f.close()
        self._raise()
        return self._sha.hexdigest()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _write(self, raw: memoryview) -> None:
        while raw:
            raw = raw[self._f.write(raw):]

    def _run(self, i: int, job) -> None:
        while (raw := self._queues[i].get()) is not None:
            try:
                if self._error is None:
                    job(raw)
            except BaseException as exc:  # raised in the exporting thread by its next call
                self._error = exc
            with self._cond:
                self._pending[i] -= len(raw)
                self._cond.notify_all()


class GraphBuilder:
    """Collects nodes, inputs, outputs and initializers of one ONNX graph."""

    def __init__(self, name: str, data_writer: ExternalDataWriter | None, opset: int = 21):
        self.name = name
        self.opset = opset
        self.domains: dict[str, int] = {}
        self.nodes: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.initializers: list = []
        self._writer = data_writer
        self._names: set[str] = set()
        self._consts: dict = {}
        self._counter = 0

    # --- naming ---------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counter += 1
        name = f"{hint}_{self._counter}"
        self._names.add(name)
        return name

    # --- graph I/O ------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        """Declare a graph output; a value computed under another name gets an Identity."""
        if value != name:
            self.op("Identity", [value], name=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    # --- initializers ---------------------------------------------------------------------
    def weight(self, name: str, array: np.ndarray, elem_type: int | None = None) -> str:
        """Add an initializer; large ones are streamed to the external data file.

        ``elem_type`` overrides the ONNX type for packed 4-bit data (``array`` then holds the
        packed bytes as uint8 and its *logical* shape is given by ``array.shape`` with the last
        dimension doubled by the caller through :meth:`packed_weight`).
        """
        array = np.ascontiguousarray(array)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = elem_type if elem_type is not None else NP_TO_ONNX[array.dtype]
        tensor.dims.extend(array.shape)
        self._store(tensor, array)
        return name

    def packed_weight(self, name: str, packed: np.ndarray, shape: tuple, elem_type: int) -> str:
        """Add a 4-bit initializer (INT4/UINT4) from bytes already packed two per byte."""
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = elem_type
        tensor.dims.extend(shape)
        self._store(tensor, np.ascontiguousarray(packed))
        return name

    def _store(self, tensor: TensorProto, array: np.ndarray) -> None:
        """``array`` (C-contiguous) inline, or in the data file: written later, so it must not
        change afterwards (ExternalDataWriter.write)."""
        if self._writer is None or array.nbytes <= _INLINE_BYTES:
            tensor.raw_data = array.tobytes()
        else:
            offset, length = self._writer.write(array)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self._writer.path.name), ("offset", str(offset)),
                               ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        self.initializers.append(tensor)

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, deduplicated by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    # --- nodes ----------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list, n_out: int = 1, name: str | list | None = None,
           domain: str = "", **attrs):
        """One node; ``name`` names its output (a list: its outputs, None entries get fresh names,
        "" ones are left out: optional outputs not computed)."""
        names = name if isinstance(name, list) else [name] * (n_out == 1) or [None] * n_out
        outs = [self.fresh(op_type.lower()) if n is None else n for n in names]
        if domain:
            self.domains.setdefault(domain, 1)
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    # Thin helpers for the ops model code uses most.
    def add(self, a, b): return self.op("Add", [a, b])
    def sub(self, a, b): return self.op("Sub", [a, b])
    def mul(self, a, b): return self.op("Mul", [a, b])
    def div(self, a, b): return self.op("Div", [a, b])
    def matmul(self, a, b): return self.op("MatMul", [a, b])
    def neg(self, a): return self.op("Neg", [a])
    def sqrt(self, a): return self.op("Sqrt", [a])
    def tanh(self, a): return self.op("Tanh", [a])
    def sigmoid(self, a): return self.op("Sigmoid", [a])
    def cast(self, a, to: int): return self.op("Cast", [a], to=to)
    def shape(self, a, start=None, end=None):
        attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
        return self.op("Shape", [a], **attrs)
    def reshape(self, a, shape): return self.op("Reshape", [a, shape if isinstance(shape, str) else self.const(shape)])
    def transpose(self, a, perm): return self.op("Transpose", [a], perm=list(perm))
    def unsqueeze(self, a, axes): return self.op("Unsqueeze", [a, self.const(axes)])
    def concat(self, items, axis): return self.op("Concat", list(items), axis=axis)
    def gather(self, data, idx, axis=0): return self.op("Gather", [data, idx], axis=axis)
    def reduce_mean(self, a, axes): return self.op("ReduceMean", [a, self.const(axes)], keepdims=1)
    def reduce_sum(self, a, axes, keepdims=1): return self.op("ReduceSum", [a, self.const(axes)], keepdims=keepdims)
    def softmax(self, a, axis=-1): return self.op("Softmax", [a], axis=axis)
    def where(self, c, a, b): return self.op("Where", [c, a, b])
    def split(self, a, sizes, axis=-1):
        return self.op("Split", [a, self.const(sizes)], n_out=len(sizes), axis=axis)
    def slice(self, a, starts, ends, axes):
        return self.op("Slice", [a, self.const(starts), self.const(ends), self.const(axes)])

    # --- output ---------------------------------------------------------------------------
    def model(self, producer: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in sorted(self.domains.items())]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        model.ir_version = 10
        return model
