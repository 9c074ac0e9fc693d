"""Open an export source (HF folder, .gguf file, Hub id, or the embedded default) and its tokenizer side.

A source exposes ``kind``, ``path``, ``config`` (HF-style dict), ``has(name)``, ``get(name)``
(HF tensor names) and ``sha256()``; :func:`tokenizer_assets` gives the files and special-token
ids the package needs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from portable_infer.errors import InvalidArgumentError, SourceError
from portable_infer.package.manifest import sha256_file

logger = logging.getLogger(__name__)

DEFAULT_SOURCES = (None, "", "default")


def open_source(source: str | Path | None, revision: str | None = None):
    """HFSource or GGUFSource for a folder, a .gguf file, a Hugging Face Hub id (``org/name``, or
    ``org/name:QUANT`` for one GGUF file of the repo; fetched or taken from the local cache at
    ``revision``), or None/"default". An existing local path always means the path."""
    from .gguf_source import GGUFSource, default_gguf_path
    from .hf_source import HFSource
    from .hub import parse_id, resolve

    if source in DEFAULT_SOURCES and revision is None:
        return GGUFSource.open(default_gguf_path())
    path = Path(source or "default")
    if not path.exists() and isinstance(source, str) and parse_id(source):
        path = resolve(source, revision)
    elif revision is not None:
        raise InvalidArgumentError(f"revision applies to Hugging Face Hub ids only, not to {source!r}",
                                   param="revision")
    if path.is_dir():
        return HFSource.open(path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise SourceError(f"GGUF file not found: {path}")
        return GGUFSource.open(path)
    if not path.exists():
        raise SourceError(f"source {path} does not exist; give a Hugging Face model folder, a .gguf "
                          f"file, a Hub id (org/name, or org/name:QUANT for a GGUF repo), or 'default' for "
                          f"the embedded SmolLM2-135M-Instruct")
    raise SourceError(f"{path} is neither a Hugging Face model folder nor a .gguf file")


def quantized_as(src) -> str | None:
    """How ``src`` was quantized before it came here ("gguf", "awq", "gptq"), or None for a float
    checkpoint: the key of ``variants.MIN_AGREEMENT``, the bar its exact graphs meet."""
    if src.kind == "hf":
        return src.quantization.method if src.quantization else None
    return src.kind


def source_sha256(src) -> str:
    """sha256 of the GGUF file, or of the config + weight files of an HF folder (sorted)."""
    if src.kind == "gguf":
        return sha256_file(src.path)
    import hashlib

    h = hashlib.sha256()
    for f in src.weight_files + [src.path / "config.json"]:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


@dataclass
class TokenizerAssets:
    tokenizer_json: str | None = None  # serialized tokenizers.Tokenizer
    tokenizer_config: dict = field(default_factory=dict)
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None
    add_bos: bool = False


def tokenizer_assets(src) -> TokenizerAssets:
    return _gguf_assets(src) if src.kind == "gguf" else _hf_assets(src)


def _gguf_assets(src) -> TokenizerAssets:
    from .gguf_tokenizer import build_tokenizer, tokenizer_config, tokenizer_info

    info = tokenizer_info(src.meta)
    return TokenizerAssets(
        tokenizer_json=build_tokenizer(src.meta).to_str(),
        tokenizer_config=tokenizer_config(info),
        chat_template=info.get("chat_template"),
        bos_token_id=info.get("bos_token_id"),
        eos_token_ids=tuple(info.get("eos_token_ids") or ()),
        pad_token_id=info.get("pad_token_id"),
        add_bos=bool(info.get("add_bos")),
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path} is not valid JSON ({exc}); fix or re-download it") from exc


def _ids(value) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _hf_assets(src) -> TokenizerAssets:
    folder = src.path
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    gen = _read_json(folder / "generation_config.json")
    cfg = src.config
    template = tok_cfg.pop("chat_template", None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    tok_json = (folder / "tokenizer.json").read_text(encoding="utf-8") if (folder / "tokenizer.json").is_file() else None
    if tok_json is None:
        logger.warning("%s has no tokenizer.json: the package will accept token ids only", folder)
    eos = _ids(gen.get("eos_token_id", cfg.get("eos_token_id")))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    return TokenizerAssets(
        tokenizer_json=tok_json, tokenizer_config=tok_cfg, chat_template=template,
        bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad if pad is not None else (eos[0] if eos else None),
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
    )
