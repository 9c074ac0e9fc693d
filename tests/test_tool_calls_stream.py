"""Units of streamed tool calls without a model (issue 19's follow-up): a call's head once its name
is read and its arguments in pieces as they are written, joined exactly (by hand and by the
OpenAI SDK's ChatCompletionStreamState over the server's chunks); the one splitter
(tool_stream.ChatStream) that the Python API and the server share; the whitespace beside calls;
Mistral's v11 format ``[TOOL_CALLS]name[ARGS]{...}``."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from portable_infer.decode.sampling import SamplingParams
from portable_infer.errors import InvalidArgumentError
from portable_infer.text.streaming import Response
from portable_infer.text.tool_calls import FORMATS, CallParser, CallStream, ToolCall, ToolCallDelta, detect_format
from portable_infer.text.tool_specs import call_grammar, check_tools, plan_tools
from portable_infer.text.tool_stream import ChatDelta, ChatMessage, ChatStream

SEED = int(os.environ.get("TOOLS_STREAM_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[TOOLS_STREAM_SEED={SEED}]"
NAMES = {"f", "get_weather"}
LONG = {"city": "Paris", "days": [1, 2, {"note": "a } and a \" inside"}], "unit": "c"}
LONG_TEXT = json.dumps(LONG)
REPLIES = {  # two calls each: a long one, then f with no arguments
    "hermes": f'Let me see.\n<tool_call>\n{{"name": "get_weather", "arguments": {LONG_TEXT}}}\n</tool_call>\n'
              '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    "mistral_v11": f"[TOOL_CALLS]get_weather[ARGS]{LONG_TEXT}[TOOL_CALLS]f[ARGS]{{}}",
    "mistral": f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {LONG_TEXT}}}, '
               '{"name": "f", "arguments": {}}]',
    "llama3_json": f'{{"name": "get_weather", "parameters": {LONG_TEXT}}}; {{"name": "f", "parameters": {{}}}}',
}
CONTENT = {"hermes": "Let me see."}


def feed(fmt: str, text: str, cuts) -> list:
    p = CallParser(FORMATS[fmt], NAMES, deltas=True)
    bounds = [0, *sorted(cuts), len(text)]
    return [e for a, b in zip(bounds, bounds[1:]) for e in p.feed(text[a:b])] + p.close()


def joined(events) -> dict:
    """index -> (id, name, arguments joined), checking each call's first piece is its head."""
    calls = {}
    for e in events:
        if not isinstance(e, ToolCallDelta):
            continue
        if e.index not in calls:
            assert e.id is not None and e.name is not None and e.arguments == "", e
            calls[e.index] = [e.id, e.name, ""]
        else:
            assert e.id is None and e.name is None, e
            calls[e.index][2] += e.arguments
    return {i: tuple(c) for i, c in calls.items()}


@pytest.mark.parametrize("fmt", list(REPLIES))
def test_streamed_pieces_join_into_the_calls(fmt):
    """Fed one character at a time and in random pieces: the heads and argument pieces join into
    exactly the whole calls (same ids, names, arguments text), and the long call's arguments come
    in more than one piece, the first before the call is whole; the content is the whole parse's."""
    rng = np.random.default_rng(SEED)
    print(TAG)
    text = REPLIES[fmt]
    whole = CallParser(FORMATS[fmt], NAMES)
    expected = [e for e in whole.feed(text) + whole.close()]
    assert [(c.name, c.arguments) for c in expected if isinstance(c, ToolCall)] == [
        ("get_weather", LONG_TEXT), ("f", "{}")]
    for cuts in [range(1, len(text)), *(rng.choice(np.arange(1, len(text)), int(rng.integers(1, 12)),
                                                    replace=False).tolist() for _ in range(20))]:
        events = feed(fmt, text, cuts)
        calls = [e for e in events if isinstance(e, ToolCall)]
        assert joined(events) == {i: (c.id, c.name, c.arguments) for i, c in enumerate(calls)}, f"{TAG} {cuts}"
        assert [(c.name, c.arguments) for c in calls] == [("get_weather", LONG_TEXT), ("f", "{}")]
        assert "".join(e for e in events if isinstance(e, str)) == CONTENT.get(fmt, ""), f"{TAG} {cuts}"
    events = feed(fmt, text, range(1, len(text)))
    pieces = [e for e in events if isinstance(e, ToolCallDelta) and e.index == 0 and e.arguments]
    first_whole = next(i for i, e in enumerate(events) if isinstance(e, ToolCall))
    assert len(pieces) > len(LONG_TEXT) // 2 and events.index(pieces[0]) < first_whole


def test_arguments_not_written_as_an_object_come_whole_at_the_end():
    """Arguments written as a JSON string, or left out: nothing to stream as written; the call's
    arguments (the object's JSON, or {}) come in one piece when the call is whole."""
    text = ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather"}\n</tool_call>')
    events = feed("hermes", text, range(1, len(text)))
    assert joined(events) == {0: (events[0].id, "f", '{"a": 1}'), 1: (joined(events)[1][0], "get_weather", "{}")}
    assert [e.arguments for e in events if isinstance(e, ToolCallDelta) and e.index == 0] == ["", '{"a": 1}']


@pytest.mark.parametrize("fmt, text", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}, "extra": 2}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": tru'),  # cut off by max_new_tokens
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "rm", "arguments": {}}]'),
    ("mistral_v11", '[TOOL_CALLS]f[ARGS]{"a": '),
])
def test_a_call_that_fails_after_its_head_went_out(fmt, text):
    """Streamed pieces are not taken back: the head and the arguments so far went out; the
    whole reply has the text as content (no call), and so does the stream."""
    events = feed(fmt, text, range(1, len(text)))
    assert not any(isinstance(e, ToolCall) for e in events)
    assert joined(events)[0][1] == "f" and "".join(e for e in events if isinstance(e, str)) == text


@pytest.mark.parametrize("fmt, text, content", [
    ("hermes", 'Sure: \n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n done', "Sure:  done"),
    ("hermes", 'Sure:\n\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', "Sure:\n"),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\nDone.\n', "Done.\n"),
    ("hermes", ' \n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n\n', None),  # calls only
    ("hermes", "  two  spaces \n", "  two  spaces \n"),  # no call: as written
    ("mistral", 'a [TOOL_CALLS][{"name": "f", "arguments": {}}]\tb', "a \tb"),
    ("mistral_v11", 'Sure: [TOOL_CALLS]f[ARGS]{} ok', "Sure:  ok"),
])
def test_only_the_formats_own_whitespace_goes(fmt, text, content):
    """Issue 19 item 3: "Sure: <call> done" kept "Sure:done"; now only the whitespace the format
    writes around its markers (Hermes' newline before and after a call) is dropped."""
    for cuts in ([], range(1, len(text))):
        events = feed(fmt, text, cuts)
        calls = [e for e in events if isinstance(e, ToolCall)]
        assert ChatMessage.from_events(events, "stop").content == content, cuts
        assert len(calls) == (fmt != "hermes" or "<tool_call>" in text)


# --- Mistral v11+: [TOOL_CALLS]name[ARGS]{...} -------------------------------------------------------------
V11_TEMPLATE = ("{%- for tool in message['tool_calls'] %}{{- '[TOOL_CALLS]' + tool['function']['name'] + "
                "'[ARGS]' + tool['function']['arguments']|tojson }}{%- endfor %}")
V03_TEMPLATE = "{%- if message.tool_calls %}{{- \"[TOOL_CALLS] [\" }}{%- endif %}"


def test_v11_is_told_from_v03_by_the_template():
    assert detect_format(V11_TEMPLATE).name == "mistral_v11"
    assert detect_format(V03_TEMPLATE).name == "mistral"
    assert plan_tools([{"type": "function", "function": {"name": "f"}}], None, None, V11_TEMPLATE).fmt.name == \
        "mistral_v11"


@pytest.mark.parametrize("text, calls", [
    ('[TOOL_CALLS]f[ARGS]{"a": 1}', [("f", '{"a": 1}')]),
    ('[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Rome"}', [("get_weather", '{"city": "Rome"}')]),
    ('[TOOL_CALLS]f[ARGS] {"a": 1} ', [("f", '{"a": 1}')]),
    ('[TOOL_CALLS]f[ARGS]"{\\"a\\": 1}"', [("f", '{"a": 1}')]),
    ("[TOOL_CALLS]f{}", []),  # no [ARGS]
    ("[TOOL_CALLS]f[ARGS][1]", []),
    ("[TOOL_CALLS]rm[ARGS]{}", []),
    ("[TOOL_CALLS]f[TOOL_CALLS]f[ARGS]{}", [("f", "{}")]),  # the first, without arguments, is content
    ("[TOOL_CALLS]f[ARGS]{", []),
])
def test_v11_parser(text, calls):
    for cuts in ([], range(1, len(text))):
        events = feed("mistral_v11", text, cuts)
        assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)] == calls, cuts
        content = "".join(e for e in events if isinstance(e, str))
        assert content == (text if not calls else "[TOOL_CALLS]f" if text.count("[TOOL_CALLS]") == 2 else "")


def test_v11_markers_as_special_tokens():
    """[TOOL_CALLS] and [ARGS] are special tokens of Mistral's tokenizers: the grammar asks for
    both as tokens, and the reply is read decoded with them."""
    from _tools import newline_tokenizer

    tok = newline_tokenizer()
    tok.add_special_tokens(["[TOOL_CALLS]", "[ARGS]"])
    ids = {m: tok.token_to_id(m) for m in ("[TOOL_CALLS]", "[ARGS]")}
    grammar = call_grammar(FORMATS["mistral_v11"], check_tools([{"type": "function", "function": {"name": "f"}}]),
                           True, ids)
    assert all(f"<[{i}]>" in grammar for i in ids.values()) and "call+" in grammar
    reply = tok.encode('[TOOL_CALLS]f[ARGS]{"a": "b"}', add_special_tokens=False).ids + [2]
    stream = CallStream(FORMATS["mistral_v11"], {"f"}, tok, end_ids=[2], deltas=True)
    events = [e for i, t in enumerate(reply)
              for e in stream.push(Response(tok.decode([t]), t, "stop" if i == len(reply) - 1 else None))]
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)] == [("f", '{"a": "b"}')]
    assert joined(events)[0][1:] == ("f", '{"a": "b"}') and stream.finish_reason("stop") == "tool_calls"


def test_v11_grammar_without_special_tokens():
    pytest.importorskip("llguidance")
    from _tools import newline_tokenizer

    from portable_infer.decode.constraints import Constraint, Guide

    guide = Guide(newline_tokenizer(), 256, [2])
    specs = check_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
        "additionalProperties": False}}}])
    for parallel, text, ok in [(False, '[TOOL_CALLS]f[ARGS]{"n": 3}', True),
                               (False, '[TOOL_CALLS]f[ARGS]{"n": "x"}', False),
                               (True, '[TOOL_CALLS]f[ARGS]{"n": 3}[TOOL_CALLS]f[ARGS]{"n": 4}', True),
                               (False, '[TOOL_CALLS]f[ARGS]{"n": 3}[TOOL_CALLS]', False)]:
        matcher = guide.matcher(Constraint.grammar(call_grammar(FORMATS["mistral_v11"], specs, parallel)))
        accepted = all(matcher.consume_token(t) for t in guide.tokenizer.encode(text, add_special_tokens=False).ids)
        assert accepted == ok and (not ok or matcher.is_accepting()), text


def test_a_bad_parser_name_lists_the_v11_one():
    with pytest.raises(InvalidArgumentError) as e:
        detect_format(None, "mistral11")
    assert "mistral_v11" in str(e.value)


# --- the one splitter: ChatStream, for the Python API and the server -----------------------------------------
PLAN = plan_tools([{"type": "function", "function": {"name": "f"}},
                   {"type": "function", "function": {"name": "get_weather"}}], "auto", None, "<tool_call>")


def responses(text: str, step: int, reason: str = "stop") -> list:
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    return [Response(p, 5, reason if i == len(pieces) - 1 else None, generation_tokens=i + 1)
            for i, p in enumerate(pieces)]


def test_chat_stream_gives_one_delta_per_token_and_the_message_last():
    text = REPLIES["hermes"]
    stream = ChatStream(PLAN)
    deltas = [stream.push(r) for r in responses(text, 3)]
    assert len(deltas) == -(-len(text) // 3) and all(isinstance(d, ChatDelta) and d.response for d in deltas)
    assert all(d.finish_reason is None and d.message is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == "tool_calls" and last.message == stream.message()
    assert last.message.content == "Let me see." == "".join(d.content for d in deltas)
    calls = joined([t for d in deltas for t in d.tool_calls])
    assert {i: (c.id, c.name, c.arguments) for i, c in enumerate(last.message.tool_calls)} == calls
    plain = ChatStream(None)  # tools not shown (tool_choice "none"): the text is content
    out = [plain.push(r) for r in responses("a <tool_call> b", 4, "length")]
    assert "".join(d.content for d in out) == "a <tool_call> b" and out[-1].message == ChatMessage(
        "a <tool_call> b", (), "length")


def test_server_chunks_assemble_with_the_openai_sdk():
    """The server's chunks of a long streamed call: more than one arguments delta, and the SDK's
    own ChatCompletionStreamState joins them into the whole reply's call."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    from portable_infer.serving.http.protocol import Reply
    from portable_infer.serving.http.tools import ToolReplies

    from portable_infer.text.codec import TextCodec

    codec = TextCodec(vocab_size=256, eos_ids=(2,))  # no tokenizer: the markers are read in the text
    tools = ToolReplies(PLAN, codec, SamplingParams())
    reply, state, args = Reply(True, "tiny"), ChatCompletionStreamState(), 0
    state.handle_chunk(ChatCompletionChunk.model_validate(reply.chunk(None, None, role=True, delta={
        "role": "assistant", "content": None})))
    for r in responses(REPLIES["hermes"], 2):
        for chunk in tools.chunks(r, reply, []):
            state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
            args += sum(1 for t in chunk["choices"][0]["delta"].get("tool_calls", ())
                        if t["index"] == 0 and "id" not in t and t["function"]["arguments"])
    final = state.get_final_completion().choices[0]
    assert args > 10 and final.finish_reason == "tool_calls" and final.message.content == "Let me see."
    assert [(c.id, c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in tools.message()["tool_calls"]]
    assert json.loads(final.message.tool_calls[0].function.arguments) == LONG and openai
