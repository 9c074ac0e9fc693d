"""Small ONNX graphs the runtime ships as package data (``portable_infer/engine/graphs``).

The runtime needs no ``onnx`` package, so these are built here and checked in;
``tests/test_kv_rows.py`` checks the shipped files are what this module builds. Regenerate with
``python -m exporters.runtime_graphs``.

``kv_rows.<dtype>.onnx``: rows of a KV buffer into (part of) another, on whatever device runs it::

    y = Slice(Pad(Gather(x, rows, axis=0), pads), 0, keep, axis=2)
        x [B, H, C, D] -> y [len(rows), H, min(C + pad, keep), D]

The static-KV scheduler runs it on the GPU: its output bound inside the destination buffer, so
rows that join or stay in a batch move device to device instead of through the host; or bound
to the host with ``keep`` = the tokens wanted, so the prefix cache fetches only those.

``kv_zeros.<dtype>.onnx``: a zero-filled KV buffer of any shape, where the session runs::

    y = ConstantOfShape(shape, value=0)     shape [4] int64 -> y [B, H, C, D]

The engines take their device KV buffers from it (``engine/kv_alloc.py``): its output comes from
the session's own memory arena, which grows by what is asked (``kSameAsRequested``), where
ONNX Runtime's Python-side arena for ``OrtValue``s grows in powers of two.

``masked_argmax.onnx``: greedy picks under grammar masks where the logits are (the static engine
runs it on the GPU: a batch's greedy rows bring back token ids, its sampling rows their logits
with the grammar mask applied already)::

    u       = Mod(Cast(bitmask, int64), 2^32)                        [B, W]  words as unsigned values
    bits    = Mod(Unsqueeze(u, 2), 2^(i+1)) >= 2^i,  i = 0..31       [B, W, 32]
    allowed = Slice(Reshape(bits, [B, W * 32]), 0, V, axis=1)        [B, V]  bit v % 32 of word v // 32
    masked  = Where(allowed, logits, -inf)                           [B, V]
    token   = ArgMax(masked, axis=1)                                 [B]     first index on ties
    fetched = Gather(masked, rows, axis=0)                           [n, V]  rows the host samples

Only ops the CUDA execution provider implements (it has no BitShift or BitwiseAnd): the bits come
out by integer Mod and a comparison. Nothing depends on the vocabulary size: ``V`` is read off
the logits, so one file serves every model.

``masked_rows.onnx``: the argmax under the grammar mask of a few rows only, their masks unpacked
on the host (the check mode's rows whose grammar refused the plain argmax: three kernels instead
of the eleven above, and no work on the other rows)::

    token = ArgMax(Where(allowed, Gather(logits, rows, axis=0), -inf), axis=1)
        logits [B, V], rows [n] int64, allowed [n, V] bool -> token [n]   first index on ties
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters import sample_graph

GRAPHS = Path(__file__).resolve().parents[1] / "portable_infer" / "engine" / "graphs"
KV_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
OPSET, IR_VERSION = 18, 8  # loadable by every ONNX Runtime the runtime accepts (>= 1.20)


def kv_rows_model(dtype: str) -> bytes:
    t = KV_DTYPES[dtype]
    nodes = [helper.make_node("Gather", ["x", "rows"], ["picked"], axis=0),
             helper.make_node("Pad", ["picked", "pads"], ["padded"], mode="constant"),
             helper.make_node("Slice", ["padded", "zero", "keep", "axis"], ["y"])]
    consts = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
              helper.make_tensor("axis", TensorProto.INT64, [1], [2])]
    graph = helper.make_graph(
        nodes, "kv_rows",
        [helper.make_tensor_value_info("x", t, ["batch", "heads", "capacity", "head_dim"]),
         helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"]),
         helper.make_tensor_value_info("pads", TensorProto.INT64, [8]),
         helper.make_tensor_value_info("keep", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", t, ["n", "heads", "out_capacity", "head_dim"])], consts)
    return _serialized(graph)


def kv_zeros_model(dtype: str) -> bytes:
    t = KV_DTYPES[dtype]
    zero = helper.make_tensor("zero", t, [1], np.zeros(1, helper.tensor_dtype_to_np_dtype(t)).tobytes(), raw=True)
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["y"], value=zero)]
    graph = helper.make_graph(
        nodes, "kv_zeros", [helper.make_tensor_value_info("shape", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", t, ["batch", "heads", "capacity", "head_dim"])])
    return _serialized(graph)


def masked_argmax_model() -> bytes:
    i64, bits = TensorProto.INT64, np.arange(32)
    consts = [numpy_helper.from_array(np.array([2**32], np.int64), "two_32"),
              numpy_helper.from_array(2 ** (bits + 1), "above"),  # int64 [32]
              numpy_helper.from_array(2 ** bits, "bit"),
              numpy_helper.from_array(np.array([2], np.int64), "axis_2"),
              numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
              numpy_helper.from_array(np.array([0], np.int64), "zero"),
              numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
              numpy_helper.from_array(np.array(-np.inf, np.float32), "minus_inf")]
    nodes = [helper.make_node("Cast", ["bitmask"], ["signed"], to=i64),
             helper.make_node("Mod", ["signed", "two_32"], ["words"]),
             helper.make_node("Unsqueeze", ["words", "axis_2"], ["column"]),
             helper.make_node("Mod", ["column", "above"], ["low"]),
             helper.make_node("GreaterOrEqual", ["low", "bit"], ["bits"]),
             helper.make_node("Reshape", ["bits", "flat"], ["padded"]),
             helper.make_node("Shape", ["logits"], ["vocab"], start=1, end=2),
             helper.make_node("Slice", ["padded", "zero", "vocab", "axis_1"], ["allowed"]),
             helper.make_node("Where", ["allowed", "logits", "minus_inf"], ["masked"]),
             helper.make_node("ArgMax", ["masked"], ["token"], axis=1, keepdims=0, select_last_index=0),
             helper.make_node("Gather", ["masked", "rows"], ["fetched"], axis=0)]
    graph = helper.make_graph(
        nodes, "masked_argmax",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "vocab"]),
         helper.make_tensor_value_info("bitmask", TensorProto.INT32, ["batch", "words"]),
         helper.make_tensor_value_info("rows", i64, ["n"])],
        [helper.make_tensor_value_info("token", i64, ["batch"]),
         helper.make_tensor_value_info("fetched", TensorProto.FLOAT, ["n", "vocab"])], consts)
    return _serialized(graph)


def masked_rows_model() -> bytes:
    consts = [numpy_helper.from_array(np.array(-np.inf, np.float32), "minus_inf")]
    nodes = [helper.make_node("Gather", ["logits", "rows"], ["picked"], axis=0),
             helper.make_node("Where", ["allowed", "picked", "minus_inf"], ["masked"]),
             helper.make_node("ArgMax", ["masked"], ["token"], axis=1, keepdims=0, select_last_index=0)]
    graph = helper.make_graph(
        nodes, "masked_rows",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "vocab"]),
         helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"]),
         helper.make_tensor_value_info("allowed", TensorProto.BOOL, ["n", "vocab"])],
        [helper.make_tensor_value_info("token", TensorProto.INT64, ["n"])], consts)
    return _serialized(graph)


def _serialized(graph) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="portable_infer")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def shipped() -> dict:
    """file name -> the bytes this module builds for it."""
    out = {f"kv_rows.{dtype}.onnx": kv_rows_model(dtype) for dtype in KV_DTYPES}
    out.update({f"kv_zeros.{dtype}.onnx": kv_zeros_model(dtype) for dtype in KV_DTYPES})
    out["masked_argmax.onnx"] = masked_argmax_model()
    out["masked_rows.onnx"] = masked_rows_model()
    out["sample.onnx"] = _serialized(sample_graph.sample_model_graph())
    out["rows.onnx"] = _serialized(sample_graph.gather_rows_graph())
    return out


def write() -> list:
    GRAPHS.mkdir(exist_ok=True)
    out = []
    for name, data in shipped().items():
        (GRAPHS / name).write_bytes(data)
        out.append(GRAPHS / name)
    return out


if __name__ == "__main__":
    for p in write():
        print(p)
