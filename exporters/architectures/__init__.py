"""The architecture registry: HF ``model_type`` -> family module.

Every family module exposes ``FAMILY``, ``MODEL_TYPES`` and ``layout(config) -> DecoderLayout``.
"""

from __future__ import annotations

from types import ModuleType

from portable_infer.errors import UnsupportedArchitectureError

from . import gemma3, gpt2, llama, mistral, phi3, qwen2, qwen3

FAMILIES: dict[str, ModuleType] = {m.FAMILY: m for m in (llama, mistral, qwen2, qwen3, phi3, gemma3, gpt2)}
MODEL_TYPES: dict[str, str] = {t: m.FAMILY for m in FAMILIES.values() for t in m.MODEL_TYPES}


def family_for(model_type: str | None) -> ModuleType:
    """The family module for an HF model_type, or a clear error listing what is supported."""
    if model_type not in MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by the direct exporter; supported: "
            f"{', '.join(sorted(MODEL_TYPES))}"
        )
    return FAMILIES[MODEL_TYPES[model_type]]
