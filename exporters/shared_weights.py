"""Weights converted and written once for every graph that shares one data file.

The fused, fused-int8, static and static-int8 graphs hold the same weights in the same form (only
their ops and accuracy levels differ). The first graph that needs a weight reads, quantizes (or
transposes) and writes it; the next ones add the very same initializers (the data file holds the bytes once)
without reading or quantizing the source again, and without reading the parts of a q/k/v or
gate/up stack that an earlier graph already emitted. The -q4 graphs share theirs the same way
(``int4_fit.FitCache``, which also records the fit's error).
"""

from __future__ import annotations


class SharedWeights:
    """The emitted weight records of one shared data file (MatMulNBits, dense, DequantizeLinear),
    and which stacks were possible."""

    def __init__(self):
        self.emitted: dict = {}  # WeightStore key -> (weight_ops record, its initializers)
        self.stacks: dict[str, bool] = {}  # stacked key -> whether the parts' storage formats agreed

    def emit(self, g, key: str, make) -> tuple[object, bool]:
        """(the weight record of ``key``, whether an earlier graph made it): made by ``make()``
        the first time, else the first graph's record with its initializers added to graph ``g``."""
        if key in self.emitted:
            record, protos = self.emitted[key]
            g.initializers.extend(protos)
            return record, True
        start = len(g.initializers)
        record = make()
        self.emitted[key] = (record, g.initializers[start:])
        return record, False
