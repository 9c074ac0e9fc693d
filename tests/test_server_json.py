"""The bounded JSON reader of the server (issue 16, item 4): every case Python's json turns into an
exception other than a decode error (RecursionError, ValueError) or into a value nothing downstream
accepts (NaN, inf, lone surrogates) is a 400 ``invalid_json`` naming the field. No server, no model."""

from __future__ import annotations

import json

import pytest

from portable_infer.serving.http.apierror import APIError
from portable_infer.serving.http.jsonbody import MAX_DEPTH, MAX_INT_DIGITS, nesting_depth, parse_object


def rejected(raw: bytes) -> APIError:
    with pytest.raises(APIError) as err:
        parse_object(raw)
    assert err.value.status == 400 and err.value.code == "invalid_json"
    json.dumps(err.value.body()).encode("utf-8")  # the error itself always renders (no surrogates)
    return err.value


def nested(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return b'{"x": ' + opener * (depth - 1) + b"1" + closer * (depth - 1) + b"}"


# --- depth, without recursion ----------------------------------------------------------------------
def test_deep_nesting_is_a_400_not_a_recursion_error():
    err = rejected(b"[" * 100_000 + b"]" * 100_000)  # json.loads: RecursionError -> it was a 500
    assert "100000 deep" in err.message and str(MAX_DEPTH) in err.message
    rejected(b'{"a":' * 100_000)  # unterminated too


@pytest.mark.parametrize("opener,closer", [(b"[", b"]"), (b'{"a":', b"}")])
def test_depth_limit_is_exact(opener, closer):
    assert parse_object(nested(MAX_DEPTH, opener, closer))["x"] is not None
    assert str(MAX_DEPTH + 1) in rejected(nested(MAX_DEPTH + 1, opener, closer)).message


def test_brackets_inside_strings_do_not_count():
    assert nesting_depth(b'{"a": "[[[[{{{{", "b": "\\"[[[", "c": "\\\\", "d": [1]}') == 2
    assert parse_object(b'{"p": "' + b"[" * 10_000 + b'"}')["p"] == "[" * 10_000
    # an unterminated string swallows the rest: a decode error, not a depth error
    assert "not valid JSON" in rejected(b'{"p": "\\"' + b"[" * 1000).message


def test_adversarial_strings_scan_in_linear_time():
    # many escaped quotes in an unterminated string restart a naive string regex at each one
    assert nesting_depth(b'"' + b'\\"' * 200_000 + b"\\") == 0
    assert nesting_depth(b'"' * 200_000 + b"[") == 1  # 100,000 empty strings, then a bracket
    assert nesting_depth(b'"' * 200_001 + b"[") == 0  # the last string is open: the bracket is in it


# --- numbers ---------------------------------------------------------------------------------------
def test_integer_digits():
    ok = parse_object(b'{"seed": ' + b"9" * MAX_INT_DIGITS + b', "s": -' + b"9" * MAX_INT_DIGITS + b"}")
    assert ok["seed"] == int("9" * MAX_INT_DIGITS)
    err = rejected(b'{"seed": ' + b"9" * (MAX_INT_DIGITS + 1) + b"}")
    assert err.param == "seed" and f"{MAX_INT_DIGITS + 1} digits" in err.message


def test_integer_over_the_int_str_limit_is_a_400():
    err = rejected(b'{"max_tokens": 1, "seed": ' + b"9" * 5000 + b"}")  # ValueError from int() -> it was a 500
    assert err.param == "seed" and "5000 digits" in err.message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_literals(literal):
    err = rejected(b'{"temperature": ' + literal + b"}")
    assert err.param == "temperature" and literal.decode() in err.message


@pytest.mark.parametrize("literal", [b"1e999", b"-1e309", b"1.8e308"])
def test_out_of_range_floats(literal):
    assert rejected(b'{"top_p": ' + literal + b"}").param == "top_p"


def test_finite_extremes_pass():
    doc = parse_object(b'{"a": 1e308, "b": -1e308, "c": 5e-324, "d": 1e-400, "e": -0.0}')
    assert doc["a"] == 1e308 and doc["d"] == 0.0


# --- Unicode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,path", [
    (b'{"prompt": "a\\ud800b"}', "prompt"),
    (b'{"prompt": "\\udfff"}', "prompt"),
    (b'{"model": "\\udbff"}', "model"),
    (b'{"messages": [{"role": "user", "content": "x\\udc00"}]}', "messages[0].content"),
    (b'{"messages": [{"role": "\\ud800", "content": "x"}]}', "messages[0].role"),
    (b'{"messages": [{"role": "u", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0].content[0].text"),
    (b'{"stop": ["ok", "\\ud800"]}', "stop[1]"),
    (b'{"prompt": "x\xff"}', "prompt"),  # not UTF-8
    (b'{"prompt": "\xed\xa0\x80"}', "prompt"),  # a surrogate encoded as UTF-8 (CESU-8)
    (b'{"prompt": "\xc3"}', "prompt"),  # a truncated sequence
])
def test_invalid_unicode_names_the_field(raw, path):
    err = rejected(raw)
    assert err.param == path and path in err.message and "not valid Unicode" in err.message


def test_invalid_unicode_in_a_key():
    err = rejected(b'{"metadata": {"\\ud800": "v"}}')
    assert err.param == 'metadata["\\ud800"]' and "a key" in err.message


def test_valid_pairs_and_non_ascii_pass():
    doc = parse_object('{"p": "\\ud83d\\ude00 é 😀 \\u00e9"}'.encode())
    assert doc["p"] == "\U0001F600 é \U0001F600 é"


def test_invalid_utf8_outside_strings_is_a_decode_error():
    assert "not valid JSON" in rejected(b'{"a": 1\xff}').message


# --- shape -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,kind", [(b"[]", "an array"), (b'"x"', "a string"), (b"1", "an integer"),
                                      (b"null", "a null"), (b"true", "a boolean"), (b"1.5", "a number")])
def test_top_level_must_be_an_object(raw, kind):
    assert kind in rejected(raw).message


def test_duplicate_keys_are_named():
    assert 'key "n" twice' in rejected(b'{"n": 1, "n": 2}').message
    err = rejected(b'{"messages": [{"role": "a", "role": "b"}]}')
    assert err.param == "messages[0]" and "messages[0]" in err.message


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1,}', b"\xef\xbb\xbf{}", b"{'a': 1}", b'{"a": 01}'])
def test_malformed(raw):
    assert "not valid JSON" in rejected(raw).message
