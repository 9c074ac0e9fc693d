"""Checks every engine makes before a forward or a new cache (fail closed: a typed error naming the fix)."""

from __future__ import annotations

import numpy as np

from portable_infer.package import manifest as mf
from portable_infer.errors import CapacityError, InvalidArgumentError


def checked_capacity(capacity: int | None, max_context: int) -> int:
    """``capacity`` checked (an int >= 1; None: ``max_context``), at most ``max_context``."""
    if capacity is None:
        return max_context
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise InvalidArgumentError(f"capacity must be an int >= 1 (KV tokens per row), got {capacity!r}; "
                                   f"or None for the context ({max_context})", param="capacity")
    return min(int(capacity), max_context)


def check_call(engine, greedy: bool, all_logits: bool) -> None:
    """Refuse what ``engine``'s graph cannot give: ``greedy`` without a next_token output,
    ``all_logits`` from a graph that computes the last position only."""
    if greedy and not engine.greedy_on_device:
        raise InvalidArgumentError(f"graph {engine.variant.file} has no {mf.NEXT_TOKEN} output; decode greedily "
                                   f"on the host (greedy=False) or re-export the package with the static variant",
                                   param="greedy")
    if greedy and all_logits:
        raise InvalidArgumentError("greedy=True returns token ids, all_logits=True every position's logits: "
                                   "ask for one", param="all_logits")
    if all_logits and engine.variant.logits != "all":
        raise InvalidArgumentError(f"graph {engine.variant.file} computes the last position's logits only "
                                   f"(logits: {engine.variant.logits}); feed the tokens one at a time, or use a "
                                   f"variant with logits: all (portable)", param="all_logits")


def check_capacity(rows: np.ndarray, capacity: int) -> None:
    """A row would hold more tokens than its cache's ``capacity``: a CapacityError."""
    if rows.size and int(rows.max()) > capacity:
        raise CapacityError(f"the KV cache holds {capacity} tokens per row and a row needs {int(rows.max())}; "
                            f"make the cache with a larger capacity")
