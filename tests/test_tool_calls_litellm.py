"""One gateway client as users deploy it: LiteLLM (``litellm.completion(model="openai/<name>",
api_base=..., api_key=...)``) pointed at our server on loopback passes a tool-calling request (a
named function and "required", plain and streamed) and a JSON-schema request.

LiteLLM reads its model-price table from the network at import unless told to use its bundled
copy (``LITELLM_LOCAL_MODEL_COST_MAP``): these tests stay on loopback.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
pytest.importorskip("torch")
litellm = pytest.importorskip("litellm")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

import portable_infer  # noqa: E402
from _tools import PARAMETERS, TOOLS, long_tiny_llama, questions, tool_package  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from portable_infer.serving.http import ServerConfig, create_app  # noqa: E402
from portable_infer.serving.http.runner import BackgroundServer  # noqa: E402

SEED = int(os.environ.get("LITELLM_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[LITELLM_SEED={SEED}]"
KEY = "k"
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {
    "type": "integer", "minimum": 0, "maximum": 9}}, "required": ["answer", "score"], "additionalProperties": False}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """``completion(**kw)``: litellm.completion against our server."""
    root = tmp_path_factory.mktemp("litellm")
    model = portable_infer.load(tool_package(long_tiny_llama(root), root / "tools"), "cpu", intra_op_threads=2)
    scheduler = Scheduler(model, SchedulerConfig(max_batch=4, max_waiting=16))
    config = ServerConfig(api_key=KEY, model_name="tiny", max_prompt_tokens=1500, max_new_tokens=400)
    with BackgroundServer(create_app(scheduler, config)) as srv:
        yield lambda **kw: litellm.completion(model="openai/tiny", api_base=f"{srv.url}/v1", api_key=KEY,
                                              num_retries=0, timeout=60, **kw)
    scheduler.close()


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "search"}}, "required"])
def test_tool_calls_through_litellm(gateway, choice):
    rng = np.random.default_rng(SEED)
    print(TAG)
    for i, q in enumerate(questions(rng, 4)):
        kw = dict(messages=[{"role": "user", "content": q}], tools=TOOLS, tool_choice=choice, temperature=0.7,
                  seed=int(rng.integers(1 << 30)), max_tokens=300, parallel_tool_calls=False)
        if i % 2:
            r = gateway(**kw)
        else:  # LiteLLM's own assembly of the streamed deltas
            r = litellm.stream_chunk_builder(list(gateway(stream=True, **kw)), messages=kw["messages"])
        choice0 = r.choices[0]
        assert choice0.finish_reason == "tool_calls", f"{TAG} {choice0}"
        (call,) = choice0.message.tool_calls
        assert call.id.startswith("call_") and call.function.name in PARAMETERS, f"{TAG} {call}"
        if isinstance(choice, dict):
            assert call.function.name == "search"
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_json_schema_through_litellm(gateway):
    rng = np.random.default_rng(SEED + 1)
    print(TAG)
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    for q in questions(rng, 3):
        r = gateway(messages=[{"role": "user", "content": q}], response_format=fmt, temperature=0.7,
                    seed=int(rng.integers(1 << 30)), max_tokens=100)
        assert r.choices[0].finish_reason == "stop", f"{TAG} {r.choices[0]}"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
