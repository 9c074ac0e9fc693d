"""Every field of OpenAI's completions and chat-completions request bodies, and what this server does with it.

One table per object, read by the parser (protocol.py calls :func:`check` on the body, each message,
each content part and ``stream_options`` before it reads them) and walked by
``tests/test_server_fields.py``. A field is

    implemented   read; its JSON type is checked here, its range where it is used (SamplingParams
                  for sampling values, protocol.py for prompts and messages)
    ignored       type-checked and otherwise without effect, by its definition: an end-user id or
                  labels for OpenAI's own dashboards (``user``, ``metadata``, ``safety_identifier``)
    unsupported   a 400 naming it (code ``unsupported_parameter``), unless it holds a value that asks
                  for nothing beyond what the server does anyway: ``n: 1``, ``functions: []``,
                  ``function_call: "none"``

A key in no table is a 400 naming it (``unknown_parameter``), and so is a value of the wrong JSON
type (``invalid_type``: ``n: true``, ``n: 1.0``, ``max_tokens: "5"``, ``{"model": 123}``; booleans
are not integers). ``null`` means "not sent", as in OpenAI's API.
"""

from __future__ import annotations

from dataclasses import dataclass

from portable_infer.serving.http.apierror import APIError, json_type, show

COMPLETIONS, CHAT = "completions", "chat"
BOTH = (COMPLETIONS, CHAT)
ROUTES = {COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions"}
IMPLEMENTED, IGNORED, UNSUPPORTED = "implemented", "ignored", "unsupported"
ANY = ("string", "integer", "number", "boolean", "array", "object")

FUNCTIONS = "the deprecated functions / function_call fields are not supported: send tools and tool_choice"
GUIDED = "vLLM's guided decoding fields are not supported: send response_format (json_schema or json_object)"


@dataclass(frozen=True)
class Field:
    """One key of a request object: what the server does with it and which JSON values it takes."""

    name: str
    status: str  # IMPLEMENTED | IGNORED | UNSUPPORTED
    types: tuple[str, ...]  # JSON types accepted ("number" takes integers too)
    endpoints: tuple[str, ...] = BOTH
    items: str | None = None  # the JSON type of an array's elements, when the table checks them
    neutral: tuple = ()  # UNSUPPORTED: the values that ask for nothing and are accepted
    why: str = ""  # UNSUPPORTED: what the 400 says


def _implemented(name, types, endpoints=BOTH, items=None) -> Field:
    return Field(name, IMPLEMENTED, types, endpoints, items)


def _unsupported(name, why, types=ANY, neutral=(), endpoints=BOTH, items=None) -> Field:
    return Field(name, UNSUPPORTED, types, endpoints, items, neutral, why)


NUMBER, INTEGER, BOOLEAN, STRING = ("number",), ("integer",), ("boolean",), ("string",)
BODY = (
    # what to generate from
    _implemented("model", STRING),
    _implemented("prompt", ("string", "array"), (COMPLETIONS,)),  # str | ids | [str] | [ids]: protocol.py
    _implemented("messages", ("array",), (CHAT,), items="object"),
    # how (SamplingParams checks the ranges)
    _implemented("max_tokens", INTEGER),
    _implemented("max_completion_tokens", INTEGER, (CHAT,)),
    _implemented("temperature", NUMBER),
    _implemented("top_p", NUMBER),
    _implemented("top_k", INTEGER),  # vLLM's extras from here to ignore_eos
    _implemented("min_p", NUMBER),
    _implemented("presence_penalty", NUMBER),
    _implemented("frequency_penalty", NUMBER),
    _implemented("repetition_penalty", NUMBER),
    _implemented("seed", INTEGER),
    _implemented("stop", ("string", "array"), items="string"),
    _implemented("stop_token_ids", ("array",), items="integer"),
    _implemented("ignore_eos", BOOLEAN),
    _implemented("stream", BOOLEAN),
    _implemented("stream_options", ("object",)),  # its keys: STREAM_OPTIONS
    # what comes back besides text, and what the output must be (protocol.py, SamplingParams)
    _implemented("logprobs", INTEGER, (COMPLETIONS,)),  # the k best alternatives too
    _implemented("logprobs", BOOLEAN, (CHAT,)),
    _implemented("top_logprobs", INTEGER, (CHAT,)),
    _implemented("logit_bias", ("object",)),
    _implemented("response_format", ("object",), (CHAT,)),  # text | json_object | json_schema
    # tool calling (tool_specs.py checks the values; server/tools.py)
    _implemented("tools", ("array",), (CHAT,), items="object"),
    _implemented("tool_choice", ("string", "object"), (CHAT,)),  # none | auto | required | a named function
    _implemented("parallel_tool_calls", BOOLEAN, (CHAT,)),
    # no effect by definition
    Field("user", IGNORED, STRING),
    Field("metadata", IGNORED, ("object",), (CHAT,)),
    Field("safety_identifier", IGNORED, STRING, (CHAT,)),
    Field("prompt_cache_key", IGNORED, STRING, (CHAT,)),  # a routing hint; prefixes are cached anyway
    # not (yet) supported
    _unsupported("n", "only one choice per request is supported", INTEGER, (1,)),
    _unsupported("best_of", "only best_of=1 is supported", INTEGER, (1,), (COMPLETIONS,)),
    _unsupported("echo", "echo is not supported", BOOLEAN, (False,), (COMPLETIONS,)),
    _unsupported("suffix", "suffix (insertion) is not supported", STRING, ("",), (COMPLETIONS,)),
    _unsupported("functions", FUNCTIONS, ("array",), ([],), (CHAT,)),
    _unsupported("function_call", FUNCTIONS, ("string", "object"), ("none",), (CHAT,)),
    _unsupported("modalities", "only text output is supported", ("array",), (["text"],), (CHAT,), "string"),
    _unsupported("audio", "only text output is supported", ("object",), (), (CHAT,)),
    _unsupported("prediction", "predicted outputs are not supported", ("object",), (), (CHAT,)),
    _unsupported("reasoning_effort", "this server has no reasoning-effort control", STRING, (), (CHAT,)),
    _unsupported("verbosity", "this server has no verbosity control", STRING, (), (CHAT,)),
    _unsupported("web_search_options", "web search is not supported", ("object",), (), (CHAT,)),
    _unsupported("moderation", "this server runs no moderation on requests or outputs", ("object",), (), (CHAT,)),
    _unsupported("prompt_cache_options", "prompt-cache breakpoints and lifetimes cannot be set: prefixes are "
                 "cached automatically, in memory", ("object",), (), (CHAT,)),
    _unsupported("prompt_cache_retention", "this server keeps cached prefixes in memory only", STRING,
                 ("in_memory",), (CHAT,)),
    _unsupported("store", "this server stores no completions", BOOLEAN, (False,), (CHAT,)),
    _unsupported("service_tier", "this server has one service tier", STRING, ("auto", "default"), (CHAT,)),
    *(_unsupported(name, GUIDED) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                              "guided_decoding_backend", "guided_whitespace_pattern",
                                              "structured_outputs")),
)
MESSAGE = (  # one element of "messages"
    _implemented("role", STRING),
    _implemented("content", ("string", "array"), items="object"),  # str | text parts: CONTENT_PART
    _unsupported("name", "participant names are not supported; put the name into the content"),
    _implemented("tool_calls", ("array",), items="object"),  # assistant: the calls it made (tool_specs.py)
    _implemented("tool_call_id", STRING),  # tool: the call its content answers
    _unsupported("function_call", FUNCTIONS),
    _unsupported("refusal", "refusal messages are not supported"),
    _unsupported("audio", "only text content is supported"),
)
CONTENT_PART = (  # one element of a message's "content" list
    _implemented("type", STRING),  # only "text": protocol.py
    _implemented("text", STRING),
    _unsupported("image_url", "image inputs are not supported: the server runs text models; send text parts"),
    _unsupported("input_audio", "audio inputs are not supported: send text parts"),
    _unsupported("file", "file inputs are not supported: send text parts"),
    _unsupported("refusal", "refusal parts are not supported"),
    _unsupported("prompt_cache_breakpoint", "prompt-cache breakpoints cannot be set: prefixes are cached "
                 "automatically"),
)
STREAM_OPTIONS = (
    _implemented("include_usage", BOOLEAN),
    _unsupported("include_obfuscation", "stream obfuscation is not supported", BOOLEAN, (False,)),
)


def table(fields: tuple, endpoint: str) -> dict:
    """name -> Field for ``endpoint`` (a name listed for both endpoints may differ between them;
    tests/test_server_fields.py checks that no name is listed twice for one endpoint)."""
    return {f.name: f for f in fields if endpoint in f.endpoints}


TABLES = {(kind, ep): table(fields, ep) for kind, fields in
          (("body", BODY), ("message", MESSAGE), ("content_part", CONTENT_PART), ("stream_options", STREAM_OPTIONS))
          for ep in BOTH}


def check(obj: dict, kind: str, endpoint: str, where: str = "") -> None:
    """Raise a 400 :class:`APIError` for the first key of ``obj`` that is unknown, of the wrong JSON
    type, or unsupported with a value other than its neutral ones. ``kind``: body, message,
    content_part, stream_options; ``where``: the path of ``obj`` in the body (``messages[0]``)."""
    fields = TABLES[(kind, endpoint)]
    for name, value in obj.items():
        path = f"{where}.{name}" if where else name
        field = fields.get(name)
        if field is None:
            raise _unknown(name, path, kind, endpoint)
        if value is None:
            continue
        check_type(field, value, path)
        if field.status == UNSUPPORTED and value not in field.neutral:
            fix = "leave it out" + (f" or send {' or '.join(show(v) for v in field.neutral)}" if field.neutral else "")
            raise APIError(400, f"{field.why} (got {path}={show(value)}); {fix}", param=path,
                           code="unsupported_parameter")


def check_type(field: Field, value, path: str) -> None:
    """A 400 ``invalid_type`` naming ``path`` unless ``value`` has one of ``field.types``."""
    kind = json_type(value)
    if not (kind in field.types or (kind == "integer" and "number" in field.types)):
        got = "a float" if kind == "number" else _article(kind)
        raise APIError(400, f"{path} must be {describe(field)}, got {got} ({show(value)})", param=path,
                       code="invalid_type")
    if kind == "array" and field.items is not None:
        for i, item in enumerate(value):
            got = json_type(item)
            if not (got == field.items or (got == "integer" and field.items == "number")):
                raise APIError(400, f"{path}[{i}] must be {_article(field.items)}, got {_article(got)} "
                               f"({show(item)})", param=f"{path}[{i}]", code="invalid_type")


def describe(field: Field) -> str:
    """The accepted JSON types in words: ``a string or an array of strings``."""
    words = [f"an array of {field.items}s" if t == "array" and field.items else _article(t) for t in field.types]
    return " or ".join(words) if len(words) < 6 else "any JSON value"


def _unknown(name: str, path: str, kind: str, endpoint: str) -> APIError:
    other = next((ep for ep in BOTH if ep != endpoint and name in TABLES[(kind, ep)]), None)
    where = "the request body" if kind == "body" else f"{kind.replace('_', ' ')} objects"
    hint = (f"it is a field of POST {ROUTES[other]}" if other else
            "docs/serving.md lists the fields this server reads")
    return APIError(400, f"unknown field {show(name)} in {where} of POST {ROUTES[endpoint]}; {hint}",
                    param=path, code="unknown_parameter")


def _article(kind: str) -> str:
    return f"an {kind}" if kind[:1] in ("a", "e", "i", "o", "u") else f"a {kind}"
