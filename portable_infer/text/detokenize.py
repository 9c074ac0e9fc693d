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
proportional to the window, not to everything generated so far.
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
        return self._advance(final=False)

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
