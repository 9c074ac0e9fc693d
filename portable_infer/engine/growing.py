"""The engine of ``growth: concat`` graphs: one forward step through ONNX Runtime, with IO binding.

Inputs go in through IO binding; ``present`` outputs are left on the provider's device (ONNX
Runtime allocates them) and handed to the :class:`~portable_infer.engine.kv_growing.GrowingCache`
as the next ``past``; only the logits come back to the host.
"""

from __future__ import annotations

import numpy as np

from portable_infer.package import manifest as mf
from portable_infer.errors import InvalidArgumentError, PortableInferError
from portable_infer.engine import memory
from portable_infer.engine.checks import check_call, check_capacity, checked_capacity
from portable_infer.engine.devices import device_of
from portable_infer.engine.kv_growing import GrowingCache


class GrowingEngine:
    """Runs the decoder graph: ids + mask + cache -> last-position logits; cache updated.

    Implements :class:`~portable_infer.engine.protocols.Engine`.
    """

    greedy_on_device = False  # no growing graph has a next_token output: the argmax runs on the host
    masks_on_device = False  # its logits come to the host: grammar masks are applied there
    samples_on_device = False  # and sampled rows are drawn there
    overlaps_host = False  # forward_on_device refuses: nothing runs meanwhile

    def __init__(self, session, variant: mf.GraphVariant, provider: str, ort, *, max_context: int):
        self.session = session
        self.variant = variant
        self.provider = provider
        self.ort = ort
        self.max_context = max_context
        self.device = device_of(provider)
        outputs = [o.name for o in session.get_outputs()]
        missing = [n for n in [mf.LOGITS, *[x for p in variant.kv.present for x in p]] if n not in outputs]
        if missing:
            raise PortableInferError(f"graph {variant.file} lacks outputs {missing[:3]} named in the manifest; "
                                     f"the package is inconsistent: re-export it")
        self._present = [x for p in variant.kv.present for x in p]
        self._shrink = memory.shrink_run_options(session, ort) if self.device == "cpu" else None  # large calls

    def new_cache(self, batch: int, capacity: int | None = None) -> GrowingCache:
        """An empty cache for ``batch`` rows of at most ``capacity`` tokens (default and limit:
        ``max_context``). It grows with the tokens fed; ``capacity`` only bounds it."""
        return GrowingCache.empty(self.variant.kv, batch, checked_capacity(capacity, self.max_context), self.ort)

    def trim(self, dropped_bytes: int) -> None:
        """A cache of ``dropped_bytes`` was dropped: its KV went back to the CPU arena, which keeps
        it. ONNX Runtime shrinks an arena only at the end of a run, so when it was at least
        TRIM_MIN_BYTES this runs one token with shrinkage (a few ms, once per long generation)."""
        if dropped_bytes < memory.TRIM_MIN_BYTES:
            return
        if self._shrink is not None:
            self._shrink_run()
        memory.release_heap()  # after the run: arena regions it freed, and KV rows the scheduler moved in numpy

    def _shrink_run(self) -> None:
        one = np.ones((1, 1), np.int64)
        b = self.session.io_binding()
        b.bind_cpu_input(mf.INPUT_IDS, one)
        b.bind_cpu_input(mf.ATTENTION_MASK, one)
        b.bind_cpu_input(mf.POSITION_IDS, np.zeros((1, 1), np.int64))
        for (kn, vn), (k, v) in zip(self.variant.kv.past, GrowingCache.empty(self.variant.kv, 1, 1, self.ort).values):
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

    def forward(self, ids: np.ndarray, mask: np.ndarray, cache: GrowingCache, *, greedy: bool = False,
                all_logits: bool = False) -> np.ndarray:
        """Run one step. ``ids`` [B, S] new tokens, ``mask`` [B, past + S] over everything.

        Returns logits [B, vocab] of the last position ([B, S, vocab] with ``all_logits``, for
        graphs whose manifest says ``logits: all``). ``greedy`` is refused: these graphs have no
        ``next_token`` output (``greedy_on_device`` is False).
        """
        check_call(self, greedy, all_logits)
        s = ids.shape[1]
        rows = cache.rows + np.asarray(mask[:, -s:], np.int64).sum(axis=1)
        check_capacity(rows, cache.capacity)
        if self.variant.attention == "gqa" and ids.shape[0] > 1 and s > 1 and cache.length:
            logits = self._forward_by_row(ids, mask, cache, all_logits)
        else:
            logits = self._run(ids, mask, cache, all_logits)
        cache.rows = rows
        return logits

    def _run(self, ids: np.ndarray, mask: np.ndarray, cache: GrowingCache, all_logits: bool) -> np.ndarray:
        s = ids.shape[1]
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
        self.session.run_with_iobinding(b, self._shrink if ids.size >= memory.SHRINK_MIN_TOKENS else None)
        out = b.get_outputs()
        presents = out[1:]
        cache.update([(presents[2 * i], presents[2 * i + 1]) for i in range(len(presents) // 2)], s)
        logits = out[0].numpy()
        return logits if all_logits else logits[:, -1, :]

    def forward_on_device(self, ids: np.ndarray, mask: np.ndarray, cache: GrowingCache, meanwhile=None):
        """Refused (``masks_on_device`` is False): this engine returns its logits to the host."""
        raise InvalidArgumentError(f"graph {self.variant.file} returns its logits to the host: call forward() "
                                   f"(picks on the device need a static-KV graph)", param="masks_on_device")

    def _forward_by_row(self, ids: np.ndarray, mask: np.ndarray, cache: GrowingCache, all_logits: bool) -> np.ndarray:
        """Several new tokens after a past, batch > 1: ONNX Runtime's GroupQueryAttention refuses
        that call shape, so each row runs on its own and the presents are stacked again."""
        def value(a):
            return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)

        past = cache.arrays()
        logits, rows = [], []
        for b in range(ids.shape[0]):
            values = [(value(k[b:b + 1]), value(v[b:b + 1])) for k, v in past]
            row = GrowingCache(cache.layout, 1, cache.capacity, values, cache.rows[b:b + 1], cache.length, self.ort)
            logits.append(self._run(ids[b:b + 1], mask[b:b + 1], row, all_logits))
            rows.append(row.arrays())
        stacked = [(value(np.concatenate([r[i][0] for r in rows])), value(np.concatenate([r[i][1] for r in rows])))
                   for i in range(len(past))]
        cache.update(stacked, ids.shape[1])
        return np.concatenate(logits)

