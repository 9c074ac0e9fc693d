"""Where a static-KV engine's caches live: fixed KV buffers with the decode step's inputs and
outputs, pooled per (batch, capacity) so that a CUDA graph captured on them replays for the next
cache of that shape; private buffers for the scheduler's slot batch, and views of some of their rows.

:class:`StaticBuffers` is the buffer half of :class:`~portable_infer.engine.static.StaticEngine`
(which runs the steps on them). Caches alive at the same time get buffers and graphs of their own,
up to GRAPHS_PER_SHAPE per shape and MAX_GRAPHS in all, then plain runs. Without CUDA graphs (CPU,
or capture refused) capacities are rounded to PLAIN_CAPACITY_STEP only, and a dead cache's buffers
wait, up to SPARE_BYTES in all, for the next cache of the same shape (the restacking scheduler makes
one at every join and leave: fresh memory would be faulted in each time).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

from portable_infer.package import manifest as mf
from portable_infer.errors import InvalidArgumentError
from portable_infer.engine import memory
from portable_infer.engine.checks import checked_capacity
from portable_infer.engine.cuda_graphs import new_graph_id
from portable_infer.engine.kv_static import StaticCache

CAPACITY_STEP = 256  # buffer rows are rounded up to this, so graphs are reused across requests
PLAIN_CAPACITY_STEP = 32  # without CUDA graphs: less rounding, less memory (spares still match)
GRAPHS_PER_SHAPE = 4  # caches of one shape alive at once that get a CUDA graph; more run without
MAX_GRAPHS = 16  # pooled buffers (and captured graphs) kept in all; later shapes run without graphs
SPARE_BYTES = 64 << 20  # without graphs: buffers of dead caches kept for the next cache of their shape




@dataclass
class Slot:
    """Engine-owned buffers for one (batch, capacity): the KV, the decode step's inputs and
    outputs, the binding made once over them, and the CUDA graph captured on them (if any)."""

    values: list
    ids: object  # [B, 1] int64 (graph input)
    mask: object  # [B, capacity] int64
    logits: object  # [B, 1, vocab] float32 (graph output)
    token: object  # [B, 1] int64 (graph output next_token; None when the graph lacks it)
    graph_id: int  # -1: no graph
    busy: bool = False
    binding: object = None  # the decode steps' IO binding (same addresses every step)
    batched_binding: object = None  # the same buffers bound on the engine's batched session (CPU)
    run_options: object = None  # its CUDA graph's run options (None: no graph)
    async_options: object = None  # the same, returning before the device is done
    written: np.ndarray = None  # CPU: positions ever written per row (pages committed); None: all
    positions: np.ndarray = None  # arange(capacity): the decode mask is positions < row lengths
    host_ids: np.ndarray = None  # the step's inputs on the host (views of ids/mask on the CPU)
    host_mask: np.ndarray = None

    def bind_outputs(self, b) -> None:
        """Bind the decode step's outputs (those the graph has) to this slot's buffers."""
        b.bind_ortvalue_output(mf.LOGITS, self.logits)
        if self.token is not None:
            b.bind_ortvalue_output(mf.NEXT_TOKEN, self.token)

    def stage_inputs(self, on_cpu: bool) -> None:
        """The host side of the step's inputs, made once: the buffers themselves on the CPU
        (numpy() is a view there), staging arrays copied over on other devices."""
        self.host_ids = self.ids.numpy() if on_cpu else np.empty(self.ids.shape(), np.int64)
        self.host_mask = self.mask.numpy() if on_cpu else np.empty(self.mask.shape(), np.int64)


class StaticBuffers:
    """The caches of a static-KV engine (a mixin of StaticEngine: it reads the engine's
    ``variant``, ``ort``, ``device``, ``cuda_graph``, ``max_context``, ``vocab`` and
    ``greedy_on_device``, and makes KV buffers with its ``kv_buffer``, engine.kv_alloc)."""

    def _init_buffers(self) -> None:
        self._slots: dict[tuple, list] = {}  # (batch, capacity) -> [Slot]
        self._spare: dict[tuple, list] = {}  # without graphs: (batch, capacity) -> free buffers
        self._spare_bytes = 0
        self._spare_lock = threading.Lock()  # finalizers run on whichever thread drops a cache
        self._graphs = 0

    def _new_graph_id(self) -> int:
        """An id for a new CUDA graph, counted against this engine's MAX_GRAPHS. ONNX Runtime keeps
        captured graphs per session by id, and more than one engine may run over one session (the
        tuner's timing engines, then the model's): an id another engine captured would replay
        that engine's graph, on its buffers. So ids are unique in the process, not per engine."""
        self._graphs += 1
        return new_graph_id()

    def _rounded(self, capacity) -> int:
        """``capacity`` checked and rounded up to the step (256 under CUDA graphs), within the context."""
        want = checked_capacity(capacity, self.max_context)
        step = CAPACITY_STEP if self.cuda_graph else PLAIN_CAPACITY_STEP
        return min(self.max_context, -(-want // step) * step)

    def new_cache(self, batch: int, capacity: int | None = None) -> StaticCache:
        """Buffers for ``batch`` rows of ``capacity`` tokens (rounded up; default: the context)."""
        cap = self._rounded(capacity)
        slot, done = self._graph_slot(batch, cap) if self.cuda_graph else self._spare_slot(batch, cap)
        cache = StaticCache(self.variant.kv, batch, cap, slot.values, np.zeros(batch, np.int64),
                            graph_id=slot.graph_id, slot=slot, engine=self)
        weakref.finalize(cache, *done)
        return cache

    def buffer(self, batch: int, capacity: int, most: int | None = None) -> StaticCache:
        """KV buffers of ``batch`` rows and ``capacity`` tokens (rounded up, to ``most`` at most)
        that only views (:meth:`view`) run on: the scheduler's slot batch. Not pooled (freed with
        the cache); no step inputs or outputs of its own."""
        cap = self._rounded(capacity)
        if most is not None:
            if capacity > most:
                raise InvalidArgumentError(f"a buffer of {capacity} tokens a row is over its limit of {most}")
            cap = min(cap, most)
        slot = self._allocate(batch, cap, graph_id=-1, io=False)
        return StaticCache(self.variant.kv, batch, cap, slot.values, np.ones(batch, np.int64), slot=slot, engine=self)

    def view(self, cache: StaticCache, start: int, count: int, *, decode: bool = False) -> StaticCache:
        """Rows ``[start, start + count)`` of ``cache``'s buffers as a cache of their own: a
        forward on it reads and writes those rows only (bound by address). ``decode``: it gets
        the step's inputs and outputs, a binding made once and, under CUDA graphs, a graph of its
        own (the caller keeps one view per batch size it decodes: each captures once)."""
        if not (0 <= start and count >= 1 and start + count <= cache.batch):
            raise InvalidArgumentError(f"rows [{start}, {start + count}) are not rows of a {cache.batch}-row cache")
        parent = cache.slot
        written = None if parent.written is None else parent.written[cache.start + start:cache.start + start + count]
        if decode:
            graph_id = -1
            if self.cuda_graph:
                graph_id = self._new_graph_id()
            slot = self._allocate(count, cache.capacity, graph_id, values=parent.values)
            slot.written = written
        else:
            slot = Slot(parent.values, None, None, None, None, -1, written=written)
        return StaticCache(self.variant.kv, count, cache.capacity, parent.values, np.zeros(count, np.int64),
                           graph_id=slot.graph_id, slot=slot, engine=self, start=cache.start + start,
                           owner=cache.owner or cache)

    def _graph_slot(self, batch: int, cap: int) -> tuple:
        """A pooled slot (its graph replays on its buffers), or private buffers when the pool is
        full; and what to call when the cache dies."""
        pool = self._slots.setdefault((batch, cap), [])
        slot = next((s for s in pool if not s.busy), None)
        if slot is None and len(pool) < GRAPHS_PER_SHAPE and self._graphs < MAX_GRAPHS:
            slot = self._allocate(batch, cap, graph_id=self._new_graph_id())
            pool.append(slot)
        elif slot is None:  # pooled buffers all in use (or the pool is full): private ones, no graph
            slot = self._allocate(batch, cap, graph_id=-1)
        slot.busy = True
        return slot, (_release, slot)

    def _spare_slot(self, batch: int, cap: int) -> tuple:
        """No graphs: a dead cache's buffers of the shape, or new ones; kept as a spare after."""
        with self._spare_lock:
            spare = self._spare.get((batch, cap))
            slot = spare.pop() if spare else None
            if slot is not None:
                self._spare_bytes -= self._slot_bytes(slot)
        slot = slot or self._allocate(batch, cap, graph_id=-1)
        return slot, (self._keep_spare, (batch, cap), slot)

    def _slot_bytes(self, slot: Slot) -> int:
        batch, _, cap, _ = slot.values[0][0].shape()
        return batch * cap * memory.bytes_per_token(self.variant.kv)

    def _keep_spare(self, key: tuple, slot: Slot) -> None:
        """A dead cache's buffers (no graph on them): kept for the next cache of their shape."""
        size = self._slot_bytes(slot)
        with self._spare_lock:
            if self._spare_bytes + size <= SPARE_BYTES:
                self._spare.setdefault(key, []).append(slot)
                self._spare_bytes += size

    def _allocate(self, batch: int, cap: int, graph_id: int, *, io: bool = True, values=None) -> Slot:
        """A slot of ``batch`` rows: new KV buffers (or ``values``: a view's), and the decode
        step's inputs and outputs unless ``io`` is False."""
        kv = self.variant.kv
        shape = [batch, kv.num_kv_heads, cap, kv.head_dim]
        new = lambda shp, dt: self.ort.OrtValue.ortvalue_from_shape_and_type(shp, dt, self.device, 0)  # noqa: E731
        if values is None:  # engine.kv_alloc: off the CPU from a session arena, not the Python-side one
            values = [(self.kv_buffer(shape, kv.dtype), self.kv_buffer(shape, kv.dtype)) for _ in kv.past]
        if not io:
            return Slot(values, None, None, None, None, graph_id,
                         written=np.zeros(batch, np.int64) if self.device == "cpu" else None)
        token = new([batch, 1], np.int64) if self.greedy_on_device else None
        return Slot(values, new([batch, 1], np.int64), new([batch, cap], np.int64),
                     new([batch, 1, self.vocab], np.float32), token, graph_id,
                     written=np.zeros(batch, np.int64) if self.device == "cpu" else None)


def _release(slot: Slot) -> None:
    slot.busy = False
