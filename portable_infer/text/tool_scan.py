"""A call segment read as it is generated: which calls have begun, their names, and how much of
their arguments is written. This is what a stream sends before a call is whole.

A *segment* is the text of one place where calls are written, from the format's opening marker
on (:mod:`portable_infer.text.tool_formats`): one tagged call (hermes), one call of the named layout
(mistral_v11), a whole array of calls (mistral) or a whole reply of calls (llama3_json).
:class:`CallTracker` reads it character by character, once, keeping a JSON scanner's state
(depth, inside a string, the current key) between pieces::

    <tool_call>\\n{"name": "f", "arguments": {"city": "Pa      -> call 0: name "f", arguments from `{`
    [TOOL_CALLS]f[ARGS]{"city": "Pa                          -> the same, in the named layout

It only finds where things are; whether a segment is a valid call is decided when it is whole
(:class:`portable_infer.text.tool_calls.CallParser`).
"""

from __future__ import annotations

import json

from portable_infer.text.tool_formats import ToolCallDelta, ToolFormat

ARGS_KEYS = ("arguments", "parameters")
CALL_ID = "[CALL_ID]"  # Mistral v13 templates write "name[CALL_ID]id[ARGS]{...}"


class TrackedCall:
    """One call of a segment as read so far: ``name`` (None until its string is whole), where
    its arguments object starts and ends in the segment (None: not yet), its ``index`` in the
    reply and ``id`` once its head is out (index -1: a name not offered, never sent), and how
    many characters of its arguments were sent."""

    __slots__ = ("name", "args", "args_end", "index", "id", "sent")

    def __init__(self, name: str | None = None):
        self.name, self.args, self.args_end = name, None, None
        self.index, self.id, self.sent = None, None, 0


class CallTracker:
    """Reads one call segment as it grows (:meth:`advance` with the segment so far, each time
    longer); :meth:`pending` gives the pieces of calls it may send now."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.calls: list = []
        self.text = ""
        self._pos = 0
        self._state = "start"  # start | name | lead | object | after | end | dead
        self._args_only = fmt.layout == "named"  # the object read is the arguments themselves
        self._depth, self._in_str, self._esc, self._str_at = 0, False, False, 0
        self._key, self._value = None, False  # the key of the top-level object being read, after its ':'

    def advance(self, text: str) -> None:
        """Read ``text`` (the segment so far; it extends the text given before)."""
        self.text = text
        steps = {"start": self._start, "name": self._name, "lead": self._lead, "object": self._object,
                 "after": self._after}
        while self._pos < len(text) and self._state in steps and steps[self._state](text):
            pass

    def pending(self, names, next_index) -> list:
        """The :class:`ToolCallDelta` pieces not sent yet: a call's head once its name is read
        (and offered: ``names``; ``next_index()`` numbers it), then its arguments as written."""
        out = []
        for call in self.calls:
            if call.index is None and call.name is not None:
                if call.name not in names:
                    call.index = -1  # it will be content: never sent
                    continue
                call.index, call.id = next_index(), self.fmt.new_id()
                out.append(ToolCallDelta(call.index, id=call.id, name=call.name))
            if call.index is not None and call.index >= 0 and call.args is not None:
                end = call.args_end if call.args_end is not None else len(self.text)
                piece = self.text[call.args + call.sent:end]
                if piece:
                    call.sent += len(piece)
                    out.append(ToolCallDelta(call.index, piece))
        return out

    def span(self, call: TrackedCall) -> str | None:
        """The arguments object's text of a call read whole, else None."""
        return None if call.args is None or call.args_end is None else self.text[call.args:call.args_end]

    def sent(self, call: TrackedCall) -> str:
        """The arguments text already sent for ``call``."""
        return "" if call.args is None else self.text[call.args:call.args + call.sent]

    # --- the states: each reads what it can and says whether to go on ------------------------------
    def _skip(self, text: str) -> int:
        i = self._pos
        while i < len(text) and text[i].isspace():
            i += 1
        self._pos = i
        return i

    def _start(self, text: str) -> bool:
        fmt = self.fmt
        if fmt.layout == "bare":  # optional marker after whitespace
            i = self._skip(text)
            rest = text[i:]
            if rest.startswith(fmt.open):
                self._pos = i + len(fmt.open)
            elif fmt.open.startswith(rest):
                return False
            self._state = "lead"
            return True
        if len(text) < len(fmt.open):
            return False
        self._pos = len(fmt.open)
        self._state = {"array": "after", "named": "name"}.get(fmt.layout, "lead")
        return True

    def _name(self, text: str) -> bool:
        at = text.find(self.fmt.mid, self._pos)
        if at < 0:
            return False
        name = text[self._pos:at].split(CALL_ID)[0].strip()
        self.calls.append(TrackedCall(name))
        self._pos, self._state = at + len(self.fmt.mid), "lead"
        return True

    def _lead(self, text: str) -> bool:
        i = self._skip(text)
        if i == len(text):
            return False
        if text[i] != "{":
            self._state = "dead"
            return False
        if not self._args_only:
            self.calls.append(TrackedCall())
        self._state = "object"
        return True

    def _after(self, text: str) -> bool:
        """Between calls: the array's "[", "," and "]", the bare layout's separator."""
        i = self._skip(text)
        if i == len(text):
            return False
        layout, c = self.fmt.layout, text[i]
        if layout == "array" and c in "[,":
            self._pos, self._state = i + 1, "lead"
        elif layout == "bare" and c == self.fmt.sep.strip():
            self._pos, self._state = i + 1, "lead"
        else:
            self._state = "end" if (layout == "array" and c == "]") or layout in ("tagged", "named") else "dead"
        return self._state == "lead"

    def _object(self, text: str) -> bool:
        call, i, n = self.calls[-1], self._pos, len(text)
        top = 0 if self._args_only else 1  # the depth inside which the arguments object opens
        while i < n:
            c = text[i]
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
                    if self._depth == 1 and not self._args_only:
                        self._string(text[self._str_at:i + 1], call)
            elif c == '"':
                self._in_str, self._str_at = True, i
            elif c in "{[":
                if c == "{" and call.args is None and self._depth == top and (
                        self._args_only or (self._value and self._key in ARGS_KEYS)):
                    call.args = i
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if call.args is not None and call.args_end is None and self._depth == top:
                    call.args_end = i + 1
                if self._depth <= 0:
                    self._pos, self._state = i + 1, "after"
                    self._depth, self._key, self._value = 0, None, False
                    return True
            elif self._depth == 1 and c == ":":
                self._value = True
            elif self._depth == 1 and c == ",":
                self._key, self._value = None, False
            i += 1
        self._pos = i
        return False

    def _string(self, literal: str, call: TrackedCall) -> None:
        """A string of the top-level object ended: a key, or the name's value."""
        try:
            value = json.loads(literal)
        except ValueError:
            return
        if not self._value:
            self._key = value
        elif self._key == "name" and call.name is None and isinstance(value, str):
            call.name = value
