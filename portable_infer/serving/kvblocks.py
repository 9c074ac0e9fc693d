"""KV memory for continuous batching: block accounting.

Accounting is in blocks of ``block_size`` tokens: a request reserves the blocks for its prompt
plus ``max_new_tokens`` when it is admitted and gives them back when it ends, so the running
batch never holds more KV than the budget allows (a request that does not fit waits instead).
The budget's bytes become tokens by :func:`portable_infer.engine.memory.bytes_per_token`.

Rows joining and leaving the cache are the cache's own operations
(:class:`~portable_infer.engine.protocols.KVCache`: ``merge``, ``take``, ``prompt_kv``,
``fill_prefix``).
"""

from __future__ import annotations

import math

from portable_infer.errors import InvalidArgumentError


class BlockPool:
    """Counts KV blocks of ``block_size`` tokens out of ``total`` (not thread-safe: lock outside)."""

    def __init__(self, total: int, block_size: int = 16):
        if not (isinstance(total, int) and total >= 1):
            raise InvalidArgumentError(f"the KV budget must hold at least one block, got {total!r} blocks; "
                                       f"raise kv_budget_tokens (or kv_budget_bytes)")
        if not (isinstance(block_size, int) and block_size >= 1):
            raise InvalidArgumentError(f"block_size must be an int >= 1, got {block_size!r}")
        self.total = total
        self.block_size = block_size
        self.used = 0

    @property
    def free(self) -> int:
        return self.total - self.used

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def try_reserve(self, blocks: int) -> bool:
        if blocks > self.free:
            return False
        self.used += blocks
        return True

    def release(self, blocks: int) -> None:
        if blocks > self.used:
            raise RuntimeError(f"releasing {blocks} KV blocks but only {self.used} are reserved")
        self.used -= blocks
