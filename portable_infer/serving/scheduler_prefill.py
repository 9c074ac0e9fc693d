"""The prefill half of the scheduler's step loop (a mixin of :class:`~portable_infer.serving.scheduler.Scheduler`:
it reads the scheduler's ``batch``, ``queues`` and ``meter``; loop thread only).

A step's :class:`~portable_infer.serving.scheduler_plan.Prefill` runs as a group of whole prompts
(retried one by one if that forward fails), as one prompt's chunk, or, on a paged batch with
rows to decode, inside the decode forward (:meth:`PrefillSteps._mixed`). Prompts that end join
the running batch with their first tokens handed over.
"""

from __future__ import annotations

import logging

from portable_infer.serving.request import Request

logger = logging.getLogger("portable_infer.serving.scheduler")


class PrefillSteps:
    """The scheduler's prefill verbs (see the module's docstring)."""

    def _prefill(self, step, named: dict) -> None:
        rows = [named[s.request] for s in step.slices]
        if step.grouped:
            try:
                self._prefill_group(rows, step)
            except Exception as exc:  # noqa: BLE001
                self._fail_prefill(rows, exc)
        elif rows[0].state == "done":  # cancelled while it waited for its turn
            self._fail_prefill(rows, None)
        else:
            try:
                self._prefill_chunk(rows[0], step)
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
                self._fail_prefill(rows, exc)

    def _mixed(self, step, named: dict) -> None:
        """A paged batch's step: its rows' decode and ``step``'s prefill in one forward. A failure
        ends the running rows and the prefill's."""
        rows = [named[s.request] for s in step.slices]
        try:
            results, done = self.batch.mixed(rows, step)
        except Exception as exc:  # noqa: BLE001
            self._fail_prefill(rows, exc)
            self._fail_batch("mixed prefill and decode step failed", exc)
            return
        self.queues.hand_over(results)
        self._prefill_end(rows, step, done)

    def _prefill_group(self, rows: list, step) -> None:
        """Several whole prompts in one forward; if it fails, each is prefilled alone later."""
        try:
            done = self.batch.prefill(rows, step)
        except Exception:  # noqa: BLE001 - maybe one request's doing: each is prefilled alone next
            logger.warning("prefill of %d requests together failed; prefilling them one at a time", len(rows),
                           exc_info=True)
            for r in rows:
                r.alone = True
            return
        self._prefilled(rows, step, done)

    def _prefill_chunk(self, r: Request, step) -> None:
        self._prefill_end([r], step, self.batch.prefill([r], step))

    def _prefill_end(self, rows: list, step, done) -> None:
        """After ``step``'s forward: a chunk with more to go (``done`` None) counts its tokens;
        prompts that ended join the batch (:meth:`_prefilled`)."""
        if done is None:
            rows[0].prefilled = step.slices[0].end
            with self.queues.lock:
                self.meter.count("prompt_tokens", step.tokens)
            return
        self._prefilled(rows, step, done)

    def _prefilled(self, rows: list, step, done) -> None:
        """Prompts done: out of the prefilling queue, first tokens out, rows into the batch."""
        with self.queues.lock:
            self.queues.leave_prefilling(rows)
            for r in rows:
                r.prefilled = r.prompt_len
            self.meter.count("prompt_tokens", step.tokens)
        self.queues.hand_over(done.results)
        self.batch.join(done)

    def _fail_prefill(self, rows: list, exc: Exception | None) -> None:
        """``rows`` leave the prefilling queue, failed with ``exc`` (None: they had ended)."""
        if exc is not None:
            logger.error("prefill of %s failed", ", ".join(r.id for r in rows), exc_info=exc)
            for r in rows:
                self.queues.fail(r, exc)
        with self.queues.lock:
            self.queues.leave_prefilling(rows)
        self.batch.forget([r.id for r in rows])
