"""low_memory and max_kv_tokens: same tokens, a bounded context, clear errors."""

from __future__ import annotations

import pytest

import portable_infer
from portable_infer.errors import ContextLengthError, InvalidArgumentError

PROMPT = [5, 17, 99, 3, 42, 7]


def test_low_memory_gives_the_same_tokens(tiny_llama):
    want = portable_infer.load(tiny_llama.package, "cpu", intra_op_threads=1).generate_ids(PROMPT, max_new_tokens=10)
    low = portable_infer.load(tiny_llama.package, "cpu", intra_op_threads=1, low_memory=True)
    assert low.generate_ids(PROMPT, max_new_tokens=10) == want


def test_max_kv_tokens_caps_the_context(tiny_llama):
    full = portable_infer.load(tiny_llama.package, "cpu", intra_op_threads=1)
    capped = portable_infer.load(tiny_llama.package, "cpu", intra_op_threads=1, max_kv_tokens=10)
    assert capped.max_context == 10 and full.max_context == tiny_llama.model.config.max_position_embeddings
    out = capped.generate_ids(PROMPT, max_new_tokens=50, ignore_eos=True)
    assert out == full.generate_ids(PROMPT, max_new_tokens=len(out), ignore_eos=True)
    assert len(PROMPT) + len(out) <= 10 + 1  # the last sampled token is never fed back
    with pytest.raises(ContextLengthError):
        capped.generate_ids(list(range(3, 13)), max_new_tokens=2)
    assert len(capped.generate_ids(list(range(3, 23)), max_new_tokens=2, truncate=True)) >= 1


@pytest.mark.parametrize("bad", [0, 1, -5, 2.5, "8"])
def test_max_kv_tokens_is_validated(tiny_llama, bad):
    with pytest.raises(InvalidArgumentError, match="max_kv_tokens"):
        portable_infer.load(tiny_llama.package, "cpu", max_kv_tokens=bad)
