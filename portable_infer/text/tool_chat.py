"""Chat with tools from Python, without a server: what ``Model.chat``, ``Model.stream_chat`` and
``Scheduler.submit_chat`` do when given ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` /
``tool_parser`` (the same checks, grammar and parsing as ``/v1/chat/completions``).

::

    prepare_chat(model, messages, tools...)  -> prompt ids, SamplingParams (with the grammar of a
                                                required or named call), a ChatStream for the reply
    stream_chat_with_tools(model, ...)       -> ChatDelta per token (Model.stream_chat)
    chat_with_tools(model, ...)              -> ChatMessage (Model.chat)
    submit_chat_with_tools(scheduler, ...)   -> ChatHandle (Scheduler.submit_chat): iterate it,
                                                sync or async, for ChatDeltas; message() waits

Example::

    for d in model.stream_chat(messages, tools=tools, tool_choice="required"):
        print(d.content, [(t.index, t.name, t.arguments) for t in d.tool_calls])
    d.message.tool_calls   # the last delta carries the whole reply: ToolCall(id, name, arguments)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from portable_infer.text.tool_specs import plan_tools
from portable_infer.text.tool_stream import ChatDelta, ChatMessage, ChatStream

__all__ = ["ChatHandle", "chat_with_tools", "prepare_chat", "stream_chat_with_tools", "submit_chat_with_tools",
           "wants_tools"]


def wants_tools(tools, tool_choice, parallel_tool_calls, tool_parser) -> bool:
    """Whether a chat call asked for tool calling (any of the four given)."""
    return not (tools is None and tool_choice is None and parallel_tool_calls is None and tool_parser is None)


def prepare_chat(model, messages, tools=None, tool_choice=None, parallel_tool_calls=None, tool_parser=None,
                 **sampling) -> tuple:
    """``(prompt ids, SamplingParams, ChatStream)`` of a chat with tools: the tools checked and
    rendered into the prompt, a required or named call's grammar in the params."""
    codec = model.codec
    plan = plan_tools(tools, tool_choice, parallel_tool_calls, codec.template_source, tool_parser)
    ids = codec.chat_ids(messages, tools=plan.template_tools if plan else None)
    params = model.params(**sampling)
    if plan is not None:
        params = plan.apply(params, codec.tokenizer)
    return ids, params, ChatStream(plan, codec.tokenizer, params, codec.eos_ids)


def stream_chat_with_tools(model, messages, tools=None, tool_choice=None, parallel_tool_calls=None,
                           tool_parser=None, *, truncate: bool = False, **sampling) -> Iterator[ChatDelta]:
    """:meth:`Model.stream_chat <portable_infer.model.Model.stream_chat>` with tools: one
    :class:`ChatDelta` per token; the last carries ``finish_reason`` and the whole ``message``."""
    ids, params, stream = prepare_chat(model, messages, tools, tool_choice, parallel_tool_calls, tool_parser,
                                       **sampling)
    for r in model.stream_tokens(ids, params, truncate):
        yield stream.push(r)


def chat_with_tools(model, messages, tools=None, tool_choice=None, parallel_tool_calls=None, tool_parser=None, *,
                    truncate: bool = False, **sampling) -> ChatMessage:
    """:meth:`Model.chat <portable_infer.model.Model.chat>` with tools: render them into the
    prompt, enforce a required or named call with a grammar, parse the reply."""
    ids, params, stream = prepare_chat(model, messages, tools, tool_choice, parallel_tool_calls, tool_parser,
                                       **sampling)
    for r in model.stream_tokens(ids, params, truncate):
        stream.push(r)
    return stream.message()


def submit_chat_with_tools(scheduler, messages, tools=None, tool_choice=None, parallel_tool_calls=None,
                           tool_parser=None, *, truncate: bool = False, **sampling) -> ChatHandle:
    """:meth:`Scheduler.submit_chat <portable_infer.serving.scheduler.Scheduler.submit_chat>` with tools."""
    ids, params, stream = prepare_chat(scheduler.model, messages, tools, tool_choice, parallel_tool_calls,
                                       tool_parser, **sampling)
    return ChatHandle(scheduler.submit_ids(ids, params, truncate=truncate), stream)


class ChatHandle:
    """A scheduled chat with tools: its :class:`~portable_infer.serving.handle.RequestHandle`'s Responses
    as :class:`ChatDelta` objects (``for d in h`` or ``async for d in h``), or the whole reply
    (:meth:`message`); ``cancel()`` drops it."""

    def __init__(self, handle, stream: ChatStream):
        self.handle, self.stream = handle, stream

    @property
    def id(self) -> str:
        return self.handle.id

    @property
    def prompt_tokens(self) -> int:
        return self.handle.prompt_tokens

    @property
    def stats(self):
        return self.handle.stats

    @property
    def done(self) -> bool:
        return self.handle.done

    def cancel(self) -> None:
        self.handle.cancel()

    def __iter__(self) -> Iterator[ChatDelta]:
        for r in self.handle:
            yield self.stream.push(r)

    def __aiter__(self) -> AsyncIterator[ChatDelta]:
        return self._deltas()

    async def _deltas(self):
        async for r in self.handle:
            yield self.stream.push(r)

    def message(self, timeout: float | None = None) -> ChatMessage:
        """Block until the reply ends (reading what was not read yet) and return it whole;
        TimeoutError when no token comes within ``timeout`` seconds."""
        while self.stream.reason is None:
            try:
                r = self.handle.get(timeout)
            except StopIteration:
                break
            self.stream.push(r)
        return self.stream.message()
