"""One request inside the continuous-batching scheduler: its state, and its tokens turned into text.

Every token of a scheduled request is picked by its :class:`~portable_infer.decode.sequence.Sequence`
(the per-token rule ``BatchDecoder`` uses too) inside the running batch, then made a
:class:`~portable_infer.text.streaming.Response` here::

    logits ─ Sequence.step (penalties, logit bias, grammar mask, sampler, logprobs,
             │              stop id / grammar complete / max_new_tokens / context)   running_batch.py
             └─ Pick ─ Request.emit: detokenize + stop strings, timings ─> Response   (the loop)

What fails in there (NaN logits, a grammar error, a detokenizer error) belongs to this request alone: the
scheduler ends it with that error and the other rows of its step go on. The planner
(:mod:`portable_infer.serving.scheduler_plan`) reads a request through its ``id``, ``state``,
``prompt_len``, ``max_new_tokens``, ``blocks`` and prefill progress.

Where KV blocks are taken on demand (paged KV) a running request may be preempted: its KV is
dropped, it waits again at the head of the queue, and when it is admitted again the tokens it
had generated (``resumed``) are prefilled after its prompt, as vLLM recomputes a preempted
request. Its sampling state (``seq``) and text stream go on where they were.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from portable_infer.serving.handle import HandleWriter, RequestHandle, RequestStats
from portable_infer.decode.sampling import SamplingParams
from portable_infer.decode.sequence import Pick, Sequence
from portable_infer.text.streaming import Response, TextStream


@dataclass(eq=False)
class Request:
    """A scheduled request: its prompt, sampling state, progress and timings (loop thread)."""

    id: str
    prompt: list
    params: SamplingParams
    blocks: int
    text: TextStream
    handle: RequestHandle = None  # the caller's end
    writer: HandleWriter = None  # the scheduler's end of the same handle
    seq: Sequence = None  # its sampling state and output
    state: str = "waiting"  # waiting | prefilling | running | done (released: slot and blocks back)
    ended: bool = False  # its reader got its end (last piece or error): nothing more is delivered
    emitted: int = 0  # tokens made into pieces (the step loop may be a step ahead of them)
    prefilled: int = 0  # prompt tokens whose KV is computed (or taken from the prefix cache)
    prefix_checked: bool = False  # looked up in the prefix cache
    alone: bool = False  # prefilled by itself (a grouped prefill with it failed)
    short_prefix: int = 0  # cached prefix tokens left unused unless it is prefilled alone
    resumed: list = field(default_factory=list)  # tokens it had generated when it was last preempted
    preemptions: int = 0
    submitted: float = 0.0
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    gaps: list = field(default_factory=list)

    @property
    def output(self) -> list:
        """The token ids generated so far."""
        return self.seq.output

    @property
    def ids(self) -> list:
        """The tokens its prefill computes: the prompt, and after a preemption the tokens it had generated."""
        return self.prompt + self.resumed if self.resumed else self.prompt

    @property
    def prompt_len(self) -> int:
        """Tokens its prefill computes (``len(ids)``)."""
        return len(self.prompt) + len(self.resumed)

    @property
    def max_new_tokens(self) -> int:
        """Tokens it may still generate after its prefill."""
        return self.params.max_new_tokens - len(self.resumed)

    def preempted(self) -> None:
        """Back to waiting with its KV dropped: what it generated is prefilled again on its next turn."""
        self.resumed = list(self.seq.output)
        self.state, self.prefilled, self.prefix_checked, self.alone, self.short_prefix = "waiting", 0, False, False, 0
        self.preemptions += 1

    def emit(self, pick: Pick) -> Response:
        """The :class:`Response` for the token ``pick`` (already recorded by ``seq.step``): its
        text through the detokenizer and stop strings (``finish_reason`` "stop" on a stop string),
        and the request's timings."""
        tok = pick.token
        self.emitted += 1
        piece, reason = self.text.piece(tok, pick.finish_reason)
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        else:
            self.gaps.append(now - self.last_token)
        self.last_token = now
        decode_s = now - self.first_token
        return Response(piece, tok, reason, pick.logprob, pick.top_logprobs, prompt_tokens=len(self.prompt),
                        generation_tokens=self.emitted, ttft_s=self.first_token - self.submitted,
                        decode_tokens_per_s=(self.emitted - 1) / decode_s if decode_s > 0 else 0.0)

    def stats(self, reason: str) -> RequestStats:
        """Its timings, now that it ended with ``reason``."""
        now = time.perf_counter()
        return RequestStats(self.id, len(self.prompt), self.emitted, reason,
                            queue_s=(self.admitted or now) - self.submitted,
                            ttft_s=None if self.first_token is None else self.first_token - self.submitted,
                            inter_token_s=tuple(self.gaps), total_s=now - self.submitted)
