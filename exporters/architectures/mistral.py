"""Mistral: the Llama block with an optional sliding window on every layer."""

from .common import LLAMA_NAMES, DecoderLayout, activation, model_dims, rotary, uniform_window
from .gguf_spec import LLAMA_GGUF, GGUFSpec, GGUFView, llama_like_config

FAMILY = "mistral"
MODEL_TYPES = ("mistral",)


def layout(cfg: dict) -> DecoderLayout:
    types, window = uniform_window(cfg)
    dims = model_dims(cfg, FAMILY, types, window)
    rotary_dim, freqs = rotary(cfg, dims.head_dim, dims.layer_types)
    return DecoderLayout(
        dims=dims, names=dict(LLAMA_NAMES), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        activation=activation(cfg.get("hidden_act", "silu")),
        rotary_dim=rotary_dim, inv_freq=freqs, attn_scale=dims.head_dim ** -0.5,
    )


# --- GGUF: llama.cpp converts Mistral to its "llama" architecture (Q/K rows permuted); the file's
# general.name tells them apart, as transformers' GGUF loader does. llama.cpp runs it without a
# sliding window unless the metadata gives one.
def gguf_config(v: GGUFView) -> dict:
    cfg = llama_like_config(v, "mistral")
    cfg["head_dim"] = v.key("attention.key_length", v.key("rope.dimension_count", cfg["head_dim"]))
    cfg["sliding_window"] = v.key("attention.sliding_window") or None
    return cfg


GGUF = GGUFSpec(arch="llama", names=dict(LLAMA_GGUF), config=gguf_config, permuted_qk=True,
                matches=lambda v: "mistral" in str(v.meta.get("general.name", "")).lower())
