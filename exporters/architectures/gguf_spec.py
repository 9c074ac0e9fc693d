"""How llama.cpp's converter (``convert_hf_to_gguf.py``) lays a family out in GGUF, as data.

Each family module exposes ``GGUF``, a :class:`GGUFSpec`: the ``general.architecture`` it reads,
its tensor names (GGUF -> Hugging Face, as gguf-py's ``tensor_mapping.py`` names them), what the
converter did to the tensors (Q/K rows permuted for ggml's rotary layout, +1 added to Gemma's
norm weights) and a function turning the file's metadata into an HF-style config. The reader
(``exporters/gguf_source.py``) undoes the tensor changes and hands the builder HF names and
layouts, so a GGUF of a family exports through the same layout as its HF folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from portable_infer.errors import SourceError, UnsupportedArchitectureError


class GGUFView:
    """What a family's config reader sees of a GGUF file: its metadata and tensor shapes.

    ``key("attention.head_count")`` reads ``<arch>.attention.head_count``; ``shape`` gives HF
    order ([rows, cols]); ``read`` a small float tensor (rope factors)."""

    def __init__(self, arch: str, meta: dict, shapes: dict, read: Callable[[str], np.ndarray], path=None):
        self.arch, self.meta, self.shapes, self._read, self.path = arch, meta, shapes, read, path
        self.consumed: set[str] = set()  # tensors a config reader used (not model weights)

    def key(self, name: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{name}", default)

    def need(self, name: str) -> Any:
        value = self.key(name)
        if value is None:
            raise SourceError(f"{self.path}: GGUF metadata lacks {self.arch}.{name}; the file is incomplete "
                              f"or was not written by llama.cpp's converter", param=f"{self.arch}.{name}",
                              reason="missing")
        return value

    def has(self, tensor: str) -> bool:
        return tensor in self.shapes

    def read(self, tensor: str) -> np.ndarray:
        self.consumed.add(tensor)
        return np.asarray(self._read(tensor), np.float32)


@dataclass(frozen=True)
class GGUFSpec:
    arch: str  # general.architecture
    names: dict  # GGUF tensor name ("{i}" = layer) -> HF tensor name
    config: Callable[[GGUFView], dict]  # HF-style config.json from the metadata
    permuted_qk: bool = False  # llama.cpp permuted Q/K rows (and biases) for its rotary layout
    norm_shift: float = 0.0  # the converter added this to every "*norm.weight" (Gemma 3: 1)
    matches: Callable[[GGUFView], bool] | None = None  # several families share one arch (llama/mistral)
    ignored: tuple = field(default_factory=tuple)  # tensors llama.cpp writes that the model does not use


# The Llama tensor names (gguf-py MODEL_TENSOR names of the llama architecture).
LLAMA_GGUF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
ATTN_BIAS_GGUF = {f"blk.{{i}}.attn_{p}.bias": f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"}
QK_NORM_GGUF = {"blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
                "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight"}

# rope.scaling.type -> the HF rope_type our builder supports (common.inv_freq)
_ROPE_TYPES = {"none": "default", "linear": "linear"}


def vocab_size(v: GGUFView) -> int:
    """Rows of the embedding table (Gemma's converter drops out-of-vocabulary rows), else metadata."""
    if v.has("token_embd.weight"):
        return int(v.shapes["token_embd.weight"][0])
    return v.key("vocab_size", len(v.meta.get("tokenizer.ggml.tokens", [])))


def rope_scaling(v: GGUFView) -> dict | None:
    """rope.scaling.* in HF form (None: plain RoPE); types the builder lacks fail here."""
    kind = v.key("rope.scaling.type", "none")
    factor = v.key("rope.scaling.factor")
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind not in _ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"{v.path}: rope scaling {kind!r} ({v.arch}.rope.scaling.type) is not supported; supported: "
            f"{', '.join(sorted(_ROPE_TYPES))} (and llama3 frequency factors)")
    return {"rope_type": _ROPE_TYPES[kind], "factor": float(factor)}


def llama_like_config(v: GGUFView, model_type: str) -> dict:
    """The config keys every llama-style family reads (llama.cpp's common hyperparameters)."""
    heads = v.need("attention.head_count")
    hidden = v.need("embedding_length")
    cfg = {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": v.need("feed_forward_length"),
        "num_hidden_layers": v.need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": v.key("attention.head_count_kv", heads),
        "head_dim": v.key("attention.key_length", hidden // heads),
        "rms_norm_eps": v.key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": v.key("rope.freq_base", 10000.0),
        "max_position_embeddings": v.key("context_length", 2048),
        "vocab_size": vocab_size(v),
        "tie_word_embeddings": not v.has("output.weight"),
        "hidden_act": "silu",
    }
    scaling = rope_scaling(v)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def layer_names(table: dict, layers: int) -> dict:
    """GGUF -> HF tensor names with the layer placeholders filled in."""
    out = {}
    for g, h in table.items():
        for i in (range(layers) if "{i}" in g else (None,)):
            out[g.format(i=i) if i is not None else g] = h.format(i=i) if i is not None else h
    return out
