"""The engine for ``growth: static`` graphs: fixed KV buffers, and CUDA graphs for decode steps.

It implements the same :class:`~portable_infer.engine.protocols.Engine` as the growing engine
(``new_cache``, ``forward(ids, mask, cache)`` with the left-padded, growing mask of the decode
loop), with :class:`~portable_infer.engine.kv_static.StaticCache` for its caches. Inside,
each row keeps its tokens from index 0 of a preallocated buffer ``[B, KVH, capacity, D]`` that
is bound as both past and present, so a decode step (batch B, one token per row, mask of width
``capacity``) has the same shapes and addresses every time: it runs on an IO binding made once
per buffer set, its inputs written in place (on the CPU, no allocation per token). On CUDA that
step is captured once as a CUDA graph per (batch, capacity) and replayed: no kernel launches
from the host. Buffers belong to the engine (:mod:`~portable_infer.engine.static_buffers`: pooled
per shape, a graph replays on the memory it was captured with; views of some rows of a buffer,
bound by address, for the scheduler's slot batch). The continuous-batching scheduler moves rows between these
caches with the caches' own row operations. When capture is refused or fails, the engine logs
why and runs every step without a graph. ``forward_on_device`` leaves a step's logits in the
slot's buffer, where the companion graph (:mod:`~portable_infer.engine.masked_argmax`) picks
under the grammar masks and fetches only the rows the host needs.
"""

from __future__ import annotations

import logging

import numpy as np

from portable_infer.package import manifest as mf
from portable_infer.errors import InvalidArgumentError, PortableInferError
from portable_infer.engine import memory
from portable_infer.engine.checks import check_call, check_capacity
from portable_infer.engine.cuda_graphs import run_options as _run_options
from portable_infer.engine.devices import device_of
from portable_infer.engine.kv_alloc import KVBuffers
from portable_infer.engine.kv_static import StaticCache
from portable_infer.engine.device_logits import DeviceLogits
from portable_infer.engine.device_sample import DrawsOnDevice
from portable_infer.engine.masked_argmax import MaskedArgmax
from portable_infer.engine.rows import RowMover
from portable_infer.engine.static_buffers import StaticBuffers

logger = logging.getLogger(__name__)

class StaticEngine(StaticBuffers, DrawsOnDevice, KVBuffers):
    """Runs a static-KV graph; CUDA graphs for decode steps when the session allows them.

    Implements :class:`~portable_infer.engine.protocols.Engine`.
    """

    def __init__(self, session, variant: mf.GraphVariant, provider: str, ort, *, max_context: int,
                 vocab_size: int, cuda_graph: bool = False):
        if variant.kv.growth != "static":
            raise PortableInferError(f"variant {variant.name} grows its KV ({variant.kv.growth}); "
                                     f"use Engine, not StaticEngine")
        self.session, self.variant, self.provider, self.ort = session, variant, provider, ort
        self.device = device_of(provider)
        self.max_context, self.vocab = max_context, vocab_size
        self.cuda_graph = cuda_graph and self.device == "cuda"
        # A binding made once is only right when every node runs where the buffers are: ONNX
        # Runtime copies an input bound on another device when it is bound, not at each run. That
        # holds on the CPU, and in a session that accepted CUDA graphs (all nodes on CUDA).
        self._bind_once = self.device == "cpu" or self.cuda_graph
        self._init_buffers()
        self._plain = _run_options(ort, self.device, -1)  # for every step that does not replay a graph
        # A step whose host work runs while the device computes (forward_on_device's meanwhile):
        # the run returns before the device is done; the step then waits for its outputs.
        self.overlaps_host = self.device != "cpu"
        self._plain_async = _run_options(ort, self.device, -1, sync=False)
        self._shrink = memory.shrink_run_options(session, ort) if self.device == "cpu" else None  # large prefills
        # Graphs with a next_token output can decode greedily on the device (one id per row back).
        self.greedy_on_device = mf.NEXT_TOKEN in {o.name for o in session.get_outputs()}
        self._row_mover = False  # made on first use: row_mover()
        self._picker = None  # the masked-argmax companion session: masked_argmax()
        # Grammar-masked greedy picks where the logits live (forward_on_device), on devices only:
        # on the CPU numpy takes 0.9 ms for batch 16 x 49k tokens, the companion graph 16 ms.
        self.masks_on_device = False
        if self.device != "cpu":
            try:
                self.masked_argmax()
                self.masks_on_device = True
            except Exception as exc:  # noqa: BLE001 - the host path still works
                logger.warning("grammar masks are applied on the host (%s: %s)", type(exc).__name__, exc)
        self.start_device_draws()  # sampled rows drawn where the logits are (device_sample.py)
        self.batched = None  # attach_batched: the session for forwards of more than one token

    def attach_batched(self, session) -> None:
        """Run every forward of more than one token (decode steps of several rows, prefills) on
        ``session``, a graph with this one's inputs and outputs over the same KV buffers, and the
        single-row decode steps here (CPU only: the exact graph's float-activation MatMulNBits is
        fastest at one row and slowest above it, where its fp32 companion, ``static-dense`` folded
        at load, runs a plain GEMM: :mod:`~portable_infer.engine.dense_companion`)."""
        if self.device != "cpu":
            raise PortableInferError(f"a batched companion session runs on the CPU only, not {self.provider}")
        names = ({i.name for i in self.session.get_inputs()}, {o.name for o in self.session.get_outputs()})
        if ({i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}) != names:
            raise PortableInferError("the batched companion graph's inputs and outputs differ from the engine's graph")
        self.batched = session

    def row_mover(self):
        """What moves KV rows between this engine's buffers on their device (a
        :class:`~portable_infer.engine.rows.RowMover`), or None where numpy moves them: on the CPU, or
        where its graph cannot run on the device (logged once; the host path still works)."""
        if self._row_mover is False:
            self._row_mover = None
            if self.device != "cpu":
                try:
                    self._row_mover = RowMover(self.session, self.ort, self.variant.kv.dtype, self.provider)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("KV rows move through the host (%s: %s)", type(exc).__name__, exc)
        return self._row_mover

    def masked_argmax(self) -> MaskedArgmax:
        """The companion session that picks under grammar masks on this engine's device (made once)."""
        if self._picker is None:
            self._picker = MaskedArgmax(self.session, self.ort, self.provider)
        return self._picker

    def trim(self, dropped_bytes: int) -> None:
        """A cache that held ``dropped_bytes`` was dropped: its buffers (not in ONNX Runtime's arena,
        which large prefills already shrink) go back to the OS from the C heap when it was at
        least TRIM_MIN_BYTES (buffers of up to SPARE_BYTES are kept for the next cache)."""
        if dropped_bytes >= memory.TRIM_MIN_BYTES and self.device == "cpu":
            memory.release_heap()

    # --- one step ---------------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, mask: np.ndarray, cache: StaticCache, *, greedy: bool = False,
                all_logits: bool = False) -> np.ndarray:
        """``ids`` [B, S] new tokens, ``mask`` [B, past + S] (left padding, as for growing
        graphs). Returns the logits [B, vocab] of each row's last new token. ``greedy`` (graphs
        with ``greedy_on_device``): return each row's argmax token [B] instead, leaving the logits
        on the device. ``all_logits`` is refused: the graph computes the last position only
        (``logits: last``)."""
        check_call(self, greedy, all_logits)
        return self._forward(ids, mask, cache, "token" if greedy else "logits")

    def forward_on_device(self, ids: np.ndarray, mask: np.ndarray, cache: StaticCache,
                          meanwhile=None) -> DeviceLogits:
        """:meth:`forward`, the logits left on the engine's device: a
        :class:`~portable_infer.engine.device_logits.DeviceLogits` with the graph's own argmax of
        each row, that picks under grammar bitmasks there (``masks_on_device``; else the rows
        asked for come to the host) and fetches only the rows asked for. ``meanwhile()`` runs
        while the device computes a decode step (``overlaps_host``), else after the run."""
        logits, token = self._forward(ids, mask, cache, "device", meanwhile)
        return DeviceLogits(logits, token, self.masked_argmax, self.masks_on_device,
                            self.device_sampler if self.samples_on_device else None)

    def _forward(self, ids: np.ndarray, mask: np.ndarray, cache: StaticCache, want: str, meanwhile=None):
        """One forward; ``want``: "logits" [B, vocab] or "token" [B] on the host, or "device" (the
        logits OrtValue [B, 1, vocab] and the next_token OrtValue [B, 1] or None, where they were computed)."""
        B, S = ids.shape
        new = np.asarray(mask[:, -S:], dtype=np.int64)
        rows = cache.rows + new.sum(axis=1)
        check_capacity(rows, cache.capacity)
        prefill = not cache.rows.any()
        if prefill:  # prefill: real tokens right-aligned in the input -> row starts
            lens = new.sum(axis=1)
            ids_r = np.zeros((B, S), np.int64)
            mask_r = (np.arange(S)[None, :] < lens[:, None]).astype(np.int64)
            for b in range(B):
                ids_r[b, :lens[b]] = ids[b, S - lens[b]:]
        else:
            if S > 1 and B > 1:
                raise InvalidArgumentError(
                    "a static-KV graph takes several new tokens after a prefill one row at a time "
                    "(GroupQueryAttention's limit); feed batch 1, or one token per row")
            ids_r = np.asarray(ids, np.int64)
            mask_r = None  # a step on the slot's binding writes it into the slot; else below
            if S > 1 or not self._bind_once:  # several tokens (batch 1), or nodes off the buffers' device
                mask_r = (np.arange(cache.capacity)[None, :] < rows[:, None]).astype(np.int64)
        session = self.batched if self.batched is not None and B * S > 1 else self.session
        if mask_r is None:
            out = self._step(ids_r, rows, cache, want, meanwhile, session)
        else:
            out = self._run(ids_r, mask_r, cache, want, session)
            if meanwhile is not None:
                meanwhile()
        cache.rows = rows
        cache.length = mask.shape[1]
        cache.mark_written(np.maximum(rows, S) if prefill else rows)  # a prefill writes all S positions
        return out

    def _bind_cache(self, b, cache: StaticCache) -> None:
        """Past and present bound to the same memory: the cache's buffers, or a view's rows of them."""
        kv = self.variant.kv
        whole = cache.whole
        shape = [cache.batch, kv.num_kv_heads, cache.capacity, kv.head_dim]
        dtype = np.dtype(kv.dtype)
        offset = cache.start * kv.num_kv_heads * cache.capacity * kv.head_dim * dtype.itemsize
        for (kn, vn), (pk, pv), (k, v) in zip(kv.past, kv.present, cache.values):
            for past, present, x in ((kn, pk, k), (vn, pv, v)):
                if whole:
                    b.bind_ortvalue_input(past, x)
                    b.bind_ortvalue_output(present, x)
                else:  # rows [start, start + batch) of x: contiguous, bound by address
                    b.bind_input(past, x.device_name(), 0, dtype, shape, x.data_ptr() + offset)
                    b.bind_output(present, x.device_name(), 0, dtype, shape, x.data_ptr() + offset)

    def _run(self, ids: np.ndarray, mask: np.ndarray, cache: StaticCache, want: str, session=None):
        session = session or self.session
        b = session.io_binding()
        b.bind_cpu_input(mf.INPUT_IDS, ids)
        b.bind_cpu_input(mf.ATTENTION_MASK, mask)
        b.bind_cpu_input(mf.TOTAL_SEQUENCE_LENGTH, np.array(mask.shape[1], np.int32))
        # first: get_outputs() follows the binding order; the other output stays on the device
        greedy = want == "token"
        b.bind_output(mf.NEXT_TOKEN if greedy else mf.LOGITS, self.device if want == "device" else "cpu")
        if self.greedy_on_device:
            b.bind_output(mf.LOGITS if greedy else mf.NEXT_TOKEN, self.device)
        self._bind_cache(b, cache)
        big = self._shrink is not None and ids.size >= memory.SHRINK_MIN_TOKENS
        session.run_with_iobinding(b, self._shrink if big else self._plain)
        outputs = b.get_outputs()
        out = outputs[0]
        if want == "device":  # (logits, next_token or None), both where they were computed
            return out, outputs[1] if self.greedy_on_device else None
        out = out.numpy()
        return out[:, 0] if greedy else out[:, -1, :]

    def _bind_slot(self, session, slot, cache: StaticCache):
        """An IO binding on ``session`` of the slot's step inputs, KV buffers and outputs."""
        b = session.io_binding()
        b.bind_ortvalue_input(mf.INPUT_IDS, slot.ids)
        b.bind_ortvalue_input(mf.ATTENTION_MASK, slot.mask)
        b.bind_cpu_input(mf.TOTAL_SEQUENCE_LENGTH, np.array(cache.capacity, np.int32))
        self._bind_cache(b, cache)
        slot.bind_outputs(b)
        return b

    def _step(self, ids: np.ndarray, rows: np.ndarray, cache: StaticCache, want: str, meanwhile=None, session=None):
        """One token per row on the slot's own inputs, outputs and binding (made once): replayed
        as a CUDA graph where the cache has one, a plain run otherwise (sessions with nodes off the
        buffers' device bind afresh each step: :meth:`_run`). ``meanwhile()`` runs while the device
        computes where the engine ``overlaps_host``. ``session``: the batched companion's
        (:meth:`attach_batched`), which runs on a second binding of the same slot; default the engine's."""
        slot = cache.slot
        if slot.binding is None:  # a captured graph reads and writes these addresses
            slot.binding, slot.positions = self._bind_slot(self.session, slot, cache), np.arange(cache.capacity)
            slot.run_options = _run_options(self.ort, self.device, cache.graph_id) if cache.graph_id > 0 else None
            slot.async_options = (_run_options(self.ort, self.device, cache.graph_id, sync=False)
                                  if cache.graph_id > 0 else None)
            slot.stage_inputs(self.device == "cpu")
        binding = slot.binding
        if session is not None and session is not self.session:  # the batched companion (CPU): its own binding
            if slot.batched_binding is None:
                slot.batched_binding = self._bind_slot(session, slot, cache)
            binding = slot.batched_binding
        slot.host_ids[...] = ids
        np.less(slot.positions, rows[:, None], out=slot.host_mask, casting="unsafe")
        if self.device != "cpu":
            slot.ids.update_inplace(slot.host_ids)
            slot.mask.update_inplace(slot.host_mask)
        graph = self.cuda_graph and slot.run_options is not None
        overlap = meanwhile is not None and self.overlaps_host  # the run returns before the device is done
        plain = self._plain_async if overlap else self._plain
        if binding is not slot.binding:  # the batched companion (the CPU: no CUDA graph)
            session.run_with_iobinding(binding, plain)
        else:
            try:
                self.session.run_with_iobinding(binding, (slot.async_options if overlap else slot.run_options)
                                                if graph else plain)
            except Exception as exc:  # noqa: BLE001 - capture refused (an op without graph support, ...)
                if not graph:
                    raise
                logger.warning("CUDA graph capture failed (%s); decoding without CUDA graphs", exc)
                self.cuda_graph = False
                self.session.run_with_iobinding(binding, plain)
        if meanwhile is not None:
            try:
                meanwhile()
            finally:
                if overlap:  # the step's outputs, and the buffers its next inputs overwrite, are done
                    slot.binding.synchronize_outputs()
        if want == "device":
            return slot.logits, slot.token  # the next step overwrites them: picked before then
        out = slot.token.numpy()[:, 0] if want == "token" else slot.logits.numpy()[:, -1, :]
        # on the CPU numpy() is a view of the slot's memory, which the next step overwrites
        return out.copy() if self.device == "cpu" else out

