"""Prefix caching for the continuous-batching scheduler: reuse the KV of prompt prefixes seen before.

Requests to a chat service mostly start alike: the chat template's preamble, a system prompt,
few-shot examples. When a prompt's first tokens match a prefix whose keys and values were
computed for an earlier request, the new request starts from a copy of that KV and prefills only
the rest of its prompt.

Prefixes are matched in whole blocks of ``block_size`` tokens (the scheduler's KV block), by a
chained hash per block boundary (as vLLM's automatic prefix caching does); a hit is confirmed
by comparing the tokens themselves, so a hash collision can never hand over another prompt's
KV. One entry holds the KV of one stored prompt's block-aligned prefix, ``[1, kv_heads, n,
head_dim]`` per layer in host memory, and answers for every block boundary inside it. Entries
are evicted least recently used first once they hold more than ``max_bytes``; that memory is
separate from the scheduler's KV budget. At least one prompt token is always left to prefill:
the forward pass over it gives the logits for the first new token.

Not thread-safe: the scheduler thread alone calls it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class _Entry:
    tokens: np.ndarray  # int64 [n], n a multiple of the block size
    arrays: list  # [(key, value)] per layer, numpy [1, kv_heads, n, head_dim]
    nbytes: int
    keys: list  # its block-boundary hashes (the index lists it under each)


def block_hashes(tokens, block_size: int) -> list:
    """The chained hash of every whole-block prefix: entry i covers ``tokens[:(i + 1) * block_size]``."""
    out, h = [], 0
    for i in range(len(tokens) // block_size):
        h = hash((h, tuple(int(t) for t in tokens[i * block_size:(i + 1) * block_size])))
        out.append(h)
    return out


class PrefixCache:
    """Block-aligned prompt prefixes -> their KV (host arrays), least recently used out first.

    Args:
        block_size: tokens a block (prefixes match in whole blocks).
        max_bytes: host memory the entries may hold (0: no caching).
        min_tokens: prompts shorter than this are not stored (the scheduler's ``prefix_min``: on
            a GPU, fetching a short prompt's KV to the host costs more than prefilling it again).
        bytes_per_token: the KV of one token; prompts whose KV would not fit ``max_bytes`` are
            not fetched at all (0: unknown, checked when stored).
    """

    def __init__(self, block_size: int, max_bytes: int, min_tokens: int = 0, bytes_per_token: int = 0):
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.bytes_per_token = bytes_per_token
        self.nbytes = 0
        self._entries: OrderedDict = OrderedDict()  # id(entry) -> entry, oldest first
        self._index: dict = {}  # block-boundary hash -> [(entry, tokens covered)], newest last
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def match(self, prompt) -> int:
        """How many tokens of ``prompt`` a :meth:`lookup` would reuse now (no side effects)."""
        return self._find(prompt)[0]

    def lookup(self, prompt) -> tuple[int, list | None]:
        """The longest stored prefix of ``prompt`` shorter than it: ``(tokens, [(k, v)] copies)``,
        or ``(0, None)``."""
        if not self.enabled:
            return 0, None
        n, entry = self._find(prompt)
        if entry is None:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(id(entry))
        self.hits += 1
        self.tokens_reused += n
        return n, [(np.array(k[:, :, :n]), np.array(v[:, :, :n]))  # copies, always
                   for k, v in entry.arrays]

    def _find(self, prompt) -> tuple[int, _Entry | None]:
        if not self.enabled:
            return 0, None
        usable = (len(prompt) - 1) // self.block_size  # leave one token to prefill
        hashes = block_hashes(prompt[:usable * self.block_size], self.block_size)
        for i in range(len(hashes) - 1, -1, -1):
            n = (i + 1) * self.block_size
            want = np.asarray(prompt[:n], np.int64)
            # the tokens themselves decide: a hash collision never hands over another prompt's KV
            entry = next((e for e, _ in reversed(self._index.get(hashes[i], ())) if np.array_equal(e.tokens[:n], want)),
                         None)
            if entry is not None:
                return n, entry
        return 0, None

    def store(self, prompt, arrays: list) -> None:
        """Keep the KV of ``prompt``'s whole blocks; ``arrays`` [(k, v)] per layer, each
        ``[1, kv_heads, len(prompt), head_dim]`` (copied: the caller's arrays may change)."""
        n = self._kept(prompt)
        if n == 0:
            return
        hashes = block_hashes(prompt[:n], self.block_size)
        tokens = np.asarray(prompt[:n], np.int64)
        stored = self._stored(hashes[-1], tokens)
        if stored is not None:
            self._entries.move_to_end(id(stored))
            return
        size = sum(k[:, :, :n].nbytes + v[:, :, :n].nbytes for k, v in arrays)  # views: no copy yet
        if size > self.max_bytes:  # never copied: a prompt larger than the cache left no garbage
            return
        kept = [(np.array(k[:, :, :n]), np.array(v[:, :, :n])) for k, v in arrays]
        entry = _Entry(tokens, kept, size, hashes)
        for i, h in enumerate(hashes):
            self._index.setdefault(h, []).append((entry, (i + 1) * self.block_size))
        self._entries[id(entry)] = entry
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self._evict()

    def _kept(self, prompt) -> int:
        """The tokens of ``prompt`` an entry would hold: its whole blocks, or 0 where nothing is
        kept (caching off, under a block, shorter than ``min_tokens``, KV larger than the cache)."""
        n = len(prompt) // self.block_size * self.block_size
        if not self.enabled or len(prompt) < self.min_tokens or n * self.bytes_per_token > self.max_bytes:
            return 0
        return n

    def wants(self, prompt) -> bool:
        """Whether :meth:`store` would keep anything of ``prompt`` (so its KV is worth fetching);
        where it is stored already, that entry counts as just used (least recently used order)."""
        n = self._kept(prompt)
        if n == 0:
            return False
        tokens = np.asarray(prompt[:n], np.int64)
        stored = self._stored(block_hashes(tokens, self.block_size)[-1], tokens)
        if stored is not None:
            self._entries.move_to_end(id(stored))
        return stored is None

    def _stored(self, last_hash, tokens: np.ndarray) -> _Entry | None:
        """The entry holding exactly ``tokens`` (whole blocks), if any."""
        return next((e for e, covered in self._index.get(last_hash, ())
                     if covered == len(tokens) and np.array_equal(e.tokens, tokens)), None)

    def _evict(self) -> None:
        _, old = self._entries.popitem(last=False)
        self.nbytes -= old.nbytes
        for h in old.keys:
            left = [x for x in self._index[h] if x[0] is not old]
            if left:
                self._index[h] = left
            else:
                del self._index[h]

    def __len__(self) -> int:
        return len(self._entries)
