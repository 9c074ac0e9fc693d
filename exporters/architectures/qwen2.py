"""Qwen2 / Qwen2.5: the Llama block with biases on Q, K and V."""

from .common import ATTN_BIAS_NAMES, LLAMA_NAMES, DecoderLayout, activation, model_dims, rotary, uniform_window
from .gguf_spec import ATTN_BIAS_GGUF, LLAMA_GGUF, GGUFSpec, llama_like_config

FAMILY = "qwen2"
MODEL_TYPES = ("qwen2",)


def layout(cfg: dict) -> DecoderLayout:
    types, window = uniform_window(cfg, enabled=bool(cfg.get("use_sliding_window")))
    dims = model_dims(cfg, FAMILY, types, window)
    rotary_dim, freqs = rotary(cfg, dims.head_dim, dims.layer_types)
    return DecoderLayout(
        dims=dims, names={**LLAMA_NAMES, **ATTN_BIAS_NAMES}, norm_eps=cfg.get("rms_norm_eps", 1e-6),
        activation=activation(cfg.get("hidden_act", "silu")),
        rotary_dim=rotary_dim, inv_freq=freqs, attn_scale=dims.head_dim ** -0.5,
    )


# --- GGUF: the Llama tensor names with Q/K/V biases; rows as in the HF checkpoint (no permutation)
GGUF = GGUFSpec(arch="qwen2", names={**LLAMA_GGUF, **ATTN_BIAS_GGUF},
                config=lambda v: llama_like_config(v, "qwen2"))
