"""Decisions made on structured data, not on message text; public names for what other modules call."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from portable_infer.engine import providers
from portable_infer.errors import ContextLengthError, InvalidArgumentError, PackageError
from portable_infer.decode.generate import check_prompt
from portable_infer.package.manifest import GraphVariant, KVLayout, Manifest
from portable_infer.model import Model

GOLDEN = Path(__file__).parent / "golden" / "manifest_tiny_llama.json"
CUDA, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


# --- ContextLengthError says what to lower ------------------------------------------------------
def test_context_length_error_names_the_prompt_by_default():
    with pytest.raises(ContextLengthError) as info:
        check_prompt(list(range(1, 17)), max_context=16, truncate=False)
    assert info.value.param == "prompt"
    assert ContextLengthError("x", param="max_new_tokens").param == "max_new_tokens"
    assert isinstance(info.value, InvalidArgumentError)


def test_the_server_names_what_to_lower_from_the_param_not_the_message():
    from portable_infer.serving.http.protocol import from_engine_error

    kv = ContextLengthError("the request needs 9 KV blocks; lower max_new_tokens", param="max_new_tokens")
    assert (from_engine_error(kv).param, from_engine_error(kv).code) == ("max_tokens", "context_length_exceeded")
    worded = ContextLengthError("a message that mentions KV blocks and max_new_tokens")  # param: the prompt
    assert from_engine_error(worded).param == "prompt"
    assert from_engine_error(InvalidArgumentError("temperature is bad", param="top_p")).param == "top_p"


# --- the graph-capture hint follows the package's KV dtype, whatever ORT's message says -----------
class _Session:
    def __init__(self, names):
        self._names = names

    def get_providers(self):
        return list(self._names)


class _CaptureRefusingOrt:
    """CUDA listed; a session that asks for CUDA graphs raises ``message``, a plain one starts."""

    __version__ = "1.22.0"

    class SessionOptions:
        pass

    def __init__(self, message):
        self.message = message

    def get_available_providers(self):
        return [CUDA, CPU_EP]

    def InferenceSession(self, path, sess_options, providers):
        if providers[0][1].get("enable_cuda_graph") == "1":
            raise RuntimeError(self.message)
        return _Session([name for name, _ in providers])


def _static(dtype: str, precision: str) -> GraphVariant:
    kv = KVLayout("BHSD", dtype, 1, 4, "static", (), ())
    return GraphVariant(name="static", file=f"model.static.{precision}.onnx", precision=precision, opset=21,
                        domains=("com.microsoft",), providers=("cpu", "cuda"), inputs=(), outputs=(), kv=kv)


@pytest.mark.parametrize("dtype,precision,message,hinted", [
    ("float32", "fp32", "node GroupQueryAttention is placed on CPUExecutionProvider", True),
    ("float16", "fp16", "graph capture is not supported for this model", False),
])
def test_graph_capture_hint_follows_the_kv_dtype(tmp_path, caplog, dtype, precision, message, hinted):
    variant = _static(dtype, precision)
    (tmp_path / variant.file).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="portable_infer.engine.providers"):
        sel = providers.select_session([variant], tmp_path, "cuda", ort=_CaptureRefusingOrt(message))
    assert sel.provider.key == "cuda" and not sel.graph_capture
    warned = [r.getMessage() for r in caplog.records if "refused graph capture" in r.getMessage()]
    assert len(warned) == 1 and message in warned[0]
    assert ("GroupQueryAttention has no fp32 CUDA kernel" in warned[0]) == hinted, warned[0]


# --- public names ---------------------------------------------------------------------------------
def _model(**generation) -> Model:
    """A Model on the golden tiny-llama manifest (the fields it leaves out filled in), no engine."""
    d = json.loads(GOLDEN.read_text())
    d["exporter_version"] = "0"
    d["source"] = {**d["source"], "path": "hf", "sha256": "0" * 64}
    d["files"] = [{**f, "sha256": "0" * 64, "size": 0} for f in d["files"]]
    d["generation"] = generation
    return Model(Manifest.from_dict(d), engine=None)


def test_model_token_helpers_are_public():
    model = _model()
    assert model.as_ids([3, 4, 5]) == [3, 4, 5]
    with pytest.raises(InvalidArgumentError, match="ids"):
        model.as_ids([3, "x"], "ids")
    with pytest.raises(PackageError, match="no tokenizer"):
        model.as_ids("text")
    with pytest.raises(PackageError, match="no tokenizer"):
        model.require_tokenizer()
    with pytest.raises(PackageError, match="no chat template"):
        model.chat_ids([{"role": "user", "content": "hi"}])
    assert model.tokenizer is model.codec.tokenizer is None
    assert model.codec.vocab_size == model.manifest.model.vocab_size
    assert model.codec.eos_ids == tuple(model.manifest.tokenizer.eos_token_ids)


def test_provider_helpers_are_public():
    specs, explicit = providers.resolve_request("cuda,cpu", "1.22.0")
    assert [s.key for s in specs] == ["cuda", "cpu"] and explicit
    assert providers.default_ort().__name__ == "onnxruntime"


# --- the manifest's generation defaults reach Model.defaults; a manifest without them loads -------
def test_generation_defaults_reach_model_defaults():
    d = _model(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05).defaults
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.6, 0.9, 20, 1.05)


def test_a_manifest_without_generation_values_keeps_greedy_defaults():
    d = _model().defaults
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.0, 1.0, 0, 1.0)
