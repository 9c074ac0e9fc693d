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
from dataclasses import dataclass, field

import numpy as np

from . import kvblocks
from .errors import CapacityError, ContextLengthError, InvalidArgumentError, PortableInferError
from .generate import check_prompt
from .handle import RequestHandle, RequestStats
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, apply_penalties, make_sampler, token_logprobs
from .scheduler_config import DEFAULT_KV_BUDGET_BYTES, SchedulerConfig, SchedulerObserver, SchedulerStats
from .streaming import Response, TextStream

logger = logging.getLogger(__name__)

_RATE_WINDOW_S = 10.0
_RECENT = 256  # finished requests kept for stats()


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list
    params: SamplingParams
    blocks: int
    text: TextStream
    handle: RequestHandle = None
    rng: np.random.Generator = None
    sampler: object = None
    stop_ids: frozenset = frozenset()
    state: str = "waiting"  # waiting | prefilling | running | done
    output: list = field(default_factory=list)
    cache: object = None  # its own batch-1 cache while prefilling
    prefilled: int = 0
    prefix_checked: bool = False  # looked up in the prefix cache
    short_prefix: int = 0  # cached prefix tokens left unused unless it is prefilled alone
    submitted: float = 0.0
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    gaps: list = field(default_factory=list)


class Scheduler:
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
        self._observers = [observer] if observer is not None else []
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
        self._counters = dict(prompt_tokens=0, generation_tokens=0, requests_finished=0, requests_cancelled=0,
                              requests_rejected=0, requests_failed=0)
        self._rate: deque = deque()  # (time, tokens) per step
        self._recent: deque = deque(maxlen=_RECENT)
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
        ids = check_prompt(list(ids), self.max_context, truncate)
        blocks = self.pool.blocks_for(min(len(ids) + params.max_new_tokens, self.max_context))
        if blocks > self.pool.total:
            raise ContextLengthError(
                f"the request needs {blocks} KV blocks ({len(ids)} prompt + {params.max_new_tokens} new tokens) "
                f"but the whole budget is {self.pool.total}; lower max_new_tokens or raise kv_budget_tokens")
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos)
        r = _Request(f"req-{next(self._ids)}", ids, params, blocks, TextStream(self.model.tokenizer, params.stop),
                     rng=np.random.default_rng(params.seed), sampler=make_sampler(params), stop_ids=stop,
                     submitted=time.perf_counter())
        r.handle = RequestHandle(r.id, len(ids), self._cancel_request, r)
        with self._lock:
            if self._closing or not self._thread.is_alive():
                raise PortableInferError("the scheduler is closed; create a new one")
            self._waiting.append(r)
            self._admit()
            if len(self._waiting) > self.config.max_waiting:
                self._waiting.pop()
                self._counters["requests_rejected"] += 1
                raise CapacityError(f"the server is at capacity ({self._active} running, {len(self._waiting)} "
                                    f"waiting); retry later", retry_after=self._retry_after())
            self._wake.notify_all()
        return r.handle

    def stats(self) -> SchedulerStats:
        """A consistent snapshot of occupancy, KV blocks, counters and recent request timings."""
        with self._lock:
            now = time.perf_counter()
            self._prune_rate(now)
            tokens = sum(n for _, n in self._rate)
            span = now - self._rate[0][0] if self._rate else 0.0
            running = sum(1 for r in self._rows if r.state == "running")
            cache = self._cache
            return SchedulerStats(
                running=running, prefilling=self._active - running, waiting=len(self._waiting),
                max_batch=self.config.max_batch, max_waiting=self.config.max_waiting,
                blocks_used=self.pool.used, blocks_total=self.pool.total, block_size=self.pool.block_size,
                kv_bytes=cache.nbytes() if cache is not None else 0,
                tokens_per_s=tokens / max(span, 1.0), recent=tuple(self._recent),
                prefix_cache_hits=self.prefixes.hits, prefix_cache_tokens=self.prefixes.tokens_reused,
                prefix_cache_bytes=self.prefixes.nbytes, **self._counters)

    def has_capacity(self) -> bool:
        """Whether a new request would be accepted now (running, or queued behind the batch)."""
        with self._lock:
            alive = self._thread.is_alive() and not self._closing
            slot = not self._waiting and self._active < self.config.max_batch
            return alive and (slot or len(self._waiting) < self.config.max_waiting)

    def add_observer(self, observer: SchedulerObserver) -> None:
        """Also call ``observer``'s hooks (e.g. the server's metrics)."""
        with self._lock:
            self._observers = [*self._observers, observer]

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

    def _release(self, r: _Request) -> bool:
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

    def _retry_after(self) -> float:
        durations = [s.total_s for s in list(self._recent)[-32:]]
        per = sum(durations) / len(durations) if durations else 1.0
        return max(1.0, per * (len(self._waiting) + 1) / self.config.max_batch)

    def _cancel_request(self, r: _Request) -> None:
        with self._lock:
            if not self._release(r):
                return
            self._counters["requests_cancelled"] += 1
        self._record(r, "cancelled")
        r.handle._put(Response("", None, "cancelled", prompt_tokens=len(r.prompt), generation_tokens=len(r.output)))

    def _fail(self, r: _Request, exc: Exception) -> None:
        with self._lock:
            if not self._release(r):
                return
            self._counters["requests_failed"] += 1
        self._record(r, "error")
        r.handle._put(exc)

    def _record(self, r: _Request, reason: str) -> None:
        now = time.perf_counter()
        s = RequestStats(r.id, len(r.prompt), len(r.output), reason,
                         queue_s=(r.admitted or now) - r.submitted,
                         ttft_s=None if r.first_token is None else r.first_token - r.submitted,
                         inter_token_s=tuple(r.gaps), total_s=now - r.submitted)
        r.handle.stats = s
        with self._lock:
            self._recent.append(s)
        self._observe("finished", s)

    def _observe(self, hook: str, value) -> None:
        for observer in self._observers:
            try:
                getattr(observer, hook)(value)
            except Exception:  # metrics must never stop the engine
                logger.exception("scheduler observer %s failed", hook)

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

    def _pop_prefilling(self, r: _Request, anywhere: bool = False) -> None:
        with self._lock:
            if self._prefilling and self._prefilling[0] is r:
                self._prefilling.popleft()
            elif anywhere and r in self._prefilling:
                self._prefilling.remove(r)
        if r.state == "done":
            r.cache = None

    def _reuse_prefixes(self, fresh: list) -> None:
        """Start requests whose prompt begins with a cached prefix of at least ``prefix_min_tokens``
        from that prefix's KV; note shorter hits, used if the request is prefilled alone."""
        for r in fresh:
            r.prefix_checked = True
            if r.prefilled or not self.prefixes.enabled:
                continue
            n = self.prefixes.match(r.prompt)
            if n and n >= self._prefix_min:
                self._start_from_prefix(r)
            else:
                r.short_prefix = n

    def _start_from_prefix(self, r: _Request) -> None:
        r.short_prefix = 0
        n, arrays = self.prefixes.lookup(r.prompt)
        if n:
            r.cache, r.prefilled = kvblocks.from_prefix(self.engine, arrays, n, self._capacity([r])), n

    def _remember(self, prompts: list, cache) -> None:
        """Offer prefilled prompts' KV (row i of ``cache`` holds ``prompts[i]`` right-aligned) to
        the prefix cache."""
        new = [i for i, p in enumerate(prompts) if self.prefixes.wants(p)]
        if not new:  # nothing to keep: spare the KV's copy to the host (a device round trip on GPUs)
            return
        for i, arrays in zip(new, kvblocks.prompt_kv(cache, prompts, new, self.engine)):
            self.prefixes.store(prompts[i], arrays)

    def _capacity(self, rows: list) -> int:
        """KV tokens the rows may need (fixed-size caches are allocated for it)."""
        return min(self.max_context, max(len(r.prompt) + r.params.max_new_tokens for r in rows))

    def _prefill_group_candidates(self) -> list:
        """Waiting prompts that each fit one chunk and together at most four chunks, from the
        head of the queue on (called under the lock): one left-padded forward prefills them all."""
        group, tokens = [], 0
        for r in self._prefilling:
            n = len(r.prompt)
            if r.prefilled or r.state == "done" or n > self.config.prefill_chunk:
                break
            if tokens + n > 4 * self.config.prefill_chunk:
                break
            group.append(r)
            tokens += n
        return group

    def _prefill_group(self, group: list) -> None:
        """Prefill several prompts in one forward (left-padded), then join them to the batch."""
        width = max(len(r.prompt) for r in group)
        ids = np.zeros((len(group), width), np.int64)
        mask = np.zeros((len(group), width), np.int64)
        for i, r in enumerate(group):
            ids[i, width - len(r.prompt):] = r.prompt
            mask[i, width - len(r.prompt):] = 1
        cache = self.engine.new_cache(len(group), capacity=self._capacity(group))
        logits = self.engine.forward(ids, mask, cache)
        self._remember([r.prompt for r in group], cache)
        with self._lock:
            for r in group:
                self._prefilling.remove(r)
                r.prefilled = len(r.prompt)
            self._counters["prompt_tokens"] += int(mask.sum())
        first = np.zeros(len(group), np.int64)
        n = 0
        for i, r in enumerate(group):
            if r.state == "done":  # cancelled while prefilling: dropped at the next decode step
                continue
            first[i] = self._sample(r, logits[i])
            n += 1
            with self._lock:
                if r.state != "done":
                    r.state = "running"
        self._count_step(n)
        self._join(group, cache, mask, first)

    def _join(self, rows: list, cache, mask: np.ndarray, first: np.ndarray) -> None:
        """Stack prefilled rows (their KV, mask and first tokens) under the running batch."""
        self._drop_done_rows(compact=True)
        if self._rows:
            self._cache, self._mask = kvblocks.merge(self._cache, self._mask, cache, mask, self.engine)
            self._pending = np.concatenate([self._pending, first])
        else:
            self._cache, self._mask, self._pending = cache, mask, first
        self._rows.extend(rows)

    def _prefill_chunk(self, r: _Request) -> None:
        if r.state == "done":  # cancelled while it waited for its turn
            self._pop_prefilling(r)
            return
        if r.cache is None:
            r.cache = self.engine.new_cache(1, capacity=self._capacity([r]))
        end = min(r.prefilled + self.config.prefill_chunk, len(r.prompt))
        ids = np.asarray([r.prompt[r.prefilled:end]], np.int64)
        logits = self.engine.forward(ids, np.ones((1, end), np.int64), r.cache)
        with self._lock:
            self._counters["prompt_tokens"] += end - r.prefilled
        r.prefilled = end
        if end < len(r.prompt):
            return
        self._remember([r.prompt], r.cache)
        self._pop_prefilling(r)
        if r.state == "done":
            return
        tok = self._sample(r, logits[0])
        self._count_step(1)
        if r.state == "done":  # finished on its first token
            r.cache = None
            return
        with self._lock:
            if r.state == "done":
                r.cache = None
                return
            r.state = "running"
        self._join([r], r.cache, np.ones((1, r.cache.length), np.int64), np.asarray([tok], np.int64))
        r.cache = None

    def _drop_done_rows(self, compact: bool = False) -> None:
        """Slice finished rows out of the batch (``compact``: even where they may stay, see
        ``_defer_leave``)."""
        keep = [i for i, r in enumerate(self._rows) if r.state != "done"]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._pending = [], None, None, None
            return
        if self._defer_leave and not compact and 2 * len(keep) > len(self._rows):
            return
        self._cache, self._mask = kvblocks.take(self._cache, self._mask, keep, self.engine)
        self._rows = [self._rows[i] for i in keep]
        self._pending = self._pending[keep]

    def _decode(self) -> None:
        self._drop_done_rows()
        if not self._rows:
            return
        # a finished row still in the batch (see _defer_leave) gets a padding column: it holds still
        live = np.array([[r.state != "done"] for r in self._rows], np.int64)
        self._mask = np.concatenate([self._mask, live], axis=1)
        # every row plain greedy on a graph with next_token: the argmax runs on the device and
        # only the ids come back (the logits stay there)
        greedy = getattr(self.engine, "greedy_on_device", False) and all(
            r.params.plain_greedy for r in self._rows if r.state != "done")
        out = self.engine.forward(self._pending[:, None], self._mask, self._cache, **({"greedy": True} if greedy else {}))
        nxt = np.array(self._pending)
        n = 0
        for i, r in enumerate(self._rows):
            if r.state == "done":  # cancelled during the forward
                continue
            nxt[i] = self._sample(r, None, int(out[i])) if greedy else self._sample(r, out[i])
            n += 1
        self._pending = nxt
        self._count_step(n)

    def _count_step(self, tokens: int) -> None:
        with self._lock:
            self._counters["generation_tokens"] += tokens
            now = time.perf_counter()
            self._rate.append((now, tokens))
            self._prune_rate(now)

    def _prune_rate(self, now: float) -> None:
        while self._rate and self._rate[0][0] < now - _RATE_WINDOW_S:
            self._rate.popleft()

    def _sample(self, r: _Request, logits: np.ndarray | None, tok: int | None = None) -> int:
        """Pick ``r``'s next token (``tok``: already picked on the device, plain greedy rows),
        stream it, and end ``r`` when a stop rule says so."""
        p = r.params
        if tok is None:
            if p.penalized:
                logits = apply_penalties(logits, r.prompt, r.output, p)
            tok = int(r.sampler(logits, r.rng))
        lp, top = (None, ())
        if p.logprobs is not None:
            lp, top = token_logprobs(logits, tok, p.logprobs)
            top = tuple(top)
        r.output.append(tok)
        reason = None
        if tok in r.stop_ids:
            reason = "stop"
        elif len(r.output) >= p.max_new_tokens or len(r.prompt) + len(r.output) >= self.max_context:
            reason = "length"
        piece, hit = r.text.push(tok)
        if hit:
            reason = "stop"
        if reason is not None:
            piece += r.text.close()
        now = time.perf_counter()
        if r.first_token is None:
            r.first_token = now
            self._observe("first_token", now - r.submitted)
        else:
            r.gaps.append(now - r.last_token)
            self._observe("inter_token", r.gaps[-1])
        r.last_token = now
        ttft = r.first_token - r.submitted
        decode_s = now - r.first_token
        resp = Response(piece, tok, reason, lp, top, prompt_tokens=len(r.prompt), generation_tokens=len(r.output),
                        ttft_s=ttft, decode_tokens_per_s=(len(r.output) - 1) / decode_s if decode_s > 0 else 0.0)
        if reason is None:
            r.handle._put(resp)
            return tok
        with self._lock:
            released = self._release(r)
            if released:
                self._counters["requests_finished"] += 1
        if released:  # else it was cancelled meanwhile, and its handle already ended
            self._record(r, reason)
            r.handle._put(resp)
        return tok
