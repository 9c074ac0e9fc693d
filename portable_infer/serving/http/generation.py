"""The /v1 completion routes' work after authentication: admission, tokenizing off the event loop,
submission to the scheduler, and the answer (JSON, or server-sent events ending in ``[DONE]``),
each request tracked as a :class:`~.lifecycle.Flight` so that a shutdown can drain or cut it off.

::

    lifecycle.admit ── 503 while shutting down
      read_json ── admission.check (sizes, capacity) ── admission.run(parse) on the tokenizer pool
      submit_ids ── JSON: complete()            cancelled when the client goes away
                 └─ SSE: _FlightStream(sse())   cancelled when the client goes away; ends the flight
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

from fastapi import Request
from fastapi.responses import StreamingResponse

from portable_infer.errors import CapacityError, InvalidArgumentError, PortableInferError
from portable_infer.serving.http import protocol
from portable_infer.serving.http.lifecycle import Lifecycle
from portable_infer.serving.http.logprobs import TokenNames
from portable_infer.serving.http.protocol import APIError, Reply
from portable_infer.serving.http.tools import ToolReplies


class Generation:
    """``await generation(request, parse, chat)`` answers one completion request (see the module doc)."""

    def __init__(self, scheduler, config, served: str, limits, admission, lifecycle: Lifecycle, log, read_json):
        self.scheduler, self.config, self.served, self.limits = scheduler, config, served, limits
        self.admission, self.lifecycle, self.log, self.read_json = admission, lifecycle, log, read_json

    def submit(self, parsed: protocol.ParsedRequest):
        try:
            return self.scheduler.submit_ids(parsed.prompt_ids, parsed.params)
        except CapacityError as exc:
            retry = max(1, math.ceil(exc.retry_after))
            raise APIError(429, f"{exc}", type="rate_limit_error", code="server_overloaded",
                           headers={"Retry-After": str(retry)}) from exc
        except PortableInferError as exc:
            raise protocol.from_engine_error(exc) from exc

    async def __call__(self, request: Request, parse, chat: bool):
        flight = self.lifecycle.admit()
        if flight is None:
            raise shutting_down(self.config)
        try:
            body = await self.read_json(request)
            protocol.check_model(body, self.served)
            # the field table first (cheap): a bad request is a 400 whatever the load
            protocol.fields.check(body, "body", protocol.CHAT if chat else protocol.COMPLETIONS)
            self.admission.check(body, chat)  # sizes and capacity, before any tokenizing
            # the tokenizer and the chat template run off the event loop
            parsed = await self.admission.run(parse, body, self.scheduler.model, self.limits)
            if flight.aborted:
                raise shutting_down(self.config)
            flight.handle = handle = self.submit(parsed)
            names = TokenNames(self.scheduler.model) if parsed.params.logprobs is not None else None
            reply = Reply(chat, self.served, names=names)
            tools = None if parsed.tools is None else ToolReplies(parsed.tools, self.scheduler.codec, parsed.params)
            if parsed.stream:  # the stream ends the flight when it is sent (or abandoned)
                stream = sse(handle, reply, parsed.include_usage, flight, self.config, self.log, tools)
                response, flight = _FlightStream(stream, self.lifecycle, flight), None
                return response
            return await self.complete(request, handle, reply, flight, tools)
        finally:
            if flight is not None:
                self.lifecycle.done(flight)

    async def complete(self, request: Request, handle, reply: Reply, flight, tools: ToolReplies | None = None):
        watcher = asyncio.create_task(cancel_on_disconnect(request, handle, self.log))
        try:
            text, last, pieces = [], None, []
            async for r in handle:
                text.append(r.text)
                last = r
                if tools is not None:
                    tools.push(r)
                if r.logprob is not None:
                    pieces.append(r)
        except PortableInferError as exc:
            raise generation_error(exc) from exc
        finally:
            watcher.cancel()
            if not handle.done:
                handle.cancel()
        if flight.aborted and last.finish_reason == "cancelled":
            raise shutting_down(self.config, unfinished=True)
        if tools is not None:
            return reply.full("", tools.finish_reason(last.finish_reason), handle.prompt_tokens,
                              last.generation_tokens, pieces, message=tools.message())
        return reply.full("".join(text), last.finish_reason, handle.prompt_tokens, last.generation_tokens, pieces)


def generation_error(exc: PortableInferError) -> APIError:
    """A request that failed while generating: its own bad values (an InvalidArgumentError, e.g. a
    penalty that overflows the logits) are the client's error (400 naming the param); the rest 500."""
    if isinstance(exc, InvalidArgumentError):
        return protocol.bad(f"{exc}", param=exc.param)
    return APIError(500, f"generation failed: {exc}", "server_error")


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


def shutting_down(config, unfinished: bool = False) -> APIError:
    """The 503 of a request refused (or, ``unfinished``, cut off) by the shutdown."""
    if unfinished:
        message = (f"the server shut down before this request finished (it ran past the "
                   f"{config.shutdown_timeout_s:g} s shutdown period); send it again")
    else:
        message = "the server is shutting down; send the request again (another replica will take it)"
    return APIError(503, message, type="server_error", code="server_shutting_down",
                    headers={"Connection": "close", "Retry-After": "1"})


async def sse(handle, reply: Reply, include_usage: bool, flight=None, config=None, log=None, tools=None):
    """Server-sent events of one request, ending in ``[DONE]``, after an error event if it failed
    or was cut off by the shutdown; cancelling (client gone) cancels the request. ``tools``: the
    :class:`~.tools.ToolReplies` that shape a reply with tool calls."""
    try:
        if reply.chat:  # with tools the content may stay null (only calls): it starts null, as OpenAI's
            yield _event(reply.chunk(None, None, role=True, delta=None if tools is None else
                                     {"role": "assistant", "content": None}))
        last, pieces = None, []  # pieces: tokens whose logprobs go out with the next chunk
        try:
            async for r in handle:
                # a stream that fell behind sends what is queued as one chunk (its text joined, its
                # tokens' logprobs together): one event per step, not per token, when the loop is busy
                group = [r] if tools is not None else [r, *handle.ready()]
                r = last = group[-1]
                if flight is not None and flight.aborted and r.finish_reason == "cancelled":
                    yield _event(shutting_down(config, unfinished=True).body())
                    yield DONE
                    return
                pieces += [p for p in group if p.logprob is not None]
                if tools is not None:
                    chunks = tools.chunks(r, reply, pieces)
                else:
                    text = r.text if len(group) == 1 else "".join(p.text for p in group)
                    chunks = [reply.chunk(text, r.finish_reason, pieces=pieces)] if text or r.finish_reason else []
                for chunk in chunks:
                    yield _event(chunk)
                if chunks:
                    pieces = []
        except PortableInferError as exc:
            yield _event(generation_error(exc).body())
            yield DONE
            return
        if include_usage and last is not None:
            yield _event(reply.usage_chunk(handle.prompt_tokens, last.generation_tokens))
        yield DONE
    finally:
        if not handle.done:
            if log is not None:
                log.note("client_disconnect", "a client went away before its stream ended; its request was "
                         "cancelled", level=logging.INFO)
            handle.cancel()


class _FlightStream(StreamingResponse):
    """The SSE response of one request in flight. However it ends (sent, client gone, never
    started), the request is cancelled if it still runs and the flight ends."""

    def __init__(self, content, lifecycle: Lifecycle, flight):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.lifecycle, self.flight = lifecycle, flight

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            handle = self.flight.handle
            if handle is not None and not handle.done:
                handle.cancel()
            self.lifecycle.done(self.flight)


async def cancel_on_disconnect(request: Request, handle, log=None) -> None:
    """Wait for the client to go away, then cancel ``handle`` (for non-streaming requests)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            if log is not None and not handle.done:
                log.note("client_disconnect", "a client went away before its response; its request was "
                         "cancelled", level=logging.INFO)
            handle.cancel()
            return
