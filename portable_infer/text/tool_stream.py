"""A chat reply with tools, token by token: the one splitter of the engine's Responses into content
deltas and tool-call deltas, used by the Python API (``Model.stream_chat``, ``Scheduler.submit_chat``
with ``tools=``) and by the HTTP server (which writes each :class:`ChatDelta` as OpenAI chunks).

::

    ChatStream.push(Response) -> ChatDelta      one per token
      content        new content text ("" when the token decided none)
      tool_calls     ToolCallDelta pieces: a call's head (index, id, name), then its arguments
      finish_reason  on the last: "tool_calls" when the reply ended by itself after a call
      message        on the last: the whole reply as a ChatMessage (content, tool_calls)
      response       the Response behind it (token, logprobs, counts, timings)

The whole reply is what a reply not streamed gets: content and whole calls. Streamed pieces are
never taken back, so a call that went out in part and then turned out malformed (or was cut off
by max_new_tokens) is, in the whole reply, content; the stream has sent the same content besides
(see :mod:`portable_infer.text.tool_calls`).
"""

from __future__ import annotations

from dataclasses import dataclass

from portable_infer.text.streaming import Response
from portable_infer.text.tool_formats import ToolCall, ToolCallDelta


@dataclass(frozen=True)
class ChatMessage:
    """The assistant's reply to a chat with tools: its text (None when it only called tools), its
    :class:`~portable_infer.text.tool_formats.ToolCall` objects, and why it ended (``"tool_calls"`` when
    it ended by itself after calls, else ``"stop"`` or ``"length"``)."""

    content: str | None
    tool_calls: tuple = ()
    finish_reason: str | None = None

    @classmethod
    def from_events(cls, events: list, finish_reason: str | None) -> ChatMessage:
        calls = tuple(e for e in events if isinstance(e, ToolCall))
        text = "".join(e for e in events if isinstance(e, str))
        return cls(text if text or not calls else None, calls, finish_reason)

    def to_dict(self) -> dict:
        """The message to append to the conversation (OpenAI's form; the template reads it back)."""
        out = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        return out


@dataclass(frozen=True)
class ChatDelta:
    """One token's worth of a chat reply with tools (see the module doc)."""

    content: str = ""
    tool_calls: tuple = ()
    finish_reason: str | None = None
    response: Response | None = None
    message: ChatMessage | None = None


class ChatStream:
    """Responses of one reply -> :class:`ChatDelta` objects, and the whole reply.

    Args:
        plan: the request's :class:`~portable_infer.text.tool_specs.ToolPlan`, or None (tools not
            shown to the model: the text is all content).
        tokenizer, params, eos_ids: what reads the reply's markers (see ``ToolPlan.stream``).
    """

    def __init__(self, plan=None, tokenizer=None, params=None, eos_ids=()):
        self.calls = None if plan is None else plan.stream(tokenizer, params, eos_ids, deltas=True)
        self.events: list = []  # the whole reply's content pieces and calls
        self.reason: str | None = None

    def push(self, r: Response) -> ChatDelta:
        """The delta of ``r``; the last one (``r.finish_reason`` set) carries the whole message."""
        events = ([r.text] if r.text else []) if self.calls is None else self.calls.push(r)
        pieces = tuple(e for e in events if isinstance(e, ToolCallDelta))
        self.events += [e for e in events if not isinstance(e, ToolCallDelta)]
        content = "".join(e for e in events if isinstance(e, str))
        if r.finish_reason is None:
            return ChatDelta(content, pieces, response=r)
        self.reason = self.finish_reason(r.finish_reason)
        return ChatDelta(content, pieces, self.reason, r, self.message())

    def finish_reason(self, reason: str | None) -> str | None:
        """``tool_calls`` for a reply that ended by itself ("stop") after whole calls."""
        return reason if self.calls is None else self.calls.finish_reason(reason)

    def message(self) -> ChatMessage:
        """The whole reply so far (all of it once the last Response was pushed)."""
        return ChatMessage.from_events(self.events, self.reason)
