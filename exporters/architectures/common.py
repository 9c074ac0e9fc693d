"""What architecture families share: the decoder layout record and config readers.

A family module turns an HF config dict into a :class:`DecoderLayout`: plain data saying which
norm, activation, attention features and tensor names the shared decoder builder should use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from portable_infer.errors import SourceError, UnsupportedArchitectureError
from portable_infer.package.manifest import ModelDims


@dataclass(frozen=True)
class DecoderLayout:
    dims: ModelDims
    names: dict  # role -> HF tensor name ("{i}" = layer index); absent role = feature unused
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # Gemma multiplies by (1 + weight)
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    gated_mlp: bool = True
    qk_norm: bool = False
    sandwich_norm: bool = False  # Gemma 3: norms after attention and after the MLP too
    positions: str = "rope"  # "rope" | "learned"
    rotary_dim: int = 0
    inv_freq: dict = field(default_factory=dict)  # layer type -> np.ndarray [rotary_dim / 2]
    attn_scale: float = 1.0
    embed_scale: float | None = None
    final_logit_softcap: float | None = None
    transposed_weights: bool = False  # GPT-2 Conv1D stores [in, out]


# The Llama tensor names; most families reuse them with a few roles added or removed.
LLAMA_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}
ATTN_BIAS_NAMES = {
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
}
QK_NORM_NAMES = {
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
}


def need(cfg: dict, key: str):
    if cfg.get(key) is None:
        raise SourceError(f"config.json lacks {key!r}, which model_type {cfg.get('model_type')!r} needs")
    return cfg[key]


def model_dims(cfg: dict, family: str, layer_types: tuple = (), sliding_window: int | None = None) -> ModelDims:
    heads = need(cfg, "num_attention_heads")
    hidden = need(cfg, "hidden_size")
    return ModelDims(
        architecture=family,
        model_type=cfg["model_type"],
        num_layers=need(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        hidden_size=hidden,
        intermediate_size=need(cfg, "intermediate_size"),
        vocab_size=need(cfg, "vocab_size"),
        max_context=cfg.get("max_position_embeddings") or 2048,
        rope_theta=rope_params(cfg).get("rope_theta"),
        rope_scaling=_scaling_or_none(rope_params(cfg)),
        sliding_window=sliding_window,
        layer_types=layer_types or ("full_attention",) * need(cfg, "num_hidden_layers"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def rope_params(cfg: dict, layer_type: str | None = None) -> dict:
    """RoPE settings in transformers-5 form, from either config style."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type and layer_type in params:
        return dict(params[layer_type])
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    out = dict(cfg.get("rope_scaling") or {})
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out.pop("type")
    out.setdefault("rope_type", "default")
    out["rope_theta"] = cfg.get("rope_theta", 10000.0)
    if "partial_rotary_factor" in cfg:
        out.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    return out


def _scaling_or_none(params: dict) -> dict | None:
    extra = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return None if extra.get("rope_type", "default") == "default" and len(extra) <= 1 else extra


def inv_freq(params: dict, rotary_dim: int) -> np.ndarray:
    """RoPE inverse frequencies, with the scaling types we support applied."""
    base = float(params.get("rope_theta", 10000.0))
    freq = 1.0 / base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    kind = params.get("rope_type", "default")
    if kind == "default":
        return freq.astype(np.float32)
    if kind == "linear":
        return (freq / float(params["factor"])).astype(np.float32)
    if kind == "llama3":
        factor, lo, hi = (float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > old / lo, freq / factor, freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32)
    if kind == "freq_factors":  # GGUF: llama3 scaling stored as per-frequency divisors (rope_freqs)
        factors = np.asarray(params["factors"], dtype=np.float64)
        if factors.shape != freq.shape:
            raise SourceError(f"rope frequency factors have {factors.size} values; rotary dimension "
                              f"{rotary_dim} needs {freq.size}")
        return (freq / factors).astype(np.float32)
    raise UnsupportedArchitectureError(
        f"rope_type {kind!r} is not supported; supported: default, linear, llama3, freq_factors")


def rotary(cfg: dict, head_dim: int, layer_types: tuple) -> tuple[int, dict]:
    """(rotary_dim, {layer_type: inv_freq}) for the layer types present."""
    factor = rope_params(cfg).get("partial_rotary_factor", 1.0)
    rotary_dim = int(head_dim * factor)
    return rotary_dim, {t: inv_freq(rope_params(cfg, t), rotary_dim) for t in set(layer_types)}


def uniform_window(cfg: dict, enabled: bool = True) -> tuple[tuple, int | None]:
    """Layer types for families with one optional sliding window for every layer."""
    n = need(cfg, "num_hidden_layers")
    window = cfg.get("sliding_window") if enabled else None
    types = cfg.get("layer_types")
    if types and window:
        return tuple(types), window
    return (("sliding_attention" if window else "full_attention"),) * n, window


def _role_shapes(d: ModelDims) -> dict:
    """Role -> the [out, in] (or [n]) shape config.json implies for its HF tensor."""
    E, I, Dh = d.hidden_size, d.intermediate_size, d.head_dim
    q, kv = d.num_heads * Dh, d.num_kv_heads * Dh
    vectors = ("final_norm", "final_norm_bias", "attn_norm", "attn_norm_bias", "mlp_norm", "mlp_norm_bias",
               "post_attn_norm", "post_mlp_norm", "o_bias", "down_bias")
    return {
        "embed": (d.vocab_size, E), "lm_head": (d.vocab_size, E), "pos_embed": (d.max_context, E),
        "q": (q, E), "k": (kv, E), "v": (kv, E), "o": (E, q), "qkv": (q + 2 * kv, E),
        "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,), "qkv_bias": (q + 2 * kv,),
        "gate": (I, E), "up": (I, E), "down": (E, I), "gate_up": (2 * I, E), "gate_bias": (I,), "up_bias": (I,),
        "q_norm": (Dh,), "k_norm": (Dh,), **{r: (E,) for r in vectors},
    }


_TABLES = ("embed", "pos_embed", "lm_head")  # never Conv1D-transposed


def check_shapes(layout: DecoderLayout, source) -> None:
    """Fail before anything is written when a tensor's shape disagrees with config.json.

    Without this a mismatch surfaces as a raw ONNX Runtime or numpy error, or (verify off) as a
    package that cannot load. Absent tensors are left to the builder, which names them.
    """
    want = _role_shapes(layout.dims)
    bad = []
    for role, pattern in layout.names.items():
        for i in range(layout.dims.num_layers) if "{i}" in pattern else (None,):
            name = pattern.format(i=i)
            if role not in want or not source.has(name):
                continue
            expected = want[role]
            if layout.transposed_weights and len(expected) == 2 and role not in _TABLES:
                expected = expected[::-1]  # GPT-2 Conv1D stores [in, out]
            shape = tuple(int(n) for n in source.shape(name))
            if shape != expected:
                bad.append(f"{name} is {list(shape)}, expected {list(expected)}")
    if bad:
        raise SourceError(
            f"{len(bad)} tensor(s) of {source.path} do not match config.json "
            f"(hidden_size {layout.dims.hidden_size}, heads {layout.dims.num_heads}/{layout.dims.num_kv_heads}, "
            f"head_dim {layout.dims.head_dim}, intermediate_size {layout.dims.intermediate_size}, vocab_size "
            f"{layout.dims.vocab_size}): {'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; the weights "
            f"belong to another model or config.json was edited")


ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def activation(name: str) -> str:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}") from None
