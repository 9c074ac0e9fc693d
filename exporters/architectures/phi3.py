"""Phi-3: fused qkv_proj and gate_up_proj, optional partial rotary and sliding window."""

from .common import LLAMA_NAMES, DecoderLayout, activation, model_dims, rotary, uniform_window

FAMILY = "phi3"
MODEL_TYPES = ("phi3",)

_FUSED = {"qkv": "model.layers.{i}.self_attn.qkv_proj.weight",
          "gate_up": "model.layers.{i}.mlp.gate_up_proj.weight"}


def layout(cfg: dict) -> DecoderLayout:
    types, window = uniform_window(cfg)
    dims = model_dims(cfg, FAMILY, types, window)
    rotary_dim, freqs = rotary(cfg, dims.head_dim, dims.layer_types)
    names = {k: v for k, v in LLAMA_NAMES.items() if k not in ("q", "k", "v", "gate", "up")}
    names.update(_FUSED)
    return DecoderLayout(
        dims=dims, names=names, norm_eps=cfg.get("rms_norm_eps", 1e-5),
        activation=activation(cfg.get("hidden_act", "silu")),
        rotary_dim=rotary_dim, inv_freq=freqs, attn_scale=dims.head_dim ** -0.5,
    )
