"""Seeded mutations of OpenAI request bodies, as the bytes a careless or hostile client would send.

``mutated(rng, base, known_fields)`` applies one to three mutations to a copy of ``base``: type
swaps anywhere in the tree, removed and unknown keys, fields of the table with random values,
lone surrogates in values and keys, deep nesting, huge strings and integers, NaN and Infinity,
top-level non-objects; then maybe a byte-level one (truncation, a flipped byte, invalid UTF-8, a
duplicated key, a 5,000-digit integer). The same seed gives the same bodies.
"""

from __future__ import annotations

import copy
import json
import random

BIG_DIGITS = "9" * 5000  # over Python's 4,300-digit int-str limit; json.dumps cannot write it
SCALARS = [None, True, False, 0, 1, -1, 2, 3, 1.0, 0.5, -0.0, 1e-300, 5e-324, 1e308, -1e308, 10**19, -(10**19),
           2**63, 2**64 - 1, 10**20, 10**21, "", "5", "x", "none", "text", "\ud800", "a\udfffb", "\U0001F600",
           "é", "\x00", "<|endoftext|>", float("nan"), float("inf"), float("-inf")]
CONTAINERS = [[], [1], ["a"], [None], {}, {"a": 1}, {"type": "text"}, {"type": "json_object"}, [[]], [{}],
              [{"role": "user", "content": "x"}], {"include_usage": True}]
KEYS = ["frobnicate", "x", "", "\ud800", "model ", "MODEL", "n", "logit_bias", "guided_json", "tools", "name",
        "tool_calls", "include_usage", "type", "text", "role", "content", "a" * 300, "__proto__", "stream"]
RAW_BYTES = [b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\\", b'"', b"{", b"]", b"\xef\xbb\xbf"]


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if r < 0.55 or depth > 2:
        return copy.deepcopy(rng.choice(SCALARS))
    if r < 0.85:
        return copy.deepcopy(rng.choice(CONTAINERS))
    if rng.random() < 0.5:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def nodes(obj):
    """(container, key) of every value in the tree (the root excluded), without recursion."""
    out, todo = [], [obj]
    while todo:
        parent = todo.pop()
        items = parent.items() if isinstance(parent, dict) else enumerate(parent) if isinstance(parent, list) else ()
        for k, v in items:
            out.append((parent, k))
            todo.append(v)
    return out


def dicts(obj):
    found = [obj] if isinstance(obj, dict) else []
    for container, k in nodes(obj):
        if isinstance(container[k], dict):
            found.append(container[k])
    return found


def swap_type(rng, body, known):
    spots = nodes(body)
    if spots:
        container, k = rng.choice(spots)
        container[k] = random_value(rng)
    return body


def remove_key(rng, body, known):
    ds = [d for d in dicts(body) if d]
    if ds:
        d = rng.choice(ds)
        del d[rng.choice(list(d))]
    return body


def add_unknown(rng, body, known):
    rng.choice(dicts(body) or [body])[rng.choice(KEYS)] = random_value(rng)
    return body


def add_known(rng, body, known):
    body[rng.choice(known)] = random_value(rng)
    return body


def surrogate(rng, body, known):
    lone = rng.choice(["\ud800", "\udbff", "\udc00", "\udfff", "\udc80"])
    strings = [(c, k) for c, k in nodes(body) if isinstance(c[k], str)]
    if strings and rng.random() < 0.7:
        c, k = rng.choice(strings)
        pos = rng.randint(0, len(c[k]))
        c[k] = c[k][:pos] + lone + c[k][pos:]
    else:
        rng.choice(dicts(body) or [body])["k" + lone] = "v"
    return body


def raw(text: bytes) -> str:
    """A placeholder that :func:`serialize` replaces with ``text`` (what json.dumps cannot write:
    nesting past its recursion limit, integers past the int-str limit)."""
    RAW[f"@@raw{len(RAW)}@@"] = text
    return f"@@raw{len(RAW) - 1}@@"


RAW: dict = {}


def deep(rng, body, known):
    depth = rng.choice([8, 60, 63, 64, 65, 100, 1000, 100000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    spots = nodes(body)
    if spots:
        c, k = rng.choice(spots)
        c[k] = raw(opener * depth + b"1" + closer * depth)
    return body


def huge(rng, body, known):
    spots = nodes(body)
    if not spots:
        return body
    c, k = rng.choice(spots)
    c[k] = rng.choice(["y" * rng.choice([1000, 20000, 300_000]), 10**rng.randint(15, 40), -(10**rng.randint(15, 40)),
                       raw(BIG_DIGITS.encode()), raw(b"-" + BIG_DIGITS.encode()), raw(b"1e999"), raw(b"-1e400"),
                       list(range(rng.choice([100, 3000]))), [[1, 2]] * 500, {str(i): i for i in range(500)}])
    return body


def number_field(rng, body, known):
    key = rng.choice(["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n",
                      "presence_penalty", "frequency_penalty", "repetition_penalty", "top_logprobs", "logprobs"])
    body[key] = rng.choice([float("nan"), float("inf"), float("-inf"), 1e-300, -1e-300, 5e-324, 1e308, 10**19,
                            2**64, -(2**63), 0, -1, 1, 3, 0.0, 2.5, True, "1", [1]])
    return body


def top_level(rng, body, known):
    return rng.choice([[], [body], "body", 1, None, True, 1.5])


def stream_on(rng, body, known):
    body["stream"] = True
    if rng.random() < 0.5:
        body["stream_options"] = {"include_usage": rng.choice([True, False])}
    return body


MUTATIONS = [swap_type, swap_type, remove_key, add_unknown, add_known, add_known, surrogate, deep, huge, number_field,
             top_level, stream_on, stream_on]


def serialize(rng: random.Random, body) -> bytes:
    text = json.dumps(body, ensure_ascii=rng.random() < 0.5)  # NaN and Infinity are written as such
    out = text.encode("utf-8", "surrogatepass")  # a raw lone surrogate becomes invalid UTF-8
    for marker in [m for m in RAW if m.encode() in out]:
        out = out.replace(f'"{marker}"'.encode(), RAW[marker])
    return out


def byte_mutation(rng: random.Random, raw: bytes) -> bytes:
    pos = rng.randint(0, len(raw))
    kind = rng.randrange(6)
    if kind == 0:
        return raw[:pos]  # truncated
    if kind == 1 and raw:
        i = rng.randrange(len(raw))
        return raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:]
    if kind == 2:
        return raw[:pos] + rng.choice(RAW_BYTES) + raw[pos:]
    if kind == 3 and raw.startswith(b"{"):
        return b'{"model": "x", ' + raw[1:]  # a duplicate key when the body has one already
    if kind == 4 and raw.startswith(b"{"):
        return b'{"seed": ' + BIG_DIGITS.encode() + b", " + raw[1:]
    return raw.replace(b"2", b"2" + b"0" * rng.choice([19, 25, 4400]), 1)


def mutated(rng: random.Random, base: dict, known: list) -> bytes:
    RAW.clear()
    body = copy.deepcopy(base)
    for _ in range(rng.choice([1, 1, 2, 3])):
        body = rng.choice(MUTATIONS)(rng, body, known)
        if not isinstance(body, dict):
            break
    raw = serialize(rng, body)
    return byte_mutation(rng, raw) if rng.random() < 0.2 else raw
