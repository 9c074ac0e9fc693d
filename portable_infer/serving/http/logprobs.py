"""OpenAI's ``logprobs`` objects, from the engine's per-token log-probabilities.

Each :class:`~portable_infer.text.streaming.Response` of a request that asked for logprobs carries its
token's ``logprob`` and ``top_logprobs`` ((id, logprob) pairs, best first). The two endpoints
write them differently::

    chat          {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
                   "refusal": null}
    completions   {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}], "text_offset": [...]}

A token's text is its bytes as UTF-8; a token that holds part of a character is written with
``\\xNN`` escapes (its ``bytes`` are exact). A logprob of -inf is written as -9999.0 (JSON has no
infinity), as OpenAI does.
"""

from __future__ import annotations

import math

FLOOR = -9999.0


class TokenNames:
    """Token id -> (text, UTF-8 bytes), from the model's tokenizer (memoized)."""

    def __init__(self, model):
        self.model = model
        self._cache: dict = {}

    def warm(self) -> None:
        """Build what naming needs now (llguidance's byte table: about a second for 50k tokens),
        off the event loop (the parse runs on the tokenizer pool)."""
        self(0)

    def __call__(self, token: int) -> tuple[str, list]:
        hit = self._cache.get(token)
        if hit is None:
            try:
                raw = self.model.guide.token_bytes(token)
            except Exception:  # noqa: BLE001 - a tokenizer llguidance cannot read: the decoded text
                raw = self.model.codec.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
            hit = self._cache[token] = (raw.decode("utf-8", errors="backslashreplace"), list(raw))
        return hit


def _lp(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def chat(pieces: list, names: TokenNames) -> dict:
    """The chat choice's ``logprobs`` for the tokens of ``pieces`` (Responses with a logprob)."""
    content = []
    for r in pieces:
        text, raw = names(r.token)
        top = [{"token": names(t)[0], "logprob": _lp(lp), "bytes": names(t)[1]} for t, lp in r.top_logprobs]
        content.append({"token": text, "logprob": _lp(r.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion(pieces: list, names: TokenNames, offset: int = 0) -> tuple[dict, int]:
    """The completion choice's ``logprobs`` for ``pieces``, their text offsets counted from
    ``offset``; and the offset after them (the next stream chunk's). An offset indexes the
    completion's text: a token adds what it added there (a special token's name is not in the
    text, so it adds nothing)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for r in pieces:
        text = names(r.token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(_lp(r.logprob))
        out["top_logprobs"].append({names(t)[0]: _lp(lp) for t, lp in r.top_logprobs})
        out["text_offset"].append(offset)
        offset += len(r.text)
    return out, offset
