"""The continuous-batching scheduler's public data: its configuration (validated), its stats
snapshot and its observer hooks. The scheduler itself is :mod:`portable_infer.serving.scheduler`."""

from __future__ import annotations

from dataclasses import dataclass, field

from portable_infer.errors import InvalidArgumentError
from portable_infer.serving.handle import RequestStats

DEFAULT_KV_BUDGET_BYTES = 2 << 30
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9

# name -> (allowed range in words, predicate); validated in SchedulerConfig
_CONFIG_RULES = {
    "max_batch": (">= 1", lambda v: v >= 1),
    "max_waiting": (">= 0", lambda v: v >= 0),
    "prefill_chunk": (">= 1", lambda v: v >= 1),
    "block_size": ("None or >= 1", lambda v: v >= 1),
    "kv_budget_tokens": ("None or >= 1", lambda v: v >= 1),
    "kv_budget_bytes": ("None or >= 1", lambda v: v >= 1),
    "prefix_cache_bytes": (">= 0", lambda v: v >= 0),
    "prefix_min_tokens": ("None or >= 0", lambda v: v >= 0),
    "max_model_len": ("None or >= 2", lambda v: v >= 2),
}
OPTIONAL = ("kv_budget_tokens", "kv_budget_bytes", "prefix_min_tokens", "block_size", "max_model_len")  # None allowed


@dataclass(frozen=True)
class SchedulerConfig:
    """Sizes of the continuous-batching engine (validated at construction).

    ``kv_budget_tokens`` (or ``kv_budget_bytes``) bounds the KV reserved by admitted requests;
    without either, on a GPU the budget is what ``gpu_memory_utilization`` of its memory leaves
    after the model and the forwards (:mod:`~portable_infer.serving.kv_budget`), else 2 GiB of KV;
    ``max_waiting`` bounds the queue behind it; ``prefix_cache_bytes`` bounds the prompt prefixes
    kept for reuse (:mod:`portable_infer.serving.prefix_cache`).
    """

    max_batch: int = 16
    max_waiting: int = 64
    prefill_chunk: int = 128
    # KV tokens a block holds: the budget's unit (None: 16, or a paged engine's own, 128 on CUDA)
    block_size: int | None = None
    kv_budget_tokens: int | None = None
    kv_budget_bytes: int | None = None
    # Without a KV budget given, on a GPU: the share of its whole memory the server may use (weights,
    # the forwards' working memory and the KV budget, which takes the rest), as vLLM's option of the
    # name. None: DEFAULT_GPU_MEMORY_UTILIZATION. Refused beside a budget given (one of them sizes it).
    gpu_memory_utilization: float | None = None
    # KV tokens one request may hold at most, its prompt and max_new_tokens (vLLM's max_model_len);
    # longer requests are refused. None: the model's context. Where the running batch is slots of
    # one buffer (slot_batch) it also bounds the slots' length: a static graph's decode step reads
    # the whole buffer, so slots longer than any request can use make every step slower; and an
    # automatic KV budget holds no more than max_batch requests of it.
    max_model_len: int | None = None
    # Host memory for the KV of prompt prefixes kept for reuse (0: no prefix caching); apart from
    # the KV budget. Default 64 MiB: ~1,400 tokens of SmolLM2-135M's fp32 KV.
    prefix_cache_bytes: int = 64 << 20
    # A request that can be prefilled in one forward with other waiting requests reuses a cached
    # prefix only when it covers at least this many tokens; shorter ones are computed again
    # inside that batched forward, which costs less than a forward of the request's own plus
    # moving its KV into the batch where a forward's cost hardly depends on its tokens (GPUs). A
    # request prefilled alone always reuses its cached prefix. None: ``prefill_chunk`` on GPUs,
    # 0 (every hit reused) on the CPU, where a batched prefill of whole prompts stalls the
    # running streams longer (docs/serving.md has the measurements).
    prefix_min_tokens: int | None = None
    # Each step's text (detokenizer, stop strings, the readers' pieces) made on a thread of its
    # own while the next forward runs (``scheduler_queues.emitter``). None: on GPUs, whose
    # forwards leave the host's cores free; on the CPU the forward's threads use them.
    emit_thread: bool | None = None
    # The running batch as max_batch fixed slots of one KV buffer (``slot_batch.py``): rows join
    # and leave without moving the others' KV, and decode steps run at a few bucketed batch sizes,
    # each with one CUDA graph. Static-KV graphs only. None: on GPUs; on the CPU a free slot's
    # compute is not free, so the batch is restacked at each join and leave instead.
    slot_batch: bool | None = None

    def __post_init__(self):
        for name, (allowed, ok) in _CONFIG_RULES.items():
            v = getattr(self, name)
            if v is None and name in OPTIONAL:
                continue
            if not (isinstance(v, int) and not isinstance(v, bool) and ok(v)):
                raise InvalidArgumentError(f"{name} must be an int {allowed}, got {v!r}")
        for name in ("emit_thread", "slot_batch"):
            v = getattr(self, name)
            if not (v is None or isinstance(v, bool)):
                raise InvalidArgumentError(f"{name} must be None, True or False, got {v!r}")
        u = self.gpu_memory_utilization
        if u is not None and not (isinstance(u, (int, float)) and not isinstance(u, bool) and 0 < u <= 1):
            raise InvalidArgumentError(f"gpu_memory_utilization must be None or a number in (0, 1], got {u!r}")
        given = [name for name in ("kv_budget_tokens", "kv_budget_bytes", "gpu_memory_utilization")
                 if getattr(self, name) is not None]
        if len(given) > 1:
            raise InvalidArgumentError(f"give one of kv_budget_tokens, kv_budget_bytes and gpu_memory_utilization "
                                       f"(each sizes the KV budget), not {' and '.join(given)}")


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics: occupancy, KV blocks, token counters, recent request timings."""

    running: int  # rows in the decode batch
    prefilling: int
    waiting: int
    max_batch: int
    max_waiting: int
    blocks_used: int
    blocks_total: int
    block_size: int
    # KV memory the running batch really holds now: a growing cache's rows x width (padding
    # included); fixed buffers on the CPU count the positions written (pages are committed on
    # first write), not their virtual rows x capacity; on a GPU the whole buffers (allocated at
    # once). Spare buffers kept for reuse (engine.static_buffers.SPARE_BYTES) and the prefix cache
    # (prefix_cache_bytes) are not in it.
    kv_bytes: int
    prompt_tokens: int  # counters since start
    generation_tokens: int
    requests_finished: int
    requests_cancelled: int
    requests_rejected: int
    requests_failed: int
    tokens_per_s: float  # generated tokens per second over the last few seconds
    recent: tuple = ()  # RequestStats of the last finished requests, oldest first
    prefix_cache_hits: int = 0  # requests that started from a cached prompt prefix
    prefix_cache_tokens: int = 0  # prompt tokens those requests did not prefill
    prefix_cache_bytes: int = 0  # host memory the cached prefixes hold now
    requests_preempted: int = 0  # times a request gave its KV blocks back to wait again (paged KV)
    # the step loop's seconds and counts since start (scheduler_meter.STEP_SECONDS, STEP_COUNTS)
    steps: dict = field(default_factory=dict)


class SchedulerObserver:
    """Hooks called on the scheduler thread (keep them quick); the defaults do nothing."""

    def first_token(self, ttft_s: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def finished(self, stats: RequestStats) -> None: ...
