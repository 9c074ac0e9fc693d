"""Read a Hugging Face model folder: config.json, *.safetensors, tokenizer files.

Tensors are read lazily, one at a time, straight from the file at their offset (a large one in
chunks on a few threads), so an export never holds the whole checkpoint. float16 stays float16;
bf16 is widened to float32 here (numpy has no bfloat16).
AWQ/GPTQ checkpoints (a quantization_config) present each quantized linear ``X`` as ``X.weight``
in 4-bit :class:`~exporters.quant.Blocks`, read exactly from its packed parts (``awq_gptq.py``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from portable_infer.errors import SourceError

from . import awq_gptq
from .parallel import for_each, row_chunks

_READ_CHUNK = 8 << 20  # bytes of a tensor read by one thread at a time
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple
    start: int
    end: int


def _read_header(path: Path) -> dict[str, _Entry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(f"{path} is truncated (no safetensors header); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise SourceError(f"{path} is truncated or not a safetensors file (header of {n} bytes "
                              f"in a {size}-byte file); re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(f"{path} has a corrupted safetensors header ({exc}); re-download it") from exc
    base = 8 + n
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        if base + end > size:
            raise SourceError(f"{path} is truncated: tensor {name} ends at byte {base + end} "
                              f"but the file has {size}; re-download or re-save the checkpoint")
        if meta["dtype"] not in _DTYPES:
            raise SourceError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        entries[name] = _Entry(path, meta["dtype"], tuple(meta["shape"]), base + start, base + end)
    return entries


def _weight_files(folder: Path) -> list[Path]:
    """The shards model.safetensors.index.json lists where there is one (a folder may hold other
    *.safetensors too, e.g. Mistral's consolidated.safetensors), else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    try:
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise SourceError(f"{index} is not a valid safetensors index ({exc}); fix or re-download it") from exc
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise SourceError(f"{folder} lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}, listed in "
                          f"{index.name}; the download is incomplete: fetch it again")
    return [folder / n for n in names]


class HFSource:
    """A Hugging Face folder as a lazy tensor store plus its config."""

    kind = "hf"
    CONV1D_TYPES = ("gpt2",)  # families whose float linears are stored [in, out]

    def __init__(self, folder: Path, config: dict, entries: dict[str, _Entry],
                 quantization: awq_gptq.QuantSpec | None = None):
        self.path = folder
        self.config = config
        self._entries = entries
        self.quantization = quantization  # AWQ/GPTQ settings, None for a float checkpoint
        self._quantized: dict[str, tuple] = {}  # "X.weight" -> its float shape, read from X's parts
        self._packed: dict[str, _Entry] = {}  # X.qweight, X.qzeros, X.scales, X.g_idx
        if quantization is not None:
            shapes = {n: e.shape for n, e in entries.items()}
            self._quantized = awq_gptq.quantized_weights(
                quantization, shapes, conv1d=config.get("model_type") in self.CONV1D_TYPES)
            packed = {f"{w.removesuffix('.weight')}.{p}" for w in self._quantized for p in awq_gptq.PARTS}
            self._entries = {n: e for n, e in entries.items() if n not in packed}
            self._packed = {n: e for n, e in entries.items() if n in packed}

    @classmethod
    def open(cls, folder: str | Path) -> "HFSource":
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise SourceError(f"{folder} has no config.json: it is not a Hugging Face model folder "
                              f"(expected config.json, *.safetensors and tokenizer files)")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SourceError(f"{cfg_path} is not valid JSON ({exc}); fix or re-download it") from exc
        files = _weight_files(folder)
        if not files:
            raise SourceError(f"{folder} has no *.safetensors weights (PyTorch .bin files are not "
                              f"read: re-save the model with save_pretrained(safe_serialization=True))")
        entries: dict[str, _Entry] = {}
        for f in files:
            entries.update(_read_header(f))
        return cls(folder, config, entries, awq_gptq.quant_spec(folder, config))

    @property
    def weight_files(self) -> list[Path]:
        """The safetensors files the tensors come from, sorted."""
        return sorted({e.file for e in (*self._entries.values(), *self._packed.values())})

    @property
    def default_precision(self) -> str:
        """int4 for AWQ/GPTQ checkpoints (their blocks kept as they are), fp32 for float ones."""
        return "fp32" if self.quantization is None else "int4"

    def names(self) -> set[str]:
        return set(self._entries) | set(self._quantized)

    def has(self, name: str) -> bool:
        return name in self._entries or name in self._quantized

    def shape(self, name: str) -> tuple:
        if name in self._quantized:
            return self._quantized[name]
        return self._entry(name).shape

    def get(self, name: str):
        """The tensor as stored: float32 or float16 (bf16 and float64 widened to float32; numpy
        has no bfloat16), or its integer dtype; a quantized linear's weight as int4 Blocks [out, in]."""
        if name in self._quantized:
            prefix = name.removesuffix(".weight")
            parts = {p: self._read(self._packed[f"{prefix}.{p}"]) for p in awq_gptq.PARTS
                     if f"{prefix}.{p}" in self._packed}
            return awq_gptq.read_weight(self.quantization, parts, prefix)
        return self._read(self._entry(name))

    def _read(self, e: _Entry) -> np.ndarray:
        # A plain read into a fresh array, not a slice of a memory map: a mapped file's pages stay
        # in the process's resident set while mapped (the whole checkpoint by the end of an export)
        arr = np.empty(e.shape, _DTYPES[e.dtype])
        raw = memoryview(arr.reshape(-1).view(np.uint8))
        if len(raw) != e.end - e.start:
            raise SourceError(f"{e.file}: a tensor of shape {e.shape} in {e.dtype} takes {len(raw)} bytes, the "
                              f"header gives it {e.end - e.start}; the file is corrupted: re-download it")

        def part(s: slice) -> None:  # reads release the GIL: large tensors come in on several threads
            with open(e.file, "rb", buffering=0) as f:
                f.seek(e.start + s.start)
                view = raw[s]
                while view:
                    n = f.readinto(view)
                    if not n:
                        raise SourceError(f"{e.file} ended early (truncated while it was read?); re-download it")
                    view = view[n:]

        for_each(part, row_chunks(len(raw), 1, _READ_CHUNK))
        if e.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32) if arr.dtype == np.float64 else arr

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise SourceError(f"tensor {name!r} is missing from the checkpoint in {self.path}; the "
                              f"weights do not match config.json (model_type "
                              f"{self.config.get('model_type')!r})") from None

    def tokenizer_files(self) -> dict[str, Path]:
        return {n: self.path / n for n in ("tokenizer.json", "tokenizer_config.json",
                                            "chat_template.jinja", "generation_config.json",
                                            "special_tokens_map.json")
                if (self.path / n).is_file()}
