"""One op family's subgraph built alone (``exporters/lowering/``) and run by ONNX Runtime on CPU:
a dict of arrays as the weight source, a small layout, a variant's spec (no pytest here).

Shared by tests/test_lowering_*.py, each of which compares its subgraph with a numpy reference.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from exporters.architectures.common import DecoderLayout
from exporters.graph import NP_TO_ONNX, GraphBuilder
from exporters.lowering.context import LoweringContext
from exporters.lowering.spec import variant_spec
from exporters.weights import WeightStore
from portable_infer.package.manifest import ModelDims

class DictSource:
    """The two verbs the exporter asks a source: ``get`` a tensor, ``has`` one."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def get(self, name: str):
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors


def layout(*, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, hidden: int = 64, inter: int = 96,
           vocab: int = 80, max_context: int = 64, rotary_dim: int | None = None, window: int | None = None,
           layer_types: tuple = ("full_attention",), names: dict | None = None, **kw) -> DecoderLayout:
    """A one-layer llama-like layout (rotary base 10000) with the given tensor ``names``."""
    dims = ModelDims("llama", "llama", len(layer_types), heads, kv_heads, head_dim, hidden, inter, vocab, max_context,
                     sliding_window=window, layer_types=tuple(layer_types))
    rd = head_dim if rotary_dim is None else rotary_dim
    inv = (1.0 / 10000 ** (np.arange(0, rd, 2, dtype=np.float32) / rd)).astype(np.float32)
    return DecoderLayout(dims=dims, names=names or {}, rotary_dim=rd, inv_freq={t: inv for t in layer_types},
                         attn_scale=head_dim ** -0.5, **kw)


def context(lay: DecoderLayout, tensors: dict, variant: str = "portable", precision: str = "fp32",
            **options) -> LoweringContext:
    """A fresh graph for ``variant``'s spec (``options``: variant_spec's keywords)."""
    spec = variant_spec(variant, lay, precision=precision, **options)
    g = GraphBuilder("lowering", None)
    return LoweringContext(g, WeightStore(g, DictSource(tensors), spec.weights), lay, spec)


def run(g: GraphBuilder, feeds: dict, outputs: list, dtype=np.float32) -> list:
    """Run graph ``g``: ``feeds`` become its inputs (those it has not declared), ``outputs`` (graph
    values of ``dtype``) its outputs, returned in that order as arrays."""
    declared = {v.name for v in g.inputs}
    for name, a in feeds.items():
        if name not in declared:
            g.input(name, NP_TO_ONNX[np.asarray(a).dtype], list(np.shape(a)))
    names = []
    for k, value in enumerate(outputs):
        name = value if value.startswith("present.") else f"out{k}"
        g.output(value, name, NP_TO_ONNX[np.dtype(dtype)], None)
        names.append(name)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    # ORT may fuse DequantizeLinear + MatMul into MatMulNBits: at accuracy 1, as the runtime sets it
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    sess = ort.InferenceSession(g.model("test").SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def op_types(g: GraphBuilder) -> list[str]:
    return [n.op_type for n in g.nodes]
