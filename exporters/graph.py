"""A small ONNX graph builder that streams weights straight into an external-data file.

Each op method appends one node and returns its output name, so model code reads like the math::

    y = g.mul(g.div(x, g.sqrt(g.add(g.reduce_mean(g.mul(x, x), [-1]), eps))), w)

Weights go to ``<model>.onnx.data`` the moment they are added (aligned, so ONNX Runtime can
memory-map them) and are then dropped: an export holds about one weight tensor at a time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_ALIGN = 4096  # page-aligned: ONNX Runtime memory-maps aligned external data instead of copying it
_INLINE_BYTES = 1024  # smaller initializers stay inside the .onnx file

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
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._offset = 0
        self._seen: dict[bytes, tuple[int, int]] = {}

    def write(self, raw: bytes) -> tuple[int, int]:
        key = hashlib.sha256(raw).digest()
        if key not in self._seen:
            self._seen[key] = self._append(raw)
        return self._seen[key]

    def _append(self, raw: bytes) -> tuple[int, int]:
        pad = (-self._offset) % _ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self._offset += pad
        offset = self._offset
        self._f.write(raw)
        self._offset += len(raw)
        return offset, len(raw)

    def close(self) -> None:
        self._f.close()


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
        self._store(tensor, array.tobytes())
        return name

    def packed_weight(self, name: str, packed: np.ndarray, shape: tuple, elem_type: int) -> str:
        """Add a 4-bit initializer (INT4/UINT4) from bytes already packed two per byte."""
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = elem_type
        tensor.dims.extend(shape)
        self._store(tensor, np.ascontiguousarray(packed).tobytes())
        return name

    def _store(self, tensor: TensorProto, raw: bytes) -> None:
        if self._writer is None or len(raw) <= _INLINE_BYTES:
            tensor.raw_data = raw
        else:
            offset, length = self._writer.write(raw)
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
        """One node; ``name`` names its output (a list: its outputs, None entries get fresh names)."""
        names = name if isinstance(name, list) else [name] * (n_out == 1) or [None] * n_out
        outs = [n or self.fresh(op_type.lower()) for n in names]
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
