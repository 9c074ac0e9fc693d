"""Small ONNX graphs the runtime ships as package data (``portable_infer/graphs``).

The runtime needs no ``onnx`` package, so these are built here and checked in;
``tests/test_kv_rows.py`` checks the shipped files are what this module builds. Regenerate with
``python -m exporters.runtime_graphs``.

``kv_rows.<dtype>.onnx``: rows of a KV buffer into (part of) another, on whatever device runs it::

    y = Slice(Pad(Gather(x, rows, axis=0), pads), 0, keep, axis=2)
        x [B, H, C, D] -> y [len(rows), H, min(C + pad, keep), D]

The static-KV scheduler runs it on the GPU: its output bound inside the destination buffer, so
rows that join or stay in a batch move device to device instead of through the host; or bound
to the host with ``keep`` = the tokens wanted, so the prefix cache fetches only those.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="portable_infer")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def write() -> list:
    GRAPHS.mkdir(exist_ok=True)
    out = []
    for dtype in KV_DTYPES:
        path = GRAPHS / f"kv_rows.{dtype}.onnx"
        path.write_bytes(kv_rows_model(dtype))
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write():
        print(p)
