"""Units of tool calling without a model: the format table and its parser (whole and streamed,
malformed calls as content), format detection, the tools checks, the call grammars (llguidance
over the tests' character tokenizer), the messages carried back to the template, and the HTTP
shapes of a reply (server/tools.py)."""

from __future__ import annotations

import json
import os
import random
import re

import numpy as np
import pytest

from portable_infer.decode.sampling import SamplingParams
from portable_infer.errors import InvalidArgumentError
from portable_infer.text.streaming import Response
from portable_infer.text.tool_calls import FORMATS, CallParser, CallStream, ToolCall, detect_format
from portable_infer.text.tool_specs import (ChatMessage, call_grammar, check_tools, plan_tools,
                                       template_messages)

SEED = int(os.environ.get("TOOLS_PARSER_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[TOOLS_PARSER_SEED={SEED}]"
NAMES = {"f", "get_weather"}
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "f", "parameters": {}}'
MISTRAL = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]'
MISTRAL11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]f[ARGS]{}'
TWO_CALLS = [("get_weather", '{"city": "Paris"}'), ("f", "{}")]


def parse(fmt: str, text: str, cuts=None) -> tuple:
    """(content, [(name, arguments)]) of ``text`` fed whole, or in pieces cut at ``cuts``."""
    p = CallParser(FORMATS[fmt], NAMES)
    bounds = [0, *sorted(cuts or []), len(text)]
    events = [e for a, b in zip(bounds, bounds[1:]) for e in p.feed(text[a:b])] + p.close()
    calls = [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)]
    return "".join(e for e in events if isinstance(e, str)), calls


@pytest.mark.parametrize("fmt, text, content", [
    ("hermes", HERMES, "Let me check."),
    ("llama3_json", LLAMA, ""),
    ("llama3_json", "<|python_tag|>" + LLAMA, ""),
    ("llama3_json", " \n<|python_tag|>" + LLAMA, ""),
    ("mistral", MISTRAL, ""),
    ("mistral", "Sure: " + MISTRAL + " done", "Sure:  done"),  # the content's own whitespace stays
    ("mistral_v11", MISTRAL11, ""),
    ("mistral_v11", "Sure: " + MISTRAL11 + "\n", "Sure: \n"),
])
def test_each_format_parses_whole_and_streamed(fmt, text, content):
    """The calls and content, whole and cut into random pieces (one character each, too)."""
    rng = np.random.default_rng(SEED)
    print(TAG)
    assert parse(fmt, text) == (content, TWO_CALLS)
    assert parse(fmt, text, range(1, len(text))) == (content, TWO_CALLS)
    for _ in range(20):
        cuts = rng.choice(np.arange(1, len(text)), int(rng.integers(1, 8)), replace=False).tolist()
        assert parse(fmt, text, cuts) == (content, TWO_CALLS), f"{TAG} {cuts}"


@pytest.mark.parametrize("fmt, text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'),  # broken JSON
    ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'),  # a tool not offered
    ("hermes", '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>'),  # arguments not an object
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}, "extra": 1}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}} {"name": "f"}\n</tool_call>'),  # two in one tag
    ("hermes", '<tool_call>\n{"name": "f", "argu'),  # cut off
    ("hermes", "<tool_call></tool_call>"),
    ("llama3_json", '{"name": "f", "parameters": {}}; oops'),
    ("llama3_json", '{"name": "f", "parameters": "not json"}'),
    ("llama3_json", "[1, 2]"),
    ("mistral", "[TOOL_CALLS]{\"name\": \"f\", \"arguments\": {}}"),  # not an array
    ("mistral", "[TOOL_CALLS][]"),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}, 7]'),
    ("mistral", '[TOOL_CALLS][{"name": "f"'),
])
def test_malformed_calls_are_content(fmt, text):
    """What a model writes is never an error: a call that does not parse is left as content,
    the same text whole or streamed."""
    assert parse(fmt, text) == (text, [])
    assert parse(fmt, text, range(1, len(text))) == (text, [])


def test_valid_and_malformed_calls_mix():
    text = ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>')
    content, calls = parse("hermes", text)
    assert calls == [("f", "{}")] and content == text[text.index("<tool_call>", 5):]
    assert parse("hermes", text, range(1, len(text))) == (content, calls)


def test_text_only_replies_are_kept_as_written():
    for fmt in FORMATS:
        for text in ["", "  hello  ", "a < b and c > d\n", "{not a call", "[TOOL_CALLS", "<tool_call"]:
            assert parse(fmt, text) == (text, []), (fmt, text)
            assert parse(fmt, text, range(1, len(text))) == (text, []), (fmt, text)


def test_a_marker_start_is_held_back_until_settled():
    p = CallParser(FORMATS["hermes"], NAMES)
    assert p.feed("2 <") == ["2"]  # " <" may start "<tool_call>"
    assert p.feed("tool_c") == []
    assert p.feed("x") == [" <tool_cx"]
    assert p.feed("\n<tool_call>\n{") == []
    assert p.feed('"name": "f", "arguments": {}}\n</tool_call>')[0].name == "f"
    assert p.close() == []


def test_arguments_given_as_a_json_string_are_read():
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
    assert parse("hermes", text) == ("", [("f", '{"a": 1}')])
    assert parse("hermes", '<tool_call>\n{"name": "f"}\n</tool_call>') == ("", [("f", "{}")])


def test_call_ids():
    p = CallParser(FORMATS["hermes"], NAMES)
    ids = [e.id for e in p.feed(HERMES) + p.close() if isinstance(e, ToolCall)]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == 2
    p = CallParser(FORMATS["mistral"], NAMES)
    ids = [e.id for e in p.feed(MISTRAL) + p.close() if isinstance(e, ToolCall)]
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)  # Mistral's templates take only these


QWEN = ('{%- if tools %}{{- "# Tools" }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}'
        '{{- "<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>" }}'
        '{%- endif %}')
LLAMA31 = ('{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}{{- \'{"name": "\' + tool_call.name + \'", \' }}'
           '{{- \'"parameters": \' }}')
MISTRAL03 = "{%- if message.tool_calls %}{{- \"[TOOL_CALLS] [\" }}{%- endif %}"


@pytest.mark.parametrize("source, name", [(QWEN, "hermes"), (LLAMA31, "llama3_json"), (MISTRAL03, "mistral")])
def test_the_format_is_read_from_the_template(source, name):
    assert detect_format(source).name == name
    assert detect_format("{{ messages }}", name).name == name  # or named


def test_unknown_formats_fail_closed():
    with pytest.raises(InvalidArgumentError) as e:
        detect_format("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert e.value.param == "tools" and "--tool-parser" in str(e.value)
    with pytest.raises(InvalidArgumentError) as e:
        detect_format(QWEN, "xml")
    assert e.value.param == "tool_parser" and "hermes" in str(e.value)


FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("tools, param", [
    ({"f": 1}, "tools"),
    ("f", "tools"),
    ([1], "tools[0]"),
    ([{"function": FN["function"]}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
    ([FN, FN], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "default": {1, 2}}}}],
     "tools[0].function.parameters"),  # not JSON
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "tools[0].function.strict"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description"),
    ([{"type": "function", "function": {"name": "f", "params": {}}}], "tools[0].function.params"),
    ([{**FN, "extra": 1}], "tools[0].extra"),
])
def test_bad_tools_name_the_field(tools, param):
    with pytest.raises(InvalidArgumentError) as e:
        check_tools(tools)
    assert e.value.param == param, str(e.value)


UNENFORCEABLE = [{"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}},
                 {"type": "object", "properties": {"a": {"type": "strnig"}}}]


@pytest.mark.parametrize("schema", UNENFORCEABLE)
def test_a_schema_llguidance_cannot_compile_is_refused_only_where_enforced(schema):
    """As vLLM: in auto mode nothing enforces the parameters (any object schema is taken and shown
    to the model); "required" and a named call compile them into the grammar, so there it is an
    error naming the tool's parameters and saying what to do."""
    pytest.importorskip("llguidance")
    tools = [FN, {"type": "function", "function": {"name": "g", "parameters": schema}}]
    assert check_tools(tools)[1].parameters == schema
    assert plan_tools(tools, "auto", None, QWEN).constraint() is None
    assert plan_tools(tools, {"type": "function", "function": {"name": "f"}}, None, QWEN).function == "f"
    for choice in ("required", {"type": "function", "function": {"name": "g"}}):
        with pytest.raises(InvalidArgumentError) as e:
            plan_tools(tools, choice, None, QWEN)
        assert e.value.param == "tools[1].function.parameters", str(e.value)
        assert "auto" in str(e.value) and "fix the schema" in str(e.value)


@pytest.mark.parametrize("choice, parallel, param", [
    ("sometimes", None, "tool_choice"),
    ({"type": "function", "function": {"name": "g"}}, None, "tool_choice.function.name"),
    ({"type": "function", "name": "f"}, None, "tool_choice"),
    ({"type": "allowed_tools", "mode": "auto"}, None, "tool_choice"),
    (5, None, "tool_choice"),
    ("auto", "yes", "parallel_tool_calls"),
])
def test_bad_tool_choice(choice, parallel, param):
    with pytest.raises(InvalidArgumentError) as e:
        plan_tools([FN], choice, parallel, QWEN)
    assert e.value.param == param, str(e.value)


def test_plans():
    assert plan_tools(None) is None and plan_tools([]) is None and plan_tools([FN], "none", None, "x") is None
    plan = plan_tools([FN], None, None, QWEN)
    assert (plan.choice, plan.parallel, plan.fmt.name, plan.constraint()) == ("auto", True, "hermes", None)
    assert plan.template_tools == [FN]
    named = plan_tools([FN], {"type": "function", "function": {"name": "f"}}, False, LLAMA31)
    assert (named.choice, named.function, named.parallel, named.fmt.name) == ("function", "f", False, "llama3_json")
    assert not plan_tools([FN], {"type": "function", "function": {"name": "f"}}, None, LLAMA31).parallel
    assert named.constraint().param == "tool_choice" and named.constraint().kind == "grammar"
    with pytest.raises(InvalidArgumentError) as e:  # a format is needed only once tools are offered
        plan_tools([FN], "auto", None, "{{ messages }}")
    assert e.value.param == "tools"
    with pytest.raises(InvalidArgumentError):
        plan_tools(None, "required")


def test_template_messages():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1, 2]}'}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    out = template_messages(msgs)
    assert out[0] is msgs[0] and out[2] == msgs[2]
    assert out[1] == {"role": "assistant", "content": "",
                      "tool_calls": [{**call, "function": {"name": "f", "arguments": {"a": [1, 2]}}}]}
    assert msgs[1]["content"] is None and isinstance(call["function"]["arguments"], str)  # not changed
    assert template_messages(out) == out  # already in the template's form
    bad = [({"role": "user", "content": "x", "tool_calls": [call]}, "messages[0].tool_calls"),
           ({"role": "assistant", "tool_calls": "x"}, "messages[0].tool_calls"),
           ({"role": "assistant", "tool_calls": [{**call, "id": 3}]}, "messages[0].tool_calls[0].id"),
           ({"role": "assistant", "tool_calls": [{**call, "function": {"name": "f", "arguments": "[1]"}}]},
            "messages[0].tool_calls[0].function.arguments"),
           ({"role": "tool", "content": "x"}, "messages[0].tool_call_id")]
    for message, param in bad:
        with pytest.raises(InvalidArgumentError) as e:
            template_messages([message])
        assert e.value.param == param, str(e.value)


def test_chat_message():
    call = ToolCall("call_x", "f", "{}")
    assert ChatMessage.from_events(["a", "b"], "stop") == ChatMessage("ab", (), "stop")
    m = ChatMessage.from_events([call], "tool_calls")
    assert m.content is None and m.to_dict() == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


# --- the grammars, through llguidance ------------------------------------------------------------------
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "days": {
    "type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": False}
TOOL_SPECS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}, FN]


@pytest.fixture(scope="module")
def guide():
    pytest.importorskip("llguidance")
    from _tools import newline_tokenizer

    from portable_infer.decode.constraints import Guide

    return Guide(newline_tokenizer(), 256, [2])


def accepts(guide, grammar: str, text: str) -> tuple:
    """(every token of ``text`` accepted, the grammar complete after it, only the end may follow)."""
    from portable_infer.decode.constraints import Constraint

    matcher = guide.matcher(Constraint.grammar(grammar))
    ids = guide.tokenizer.encode(text, add_special_tokens=False).ids
    ok = all(matcher.consume_token(t) for t in ids)
    return ok, ok and matcher.is_accepting(), ok and matcher.is_stopped()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_call_grammars(guide, fmt):
    f = FORMATS[fmt]
    specs = check_tools(TOOL_SPECS)
    one = {"hermes": '<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>',
           "llama3_json": '{{"name": "get_weather", "parameters": {args}}}',
           "mistral": '[TOOL_CALLS][{{"name": "get_weather", "arguments": {args}}}]',
           "mistral_v11": '[TOOL_CALLS]get_weather[ARGS]{args}'}[fmt]
    good = one.format(args='{"city": "Paris", "days": 3}')
    single = call_grammar(f, specs, parallel=False)
    assert accepts(guide, single, good) == (True, True, True)  # complete, and nothing may follow
    assert parse(fmt, good) == ("", [("get_weather", '{"city": "Paris", "days": 3}')])
    for bad in (one.format(args='{"city": "Paris", "days": 9}'),  # maximum 7
                one.format(args='{"city": "Paris"}'),  # days is required
                one.format(args='{"city": "Paris", "days": 3, "x": 1}'),
                one.format(args='{"city":"Paris","days":3}'),  # JSON as JSON_OPTIONS writes it
                one.replace("get_weather", "rm")):
        assert not accepts(guide, single, bad)[0], bad
    named = call_grammar(f, [s for s in specs if s.name == "f"], parallel=False)
    assert not accepts(guide, named, good)[0]
    parallel = call_grammar(f, specs, parallel=True)
    assert accepts(guide, parallel, good)[:2] == (True, True)
    two = {"hermes": good + "\n" + good, "llama3_json": good + "; " + good,
           "mistral": good[:-1] + ", " + good[len("[TOOL_CALLS]["):], "mistral_v11": good + good}[fmt]
    assert accepts(guide, parallel, two)[:2] == (True, True) and not accepts(guide, single, two)[0]
    assert len(parse(fmt, two)[1]) == 2
    forced = plan_tools(TOOL_SPECS, {"type": "function", "function": {"name": "get_weather"}}, True, None, fmt)
    grammar = forced.constraint().source  # a named function: one call even with parallel_tool_calls true
    assert accepts(guide, grammar, good) == (True, True, True) and not accepts(guide, grammar, two)[0]


def test_special_markers_are_tokens():
    """A marker that is a special token: the grammar asks for that token (<[id]>), and the parser
    reads the reply decoded with it (the Responses' text skips it)."""
    from _tools import newline_tokenizer

    tok = newline_tokenizer()
    tok.add_special_tokens(["[TOOL_CALLS]"])
    marker = tok.token_to_id("[TOOL_CALLS]")
    assert f"<[{marker}]>" in call_grammar(FORMATS["mistral"], check_tools([FN]), False, {"[TOOL_CALLS]": marker})
    ids = tok.encode('[TOOL_CALLS][{"name": "f", "arguments": {}}]', add_special_tokens=False).ids + [2]
    assert ids[0] == marker
    stream = CallStream(FORMATS["mistral"], {"f"}, tok, end_ids=[2])
    events = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        events += stream.push(Response(tok.decode([t]), t, "stop" if last else None))
    assert [(e.name, e.arguments) for e in events] == [("f", "{}")] and stream.finish_reason("stop") == "tool_calls"
    plain = CallStream(FORMATS["hermes"], {"f"}, tok, end_ids=[2])
    assert plain._text is None  # Hermes' markers are plain text in this tokenizer: the Responses' text is read
    # a plan's parser for a request with ignore_eos: a forced call's grammar still ends on the end
    # token, which is not part of the reply the parser reads (SamplingParams.silent_end_ids)
    from portable_infer.decode.sampling import SamplingParams

    plan = plan_tools([FN], "required", None, None, "mistral")
    ends = plan.stream(tok, SamplingParams(ignore_eos=True), eos_ids=(2,))
    assert ends._text is not None and 2 in ends._text.end_ids


# --- the HTTP shapes (server/tools.py) ---------------------------------------------------------------
def replies(text_pieces, choice="auto"):
    pytest.importorskip("fastapi")
    from portable_infer.serving.http.protocol import Reply
    from portable_infer.serving.http.tools import ToolReplies

    plan = plan_tools([FN, TOOL_SPECS[0]], choice, None, QWEN)
    from portable_infer.text.codec import TextCodec

    codec = TextCodec(vocab_size=256, eos_ids=(2,))  # no tokenizer: the markers are read in the text
    tools, reply = ToolReplies(plan, codec, SamplingParams()), Reply(
        True, "tiny")
    chunks = []
    for i, piece in enumerate(text_pieces):
        last = i == len(text_pieces) - 1
        chunks += tools.chunks(Response(piece, 5, "stop" if last else None), reply, [])
    return tools, [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]


def test_stream_deltas_and_message():
    tools, deltas = replies(["Hi", ".\n<tool", "_call>\n", '{"name": "f", "arguments": {}}\n</tool_call>'])
    assert [d for d, _ in deltas[:1]] == [{"content": "Hi"}]
    content = [d for d, _ in deltas if "content" in d]
    assert "".join(d["content"] for d in content) == "Hi."
    calls = [d["tool_calls"][0] for d, _ in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["type"] == "function" and calls[0]["function"] == {
        "name": "f", "arguments": ""} and calls[0]["id"].startswith("call_")
    assert calls[1] == {"index": 0, "function": {"arguments": "{}"}}
    assert deltas[-1] == ({}, "tool_calls")
    message = tools.message()
    assert message["content"] == "Hi." and message["tool_calls"][0]["id"] == calls[0]["id"]


def test_a_malformed_call_in_auto_mode_is_content():
    text = '<tool_call>\n{"name": "f", "arguments": {]}\n</tool_call>'
    tools, deltas = replies([text[:7], text[7:]])
    assert tools.message() == {"role": "assistant", "content": text}
    assert "".join(d.get("content", "") for d, _ in deltas) == text and deltas[-1][1] == "stop"
    assert json.dumps(deltas)  # every chunk is JSON
