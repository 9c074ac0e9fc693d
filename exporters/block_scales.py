"""Per-block scales and offsets written as the source stores them (:class:`~exporters.quant.Factored`).

A GGUF K-quant block's scale is a 6- or 8-bit integer times its super-block's fp16 scale; the
other GGUF types store one fp16 per block. Written as float32 arrays they would take 32 bits per
block of 16 or 32 weights (1-2 bits per weight, a third of a Q4_K file); written as their
factors, a graph constant recomputes the exact fp32 products::

    per_block [nb, out] uint8|int8|fp16 --Cast f32--> --Reshape--> [nb/g, g, out] --+
    per_group [nb/g, out] fp16|f32      --Cast f32--> --Unsqueeze(1)--> [nb/g, 1, out] --Mul--> [nb, out]
                                                                         (--Cast--> activation dtype)

ONNX Runtime folds the constant once when the session starts (and still fuses DequantizeLinear +
MatMul into MatMulNBits), so the file holds the factors and the graph computes with the very
fp32 scale ``gguf.quants.dequantize`` uses.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .quant import Factored

_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def _compact(a: np.ndarray) -> np.ndarray:
    """float32 values that fp16 holds exactly (GGUF's own fp16 scales) as fp16."""
    if a.dtype == np.float32:
        half = a.astype(np.float16)
        if np.array_equal(half.astype(np.float32), a):
            return half
    return a


def emit_transposed(g, name: str, full: np.ndarray, parts: Factored | None, dtype) -> str:
    """The [out, nb] per-block array ``full`` as a graph value of shape [nb, out] in ``dtype``:
    an initializer, or the product of ``parts`` (when they are smaller) computed in the graph.

    Args:
        g: the GraphBuilder.
        name: initializer name prefix.
        full: the float32 values; ``parts.value()`` must equal them exactly.
        parts: their factors, or None.
        dtype: the activation dtype (np.float32 or np.float16).

    Returns:
        The name of the [nb, out] value.
    """
    dtype = np.dtype(dtype)
    if parts is None or parts.per_block.dtype.itemsize >= dtype.itemsize:
        return g.weight(name, full.T.astype(dtype))
    value = g.cast(g.weight(name + ".block", np.ascontiguousarray(parts.per_block.T)), TensorProto.FLOAT)
    if parts.per_group is not None:
        nb, out = parts.per_block.shape[1], parts.per_block.shape[0]
        group = g.cast(g.weight(name + ".group", np.ascontiguousarray(_compact(parts.per_group).T)),
                       TensorProto.FLOAT)
        value = g.mul(g.reshape(value, [nb // parts.group, parts.group, out]), g.unsqueeze(group, [1]))
        value = g.reshape(value, [nb, out])
    return value if dtype == np.float32 else g.cast(value, _ONNX[dtype])
