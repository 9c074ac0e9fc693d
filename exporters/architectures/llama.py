"""Llama 2/3, SmolLM, TinyLlama: RMSNorm, SiLU-gated MLP, RoPE (default/linear/llama3), GQA."""

from .common import ATTN_BIAS_NAMES, LLAMA_NAMES, DecoderLayout, activation, model_dims, rotary

FAMILY = "llama"
MODEL_TYPES = ("llama", "smollm", "tinyllama")


def layout(cfg: dict) -> DecoderLayout:
    dims = model_dims(cfg, FAMILY)
    rotary_dim, freqs = rotary(cfg, dims.head_dim, dims.layer_types)
    names = dict(LLAMA_NAMES)
    if cfg.get("attention_bias"):
        names.update(ATTN_BIAS_NAMES, o_bias="model.layers.{i}.self_attn.o_proj.bias")
    if cfg.get("mlp_bias"):
        names.update({f"{r}_bias": f"model.layers.{{i}}.mlp.{r}_proj.bias" for r in ("gate", "up", "down")})
    return DecoderLayout(
        dims=dims, names=names, norm_eps=cfg.get("rms_norm_eps", 1e-6),
        activation=activation(cfg.get("hidden_act", "silu")),
        rotary_dim=rotary_dim, inv_freq=freqs, attn_scale=dims.head_dim ** -0.5,
    )
