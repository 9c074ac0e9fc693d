"""Read the key/value metadata of a GGUF file into plain Python values.

The tensors are left alone: this is what the tokenizer and config builders need, nothing more.
Every value comes back as ``str``, ``int``, ``float``, ``bool`` or a list of those, so callers
(and tests) can work with an ordinary dict instead of gguf-py's ``ReaderField`` parts.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

from portable_infer.errors import SourceError, require

logger = logging.getLogger(__name__)

# What gguf.GGUFReader raises on a file that is not GGUF, is truncated or is corrupt: a bad magic
# or version (ValueError), a memmap past the end of the file (ValueError/IndexError), a duplicate
# key (KeyError), an unreadable file (OSError).
_READER_ERRORS = (ValueError, KeyError, IndexError, OSError, OverflowError, struct.error)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file as a plain Python value (see :func:`open_gguf`)."""
    return open_gguf(path)[1]


def open_gguf(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Open a GGUF file: its ``gguf.GGUFReader`` and every metadata key as a plain value.

    Args:
        path: the ``.gguf`` file.

    Returns:
        ``{key: value}`` in file order, e.g. ``{"tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["<|endoftext|>", ...], "tokenizer.ggml.bos_token_id": 1, ...}``.
        Strings are decoded as UTF-8; arrays become lists.

    Raises:
        SourceError: the file is missing, or is not a readable GGUF file.

    Example:
        >>> reader, meta = open_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> meta["tokenizer.ggml.pre"]  # doctest: +SKIP
        'smollm'
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}; check the path (or download the model again)")
    gguf = require("gguf")
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: _field_value(field, gguf.GGUFValueType) for name, field in reader.fields.items()}
    except _READER_ERRORS + (UnicodeDecodeError,) as exc:
        raise SourceError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "it may be truncated or corrupt: download it again and check its size and sha256"
        ) from exc
    logger.debug("read %d metadata keys from %s", len(meta), path)
    return reader, meta


def _field_value(field: Any, value_type: Any) -> Any:
    """Turn one ``gguf.ReaderField`` into a Python value (its ``data`` indexes its ``parts``)."""
    main = field.types[0]
    if main == value_type.STRING:
        return _text(field.parts[field.data[0]])
    if main != value_type.ARRAY:
        return field.parts[field.data[0]].tolist()[0]
    if not field.data:
        return []
    if field.types[-1] == value_type.STRING:
        return [_text(field.parts[i]) for i in field.data]
    # Numeric arrays are stored one part per element: join them once instead of 49152 tolist()s.
    import numpy as np

    return np.concatenate([field.parts[i] for i in field.data]).tolist()


def _text(part: Any) -> str:
    """Decode one GGUF string (a uint8 array) as UTF-8."""
    return part.tobytes().decode("utf-8")
