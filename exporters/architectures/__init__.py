"""The architecture registry: HF ``model_type`` -> family module.

Every family module exposes ``FAMILY``, ``MODEL_TYPES``, ``layout(config) -> DecoderLayout`` and
``GGUF`` (how llama.cpp lays the family out: ``gguf_spec.GGUFSpec``).
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


# GGUF general.architecture -> its families, the ones with a ``matches`` test first (Mistral is
# llama.cpp's "llama" architecture with a Mistral name)
GGUF_ARCHES: dict[str, list] = {}
for _m in sorted(FAMILIES.values(), key=lambda m: m.GGUF.matches is None):
    GGUF_ARCHES.setdefault(_m.GGUF.arch, []).append(_m)


def gguf_family_for(arch: str | None, view) -> ModuleType:
    """The family module for a GGUF file's architecture (``view``: a ``gguf_spec.GGUFView``)."""
    for module in GGUF_ARCHES.get(arch, ()):
        if module.GGUF.matches is None or module.GGUF.matches(view):
            return module
    raise UnsupportedArchitectureError(
        f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(GGUF_ARCHES))}")
