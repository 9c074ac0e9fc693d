"""OpenAI's wire format: request bodies -> (prompt ids, SamplingParams), and the response objects.

No web framework here: plain dicts in and out, so the rules are testable alone. Every key of a body
goes through the field table first (:mod:`.fields`: unknown, wrongly typed or unsupported -> 400
naming it); the JSON itself was bounded by :mod:`.jsonbody`. Errors are :class:`APIError`,
rendered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

from portable_infer.errors import ContextLengthError, InvalidArgumentError, PortableInferError
from portable_infer.decode.processors import LogitBias
from portable_infer.decode.sampling import SamplingParams
from portable_infer.text.tool_specs import ToolPlan
from portable_infer.serving.http import fields
from portable_infer.serving.http import logprobs as lp
from portable_infer.serving.http.apierror import APIError, bad, show
from portable_infer.serving.http.fields import CHAT, COMPLETIONS
from portable_infer.serving.http.tools import apply_plan, chat_messages, parse_tools

__all__ = ["APIError", "Limits", "ParsedRequest", "Reply", "check_model", "parse_chat", "parse_completion"]

# OpenAI body key -> SamplingParams field (the extra keys are vLLM's)
SAMPLING_KEYS = {
    "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop",
    "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
}
# OpenAI keys SamplingParams.from_kwargs reads as they are spelled (chat's logprobs is a bool, with
# top_logprobs; completions' an int; response_format becomes the constraint; logit_bias keys are
# decimal strings)
SPELLED_KEYS = ("logit_bias", "logprobs", "top_logprobs", "response_format")


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    # KV tokens one request may hold where the scheduler bounds them (its slots: the KV budget over
    # max_batch); None: the context. An omitted max_tokens asks for no more than fit (fitted()).
    max_request_tokens: int | None = None


@dataclass(frozen=True)
class ParsedRequest:
    prompt_ids: list
    params: SamplingParams
    stream: bool
    include_usage: bool
    chat: bool
    tools: ToolPlan | None = None  # chat: what a request that offers tools lets the model do


def check_model(body: dict, served: str) -> None:
    """A 400 when ``model`` is not a string, a 404 when it names another model; absent is fine."""
    name = body.get("model")
    if name is None:
        return
    fields.check_type(fields.TABLES[("body", COMPLETIONS)]["model"], name, "model")
    if name != served:
        raise APIError(404, f"The model {show(name)} does not exist; this server serves `{served}` (see /v1/models)",
                       param="model", code="model_not_found")


def sampling_params(body: dict, defaults: SamplingParams, limits: Limits) -> SamplingParams:
    """SamplingParams from the body's OpenAI keys over the model's defaults (OpenAI names in errors).

    The body's keys were checked against the field table; SamplingParams checks the ranges."""
    given = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    if len(given) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
        raise bad(f"max_tokens ({body['max_tokens']}) and max_completion_tokens ({body['max_completion_tokens']}) "
                  "differ; send one of them", param="max_completion_tokens")
    limit_key = given[-1] if given else "max_tokens"
    kw = {field: body[key] for key, field in SAMPLING_KEYS.items() if body.get(key) is not None}
    kw.update({key: body[key] for key in SPELLED_KEYS if body.get(key) is not None})
    if isinstance(kw.get("stop"), str):
        kw["stop"] = [kw["stop"]]
    if "max_new_tokens" not in kw:
        kw["max_new_tokens"] = min(defaults.max_new_tokens, limits.max_new_tokens)
    try:
        params = SamplingParams.from_kwargs(defaults, **kw)
    except InvalidArgumentError as exc:
        field = exc.param
        if field == "logprobs" and body.get("top_logprobs") is not None:
            field = "top_logprobs"  # chat: the count is top_logprobs
        key = limit_key if field == "max_new_tokens" else next(
            (k for k, f in SAMPLING_KEYS.items() if f == field and k in body), field)
        raise bad(str(exc).replace("max_new_tokens", key), param=key) from exc
    if params.max_new_tokens > limits.max_new_tokens:
        raise bad(f"{limit_key} is {params.max_new_tokens}, this server allows at most {limits.max_new_tokens}",
                  param=limit_key)
    return params


def prepare(model, params: SamplingParams) -> None:
    """Check logit_bias's ids against the vocabulary, compile the request's constraint (a bad
    schema is a 400 naming response_format) and build what naming logprob tokens needs: here, on
    the tokenizer pool, not at submission on the event loop (llguidance's tokenizer takes about a
    second the first time; a schema may take milliseconds). The scheduler reuses the grammar."""
    try:
        LogitBias(params.logit_bias, model.codec.vocab_size)  # its ids in the vocabulary
        if params.constraint is not None:
            model.guide.matcher(params.constraint)
        if params.logprobs is not None:
            lp.TokenNames(model).warm()
    except InvalidArgumentError as exc:
        raise bad(str(exc), param=exc.param or "response_format") from exc
    except PortableInferError as exc:  # no tokenizer, llguidance missing
        param = params.constraint.param if params.constraint is not None else "response_format"
        raise bad(str(exc), param=param, code="unsupported") from exc


def _flags(body: dict, endpoint: str) -> tuple:
    stream = body.get("stream") is True
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad("stream_options is only allowed with stream: true; leave it out", param="stream_options")
    fields.check(opts, "stream_options", endpoint, "stream_options")
    return stream, opts.get("include_usage") is True


def _check_length(ids: list, limits: Limits, param: str) -> list:
    if not ids:
        raise bad("the prompt is empty", param=param)
    if len(ids) > limits.max_prompt_tokens:
        raise bad(f"the prompt has {len(ids)} tokens, this server allows at most {limits.max_prompt_tokens}; "
                  f"shorten it", param=param, code="context_length_exceeded")
    return ids


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def parse_completion(body: dict, model, limits: Limits) -> ParsedRequest:
    """``/v1/completions``: one prompt (text, or token ids). Checks that need no tokenizer come first."""
    fields.check(body, "body", COMPLETIONS)
    stream, usage = _flags(body, COMPLETIONS)
    params = sampling_params(body, model.defaults, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
        vocab = model.codec.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise bad(f"token ids must lie in [0, {vocab})", param="prompt")
        ids = list(prompt)
    elif isinstance(prompt, str):
        ids = _encode(lambda: model.codec.encode(prompt), "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad(f"prompt holds {len(prompt)} prompts; this server takes one per request: send them as "
                  "separate requests", param="prompt", code="unsupported_parameter")
    else:
        got = "nothing" if prompt is None else show(prompt)
        raise bad(f"prompt must be a string, or a non-empty list of token ids (one prompt per request); got {got}",
                  param="prompt")
    ids = _check_length(ids, limits, "prompt")
    params = fitted(params, len(ids), body, limits)
    prepare(model, params)
    return ParsedRequest(ids, params, stream, usage, chat=False)


def parse_chat(body: dict, model, limits: Limits, tool_parser: str | None = None) -> ParsedRequest:
    """``/v1/chat/completions``: messages rendered with the package's chat template, with the
    request's tools (``tool_parser``: the server's --tool-parser, else the template's format)."""
    fields.check(body, "body", CHAT)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", param="messages")
    plain = chat_messages([_message(m, f"messages[{i}]") for i, m in enumerate(messages)])
    stream, usage = _flags(body, CHAT)
    plan = parse_tools(body, model, tool_parser)
    params = apply_plan(plan, sampling_params(body, model.defaults, limits), model)  # before the template
    tools = plan.template_tools if plan is not None else None
    ids = _check_length(_encode(lambda: model.codec.chat_ids(plain, tools=tools), "messages"), limits, "messages")
    params = fitted(params, len(ids), body, limits)
    prepare(model, params)
    return ParsedRequest(ids, params, stream, usage, chat=True, tools=plan)


def fitted(params: SamplingParams, prompt_len: int, body: dict, limits: Limits) -> SamplingParams:
    """``params`` with an omitted max_tokens cut to what fits beside the prompt where the server
    bounds a request's KV (``limits.max_request_tokens``), as OpenAI and vLLM cut it to the
    context; a max_tokens the client sent is kept (and refused by the scheduler if it does not fit)."""
    room = None if limits.max_request_tokens is None else limits.max_request_tokens - prompt_len
    sent = any(body.get(k) is not None for k in ("max_tokens", "max_completion_tokens"))
    if sent or room is None or room < 1 or params.max_new_tokens <= room:
        return params
    return dataclasses.replace(params, max_new_tokens=room)


def _message(m: dict, where: str) -> dict:
    """{role, content} of one message, and its tool_calls or tool_call_id; content parts joined
    (only text parts exist here); an assistant message with calls may have a null content."""
    fields.check(m, "message", CHAT, where)
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise bad(f"{where}.role must be a non-empty string", param=f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        texts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            fields.check(part, "content_part", CHAT, at)
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f'{at}: only text parts {{"type": "text", "text": "..."}} are supported, got {show(part)}',
                          param=at, code="unsupported_parameter")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and m.get("tool_calls") is not None:
        content = ""
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    out = {"role": role, "content": content}
    out.update({key: m[key] for key in ("tool_calls", "tool_call_id") if m.get(key) is not None})
    return out


def _encode(fn, param: str) -> list:
    try:
        return fn()
    except InvalidArgumentError as exc:
        raise bad(str(exc), param=param) from exc
    except PortableInferError as exc:  # no tokenizer or no chat template in the package
        raise bad(str(exc), param=param, code="unsupported") from exc


def from_engine_error(exc: Exception) -> APIError:
    """The HTTP error for an error the scheduler raised at submission."""
    if isinstance(exc, ContextLengthError):  # what to lower: the prompt, or the tokens asked for
        return bad(str(exc), param="max_tokens" if exc.param == "max_new_tokens" else "prompt",
                   code="context_length_exceeded")
    if isinstance(exc, InvalidArgumentError):
        return bad(str(exc), param=exc.param)
    return APIError(503, str(exc), type="server_error", code="unavailable")


# --- responses ------------------------------------------------------------------------------------
@dataclass
class Reply:
    """Ids and names shared by every chunk of one response."""

    chat: bool
    model: str
    id: str = ""
    created: int = 0
    names: lp.TokenNames | None = None  # set when the request asked for logprobs
    offset: int = 0  # completions' text_offset of the next token

    def _logprobs(self, pieces) -> dict | None:
        """The choice's ``logprobs`` for the tokens of ``pieces`` (None: not asked for)."""
        if self.names is None:
            return None
        if self.chat:
            return lp.chat(pieces, self.names)
        out, self.offset = lp.completion(pieces, self.names, self.offset)
        return out

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str | None, finish_reason: str | None, role: bool = False, pieces=(),
              delta: dict | None = None) -> dict:
        """One stream chunk; ``pieces``: the Responses whose tokens it reports logprobs of;
        ``delta``: a chat delta other than text (tool calls)."""
        logprobs = None if role else self._logprobs(pieces)
        if self.chat:
            if delta is None:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt: int, completion: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt, completion)}

    def full(self, text: str, finish_reason: str, prompt: int, completion: int, pieces=(),
             message: dict | None = None) -> dict:
        """The whole response; ``message``: a chat message other than text (with tool calls)."""
        logprobs = self._logprobs(pieces)
        if self.chat:
            message = message or {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage(prompt, completion)}
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(prompt, completion)}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
