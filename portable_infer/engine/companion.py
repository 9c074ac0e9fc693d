"""Sessions for the small graphs the runtime ships (``graphs/*.onnx``, built by
``exporters/runtime_graphs.py``), on the device of a model's session.

They work on the model's own buffers (KV rows, logits) where those live, so they run on the
model session's provider with its device options, and on the CPU for their small index inputs.
"""

from __future__ import annotations

from pathlib import Path

from portable_infer.errors import ProviderError

GRAPHS = Path(__file__).resolve().parent / "graphs"  # portable_infer/engine/graphs (package data)
_NO_GRAPH_CAPTURE = {"enable_cuda_graph"}  # their output addresses change every run


def companion_session(session, ort, name: str, provider: str | None = None):
    """An ONNX Runtime session for the shipped graph ``name`` on ``session``'s device: ``provider``
    (default: the session's providers) with the session's options for it, and the CPU. A
    :class:`ProviderError` when ONNX Runtime could not put it on that provider."""
    options = session.get_provider_options()
    names = [provider, "CPUExecutionProvider"] if provider else session.get_providers()
    providers = [(p, {k: v for k, v in options.get(p, {}).items() if k not in _NO_GRAPH_CAPTURE})
                 for p in dict.fromkeys(names)]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    companion = ort.InferenceSession(str(GRAPHS / name), so, providers=providers)
    if companion.get_providers()[0] != names[0]:  # ONNX Runtime falls back to the CPU silently
        raise ProviderError(f"{name} runs on {companion.get_providers()[0]}, not on {names[0]}",
                            reason="not available")
    return companion
