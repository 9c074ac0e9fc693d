"""Tool calling over HTTP: a chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``
into a :class:`~portable_infer.tool_specs.ToolPlan` (400s naming the field), and the reply's
``tool_calls`` in OpenAI's two shapes.

::

    whole     message {"role": "assistant", "content": str | null, "tool_calls": [{id, type, function}]}
    streamed  {"delta": {"tool_calls": [{"index": i, "id", "type": "function",
                                         "function": {"name", "arguments": ""}}]}}     a call's first delta
              {"delta": {"tool_calls": [{"index": i, "function": {"arguments": "..."}}]}}   its arguments
              ... {"delta": {}, "finish_reason": "tool_calls"}

A call goes out once it is whole (its arguments in one piece), so a call that turns out malformed
is content, never half a call. ``finish_reason`` is ``tool_calls`` when the reply ended by itself
after at least one call.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError
from ..tool_calls import ToolCall
from ..tool_specs import ToolPlan, plan_tools, template_messages
from .apierror import bad


def parse_tools(body: dict, model, tool_parser: str | None) -> ToolPlan | None:
    """The request's :class:`ToolPlan` (None: no tools offered); a 400 naming the bad field."""
    source = model.chat_template.source if model.chat_template is not None else None
    try:
        return plan_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"), source,
                          tool_parser)
    except InvalidArgumentError as exc:
        raise bad(str(exc), param=exc.param or "tools") from exc


def chat_messages(messages: list) -> list:
    """The messages as the template reads them (tool calls' arguments as objects); a 400 naming
    a malformed call or tool result."""
    try:
        return template_messages(messages)
    except InvalidArgumentError as exc:
        raise bad(str(exc), param=exc.param or "messages") from exc


def apply_plan(plan: ToolPlan | None, params, model):
    """``params`` with the grammar of a required or named call; a 400 when it clashes."""
    if plan is None:
        return params
    try:
        return plan.apply(params, model.tokenizer)
    except InvalidArgumentError as exc:
        raise bad(str(exc), param=exc.param or "tool_choice") from exc


class ToolReplies:
    """The chunks (or the message) of one reply to a request with tools."""

    def __init__(self, plan: ToolPlan, model, params):
        self.stream = plan.stream(model.tokenizer, params, model.manifest.tokenizer.eos_token_ids)
        self.events: list = []
        self._index = 0

    def push(self, r) -> list:
        """The events ``r`` (a Response) decides; kept for :meth:`message`."""
        events = self.stream.push(r)
        self.events += events
        return events

    def message(self) -> dict:
        """The whole reply's assistant message."""
        calls = [e.to_dict() for e in self.events if isinstance(e, ToolCall)]
        text = "".join(e for e in self.events if isinstance(e, str))
        out = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            out["tool_calls"] = calls
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return self.stream.finish_reason(reason)

    def chunks(self, r, reply, pieces: list) -> list:
        """The stream chunks for ``r``: content deltas, a call's two deltas, then the finish chunk
        when ``r`` ends the reply; the logprobs of ``pieces`` ride on the first of them."""
        out, text = [], []
        for event in self.push(r):
            if isinstance(event, str):
                text.append(event)
                continue
            if text:
                out.append({"content": "".join(text)})
                text = []
            head = {"index": self._index, "id": event.id, "type": "function",
                    "function": {"name": event.name, "arguments": ""}}
            out += [{"tool_calls": [head]}, {"tool_calls": [{"index": self._index,
                                                             "function": {"arguments": event.arguments}}]}]
            self._index += 1
        if text:
            out.append({"content": "".join(text)})
        if r.finish_reason is not None:
            out.append({})
        chunks = []
        for i, delta in enumerate(out):
            reason = self.finish_reason(r.finish_reason) if i == len(out) - 1 and r.finish_reason else None
            chunks.append(reply.chunk(None, reason, pieces=pieces if i == 0 else (), delta=delta))
        return chunks
