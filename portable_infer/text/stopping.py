"""Stop strings over streamed text, without ever leaking a piece of a stop string.

Text arrives in chunks (one per token or so) and a stop string can span several of them. The
matcher emits text only once it cannot be the start of a stop string: a tail that is a prefix of
some stop string is held back until the next chunk settles it::

    stops = ["###"]     feed("Hi #")  -> ("Hi ", False)    "#" held back
                        feed("#")     -> ("", False)       "##" held back
                        feed("# x")   -> ("", True)        stop hit; nothing after it is emitted
"""

from __future__ import annotations

from collections.abc import Sequence

from portable_infer.errors import InvalidArgumentError


class StopMatcher:
    """Find the first occurrence of any stop string in a stream of text chunks.

    Args:
        stops: the stop strings (non-empty); an empty sequence passes all text through.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            raise InvalidArgumentError(f"stops must be a list of strings, got the string {stops!r}; pass [{stops!r}]")
        stops = tuple(stops)
        if not all(isinstance(s, str) and s for s in stops):
            raise InvalidArgumentError(f"stops must hold non-empty strings, got {list(stops)!r}")
        self.stops: tuple[str, ...] = stops
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been hit."""
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Add a chunk; return the text now safe to emit and whether a stop string was hit.

        On a hit the returned text ends just before the stop string, and every later call returns
        ``("", True)``.
        """
        if not self.stops:  # nothing to match: the text as it comes
            return text, False
        if self._stopped:
            return "", True
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held, self._stopped = "", True
            return buffer[: min(hits)], True
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Release the held-back text at the end of generation ("" after a stop string hit)."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _partial_stop_length(self, buffer: str) -> int:
        """Length of the longest tail of ``buffer`` that is a proper prefix of some stop string."""
        for n in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
