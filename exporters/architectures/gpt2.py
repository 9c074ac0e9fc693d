"""GPT-2: learned positions, LayerNorm with bias, GELU (tanh) MLP, fused c_attn, Conv1D weights."""

from portable_infer.package.manifest import ModelDims

from .common import DecoderLayout, activation, need
from .gguf_spec import GGUFSpec, GGUFView, vocab_size

FAMILY = "gpt2"
MODEL_TYPES = ("gpt2",)

_NAMES = {
    "embed": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight",
    "final_norm": "transformer.ln_f.weight", "final_norm_bias": "transformer.ln_f.bias",
    "lm_head": "lm_head.weight",
    "attn_norm": "transformer.h.{i}.ln_1.weight", "attn_norm_bias": "transformer.h.{i}.ln_1.bias",
    "qkv": "transformer.h.{i}.attn.c_attn.weight", "qkv_bias": "transformer.h.{i}.attn.c_attn.bias",
    "o": "transformer.h.{i}.attn.c_proj.weight", "o_bias": "transformer.h.{i}.attn.c_proj.bias",
    "mlp_norm": "transformer.h.{i}.ln_2.weight", "mlp_norm_bias": "transformer.h.{i}.ln_2.bias",
    "up": "transformer.h.{i}.mlp.c_fc.weight", "up_bias": "transformer.h.{i}.mlp.c_fc.bias",
    "down": "transformer.h.{i}.mlp.c_proj.weight", "down_bias": "transformer.h.{i}.mlp.c_proj.bias",
}


def layout(cfg: dict) -> DecoderLayout:
    hidden, heads, layers = need(cfg, "n_embd"), need(cfg, "n_head"), need(cfg, "n_layer")
    dims = ModelDims(
        architecture=FAMILY, model_type=cfg["model_type"], num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, hidden_size=hidden,
        intermediate_size=cfg.get("n_inner") or 4 * hidden, vocab_size=need(cfg, "vocab_size"),
        max_context=need(cfg, "n_positions"), layer_types=("full_attention",) * layers,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )
    return DecoderLayout(
        dims=dims, names=dict(_NAMES), norm="layer", norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        activation=activation(cfg.get("activation_function", "gelu_new")), gated_mlp=False,
        positions="learned", attn_scale=dims.head_dim ** -0.5,
        transposed_weights=cfg.get("conv1d_weights", True),  # False: [out, in] (GGUF)
    )


# --- GGUF: llama.cpp's converter transposes the Conv1D weights to [out, in] (so blocks run along
# input features), keeps c_attn fused as attn_qkv, and writes wpe as position_embd.
def gguf_config(v: GGUFView) -> dict:
    return {
        "model_type": "gpt2", "n_embd": v.need("embedding_length"), "n_head": v.need("attention.head_count"),
        "n_layer": v.need("block_count"), "n_positions": v.need("context_length"),
        "n_inner": v.key("feed_forward_length"), "layer_norm_epsilon": v.key("attention.layer_norm_epsilon", 1e-5),
        "vocab_size": vocab_size(v), "tie_word_embeddings": not v.has("output.weight"),
        "activation_function": "gelu_new", "conv1d_weights": False,
    }


_GGUF_LAYER = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
GGUF = GGUFSpec(
    arch="gpt2",
    names={"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
           "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
           "output.weight": "lm_head.weight",
           **{f"blk.{{i}}.{g}.{p}": f"transformer.h.{{i}}.{h}.{p}" for g, h in _GGUF_LAYER.items()
              for p in ("weight", "bias")}},
    config=gguf_config,
)
