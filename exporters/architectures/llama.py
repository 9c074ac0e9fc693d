"""Llama 2/3, SmolLM, TinyLlama: RMSNorm, SiLU-gated MLP, RoPE (default/linear/llama3), GQA."""

from .common import ATTN_BIAS_NAMES, LLAMA_NAMES, DecoderLayout, activation, model_dims, rotary
from .gguf_spec import ATTN_BIAS_GGUF, LLAMA_GGUF, GGUFSpec, GGUFView, llama_like_config

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


# --- GGUF (llama.cpp's "llama" architecture) -------------------------------------------------------
def gguf_config(v: GGUFView) -> dict:
    """llama.cpp stores Llama 3's RoPE scaling as per-frequency divisors (``rope_freqs.weight``)
    and the head size as rope.dimension_count / attention.key_length."""
    cfg = llama_like_config(v, "llama")
    cfg["head_dim"] = v.key("attention.key_length", v.key("rope.dimension_count", cfg["head_dim"]))
    if v.has("rope_freqs.weight"):
        cfg["rope_scaling"] = {"rope_type": "freq_factors", "factors": v.read("rope_freqs.weight").tolist()}
    cfg["attention_bias"] = v.has("blk.0.attn_q.bias")
    cfg["mlp_bias"] = v.has("blk.0.ffn_up.bias")
    return cfg


_MLP_BIAS_GGUF = {f"blk.{{i}}.ffn_{r}.bias": f"model.layers.{{i}}.mlp.{r}_proj.bias" for r in ("gate", "up", "down")}
GGUF = GGUFSpec(
    arch="llama",
    names={**LLAMA_GGUF, **ATTN_BIAS_GGUF, "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
           **_MLP_BIAS_GGUF},
    config=gguf_config, permuted_qk=True,
)
