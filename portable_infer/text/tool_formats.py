"""How models write tool calls: the format table, the format of a chat template, and the plain
data a parsed reply is made of.

::

    FORMATS        name -> ToolFormat, in the order detection tries them
      hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (Qwen 2.5/3, Hermes)
      mistral_v11  [TOOL_CALLS]f[ARGS]{...}[TOOL_CALLS]g[ARGS]{...}       (Mistral v11+ templates)
      mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]   (Mistral v0.3)
      llama3_json  {"name": "f", "parameters": {...}}; {...}    the whole reply   (Llama 3.1-3.3)
    detect_format  the format a chat template's text shows, or the one a caller names
    ToolCall       one whole call (id, name, arguments as JSON text)
    ToolCallDelta  a piece of a streamed call: its head (index, id, name) or more of its arguments
"""

from __future__ import annotations

import secrets
import string
import uuid
from dataclasses import dataclass

from portable_infer.errors import InvalidArgumentError


@dataclass(frozen=True)
class ToolFormat:
    """How one family writes tool calls.

    ``layout``: ``tagged`` (each call between ``open`` and ``close``, ``pad`` inside the tags),
    ``array`` (``open`` then one JSON array of calls), ``named`` (each call is ``open``, the name,
    ``mid``, then the arguments object) or ``bare`` (the reply is the calls, JSON objects joined by
    ``sep``, optionally after ``open``). ``args``: the key of the arguments. ``around``: the
    whitespace the format itself writes before and after a call (not the reply's content).
    ``detect``: strings that all appear in a chat template of this format. ``id_alphabet`` /
    ``id_length``: a call id's random part (Mistral's templates take 9 letters or digits only).
    """

    name: str
    layout: str
    open: str
    close: str = ""
    pad: str = ""
    sep: str = ""
    mid: str = ""
    around: str = ""
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

    @property
    def markers(self) -> tuple:
        """The format's marker strings (those a tokenizer may hold as special tokens)."""
        return tuple(m for m in (self.open, self.close, self.mid) if m)


_MISTRAL_IDS = dict(id_prefix="", id_alphabet=string.ascii_letters + string.digits, id_length=9)
FORMATS = {  # the first whose ``detect`` strings are all in the template wins
    "hermes": ToolFormat("hermes", "tagged", "<tool_call>", "</tool_call>", pad="\n", sep="\n", around="\n",
                         detect=("<tool_call>",)),
    "mistral_v11": ToolFormat("mistral_v11", "named", "[TOOL_CALLS]", mid="[ARGS]", detect=("[TOOL_CALLS]", "[ARGS]"),
                              **_MISTRAL_IDS),
    "mistral": ToolFormat("mistral", "array", "[TOOL_CALLS]", detect=("[TOOL_CALLS]",), **_MISTRAL_IDS),
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


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed call. A call's first piece has its ``id`` and ``name`` (and no
    arguments); the next ones add to its ``arguments`` text. ``index``: the call's place in the
    reply. Joined in order, a call's pieces give its :class:`ToolCall`."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_dict(self) -> dict:
        """OpenAI's ``delta.tool_calls[]`` entry (the SDK's ChatCompletionStreamState joins them)."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}
