"""One forward step through an ONNX Runtime session, with IO binding.

The engine knows token ids, not text. Inputs go in through IO binding; ``present`` outputs are
left on the provider's device (ORT allocates them) and handed to the KV cache as the next
``past``; only the logits of the last position come back to the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import host
from . import manifest as mf
from .cache import KVCache
from .errors import PortableInferError

logger = logging.getLogger(__name__)

# ORT device names by provider, for binding outputs where the provider computes them.
_OUTPUT_DEVICE = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


@dataclass(frozen=True)
class SessionConfig:
    """How ONNX Runtime sessions are made (frozen; passed down, not **kwargs)."""

    intra_op_threads: int = 0  # 0 = host.cpu_budget(): physical cores in the affinity mask, within the cgroup quota
    # MatMulNBits activation accuracy: 1 keeps float activations (exact GGUF imports),
    # 4 quantizes them to int8 (faster on CPUs with int8 dot products); None: the loader decides.
    accuracy_level: int | None = 1
    enable_mem_pattern: bool = True
    enable_cpu_mem_arena: bool = True
    log_severity: int = 3
    # ORT-format (.ort) graphs: memory-map the file and use the weights in it in place instead of
    # copying them to the heap (recent ONNX Runtime; older versions ignore the keys). No effect on .onnx.
    map_weights: bool = False

    def session_options(self, ort):
        so = ort.SessionOptions()
        # 0 = the real CPU budget (affinity, physical cores, cgroup quota), not the host's cores
        so.intra_op_num_threads = self.intra_op_threads or host.cpu_budget().threads
        so.enable_mem_pattern = self.enable_mem_pattern
        so.enable_cpu_mem_arena = self.enable_cpu_mem_arena
        so.log_severity_level = self.log_severity
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.accuracy_level or 1))
        if self.map_weights:
            so.add_session_config_entry("session.use_memory_mapped_ort_model", "1")
            so.add_session_config_entry("session.use_ort_model_bytes_for_initializers", "1")
        return so


class Engine:
    """Runs the decoder graph: ids + mask + cache -> last-position logits; cache updated."""

    def __init__(self, session, variant: mf.GraphVariant, provider: str, ort):
        self.session = session
        self.variant = variant
        self.provider = provider
        self.ort = ort
        self.device = _OUTPUT_DEVICE.get(provider, "cpu")
        outputs = [o.name for o in session.get_outputs()]
        missing = [n for n in [mf.LOGITS, *[x for p in variant.kv.present for x in p]] if n not in outputs]
        if missing:
            raise PortableInferError(f"graph {variant.file} lacks outputs {missing[:3]} named in the manifest; "
                                     f"the package is inconsistent: re-export it")
        self._present = [x for p in variant.kv.present for x in p]

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty cache for ``batch`` rows (it grows as needed: ``capacity`` is only a hint)."""
        return KVCache.empty(self.variant.kv, batch, self.ort)

    def forward(self, ids: np.ndarray, mask: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run one step. ``ids`` [B, S] new tokens, ``mask`` [B, past + S] over everything.

        Returns logits [B, vocab] of the last position ([B, S, vocab] with ``all_logits``).
        """
        s = ids.shape[1]
        if self.variant.attention == "gqa" and ids.shape[0] > 1 and s > 1 and cache.length:
            return self._forward_by_row(ids, mask, cache, all_logits)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -s:]
        b = self.session.io_binding()
        b.bind_cpu_input(mf.INPUT_IDS, np.ascontiguousarray(ids, dtype=np.int64))
        b.bind_cpu_input(mf.ATTENTION_MASK, np.ascontiguousarray(mask, dtype=np.int64))
        b.bind_cpu_input(mf.POSITION_IDS, np.ascontiguousarray(positions, dtype=np.int64))
        for (kn, vn), (k, v) in zip(self.variant.kv.past, cache.values):
            b.bind_ortvalue_input(kn, k)
            b.bind_ortvalue_input(vn, v)
        b.bind_output(mf.LOGITS, "cpu")
        for name in self._present:
            b.bind_output(name, self.device)
        self.session.run_with_iobinding(b)
        out = b.get_outputs()
        presents = out[1:]
        cache.update([(presents[2 * i], presents[2 * i + 1]) for i in range(len(presents) // 2)], s)
        logits = out[0].numpy()
        return logits if all_logits else logits[:, -1, :]

    def _forward_by_row(self, ids: np.ndarray, mask: np.ndarray, cache: KVCache, all_logits: bool) -> np.ndarray:
        """Several new tokens after a past, batch > 1: ONNX Runtime's GroupQueryAttention refuses
        that call shape, so each row runs on its own and the presents are stacked again."""
        def value(a):
            return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)

        past = [(k.numpy(), v.numpy()) for k, v in cache.values]
        logits, rows = [], []
        for b in range(ids.shape[0]):
            row = KVCache(cache.layout, 1, [(value(k[b:b + 1]), value(v[b:b + 1])) for k, v in past], cache.length)
            logits.append(self.forward(ids[b:b + 1], mask[b:b + 1], row, all_logits))
            rows.append([(k.numpy(), v.numpy()) for k, v in row.values])
        stacked = [(value(np.concatenate([r[i][0] for r in rows])), value(np.concatenate([r[i][1] for r in rows])))
                   for i in range(len(past))]
        cache.update(stacked, ids.shape[1])
        return np.concatenate(logits)
