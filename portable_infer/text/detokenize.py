"""Streaming detokenization: token ids in, final text out, never a broken character.

Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character (an emoji is often
split over two to four tokens); decoding such a tail yields U+FFFD. The detokenizer holds text back
while the decoded tail ends in U+FFFD and releases it once the character is complete.

It decodes a short window of ids (vLLM's ``prefix_offset`` / ``read_offset`` scheme)::

    ids:  ... emitted earlier ... | prefix (already emitted) | unread (new ids) |
                                  ^ prefix_offset             ^ read_offset

    new text = decode(prefix + unread)[len(decode(prefix)):]

Decoding the prefix along with the new ids keeps context-dependent decoders right (a
SentencePiece "▁" only becomes a space after another token), and the cost of each step stays
proportional to the window, not to everything generated so far. For a ``tokenizers.Tokenizer``
each token goes through tokenizers' ``DecodeStream`` (the same rule, in one call instead of two
decodes from Python); the window offsets are kept alongside, so ``finalize`` and any other use
fall back to the rule here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from portable_infer.errors import InvalidArgumentError

if TYPE_CHECKING:
    import tokenizers

REPLACEMENT_CHAR = "\ufffd"


class StreamingDetokenizer:
    """Turn a stream of token ids into text, one final piece at a time.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (anything with ``decode(ids, skip_special_tokens=)``).
        skip_special_tokens: leave special tokens (``<|im_end|>``...) out of the text.

    Example::

        detok = StreamingDetokenizer(tokenizer)
        for token_id in token_ids:
            detok.add(token_id)
            sys.stdout.write(detok.take())
        sys.stdout.write(detok.finalize())
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, skip_special_tokens: bool = True) -> None:
        if not callable(getattr(tokenizer, "decode", None)):
            raise InvalidArgumentError(
                f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        self._tokenizer = tokenizer
        self._skip_special_tokens = bool(skip_special_tokens)
        self.reset()

    def reset(self) -> None:
        """Forget every token, to start a new sequence."""
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the already-emitted ids decoded again for context
        self._read_offset = 0  # first id whose text has not been emitted yet
        self._stream = _decode_stream(self._tokenizer, self._skip_special_tokens)
        self._seen = 0  # ids the stream has stepped over

    @property
    def token_ids(self) -> list[int]:
        """Every id added since construction or the last :meth:`reset` (a copy)."""
        return list(self._ids)

    def add(self, token_id: int) -> None:
        """Append one generated token id."""
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__") or int(token_id) < 0:
            raise InvalidArgumentError(f"token_id must be an int >= 0, got {token_id!r}")
        self._ids.append(int(token_id))

    def take(self) -> str:
        """Text that became final since the last call ("" while a character is incomplete)."""
        if self._stream is None:
            return self._advance(final=False)
        out = []
        try:  # each new id through tokenizers' DecodeStream: the same window rule, one call per id
            for n in range(self._seen, len(self._ids)):
                chunk = self._stream.step(self._tokenizer, self._ids[n])
                self._seen = n + 1
                if chunk is not None:
                    self._prefix_offset, self._read_offset = self._read_offset, n + 1
                    out.append(chunk)
        except Exception:  # noqa: BLE001 - a decoder whose earlier text changes: the rule here from now on
            self._stream = None
            out.append(self._advance(final=False))
        return "".join(out)

    def finalize(self) -> str:
        """All text not yet taken, even an incomplete character (as U+FFFD, like ``decode``)."""
        return self._advance(final=True)

    def _decode(self, start: int, stop: int) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip_special_tokens)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._ids))
        # Hold back an incomplete character; also nothing to emit if only skipped specials came.
        if not final and (len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix_text):]


def _decode_stream(tokenizer, skip_special_tokens: bool):
    """tokenizers' own ``DecodeStream`` (the same prefix/read window, one call per token) for a
    ``tokenizers.Tokenizer``; None for other tokenizers or an older tokenizers."""
    try:
        import tokenizers
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    if not isinstance(tokenizer, tokenizers.Tokenizer):
        return None
    return DecodeStream(skip_special_tokens=skip_special_tokens)
