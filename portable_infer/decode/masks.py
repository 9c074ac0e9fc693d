"""A step's grammar masks: llguidance's token bitmasks for every constrained row, filled while
the forward pass runs, and reading them.

::

    MaskFill        the masks of a step's constrained rows in one llguidance call (their last
                    tokens fed to the matchers first): on a worker thread, or inline on the
                    step's thread while the device computes (an engine that overlaps_host)
    allows / allows_each / forced_tokens / allowed_tokens
                    reading bitmask rows: bit v % 32 of word v // 32 allows token v

The grammars themselves (:class:`~portable_infer.decode.constraints.Constraint`, the per-model
:class:`~portable_infer.decode.constraints.Guide`) live in :mod:`portable_infer.decode.constraints`.
"""

from __future__ import annotations

import os
import queue
import threading

import numpy as np

from portable_infer.decode.constraints import _llguidance

# llguidance's own pool for a step's masks. Its default (80 % of the CPUs: 12 on a 16-core GPU
# host) filled 16 JSON-schema rows in 0.46-0.60 ms, 2 threads in 0.30-0.34 ms, and the CUDA step's
# overhead fell from +8-12 % to +5-8 % (H200, docs/benchmarks.md, session 17): waking many
# threads costs more than it saves at these sizes. Never more than its default (1 on 2 CPUs,
# where ONNX Runtime's threads compute the forward meanwhile).
MASK_THREADS = 2


def _mask_threads() -> int:
    """The pool's threads: MASK_THREADS, or llguidance's default where that is fewer."""
    return max(1, min(MASK_THREADS, int(0.8 * len(os.sched_getaffinity(0)))))


_executor_lock = threading.Lock()
_executors: dict = {}


class _Worker:
    """One daemon thread running the calls submitted to it in order; each call's value (or the
    exception it raised) comes back through its own queue. Lighter than a ThreadPoolExecutor's
    futures: every constrained step submits one, on the step's own path."""

    def __init__(self, name: str):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, args, reply = self._tasks.get()
            try:
                out = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                out = exc
            reply.put(out)

    def submit(self, fn, *args) -> queue.SimpleQueue:
        """Run ``fn(*args)`` on the thread; its value or exception arrives on the queue returned."""
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._tasks.put((fn, args, reply))
        return reply


def _shared(kind: str):
    """One llguidance executor (its own thread pool) and one worker thread per process, made on
    first use."""
    with _executor_lock:
        if kind not in _executors:
            _executors[kind] = (_llguidance().LLExecutor(num_threads=_mask_threads()) if kind == "llg"
                                else _Worker("portable-infer-masks"))
        return _executors[kind]


def fill_masks(matchers: dict, rows: int, vocab_size: int) -> np.ndarray:
    """Token bitmasks [rows, ceil(vocab/32)] int32 for ``matchers`` ({row: matcher}) in one
    batched llguidance call (rows without a matcher keep every token allowed)."""
    import llguidance.numpy as lln

    mask = lln.allocate_token_bitmask(rows, vocab_size)
    if matchers:
        lln.fill_next_token_bitmask_par(_shared("llg"), [(m, i) for i, m in matchers.items()], mask)
    return mask


class MaskFill:
    """:func:`fill_masks` for one step, made before the forward pass and taken (:meth:`result`)
    after it: started on a worker thread (llguidance releases the GIL, and so does ONNX Runtime's
    run), or, ``inline``, run by :meth:`run` on the caller's thread while the device computes the
    forward (an engine that ``overlaps_host``: no thread hand-offs on the step's path). ``fed``:
    sequences whose last token goes to their matcher first (:meth:`Sequence.feed
    <portable_infer.decode.sequence.Sequence.feed>`), in the same call: off the step's path too.

    The matchers must not be touched until :meth:`result` returns.
    """

    def __init__(self, matchers: dict, rows: int, vocab_size: int, fed=(), inline: bool = False):
        self._args = (fed, matchers, rows, vocab_size) if matchers else None
        self._reply = _shared("thread").submit(_feed_and_fill, *self._args) if matchers and not inline else None
        self._masks = None

    @classmethod
    def of(cls, seqs: list, inline: bool = False) -> MaskFill:
        """The fill for a batch's rows: ``seqs`` their :class:`~portable_infer.decode.sequence.Sequence`
        (None for a row that picks nothing this step); one bitmask row per entry."""
        matchers, fed, vocab = {}, [], 0
        for i, s in enumerate(seqs):
            if s is not None and s.matcher is not None:
                matchers[i] = s.matcher
                fed.append(s)
                vocab = max(vocab, s.mask_vocab)
        return cls(matchers, len(seqs), vocab, fed, inline)

    def run(self) -> None:
        """An inline fill: fill now, on this thread (once; nothing for a started one). A failure
        is kept for :meth:`result`: the forward this runs inside completes."""
        if self._args is not None and self._reply is None and self._masks is None:
            try:
                self._masks = _feed_and_fill(*self._args)
            except BaseException as exc:  # noqa: BLE001 - raised by result()
                self._masks = exc

    def result(self) -> np.ndarray | None:
        """The bitmasks (None when no row was constrained)."""
        if self._reply is not None and self._masks is None:
            self._masks = self._reply.get()
        self.run()
        if isinstance(self._masks, BaseException):
            raise self._masks
        return self._masks


def _feed_and_fill(fed, matchers: dict, rows: int, vocab_size: int) -> np.ndarray:
    """Feed each of ``fed`` its last token, then :func:`fill_masks` (a matcher that refused its
    token keeps every token allowed: its row raises at its step)."""
    for seq in fed:
        seq.feed()
    return fill_masks({i: m for i, m in matchers.items() if not m.is_error()}, rows, vocab_size)


def allows(mask: np.ndarray, token: int) -> bool:
    """Bitmask row ``mask`` ([W] int32) lets ``token`` come next (bit token % 32 of word token // 32)."""
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


def allows_each(masks: np.ndarray, rows, tokens) -> np.ndarray:
    """:func:`allows` for several rows at once: row ``rows[k]`` of the bitmask ``masks`` [B, W]
    int32 lets ``tokens[k]`` come next -> bool [len(rows)] (reads one word a row, copies no mask)."""
    rows, tokens = np.asarray(rows, np.int64), np.asarray(tokens, np.int64)
    words = masks[rows, tokens >> 5].astype(np.int64)
    return ((words >> (tokens & 31)) & 1).astype(bool)


def forced_tokens(masks: np.ndarray) -> np.ndarray:
    """For bitmask rows ``masks`` [n, W] int32: the one token each allows, or -1 where it allows
    more (or none). A token the grammar forces needs no logits: it is the argmax under the mask."""
    masks = np.ascontiguousarray(masks)
    nonzero = masks != 0
    word = nonzero.argmax(axis=1)
    w = masks[np.arange(len(masks)), word].view(np.uint32).astype(np.int64)
    single = (nonzero.sum(axis=1) == 1) & ((w & (w - 1)) == 0)
    bit = np.zeros(len(masks), np.int64)
    for k in np.flatnonzero(single):  # the few forced rows: their one bit
        bit[k] = int(w[k]).bit_length() - 1
    return np.where(single, word * 32 + bit, -1)


def allowed_tokens(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Bitmask rows ([W] or [n, W] int32) as bools ([vocab] or [n, vocab]): True where the token
    may come next (bit v % 32 of word v // 32); a batch's rows in one call."""
    bits = np.unpackbits(np.ascontiguousarray(mask).view(np.uint8), axis=-1, count=vocab_size, bitorder="little")
    return bits.view(np.bool_)
