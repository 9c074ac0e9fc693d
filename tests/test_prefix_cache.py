"""PrefixCache on its own (plain numpy KV): longest block-aligned match, copies, collisions, LRU."""

from __future__ import annotations

import numpy as np
import pytest

from portable_infer.serving import prefix_cache as pc

BLOCK = 4


def kv(rng, n: int, layers: int = 2) -> list:
    return [(rng.standard_normal((1, 2, n, 3)).astype(np.float32),
             rng.standard_normal((1, 2, n, 3)).astype(np.float32)) for _ in range(layers)]


def entry_bytes(n: int, layers: int = 2) -> int:
    return layers * 2 * 2 * n * 3 * 4


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_longest_block_aligned_prefix_leaving_one_token(rng):
    cache = pc.PrefixCache(BLOCK, 1 << 20)
    a = rng.integers(0, 1000, 11).tolist()
    arrays = kv(rng, 11)
    cache.store(a, arrays)  # keeps the 8 tokens of its two whole blocks
    n, got = cache.lookup(a[:8] + [5, 6, 7])
    assert n == 8
    for (k, v), (gk, gv) in zip(arrays, got):
        np.testing.assert_array_equal(gk, k[:, :, :8])
        np.testing.assert_array_equal(gv, v[:, :, :8])
    assert cache.lookup(a[:8])[0] == 4  # one token must stay to prefill
    assert cache.lookup(a[:6] + [a[6] + 1, 0, 0])[0] == 4  # differs in block 2
    assert cache.lookup([a[0] + 1] + a[1:])[0] == 0  # differs in block 1
    assert (cache.hits, cache.misses, cache.tokens_reused) == (3, 1, 16)
    got[0][0][...] = 0  # callers get copies
    assert cache.lookup(a)[1][0][0].any()


def test_store_copies_and_skips_what_it_holds(rng):
    cache = pc.PrefixCache(BLOCK, 1 << 20)
    a = rng.integers(0, 1000, 9).tolist()
    arrays = kv(rng, 9)
    cache.store(a, arrays)
    keep = arrays[0][0][:, :, :8].copy()
    arrays[0][0][...] = 0
    np.testing.assert_array_equal(cache.lookup(a)[1][0][0], keep)
    cache.store(a, kv(rng, 9))
    assert len(cache) == 1 and cache.nbytes == entry_bytes(8)
    cache.store(a[:3], kv(rng, 3))  # under one block: nothing to keep
    assert len(cache) == 1


def test_a_hash_collision_never_hands_over_another_prompts_kv(rng, monkeypatch):
    monkeypatch.setattr(pc, "block_hashes", lambda tokens, bs: list(range(len(tokens) // bs)))  # all collide
    cache = pc.PrefixCache(BLOCK, 1 << 20)
    a, b = rng.integers(0, 1000, 9).tolist(), rng.integers(1000, 2000, 9).tolist()
    cache.store(a, kv(rng, 9))
    assert cache.lookup(b)[0] == 0
    b_kv = kv(rng, 9)
    cache.store(b, b_kv)  # same hashes, other tokens: a second entry
    assert len(cache) == 2
    np.testing.assert_array_equal(cache.lookup(b)[1][1][1], b_kv[1][1][:, :, :8])
    assert cache.lookup(a)[0] == 8


def test_least_recently_used_goes_first_and_shared_prefixes_survive(rng):
    cache = pc.PrefixCache(BLOCK, 2 * entry_bytes(8))
    a, b, c = (rng.integers(0, 1000, 9).tolist() for _ in range(3))
    cache.store(a, kv(rng, 9))
    cache.store(b, kv(rng, 9))
    assert cache.lookup(a)[0] == 8  # a is now the most recent
    cache.store(c, kv(rng, 9))
    assert cache.nbytes <= cache.max_bytes and len(cache) == 2
    assert cache.lookup(b)[0] == 0 and cache.lookup(a)[0] == 8 and cache.lookup(c)[0] == 8

    cache = pc.PrefixCache(BLOCK, 2 * entry_bytes(8))
    shared = rng.integers(0, 1000, 4).tolist()
    x, y = shared + rng.integers(0, 1000, 5).tolist(), shared + rng.integers(0, 1000, 5).tolist()
    cache.store(x, kv(rng, 9))
    cache.store(y, kv(rng, 9))  # both cover the shared first block
    cache.store(rng.integers(0, 1000, 9).tolist(), kv(rng, 9))  # evicts x
    assert cache.lookup(x)[0] == 4  # y still answers for the shared block


def test_disabled_or_too_small_keeps_nothing(rng):
    off = pc.PrefixCache(BLOCK, 0)
    a = rng.integers(0, 1000, 9).tolist()
    off.store(a, kv(rng, 9))
    assert (len(off), off.lookup(a), off.misses) == (0, (0, None), 0)
    tiny = pc.PrefixCache(BLOCK, entry_bytes(8) - 1)
    tiny.store(a, kv(rng, 9))
    assert len(tiny) == 0 and tiny.nbytes == 0


def test_match_and_wants_have_no_side_effects_but_lru(rng):
    cache = pc.PrefixCache(BLOCK, entry_bytes(8) + entry_bytes(4))
    a, b = rng.integers(0, 1000, 10).tolist(), rng.integers(0, 1000, 6).tolist()
    assert cache.wants(a) and not cache.wants(a[:3])  # under one block: nothing to keep
    cache.store(a, kv(rng, 10))
    cache.store(b, kv(rng, 6))
    assert cache.match(a[:8] + [1]) == 8 and cache.match([a[0] + 1] + a[1:]) == 0
    assert (cache.hits, cache.misses, cache.tokens_reused) == (0, 0, 0)  # match() counts nothing
    assert not cache.wants(a) and not cache.wants(a[:9])  # its whole blocks are held already
    assert cache.wants(a[:4] + [a[4] + 1] + a[5:])
    cache.store(rng.integers(0, 1000, 4).tolist(), kv(rng, 4))  # over budget: the oldest entry goes
    assert cache.match(b + [1]) == 0 and cache.match(a[:8] + [1]) == 8  # wants(a) made a the newest
    assert not pc.PrefixCache(BLOCK, 0).wants(a)


def test_short_prompts_and_prompts_larger_than_the_cache_are_not_fetched(rng):
    """``min_tokens``: shorter prompts are neither wanted nor stored; ``bytes_per_token``: a
    prompt whose KV would not fit is not wanted (its KV never leaves the device)."""
    per_token = entry_bytes(8) // 8
    cache = pc.PrefixCache(BLOCK, entry_bytes(8), min_tokens=6, bytes_per_token=per_token)
    short, fits, big = (rng.integers(0, 1000, n).tolist() for n in (5, 9, 13))
    assert not cache.wants(short) and cache.wants(fits) and not cache.wants(big)
    cache.store(short, kv(rng, 5))
    assert len(cache) == 0
    cache.store(fits, kv(rng, 9))
    assert len(cache) == 1 and cache.match(fits) == 8
