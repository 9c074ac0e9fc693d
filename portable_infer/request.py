"""One request inside the continuous-batching scheduler: its state, and the rule for each token.

Every token of a scheduled request goes through :meth:`Request.take_token`::

    logits ─ Sequence.step (penalties, logit bias, grammar mask, sampler, logprobs,
             │              stop id / grammar complete / max_new_tokens / context)
             └─ detokenize + stop strings ─> Response

:class:`~portable_infer.sequence.Sequence` is the per-token rule ``BatchDecoder`` uses too.

What fails in there (NaN logits, a grammar error, a detokenizer error) belongs to this request alone: the
scheduler ends it with that error and the other rows of its step go on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .handle import RequestHandle, RequestStats
from .sampling import SamplingParams
from .sequence import Sequence
from .streaming import Response, TextStream


@dataclass(eq=False)
class Request:
    """A scheduled request: its prompt, sampling state, progress and timings (loop thread)."""

    id: str
    prompt: list
    params: SamplingParams
    blocks: int
    text: TextStream
    handle: RequestHandle = None
    seq: Sequence = None  # its sampling state and output
    state: str = "waiting"  # waiting | prefilling | running | done
    cache: object = None  # its own batch-1 cache while prefilling
    prefilled: int = 0
    prefix_checked: bool = False  # looked up in the prefix cache
    alone: bool = False  # prefilled by itself (a grouped prefill with it failed)
    short_prefix: int = 0  # cached prefix tokens left unused unless it is prefilled alone
    submitted: float = 0.0
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    gaps: list = field(default_factory=list)

    @property
    def output(self) -> list:
        """The token ids generated so far."""
        return self.seq.output

    def take_token(self, logits: np.ndarray | None, tok: int | None, max_context: int,
                   mask: np.ndarray | None = None) -> Response:
        """Pick the next token from ``logits`` (``tok``: already picked on the device, plain
        greedy rows; ``mask``: its grammar bitmask from the step's batched fill), record it, and
        return its :class:`Response` (``finish_reason`` set when a stop rule ends the request)."""
        pick = self.seq.step(logits, tok, mask, max_context=max_context)
        tok, reason, lp, top = pick.token, pick.finish_reason, pick.logprob, pick.top_logprobs
        piece, hit = self.text.push(tok)
        if hit:
            reason = "stop"
        if reason is not None:
            piece += self.text.close()
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        else:
            self.gaps.append(now - self.last_token)
        self.last_token = now
        decode_s = now - self.first_token
        return Response(piece, tok, reason, lp, top, prompt_tokens=len(self.prompt),
                        generation_tokens=len(self.output), ttft_s=self.first_token - self.submitted,
                        decode_tokens_per_s=(len(self.output) - 1) / decode_s if decode_s > 0 else 0.0)

    def stats(self, reason: str) -> RequestStats:
        """Its timings, now that it ended with ``reason``."""
        now = time.perf_counter()
        return RequestStats(self.id, len(self.prompt), len(self.output), reason,
                            queue_s=(self.admitted or now) - self.submitted,
                            ttft_s=None if self.first_token is None else self.first_token - self.submitted,
                            inter_token_s=tuple(self.gaps), total_s=now - self.submitted)
