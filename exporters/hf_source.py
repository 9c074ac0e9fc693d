"""Read a Hugging Face model folder: config.json, *.safetensors (memory-mapped), tokenizer files.

Tensors are read lazily, one at a time, straight from a memory map of the file, so an export
never holds the whole checkpoint. bf16 is widened to float32 here (numpy has no bfloat16).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from portable_infer.errors import SourceError

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


class HFSource:
    """A Hugging Face folder as a lazy tensor store plus its config."""

    kind = "hf"

    def __init__(self, folder: Path, config: dict, entries: dict[str, _Entry]):
        self.path = folder
        self.config = config
        self._entries = entries
        self._maps: dict[Path, np.memmap] = {}

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
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{folder} has no *.safetensors weights (PyTorch .bin files are not "
                              f"read: re-save the model with save_pretrained(safe_serialization=True))")
        entries: dict[str, _Entry] = {}
        for f in files:
            entries.update(_read_header(f))
        return cls(folder, config, entries)

    def names(self) -> set[str]:
        return set(self._entries)

    def has(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple:
        return self._entry(name).shape

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (or its integer dtype), read from the memory map."""
        e = self._entry(name)
        if e.file not in self._maps:
            self._maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
        raw = self._maps[e.file][e.start:e.end]
        arr = raw.view(_DTYPES[e.dtype]).reshape(e.shape)
        if e.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        if arr.dtype in (np.float16, np.float64):
            return arr.astype(np.float32)
        return np.array(arr)

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
