"""What a request passes before its prompt is tokenized, and the pool that tokenizes it.

Tokenizing a long prompt and rendering a chat template take CPU time (about a second for 1 MB):
on the event loop that stalls every stream and ``/health``. So, in order:

1. size limits on the parsed body, no tokenizer involved: message count, characters of text
   (``max_messages``, ``max_prompt_chars``) -> 400;
2. capacity: the scheduler's queue is full -> 429 with ``Retry-After``, before spending CPU;
3. tokenization on a small thread pool (``tokenizer_threads``), with at most ``max_tokenizing``
   requests queued for it (default: the scheduler's ``max_batch + max_waiting``) -> else 429.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

from portable_infer.serving.http.apierror import APIError

CHARS_PER_TOKEN = 32  # max_prompt_chars' default per allowed prompt token: above any real tokenizer's


def text_size(body: dict, chat: bool) -> tuple:
    """(characters of prompt or message text, number of messages) of a body, counting only what
    has the expected type (the parser rejects the rest after)."""
    if not chat:
        prompt = body.get("prompt")
        parts = prompt if isinstance(prompt, list) else [prompt]
        return sum(len(p) for p in parts if isinstance(p, str)), 0
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0, 0
    chars = 0
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        pieces = content if isinstance(content, list) else [content]
        chars += sum(len(p) for p in pieces if isinstance(p, str))
        chars += sum(len(p["text"]) for p in pieces if isinstance(p, dict) and isinstance(p.get("text"), str))
    return chars, len(messages)


def retry_after(stats) -> int:
    """Seconds until a slot is likely free: recent request durations x queue length / batch."""
    durations = [s.total_s for s in stats.recent[-32:]]
    per = sum(durations) / len(durations) if durations else 1.0
    return max(1, math.ceil(per * (stats.waiting + 1) / stats.max_batch))


def overloaded(message: str, seconds: int) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="server_overloaded",
                    headers={"Retry-After": str(seconds)})


class Admission:
    """The checks before tokenizing, and the tokenizer pool of one app (see the module doc)."""

    def __init__(self, scheduler, config, max_prompt_tokens: int):
        self.scheduler = scheduler
        self.max_chars = config.max_prompt_chars or CHARS_PER_TOKEN * max_prompt_tokens
        self.max_messages = config.max_messages
        self.max_queued = config.max_tokenizing or scheduler.config.max_batch + scheduler.config.max_waiting
        self.threads = config.tokenizer_threads
        self.queued = 0  # requests in or waiting for the pool (event-loop thread only)
        self.rejected = 0  # 429s given here, before the scheduler saw the request (for /metrics)
        self._pool: ThreadPoolExecutor | None = None

    def check(self, body: dict, chat: bool) -> None:
        """Size limits, then capacity; raises the APIError to answer with."""
        chars, messages = text_size(body, chat)
        param = "messages" if chat else "prompt"
        if messages > self.max_messages:
            raise APIError(400, f"the conversation has {messages} messages, this server takes at most "
                           f"{self.max_messages} (--max-messages); shorten it", param="messages",
                           code="too_many_messages")
        if chars > self.max_chars:
            raise APIError(400, f"the {param} has {chars} characters, this server takes at most {self.max_chars} "
                           f"(--max-prompt-chars); shorten it", param=param, code="context_length_exceeded")
        if not self.scheduler.alive:
            raise APIError(503, "the generation engine has stopped; the server is restarting or broken",
                           type="server_error", code="unavailable")
        if not self.scheduler.has_capacity():
            stats = self.scheduler.stats()
            self.rejected += 1
            raise overloaded(f"the server is at capacity ({stats.running + stats.prefilling} running, "
                             f"{stats.waiting} waiting); retry later", retry_after(stats))

    async def run(self, fn, *args):
        """``fn(*args)`` on the tokenizer pool (CPU work off the event loop), bounded."""
        if self.queued >= self.max_queued:
            self.rejected += 1
            raise overloaded(f"{self.queued} requests are already waiting to be tokenized; retry later", 1)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="portable-infer-tokenize")
        self.queued += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.queued -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
