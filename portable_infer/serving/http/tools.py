"""Tool calling over HTTP: a chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``
into a :class:`~portable_infer.text.tool_specs.ToolPlan` (400s naming the field), and the reply's
``tool_calls`` in OpenAI's two shapes.

::

    whole     message {"role": "assistant", "content": str | null, "tool_calls": [{id, type, function}]}
    streamed  {"delta": {"tool_calls": [{"index": i, "id", "type": "function",
                                         "function": {"name", "arguments": ""}}]}}     a call's first delta
              {"delta": {"tool_calls": [{"index": i, "function": {"arguments": "..."}}]}}   more of its
              ...                                                                      arguments
              {"delta": {}, "finish_reason": "tool_calls"}

The deltas are :class:`~portable_infer.text.tool_stream.ChatStream`'s (the library's splitter): a
call's first delta goes out once its name is read, its arguments as they are generated. A call
that then turns out malformed is content in the whole reply; the stream, which cannot take back
what it sent, sends that content too. ``finish_reason`` is ``tool_calls`` when the reply ended by
itself after at least one whole call.
"""

from __future__ import annotations

from portable_infer.errors import InvalidArgumentError
from portable_infer.text.tool_specs import ToolPlan, plan_tools, template_messages
from portable_infer.text.tool_stream import ChatStream
from portable_infer.serving.http.apierror import bad


def parse_tools(body: dict, model, tool_parser: str | None) -> ToolPlan | None:
    """The request's :class:`ToolPlan` (None: no tools offered); a 400 naming the bad field."""
    try:
        return plan_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"),
                          model.codec.template_source, tool_parser)
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
        return plan.apply(params, model.codec.tokenizer)
    except InvalidArgumentError as exc:
        raise bad(str(exc), param=exc.param or "tool_choice") from exc


class ToolReplies:
    """The chunks (or the message) of one reply to a request with tools."""

    def __init__(self, plan: ToolPlan, codec, params):
        self.stream = ChatStream(plan, codec.tokenizer, params, codec.eos_ids)

    def push(self, r):
        """The :class:`~portable_infer.text.tool_stream.ChatDelta` of ``r`` (a Response)."""
        return self.stream.push(r)

    def message(self) -> dict:
        """The whole reply's assistant message."""
        return self.stream.message().to_dict()

    def finish_reason(self, reason: str | None) -> str | None:
        return self.stream.finish_reason(reason)

    def chunks(self, r, reply, pieces: list) -> list:
        """The stream chunks for ``r``: its content, each tool-call piece, then the finish chunk
        when ``r`` ends the reply; the logprobs of ``pieces`` ride on the first of them."""
        d = self.push(r)
        out = [{"content": d.content}] if d.content else []
        out += [{"tool_calls": [t.to_dict()]} for t in d.tool_calls]
        if d.finish_reason is not None:
            out.append({})
        return [reply.chunk(None, d.finish_reason if i == len(out) - 1 else None, pieces=pieces if i == 0 else (),
                            delta=delta) for i, delta in enumerate(out)]
