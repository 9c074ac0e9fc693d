"""A request body read as JSON within bounds: size, nesting depth, integer digits, finite numbers, Unicode.

Python's ``json`` has none of these: a 100,000-deep array raises ``RecursionError``, a 5,000-digit
integer ``ValueError`` (the int-str limit), ``NaN``, ``Infinity`` and ``1e999`` parse to non-finite
floats, and ``"\\ud800"`` parses to a str that no encoder (nor the tokenizer) accepts. Here each is a
400 ``invalid_json`` naming the field where there is one::

    bytes ── size: Content-Length, then while reading ──> 413
          ── depth: brackets outside strings, counted without recursion (regex + cumsum)
          ── json.loads: hooks put a marker in place of a bad number or a duplicate key
          ── walk (only when a hook marked something or the text may hold a surrogate):
             the first marker or invalid string, with its path (``messages[0].content``)

Bytes that are not UTF-8 are decoded with ``surrogateescape``, so they too reach the walk as lone
surrogates and the error names the field that held them.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

import numpy as np

from portable_infer.serving.http.apierror import APIError, bad, json_type, show

MAX_DEPTH = 64  # arrays/objects inside each other; OpenAI bodies need fewer than 8
MAX_INT_DIGITS = 20  # every int64 and uint64 (seeds) fits; no field takes a longer integer
THREAD_BYTES = 64 << 10  # bodies longer than this are parsed on a worker thread, off the event loop

# a JSON string, or an unterminated one up to the end: linear, never backtracks, never restarts inside
_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_DEPTH_STEP = np.zeros(256, np.int32)
_DEPTH_STEP[[ord("["), ord("{")]] = 1
_DEPTH_STEP[[ord("]"), ord("}")]] = -1
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAYBE_SURROGATE = re.compile(r"[\ud800-\udfff]|\\u[dD][89a-fA-F]")  # a raw one, or an escape of one
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}\Z")
INVALID_UNICODE = ("is not valid Unicode (it holds a lone surrogate such as \\ud800, or bytes that are not "
                   "UTF-8); send UTF-8 text")


async def read_request(request, max_bytes: int) -> dict:
    """The body of a Starlette ``request`` as a JSON object; :class:`APIError` 400/413 otherwise."""
    from starlette.requests import ClientDisconnect

    too_large = APIError(413, f"the request body is larger than {max_bytes} bytes; send a shorter one",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise bad(f"Content-Length must be a number of bytes, got {show(declared)}", code="invalid_request")
        if len(declared) > 18 or int(declared) > max_bytes:
            raise too_large
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_bytes:
                raise too_large
    except ClientDisconnect as exc:  # nobody reads the answer; a 400 keeps it out of the error logs
        raise bad("the client disconnected before sending the whole body", code="client_disconnected") from exc
    if len(raw) > THREAD_BYTES:
        return await asyncio.to_thread(parse_object, bytes(raw))
    return parse_object(bytes(raw))


def parse_object(raw: bytes, max_depth: int = MAX_DEPTH, max_int_digits: int = MAX_INT_DIGITS) -> dict:
    """``raw`` parsed as a JSON object within the bounds, or :class:`APIError` 400 ``invalid_json``.

    Example: ``parse_object(b'{"n": 1}') == {"n": 1}``; ``parse_object(b'[1]')`` raises (not an object).
    """
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise bad(f"the request body nests arrays/objects {depth} deep, more than {max_depth}; flatten it",
                  code="invalid_json")
    text = raw.decode("utf-8", "surrogateescape")
    marked = []

    def marker(why: str) -> _Rejected:
        marked.append(why)
        return _Rejected(why)

    def parse_int(literal: str):
        digits = len(literal) - literal.startswith("-")
        if digits > max_int_digits:
            return marker(f"is an integer of {digits} digits, more than the {max_int_digits} any field takes")
        return int(literal)

    def parse_float(literal: str):
        value = float(literal)
        return value if math.isfinite(value) else marker(f"is {show(literal, 30)}, out of a double's range")

    def parse_constant(name: str):
        return marker(f"is {name}, which JSON does not allow; send a finite number")

    def pairs_to_dict(pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            seen = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))
            obj[marker(f"has the key {show(key)} twice; send each key once")] = None
        return obj

    try:
        doc = json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant,
                         object_pairs_hook=pairs_to_dict)
    except json.JSONDecodeError as exc:
        raise bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:  # unreachable below MAX_DEPTH; kept so no limit change can 500
        raise bad("the request body nests too deep", code="invalid_json") from exc
    if not isinstance(doc, dict):
        raise bad(f"the request body must be a JSON object, got {_article(json_type(doc))}", code="invalid_json")
    if marked or _MAYBE_SURROGATE.search(text):
        problem = find_problem(doc)
        if problem is not None:
            path, why = problem
            where = f"the field {path}" if path else "the request body"
            raise bad(f"{where} {why}", param=path or None, code="invalid_json")
    return doc


def nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in ``raw`` (brackets inside strings do not count)."""
    outside = _STRING.sub(b"", raw)
    if not outside:
        return 0
    return max(0, int(np.cumsum(_DEPTH_STEP[np.frombuffer(outside, np.uint8)], dtype=np.int32).max()))


def find_problem(doc) -> tuple | None:
    """(path, why) of the first marker or non-Unicode string (key or value) in ``doc``, in document
    order, or None. Iterative: depth is bounded before this runs, but a walk needs no recursion."""
    stack = [("", doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path, INVALID_UNICODE
        elif isinstance(value, _Rejected):
            return path, value.why
        elif isinstance(value, dict):
            children = []
            for key, child in value.items():
                if isinstance(key, _Rejected):
                    return path, key.why
                if _SURROGATE.search(key):
                    return _join(path, key), f"(a key) {INVALID_UNICODE}"
                children.append((_join(path, key), child))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", value[i]) for i in range(len(value) - 1, -1, -1))
    return None


class _Rejected:
    """Stands where the parser met a value it refuses, so the walk can say where it was."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


def _join(path: str, key: str) -> str:
    if _NAME.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{show(key, 40)}]"


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
