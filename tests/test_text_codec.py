"""TextCodec (text/codec.py): the package's tokens <-> text, checked against the tokenizer and the
chat template themselves on random text (printed seed); what a package without them refuses."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest

from _serving import CHARS, CHAT_TEMPLATE, char_tokenizer
from portable_infer.decode.sampling import SamplingParams
from portable_infer.errors import InvalidArgumentError, PackageError
from portable_infer.package.manifest import TokenizerInfo
from portable_infer.text.chat_template import ChatTemplate
from portable_infer.text.codec import TextCodec

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("CODEC_SEED") or random.SystemRandom().randrange(2**31))
    print(f"CODEC_SEED={s}")
    return s


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _texts(rng, n: int) -> list:
    return ["".join(rng.choice(CHARS, size=int(rng.integers(1, 40)))) for _ in range(n)]


def _manifest(**tokenizer) -> SimpleNamespace:
    info = TokenizerInfo(**{"file": "tokenizer.json", "config_file": None, "chat_template_file": "chat_template.jinja",
                            "bos_token_id": 1, "eos_token_ids": (2,), "pad_token_id": 0, **tokenizer})
    return SimpleNamespace(tokenizer=info, model=SimpleNamespace(vocab_size=256))


@pytest.fixture
def package(tmp_path, tok):
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return tmp_path


def test_package_codec_equals_its_tokenizer_and_template(package, tok, seed):
    codec = TextCodec.from_package(package, _manifest())
    rng = np.random.default_rng(seed)
    template = ChatTemplate(CHAT_TEMPLATE, SPECIALS)  # the special tokens the manifest's ids name
    for text in _texts(rng, 20):
        ids = tok.encode(text).ids
        assert codec.encode(text) == ids == codec.as_ids(text)
        assert codec.decode(ids) == tok.decode(ids)
        messages = [{"role": "system", "content": text[::-1]}, {"role": "user", "content": text}]
        rendered = template.render(messages, add_generation_prompt=True)
        assert codec.chat_ids(messages) == tok.encode(rendered, add_special_tokens=False).ids
    assert codec.template_source == CHAT_TEMPLATE and codec.chat_template.special_tokens == SPECIALS
    assert (codec.vocab_size, codec.eos_ids, codec.pad_id) == (256, (2,), 0)


def test_token_ids_are_checked_not_encoded(package, seed):
    codec = TextCodec.from_package(package, _manifest())
    ids = np.random.default_rng(seed).integers(0, 256, 12)
    assert codec.as_ids(ids) == [int(i) for i in ids]
    with pytest.raises(InvalidArgumentError) as err:
        codec.as_ids([3, 256])
    assert err.value.param == "prompt"
    with pytest.raises(InvalidArgumentError, match="not valid text"):
        codec.encode("a\ud800b")


def test_pad_id_falls_back_to_the_first_end_token():
    assert TextCodec.from_manifest(_manifest(pad_token_id=None, eos_token_ids=(7, 2))).pad_id == 7
    assert TextCodec.from_manifest(_manifest(pad_token_id=None, eos_token_ids=())).pad_id == 0
    assert TextCodec.from_manifest(_manifest(pad_token_id=5)).pad_id == 5


def test_a_package_without_tokenizer_or_template_says_so(tmp_path):
    codec = TextCodec.from_package(tmp_path, _manifest(file=None, chat_template_file=None))
    assert codec.tokenizer is None and codec.chat_template is None and codec.template_source is None
    for call in (codec.require_tokenizer, lambda: codec.encode("hi"), lambda: codec.decode([3]),
                 lambda: codec.as_ids("hi")):
        with pytest.raises(PackageError, match="no tokenizer"):
            call()
    with pytest.raises(PackageError, match="no chat template"):
        codec.chat_ids([{"role": "user", "content": "hi"}])
    assert codec.as_ids([1, 2]) == [1, 2]  # ids need no tokenizer
    stream = codec.text_stream()
    assert stream.push(5) == ("", False) and stream.close() == ""


def test_unreadable_files_are_package_errors(package):
    (package / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(PackageError, match="tokenizer.json could not be read"):
        TextCodec.from_package(package, _manifest())
    with pytest.raises(PackageError, match="could not be read as UTF-8"):
        TextCodec.from_package(package, _manifest(file=None, chat_template_file="missing.jinja"))


def test_text_stream_holds_back_the_stop_string(package, tok, seed):
    codec = TextCodec.from_package(package, _manifest())
    rng = np.random.default_rng(seed)
    before, after = _texts(rng, 2)
    before = before.replace("#", "")
    stream, out, hit = codec.text_stream(SamplingParams(stop=("#",))), "", False
    for t in tok.encode(before + "#" + after).ids:
        piece, hit = stream.push(t)
        out += piece
        if hit:
            break
    assert hit and out + stream.close() == before


def test_an_end_token_that_stops_the_sequence_is_not_text(package, tok, seed):
    """The token that ends a sequence with "stop" (a stop id, or the model's end token, which
    also ends a grammar) adds no text, as vLLM leaves stop tokens out; the same token before the
    end (ignore_eos) is text as any other. Here both are ordinary characters."""
    eos, stop = tok.token_to_id("q"), tok.token_to_id("z")
    codec = TextCodec.from_package(package, _manifest(eos_token_ids=(eos,)))
    ids = tok.encode(_texts(np.random.default_rng(seed), 1)[0]).ids + [eos]
    for params, end in ((SamplingParams(ignore_eos=True), eos), (SamplingParams(stop_token_ids=[stop]), stop)):
        stream = codec.text_stream(params)
        out = "".join(stream.piece(t, None)[0] for t in ids)
        piece, reason = stream.piece(end, "stop")
        assert reason == "stop" and out + piece == tok.decode(ids) and out.endswith("q"), (params, end)
