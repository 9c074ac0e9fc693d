"""The field table of the server (issue 16, item 4): every field of OpenAI's completions and
chat-completions bodies is implemented, ignored by definition, or a 400 naming it; wrong JSON types
are 400s naming the field. Walks ``portable_infer.serving.http.fields`` through the real parser
(``protocol.parse_*``) on a fake model: no server, no ONNX."""

from __future__ import annotations

import pytest

from portable_infer.decode.sampling import SamplingParams
from portable_infer.serving.http import fields, protocol
from portable_infer.serving.http.apierror import APIError
from portable_infer.serving.http.fields import ANY, BOTH, CHAT, COMPLETIONS, IGNORED, IMPLEMENTED, UNSUPPORTED

# OpenAI's API reference, request bodies (November 2026): the table must cover each of them
OPENAI = {
    COMPLETIONS: {"model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
                  "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature",
                  "top_p", "user"},
    CHAT: {"messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
           "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
           "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
           "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
           "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
           "moderation", "prompt_cache_options", "prompt_cache_retention"},  # openai 3.57's additions
}
# a valid value of every implemented or ignored field
EXAMPLES = {
    "model": "tiny", "prompt": "hello", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
    "max_completion_tokens": 6, "temperature": 0.5, "top_p": 0.8, "top_k": 7, "min_p": 0.1, "presence_penalty": 0.3,
    "frequency_penalty": 0.4, "repetition_penalty": 1.1, "seed": 42, "stop": ["\n"], "stop_token_ids": [5],
    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
    "metadata": {"k": "v"}, "safety_identifier": "s1", "prompt_cache_key": "p1", "role": "system", "content": "x",
    "type": "text", "text": "x", "include_usage": True, "top_logprobs": 0, "logit_bias": {"5": 1.5},
    "response_format": {"type": "json_object"}, ("logprobs", COMPLETIONS): 2, ("logprobs", CHAT): True,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "parallel_tool_calls": False, "tool_call_id": "call_1",
    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}
# one value of each JSON type; "integer" fields also get true and 1.0 (booleans and floats are not ints)
OF_TYPE = {"string": ["5"], "integer": [5], "number": [1.5], "boolean": [True], "array": [[1]], "object": [{"a": 1}]}
WRONG_FOR_INTEGER = [True, False, 1.0, "1"]
# values of each type that ask for something (unsupported fields reject the first one not neutral)
ASKING = {"integer": [2, 0, 5], "boolean": [True, False], "string": ["auto", "x"],
          "array": [[{"type": "function"}], ["audio"]], "object": [{"type": "json_object"}, {"5": -100}]}
LIMITS = protocol.Limits(max_prompt_tokens=512, max_new_tokens=64)
KINDS = ("body", "message", "content_part", "stream_options")


class FakeCodec:
    vocab_size = 256
    eos_ids = (2,)
    template_source = "{{ tools }} <tool_call>"  # Hermes' tool-call format
    tokenizer = None

    def encode(self, text):
        return [ord(c) % 256 for c in text]

    def chat_ids(self, messages, tools=None):
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))


class FakeModel:
    defaults = SamplingParams(max_new_tokens=16)
    guide = None  # compiles response_format: a real one over the serving tests' tokenizer (below)
    codec = FakeCodec()


def _guide():
    from _serving import char_tokenizer

    from portable_infer.decode.constraints import Guide

    return Guide(char_tokenizer(), 256, [2])


FakeModel.guide = _guide()


def base(endpoint: str) -> dict:
    return {"prompt": "hi"} if endpoint == COMPLETIONS else {"messages": [{"role": "user", "content": "hi"}]}


def placed(kind: str, endpoint: str, name: str, value) -> tuple:
    """(body with ``value`` as field ``name`` of a ``kind`` object, the field's path)."""
    if kind == "body":
        body = {**base(endpoint), name: value}
        if name == "stream_options":
            body["stream"] = True
        return body, name
    if kind == "stream_options":
        return {**base(endpoint), "stream": True, "stream_options": {name: value}}, f"stream_options.{name}"
    if kind == "message":  # tool calls are an assistant's, a tool_call_id a tool result's
        role = {"tool_calls": "assistant", "tool_call_id": "tool"}.get(name, "user")
        return {"messages": [{"role": role, "content": "hi", name: value}]}, f"messages[0].{name}"
    part = {"type": "text", "text": "hi", name: value}
    return {"messages": [{"role": "user", "content": [part]}]}, f"messages[0].content[0].{name}"


def parse(endpoint: str, body: dict):
    protocol.check_model(body, "tiny")
    return (protocol.parse_completion if endpoint == COMPLETIONS else protocol.parse_chat)(body, FakeModel(), LIMITS)


def rejected(endpoint: str, body: dict, param: str, code: str | None = None) -> APIError:
    with pytest.raises(APIError) as err:
        parse(endpoint, body)
    assert err.value.status == 400, err.value.message
    assert err.value.param == param, err.value.message
    assert code is None or err.value.code == code, (err.value.code, err.value.message)
    return err.value


def cases(statuses=(IMPLEMENTED, IGNORED, UNSUPPORTED)) -> list:
    """(kind, endpoint, Field) of every table entry, for the endpoints where that object exists."""
    return [pytest.param(kind, endpoint, f, id=f"{endpoint}-{kind}-{f.name}")
            for kind in KINDS for endpoint in (BOTH if kind in ("body", "stream_options") else (CHAT,))
            for f in fields.TABLES[(kind, endpoint)].values() if f.status in statuses]


def typed(field, value) -> bool:
    try:
        fields.check_type(field, value, field.name)
    except APIError:
        return False
    return True


# --- the table itself ------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", BOTH)
def test_every_openai_field_is_in_the_table(endpoint):
    assert OPENAI[endpoint] <= set(fields.TABLES[("body", endpoint)]), OPENAI[endpoint] - set(
        fields.TABLES[("body", endpoint)])


def test_no_field_is_listed_twice_for_one_endpoint():
    for group in (fields.BODY, fields.MESSAGE, fields.CONTENT_PART, fields.STREAM_OPTIONS):
        for endpoint in BOTH:
            names = [f.name for f in group if endpoint in f.endpoints]
            assert len(names) == len(set(names)), names


def test_every_unsupported_field_says_why_and_typed_fields_name_types():
    for group in (fields.BODY, fields.MESSAGE, fields.CONTENT_PART, fields.STREAM_OPTIONS):
        for f in group:
            assert f.status in (IMPLEMENTED, IGNORED, UNSUPPORTED) and set(f.types) <= set(ANY), f
            assert (f.status == UNSUPPORTED) == bool(f.why), f
            assert f.types != ANY or f.status == UNSUPPORTED, f"{f.name}: only unsupported fields take any type"


# --- walking it ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,endpoint,field", cases((IMPLEMENTED, IGNORED)))
def test_implemented_and_ignored_fields_accept_their_example(kind, endpoint, field):
    body, _ = placed(kind, endpoint, field.name, EXAMPLES.get((field.name, endpoint), EXAMPLES.get(field.name)))
    parsed = parse(endpoint, body)
    key = protocol.SAMPLING_KEYS.get(field.name) if kind == "body" else None
    if key is not None:  # the value reached SamplingParams
        value = EXAMPLES[field.name]
        assert getattr(parsed.params, key) == (tuple(value) if isinstance(value, list) else value)


@pytest.mark.parametrize("kind,endpoint,field", [c for c in cases() if c.values[2].types != ANY])
def test_wrong_json_types_are_400s_naming_the_field(kind, endpoint, field):
    wrong = [v for t, vs in OF_TYPE.items() if t not in field.types and not (t == "integer" and "number" in
                                                                             field.types) for v in vs]
    if field.types == ("integer",):
        wrong += WRONG_FOR_INTEGER
    assert wrong
    for value in wrong:
        body, path = placed(kind, endpoint, field.name, value)
        err = rejected(endpoint, body, path, "invalid_type")
        assert path in err.message


@pytest.mark.parametrize("kind,endpoint,field", cases((UNSUPPORTED,)))
def test_unsupported_fields_are_400s_naming_them_unless_neutral(kind, endpoint, field):
    for value in field.neutral:
        parse(endpoint, placed(kind, endpoint, field.name, value)[0])
    asking = next(v for t in field.types for v in ASKING.get(t, ["x"]) if v not in field.neutral and typed(field, v))
    body, path = placed(kind, endpoint, field.name, asking)
    err = rejected(endpoint, body, path, "unsupported_parameter")
    assert field.why in err.message and path in err.message


@pytest.mark.parametrize("kind,endpoint", [("body", COMPLETIONS), ("body", CHAT), ("stream_options", CHAT),
                                           ("message", CHAT), ("content_part", CHAT)])
def test_unknown_fields_are_400s_naming_them(kind, endpoint):
    for name in ("frobnicate", "Model", "min_tokens", "\u00e9"):
        body, path = placed(kind, endpoint, name, 1)
        rejected(endpoint, body, path, "unknown_parameter")


def test_a_field_of_the_other_endpoint_says_where_it_belongs():
    assert "/v1/completions" in rejected(CHAT, {**base(CHAT), "prompt": "x"}, "prompt", "unknown_parameter").message
    err = rejected(COMPLETIONS, {**base(COMPLETIONS), "messages": []}, "messages", "unknown_parameter")
    assert "/v1/chat/completions" in err.message


def test_null_means_not_sent():
    for endpoint in BOTH:
        names = [n for n in fields.TABLES[("body", endpoint)] if n not in ("prompt", "messages")]
        parse(endpoint, {**base(endpoint), **dict.fromkeys(names)})


# --- the cases of issue 16, one by one -------------------------------------------------------------
@pytest.mark.parametrize("endpoint,extra,param,code", [
    (COMPLETIONS, {"n": True}, "n", "invalid_type"),  # accepted before: True == 1
    (CHAT, {"n": 1.0}, "n", "invalid_type"),  # accepted before: 1.0 == 1
    (CHAT, {"logprobs": 0}, "logprobs", "invalid_type"),  # accepted before: 0 == False
    (COMPLETIONS, {"logprobs": 21}, "logprobs", None),  # 0..20
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    (CHAT, {"logprobs": False, "top_logprobs": 2}, "top_logprobs", None),
    (COMPLETIONS, {"max_tokens": "5"}, "max_tokens", "invalid_type"),
    (CHAT, {"response_format": {"type": "bogus"}}, "response_format", None),  # 200 before
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}},
     "response_format", None),  # a schema llguidance cannot compile
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", None),
    (COMPLETIONS, {"logit_bias": {"5": -101}}, "logit_bias", None),  # [-100, 100]
    (COMPLETIONS, {"logit_bias": {"256": 1}}, "logit_bias", None),  # outside the vocabulary
    (CHAT, {"logit_bias": {"x": 1}}, "logit_bias", None),
    (CHAT, {"tool_choice": "required"}, "tool_choice", None),  # no tools to call
    (CHAT, {"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    (CHAT, {"function_call": "auto"}, "function_call", "unsupported_parameter"),
    (CHAT, {"parallel_tool_calls": 1}, "parallel_tool_calls", "invalid_type"),
    (CHAT, {"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", None),
    (COMPLETIONS, {"guided_json": {"type": "object"}}, "guided_json", "unsupported_parameter"),
    (COMPLETIONS, {"frobnicate": 1}, "frobnicate", "unknown_parameter"),  # 200 before
    (COMPLETIONS, {"model": 123}, "model", "invalid_type"),  # a 404 before
])
def test_issue_cases(endpoint, extra, param, code):
    rejected(endpoint, {**base(endpoint), **extra}, param, code)


def test_text_response_format_and_empty_tools_are_accepted():
    parse(CHAT, {**base(CHAT), "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                 "logit_bias": {}, "n": 1, "logprobs": False, "top_logprobs": 0, "store": False})


# --- rules beyond the table ------------------------------------------------------------------------
def test_sampling_errors_name_the_openai_key():
    assert "temperature" in rejected(COMPLETIONS, {**base(COMPLETIONS), "temperature": -1}, "temperature").message
    err = rejected(CHAT, {**base(CHAT), "max_completion_tokens": 0}, "max_completion_tokens")
    assert "max_completion_tokens" in err.message and "max_new_tokens" not in err.message
    rejected(COMPLETIONS, {**base(COMPLETIONS), "max_tokens": 65}, "max_tokens")  # over the server's limit
    rejected(CHAT, {**base(CHAT), "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens")
    rejected(COMPLETIONS, {**base(COMPLETIONS), "stop": ["ok", ""]}, "stop")


def test_stream_options_need_stream():
    rejected(COMPLETIONS, {**base(COMPLETIONS), "stream_options": {"include_usage": True}}, "stream_options")
    assert parse(CHAT, {**base(CHAT), "stream": True, "stream_options": {"include_usage": True}}).include_usage


@pytest.mark.parametrize("prompt,code", [([1, 2, 300], None), ([True, False], None), ([], None), ("", None),
                                         (["a", "b"], "unsupported_parameter"), ([[1], [2]], "unsupported_parameter"),
                                         ([1, "a"], None), ({"text": "x"}, "invalid_type")])
def test_bad_prompts(prompt, code):
    rejected(COMPLETIONS, {"prompt": prompt}, "prompt", code)


def test_prompt_shapes():
    assert parse(COMPLETIONS, {"prompt": ["abc"]}).prompt_ids == [97, 98, 99]
    assert parse(COMPLETIONS, {"prompt": [[5, 6]]}).prompt_ids == [5, 6]
    with pytest.raises(APIError, match="prompt must be"):
        parse(COMPLETIONS, {})


@pytest.mark.parametrize("message,param,code", [
    ({"role": "user", "content": "x", "name": "bob"}, "messages[0].name", "unsupported_parameter"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{x"}}]}, "messages[0].tool_calls[0].function.arguments", None),
    ({"role": "tool", "content": "4"}, "messages[0].tool_call_id", None),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
     "messages[0].content[0].image_url", "unsupported_parameter"),
    ({"role": "user", "content": [{"type": "text", "text": "x", "colour": "red"}]}, "messages[0].content[0].colour",
     "unknown_parameter"),
    ({"role": "user", "content": [{"type": "image", "text": "x"}]}, "messages[0].content[0]", "unsupported_parameter"),
    ({"role": "", "content": "x"}, "messages[0].role", None),
    ({"role": "user"}, "messages[0].content", None),
    ({"role": "user", "content": 5}, "messages[0].content", "invalid_type"),
])
def test_bad_messages(message, param, code):
    err = rejected(CHAT, {"messages": [message]}, param, code)
    if "image_url" in param:  # says what to send instead
        assert "send text parts" in err.message


def test_messages_must_be_objects():
    rejected(CHAT, {"messages": ["hi"]}, "messages[0]", "invalid_type")
    rejected(CHAT, {"messages": []}, "messages")


@pytest.mark.parametrize("endpoint", BOTH)
def test_an_omitted_max_tokens_asks_for_what_fits_a_bounded_request(endpoint):
    """Where the scheduler bounds a request's KV (GPU slots: the budget over max_batch), an omitted
    max_tokens is cut to what fits beside the prompt, as OpenAI and vLLM cut it to the context; a
    max_tokens the client sent is kept (the scheduler then refuses it if it does not fit)."""
    bounded = protocol.Limits(max_prompt_tokens=512, max_new_tokens=64, max_request_tokens=20)
    body = {"prompt": "hello"} if endpoint == COMPLETIONS else {"messages": [{"role": "user", "content": "hello"}]}
    parse_with = protocol.parse_completion if endpoint == COMPLETIONS else protocol.parse_chat
    loose = parse_with(dict(body), FakeModel(), LIMITS)
    cut = parse_with(dict(body), FakeModel(), bounded)
    assert loose.params.max_new_tokens > 20 - len(cut.prompt_ids)  # the default would not fit
    assert cut.params.max_new_tokens == 20 - len(cut.prompt_ids)
    assert parse_with({**body, "max_tokens": 30}, FakeModel(), bounded).params.max_new_tokens == 30
