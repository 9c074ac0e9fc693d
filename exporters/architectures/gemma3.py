"""Gemma 3 (text): scaled embeddings, (1 + w) RMSNorm, q/k norms, four norms per layer,
GELU-tanh MLP, and interleaved sliding-window / global layers with their own RoPE bases."""

import math

from .common import LLAMA_NAMES, QK_NORM_NAMES, DecoderLayout, activation, model_dims, need, rotary
from .gguf_spec import LLAMA_GGUF, QK_NORM_GGUF, GGUFSpec, GGUFView, llama_like_config

FAMILY = "gemma3"
MODEL_TYPES = ("gemma3_text",)


def _layer_types(cfg: dict) -> tuple:
    if cfg.get("layer_types"):
        return tuple(cfg["layer_types"])
    pattern = cfg.get("sliding_window_pattern", 6)
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(need(cfg, "num_hidden_layers")))


def _rope_cfg(cfg: dict) -> dict:
    """Older Gemma 3 configs give rope_theta + rope_local_base_freq instead of per-type params."""
    if "rope_parameters" in cfg or "rope_local_base_freq" not in cfg:
        return cfg
    glob = {"rope_type": "default", **(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 1e6)}
    local = {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}
    return {**cfg, "rope_parameters": {"full_attention": glob, "sliding_attention": local}}


def layout(cfg: dict) -> DecoderLayout:
    cfg = _rope_cfg(cfg)
    types = _layer_types(cfg)
    dims = model_dims(cfg, FAMILY, types, cfg.get("sliding_window"))
    rotary_dim, freqs = rotary(cfg, dims.head_dim, types)
    names = {**LLAMA_NAMES, **QK_NORM_NAMES,
             "post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
             "mlp_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
             "post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm.weight"}
    return DecoderLayout(
        dims=dims, names=names, norm_eps=cfg.get("rms_norm_eps", 1e-6), norm_offset=1.0,
        activation=activation(cfg.get("hidden_activation") or cfg.get("hidden_act", "gelu_pytorch_tanh")),
        qk_norm=True, sandwich_norm=True, rotary_dim=rotary_dim, inv_freq=freqs,
        attn_scale=float(cfg.get("query_pre_attn_scalar") or dims.head_dim) ** -0.5,
        embed_scale=math.sqrt(dims.hidden_size),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
    )


# --- GGUF ----------------------------------------------------------------------------------------
def _gguf_layer_types(v: GGUFView, layers: int) -> list:
    """attention.sliding_window_pattern: every n-th layer global (int) or per layer (True =
    sliding); llama.cpp's default for Gemma 3 is 6."""
    pattern = v.key("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


def gguf_config(v: GGUFView) -> dict:
    """llama.cpp's Gemma 3: RoPE base rope.freq_base for global layers (scaled by rope.scaling.*)
    and rope.freq_base_swa (default 10000) for sliding ones; the attention scale 1/sqrt(head_dim),
    except 1/sqrt(hidden/heads) for the 62-layer 27B model."""
    cfg = llama_like_config(v, "gemma3_text")
    layers, window = cfg["num_hidden_layers"], v.key("attention.sliding_window") or None
    types = _gguf_layer_types(v, layers) if window else ["full_attention"] * layers
    glob = {"rope_type": "default", **(cfg.pop("rope_scaling", None) or {}), "rope_theta": cfg["rope_theta"]}
    local = {"rope_type": "default", "rope_theta": v.key("rope.freq_base_swa", 10000.0)}
    cfg.update(
        layer_types=types, sliding_window=window, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"full_attention": glob, "sliding_attention": local},
        query_pre_attn_scalar=cfg["hidden_size"] // cfg["num_attention_heads"] if layers == 62 else cfg["head_dim"],
        final_logit_softcapping=v.key("final_logit_softcapping"),
    )
    return cfg


GGUF = GGUFSpec(
    arch="gemma3",
    names={**LLAMA_GGUF, **QK_NORM_GGUF,
           "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
           "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
           "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight"},
    config=gguf_config, norm_shift=1.0,
)
