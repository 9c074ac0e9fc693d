"""Sampled picks where the logits are, with the shipped ``graphs/sample.onnx``, and the rows the
host still reads, with ``graphs/rows.onnx`` (the rule of both: ``exporters/sample_graph.py``).

A row that samples (temperature > 0, any of top-k, top-p, min-p; nothing else reading or
changing its logits) sends one uniform number up and gets its token id back: at 256 rows of
Llama-3's 128,256 tokens the host draw took 0.05-0.5 s a step (docs/benchmarks.md, Session 20),
and bringing the rows' logits over is 131 MB. The draw is the host sampler's rule with the same
uniform number (``Sequence.rng.random()``, one a draw as ``draw_weighted`` takes), so a seeded
request draws the same tokens from the same logits on either side, bar float rounding of sums.
"""

from __future__ import annotations

import logging
import numpy as np

from portable_infer.engine.companion import companion_session

logger = logging.getLogger(__name__)

# Tokens the graph's TopK sorts for rows filtered by rank (top-k, top-p). A row whose kept set
# reaches past them (top_k larger; top_p's mass spread past the best 1,024) runs again with the
# whole vocabulary sorted: its token is the same either way.
CANDIDATES = 1024
DRAWN, RANKS_SHORT, UNSAMPLEABLE = 0, 1, 2  # the graph's status per row


class DeviceSampler:
    """The two companion graphs on a model session's device; ``candidates``: see CANDIDATES."""

    def __init__(self, session, ort, provider: str | None = None, candidates: int = CANDIDATES):
        self.session = companion_session(session, ort, "sample.onnx", provider)
        self.rows_session = companion_session(session, ort, "rows.onnx", provider)
        self.candidates = candidates
        self.reruns = 0  # rows run again with the whole vocabulary sorted (for the benchmarks)

    def sample(self, logits, rows, filters, u: np.ndarray) -> tuple:
        """Draw rows ``rows`` of ``logits`` (an OrtValue [B, 1, V] float32, read in place) with
        ``filters`` (those rows' settings: :func:`~portable_infer.decode.sampling.draw_filters`) and one
        uniform number each (``u`` [n] float64). Returns token [n] int64, -1 for a row whose
        logits cannot be sampled (NaN or inf, or its temperature overflows them: the host's
        draw names that error)."""
        vocab = logits.shape()[-1]
        rows = np.asarray(rows, np.int64).reshape(-1)
        if not rows.size:  # (a graph's reshapes cannot infer an axis beside an empty one)
            return np.empty(0, np.int64)
        ranked = bool((filters["top_k"] > 0).any() or (filters["top_p"] < 1).any())
        token, status = self._run(logits, rows, filters, u, min(self.candidates, vocab) if ranked else 1)
        short = np.flatnonzero(status == RANKS_SHORT)
        if short.size:
            self.reruns += int(short.size)
            some = {name: value[short] for name, value in filters.items()}
            token[short], status[short] = self._run(logits, rows[short], some, u[short], vocab)
        return np.where(status == DRAWN, token, -1)

    def _run(self, logits, rows, filters, u, k: int) -> tuple:
        batch, one, vocab = logits.shape()
        if one != 1 or not (filters["temperature"] > 0).all():
            raise ValueError(f"device draws take logits [B, 1, V] and temperatures > 0; got {logits.shape()} "
                             f"and {filters['temperature']}")
        b = self.session.io_binding()
        b.bind_input("logits", logits.device_name(), 0, np.float32, [batch, vocab], logits.data_ptr())
        b.bind_cpu_input("rows", rows)
        for name, value in filters.items():
            b.bind_cpu_input(name, value)
        b.bind_cpu_input("u", np.asarray(u, np.float64).reshape(-1))
        b.bind_cpu_input("k", np.array([k], np.int64))
        b.bind_output("token", "cpu")
        b.bind_output("status", "cpu")
        self.session.run_with_iobinding(b)
        token, status = b.get_outputs()
        return token.numpy().copy(), status.numpy().copy()

    def prove(self, ort, device: str) -> None:
        """Draw rows whose tokens are known on ``device`` (the engine's) and raise RuntimeError
        unless each comes back: the graph runs there and keeps the rule (top-k 1, top-p and
        min-p with one dominant token, the inverse CDF's first and last token)."""
        logits = np.zeros((5, 1, 300), np.float32)
        logits[:, 0, :] = np.linspace(-2.0, 2.0, 300, dtype=np.float32)[::-1]  # token 0 the most likely
        logits[1:3, 0, 123] = 12.0  # one token with nearly all the mass
        logits[4, 0, 299] = 8.0  # the last token holds most of the mass
        filters = {"temperature": np.full(5, 0.7, np.float32), "top_k": np.array([1, 0, 0, 0, 0], np.int64),
                   "top_p": np.array([1, 0.5, 1, 1, 1], np.float64),
                   "log_min_p": np.array([-np.inf, -np.inf, np.log(0.5), -np.inf, -np.inf], np.float32)}
        value = ort.OrtValue.ortvalue_from_numpy(logits, device, 0)
        got = self.sample(value, np.arange(5), filters, np.array([0.9, 0.9, 0.9, 0.0, 0.9999]))
        if got.tolist() != [0, 123, 123, 0, 299]:
            raise RuntimeError(f"sample.onnx drew {got.tolist()} on {device} where [0, 123, 123, 0, 299] are the "
                               f"only tokens the rule allows")

    def rows(self, logits, index) -> np.ndarray:
        """Rows ``index`` of ``logits`` (an OrtValue [B, 1, V]) on the host [n, V] float32; no others move."""
        batch, _, vocab = logits.shape()
        b = self.rows_session.io_binding()
        b.bind_input("logits", logits.device_name(), 0, np.float32, [batch, vocab], logits.data_ptr())
        b.bind_cpu_input("rows", np.asarray(index, np.int64).reshape(-1))
        b.bind_output("fetched", "cpu")
        self.rows_session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()


class DrawsOnDevice:
    """An engine's part that draws sampling rows on its device: :meth:`device_sampler` (made
    once) and ``samples_on_device``, set by :meth:`start_device_draws` off the CPU where the
    graphs run there (else logged: the host draws)."""

    samples_on_device = False
    _sampler = None

    def start_device_draws(self) -> None:
        if self.device == "cpu":
            return
        try:
            self.device_sampler().prove(self.ort, self.device)
            self.samples_on_device = True
        except Exception as exc:  # noqa: BLE001 - the host path still works
            logger.warning("sampled rows are drawn on the host (%s: %s)", type(exc).__name__, exc)

    def device_sampler(self) -> DeviceSampler:
        """The companion sessions that draw sampled rows on this engine's device (made once)."""
        if self._sampler is None:
            self._sampler = DeviceSampler(self.session, self.ort, self.provider)
        return self._sampler
