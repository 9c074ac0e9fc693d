"""What every engine and every KV cache offers: the only names their callers use.

An engine runs a decoder graph on token ids (it knows nothing about text); its cache holds the
keys and values of the tokens seen so far. Two pairs implement these protocols: the growing engine
and cache (``growth: concat`` graphs, :mod:`~portable_infer.engine.growing`,
:mod:`~portable_infer.engine.kv_growing`) and the static ones (``growth: static``, fixed buffers,
:mod:`~portable_infer.engine.static`, :mod:`~portable_infer.engine.kv_static`). Which one runs is a
property of the graph, recorded in the manifest, so callers (the decode loop, the scheduler's
running batch, the prefix cache's producer and consumer) never ask which kind they hold.

The mask convention is the same everywhere: the caller's mask is left-padded, ``[rows, length]``
over every token fed so far (padding 0), and grows by one column per decode step; positions are
``cumsum(mask) - 1`` so padding changes nothing for real tokens. How a cache lays the tokens out
inside (right-aligned behind padding, or from index 0 of a fixed buffer) is its own business.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from portable_infer.package.manifest import GraphVariant, KVLayout


@runtime_checkable
class KVCache(Protocol):
    """The KV of ``batch`` rows, and the row operations continuous batching needs.

    Attributes:
        layout: the graph's KV layout (from the manifest).
        batch: rows held.
        rows: tokens each row holds, padding not counted (int64 ``[batch]``).
        length: columns of the caller's left-padded mask seen so far (padding included).
        capacity: tokens a row may hold; a forward past it raises ``CapacityError``.
    """

    layout: KVLayout
    batch: int
    rows: np.ndarray
    length: int
    capacity: int

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token over all layers (keys and values)."""

    def nbytes(self) -> int:
        """KV bytes the cache holds now."""

    def merge(self, mask: np.ndarray, other: "KVCache", other_mask: np.ndarray) -> tuple:
        """``(cache, mask)``: the rows of ``other`` under this cache's, the masks left-padded to
        one width. Both inputs stay unchanged."""

    def take(self, mask: np.ndarray, keep: list) -> tuple:
        """``(cache, mask)``: rows ``keep`` (in that order), mask columns that are padding in
        all of them cut off."""

    def prompt_kv(self, prompts: list, rows: list) -> list:
        """Per row i in ``rows`` (holding ``prompts[i]``): ``[(k, v)]`` host arrays
        ``[1, kv_heads, len(prompts[i]), head_dim]`` per layer, for the prefix cache."""

    def fill_prefix(self, arrays: list, n: int) -> None:
        """Make this fresh batch-1 cache hold ``n`` prefix tokens (``arrays`` ``[(k, v)]`` per
        layer, host arrays ``[1, kv_heads, n, head_dim]``), as :meth:`prompt_kv` gave them."""


@runtime_checkable
class Engine(Protocol):
    """Runs one graph variant: token ids + mask + cache -> logits (or ids); the cache advances.

    Attributes:
        provider: ONNX Runtime's name of the provider the session runs on.
        variant: the manifest's graph variant.
        device: where its tensors live (:func:`~portable_infer.engine.devices.device_of`).
        greedy_on_device: the graph picks each row's argmax itself (``forward(greedy=True)``).
        masks_on_device: greedy picks under grammar masks are worth taking where the logits are
            (:meth:`forward_on_device`): True on GPUs; on the CPU numpy does it faster.
        samples_on_device: rows that sample (``SamplingParams.drawn_plain``) are drawn where the
            logits are (:meth:`forward_on_device`'s ``sample``): True on GPUs.
        overlaps_host: :meth:`forward_on_device`'s ``meanwhile`` runs while the device computes the
            step (the run returns before the device is done); else after it.
        max_context: tokens a row may hold at most (the default capacity of a cache).
    """

    provider: str
    variant: GraphVariant
    device: str
    greedy_on_device: bool
    masks_on_device: bool
    samples_on_device: bool
    overlaps_host: bool
    max_context: int

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty cache for ``batch`` rows of at most ``capacity`` tokens each (None: the
        engine's ``max_context``)."""

    def forward(self, ids: np.ndarray, mask: np.ndarray, cache: KVCache, *, greedy: bool = False,
                all_logits: bool = False) -> np.ndarray:
        """``ids`` [B, S] new tokens, ``mask`` [B, length + S]. Returns the logits [B, vocab] of
        each row's last position; with ``greedy`` (needs ``greedy_on_device``) each row's argmax
        id [B] instead; with ``all_logits`` (needs the variant's ``logits: all``) the logits of
        every new position [B, S, vocab]. Either asked of a graph without it is an
        ``InvalidArgumentError``."""

    def forward_on_device(self, ids: np.ndarray, mask: np.ndarray, cache: KVCache, meanwhile=None):
        """:meth:`forward`, the logits left where they were computed: a
        :class:`~portable_infer.engine.device_logits.DeviceLogits` whose ``pick(bitmask, fetch)``
        gives each row's argmax under a grammar bitmask and the logits of rows ``fetch`` only
        (``masks_on_device``), ``sample`` draws rows there (``samples_on_device``) and ``rows``
        brings rows to the host.
        ``meanwhile()`` (host work of the step: the grammar masks) is called before it returns,
        while the device computes where ``overlaps_host``.
        An engine whose logits always come to the host refuses (``InvalidArgumentError``)."""

    def trim(self, dropped_bytes: int) -> None:
        """A cache that held ``dropped_bytes`` was dropped: give its memory back where it is large."""
