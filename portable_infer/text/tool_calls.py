"""Tool calls in a model's output: the parser that turns a reply into content and calls, whole or
streamed (the formats are :mod:`portable_infer.text.tool_formats`).

::

    CallParser     text in (all at once, or piece by piece) -> events:
                     str            content
                     ToolCall       a whole, valid call
                     ToolCallDelta  (deltas=True) a call's head once its name is read, then its
                                    arguments as they are written (tool_scan.CallTracker)
    CallStream     the same over the engine's Responses (with the special-token text a marker
                   that is a special token needs)

A call is kept only when its JSON parses into ``{"name": <an offered tool>, "arguments" (or
"parameters"): {...}}``; anything else, a malformed call included, stays content: what a model
writes is never an error. A call's ``arguments`` are the object's text as the model wrote it (so
the streamed pieces join into it exactly); arguments written as a JSON string are read and
written out as an object. Only the whitespace the format itself puts around a call (Hermes' one
newline before ``<tool_call>`` and after ``</tool_call>``) is dropped; the rest of the text is
content as written, except whitespace alone beside calls (a reply of calls has no content).
Whitespace is held until the next text shows what it is, and a tail that may start a marker
until the next piece settles it, so a stream never shows half a marker as content.

Streamed pieces cannot be taken back: a call whose head went out and that then turns out
malformed (or is cut off by max_new_tokens) is content in the whole reply, and in the stream a
call with the arguments sent so far plus the same content.
"""

from __future__ import annotations

import json

from portable_infer.text.streaming import TextStream
from portable_infer.text.tool_formats import FORMATS, ToolCall, ToolCallDelta, ToolFormat, detect_format
from portable_infer.text.tool_scan import CALL_ID, CallTracker

__all__ = ["FORMATS", "CallParser", "CallStream", "ToolCall", "ToolCallDelta", "ToolFormat", "detect_format",
           "special_markers"]

_DECODER = json.JSONDecoder()


def _partial(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _decode_objects(text: str, sep: str) -> list | None:
    """JSON values joined by ``sep`` (surrounding whitespace allowed) filling ``text``; None if not."""
    out, pos, sep = [], 0, sep.strip()
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            return None
        out.append(value)
        rest = text[pos:].lstrip()
        if not rest:
            return out
        if not sep or not rest.startswith(sep):
            return None
        pos = len(text) - len(rest) + len(sep)


def _cut_head(text: str, ws: str) -> str:
    return text[len(ws):] if ws and text.startswith(ws) else text


def _cut_tail(text: str, ws: str) -> str:
    return text[:-len(ws)] if ws and text.endswith(ws) else text


class CallParser:
    """Splits a reply into content and calls, fed whole or in pieces (see the module doc).

    Args:
        fmt: the :class:`ToolFormat`.
        names: the offered tools' names; a call of another name is content.
        deltas: also give :class:`ToolCallDelta` pieces (for a stream) among the events.

    Example:
        >>> p = CallParser(FORMATS["hermes"], {"f"})
        >>> events = p.feed('Sure.\\n<tool_call>\\n{"name": "f", "arguments": {}}\\n</tool_call>') + p.close()
        >>> events[0], events[1].name
        ('Sure.', 'f')
    """

    def __init__(self, fmt: ToolFormat, names, deltas: bool = False):
        self.fmt, self.names, self.deltas = fmt, frozenset(names), deltas
        self._buf = ""
        self._ws = ""  # whitespace held until the next text shows whether it is content
        self._after_call = False  # the format's whitespace after a call comes next
        self._content = self._called = False  # content (not only whitespace) / a call went out
        self._bare = None  # bare layout: None undecided, True the reply is calls, False it is text
        self._track = None  # the CallTracker of the call segment that starts _buf, while it grows
        self._index = 0  # the next streamed call's index

    def feed(self, text: str) -> list:
        """Events (str content, :class:`ToolCall`, and with ``deltas`` :class:`ToolCallDelta`)
        decided by ``text`` so far."""
        self._buf += text
        return self._emit(False)

    def close(self) -> list:
        """The events left at the end of the reply (a held marker start, an unclosed call)."""
        events = self._emit(True)
        if self._ws and (self._content or not self._called):
            events.append(self._ws)
        self._ws = ""
        return events

    def _next_index(self) -> int:
        self._index += 1
        return self._index - 1

    def _emit(self, final: bool) -> list:
        scan = self._scan_bare if self.fmt.layout == "bare" else self._scan_marked
        items, used, pending = scan(final)
        self._buf = self._buf[used:]
        events = []
        for kind, raw in items:
            if kind == "text":
                self._text(raw, events)
                continue
            track, self._track = self._track or CallTracker(self.fmt), None
            track.advance(raw)
            self._stream(track.pending(self.names, self._next_index), events)
            calls = self._parse(raw, track)
            if calls is None:  # malformed: content (pieces of it already streamed stay sent)
                self._text(raw, events)
                continue
            self._finish(track, calls, events)
            self._ws = _cut_tail(self._ws, self.fmt.around)  # the format's whitespace before a call
            self._after_call = self._called = True
            events.extend(calls)
        if pending:  # a call segment still growing at the start of the buffer
            self._track = self._track or CallTracker(self.fmt)
            self._track.advance(self._buf)
            self._stream(self._track.pending(self.names, self._next_index), events)
        return events

    def _stream(self, deltas: list, events: list) -> None:
        if self.deltas:
            events.extend(deltas)

    def _text(self, text: str, events: list) -> None:
        if self._after_call and text:
            text = _cut_head(text, self.fmt.around)  # the format's whitespace after a call
            self._after_call = False
        text = self._ws + text
        kept = text.rstrip()
        self._ws = text[len(kept):]
        if kept:
            events.append(kept)
            self._content = True

    def _finish(self, track: CallTracker, calls: list, events: list) -> None:
        """The rest of each whole call's pieces: what of its arguments was not streamed (all of
        them when they were written as a JSON string, ``{}`` when left out), or the whole call
        when the tracker never saw it start."""
        tracked = {t.id: t for t in track.calls if t.id is not None}
        for call in calls:
            t = tracked.get(call.id)
            if t is None:
                index = self._next_index()
                self._stream([ToolCallDelta(index, id=call.id, name=call.name), ToolCallDelta(index, call.arguments)],
                             events)
                continue
            sent = track.sent(t)
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                self._stream([ToolCallDelta(t.index, call.arguments[len(sent):])], events)

    # --- where call segments are: (items, characters of the buffer decided, a segment pending) ------
    def _scan_marked(self, final: bool) -> tuple:
        """Layouts whose calls start at the ``open`` marker (tagged, array, named)."""
        buf, fmt, items, pos = self._buf, self.fmt, [], 0
        while True:
            start = buf.find(fmt.open, pos)
            if start < 0:
                end = len(buf) if final else len(buf) - _partial(buf[pos:], fmt.open)
                if end > pos:
                    items.append(("text", buf[pos:end]))
                return items, max(end, pos), False
            if start > pos:
                items.append(("text", buf[pos:start]))
            end = self._segment_end(buf, start)
            if end is None:  # not whole yet, or never: a call if its JSON is whole at the end, else content
                if final:
                    items.append(("call", buf[start:]))
                    return items, len(buf), False
                return items, start, True
            items.append(("call", buf[start:end]))
            pos = end

    def _segment_end(self, buf: str, start: int) -> int | None:
        """Where the call segment starting at ``start`` ends (None: not known yet)."""
        fmt, body = self.fmt, start + len(self.fmt.open)
        if fmt.layout == "tagged":
            stop = buf.find(fmt.close, body)
            return None if stop < 0 else stop + len(fmt.close)
        if fmt.layout == "named":
            mid, nxt = buf.find(fmt.mid, body), buf.find(fmt.open, body)
            if nxt >= 0 and (mid < 0 or nxt < mid):
                return nxt  # another call starts before this one's arguments: malformed
            if mid < 0:
                return None
            body = mid + len(fmt.mid)
        while body < len(buf) and buf[body].isspace():
            body += 1
        try:
            return _DECODER.raw_decode(buf, body)[1]
        except ValueError:
            return None

    def _scan_bare(self, final: bool) -> tuple:
        buf, fmt = self._buf, self.fmt
        if self._bare is None:
            head = buf.lstrip()
            if head.startswith(("{", fmt.open)):
                self._bare = True
            elif head and not fmt.open.startswith(head):
                self._bare = False
            elif not final:
                return [], 0, False
        if self._bare:
            return ([("call", buf)], len(buf), False) if final else ([], 0, True)
        return ([("text", buf)] if buf else []), len(buf), False

    # --- one call segment -> ToolCalls, or None (it stays content) ----------------------------------
    def _parse(self, raw: str, track: CallTracker) -> list | None:
        fmt = self.fmt
        body = raw.lstrip()  # a bare reply may start with whitespace
        body = body[len(fmt.open):] if body.startswith(fmt.open) else body
        if fmt.layout == "named":
            name, found, args = body.partition(fmt.mid)
            values = _decode_objects(args, "") if found else None
            if values is not None:
                values = [{"name": name.split(CALL_ID)[0].strip(), fmt.args: values[0]}] if len(values) == 1 else None
        else:
            if fmt.close and body.endswith(fmt.close):
                body = body[: -len(fmt.close)]
            values = _decode_objects(body, fmt.sep if fmt.layout == "bare" else "")
        if not values:
            return None
        if fmt.layout == "array":
            if len(values) != 1 or not isinstance(values[0], list) or not values[0]:
                return None
            values = values[0]
        elif fmt.layout == "tagged" and len(values) != 1:
            return None
        tracked = track.calls if len(track.calls) == len(values) else [None] * len(values)
        calls = [self._call(v, t, track) for v, t in zip(values, tracked)]
        return None if any(c is None for c in calls) else calls

    def _call(self, obj, tracked, track: CallTracker) -> ToolCall | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in self.names:
            return None
        keys = set(obj) - {"name"}
        if len(keys) > 1 or not keys <= {"arguments", "parameters"}:
            return None
        args = obj[keys.pop()] if keys else {}
        as_written = None
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return None
        elif tracked is not None and tracked.name == obj["name"]:
            as_written = track.span(tracked)
        if not isinstance(args, dict):
            return None
        if not _same_json(as_written, args):  # the tracker only reads: its span must hold these arguments
            as_written = json.dumps(args, ensure_ascii=False)
        same = tracked is not None and tracked.id is not None and tracked.name == obj["name"]
        return ToolCall(tracked.id if same else self.fmt.new_id(), obj["name"], as_written)


def _same_json(text: str | None, value) -> bool:
    try:
        return text is not None and _DECODER.decode(text) == value
    except ValueError:
        return False


def special_markers(fmt: ToolFormat, tokenizer) -> dict:
    """``{marker: token id}`` for the format's markers that are special tokens of ``tokenizer``
    (decoding skips those: the parser then reads text decoded with them)."""
    if tokenizer is None:
        return {}
    added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return {m: added[m] for m in fmt.markers if m in added}


class CallStream:
    """A :class:`CallParser` fed with the engine's :class:`~portable_infer.text.streaming.Response`
    pieces of one reply.

    Their text skips special tokens; when a marker of the format is one (Mistral's
    ``[TOOL_CALLS]``), the reply is decoded here again with special tokens kept, except the
    token that ended it.
    """

    def __init__(self, fmt: ToolFormat, names, tokenizer=None, stop=(), end_ids=(), deltas: bool = False):
        self.parser = CallParser(fmt, names, deltas)
        self.calls = 0
        self._text = (TextStream(tokenizer, stop, end_ids, skip_special_tokens=False)
                      if special_markers(fmt, tokenizer) else None)

    def push(self, r) -> list:
        """The events that ``r`` (a Response) decides; the last Response closes the parser."""
        text = r.text
        if self._text is not None:
            if r.token is not None:  # the token that ended the reply adds no text (TextStream.end_ids)
                text = self._text.piece(r.token, r.finish_reason)[0]
            else:
                text = self._text.close() if r.finish_reason is not None else ""
        events = self.parser.feed(text)
        if r.finish_reason is not None:
            events += self.parser.close()
        self.calls += sum(isinstance(e, ToolCall) for e in events)
        return events

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's ``tool_calls`` for a reply that ended by itself ("stop") after calls."""
        return "tool_calls" if reason == "stop" and self.calls else reason
