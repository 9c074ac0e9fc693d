"""Tool calling over HTTP with the ``openai`` client on loopback, and through the Python API.

The tiny llama (random weights) behind the real server, with a Hermes-style chat template
(tests/_tools.py). A random model writes no tool call by itself, so every valid call here is the
grammar's doing: ``tool_choice: "required"`` or a named function must give calls whose arguments
validate against the tool's parameters (``jsonschema``), plain and streamed, at temperature 0.7.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

pytest.importorskip("torch")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

import portable_infer  # noqa: E402
from _tools import PARAMETERS, TOOLS, long_tiny_llama, questions, tool_package  # noqa: E402
from openai.lib.streaming.chat import ChatCompletionStreamState  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from portable_infer.serving.http import ServerConfig, create_app  # noqa: E402
from portable_infer.serving.http.runner import BackgroundServer  # noqa: E402
from portable_infer.text.tool_chat import ChatHandle  # noqa: E402
from portable_infer.text.tool_specs import ChatMessage, template_messages  # noqa: E402
from portable_infer.text.tool_stream import ChatDelta  # noqa: E402

SEED = int(os.environ.get("TOOLS_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[TOOLS_SEED={SEED}]"
KEY = "k"
NAMED = {"type": "function", "function": {"name": "get_weather"}}
EOS = "2"  # </s>: a bias on it ends a reply where the grammar allows an end (after a call)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    return portable_infer.load(tool_package(long_tiny_llama(root), root / "tools"), "cpu", intra_op_threads=2)


@pytest.fixture(scope="module")
def scheduler(model):
    with Scheduler(model, SchedulerConfig(max_batch=4, max_waiting=16)) as sched:
        yield sched


@pytest.fixture(scope="module")
def server(scheduler):
    config = ServerConfig(api_key=KEY, model_name="tiny", max_prompt_tokens=1500, max_new_tokens=400)
    with BackgroundServer(create_app(scheduler, config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def check_call(call, names=tuple(PARAMETERS)):
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10, f"{TAG} {call}"
    assert call.function.name in names, f"{TAG} {call}"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def streamed(client, **kw):
    """The completion the SDK assembles from the stream, and the raw tool-call deltas."""
    state, deltas = ChatCompletionStreamState(), []
    for chunk in client.chat.completions.create(stream=True, **kw):
        state.handle_chunk(chunk)
        deltas += [d for c in chunk.choices for d in (c.delta.tool_calls or [])]
    try:
        return state.get_final_completion(), deltas
    except openai.LengthFinishReasonError:  # the SDK's final completion refuses "length": its snapshot
        return state.current_completion_snapshot, deltas


def parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def check_deltas(deltas, calls):
    """Each call's first delta: index, id, type, name and arguments ""; then its arguments."""
    firsts = [d for d in deltas if d.id is not None]
    assert [d.index for d in firsts] == list(range(len(calls))), f"{TAG} {deltas}"
    for d, call in zip(firsts, calls):
        assert (d.type, d.function.name, d.function.arguments) == ("function", call.function.name, ""), d
        rest = "".join(x.function.arguments for x in deltas if x.index == d.index and x.id is None)
        assert rest == call.function.arguments and all(x.type is None for x in deltas if x.id is None)


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_calls_validate(client, choice):
    """A named function or "required" (one call: parallel_tool_calls false): plain and streamed,
    on many sampled prompts at temperature 0.7."""
    rng = np.random.default_rng(SEED + (choice == "required"))
    print(TAG)
    names = ("get_weather",) if choice == "named" else tuple(PARAMETERS)
    for i, q in enumerate(questions(rng, 12)):
        kw = dict(model="tiny", messages=[{"role": "user", "content": q}], tools=TOOLS, temperature=0.7,
                  tool_choice=NAMED if choice == "named" else "required", parallel_tool_calls=False,
                  seed=int(rng.integers(1 << 30)), max_tokens=300)
        if i % 2:
            r = client.chat.completions.create(**kw)
        else:
            r, deltas = streamed(client, **kw)
            check_deltas(deltas, r.choices[0].message.tool_calls)
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls", f"{TAG} {message}"
        assert message.content is None and len(message.tool_calls) == 1, f"{TAG} {message}"
        check_call(message.tool_calls[0], names)


def test_parallel_calls_validate(client):
    """required with parallel calls: with the end token banned the model must go on calling until
    max_tokens (several whole calls, each valid, then "length"); with a bias on it, it ends after
    some call ("tool_calls": the grammar allows the end only there)."""
    rng = np.random.default_rng(SEED + 2)
    print(TAG)
    for i, q in enumerate(questions(rng, 6)):
        ban = i % 3 != 2
        kw = dict(model="tiny", messages=[{"role": "user", "content": q}], tools=TOOLS, tool_choice="required",
                  temperature=0.7, seed=int(rng.integers(1 << 30)), max_tokens=300,
                  logit_bias={EOS: -100 if ban else 3})
        r, deltas = streamed(client, **kw) if i % 2 else (client.chat.completions.create(**kw), None)
        message, reason = r.choices[0].message, r.choices[0].finish_reason
        calls = whole = message.tool_calls or []
        if deltas is not None and reason == "length" and calls and not parses(calls[-1].function.arguments):
            # streamed: the call max_tokens cut went out in part (arguments as generated); its
            # text is content, as in the whole reply
            whole = calls[:-1]
            assert calls[-1].function.arguments in message.content, f"{TAG} {message}"
        if ban:  # 85 to 115 characters a call: 300 tokens hold two whole calls at least
            assert reason == "length" and len(whole) >= 2 and message.content.startswith("<tool_call>"), \
                f"{TAG} {message}"
        else:
            assert reason == "tool_calls" and calls and message.content is None, f"{TAG} {message}"
        for call in whole:
            check_call(call)
        assert len({c.id for c in calls}) == len(calls)
        if deltas is not None:
            check_deltas(deltas, calls)


def test_auto_and_none_give_text(client, model):
    """auto: the random model writes no call, so its text comes back as content (never an error);
    none: the tools are not shown to the model (the prompt is the one without tools)."""
    messages = [{"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, seed=3, temperature=0.7)
    auto = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=20, seed=3,
                                          temperature=0.7)
    none = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                          max_tokens=20, seed=3, temperature=0.7)
    assert auto.choices[0].message.tool_calls is None and isinstance(auto.choices[0].message.content, str)
    assert auto.choices[0].finish_reason in ("stop", "length")
    assert auto.usage.prompt_tokens == len(model.chat_ids(messages, tools=TOOLS)) > plain.usage.prompt_tokens
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content  # same prompt, same seed


def conversation(call_id="call_abc", arguments='{"city": "Paris", "unit": "c", "days": 2}'):
    return [{"role": "user", "content": "weather in paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"}]


def test_tool_results_render_back(client, model):
    """An assistant message's calls (arguments as JSON text, as the API returns them) reach the
    template as objects, and a tool result as a tool message."""
    messages = conversation()
    text = model.chat_template.render(template_messages(messages), add_generation_prompt=True, tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c", "days": 2}}\n' \
           '</tool_call>' in text
    assert "<s>tool: <tool_response>\nsunny, 21 C\n</tool_response>" in text
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=5)
    assert r.usage.prompt_tokens == len(model.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("extra, param", [
    (dict(extra_body={"tools": {"type": "function"}}), "tools"),
    (dict(extra_body={"tools": ["get_weather"]}), "tools[0]"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools[0].function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]),
     "tools[0].function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools[0].function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), "tools[0].function.parameters"),
    (dict(tools=[TOOLS[0], TOOLS[0]]), "tools[1].function.name"),
    (dict(tools=[{"type": "code_interpreter"}]), "tools[0].type"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice.function.name"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    (dict(messages=conversation(arguments="{not json")), "messages[1].tool_calls[0].function.arguments"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id"),
    (dict(extra_body={"functions": [{"name": "f"}]}), "functions"),
])
def test_bad_tool_requests_are_400s_naming_the_field(client, extra, param):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**kw, **extra})
    assert e.value.body["param"] == param, e.value.body


def test_python_api(model):
    """Model.chat(messages, tools=...): a ChatMessage with the parsed call; its to_dict() and a tool
    result go back into the next turn."""
    rng = np.random.default_rng(SEED + 3)
    print(TAG)
    messages = [{"role": "user", "content": "weather?"}]
    for _ in range(3):
        reply = model.chat(messages, tools=TOOLS, tool_choice=NAMED, temperature=0.7, seed=int(rng.integers(1000)),
                           max_new_tokens=300, parallel_tool_calls=False)
        assert isinstance(reply, ChatMessage) and reply.finish_reason == "tool_calls", f"{TAG} {reply}"
        (call,) = reply.tool_calls
        assert call.name == "get_weather" and reply.content is None
        jsonschema.validate(json.loads(call.arguments), PARAMETERS["get_weather"])
    turn = [*messages, reply.to_dict(), {"role": "tool", "tool_call_id": call.id, "content": "rain"}]
    again = model.chat(turn, tools=TOOLS, tool_choice="none", max_new_tokens=4)
    assert again.tool_calls == () and isinstance(again.content, str) and again.finish_reason in ("stop", "length")
    assert isinstance(model.chat(messages, max_new_tokens=3), str)  # without tools: text, as before
    with pytest.raises(portable_infer.InvalidArgumentError) as e:
        model.chat(messages, tools=TOOLS, tool_choice="required", tool_parser="xml")
    assert e.value.param == "tool_parser"


def test_rest_of_the_request_surface(client):
    """Issue 19, item 3 beside tools: n > 1 is a 400; seed, max_completion_tokens, stop,
    stream_options.include_usage and user work (with tools too)."""
    base = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], user="u-1")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(n=2, **base)
    assert e.value.body["param"] == "n"
    one, two, other = (client.chat.completions.create(temperature=1.0, seed=s, max_completion_tokens=12,
                                                      extra_body={"ignore_eos": True}, **base) for s in (7, 7, 8))
    assert one.choices[0].message.content == two.choices[0].message.content != other.choices[0].message.content
    assert one.usage.completion_tokens == 12 and one.choices[0].finish_reason == "length"
    forced = dict(logit_bias={"38": 100}, max_completion_tokens=5, extra_body={"ignore_eos": True}, **base)  # "B"
    assert client.chat.completions.create(**forced).choices[0].message.content == "BBBBB"
    stopped = client.chat.completions.create(stop=["BB"], **forced)
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("", "stop")
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, tools=TOOLS,
                                                 tool_choice=NAMED, max_completion_tokens=300, **base))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_streamed_arguments_come_in_pieces(client):
    """A call's arguments stream as they are generated (after its head), in more than one delta,
    and the SDK's ChatCompletionStreamState still assembles the call exactly."""
    rng = np.random.default_rng(SEED + 4)
    print(TAG)
    for q in questions(rng, 3):
        r, deltas = streamed(client, model="tiny", messages=[{"role": "user", "content": q}], tools=TOOLS,
                             tool_choice=NAMED, temperature=0.7, seed=int(rng.integers(1 << 30)), max_tokens=300)
        (call,) = r.choices[0].message.tool_calls
        check_call(call, ("get_weather",))
        check_deltas(deltas, [call])
        pieces = [d.function.arguments for d in deltas if d.id is None and d.function.arguments]
        assert len(pieces) > 5 and "".join(pieces) == call.function.arguments, f"{TAG} {pieces}"


def joined(deltas) -> list:
    """[(id, name, arguments)] of the ToolCallDelta pieces of ChatDeltas."""
    calls = {}
    for t in (t for d in deltas for t in d.tool_calls):
        if t.id is not None:
            calls[t.index] = [t.id, t.name, ""]
        calls[t.index][2] += t.arguments
    return [tuple(calls[i]) for i in sorted(calls)]


def test_python_stream_chat_with_tools(model):
    """Model.stream_chat(messages, tools=...): one ChatDelta per token, the arguments in pieces; the
    last carries finish_reason "tool_calls" and the whole message, which Model.chat gives too."""
    messages = [{"role": "user", "content": "weather in rome?"}]
    kw = dict(tools=TOOLS, tool_choice=NAMED, temperature=0.0, max_new_tokens=300, parallel_tool_calls=False)
    deltas = list(model.stream_chat(messages, **kw))
    assert all(isinstance(d, ChatDelta) for d in deltas) and len(deltas) == deltas[-1].response.generation_tokens
    last = deltas[-1]
    assert last.finish_reason == "tool_calls" and last.message.content is None
    assert all(d.finish_reason is None and d.message is None for d in deltas[:-1])
    (call,) = last.message.tool_calls
    assert joined(deltas) == [(call.id, "get_weather", call.arguments)]
    assert sum(1 for d in deltas for t in d.tool_calls if t.id is None and t.arguments) > 5
    jsonschema.validate(json.loads(call.arguments), PARAMETERS["get_weather"])
    again = model.chat(messages, **kw)  # greedy: the same reply, whole
    assert [(c.name, c.arguments) for c in again.tool_calls] == [(call.name, call.arguments)]
    assert all(hasattr(r, "token") for r in model.stream_chat(messages, max_new_tokens=2))  # no tools: Responses
    with pytest.raises(portable_infer.InvalidArgumentError) as e:
        next(model.stream_chat(messages, tools=TOOLS, tool_choice="sometimes"))
    assert e.value.param == "tool_choice"


def test_scheduler_submit_chat_with_tools(model, scheduler):
    """Scheduler.submit_chat(messages, tools=...): a ChatHandle giving ChatDeltas (sync and async)
    and the whole message; the same reply as Model.chat (greedy), within continuous batching."""
    import asyncio

    messages = [{"role": "user", "content": "weather in rome?"}]
    kw = dict(tools=TOOLS, tool_choice=NAMED, temperature=0.0, max_new_tokens=300, parallel_tool_calls=False)
    expected = model.chat(messages, **kw)
    handles = [scheduler.submit_chat(messages, **kw) for _ in range(3)]
    assert all(isinstance(h, ChatHandle) and h.prompt_tokens > 0 for h in handles)
    synced = list(handles[0])

    async def read(h):
        return [d async for d in h]

    asynced = asyncio.run(read(handles[1]))
    for deltas in (synced, asynced):
        last = deltas[-1]
        assert last.finish_reason == "tool_calls" and joined(deltas) == [
            (c.id, c.name, c.arguments) for c in last.message.tool_calls]
        assert [(c.name, c.arguments) for c in last.message.tool_calls] == [
            (c.name, c.arguments) for c in expected.tool_calls]
    whole = handles[2].message(timeout=60)
    assert whole.finish_reason == "tool_calls" and [(c.name, c.arguments) for c in whole.tool_calls] == [
        (c.name, c.arguments) for c in expected.tool_calls]
    assert handles[2].done and handles[2].message() == whole
    plain = scheduler.submit_chat(messages, max_new_tokens=3)  # no tools: a RequestHandle of Responses
    assert not isinstance(plain, ChatHandle) and isinstance(plain.text(timeout=60), str)
    with pytest.raises(portable_infer.InvalidArgumentError) as e:
        scheduler.submit_chat(messages, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert e.value.param == "tool_choice"


def test_a_schema_llguidance_cannot_compile_over_http(client):
    """Item 5, as vLLM: auto mode enforces no schema, so one llguidance cannot compile is taken
    (the tools reach the prompt); "required" must compile it: a 400 naming it."""
    odd = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}]
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=odd, max_tokens=3)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 100
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(tool_choice="required", **kw)
    assert e.value.body["param"] == "tools[0].function.parameters" and "auto" in e.value.body["message"]
