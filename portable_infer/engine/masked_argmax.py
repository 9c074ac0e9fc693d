"""Greedy picks under grammar masks where the logits are, with the shipped ``graphs/masked_argmax.onnx``.

A batch with a constrained row needs more than the graph's own ``next_token`` (the argmax of
every token): each such row may only take the tokens its grammar allows. Bringing every row's
logits to the host for that ([16, 49152] float32 per step) and masking them in numpy cost 30 %
of a batch-16 step on an H200. Here the masks are applied where the logits are: the companion
graph takes the forward's logits in place, the batch's grammar bitmask (one small upload; rows
to leave unmasked all ones) and the rows the host still needs (sampling, logprobs, penalties,
logit bias), and gives back each row's argmax and those rows' masked logits only::

    forward ─ logits [B, 1, V] ─ Where(bitmask, logits, -inf) ─┬─ ArgMax ──────── token [B]
              (on the device)     bitmask [B, ceil(V/32)] int32 └─ Gather(rows) ── fetched [n, V]

Bit ``v % 32`` of word ``v // 32`` allows token ``v`` (llguidance's layout). Ties go to the first
index, like numpy's argmax and the graph's ``next_token``.

Where only a few rows need the mask (greedy rows whose grammar refused the plain argmax), the
lean ``graphs/masked_rows.onnx`` gathers just those rows and takes their unpacked masks
(:meth:`DeviceLogits.pick_rows`): three kernels instead of eleven.
"""

from __future__ import annotations

import numpy as np

from portable_infer.engine.companion import companion_session


class MaskedArgmax:
    """The companion graph on a model session's device (see the module docstring)."""

    def __init__(self, session, ort, provider: str | None = None):
        self.session = companion_session(session, ort, "masked_argmax.onnx", provider)
        self.rows_session = companion_session(session, ort, "masked_rows.onnx", provider)

    def run(self, logits, bitmask: np.ndarray, rows) -> tuple:
        """``logits`` an OrtValue [B, 1, V] float32 (read in place); ``bitmask`` [B, >= V/32]
        int32 on the host; ``rows`` the rows to fetch. Returns (token [B] int64, the masked
        logits of ``rows`` [len(rows), V] float32), both on the host."""
        batch, one, vocab = logits.shape()
        if one != 1 or bitmask.shape[0] != batch or bitmask.shape[1] * 32 < vocab:
            raise ValueError(f"masked argmax takes logits [B, 1, V] and a bitmask [B, >= V/32]; got "
                             f"{logits.shape()} and {bitmask.shape}")
        b = self.session.io_binding()
        b.bind_input("logits", logits.device_name(), 0, np.float32, [batch, vocab], logits.data_ptr())
        b.bind_cpu_input("bitmask", np.ascontiguousarray(bitmask, np.int32))
        b.bind_cpu_input("rows", np.asarray(rows, np.int64).reshape(-1))
        b.bind_output("token", "cpu")
        b.bind_output("fetched", "cpu")
        self.session.run_with_iobinding(b)
        token, fetched = b.get_outputs()
        return token.numpy(), fetched.numpy()

    def run_rows(self, logits, rows, allowed: np.ndarray) -> np.ndarray:
        """The argmax of ``logits`` rows ``rows`` ([n] of an OrtValue [B, 1, V], read in place)
        among the tokens ``allowed`` ([n, V] bool, on the host) gives each: token [n] int64."""
        batch, one, vocab = logits.shape()
        rows = np.asarray(rows, np.int64).reshape(-1)
        if one != 1 or allowed.shape != (rows.size, vocab):
            raise ValueError(f"masked rows take logits [B, 1, V] and allowed [n, V] for n rows; got "
                             f"{logits.shape()}, {allowed.shape} and {rows.size} rows")
        b = self.rows_session.io_binding()
        b.bind_input("logits", logits.device_name(), 0, np.float32, [batch, vocab], logits.data_ptr())
        b.bind_cpu_input("rows", rows)
        b.bind_cpu_input("allowed", np.ascontiguousarray(allowed, np.bool_))
        b.bind_output("token", "cpu")
        self.rows_session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()
