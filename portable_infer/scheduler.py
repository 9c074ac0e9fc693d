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

One background thread runs the steps; ``submit`` and ``RequestHandle.cancel`` may be called from
any thread. Each step: drop finished rows, run one prefill chunk (a request whose prompt is done
samples its first token and merges into the batch), then one decode forward for the batch and
one token per row. Padding is exact (positions are ``cumsum(mask) - 1``), so greedy outputs
equal single-request runs.

Requests are isolated: what fails for one row (its sampling — NaN logits —, its detokenizer)
ends that request with the error and leaves the others in its decode step or prefill group
running; a grouped prefill whose forward fails is retried one request at a time, so only the
request that fails alone is failed. Only a failure of a shared decode forward ends every row.

Where things are: this module keeps the queues, admission and the loop; the prefill half is
``scheduler_prefill.py``, the decode half ``scheduler_decode.py`` (both mixed into
:class:`Scheduler`), the rule for each token ``request.py``, the counters ``scheduler_meter.py``.

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
from collections import deque

from . import kvblocks
from .errors import CapacityError, ContextLengthError, GenerationError, InvalidArgumentError, PortableInferError
from .generate import check_prompt
from .handle import RequestHandle
from .prefix_cache import PrefixCache
from .prompts import token_ids
from .request import Request
from .sampling import SamplingParams
from .scheduler_config import DEFAULT_KV_BUDGET_BYTES, SchedulerConfig, SchedulerObserver, SchedulerStats
from .scheduler_decode import DecodeSteps
from .scheduler_meter import Meter
from .scheduler_prefill import PrefillSteps
from .sequence import Sequence
from .streaming import Response, TextStream

logger = logging.getLogger(__name__)



class Scheduler(PrefillSteps, DecodeSteps):
    """The continuous-batching engine over a loaded :class:`~portable_infer.model.Model`.

    Args:
        model: a loaded model (KV growing by concatenation or in fixed buffers, layout BHSD).
        config: :class:`SchedulerConfig`.
        observer: optional :class:`SchedulerObserver` (metrics).
    """

    def __init__(self, model, config: SchedulerConfig = SchedulerConfig(), *, observer=None):
        kv = model.engine.variant.kv
        if kv.growth not in ("concat", "static") or kv.layout != "BHSD":
            raise InvalidArgumentError(f"continuous batching needs a graph whose KV grows by concatenation or "
                                       f"lives in fixed buffers, in BHSD layout; this one is {kv.growth}/"
                                       f"{kv.layout}: re-export the package")
        self.model = model
        self.engine = model.engine
        self.config = config
        self.meter = Meter(observer)  # counters: changed under self._lock
        self.max_context = model.max_context
        self._eos = frozenset(model.manifest.tokenizer.eos_token_ids)
        self._token_bytes = kvblocks.bytes_per_token(kv)
        budget = config.kv_budget_tokens or (config.kv_budget_bytes or DEFAULT_KV_BUDGET_BYTES) // self._token_bytes
        self.pool = kvblocks.BlockPool(budget // config.block_size, config.block_size)
        self.prefixes = PrefixCache(config.block_size, config.prefix_cache_bytes)  # loop thread only
        # Rows that finish stay in a static (fixed-buffer) batch off the CPU, masked, until half
        # the batch has finished or a request joins: moving the KV of the rest into a smaller
        # batch is a host round trip there, and each new batch size captures a new CUDA graph;
        # an idle row costs a GPU step next to nothing. On the CPU a row's compute is not free.
        self._defer_leave = kv.growth == "static" and self.engine.device != "cpu"
        self._prefix_min = config.prefix_min_tokens
        if self._prefix_min is None:
            self._prefix_min = 0 if self.engine.device == "cpu" else config.prefill_chunk
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque = deque()
        self._prefilling: deque = deque()
        self._active = 0  # admitted and not done (prefilling + running)
        self._closing = False
        # the batch: touched by the loop thread only
        self._rows: list = []
        self._cache = None
        self._mask = None
        self._pending = None
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
        return self.submit_ids(self.model._ids(prompt), self.model.params(**sampling), truncate=truncate)

    def submit_chat(self, messages: list, *, truncate: bool = False, **sampling) -> RequestHandle:
        """Like :meth:`submit` for chat messages rendered with the package's chat template."""
        return self.submit_ids(self.model._chat_ids(messages), self.model.params(**sampling), truncate=truncate)

    def submit_ids(self, ids: list, params: SamplingParams, *, truncate: bool = False) -> RequestHandle:
        """Queue a prompt given as token ids with explicit :class:`SamplingParams`."""
        if not isinstance(params, SamplingParams):
            raise InvalidArgumentError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.stop:
            self.model._need_tokenizer()  # stop strings are matched on text
        ids = check_prompt(token_ids(ids, self.model.manifest.model.vocab_size), self.max_context, truncate)
        blocks = self.pool.blocks_for(min(len(ids) + params.max_new_tokens, self.max_context))
        if blocks > self.pool.total:
            raise ContextLengthError(
                f"the request needs {blocks} KV blocks ({len(ids)} prompt + {params.max_new_tokens} new tokens) "
                f"but the whole budget is {self.pool.total}; lower max_new_tokens or raise kv_budget_tokens")
        # a bad schema or grammar, or a logit bias outside the vocabulary, fails here (a 400)
        seq = Sequence(ids, params, eos_ids=self._eos, vocab_size=self.model.manifest.model.vocab_size,
                       guide=self.model.guide if params.constraint is not None else None)
        r = Request(f"req-{next(self._ids)}", ids, params, blocks, TextStream(self.model.tokenizer, params.stop),
                    seq=seq, submitted=time.perf_counter())
        r.handle = RequestHandle(r.id, len(ids), self._cancel_request, r)
        with self._lock:
            if self._closing or not self._thread.is_alive():
                raise PortableInferError("the scheduler is closed; create a new one")
            self._waiting.append(r)
            self._admit()
            if len(self._waiting) > self.config.max_waiting:
                self._waiting.pop()
                self.meter.count("requests_rejected")
                retry = self.meter.retry_after(len(self._waiting), self.config.max_batch)
                raise CapacityError(f"the server is at capacity ({self._active} running, {len(self._waiting)} "
                                    f"waiting); retry later", retry_after=retry)
            self._wake.notify_all()
        return r.handle

    def stats(self) -> SchedulerStats:
        """A consistent snapshot of occupancy, KV blocks, counters and recent request timings."""
        with self._lock:
            running = sum(1 for r in self._rows if r.state == "running")
            cache = self._cache
            return SchedulerStats(
                running=running, prefilling=self._active - running, waiting=len(self._waiting),
                max_batch=self.config.max_batch, max_waiting=self.config.max_waiting,
                blocks_used=self.pool.used, blocks_total=self.pool.total, block_size=self.pool.block_size,
                kv_bytes=cache.nbytes() if cache is not None else 0,
                tokens_per_s=self.meter.tokens_per_s(), recent=tuple(self.meter.recent),
                prefix_cache_hits=self.prefixes.hits, prefix_cache_tokens=self.prefixes.tokens_reused,
                prefix_cache_bytes=self.prefixes.nbytes, **self.meter.counters)

    def has_capacity(self) -> bool:
        """Whether a new request would be accepted now (running, or queued behind the batch)."""
        with self._lock:
            alive = self._thread.is_alive() and not self._closing
            slot = not self._waiting and self._active < self.config.max_batch
            return alive and (slot or len(self._waiting) < self.config.max_waiting)

    def add_observer(self, observer: SchedulerObserver) -> None:
        """Also call ``observer``'s hooks (e.g. the server's metrics)."""
        with self._lock:
            self.meter.observers = [*self.meter.observers, observer]  # a new list: readers iterate the old one

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def close(self, timeout: float = 10.0) -> None:
        """Stop the step loop; requests still queued or running end with an error."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        with self._lock:
            left = list(self._waiting) + list(self._prefilling) + [r for r in self._rows if r.state != "done"]
        for r in left:
            self._fail(r, PortableInferError("the scheduler was closed before this request finished"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- bookkeeping (under the lock) -----------------------------------------------------------
    def _admit(self) -> None:
        while self._waiting and self._active < self.config.max_batch and not self._closing:
            r = self._waiting[0]
            if not self.pool.try_reserve(r.blocks):
                break  # FIFO: a big request at the head is not overtaken (no starvation)
            self._waiting.popleft()
            r.state, r.admitted = "prefilling", time.perf_counter()
            self._active += 1
            self._prefilling.append(r)

    def _release(self, r: Request) -> bool:
        """Mark ``r`` done and give back its slot and blocks; False if it already was."""
        if r.state == "done":
            return False
        if r.state == "waiting":
            self._waiting.remove(r)
        else:
            self._active -= 1
            self.pool.release(r.blocks)
        r.state = "done"
        self._admit()
        self._wake.notify_all()
        return True

    def _cancel_request(self, r: Request) -> None:
        with self._lock:
            if not self._release(r):
                return
            self.meter.count("requests_cancelled")
        self._record(r, "cancelled")
        r.handle._put(Response("", None, "cancelled", prompt_tokens=len(r.prompt), generation_tokens=len(r.output)))

    def _fail(self, r: Request, exc: Exception) -> None:
        with self._lock:
            if not self._release(r):
                return
            self.meter.count("requests_failed")
        self._record(r, "error")
        if not isinstance(exc, PortableInferError):  # readers catch one hierarchy (the server's error events)
            typed = GenerationError(f"request {r.id} failed: {type(exc).__name__}: {exc}", reason="internal")
            typed.__cause__ = exc
            exc = typed
        r.handle._put(exc)

    def _fail_row(self, r: Request, exc: Exception) -> None:
        """``r``'s own failure (its sampling, its text): it ends with ``exc``, its step goes on."""
        logger.warning("request %s failed: %s: %s", r.id, type(exc).__name__, exc,
                       exc_info=not isinstance(exc, PortableInferError))
        self._fail(r, exc)

    def _record(self, r: Request, reason: str) -> None:
        s = r.stats(reason)
        r.handle.stats = s
        with self._lock:
            self.meter.recent.append(s)
        self.meter.finished(s)

    # --- the step loop (scheduler thread) -------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._prefilling or self._rows):
                    self._wake.wait()
                if self._closing:
                    return
                fresh = [r for r in self._prefilling if not r.prefix_checked]
            self._reuse_prefixes(fresh)
            with self._lock:
                head = self._prefilling[0] if self._prefilling else None
                group = self._prefill_group_candidates()
            if len(group) > 1:
                try:
                    self._prefill_group(group)
                except Exception as exc:  # noqa: BLE001
                    logger.exception("prefill of %d requests failed", len(group))
                    for r in group:
                        self._fail(r, exc)
                        self._pop_prefilling(r, anywhere=True)
            elif head is not None:
                try:
                    if head.short_prefix and head.state != "done":  # alone after all: its prefix saves work now
                        self._start_from_prefix(head)
                    self._prefill_chunk(head)
                except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
                    logger.exception("prefill of %s failed", head.id)
                    self._fail(head, exc)
                    self._pop_prefilling(head)
            if self._rows:
                try:
                    self._decode()
                except Exception as exc:  # noqa: BLE001
                    logger.exception("decode step failed; failing the %d running requests", len(self._rows))
                    for r in self._rows:
                        self._fail(r, exc)
                    self._rows, self._cache, self._mask, self._pending = [], None, None, None
