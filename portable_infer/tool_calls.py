"""Tool calls in a model's output: the format table, and the parser that turns text into content
and calls, whole or streamed.

::

    FORMATS        name -> ToolFormat: how a family writes its calls, and the text of a chat
                   template that shows it uses that way
      hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (Qwen 2.5/3, Hermes)
      llama3_json  {"name": "f", "parameters": {...}}; {...}    the whole reply   (Llama 3.1-3.3)
      mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]          (Mistral v0.3)
    detect_format  the format of a chat template's text, or the one a caller names
    CallParser     text in (all at once, or piece by piece) -> events: str (content) | ToolCall
    CallStream     the same over the engine's Responses (with the special-token text a marker
                   that is a special token needs)

A call is kept only when its JSON parses into ``{"name": <an offered tool>, "arguments" (or
"parameters"): {...}}``; anything else, a malformed call included, stays content: what a model
writes is never an error. Whitespace next to a call is dropped (the newlines between Hermes tags);
other text is kept as written. A tail of text that may be the start of a marker is held back until
the next piece settles it, so a stream never shows half a marker as content. The grammars that
enforce ``tool_choice: "required"`` or a named function are :mod:`portable_infer.tool_specs`'.
"""

from __future__ import annotations

import json
import secrets
import string
import uuid
from dataclasses import dataclass

from .errors import InvalidArgumentError
from .streaming import TextStream

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolFormat:
    """How one family writes tool calls.

    ``layout``: ``tagged`` (each call between ``open`` and ``close``, ``pad`` inside the tags),
    ``array`` (``open`` then one JSON array of calls) or ``bare`` (the reply is the calls, JSON
    objects joined by ``sep``, optionally after ``open``). ``args``: the key of the arguments.
    ``detect``: strings that all appear in a chat template of this format. ``id_alphabet`` /
    ``id_length``: a call id's random part (Mistral's templates take 9 letters or digits only).
    """

    name: str
    layout: str
    open: str
    close: str = ""
    pad: str = ""
    sep: str = ""
    args: str = "arguments"
    detect: tuple = ()
    id_prefix: str = "call_"
    id_alphabet: str | None = None  # None: hex digits of a uuid4
    id_length: int = 24

    def new_id(self) -> str:
        """A fresh call id (``call_`` and 24 hex digits; 9 letters or digits for Mistral)."""
        if self.id_alphabet is None:
            return self.id_prefix + uuid.uuid4().hex[: self.id_length]
        return self.id_prefix + "".join(secrets.choice(self.id_alphabet) for _ in range(self.id_length))


FORMATS = {  # the first whose ``detect`` strings are all in the template wins
    "hermes": ToolFormat("hermes", "tagged", "<tool_call>", "</tool_call>", pad="\n", sep="\n",
                         detect=("<tool_call>",)),
    "mistral": ToolFormat("mistral", "array", "[TOOL_CALLS]", detect=("[TOOL_CALLS]",), id_prefix="",
                          id_alphabet=string.ascii_letters + string.digits, id_length=9),
    "llama3_json": ToolFormat("llama3_json", "bare", "<|python_tag|>", sep="; ", args="parameters",
                              detect=('"parameters"', "ipython")),
}


def detect_format(template_source: str | None, override: str | None = None) -> ToolFormat:
    """The tool-call format: ``override`` (a name of :data:`FORMATS`) or the one the chat template
    shows; :class:`InvalidArgumentError` (param ``tools``) when neither gives one."""
    names = ", ".join(FORMATS)
    if override is not None:
        if override not in FORMATS:
            raise InvalidArgumentError(f"tool_parser must be one of {names}, got {override!r}", param="tool_parser")
        return FORMATS[override]
    for fmt in FORMATS.values():
        if template_source and all(s in template_source for s in fmt.detect):
            return fmt
    raise InvalidArgumentError(f"this model's chat template shows none of the tool-call formats this library "
                               f"parses ({names}), so calls in its output could not be read; leave tools out, or "
                               f"name the format the model was trained on (tool_parser=..., or `portable-infer "
                               f"serve --tool-parser NAME`)", param="tools")


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: ``arguments`` is a JSON object as text, as in OpenAI's API."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict:
        """OpenAI's ``tool_calls[]`` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


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


class CallParser:
    """Splits a reply into content and calls, fed whole or in pieces (see the module doc).

    Args:
        fmt: the :class:`ToolFormat`.
        names: the offered tools' names; a call of another name is content.

    Example:
        >>> p = CallParser(FORMATS["hermes"], {"f"})
        >>> events = p.feed('Sure.\\n<tool_call>\\n{"name": "f", "arguments": {}}\\n</tool_call>') + p.close()
        >>> events[0], events[1].name
        ('Sure.', 'f')
    """

    def __init__(self, fmt: ToolFormat, names):
        self.fmt, self.names = fmt, frozenset(names)
        self._buf = ""
        self._ws = ""  # trailing whitespace held until the next text shows it is not before a call
        self._after_call = False  # drop the whitespace that follows a call
        self._bare = None  # bare layout: None undecided, True the reply is calls, False it is text

    def feed(self, text: str) -> list:
        """Events (str content pieces and :class:`ToolCall` objects) decided by ``text`` so far."""
        self._buf += text
        return self._emit(False)

    def close(self) -> list:
        """The events left at the end of the reply (a held marker start, an unclosed call)."""
        events = self._emit(True)
        if self._ws:
            events.append(self._ws)
            self._ws = ""
        return events

    def _emit(self, final: bool) -> list:
        scan = {"tagged": self._scan_tagged, "array": self._scan_array, "bare": self._scan_bare}[self.fmt.layout]
        items, used = scan(final)
        self._buf = self._buf[used:]
        events = []
        for kind, raw in items:
            calls = self._calls(raw) if kind == "call" else None
            if calls is None:
                self._text(raw, events)
            else:
                self._ws, self._after_call = "", True
                events.extend(calls)
        return events

    def _text(self, text: str, events: list) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._ws + text
        kept = text.rstrip()
        self._ws = text[len(kept):]
        if kept:
            events.append(kept)

    # --- where calls are, per layout: (items, characters of the buffer decided) ---------------------
    def _scan_tagged(self, final: bool) -> tuple:
        buf, fmt, items, pos = self._buf, self.fmt, [], 0
        while True:
            start = buf.find(fmt.open, pos)
            if start < 0:
                end = len(buf) if final else len(buf) - _partial(buf[pos:], fmt.open)
                if end > pos:
                    items.append(("text", buf[pos:end]))
                return items, max(end, pos)
            if start > pos:
                items.append(("text", buf[pos:start]))
            stop = buf.find(fmt.close, start + len(fmt.open))
            if stop < 0:  # an unclosed call: a call if its JSON is whole at the end, else content
                if final:
                    items.append(("call", buf[start:]))
                    return items, len(buf)
                return items, start
            pos = stop + len(fmt.close)
            items.append(("call", buf[start:pos]))

    def _scan_array(self, final: bool) -> tuple:
        buf, fmt, items, pos = self._buf, self.fmt, [], 0
        while True:
            start = buf.find(fmt.open, pos)
            if start < 0:
                end = len(buf) if final else len(buf) - _partial(buf[pos:], fmt.open)
                if end > pos:
                    items.append(("text", buf[pos:end]))
                return items, max(end, pos)
            if start > pos:
                items.append(("text", buf[pos:start]))
            body = start + len(fmt.open)
            while body < len(buf) and buf[body].isspace():
                body += 1
            try:
                _, pos = _DECODER.raw_decode(buf, body)
            except ValueError:  # not whole yet, or never: decided at the end
                if final:
                    items.append(("call", buf[start:]))
                    return items, len(buf)
                return items, start
            items.append(("call", buf[start:pos]))

    def _scan_bare(self, final: bool) -> tuple:
        buf, fmt = self._buf, self.fmt
        if self._bare is None:
            head = buf.lstrip()
            if head.startswith(("{", fmt.open)):
                self._bare = True
            elif head and not fmt.open.startswith(head):
                self._bare = False
            elif not final:
                return [], 0
        if self._bare:
            return ([("call", buf)], len(buf)) if final else ([], 0)
        return ([("text", buf)] if buf else []), len(buf)

    # --- one call segment -> ToolCalls, or None (it stays content) ----------------------------------
    def _calls(self, raw: str) -> list | None:
        fmt = self.fmt
        body = raw.lstrip()  # a bare reply may start with whitespace
        body = body[len(fmt.open):] if body.startswith(fmt.open) else body
        if fmt.close and body.endswith(fmt.close):
            body = body[: -len(fmt.close)]
        values = _decode_objects(body, fmt.sep if fmt.layout == "bare" else "")
        if values is None or not values:
            return None
        if fmt.layout == "array":
            if len(values) != 1 or not isinstance(values[0], list) or not values[0]:
                return None
            values = values[0]
        elif fmt.layout == "tagged" and len(values) != 1:
            return None
        calls = [self._call(v) for v in values]
        return None if any(c is None for c in calls) else calls

    def _call(self, obj) -> ToolCall | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in self.names:
            return None
        keys = set(obj) - {"name"}
        if len(keys) > 1 or not keys <= {"arguments", "parameters"}:
            return None
        args = obj[keys.pop()] if keys else {}
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return ToolCall(self.fmt.new_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def special_markers(fmt: ToolFormat, tokenizer) -> dict:
    """``{marker: token id}`` for the format's markers that are special tokens of ``tokenizer``
    (decoding skips those: the parser then reads text decoded with them)."""
    if tokenizer is None:
        return {}
    added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return {m: added[m] for m in (fmt.open, fmt.close) if m and m in added}


class CallStream:
    """A :class:`CallParser` fed with the engine's :class:`~portable_infer.streaming.Response`
    pieces of one reply.

    Their text skips special tokens; when a marker of the format is one (Mistral's
    ``[TOOL_CALLS]``), the reply is decoded here again with special tokens kept, except the
    token that ended it.
    """

    def __init__(self, fmt: ToolFormat, names, tokenizer=None, stop=(), end_ids=()):
        self.parser = CallParser(fmt, names)
        self.calls = 0
        self._text = TextStream(tokenizer, stop, skip_special_tokens=False) if special_markers(fmt, tokenizer) else None
        self._end_ids = frozenset(end_ids)

    def push(self, r) -> list:
        """The events that ``r`` (a Response) decides; the last Response closes the parser."""
        text = r.text
        if self._text is not None:
            text = ""
            if r.token is not None and not (r.finish_reason == "stop" and r.token in self._end_ids):
                text, _ = self._text.push(r.token)
            if r.finish_reason is not None:
                text += self._text.close()
        events = self.parser.feed(text)
        if r.finish_reason is not None:
            events += self.parser.close()
        self.calls += sum(isinstance(e, ToolCall) for e in events)
        return events

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's ``tool_calls`` for a reply that ended by itself ("stop") after calls."""
        return "tool_calls" if reason == "stop" and self.calls else reason
