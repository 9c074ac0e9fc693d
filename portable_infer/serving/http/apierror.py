"""The HTTP error every route answers with, in OpenAI's shape, and how client values are quoted in it.

A message quotes what the client sent; that text may hold lone surrogates (``"\\ud800"``) that no
UTF-8 encoder accepts, so :func:`show` escapes and truncates every quoted value and
:class:`APIError` escapes its message and param once more: rendering an error never fails.
"""

from __future__ import annotations

import json

SHOW_CHARS = 60  # a quoted client value is cut to this many characters


class APIError(Exception):
    """An HTTP error with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        message, param = _encodable(message), None if param is None else _encodable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


def show(value, limit: int = SHOW_CHARS) -> str:
    """``value`` as JSON, ASCII only (surrogates escaped), cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):
        text = ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


def json_type(value) -> str:
    """The JSON type name of a parsed value: null, boolean, integer, number, string, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
