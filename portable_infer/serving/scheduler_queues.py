"""The scheduler's shared request state, under one lock (queues, slots, KV blocks), and what
reaches each request's reader (its pieces, its end).

``submit`` and ``cancel`` (any thread) and the step loop all change it::

    push ─> waiting ─ admit (Planner.admit: FIFO, slots, KV blocks) ─> prefilling ─> running
                                                                                  │
    deliver: a row's pick ─ text (Request.emit) ─ piece to its handle             │
    cancel / fail / finish ─ release: state "done", slot and blocks back, admit ─┘
                           ─ the request's stats recorded, its last piece (or error) handed over

Admission runs at once whenever a slot or blocks come back, so ``stats()`` right after a
``cancel()`` already shows the next request admitted. The loop reads a :class:`QueueView` of it
for the planner and applies the plan's bookkeeping (:meth:`RequestQueues.apply`) in the same
critical section, so what the planner saw is what the plan changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from portable_infer.errors import CapacityError, GenerationError, PortableInferError
from portable_infer.serving.drain import DrainThread
from portable_infer.serving.kv_demand import admission_blocks
from portable_infer.serving.scheduler_plan import Planner, QueueView, StepPlan
from portable_infer.text.streaming import Response

logger = logging.getLogger("portable_infer.serving.scheduler")

class RequestQueues:
    """Waiting and prefilling queues, slots and KV blocks of one scheduler (see the module doc).

    Args:
        planner: its admission rule.
        pool: the :class:`~portable_infer.serving.kvblocks.BlockPool` of the KV budget.
        meter: the scheduler's counters (changed under ``lock``).
        max_waiting: requests that may wait behind the batch.
    """

    def __init__(self, planner: Planner, pool, meter, max_waiting: int):
        self.planner = planner
        self.pool = pool
        self.meter = meter
        self.max_waiting = max_waiting
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.waiting: deque = deque()
        self.prefilling: deque = deque()
        self.active = 0  # admitted and not done (prefilling + running)
        self.closing = False
        self.emitter: DrainThread | None = None  # makes the text off the step loop (Scheduler sets it)

    # --- under the lock -------------------------------------------------------------------------
    def push(self, r) -> None:
        """Queue ``r`` and admit what fits (call with ``lock`` held).

        Raises:
            CapacityError: the waiting queue is full (``retry_after``).
        """
        self.waiting.append(r)
        self.admit()
        if len(self.waiting) > self.max_waiting:
            self.waiting.pop()
            self.meter.count("requests_rejected")
            retry = self.meter.retry_after(len(self.waiting), self.planner.max_batch)
            raise CapacityError(f"the server is at capacity ({self.active} running, {len(self.waiting)} "
                                f"waiting); retry later", retry_after=retry)
        self.wake.notify_all()

    def admit(self) -> None:
        if self.closing or not self.waiting:
            return
        for _ in self.planner.admit(self.waiting, self.active, self.pool.free):
            self._admit_head()

    def _admit_head(self) -> None:
        r = self.waiting.popleft()
        if not self.pool.try_reserve(r.blocks):  # the planner counted the same free blocks
            raise RuntimeError(f"admitted request {r.id} but its {r.blocks} KV blocks are not free")
        r.state, r.admitted = "prefilling", r.admitted or time.perf_counter()  # queue_s: to its first admission
        self.active += 1
        self.prefilling.append(r)

    def grow(self, r, blocks: int) -> None:
        """``r`` (running) holds ``blocks`` KV blocks more (they were counted free)."""
        if not self.pool.try_reserve(blocks):
            raise RuntimeError(f"request {r.id} grows by {blocks} KV blocks but {self.pool.free} are free")
        r.blocks += blocks

    def preempt(self, r) -> None:
        """``r`` (admitted) back to the head of the waiting queue, its slot and blocks given back
        (the caller drops its KV): see :mod:`portable_infer.serving.kv_demand`."""
        self.pool.release(r.blocks)
        if r.state == "prefilling":
            self.leave_prefilling([r])
        self.active -= 1
        r.preempted()
        r.blocks = admission_blocks(self.pool, r.prompt_len)
        self.waiting.appendleft(r)
        self.meter.count("requests_preempted")

    def release(self, r) -> bool:
        """Mark ``r`` done and give back its slot and blocks; False if it already was."""
        if r.state == "done":
            return False
        if r.state == "waiting":
            self.waiting.remove(r)
        else:
            self.active -= 1
            self.pool.release(r.blocks)
        r.state = "done"
        self.admit()
        self.wake.notify_all()
        return True

    def view(self, rows: list) -> QueueView:
        return QueueView(tuple(self.waiting), tuple(self.prefilling), tuple(rows), self.active, self.pool.free)

    def apply(self, plan: StepPlan) -> None:
        """The plan's bookkeeping: admissions, the ended requests out of the prefilling queue,
        the prefix-cache notes. Call with ``lock`` held, in the section that made the view."""
        for rid in plan.admit:
            if not self.waiting or self.waiting[0].id != rid:
                raise RuntimeError(f"the plan admits {rid}, not the head of the waiting queue")
            self._admit_head()
        if plan.drop:
            gone = set(plan.drop)
            self.prefilling = deque(r for r in self.prefilling if r.id not in gone)
        by_id = {r.id: r for r in self.prefilling}
        for rid in plan.checked:
            by_id[rid].prefix_checked = True
        for rid, n in plan.short_prefix:
            by_id[rid].short_prefix = n

    def leave_prefilling(self, rows) -> None:
        """``rows`` are no longer prefilling (their prompt is done, or they failed)."""
        gone = {id(r) for r in rows}
        if any(id(r) in gone for r in self.prefilling):
            self.prefilling = deque(r for r in self.prefilling if id(r) not in gone)

    # --- a request's end (any thread; takes the lock) -------------------------------------------
    def end(self, r, last, reason: str, counter: str) -> bool:
        """End ``r`` (release it, count it under ``counter``, record its stats with ``reason``)
        and hand ``last`` (its final piece, or an exception) to its reader. False, with nothing
        done, if it had ended already."""
        with self.lock:
            if r.ended:
                return False
            r.ended = True
            self.release(r)  # the step loop may have released it already (settle)
            self.meter.count(counter)
        s = r.stats(reason)
        with self.lock:
            self.meter.recent.append(s)
        self.meter.finished(s)
        r.writer.end(last, s)
        return True

    def has_capacity(self, running: bool) -> bool:
        """Whether a new request would be accepted now (a slot, or room in the waiting queue);
        ``running``: the step loop lives."""
        with self.lock:
            slot = not self.waiting and self.active < self.planner.max_batch
            return running and not self.closing and (slot or len(self.waiting) < self.max_waiting)

    def hand_over(self, results: list) -> None:
        """A forward's results from the step loop: :meth:`settle` now, :meth:`deliver` here or
        on the emitter. No results: nothing to do (an overlapped step handed its own over early)."""
        if not results:
            return
        self.settle(results)
        if self.emitter is None:
            self.deliver(results)
        else:
            self.emitter.put(results)

    def settle(self, results: list) -> None:
        """The step loop's part of a forward's results, before their text is made: a row whose
        pick ends it (a stop id, its length, the context) or that failed is released now, so the
        next plan drops it whether or not :meth:`deliver` ran yet; a first token makes a
        prefilling request running."""
        with self.lock:
            for res in results:
                r = res.request
                if res.error is not None or res.pick.finish_reason is not None:
                    self.release(r)
                elif r.state == "prefilling":
                    r.state = "running"

    def deliver(self, results: list) -> None:
        """What each row of a forward produced (:class:`~portable_infer.serving.running_batch.RowResult`):
        its text to its reader, the request ended where a stop rule says so, or ended with its
        own error (the other rows go on). A request that ended meanwhile (cancelled, a stop
        string of an earlier piece) gets nothing more. The step loop or the :func:`emitter`."""
        n = 0
        for res in results:
            r, error = res.request, res.error
            if r.ended:
                continue
            if error is None:
                try:
                    self._emit(r, res.pick)
                    n += 1
                    continue
                except Exception as exc:  # noqa: BLE001 - its detokenizer: this request's failure only
                    error = exc
            logger.warning("request %s failed: %s: %s", r.id, type(error).__name__, error,
                           exc_info=not isinstance(error, PortableInferError))
            self.fail(r, error)
        with self.lock:
            self.meter.step(n)

    def _emit(self, r, pick) -> None:
        first = r.first_token is None
        resp = r.emit(pick)
        if first:
            self.meter.observe("first_token", r.first_token - r.submitted)
        else:
            self.meter.observe("inter_token", r.gaps[-1])
        if resp.finish_reason is not None:  # if it was cancelled meanwhile, its handle already ended
            self.end(r, resp, resp.finish_reason, "requests_finished")
            return
        r.writer.put(resp)

    def stop(self, r) -> None:
        """End ``r`` on a stop string its reader's side found in the text (the engine process's
        API side makes the text): finished, reason "stop"."""
        self._end_here(r, "stop", "requests_finished")

    def cancel(self, r) -> None:
        self._end_here(r, "cancelled", "requests_cancelled")

    def _end_here(self, r, reason: str, counter: str) -> None:
        """End ``r`` from outside the step loop with an empty last piece."""
        self.end(r, Response("", None, reason, prompt_tokens=len(r.prompt), generation_tokens=r.emitted),
                 reason, counter)

    def fail(self, r, exc: Exception) -> None:
        if not isinstance(exc, PortableInferError):  # readers catch one hierarchy (the server's error events)
            typed = GenerationError(f"request {r.id} failed: {type(exc).__name__}: {exc}", reason="internal")
            typed.__cause__ = exc
            exc = typed
        self.end(r, exc, "error", "requests_failed")

    def unfinished(self, rows: list) -> list:
        """Every request whose reader has not had its end: waiting, prefilling, or among ``rows``."""
        with self.lock:
            return [r for r in (*self.waiting, *self.prefilling, *rows) if not r.ended]


def emitter(queues: RequestQueues) -> DrainThread:
    """:meth:`RequestQueues.deliver` on a thread of its own: the step loop hands each forward's
    results over and runs the next forward while their text is made (detokenizer, stop strings,
    the readers' pieces). ONNX Runtime releases the GIL while a forward runs, so on a GPU this
    host work hides behind the device's; a stop string then ends its request a step late (the
    extra token is dropped, as vLLM's detokenizer does). Results are delivered in order."""
    def deliver_all(steps: list) -> None:
        for results in steps:
            queues.deliver(results)

    return DrainThread(deliver_all, "portable-infer-emitter")
