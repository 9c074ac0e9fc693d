"""Weights converted and written once for every graph that shares one data file.

The fused, fused-int8, static and static-int8 graphs hold the same weights in the same form (only
their ops and accuracy levels differ). The first graph that needs a weight reads, quantizes and
writes it; the next ones add the very same initializers (the data file holds the bytes once)
without reading or quantizing the source again, and without reading the parts of a q/k/v or
gate/up stack that an earlier graph already emitted. The -q4 graphs share theirs the same way
(``int4_fit.FitCache``, which also records the fit's error).
"""

from __future__ import annotations


class SharedWeights:
    """The emitted MatMulNBits records of one shared data file, and which stacks were possible."""

    def __init__(self):
        self.emitted: dict = {}  # WeightStore key -> (emitted record, its initializers)
        self.stacks: dict[str, bool] = {}  # stacked key -> whether the parts' storage formats agreed

    def emit(self, store, key: str, name: str, make) -> dict:
        """``store``'s MatMulNBits record of ``key``: made by ``make()`` the first time, else the
        first graph's initializers added to this graph."""
        if key in self.emitted:
            store._stacked.pop(name, None)  # the stacked source matrix is not needed again
            record, protos = self.emitted[key]
            store.g.initializers.extend(protos)
            store._emitted[key] = record
            return record
        start = len(store.g.initializers)
        record = make()
        self.emitted[key] = (record, store.g.initializers[start:])
        return record
