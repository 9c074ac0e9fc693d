"""What a prompt may be, checked before it reaches the tokenizer, the chat template or the engine.

    text        a str of valid Unicode: a lone surrogate ("\\ud800", or a byte that is not UTF-8
                in a command-line argument, which Python escapes to U+DC80..U+DCFF) has no UTF-8
                form, and the tokenizer would fail on it with an untyped TypeError
    token ids   a list, tuple or range of ints, or a 1-D integer numpy array, each in
                [0, vocab); bools, floats and bytes are not token ids
    messages    a non-empty list of {"role": str, "content": str} dicts, both valid text

Every violation is an :class:`InvalidArgumentError` that names the position (``prompt[3]``,
``messages[1].content`` at character 7) and says what to pass instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from portable_infer.errors import InvalidArgumentError

_ESCAPED_BYTES = range(0xDC80, 0xDD00)  # Python's surrogateescape: an undecodable byte 0xXY -> U+DCXY


def _is_id(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_text(text, what: str = "prompt", param: str = "prompt") -> str:
    """``text`` if it is a str of valid Unicode, else :class:`InvalidArgumentError` naming where."""
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{what} must be a str, got {type(text).__name__}", param=param)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if code in _ESCAPED_BYTES:
            why = (f"the byte 0x{code - 0xDC00:02X} at character {exc.start} is not UTF-8 (Python escaped it "
                   f"to U+{code:04X}); pass UTF-8 text")
        else:
            why = (f"a lone surrogate U+{code:04X} at character {exc.start} is not valid Unicode (it has no "
                   f"UTF-8 form); remove it, or pair it with its other half")
        raise InvalidArgumentError(f"{what} is not valid text: {why}", param=param) from None
    return text


def token_ids(prompt, vocab: int, what: str = "prompt") -> list:
    """``prompt`` (token ids) as a list of Python ints, each checked to be in ``[0, vocab)``."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"{what} is bytes, and bytes are not token ids: decode it to a str for "
                                   f"text (generate), or pass a list of ints (generate_ids)", param="prompt")
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise InvalidArgumentError(f"{what} as a numpy array must be 1-D with an integer dtype (token ids), "
                                       f"got dtype {prompt.dtype} and shape {prompt.shape}", param="prompt")
        ids = prompt.tolist()
    elif isinstance(prompt, (list, tuple, range)):
        ids = list(prompt)
    else:
        raise InvalidArgumentError(f"{what} must be a str (text) or a list of token ids, got "
                                   f"{type(prompt).__name__}", param="prompt")
    if not all(_is_id(t) and 0 <= t < vocab for t in ids):
        i, bad = next((i, t) for i, t in enumerate(ids) if not (_is_id(t) and 0 <= t < vocab))
        kind = "a bool" if isinstance(bad, (bool, np.bool_)) else type(bad).__name__
        raise InvalidArgumentError(f"token ids must be ints in [0, {vocab}); {what}[{i}] is {bad!r} ({kind})",
                                   param="prompt")
    return [int(t) for t in ids]


def check_messages(messages) -> list:
    """``messages`` if it is a non-empty conversation of {"role": str, "content": str} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidArgumentError(f"messages must be a list of {{'role': str, 'content': str}} dicts, got "
                                   f"{type(messages).__name__}", param="messages")
    if not messages:
        raise InvalidArgumentError("the conversation is empty: give at least one message, e.g. "
                                   "[{'role': 'user', 'content': 'Hi'}]", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(f"messages[{i}] must be a dict with 'role' and 'content', got "
                                       f"{type(m).__name__}", param="messages")
        for key in ("role", "content"):
            if key not in m:
                raise InvalidArgumentError(f"messages[{i}] has no {key!r}; each message needs a str 'role' and "
                                           f"'content'", param="messages")
            check_text(m[key], f"messages[{i}].{key}", param="messages")
    return list(messages)
