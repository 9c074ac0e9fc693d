"""The files an ONNX graph makes ONNX Runtime open, read without the ``onnx`` package.

An ONNX ``ModelProto`` names other files in the ``external_data`` entries (key ``location``) of
its tensors: initializers, sparse initializers, tensors in node attributes, in subgraphs (``If``,
``Loop``, ``Scan``), in functions and in training info. ONNX Runtime opens
``<graph's directory>/<location>``. Recent ONNX Runtime releases refuse locations that leave the
graph's directory (1.32 does; older ones down to the 1.20 this package accepts may not), and
none of them checks that the file is one the package lists and hashes. So the runtime finds every location itself:
:func:`graph_refs` walks the protobuf wire format along the message fields that can hold a
tensor, skipping everything else (weights included) without reading it::

    ModelProto.graph(7) ─ GraphProto ─ initializer(5) ─ TensorProto ─ external_data(13) ─ {key(1), value(2)}
        .functions(25)    │            sparse_initializer(15) ─ SparseTensorProto ─ values(1), indices(2)
        .training_info(20)└ node(1) ─ NodeProto ─ attribute(5) ─ AttributeProto ─ t(5) tensors(10)
                                                                  g(6) graphs(11) sparse_tensor(22) sparse_tensors(23)

Protobuf merges repeated occurrences of a message field, and the last ``key`` of an entry wins;
the walk visits every occurrence and keeps every ``value`` of an entry that has ``location``
among its keys: a superset of what ONNX Runtime reads. Strings are stored as they are, so a
message whose bytes contain neither ``location`` nor ``EPContext`` is skipped without being
walked (a C-speed search): 10-20 ms per graph of the default model (30 layers), not 60-80.
``EPContext`` nodes, which make some execution providers read a file named in an attribute, are
refused (the exporter never writes them). An ORT-format graph (``.ort``, a FlatBuffer with identifier ``ORTM``) names no files: its
tensors hold their data or an offset into a buffer the application passes, never a path.
"""

from __future__ import annotations

import mmap
import os

from portable_infer.errors import PackageError

# message -> {field number: message type of that (length-delimited) field}
MODEL, GRAPH, NODE, ATTR, TENSOR, SPARSE, FUNCTION, TRAINING, ENTRY = range(9)
SCHEMA = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},
    TRAINING: {1: GRAPH, 2: GRAPH},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    NODE: {5: ATTR},
    ATTR: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
    FUNCTION: {7: NODE, 11: ATTR},
    TENSOR: {13: ENTRY},
    ENTRY: {},
}
NODE_OP_TYPE = 4
ENTRY_KEY, ENTRY_VALUE = 1, 2
ORT_IDENTIFIER = b"ORTM"
ORT_SUFFIX = ".ort"
IN_MEMORY = 64 << 20  # graphs up to this size are read whole; larger ones (inline weights) are mapped


class _Malformed(Exception):
    pass


def graph_refs(f, name: str) -> set:
    """Every external-data ``location`` in the graph file open as ``f`` (binary), as written.

    Raises:
        PackageError: the file is not a readable ONNX (or, named ``*.ort``, ORT-format) graph,
            or it holds an EPContext node.
    """
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if name.lower().endswith(ORT_SUFFIX):  # ONNX Runtime picks the format by this suffix
        if head[4:8] != ORT_IDENTIFIER:
            raise PackageError(f"{name} is named .ort but is not an ORT-format graph; re-pack the bundle")
        return set()
    if size == 0:
        raise PackageError(f"{name} is empty, not an ONNX graph; re-copy or re-export the package")
    try:
        if size <= IN_MEMORY:
            f.seek(0)
            return _walk(f.read(), size, name)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:  # weights inside: not read
            return _walk(buf, size, name)
    except (_Malformed, IndexError) as exc:
        raise PackageError(f"{name} is not a readable ONNX graph ({exc or 'truncated'}); the package is "
                           f"corrupted: re-copy or re-export it") from None


def _varint(buf, pos: int, stop: int) -> tuple:
    value = shift = 0
    while True:
        if pos >= stop or shift > 63:
            raise _Malformed("bad varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _walk(buf, end: int, name: str) -> set:
    found: set = set()
    find = buf.find
    stack = [(MODEL, 0, end)]
    while stack:
        kind, pos, stop = stack.pop()
        fields = SCHEMA[kind]
        keys, values = [], []
        while pos < stop:
            key = buf[pos]  # one-byte varints (field numbers < 16) are the common case: inline
            pos += 1
            if key >= 0x80:
                key, pos = _varint(buf, pos - 1, stop)
            field, wire = key >> 3, key & 7
            if wire == 2:
                n = buf[pos] if pos < stop else 0x80
                pos += 1
                if n >= 0x80:
                    n, pos = _varint(buf, pos - 1, stop)
                end_ = pos + n
                if end_ > stop:
                    raise _Malformed(f"a field runs past its message at byte {pos}")
                if field in fields:
                    # A message whose bytes hold neither word cannot hold a location entry or an
                    # EPContext node (protobuf strings are stored as is): skip it unread.
                    if find(b"location", pos, end_) >= 0 or find(b"EPContext", pos, end_) >= 0:
                        stack.append((fields[field], pos, end_))
                elif kind == ENTRY and field in (ENTRY_KEY, ENTRY_VALUE):
                    (keys if field == ENTRY_KEY else values).append(bytes(buf[pos:end_]))
                elif kind == NODE and field == NODE_OP_TYPE and buf[pos:end_] == b"EPContext":
                    raise PackageError(f"{name} holds an EPContext node, which makes an execution provider read a "
                                       f"file the package does not check; re-export the package")
                pos = end_
            elif wire == 0:
                _, pos = _varint(buf, pos, stop)
            elif wire == 1 or wire == 5:
                pos += 8 if wire == 1 else 4
            else:  # groups (3, 4) and invalid wire types: no ONNX message uses them
                raise _Malformed(f"wire type {wire} at byte {pos}")
        if pos != stop:
            raise _Malformed("a field runs past its message")
        if b"location" in keys:
            found.update(_text(v) for v in values)
    return found


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("an external data location is not UTF-8") from None
