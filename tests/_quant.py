"""Block-quantized linear layers built as the fused graphs emit them (WeightStore), run through
ONNX Runtime: GGUF Q4_1 / Q4_0 makers and a one-layer runner, shared by the tests and
benchmarks/gpu_smoke.py (no pytest here)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from exporters.graph import GraphBuilder
from exporters.quant import BLOCK, Blocks
from exporters.lowering.linear import linear
from exporters.weights import WeightForm, WeightStore


class _Source:
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def get(self, name: str):
        return self.tensors[name]


def q4_1(w: np.ndarray) -> Blocks:
    """GGUF Q4_1 of a float matrix: per block d = (max - min) / 15, m = min, q in 0..15."""
    out, n = w.shape
    x = w.reshape(out, n // BLOCK, BLOCK)
    lo, hi = x.min(-1), x.max(-1)
    d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)  # GGUF stores d and m as fp16
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((x - m[..., None]) / d[..., None]), 0, 15).astype(np.uint8)
    return Blocks("q4_1", q.reshape(out, n), d, offset=m)


def q4_0(w: np.ndarray) -> Blocks:
    out, n = w.shape
    x = w.reshape(out, n // BLOCK, BLOCK)
    d = (np.abs(x).max(-1) / 8).astype(np.float32)
    q = np.clip(np.rint(x / d[..., None]) + 8, 0, 15).astype(np.uint8)
    return Blocks("q4_0", q.reshape(out, n), d, zero=np.full(d.shape, 8, np.uint8))


def run_linear(blocks: Blocks, x: np.ndarray, accuracy: int, provider: str = "CPUExecutionProvider",
               dtype=np.float32) -> tuple[np.ndarray, list]:
    g = GraphBuilder("linear", None)
    half = dtype == np.float16
    form = WeightForm("int4", "fp16" if half else "fp32", nbits_accuracy=accuracy)
    store = WeightStore(g, _Source({"w": blocks}), form)
    elem = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    g.input("x", elem, [1, "s", blocks.shape[1]])
    g.output(linear(store, "x", "w"), "y", elem, [1, "s", blocks.shape[0]])
    model = g.model("test")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=[provider])
    assert sess.get_providers()[0] == provider
    return sess.run(None, {"x": x.astype(dtype)})[0].astype(np.float32), [n.op_type for n in model.graph.node]


def linear_error(blocks: Blocks, x: np.ndarray, accuracy: int, provider: str = "CPUExecutionProvider",
                 dtype=np.float32) -> tuple[float, list]:
    """(max |y - x @ dequantized|ᵀ / max |x @ dequantized|ᵀ, the graph's op types) of one layer."""
    ref = x @ blocks.dequantize().T
    y, ops = run_linear(blocks, x, accuracy, provider, dtype)
    return float(np.abs(y - ref).max() / np.abs(ref).max()), ops
