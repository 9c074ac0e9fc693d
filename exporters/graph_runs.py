"""Package graphs run for verification: raw ONNX Runtime calls (portable and fused graphs), the
runtime's StaticEngine (static KV) and PagedEngine (paged KV) behind the same verbs
(``empty_past``, ``run``), independent of the runtime's decode loop. ``decoder`` picks by the
manifest's KV growth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from portable_infer.engine import dense_companion
from portable_infer.errors import VerificationError
from portable_infer.package import manifest as mf
from portable_infer.package.variants import STATIC_DENSE

class OnnxDecoder:
    """Raw ONNX Runtime calls on a package graph (independent of the runtime's decode loop)."""

    PROVIDER = "CPUExecutionProvider"

    def __init__(self, path: Path, variant: mf.GraphVariant, threads: int = 2):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        # ORT fuses DequantizeLinear+MatMul into MatMulNBits; accuracy level 1 keeps float
        # activations (level 4 quantizes them to int8), so the check sees the weights alone.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        if variant.name == STATIC_DENSE:  # checked as the runtime runs it: folded into fp32 MatMuls
            dense_companion.folded(so)
        self.session = ort.InferenceSession(str(path), so, providers=[self.PROVIDER])
        self.v = variant
        self.kv_dtype = np.dtype(variant.kv.dtype)

    def empty_past(self, batch: int) -> list:
        shape = (batch, self.v.kv.num_kv_heads, 0, self.v.kv.head_dim)
        return [(np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype)) for _ in self.v.kv.past]

    def run(self, ids: np.ndarray, mask: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        s = ids.shape[1]
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -s:]
        feeds = {mf.INPUT_IDS: ids, mf.ATTENTION_MASK: mask, mf.POSITION_IDS: pos}
        for (kn, vn), (k, v) in zip(self.v.kv.past, past):
            feeds[kn], feeds[vn] = k, v
        out = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        res = dict(zip(names, out))
        return res[mf.LOGITS], [(res[k], res[v]) for k, v in self.v.kv.present]


class StaticDecoder(OnnxDecoder):
    """A ``growth: static`` graph behind OnnxDecoder's verbs: ``past`` is a fixed-buffer cache and
    the runtime's StaticEngine turns the left-padded, growing mask into the graph's right-aligned
    rows, so every check below runs on it unchanged."""

    CAPACITY = 768  # tokens per row: the longest check (the fixed texts: 4 x 160; prompt + 128 steps)

    def __init__(self, path: Path, variant: mf.GraphVariant, threads: int = 2, max_context: int = 2048,
                 vocab_size: int = 0):
        import onnxruntime as ort

        from portable_infer.engine.static import StaticEngine

        super().__init__(path, variant, threads)
        self.engine = StaticEngine(self.session, variant, "CPUExecutionProvider", ort,
                                   max_context=max_context, vocab_size=vocab_size)

    def empty_past(self, batch: int):
        return self.engine.new_cache(batch, capacity=min(self.CAPACITY, self.engine.max_context))

    def run(self, ids: np.ndarray, mask: np.ndarray, past) -> tuple[np.ndarray, object]:
        return self.engine.forward(ids, mask, past)[:, None, :], past


class PagedDecoder(StaticDecoder):
    """A ``growth: paged`` graph behind OnnxDecoder's verbs, through the runtime's PagedEngine: on
    CUDA (ONNX Runtime has PagedAttention there only), or on the CPU for a graph that names no
    provider (tests' standard-op twin). Without CUDA the export is refused, not left unverified."""

    def __init__(self, path: Path, variant: mf.GraphVariant, threads: int = 2, max_context: int = 2048,
                 vocab_size: int = 0):
        import onnxruntime as ort

        from portable_infer.engine.paged import PagedEngine

        if "*" not in variant.providers:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise VerificationError(
                    f"the {variant.name} variant runs ONNX Runtime's PagedAttention, which only the CUDA provider has, "
                    f"and this onnxruntime has none: export it where onnxruntime-gpu and a GPU are, or leave it out "
                    f"of --variants (or pass --no-verify)")
            self.PROVIDER = "CUDAExecutionProvider"
        OnnxDecoder.__init__(self, path, variant, threads)
        self.engine = PagedEngine(self.session, variant, self.PROVIDER, ort, max_context=max_context,
                                  vocab_size=vocab_size)


def decoder(path: Path, variant: mf.GraphVariant, manifest: mf.Manifest) -> OnnxDecoder:
    if variant.kv.growth == "paged":
        return PagedDecoder(path, variant, max_context=manifest.model.max_context, vocab_size=manifest.model.vocab_size)
    if variant.kv.growth == "static":
        return StaticDecoder(path, variant, max_context=manifest.model.max_context,
                             vocab_size=manifest.model.vocab_size)
    return OnnxDecoder(path, variant)
