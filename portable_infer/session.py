"""One forward step through an ONNX Runtime session, with IO binding.

The engine knows token ids, not text. Inputs go in through IO binding; ``present`` outputs are
left on the provider's device (ORT allocates them) and handed to the KV cache as the next
``past``; only the logits of the last position come back to the host.
"""

from __future__ import annotations

import ctypes
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

# A call that brings at least this many new tokens (batch x sequence: a prefill, a prefill
# chunk) ends by giving the CPU arena's free chunks back to the OS (ONNX Runtime's arena
# shrinkage): without it the arena keeps the peak of the largest call's activations for the
# life of the process. Decode steps (one token per row) leave the arena alone: shrinking every
# step would free and fault in the same memory again every token.
SHRINK_MIN_TOKENS = 64
# A growing cache's KV lives in that arena too (ONNX Runtime allocates the presents): when one of
# at least this many bytes is dropped, Engine.trim gives its memory back (see there).
TRIM_MIN_BYTES = 16 << 20
_SHRINK_KEY = "memory.enable_memory_arena_shrinkage"


def release_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc's ``malloc_trim``; a no-op where the
    C library has none). Large buffers freed after glibc raised its mmap threshold stay in the
    heap otherwise: a dropped 93 MB static KV cache kept the process 97 MB above its rest."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError, TypeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None  # resolved on first use


def shrink_run_options(session, ort):
    """RunOptions that shrink the CPU arena at the end of a run, or None when the session has no
    CPU arena (``low_memory``: nothing to shrink, and ONNX Runtime refuses the option then)."""
    try:
        arena = session.get_session_options().enable_cpu_mem_arena
    except Exception:  # noqa: BLE001 - a session stand-in (tests) without options: no shrinking
        return None
    if not arena:
        return None
    ro = ort.RunOptions()
    ro.add_run_config_entry(_SHRINK_KEY, "cpu:0")
    return ro


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
        self._shrink = shrink_run_options(session, ort) if self.device == "cpu" else None  # large calls

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty cache for ``batch`` rows (it grows as needed: ``capacity`` is only a hint)."""
        return KVCache.empty(self.variant.kv, batch, self.ort)

    def trim(self, dropped_bytes: int) -> None:
        """A cache of ``dropped_bytes`` was dropped: its KV went back to the CPU arena, which keeps
        it. ONNX Runtime shrinks an arena only at the end of a run, so when it was at least
        TRIM_MIN_BYTES this runs one token with shrinkage (a few ms, once per long generation)."""
        if dropped_bytes < TRIM_MIN_BYTES:
            return
        if self._shrink is not None:
            self._shrink_run()
        release_heap()  # after the run: arena regions it freed, and KV rows the scheduler moved in numpy

    def _shrink_run(self) -> None:
        one = np.ones((1, 1), np.int64)
        b = self.session.io_binding()
        b.bind_cpu_input(mf.INPUT_IDS, one)
        b.bind_cpu_input(mf.ATTENTION_MASK, one)
        b.bind_cpu_input(mf.POSITION_IDS, np.zeros((1, 1), np.int64))
        for (kn, vn), (k, v) in zip(self.variant.kv.past, KVCache.empty(self.variant.kv, 1, self.ort).values):
            b.bind_ortvalue_input(kn, k)
            b.bind_ortvalue_input(vn, v)
        self._bind_trim_outputs(b)
        self.session.run_with_iobinding(b, self._shrink)

    def _bind_trim_outputs(self, b) -> None:
        """The trim run's outputs in buffers of their own: outputs that ONNX Runtime allocates
        live in the arena at the end of the run and would pin the region they land in."""
        logits = next(o for o in self.session.get_outputs() if o.name == mf.LOGITS)
        kv, vocab = self.variant.kv, logits.shape[-1]
        if not isinstance(vocab, int):
            for name in (mf.LOGITS, *self._present):
                b.bind_output(name, "cpu")
            return
        new = self.ort.OrtValue.ortvalue_from_shape_and_type
        dtype = np.float16 if "float16" in logits.type else np.float32
        b.bind_ortvalue_output(mf.LOGITS, new([1, 1, vocab], dtype, "cpu", 0))
        for name in self._present:
            b.bind_ortvalue_output(name, new([1, kv.num_kv_heads, 1, kv.head_dim], np.dtype(kv.dtype), "cpu", 0))

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
        self.session.run_with_iobinding(b, self._shrink if ids.size >= SHRINK_MIN_TOKENS else None)
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
