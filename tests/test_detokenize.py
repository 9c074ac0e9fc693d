"""StreamingDetokenizer against a real byte-level BPE tokenizer trained here on a few strings."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from portable_infer.text.detokenize import StreamingDetokenizer
from portable_infer.errors import InvalidArgumentError

EMOJI = "😀🎉👍🏽"
CJK = "日本語のテキスト、中文文本"
ACCENTS = "café naïve résumé Ångström"
CORPUS = [f"Hello world! {EMOJI} emoji party", CJK, ACCENTS, "The quick brown fox jumps over the lazy dog."]
EOS = "<|endoftext|>"
# Pieces random texts are made of: multi-byte characters next to ASCII and spaces.
PIECES = list(EMOJI) + ["👍🏽", "🚀", "ß", "€", "Ω"] + list(CJK) + list(ACCENTS) + ["the", " ", "\n", "fox", "!"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # A small vocabulary, so multi-byte characters are split over several tokens.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS], show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def stream(tokenizer, ids, take_every: int = 1, **kwargs) -> list[str]:
    """Feed ``ids`` one by one, taking text every ``take_every`` tokens; return all chunks."""
    detok = StreamingDetokenizer(tokenizer, **kwargs)
    chunks = []
    for n, token_id in enumerate(ids, 1):
        detok.add(token_id)
        if n % take_every == 0:
            chunks.append(detok.take())
    chunks.append(detok.finalize())
    return chunks


def random_text(rng: np.random.Generator, n: int = 40) -> str:
    return "".join(rng.choice(PIECES, size=n))


def test_tokenizer_really_splits_characters(tokenizer):
    ids = tokenizer.encode(EMOJI + CJK).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # else this file tests nothing


@pytest.mark.parametrize("text", CORPUS + [EMOJI, CJK, ACCENTS, "👍🏽" * 5, " " + EMOJI + " x"])
def test_chunks_are_whole_characters_and_join_to_decode(tokenizer, text):
    ids = tokenizer.encode(text).ids
    chunks = stream(tokenizer, ids)
    assert all("\ufffd" not in chunk for chunk in chunks), chunks
    assert "".join(chunks) == tokenizer.decode(ids) == text


@pytest.mark.parametrize("take_every", [1, 2, 3, 7])
def test_random_texts_any_take_cadence(tokenizer, take_every):
    rng = np.random.default_rng()
    for _ in range(20):
        text = random_text(rng)
        ids = tokenizer.encode(text).ids
        chunks = stream(tokenizer, ids, take_every)
        assert all("\ufffd" not in chunk for chunk in chunks), (text, chunks)
        assert "".join(chunks) == tokenizer.decode(ids) == text


def test_random_token_ids_join_to_decode(tokenizer):
    # Arbitrary ids (invalid byte sequences included) still stream to exactly what decode gives.
    rng = np.random.default_rng()
    for _ in range(50):
        ids = rng.integers(0, tokenizer.get_vocab_size(), size=30).tolist()
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_incomplete_character_is_held_until_finalize(tokenizer):
    ids = tokenizer.encode("ok 😀").ids
    partial = ids[:-1]  # the emoji's last byte is missing
    detok = StreamingDetokenizer(tokenizer)
    taken = ""
    for i in partial:
        detok.add(i)
        taken += detok.take()
    assert taken == "ok "
    rest = detok.finalize()
    assert rest.endswith("\ufffd") and taken + rest == tokenizer.decode(partial)
    assert detok.finalize() == "" and detok.take() == ""


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("hi 😀").ids + [tokenizer.token_to_id(EOS)] + tokenizer.encode(" bye").ids
    assert "".join(stream(tokenizer, ids)) == "hi 😀 bye"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)) == f"hi 😀{EOS} bye"


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call sees."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner, self.sizes = inner, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_window_stays_small(tokenizer):
    text = random_text(np.random.default_rng(), n=300)
    ids = tokenizer.encode(text).ids
    counting = CountingTokenizer(tokenizer)
    assert "".join(stream(counting, ids)) == text
    assert len(ids) > 300 and max(counting.sizes) <= 16  # a window of a few characters, not O(n)


def test_reset_starts_over(tokenizer):
    detok = StreamingDetokenizer(tokenizer)
    for i in tokenizer.encode("first 日本").ids:
        detok.add(i)
    detok.reset()
    assert detok.token_ids == [] and detok.finalize() == ""
    for i in tokenizer.encode("second").ids:
        detok.add(i)
    assert detok.take() + detok.finalize() == "second"


@pytest.mark.parametrize("bad", [-1, 1.0, "3", None, True])
def test_add_rejects_non_ids(tokenizer, bad):
    with pytest.raises(InvalidArgumentError, match="token_id"):
        StreamingDetokenizer(tokenizer).add(bad)


def test_numpy_ids_are_accepted(tokenizer):
    ids = np.array(tokenizer.encode(EMOJI).ids, dtype=np.int64)
    assert "".join(stream(tokenizer, ids)) == EMOJI


def _metaspace_tokenizer() -> Tokenizer:
    """A SentencePiece-style tokenizer (Metaspace, byte fallback): its decoder's text depends on context."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", EOS], show_progress=False,
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_decode_stream_gives_the_window_rules_pieces(tokenizer, kind):
    """For a tokenizers.Tokenizer each token goes through tokenizers' DecodeStream; its pieces are
    the window rule's own, piece by piece (random ids, specials kept and skipped)."""
    tok = tokenizer if kind == "byte-level" else _metaspace_tokenizer()
    rng = np.random.default_rng(11)
    for skip in (True, False):
        ids = rng.integers(0, tok.get_vocab_size(), 300).tolist()
        fast, rule = StreamingDetokenizer(tok, skip), StreamingDetokenizer(tok, skip)
        assert fast._stream is not None
        rule._stream = None
        a, b = [], []
        for t in ids:
            fast.add(t)
            rule.add(t)
            a.append(fast.take())
            b.append(rule.take())
        assert fast._stream is not None, f"{kind}: DecodeStream failed and the rule took over"
        a.append(fast.finalize())
        b.append(rule.finalize())
        assert a == b, f"{kind}: DecodeStream's pieces differ from the window rule's"
        assert "".join(a) == tok.decode(ids, skip_special_tokens=skip)
        # taken every 3 ids: the stream steps over each and stays in use
        every = StreamingDetokenizer(tok, skip)
        joined = []
        for n, t in enumerate(ids, 1):
            every.add(t)
            if n % 3 == 0:
                joined.append(every.take())
        assert every._stream is not None, f"{kind}: a take every 3 ids left DecodeStream"
        joined.append(every.finalize())
        assert "".join(joined) == tok.decode(ids, skip_special_tokens=skip)
