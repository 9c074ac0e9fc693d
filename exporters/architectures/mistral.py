"""Mistral: the Llama block with an optional sliding window on every layer."""

from .common import LLAMA_NAMES, DecoderLayout, activation, model_dims, rotary, uniform_window

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
