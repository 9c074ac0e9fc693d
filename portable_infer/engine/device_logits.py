"""One forward's logits left where the engine computed them, and the verbs that read them there.

An engine's ``forward_on_device`` returns a :class:`DeviceLogits`: the logits [N, 1, V] (an
OrtValue on the engine's device) and the graph's own argmax of each row. The batch's picker
(:mod:`portable_infer.decode.batch_pick`) then asks only for what it needs: token ids, rows drawn
on the device (:mod:`~portable_infer.engine.device_sample`), argmaxes under grammar masks
(:mod:`~portable_infer.engine.masked_argmax`), and the logits of the rows the host still reads.
"""

from __future__ import annotations

import numpy as np


class DeviceLogits:
    """One forward's logits [N, 1, V] (an OrtValue) and its graph's argmax [N] (an OrtValue, a
    host array, or None), valid until the engine's next forward on the same cache (a decode
    step's buffers are reused).

    Args:
        value, token: the above.
        picker: what makes the :class:`~portable_infer.engine.masked_argmax.MaskedArgmax` on that
            device (on first use); None where the engine masks on the host.
        masks_here: masks are worth applying there (the engine's ``masks_on_device``), else the
            rows that need a mask come to the host.
        sampler: what makes the :class:`~portable_infer.engine.device_sample.DeviceSampler` (the
            engine's ``samples_on_device``); None: rows come to the host whole-buffer.
        index: the batch's row ``i`` is ``value``'s row ``index[i]`` (a packed forward's rows in
            another order or with rows missing: -1); None: the same rows.
    """

    def __init__(self, value, token, picker=None, masks_here: bool = False, sampler=None, index=None):
        self.value, self.token, self.picker, self.masks_here = value, token, picker, masks_here
        self.sampler, self.index = sampler, None if index is None else np.asarray(index, np.int64)
        rows, _, self.vocab = value.shape()
        self.batch = rows if index is None else len(self.index)

    def view(self, index) -> DeviceLogits:
        """These logits with the batch's row ``i`` at this batch's row ``index[i]`` (-1: none)."""
        index = np.asarray(index, np.int64)
        inner = index if self.index is None else np.where(index >= 0, self.index[index], -1)
        return DeviceLogits(self.value, self.token, self.picker, self.masks_here, self.sampler, inner)

    def _at(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64).reshape(-1)
        return rows if self.index is None else self.index[rows]

    def argmax(self) -> np.ndarray | None:
        """Each row's argmax over every token [batch] int64 on the host: the graph's ``next_token``
        (one id per row crosses); None where the graph has none."""
        if self.token is None:
            return None
        token = np.asarray(self.token.numpy() if hasattr(self.token, "numpy") else self.token).reshape(-1)
        return token.copy() if self.index is None else np.where(self.index >= 0, token[self.index], 0)

    def rows(self, index) -> np.ndarray:
        """The logits of rows ``index`` [n, V] float32 on the host, unmasked (only those rows
        move where the engine samples on its device)."""
        at = self._at(index)
        if self.sampler is not None:
            return self.sampler().rows(self.value, at)
        return self.value.numpy()[at, 0]

    def sample(self, rows, filters, u: np.ndarray) -> tuple:
        """Rows ``rows`` drawn where the logits are: token [n] (-1: the row's logits cannot be
        sampled; the host's draw names why); see
        :meth:`DeviceSampler.sample <portable_infer.engine.device_sample.DeviceSampler.sample>`."""
        return self.sampler().sample(self.value, self._at(rows), filters, u)

    def pick(self, bitmask: np.ndarray | None, fetch=()) -> tuple:
        """Each row's argmax among the tokens ``bitmask`` allows ([B, ceil(V/32)] int32; None:
        every token), and the logits of rows ``fetch`` with the same mask applied (-inf where
        not allowed). Returns (token [B] int64, logits [len(fetch), V] float32), on the host;
        nothing else leaves the device."""
        self._whole("pick")
        if bitmask is None:
            bitmask = np.full((self.batch, -(-self.vocab // 32)), -1, np.int32)
        return self.picker().run(self.value, bitmask, fetch)

    def pick_rows(self, rows, allowed: np.ndarray) -> np.ndarray:
        """The argmax of rows ``rows`` among the tokens ``allowed`` ([len(rows), V] bool) gives
        each: token [len(rows)] int64 on the host; nothing else leaves the device."""
        self._whole("pick_rows")
        return self.picker().run_rows(self.value, rows, allowed)

    def _whole(self, verb: str) -> None:
        if self.picker is None or self.index is not None:
            raise RuntimeError(f"{verb}: these logits have no masked-argmax picker on their device "
                               f"(masks_here is False)")
