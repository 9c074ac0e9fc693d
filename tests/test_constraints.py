"""Constrained decoding units: constraints compile on real tokenizers, masks are what the grammar
allows, random walks through the masks always end in valid output, bad input is a typed error.

No model runs here: a "walk" draws each next token from the allowed ones with a seeded generator,
so every sequence the mask lets through is checked, not just the likely ones.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from portable_infer.decode.constraints import Constraint, Guide, consume
from portable_infer.decode.masks import MaskFill, allowed_tokens, fill_masks
from portable_infer.errors import GenerationError, InvalidArgumentError

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SEED = 20240519
EOS = 2

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}


def byte_tokenizer():
    """tests/conftest.py's tiny_text_package tokenizer: one token per byte (256), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def guide():
    return Guide(byte_tokenizer(), 256, [EOS])


@pytest.fixture(scope="module")
def smol_guide():
    """The real SmolLM2 tokenizer (49152 tokens), rebuilt from the installed GGUF."""
    from exporters.gguf_tokenizer import build_tokenizer

    gguf = pytest.importorskip("exporters.gguf_source")
    meta = pytest.importorskip("exporters.gguf_meta")
    try:
        path = gguf.default_gguf_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"the SmolLM2 GGUF is not installed: {exc}")
    tok = build_tokenizer(meta.read_gguf_metadata(path))
    return Guide(tok, tok.get_vocab_size(), [EOS])


def walk(guide, constraint, rng, max_steps=400, prefer=None):
    """Draw tokens from the allowed ones until the grammar stops; the text and whether it did.
    (In the byte tokenizer the end token 2 is also the byte "#": the grammar takes it as text
    inside a string and as the end once the grammar is complete, where it may end the text.)

    ``prefer``: token ids drawn with 25 % probability when allowed (so unbounded parts end)."""
    m = guide.matcher(constraint)
    ids = []
    for _ in range(max_steps):
        allowed = np.flatnonzero(m_allowed(guide, m))
        assert allowed.size, "the mask allows no token"
        pool = [t for t in (prefer or ()) if t in set(allowed.tolist())]
        tok = int(rng.choice(pool)) if pool and rng.random() < 0.25 else int(rng.choice(allowed))
        consume(m, tok)
        ids.append(tok)
        if m.is_stopped():
            break
    return guide.tokenizer.decode(ids), m.is_stopped()


def m_allowed(guide, m):
    return allowed_tokens(fill_masks({0: m}, 1, guide.vocab_size)[0], guide.vocab_size)


# --- Constraint: plain data ----------------------------------------------------------------------
def test_response_format_table():
    assert Constraint.from_response_format({"type": "text"}) is None
    assert Constraint.from_response_format({"type": "json_object"}) == Constraint.json_object()
    c = Constraint.from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA,
                                                                                  "strict": True}})
    assert c.kind == "json_schema" and json.loads(c.source) == SCHEMA and c.param == "response_format"
    assert hash(c) == hash(Constraint.json_schema(json.dumps(SCHEMA)))  # hashable: compiled-grammar cache key


@pytest.mark.parametrize("rf, words", [
    ({"type": "xml"}, "text, json_object or json_schema"),
    ({"type": "json_schema"}, "'schema'"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "bogus": 1}}, "bogus"),
    ({"type": "json_object", "json_schema": {}}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "JSON object"),
    ("json", "object with a string 'type'"),
])
def test_bad_response_format_is_typed(rf, words):
    with pytest.raises(InvalidArgumentError, match=re.escape(words)) as e:
        Constraint.from_response_format(rf)
    assert e.value.param == "response_format"


def test_coerce_shorthands():
    assert Constraint.coerce({"regex": "[0-9]+"}) == Constraint.regex("[0-9]+")
    assert Constraint.coerce({"grammar": 'start: "a"'}).kind == "grammar"
    assert Constraint.coerce({"json_schema": SCHEMA}).kind == "json_schema"
    assert Constraint.coerce(None) is None
    for bad in ({"regex": "a", "grammar": "b"}, "[0-9]+", {"pattern": "a"}, Constraint.regex):
        with pytest.raises(InvalidArgumentError) as e:
            Constraint.coerce(bad)
        assert e.value.param == "constraint"
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        Constraint.regex("")


# --- compile errors name the problem -------------------------------------------------------------
@pytest.mark.parametrize("constraint, words", [
    (Constraint.json_schema({"type": "frob"}, "response_format"), "frob"),
    (Constraint.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}), "/nope"),
    (Constraint.regex("a(b"), "unclosed group"),
    (Constraint.grammar("start: foo"), "foo"),
])
def test_bad_grammar_is_invalid_argument(guide, constraint, words):
    with pytest.raises(InvalidArgumentError, match=re.escape(words)) as e:
        guide.matcher(constraint)
    assert e.value.param == constraint.param
    assert "<state>" not in str(e.value)  # llguidance's parser dump stays out of the message
    error = constraint.compile_error()  # the same check without a tokenizer: one line naming the problem
    assert words in error and "\n" not in error, error


@pytest.mark.parametrize("constraint", [Constraint.regex("[0-9]+"), Constraint.json_object(),
                                        Constraint.json_schema({"type": "object"}), Constraint.grammar('start: "a"')])
def test_a_good_constraint_has_no_compile_error(constraint):
    assert constraint.compile_error() is None


def test_json_schema_text_must_be_json():
    with pytest.raises(InvalidArgumentError, match="not valid JSON") as e:
        Constraint.json_schema("{nope", "response_format")
    assert e.value.param == "response_format"


# --- masks ---------------------------------------------------------------------------------------
def test_first_mask_of_a_regex_is_its_first_characters(guide):
    m = guide.matcher(Constraint.regex("[ab][0-9]"))
    allowed = np.flatnonzero(m_allowed(guide, m))
    assert sorted(guide.tokenizer.decode([int(t)]) for t in allowed) == ["a", "b"]


def test_batched_fill_equals_one_by_one(guide):
    rng = np.random.default_rng(SEED)
    print("seed", SEED)
    constraints = [Constraint.json_schema(SCHEMA), Constraint.regex("[0-9]{2,5}x"), Constraint.json_object(),
                   Constraint.grammar('start: "yes" | "no" | "maybe"')]
    matchers = {}
    for row, c in zip((0, 2, 3, 5), constraints):  # rows 1 and 4 unconstrained
        m = guide.matcher(c)
        for _ in range(int(rng.integers(0, 3))):  # each at its own position
            consume(m, int(rng.choice(np.flatnonzero(m_allowed(guide, m)))))
        matchers[row] = m
    batched = fill_masks(matchers, 6, 256)
    threaded = MaskFill(matchers, 6, 256).result()
    np.testing.assert_array_equal(batched, threaded)
    for row in range(6):
        alone = m_allowed(guide, matchers[row]) if row in matchers else np.ones(256, bool)
        np.testing.assert_array_equal(allowed_tokens(batched[row], 256), alone)
    np.testing.assert_array_equal(allowed_tokens(batched, 256), [allowed_tokens(r, 256) for r in batched])  # one call
    assert MaskFill({}, 3, 256).result() is None


def test_refused_token_is_a_generation_error(guide):
    m = guide.matcher(Constraint.regex("[0-9]+"))
    letter = byte_tokenizer().token_to_id("a")
    with pytest.raises(GenerationError) as e:
        consume(m, letter)
    assert e.value.reason == "grammar"


@pytest.mark.parametrize("inline", [False, True])
def test_a_fill_that_fails_raises_where_its_result_is_taken(guide, monkeypatch, inline):
    """On the worker thread or inline (inside the forward), a failing fill is raised by result(),
    not lost and not raised inside the engine's forward."""
    from portable_infer.decode import masks

    def broken(*a):
        raise RuntimeError("llguidance failed")

    monkeypatch.setattr(masks, "fill_masks", broken)
    fill = MaskFill({0: guide.matcher(Constraint.regex("[0-9]+"))}, 1, 256, inline=inline)
    fill.run()  # what the engine calls between its run and the wait for its outputs: returns
    with pytest.raises(RuntimeError, match="llguidance failed"):
        fill.result()


def test_forced_tokens_are_the_rows_that_allow_one_token():
    from portable_infer.decode.masks import forced_tokens

    rng = np.random.default_rng(SEED + 3)
    vocab, n = 49152, 40
    allowed, want = np.zeros((n, vocab), bool), []
    for r in range(n):
        k = int(rng.choice([0, 1, 1, 2, 300]))
        idx = rng.choice(vocab, k, replace=False)
        idx[:1] = rng.choice([0, 31, 32, vocab - 1, idx[0]]) if k == 1 else idx[:1]  # word edges too
        allowed[r, idx] = True
        want.append(int(idx[0]) if k == 1 else -1)
    masks = np.packbits(allowed, axis=1, bitorder="little").view(np.int32)  # bit v % 32 of word v // 32
    assert forced_tokens(masks).tolist() == want


def test_a_row_feeds_its_token_with_the_next_fill(guide, monkeypatch):
    """A constrained row's picked token goes to its matcher with the next step's mask fill, on the
    worker thread (off the step's path); the fill's mask is the one after that token; a token the
    grammar refuses there is raised by the row's next step; the row stops on the end token once the
    grammar is complete, with ignore_eos too."""
    import threading

    from portable_infer.decode import sequence as seq_mod
    from portable_infer.decode.sampling import SamplingParams
    from portable_infer.decode.sequence import Sequence

    tok = byte_tokenizer()
    digit, letter = tok.token_to_id("7"), tok.token_to_id("a")
    params = SamplingParams(constraint=Constraint.regex("[0-9]{2}"), ignore_eos=True, max_new_tokens=8)
    seq = Sequence([1], params, guide=guide)
    fed_on = []
    monkeypatch.setattr(seq_mod, "consume", lambda m, t: fed_on.append(threading.current_thread().name) or consume(m, t))
    logits = np.zeros(256, np.float32)
    logits[digit] = 5.0
    assert seq.step(logits, max_context=64).token == digit and fed_on == []  # not fed during its step
    masks = MaskFill.of([seq]).result()
    assert fed_on and fed_on[0].startswith("portable-infer-masks"), fed_on
    assert allowed_tokens(masks[0], 256)[digit] and not allowed_tokens(masks[0], 256)[letter]
    second = seq.step(logits, mask=masks[0], max_context=64)
    assert second.token == digit and second.finish_reason is None
    end = seq.step(logits, mask=MaskFill.of([seq]).result()[0], max_context=64)
    assert (end.token, end.finish_reason, seq.output) == (EOS, "stop", [digit, digit, EOS])

    broken = Sequence([1], params, guide=guide)
    broken.step(np.where(np.arange(256) == letter, 5.0, 0.0).astype(np.float32), tok=letter, max_context=64)
    MaskFill.of([broken]).result()  # fed there: refused, kept for the row's next step
    with pytest.raises(GenerationError) as e:
        broken.step(logits, max_context=64)
    assert e.value.reason == "grammar"


# --- random walks: whatever the mask lets through is valid ---------------------------------------
def _quote_close_ids(tok):
    return [tok.token_to_id(c) for c in ('"', "]", "}", "0")]


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_schema_walks_validate(request, name):
    g = request.getfixturevalue("guide" if name == "tiny" else "smol_guide")
    rng = np.random.default_rng(SEED)
    print("seed", SEED)
    prefer = [t for t in _quote_close_ids(g.tokenizer) if t is not None]
    c = Constraint.json_schema(SCHEMA)
    for _ in range(30 if name == "tiny" else 10):
        text, stopped = walk(g, c, rng, prefer=prefer)
        assert stopped, text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_walks_parse(guide):
    rng = np.random.default_rng(SEED + 1)
    print("seed", SEED + 1)
    for _ in range(20):
        text, stopped = walk(guide, Constraint.json_object(), rng, max_steps=2000,
                             prefer=_quote_close_ids(guide.tokenizer))
        if stopped:
            assert isinstance(json.loads(text), dict), text
        else:  # ran out of steps inside a value: what there is must be the start of an object
            assert text.startswith("{")


def test_regex_and_grammar_walks_match(guide):
    rng = np.random.default_rng(SEED + 2)
    print("seed", SEED + 2)
    for _ in range(20):
        text, stopped = walk(guide, Constraint.regex(r"[a-c]{2}-[0-9]{1,3}\."), rng)
        assert stopped and re.fullmatch(r"[a-c]{2}-[0-9]{1,3}\.", text), text
        text, stopped = walk(guide, Constraint.grammar('start: ("yes" | "no") " " NUM\nNUM: /[1-9][0-9]?/'), rng)
        assert re.fullmatch(r"(yes|no) [1-9][0-9]?", text.rstrip("#")), text


def test_compiled_grammar_is_cached_and_copied(guide):
    a = guide.matcher(Constraint.regex("[0-9]{4}"))
    b = guide.matcher(Constraint.regex("[0-9]{4}"))
    assert a is not b
    consume(a, byte_tokenizer().token_to_id("1"))
    assert m_allowed(guide, b).sum() == 10  # b starts fresh: all ten digits


def test_a_tokenizer_llguidance_cannot_read_is_used_through_its_token_texts():
    """The serving tests' character tokenizer has a Fuse decoder, which llguidance's tokenizer.json
    reader refuses: each token's decoded text stands in."""
    from _serving import char_tokenizer

    tok = char_tokenizer()
    g = Guide(tok, 256, [2])
    rng = np.random.default_rng(SEED + 3)
    print("seed", SEED + 3)
    for _ in range(10):
        text, stopped = walk(g, Constraint.json_schema(SCHEMA), rng, prefer=[tok.token_to_id(c) for c in '"]}0'])
        assert stopped, text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert g.token_bytes(tok.token_to_id("é")) == "é".encode()


def test_llguidance_taking_one_eos_id_gets_the_first(monkeypatch):
    """Older llguidance releases (1.6, the newest built for some platforms) take ``eos_token`` as
    one int and raise TypeError on a list: the guide then builds with the first EOS id, and a
    grammar still ends on it."""
    import llguidance

    real = llguidance.LLTokenizer
    seen = []

    def one_eos(source, *, n_vocab=None, eos_token=None):
        seen.append(eos_token)
        if isinstance(eos_token, list):
            raise TypeError("argument 'eos_token': 'list' object cannot be interpreted as an integer")
        return real(source, n_vocab=n_vocab, eos_token=eos_token)

    monkeypatch.setattr(llguidance, "LLTokenizer", one_eos)
    g = Guide(byte_tokenizer(), 256, [EOS, EOS - 1])
    m = g.matcher(Constraint.regex("ab"))
    assert seen[0] == [EOS, EOS - 1] and seen[-1] == EOS
    for ch in "ab":
        tok = next(int(t) for t in np.flatnonzero(m_allowed(g, m)) if g.tokenizer.decode([int(t)]) == ch)
        consume(m, tok)
    allowed = m_allowed(g, m)
    assert allowed[EOS] and not allowed[EOS - 1] and allowed.sum() == 1
