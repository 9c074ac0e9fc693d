"""Continuous batching: requests join and leave the running batch between decode steps.

::

    submit() ─> waiting (FIFO, bounded; full -> CapacityError)
                  │ a free slot and KV blocks for prompt + max_new_tokens
                  v
                prefilling: from a cached prompt prefix when one matches (prefix_cache.py);
                  │ short prompts together, long ones alone at most prefill_chunk tokens per step
                  │ first token sampled
                  v
                running batch (left-padded, one forward per step for every row)
                  │ stop id / max tokens / stop string / context / cancel
                  v
                row sliced out, slot and blocks given back

In three parts, along vLLM v1's seams: the planner (``scheduler_plan.py``) turns the queues and
budgets into a plain-data :class:`~portable_infer.serving.scheduler_plan.StepPlan` and calls no model;
the running batch (``running_batch.py``) owns the KV cache and mask and runs the forwards; this
loop asks for a plan, hands it to the batch, and turns what each row produced into text and
handle pieces. The queues, slots and blocks shared with ``submit`` and ``cancel`` (any thread)
are ``scheduler_queues.py``; the counters ``scheduler_meter.py``.

One background thread runs the steps (on GPUs a second one makes their text: ``scheduler_queues.emitter``). Each
step: finished rows leave, waiting prompts start from cached prefixes, one prefill forward (a
request whose prompt is done samples its first token and joins the batch), then one decode
forward for the batch and one token per row.
Padding is exact (positions are ``cumsum(mask) - 1``), so greedy outputs equal single-request
runs.

Requests are isolated: what fails for one row (its sampling — NaN logits —, its detokenizer)
ends that request with the error and leaves the others in its decode step or prefill group
running; a grouped prefill that fails is retried one request at a time, so only the request
that fails alone is failed. Only a failure of a shared decode forward ends every row.

Example::

    with Scheduler(portable_infer.load(), SchedulerConfig(max_batch=8)) as sched:
        handle = sched.submit("The capital of France is", max_new_tokens=16)
        print("".join(r.text for r in handle))
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

from portable_infer.engine.memory import bytes_per_token
from portable_infer.errors import ContextLengthError, InvalidArgumentError, PortableInferError
from portable_infer.decode.generate import check_prompt
from portable_infer.serving.handle import RequestHandle, open_handle
from portable_infer.serving.kvblocks import BlockPool
from portable_infer.serving.prefix_cache import PrefixCache
from portable_infer.text.prompts import token_ids
from portable_infer.text.streaming import TextStream
from portable_infer.serving.request import Request
from portable_infer.serving.paged_batch import PagedBatch
from portable_infer.serving.running_batch import RunningBatch
from portable_infer.serving.slot_batch import SlotBatch
from portable_infer.decode.sampling import SamplingParams
from portable_infer.serving.scheduler_config import (  # noqa: F401 - re-exported: the scheduler's public data
    DEFAULT_KV_BUDGET_BYTES, SchedulerConfig, SchedulerObserver, SchedulerStats,
)
from portable_infer.serving.scheduler_meter import Meter, StepClock
from portable_infer.serving.scheduler_plan import Planner, StepPlan
from portable_infer.serving.scheduler_queues import RequestQueues, emitter
from portable_infer.decode.sequence import Sequence
from portable_infer.text.tool_chat import submit_chat_with_tools, wants_tools

logger = logging.getLogger(__name__)
IDLE_TICK_S = 0.25  # an idle loop wakes this often to count its idle seconds


def kv_pool(config: SchedulerConfig, kv) -> BlockPool:
    """The KV budget of ``config`` (tokens, or bytes of the graph's ``kv`` layout) in blocks."""
    budget = config.kv_budget_tokens or (config.kv_budget_bytes or DEFAULT_KV_BUDGET_BYTES) // bytes_per_token(kv)
    return BlockPool(budget // config.block_size, config.block_size)


def slot_rows(engine, config: SchedulerConfig) -> bool:
    """The running batch is fixed slots (SlotBatch: a row that leaves frees its slot, nothing moves):
    static-KV graphs where ``config.slot_batch`` says so (None: off the CPU, where a free slot's
    compute is not free)."""
    slots = config.slot_batch if config.slot_batch is not None else engine.device != "cpu"
    return bool(slots) and engine.variant.kv.growth == "static"


def row_limit(engine, config: SchedulerConfig, pool: BlockPool) -> int | None:
    """KV tokens one request may hold where the batch is slots: the slots are ``max_batch`` equal
    rows of one buffer, and the KV budget bounds that buffer (None: a restacked batch's rows are
    as long as they need). A budget too small for a slot of two tokens is refused."""
    if not slot_rows(engine, config):
        return None
    limit = pool.total * pool.block_size // config.max_batch
    if limit < 2:
        raise InvalidArgumentError(
            f"the KV budget ({pool.total * pool.block_size} tokens) leaves each of max_batch={config.max_batch} "
            f"slots {limit} tokens; raise kv_budget_tokens (or kv_budget_bytes) or lower max_batch")
    return limit


def running_batch(engine, config: SchedulerConfig, prefixes, max_context: int, limit: int | None = None,
                  pool: BlockPool | None = None):
    """The running batch for ``engine``: on paged KV, rows by block tables over a pool of the KV
    budget (``pool``'s blocks), prefills riding in decode forwards (:class:`PagedBatch`); slots
    (:func:`slot_rows`; rows of at most ``limit`` tokens); else restacked at each join and leave.
    Restacked static KV off the CPU keeps finished rows, masked, until half the batch has
    finished or a request joins (the planner's ``defer_leave``): moving the rest copies their KV,
    each batch size captures a CUDA graph, and an idle row costs a GPU step next to nothing."""
    if engine.variant.kv.growth == "paged":
        if pool is not None:
            engine.reserve(pool.total, pool.block_size)
        return PagedBatch(engine, prefixes, max_context)
    if slot_rows(engine, config):
        batch = SlotBatch(engine, prefixes, max_context, config.max_batch, limit)
        if getattr(engine, "cuda_graph", False):  # before the first request, as vLLM does
            batch.warm_up()
        return batch
    return RunningBatch(engine, prefixes, max_context)


def checked_request(model, pool: BlockPool, ids: list, params: SamplingParams, truncate: bool,
                    limit: int | None = None) -> tuple:
    """``(ids, blocks, sequence)`` of a request that passes the checks at submission (any thread),
    else the typed error: the prompt (ids in the vocabulary, within the context, or cut with
    ``truncate``), its KV blocks within the whole budget, its sampling state (a bad schema or
    grammar, or a logit bias outside the vocabulary, fails here: a 400)."""
    codec = model.codec
    if not isinstance(params, SamplingParams):
        raise InvalidArgumentError(f"params must be a SamplingParams, got {type(params).__name__}")
    if params.stop:
        codec.require_tokenizer()  # stop strings are matched on text
    ids = check_prompt(token_ids(ids, codec.vocab_size), model.max_context, truncate)
    need = min(len(ids) + params.max_new_tokens, model.max_context)  # KV tokens it may hold
    blocks = pool.blocks_for(need)
    if blocks > pool.total:
        raise ContextLengthError(
            f"the request needs {blocks} KV blocks ({len(ids)} prompt + {params.max_new_tokens} new tokens) "
            f"but the whole budget is {pool.total}; lower max_new_tokens or raise kv_budget_tokens",
            param="max_new_tokens")
    if limit is not None and need > limit:
        raise ContextLengthError(
            f"the request needs {need} KV tokens ({len(ids)} prompt + {params.max_new_tokens} new) but a slot of "
            f"the running batch holds {limit}: the KV budget ({pool.total * pool.block_size} tokens) over "
            f"max_batch rows of one buffer; lower max_new_tokens, or raise kv_budget_tokens or lower max_batch",
            param="max_new_tokens")
    seq = Sequence(ids, params, eos_ids=codec.eos_ids, vocab_size=codec.vocab_size,
                   guide=model.guide if params.constraint is not None else None)
    return ids, blocks, seq


class Scheduler:
    """The continuous-batching engine over a loaded :class:`~portable_infer.model.Model`.

    Args:
        model: a loaded model (KV growing by concatenation or in fixed buffers, layout BHSD).
        config: :class:`SchedulerConfig`.
        observer: optional :class:`SchedulerObserver` (metrics).
    """

    def __init__(self, model, config: SchedulerConfig = SchedulerConfig(), *, observer=None):
        engine = model.engine
        kv = engine.variant.kv
        if (kv.growth, kv.layout) not in (("concat", "BHSD"), ("static", "BHSD"), ("paged", "blocks")):
            raise InvalidArgumentError(f"continuous batching needs a graph whose KV grows by concatenation, lives "
                                       f"in fixed buffers (BHSD layout) or in a pool of blocks; this one is "
                                       f"{kv.growth}/{kv.layout}: re-export the package")
        self.model = model
        self.codec = model.codec  # prompts in, text out
        self.config = config
        self.meter = Meter(observer)  # counters: changed under the queues' lock
        self.clock = StepClock()  # where the step loop's time goes: loop thread only
        self.max_context = model.max_context
        self.pool = kv_pool(config, kv)
        prefix_min = config.prefix_min_tokens
        if prefix_min is None:
            prefix_min = 0 if engine.device == "cpu" else config.prefill_chunk
        # loop thread only; shorter prompts than a grouped request reuses are not stored either. Paged
        # KV on a device keeps no host copies of prefixes (its caches cannot give them cheaply).
        host_prefixes = kv.growth != "paged" or engine.device == "cpu"
        self.prefixes = PrefixCache(config.block_size, config.prefix_cache_bytes if host_prefixes else 0, prefix_min,
                                    bytes_per_token(kv))
        self.row_limit = row_limit(engine, config, self.pool)  # KV tokens a request may hold (slots)
        self.batch = running_batch(engine, config, self.prefixes, self.max_context, self.row_limit,  # loop thread
                                   self.pool)
        self.planner = Planner(config.max_batch, config.prefill_chunk, self.max_context, prefix_min,  # defer_leave: see Planner
                               self.prefixes.enabled, defer_leave=kv.growth == "static" and engine.device != "cpu"
                               and not isinstance(self.batch, SlotBatch))
        self.queues = RequestQueues(self.planner, self.pool, self.meter, config.max_waiting)
        emit = config.emit_thread if config.emit_thread is not None else engine.device != "cpu"
        self.queues.emitter = emitter(self.queues) if emit else None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="portable-infer-scheduler", daemon=True)
        self._thread.start()

    # --- public API (any thread) ----------------------------------------------------------------
    def submit(self, prompt, *, truncate: bool = False, **sampling) -> RequestHandle:
        """Queue a prompt (text or token ids); returns its :class:`RequestHandle` at once.

        Raises:
            CapacityError: every slot is busy and the waiting queue is full (``retry_after``).
            ContextLengthError: the prompt does not fit the context, or the KV budget.
            InvalidArgumentError: bad sampling parameters.
        """
        return self.submit_ids(self.codec.as_ids(prompt), self.model.params(**sampling), truncate=truncate)

    def submit_chat(self, messages: list, *, tools=None, tool_choice=None, parallel_tool_calls=None,
                    tool_parser=None, truncate: bool = False, **sampling):
        """Like :meth:`submit` for chat messages rendered with the package's chat template; with ``tools``
        (see ``Model.chat``), a :class:`~portable_infer.text.tool_chat.ChatHandle` of ChatDelta pieces instead."""
        if wants_tools(tools, tool_choice, parallel_tool_calls, tool_parser):
            return submit_chat_with_tools(self, messages, tools, tool_choice, parallel_tool_calls, tool_parser,
                                          truncate=truncate, **sampling)
        return self.submit_ids(self.codec.chat_ids(messages), self.model.params(**sampling), truncate=truncate)

    def submit_ids(self, ids: list, params: SamplingParams, *, truncate: bool = False) -> RequestHandle:
        """Queue a prompt given as token ids with explicit :class:`SamplingParams`."""
        return self._queue(ids, params, truncate, None).handle

    def submit_to(self, writer, ids: list, params: SamplingParams, *, truncate: bool = False,
                  text: bool = True) -> Request:
        """:meth:`submit_ids` whose pieces go to ``writer`` (a HandleWriter's ``put``/``end``), no handle;
        returns the request (``queues.cancel(request)`` cancels it, ``queues.stop(request)`` ends it
        on a stop string found by the writer's side): the engine process's way. ``text=False``: the
        pieces carry token ids only (no detokenizing, no stop strings here; the reader's side makes the text)."""
        return self._queue(ids, params, truncate, writer, text)

    def _queue(self, ids: list, params: SamplingParams, truncate: bool, writer, text: bool = True) -> Request:
        ids, blocks, seq = checked_request(self.model, self.pool, ids, params, truncate, self.row_limit)
        stream = self.codec.text_stream(params) if text else TextStream(None)
        r = Request(f"req-{next(self._ids)}", ids, params, blocks, stream, seq=seq, submitted=time.perf_counter())
        if writer is None:
            r.handle, r.writer = open_handle(r.id, len(ids), self.queues.cancel, r)
        else:
            r.writer = writer
        with self.queues.lock:
            if self.queues.closing or not self._thread.is_alive():
                raise PortableInferError("the scheduler is closed; create a new one")
            self.queues.push(r)
        return r

    def stats(self) -> SchedulerStats:
        """A consistent snapshot of occupancy, KV blocks, counters and recent request timings."""
        q = self.queues
        with q.lock:
            running = sum(1 for r in self.batch.rows if r.state == "running")
            return SchedulerStats(
                running=running, prefilling=q.active - running, waiting=len(q.waiting),
                max_batch=self.config.max_batch, max_waiting=self.config.max_waiting,
                blocks_used=self.pool.used, blocks_total=self.pool.total, block_size=self.pool.block_size,
                kv_bytes=self.batch.nbytes(), tokens_per_s=self.meter.tokens_per_s(), recent=tuple(self.meter.recent),
                prefix_cache_hits=self.prefixes.hits, prefix_cache_tokens=self.prefixes.tokens_reused,
                prefix_cache_bytes=self.prefixes.nbytes, steps=self.clock.snapshot(), **self.meter.counters)

    def has_capacity(self) -> bool:
        """Whether a new request would be accepted now (running, or queued behind the batch)."""
        return self.queues.has_capacity(self._thread.is_alive())

    def add_observer(self, observer: SchedulerObserver) -> None:
        """Also call ``observer``'s hooks (e.g. the server's metrics)."""
        with self.queues.lock:
            self.meter.observers = [*self.meter.observers, observer]  # a new list: readers iterate the old one

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.queues.closing

    def close(self, timeout: float = 10.0) -> None:
        """Stop the step loop; requests still queued or running end with an error."""
        with self.queues.lock:
            self.queues.closing = True
            self.queues.wake.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if self.queues.emitter is not None:  # what the last steps produced reaches the readers first
            self.queues.emitter.close(timeout)
        for r in self.queues.unfinished(self.batch.rows):
            self.queues.fail(r, PortableInferError("the scheduler was closed before this request finished"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def engine(self):
        """The engine the running batch runs (settable: tests wrap it to record or pace forwards)."""
        return self.batch.engine

    @engine.setter
    def engine(self, engine) -> None:
        self.batch.engine = engine

    # --- the step loop (scheduler thread) -------------------------------------------------------
    def _loop(self) -> None:
        q, clock = self.queues, self.clock
        while True:
            with q.lock:
                while not (q.closing or q.prefilling or self.batch.rows):
                    with clock.timed("idle"):  # counted as it passes, not when work comes
                        q.wake.wait(IDLE_TICK_S)
                if q.closing:
                    return
                with clock.timed("plan"):
                    plan = self.planner.plan(q.view(self.batch.rows), lambda r: self.prefixes.match(r.prompt))
                    q.apply(plan)
                named = {r.id: r for r in q.prefilling}
            self._step(plan, named)

    def _step(self, plan: StepPlan, named: dict) -> None:
        """Run ``plan`` (``named``: its prefilling requests by id) through the running batch."""
        batch, clock = self.batch, self.clock
        with clock.timed("plan"):  # leaves, copies from cached prefixes
            self._leave_and_start(plan, named)
        step = plan.prefill
        if step is not None and plan.decode and batch.rows and isinstance(batch, PagedBatch):
            with clock.phase("decode", batch, decode_rows=len(batch.rows), mixed_steps=1):
                self._mixed(step, named)  # the prefill rides in the decode forward
            return
        if step is not None:
            with clock.phase("prefill", batch):
                self._prefill(step, named)
        if plan.decode and batch.rows:
            with clock.phase("decode", batch, decode_rows=len(batch.rows)):
                try:
                    results = batch.decode(self.queues.hand_over)  # overlapped steps hand over early
                except Exception as exc:  # noqa: BLE001
                    self._fail_batch("decode step failed", exc)
                else:
                    self.queues.hand_over(results)  # what was not handed over early

    def _leave_and_start(self, plan: StepPlan, named: dict) -> None:
        batch = self.batch
        batch.forget(plan.drop)
        if plan.leave:
            try:
                batch.leave(plan.leave)
            except Exception as exc:  # noqa: BLE001 - the batch's KV is in doubt: every row ends
                self._fail_batch("rows leaving the batch failed", exc)
        for s in plan.from_prefix:
            r = named[s.request]
            try:
                batch.start_from_prefix(r, s.tokens, s.capacity)
                r.prefilled, r.short_prefix = s.tokens, 0
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
                self._fail_prefill([r], exc)

    def _prefill(self, step, named: dict) -> None:
        rows = [named[s.request] for s in step.slices]
        if step.grouped:
            try:
                self._prefill_group(rows, step)
            except Exception as exc:  # noqa: BLE001
                self._fail_prefill(rows, exc)
        elif rows[0].state == "done":  # cancelled while it waited for its turn
            self._fail_prefill(rows, None)
        else:
            try:
                self._prefill_chunk(rows[0], step)
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
                self._fail_prefill(rows, exc)

    def _mixed(self, step, named: dict) -> None:
        """A paged batch's step: its rows' decode and ``step``'s prefill in one forward. A failure
        ends the running rows and the prefill's."""
        rows = [named[s.request] for s in step.slices]
        try:
            results, done = self.batch.mixed(rows, step)
        except Exception as exc:  # noqa: BLE001
            self._fail_prefill(rows, exc)
            self._fail_batch("mixed prefill and decode step failed", exc)
            return
        self.queues.hand_over(results)
        if done is None:  # a chunk with more to go
            rows[0].prefilled = step.slices[0].end
            with self.queues.lock:
                self.meter.count("prompt_tokens", step.tokens)
            return
        self._prefilled(rows, step, done)

    def _prefill_group(self, rows: list, step) -> None:
        """Several whole prompts in one forward; if it fails, each is prefilled alone later."""
        try:
            done = self.batch.prefill(rows, step)
        except Exception:  # noqa: BLE001 - maybe one request's doing: each is prefilled alone next
            logger.warning("prefill of %d requests together failed; prefilling them one at a time", len(rows),
                           exc_info=True)
            for r in rows:
                r.alone = True
            return
        self._prefilled(rows, step, done)

    def _prefill_chunk(self, r: Request, step) -> None:
        done = self.batch.prefill([r], step)
        r.prefilled = step.slices[0].end
        if done is None:
            with self.queues.lock:
                self.meter.count("prompt_tokens", step.tokens)
            return
        self._prefilled([r], step, done)

    def _prefilled(self, rows: list, step, done) -> None:
        """Prompts done: out of the prefilling queue, first tokens out, rows into the batch."""
        with self.queues.lock:
            self.queues.leave_prefilling(rows)
            for r in rows:
                r.prefilled = len(r.prompt)
            self.meter.count("prompt_tokens", step.tokens)
        self.queues.hand_over(done.results)
        self.batch.join(done)

    def _fail_prefill(self, rows: list, exc: Exception | None) -> None:
        """``rows`` leave the prefilling queue, failed with ``exc`` (None: they had ended)."""
        if exc is not None:
            logger.error("prefill of %s failed", ", ".join(r.id for r in rows), exc_info=exc)
            for r in rows:
                self.queues.fail(r, exc)
        with self.queues.lock:
            self.queues.leave_prefilling(rows)
        self.batch.forget([r.id for r in rows])

    def _fail_batch(self, what: str, exc: Exception) -> None:
        logger.exception("%s; failing the %d running requests", what, len(self.batch.rows))
        for r in self.batch.rows:
            self.queues.fail(r, exc)
        self.batch.reset()
