"""Token ids -> text pieces for one sequence: detokenizer + stop strings, and the response object."""

from __future__ import annotations

from dataclasses import dataclass

from portable_infer.text.detokenize import StreamingDetokenizer
from portable_infer.text.stopping import StopMatcher


@dataclass(frozen=True)
class Response:
    """One streamed piece of a generation (mlx-lm style)."""

    text: str  # new text since the previous response (never a broken character)
    token: int | None  # the token id this step produced (None on the final flush)
    finish_reason: str | None  # None while running; "stop" | "length"
    logprob: float | None = None
    top_logprobs: tuple = ()
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft_s: float = 0.0  # prefill time (time to first token)
    decode_tokens_per_s: float = 0.0


class TextStream:
    """Turns one sequence's token ids into safe text, holding back partial stop strings."""

    def __init__(self, tokenizer, stops=(), end_ids=(), skip_special_tokens: bool = True):
        self.detok = StreamingDetokenizer(tokenizer, skip_special_tokens) if tokenizer is not None else None
        self.stops = StopMatcher(stops)
        self.end_ids = frozenset(end_ids)  # a token of these that ends the sequence ("stop") is not text

    def push(self, token: int) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        if self.detok is None:
            return "", False
        self.detok.add(token)
        return self.stops.feed(self.detok.take())

    def piece(self, token: int, finish_reason: str | None) -> tuple[str, str | None]:
        """One token's ``(text, finish_reason)``: "stop" where its text completes a stop string, and
        whatever text remains added when it ends the sequence (``finish_reason`` given or "stop");
        an end token (``end_ids``) that stops it adds none of its own."""
        text, hit = ("", False) if finish_reason == "stop" and token in self.end_ids else self.push(token)
        if hit:
            finish_reason = "stop"
        if finish_reason is not None:
            text += self.close()
        return text, finish_reason

    def close(self) -> str:
        """Whatever text remains at the end (nothing after a stop string)."""
        if self.detok is None or self.stops.stopped:
            return ""
        text, _ = self.stops.feed(self.detok.finalize())
        return text + self.stops.flush()
