"""Phi-3: fused qkv_proj and gate_up_proj, optional partial rotary and sliding window."""

from portable_infer.errors import UnsupportedArchitectureError

from .common import LLAMA_NAMES, DecoderLayout, activation, model_dims, rotary, uniform_window
from .gguf_spec import LLAMA_GGUF, GGUFSpec, GGUFView, llama_like_config

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


# --- GGUF: fused qkv as blk.N.attn_qkv and gate_up as a double-width blk.N.ffn_up; the rotary size
# as rope.dimension_count; attention.sliding_window 0 means none (llama.cpp's converter)
def gguf_config(v: GGUFView) -> dict:
    if v.has("rope_factors_long.weight"):
        raise UnsupportedArchitectureError(
            f"{v.path}: a Phi-3 GGUF with LongRoPE factors (rope_factors_long/short, the 128k models) is "
            f"not supported; use a 4k-context Phi-3 GGUF or its Hugging Face folder")
    cfg = llama_like_config(v, "phi3")
    cfg["rms_norm_eps"] = v.key("attention.layer_norm_rms_epsilon", 1e-5)
    rope_dim, head_dim = v.key("rope.dimension_count", cfg["head_dim"]), cfg["head_dim"]
    if rope_dim != head_dim:
        cfg["partial_rotary_factor"] = rope_dim / head_dim
        if int(head_dim * cfg["partial_rotary_factor"]) != rope_dim:
            raise UnsupportedArchitectureError(f"{v.path}: rotary size {rope_dim} of head size {head_dim} "
                                               f"is not expressible as a partial rotary factor")
    cfg["sliding_window"] = v.key("attention.sliding_window") or None
    return cfg


_GGUF_SHARED = ("token_embd.weight", "output_norm.weight", "output.weight", "blk.{i}.attn_norm.weight",
                "blk.{i}.attn_output.weight", "blk.{i}.ffn_norm.weight", "blk.{i}.ffn_down.weight")
GGUF = GGUFSpec(
    arch="phi3",
    names={**{g: LLAMA_GGUF[g] for g in _GGUF_SHARED},
           "blk.{i}.attn_qkv.weight": _FUSED["qkv"], "blk.{i}.ffn_up.weight": _FUSED["gate_up"]},
    config=gguf_config,
)
