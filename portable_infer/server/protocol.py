"""OpenAI's wire format: request bodies -> (prompt ids, SamplingParams), and the response objects.

No web framework here: plain dicts in and out, so the rules are testable alone. Errors are
:class:`APIError`, rendered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..errors import ContextLengthError, InvalidArgumentError, PortableInferError
from ..sampling import SamplingParams

# OpenAI body key -> SamplingParams field (the extra keys are vLLM's)
SAMPLING_KEYS = {
    "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop",
    "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
}
# key -> (values accepted, why others are not)
UNSUPPORTED = {
    "n": ((None, 1), "only n=1 is supported"),
    "best_of": ((None, 1), "only best_of=1 is supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix is not supported"),
    "logprobs": ((None, False), "logprobs are not supported by this server yet"),
    "top_logprobs": ((None, 0), "logprobs are not supported by this server yet"),
    "tools": ((None, []), "tools are not supported"),
}

class APIError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int


@dataclass(frozen=True)
class ParsedRequest:
    prompt_ids: list
    params: SamplingParams
    stream: bool
    include_usage: bool
    chat: bool


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def check_model(body: dict, served: str) -> None:
    name = body.get("model")
    if name is not None and name != served:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{served}` (see /v1/models)",
                       param="model", code="model_not_found")


def sampling_params(body: dict, defaults: SamplingParams, limits: Limits) -> SamplingParams:
    """SamplingParams from the body's OpenAI keys over the model's defaults (OpenAI names in errors)."""
    for key, (accepted, why) in UNSUPPORTED.items():
        if body.get(key) not in accepted:
            raise _bad(f"{why} (got {key}={body[key]!r})", param=key)
    kw = {}
    for key, field in SAMPLING_KEYS.items():
        if body.get(key) is not None:
            kw[field] = body[key]
    if isinstance(kw.get("stop"), str):
        kw["stop"] = [kw["stop"]]
    if "max_new_tokens" not in kw:
        kw["max_new_tokens"] = min(defaults.max_new_tokens, limits.max_new_tokens)
    try:
        params = SamplingParams.from_kwargs(defaults, **kw)
    except InvalidArgumentError as exc:
        field = str(exc).split(" ", 1)[0]
        param = next((k for k, f in SAMPLING_KEYS.items() if f == field and k in body), field)
        raise _bad(str(exc).replace("max_new_tokens", "max_tokens"), param=param) from exc
    if params.max_new_tokens > limits.max_new_tokens:
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise _bad(f"{key} is {params.max_new_tokens}, this server allows at most {limits.max_new_tokens}",
                   param=key)
    return params


def _flags(body: dict) -> tuple:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {stream!r}", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("stream_options must be an object", param="stream_options")
    return stream, bool(opts.get("include_usage", False))


def _check_length(ids: list, limits: Limits, param: str) -> list:
    if not ids:
        raise _bad("the prompt is empty", param=param)
    if len(ids) > limits.max_prompt_tokens:
        raise _bad(f"the prompt has {len(ids)} tokens, this server allows at most {limits.max_prompt_tokens}; "
                   f"shorten it", param=param, code="context_length_exceeded")
    return ids


def parse_completion(body: dict, model, limits: Limits) -> ParsedRequest:
    """``/v1/completions``: one prompt (text, or token ids)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = model.manifest.model.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise _bad(f"token ids must lie in [0, {vocab})", param="prompt")
        ids = list(prompt)
    elif isinstance(prompt, str):
        ids = _encode(model, lambda: model.encode(prompt), "prompt")
    else:
        raise _bad("prompt must be a string, or a list of token ids (one prompt per request)", param="prompt")
    stream, usage = _flags(body)
    return ParsedRequest(_check_length(ids, limits, "prompt"), sampling_params(body, model.defaults, limits),
                         stream, usage, chat=False)


def parse_chat(body: dict, model, limits: Limits) -> ParsedRequest:
    """``/v1/chat/completions``: messages rendered with the package's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", param="messages")
    plain = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise _bad(f"messages[{i}] must be an object with a string role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        plain.append({"role": m["role"], "content": content})
    ids = _encode(model, lambda: model._chat_ids(plain), "messages")
    stream, usage = _flags(body)
    return ParsedRequest(_check_length(ids, limits, "messages"), sampling_params(body, model.defaults, limits),
                         stream, usage, chat=True)


def _encode(model, fn, param: str) -> list:
    try:
        return fn()
    except InvalidArgumentError as exc:
        raise _bad(str(exc), param=param) from exc
    except PortableInferError as exc:  # no tokenizer or no chat template in the package
        raise _bad(str(exc), param=param, code="unsupported") from exc


def from_engine_error(exc: Exception) -> APIError:
    """The HTTP error for an error the scheduler raised at submission."""
    if isinstance(exc, ContextLengthError):
        return _bad(str(exc), param="max_tokens" if "KV blocks" in str(exc) else "prompt",
                    code="context_length_exceeded")
    if isinstance(exc, InvalidArgumentError):
        return _bad(str(exc))
    return APIError(503, str(exc), type="server_error", code="unavailable")


# --- responses ------------------------------------------------------------------------------------
@dataclass
class Reply:
    """Ids and names shared by every chunk of one response."""

    chat: bool
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt: int, completion: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt, completion)}

    def full(self, text: str, finish_reason: str, prompt: int, completion: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage(prompt, completion)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(prompt, completion)}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
