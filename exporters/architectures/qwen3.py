"""Qwen3: the Llama block with RMSNorm on queries and keys per head (q_norm, k_norm)."""

from .common import (ATTN_BIAS_NAMES, LLAMA_NAMES, QK_NORM_NAMES, DecoderLayout, activation, model_dims,
                     rotary, uniform_window)
from .gguf_spec import ATTN_BIAS_GGUF, LLAMA_GGUF, QK_NORM_GGUF, GGUFSpec, GGUFView, llama_like_config

FAMILY = "qwen3"
MODEL_TYPES = ("qwen3",)


def layout(cfg: dict) -> DecoderLayout:
    types, window = uniform_window(cfg, enabled=bool(cfg.get("use_sliding_window")))
    dims = model_dims(cfg, FAMILY, types, window)
    rotary_dim, freqs = rotary(cfg, dims.head_dim, dims.layer_types)
    names = {**LLAMA_NAMES, **QK_NORM_NAMES}
    if cfg.get("attention_bias"):
        names.update(ATTN_BIAS_NAMES, o_bias="model.layers.{i}.self_attn.o_proj.bias")
    return DecoderLayout(
        dims=dims, names=names, norm_eps=cfg.get("rms_norm_eps", 1e-6), qk_norm=True,
        activation=activation(cfg.get("hidden_act", "silu")),
        rotary_dim=rotary_dim, inv_freq=freqs, attn_scale=dims.head_dim ** -0.5,
    )


# --- GGUF: the Llama tensor names with per-head q/k norms; head_dim from attention.key_length
def gguf_config(v: GGUFView) -> dict:
    cfg = llama_like_config(v, "qwen3")
    cfg["attention_bias"] = v.has("blk.0.attn_q.bias")
    return cfg


GGUF = GGUFSpec(arch="qwen3", names={**LLAMA_GGUF, **QK_NORM_GGUF, **ATTN_BIAS_GGUF,
                                     "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias"},
                config=gguf_config)
