"""Continuous batching: requests join and leave the running batch between decode steps.

::

    submit() ─> waiting (FIFO, bounded; full -> CapacityError)
                  │ a free slot and KV blocks for prompt + max_new_tokens (paged KV: for
                  │ the prompt; rows take blocks as they grow, newer ones preempted when
                  │ short and recomputed on their next turn: kv_demand.py)
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
from portable_infer.errors import InvalidArgumentError, PortableInferError
from portable_infer.serving import kv_budget, kv_demand
from portable_infer.serving.handle import RequestHandle, open_handle
from portable_infer.serving.prefix_cache import PrefixCache
from portable_infer.text.streaming import TextStream
from portable_infer.serving.request import Request
from portable_infer.serving.paged_batch import PagedPrefixes
from portable_infer.serving.slot_batch import SlotBatch
from portable_infer.decode.sampling import SamplingParams
from portable_infer.serving.scheduler_config import (  # noqa: F401 - re-exported: the scheduler's public data
    DEFAULT_KV_BUDGET_BYTES, SchedulerConfig, SchedulerObserver, SchedulerStats,
)
from portable_infer.serving.scheduler_meter import Meter, StepClock
from portable_infer.serving.scheduler_plan import Planner, StepPlan
from portable_infer.serving.scheduler_prefill import PrefillSteps
from portable_infer.serving.scheduler_queues import RequestQueues, emitter
from portable_infer.serving.scheduler_setup import (  # noqa: F401 - re-exported: engine_process, tests
    checked_request, kv_pool, row_limit, running_batch,
)
from portable_infer.text.tool_chat import submit_chat_with_tools, wants_tools

logger = logging.getLogger(__name__)
IDLE_TICK_S = 0.25  # an idle loop wakes this often to count its idle seconds


class Scheduler(PrefillSteps):
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
        budget = kv_budget.settle(config, model)
        self.config = config = kv_budget.settled(config, budget)
        self.meter = Meter(observer)  # counters: changed under the queues' lock
        self.clock = StepClock()  # where the step loop's time goes: loop thread only
        self.max_context = model.max_context
        self.pool = kv_pool(config, kv, engine.device)
        prefix_min = config.prefix_min_tokens
        if prefix_min is None:  # a paged pool's prefix blocks are taken by reference: free at any length
            prefix_min = 0 if engine.device == "cpu" or kv.growth == "paged" else config.prefill_chunk
        # loop thread only; shorter prompts than a grouped request reuses are not stored either. Paged
        # KV shares prefixes by block reference in its pool, not by host copies.
        if kv.growth == "paged":
            self.prefixes = PagedPrefixes(engine, enabled=config.prefix_cache_bytes > 0)
        else:
            self.prefixes = PrefixCache(self.pool.block_size, config.prefix_cache_bytes, prefix_min, bytes_per_token(kv))
        self.row_limit = row_limit(engine, config, self.pool, self.max_context)  # KV tokens a request may hold (slots)
        self.batch = running_batch(engine, config, self.prefixes, self.max_context, self.row_limit,  # loop thread
                                   self.pool)
        # how an automatic budget was sized and what the device holds after the warm-up, for the startup line
        self.budget_note = kv_budget.after_warm_up(budget).describe()
        self.on_demand = self.batch.blocks_on_demand  # KV blocks taken as rows grow, preempting when short
        self.planner = Planner(config.max_batch, config.prefill_chunk, self.max_context, prefix_min,  # defer_leave: see Planner
                               self.prefixes.enabled, defer_leave=kv.growth == "static" and engine.device != "cpu"
                               and not isinstance(self.batch, SlotBatch),
                               watermark=kv_demand.watermark(self.pool) if self.on_demand else 0)
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
        ids, blocks, seq = checked_request(self.model, self.pool, ids, params, truncate, self.row_limit,
                                           self.on_demand)
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
        """Stop the step loop; requests still queued or running end with an error, and the running
        batch lets its KV go (a paged pool's blocks: another scheduler may use the engine)."""
        with self.queues.lock:
            self.queues.closing = True
            self.queues.wake.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if self.queues.emitter is not None:  # what the last steps produced reaches the readers first
            self.queues.emitter.close(timeout)
        for r in self.queues.unfinished(self.batch.rows):
            self.queues.fail(r, PortableInferError("the scheduler was closed before this request finished"))
        if not self._thread.is_alive():  # the loop thread alone touches the batch while it runs
            self.batch.reset()

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
            if self.on_demand:
                with clock.timed("plan"):
                    self._make_room()
            with q.lock:
                with clock.timed("plan"):
                    plan = self.planner.plan(q.view(self.batch.rows), lambda r: self.prefixes.match(r.ids))
                    q.apply(plan)
                named = {r.id: r for r in q.prefilling}
            self._step(plan, named)

    def _step(self, plan: StepPlan, named: dict) -> None:
        """Run ``plan`` (``named``: its prefilling requests by id) through the running batch."""
        batch, clock = self.batch, self.clock
        with clock.timed("plan"):  # leaves, copies from cached prefixes
            self._leave_and_start(plan, named)
        step = plan.prefill
        if step is not None and plan.decode and batch.rows and batch.mixes_prefill:
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

    def _make_room(self) -> None:
        """The running rows' next KV blocks, newer requests preempted where they are short."""
        try:
            kv_demand.make_room(self.batch, self.queues)
        except Exception as exc:  # noqa: BLE001 - the blocks are in doubt: every row ends
            self._fail_batch("KV blocks for the next step failed", exc)

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

    def _fail_batch(self, what: str, exc: Exception) -> None:
        logger.exception("%s; failing the %d running requests", what, len(self.batch.rows))
        for r in self.batch.rows:
            self.queues.fail(r, exc)
        self.batch.reset()
